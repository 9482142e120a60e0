"""`pdsn pipeline`: every stage in order through one work folder, the benchmark on the fine-tuned dictionary."""

import json

import h5py
from typer.testing import CliRunner

from pdsn_cli.cli.app import app


def test_pipeline_runs_every_stage_and_benchmarks_the_finetuned_head(tmp_path, tiny_weights):
    work, js = tmp_path / "work", tmp_path / "p.json"
    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work", str(work),
                                 "--train-limit", "12", "--epochs", "1", "--finetune-epochs", "1", "--occluder", "none", "--occluder",
                                 "sunglasses", "--json", str(js), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "5/5 benchmark" in r.output
    res = json.loads(js.read_text())
    assert res["finetune"]["out"] == str(work / "dict-ft.h5") and res["finetune"]["kept_epoch"] == 1
    assert res["benchmark"]["finetuned_head"] and res["benchmark"]["dictionary"] == str(work / "dict-ft.h5")
    with h5py.File(work / "pairs-random.h5") as f:
        assert f.attrs["template"] == "arc112x96" and len(f["label"]) > 0
    assert {(x["method"], x["occlusion"]) for x in res["benchmark"]["results"]} == {
        (m, o) for m in ("baseline", "pdsn") for o in ("none", "sunglasses")}

    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work",
                                 str(tmp_path / "w2"), "--train-limit", "12", "--epochs", "1", "--finetune-epochs", "0", "--occluder", "none",
                                 "--json", str(js), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["finetune"] is None and not res["benchmark"]["finetuned_head"] and "4/4 benchmark" in r.output
