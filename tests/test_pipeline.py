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
        assert f.attrs["template"] == "arc112x96" and len(f["chip"]) > 0 and f.attrs["pdsn_schema"] == 2
    assert {(x["method"], x["occlusion"]) for x in res["benchmark"]["results"]} == {
        (m, o) for m in ("baseline", "pdsn") for o in ("none", "sunglasses")}

    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work",
                                 str(tmp_path / "w2"), "--train-limit", "12", "--epochs", "1", "--finetune-epochs", "0", "--occluder", "none",
                                 "--json", str(js), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["finetune"] is None and not res["benchmark"]["finetuned_head"] and "4/4 benchmark" in r.output


def test_pipeline_exports_a_model_that_verify_and_benchmark_can_use(tmp_path, tiny_weights):
    from pdsn_cli.pdsn.models import check_files, read_model

    work, js, model = tmp_path / "work", tmp_path / "p.json", tmp_path / "my-model"
    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work", str(work),
                                 "--train-limit", "12", "--epochs", "1", "--finetune-epochs", "1", "--occluder", "none",
                                 "--occluder", "sunglasses", "--export-model", str(model), "--json", str(js), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "5/7 train-detector" in r.output and "6/7 benchmark" in r.output and "7/7 calibrate" in r.output
    res = json.loads(js.read_text())
    assert res["benchmark"]["occlusion_source"] == "detector" and res["detector"]["out"] == str(work / "detector.pt")
    m = read_model(model)
    assert check_files(m) == [] and m.meta["trunk"] == "tiny" and m.meta["trunk_weights"] == "trunk.pt"
    assert len(m.meta["commands"]) == 1 and m.meta["commands"][0].startswith("pdsn")  # the command line as typed
    assert m.meta["training"]["images"] == 12 and set(m.meta["figures"]["synthetic"]) == {"none", "sunglasses"}
    assert (work / "scores.csv").is_file()
    # the same command rebuilds the same model: its threshold and reference embeddings (the files' bytes differ only
    # by the work folder's paths recorded in them)
    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work", str(tmp_path / "again"),
                                 "--train-limit", "12", "--epochs", "1", "--finetune-epochs", "1", "--occluder", "none",
                                 "--occluder", "sunglasses", "--export-model", str(tmp_path / "my-model-2"), "--quiet"])
    assert r.exit_code == 0, r.output
    again = read_model(tmp_path / "my-model-2")
    assert again.meta["reference"] == m.meta["reference"]
    assert again.meta["threshold"] == m.meta["threshold"]
    # without a fine-tuned head there is nothing to ship
    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work", str(tmp_path / "w3"),
                                 "--finetune-epochs", "0", "--export-model", str(tmp_path / "m2")])
    assert r.exit_code == 2 and "--finetune-epochs must be ≥ 1" in r.output


def test_pipeline_tunes_the_trunk_on_every_training_set(tmp_path, tiny_weights, face_folder):
    """--tune trunk with --train-dir: the pairs hold both sets' people apart, the trunk is tuned on both, the
    benchmark's PDSN rows run the tuned trunk."""
    work, js = tmp_path / "work", tmp_path / "p.json"
    r = CliRunner().invoke(app, ["pipeline", "--trunk", "tiny", "--weights", tiny_weights, "--work", str(work),
                                 "--train-limit", "6", "--epochs", "1", "--tune", "trunk", "--finetune-epochs", "1",
                                 "--train-dir", str(face_folder), "--occluder", "scarf", "--json", str(js), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["finetune"]["face_sets"] == ["faces-synthetic", "faces-people"] and res["finetune"]["faces"] == 12
    assert res["benchmark"]["finetuned_trunk"]
    with h5py.File(work / "pairs-blocks.h5") as f:
        sets = {s.decode().split("/")[0] if isinstance(s, bytes) else s.split("/")[0] for s in f["identity"][()]}
    assert sets == {"synthetic", "people"}
    r = CliRunner().invoke(app, ["pipeline", "--work", str(tmp_path / "w2"), "--tune", "everything"])
    assert r.exit_code == 2 and "--tune" in r.output


def test_run_pipeline_leaves_the_callers_config_alone(tmp_path):
    """The fine-tune's default epochs are resolved on a copy: the same config object can run again with the
    other --tune (and get that tune's default)."""
    import pytest

    from pdsn_cli.errors import BadInputError
    from pdsn_cli.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(work=tmp_path / "w", occlusions=["no-such-occluder"])  # refused after the epochs' default
    with pytest.raises(BadInputError):
        run_pipeline(cfg)
    assert cfg.finetune_epochs is None
