"""``pdsn benchmark --dataset ar``: the protocols scored end to end on a generated AR fixture (cropped layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ar_fixture import write_fixture
from typer.testing import CliRunner

from pdsn_cli.cli.app import app
from pdsn_cli.errors import BadInputError
from pdsn_cli.eval.identification import ArConfig, closed_set_ranks, run_ar


def test_closed_set_ranks_best_gallery_image_per_subject():
    g = np.eye(3, dtype=np.float32)  # subjects a, a, b
    p = np.array([[0.0, 1.0, 0.0], [0.9, 0.0, 0.1], [0.0, 0.2, 1.0]], np.float32)
    hits = closed_set_ranks(p, g, np.array(["a", "a", "b"]), np.array(["a", "b", "a"]), ranks=2)
    # probe 0 → a (its 2nd image) rank 1; probe 1 → b is below a: rank 2; probe 2 → a is below b: rank 2
    np.testing.assert_array_equal(hits, [1, 3])


@pytest.fixture(scope="module")
def ar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("AR")
    write_fixture(root, layout="cropped", subjects=4, seed=3, indices=[1, 2, 8, 11, 21, 24])
    return root


def test_ar_protocol_2_baseline_and_pdsn(ar_root, tiny_weights, fdm_dict):
    res = run_ar(ArConfig(data_dir=ar_root, protocol=2, trunk="tiny", weights=tiny_weights, dict_path=fdm_dict,
                          ranks=4))
    rows = {(r["method"], r["occlusion"]): r for r in res["results"]}
    assert set(rows) == {(m, k) for m in ("baseline", "pdsn") for k in ("sunglasses", "scarf")}
    assert res["protocol"]["subjects"] == 4 and res["protocol"]["gallery_images"] == 4
    for r in rows.values():
        assert r["probes"] == 8  # images 8 and 21 (or 11 and 24) of 4 subjects
        assert r["cmc"] == sorted(r["cmc"]) and r["cmc"][-1] == 1.0  # 4 subjects: rank 4 always hits
        assert r["rank1"] == r["cmc"][0]
    assert rows[("pdsn", "sunglasses")]["blocks_marked"] > 0


def test_ar_cli_json_and_errors(ar_root, tiny_weights, tmp_path):
    out = tmp_path / "ar.json"
    r = CliRunner().invoke(app, ["benchmark", "--dataset", "ar", "--data-dir", str(ar_root), "--protocol", "1",
                                 "--trunk", "tiny", "--weights", tiny_weights, "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["protocol"]["gallery_images"] == 8 and {x["method"] for x in res["results"]} == {"baseline"}
    r = CliRunner().invoke(app, ["benchmark", "--dataset", "ar", "--data-dir", str(ar_root), "--protocol", "3",
                                 "--trunk", "tiny", "--weights", tiny_weights])
    assert r.exit_code == 2 and "unknown AR protocol" in r.output
    with pytest.raises(BadInputError, match="needs --data-dir"):
        run_ar(ArConfig(trunk="tiny"))
