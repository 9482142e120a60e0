"""dlib's test-time jitter: the views, their seeding, the crop against dlib's own extract_image_chip, and
``benchmark --jitter/--metric``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_dlib

from pdsn_cli.eval.benchmark import BenchmarkConfig, pair_scores, run_benchmark
from pdsn_cli.errors import BadInputError
from pdsn_cli.pdsn.jitter import extract_chip, image_rng, jitter_params, jitter_views
from pdsn_cli.data.synthetic import synthetic_faces


@pytest.fixture(scope="module")
def chip():
    return synthetic_faces(1, 1, seed=3, size=150)[0].image


def test_jitter_params_follow_dlibs_ranges():
    rng = np.random.default_rng(0)
    boxes, angles, mirrors = [], [], []
    for _ in range(500):
        (l, t, r, b), a, m = jitter_params(rng, 150)
        boxes.append(r - l + 1)
        assert r - l == b - t
        assert abs((l + r + 1) / 2 - 75) <= 4 and abs((t + b + 1) / 2 - 75) <= 4  # ±2 % of 144 px, rounded
        angles.append(a)
        mirrors.append(m)
    assert 144 <= min(boxes) and max(boxes) <= 148  # 144 / U(0.97, 0.99999), truncated
    assert max(np.abs(angles)) <= np.radians(3) and 0.4 < np.mean(mirrors) < 0.6


def test_views_are_seeded_by_source(chip):
    a = jitter_views(chip, 4, image_rng(0, "x/1.jpg"))
    b = jitter_views(chip, 4, image_rng(0, "x/1.jpg"))
    c = jitter_views(chip, 4, image_rng(0, "x/2.jpg"))
    assert a.shape == (4, 150, 150, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(BadInputError, match="square"):
        jitter_views(chip[:, :120], 1, image_rng(0, "x"))


@needs_dlib
def test_crop_matches_dlib_extract_image_chip(chip):
    import dlib

    rng = np.random.default_rng(1)
    for _ in range(5):
        (l, t, r, b), angle, _ = jitter_params(rng, 150)
        ref = dlib.extract_image_chip(chip, dlib.chip_details(dlib.drectangle(l, t, r, b),
                                                              dlib.chip_dims(150, 150), angle))
        ours = extract_chip(chip, (l, t, r, b), angle, 150)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_pair_scores_metrics():
    e1 = np.array([[3.0, 4.0], [1.0, 0.0]])
    e2 = np.array([[0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(pair_scores(e1, e2, "euclidean"), [-5.0, 0.0])
    np.testing.assert_allclose(pair_scores(e1, e2, "cosine"), [0.0, 1.0])


def test_benchmark_with_jitter_and_euclidean():
    res = run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="dlib-resnet", jitter=2, metric="euclidean",
                                        occlusions=["none", "scarf"]))
    assert res["jitter"] == 2 and res["metric"] == "euclidean"
    assert [r["occlusion"] for r in res["results"]] == ["none", "scarf"]
    assert all(0.5 <= r["accuracy"] <= 1 for r in res["results"])


@pytest.mark.parametrize("cfg, message", [
    (dict(jitter=2, flip=True), "drop --flip"),
    (dict(jitter=-1), "--jitter"),
    (dict(metric="manhattan"), "--metric"),
])
def test_bad_jitter_arguments(cfg, message):
    with pytest.raises(BadInputError, match=message):
        run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="dlib-resnet", **cfg))


def test_jitter_refuses_a_dictionary(tiny_weights, fdm_dict):
    with pytest.raises(BadInputError, match="PDSN masks"):
        run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="tiny", weights=tiny_weights, dict_path=fdm_dict,
                                      jitter=2))
