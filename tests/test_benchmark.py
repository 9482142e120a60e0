"""benchmark: 10-fold verification rows for the baseline and PDSN, on the synthetic protocol and on an
LFW-layout folder with a View-2 pairs.txt."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import hog_detectable_faces, needs_dlib, write_jpeg
from pdsn_cli.data.verification_sets import lfw_set, synthetic_set
from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark
from pdsn_cli.occlusion.driver import OcclusionVariant, parse_occlusions
from pdsn_cli.errors import BadInputError
from pdsn_cli.pdsn.fdm import mirror_blocks
from pdsn_cli.report.plots import plot_roc

ROW_KEYS = {"method", "occlusion", "accuracy", "std", "tar_at_far_1e-3", "auc"}


def _check_rows(rows):
    for r in rows:
        assert ROW_KEYS <= r.keys()
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["auc"] <= 1 and 0 <= r["tar_at_far_1e-3"] <= 1 and r["std"] >= 0


def test_synthetic_baseline(tiny_weights):
    res = run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="tiny", weights=tiny_weights,
                                        occlusions=["none", "sunglasses"]))
    assert res["dataset"] == "synthetic (SYNTHETIC)" and res["trunk"] == "tiny" and res["mask_point"] == "stage3"
    assert res["pairs"] == 600 and res["images"] == 240 and res["dropped_pairs"] == 0
    assert res["dictionary"] is None and res["occlusion_source"] is None
    assert [(r["method"], r["occlusion"]) for r in res["results"]] == [("baseline", "none"),
                                                                      ("baseline", "sunglasses")]
    _check_rows(res["results"])


def test_synthetic_with_dictionary_adds_pdsn_rows_and_recovery(tiny_weights, fdm_dict, tmp_path):
    plot = tmp_path / "roc.png"
    res = run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="tiny", weights=tiny_weights, dict_path=fdm_dict,
                                        occlusions=["none", "sunglasses", "block:12"]))
    plot_roc(res.figures["roc"], plot, title=res.figures["title"])  # what benchmark --plot draws
    rows = {(r["method"], r["occlusion"]): r for r in res["results"]}
    assert set(rows) == {(m, o) for m in ("baseline", "pdsn") for o in ("none", "sunglasses", "block:12")}
    _check_rows(res["results"])
    assert res["occlusion_source"] == "oracle" and res["dictionary"] == str(fdm_dict)
    # nothing occluded → every FDM is all ones → PDSN is the baseline, exactly
    assert rows["pdsn", "none"]["accuracy"] == rows["baseline", "none"]["accuracy"]
    assert rows["pdsn", "none"]["auc"] == rows["baseline", "none"]["auc"]
    assert rows["pdsn", "none"]["blocks_marked"] == 0
    assert "recovery" not in rows["pdsn", "none"]
    for occ in ("sunglasses", "block:12"):
        r = rows["pdsn", occ]
        assert r["occlusion_source"] == "oracle" and r["blocks_marked"] > 0 and r["all_discarded_fallbacks"] == 0
        lost = rows["baseline", "none"]["accuracy"] - rows["baseline", occ]["accuracy"]
        if lost > 1e-9:
            expected = (r["accuracy"] - rows["baseline", occ]["accuracy"]) / lost
            assert r["recovery"] == pytest.approx(expected)
        else:
            assert r["recovery"] is None
    # a single block occluder covers exactly one of the 25 blocks
    assert rows["pdsn", "block:12"]["blocks_marked"] == pytest.approx(1 / 25)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_parse_occlusions():
    names = lambda spec, grid: [v.name for v in parse_occlusions(spec, grid)]  # noqa: E731
    assert names(["clean", "none", "scarf", "block:3", "scarf"], 5) == ["none", "scarf", "block:3"]
    assert names(["block"], 2) == ["block:0", "block:1", "block:2", "block:3"]
    assert [v.block for v in parse_occlusions(["scarf", "block:3"], 5)] == [None, 3]
    for bad, msg in ((["block:25"], "outside"), (["block:x"], "block:J"), (["umbrella"], "unknown occlusion")):
        with pytest.raises(BadInputError, match=msg):
            parse_occlusions(bad, 5)


def test_occlude_second_is_seeded_per_pair_and_mirrors_blocks():
    vs = synthetic_set("arc112x96", identities=20, images=2, pairs_per_fold=4)
    assert len(vs.same) == 40 and vs.same.sum() == 20 and sorted(set(vs.fold)) == list(range(10))
    block6 = OcclusionVariant("block", 6)
    a, occ_a = vs.occlude_second(block6, 5, seed=0)
    b, occ_b = vs.occlude_second(block6, 5, seed=0)
    c, _ = vs.occlude_second(block6, 5, seed=1)
    assert np.array_equal(a, b) and np.array_equal(occ_a, occ_b) and not np.array_equal(a, c)
    assert (occ_a.reshape(len(a), -1).argmax(1) == 6).all()
    clean, none = vs.occlude_second(OcclusionVariant("none"), 5, seed=0)
    assert np.array_equal(clean, vs.chips.image[vs.i2]) and not none.any()
    # block 6 is (row 1, col 1); in the mirrored image it is (row 1, col 3) = block 8
    assert (mirror_blocks(occ_a).reshape(len(a), -1).argmax(1) == 8).all()


@pytest.mark.parametrize("cfg, message", [
    (dict(dataset="lfw"), "needs --data-dir"),
    (dict(dataset="megaface"), "unknown dataset"),
    (dict(dataset="synthetic", block_threshold=0.0), "--block-threshold"),
    (dict(dataset="synthetic", occlusion_source="guess"), "--occlusion"),
    (dict(dataset="synthetic", occlusion_source="detector"), "needs --detector"),
    (dict(dataset="synthetic", occlusions=["umbrella"]), "unknown occlusion"),
    (dict(dataset="synthetic", landmarks="7"), "--landmarks must be one of"),
    (dict(dataset="synthetic", landmarks="68"), "applies to real photos"),
    (dict(dataset="lfw", landmarks="5+68", jitter=4), "does not combine"),
])
def test_bad_benchmark_arguments(cfg, message, tiny_weights):
    with pytest.raises(BadInputError, match=message):
        run_benchmark(BenchmarkConfig(trunk="tiny", weights=tiny_weights, **cfg))


# ---- LFW layout ---------------------------------------------------------------------------------------------------
def write_tiny_lfw(root):
    """<name>/<name>_000N.jpg for 6 synthetic identities × 3 photos, a zero-byte photo, and a 2-fold pairs.txt."""
    people = hog_detectable_faces(6, 3, seed=7)
    names = sorted(people)
    for name in names:
        for k, f in enumerate(people[name], 1):
            write_jpeg(root / name / f"{name}_{k:04d}.jpg", f.image)
    broken = names[5]
    (root / broken / f"{broken}_0004.jpg").write_bytes(b"")
    a, b, c, d, e, f = names
    folds = [
        [f"{a}\t1\t2", f"{b}\t1\t3", f"{c}\t2\t3", f"{a}\t3\t{b}\t2", f"{c}\t1\t{d}\t1", f"{e}\t2\t{f}\t4"],
        [f"{d}\t1\t2", f"{e}\t1\t3", f"{f}\t2\t3", f"{d}\t3\t{e}\t2", f"{f}\t1\t{a}\t1", f"{b}\t2\t{c}\t1"],
    ]
    (root / "pairs.txt").write_text("2\t3\n" + "\n".join(line for fold in folds for line in fold) + "\n")
    return root


@needs_dlib
def test_lfw_layout_with_dlib_resnet(tmp_path):
    root = write_tiny_lfw(tmp_path / "lfw")
    res = run_benchmark(BenchmarkConfig(dataset="lfw", data_dir=root, trunk="dlib-resnet",
                                        occlusions=["none", "mask"]))
    assert res["dataset"] == "lfw" and res["trunk"] == "dlib-resnet"
    assert res["dropped_pairs"] == 1  # the pair with the zero-byte photo
    assert res["pairs"] == 11
    assert res["align"]["skipped"] == 1 and "empty" in res["align"]["skipped_files"][0]["reason"]
    assert res["images"] == 18
    assert [(r["method"], r["occlusion"]) for r in res["results"]] == [("baseline", "none"), ("baseline", "mask")]
    _check_rows(res["results"])
    # a second run reads the aligned chips from the cache and gives the same numbers
    again = run_benchmark(BenchmarkConfig(dataset="lfw", data_dir=root, trunk="dlib-resnet",
                                          occlusions=["none", "mask"]))
    assert again["align"]["from_cache"] == 18 and again["align"]["aligned_now"] == 0
    assert again["results"] == res["results"]


@needs_dlib
def test_lfw_with_68_landmark_chips_and_both(tmp_path):
    root = write_tiny_lfw(tmp_path / "lfw")
    five = lfw_set(root, None, "dlib150", None, landmarks=5)
    six8 = lfw_set(root, None, "dlib150", None, landmarks=68)
    assert six8.chips.source == five.chips.source and (six8.i2 == five.i2).all()
    # another landmark fit: the same faces, a slightly different warp (dlib's 68-point chip)
    d = np.abs(six8.chips.image.astype(int) - five.chips.image.astype(int)).mean()
    assert 0.5 < d < 40
    runs = {lm: run_benchmark(BenchmarkConfig(dataset="lfw", data_dir=root, trunk="dlib-resnet", landmarks=lm,
                                              flip=True, metric="euclidean", occlusions=["none", "sunglasses"]))
            for lm in ("68", "5+68")}
    for lm, res in runs.items():
        assert res["landmarks"] == lm and res["pairs"] == 11
        _check_rows(res["results"])
