"""PDSN model folders (export, checksums, fp16 head, --model/--pdsn) and ``pdsn verify``: a tiny model is
exported from the session fixtures (tiny trunk); the shipped model is checked against its own model.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import needs_dlib, write_jpeg
from test_benchmark import write_tiny_lfw
from pdsn_cli.cli import app
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark
from pdsn_cli.eval.scores import read_scores, write_scores
from pdsn_cli.pdsn import models
from pdsn_cli.pdsn.models import (apply_model, builtin_models, calibrate, check_files, export_model, read_model,
                                  reference_embeddings, resolve_model)
from pdsn_cli.train.detector import TrainDetectorConfig, train_detector
from pdsn_cli.train.finetune import FinetuneConfig, finetune
from pdsn_cli.verify import VerifyConfig, read_pairs_file, verify

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny_model(fdm_dict, block_pairs, tiny_weights, tmp_path_factory) -> Path:
    """finetune → train-detector → benchmark --scores → export-model, on the tiny trunk's session fixtures."""
    tmp = tmp_path_factory.mktemp("model")
    tuned = tmp / "dict-ft.h5"
    finetune(FinetuneConfig(dict_path=fdm_dict, pairs=[block_pairs], out=tuned, weights=tiny_weights, epochs=1))
    det = tmp / "detector.pt"
    train_detector(TrainDetectorConfig(pairs=[block_pairs], out=det, epochs=2, batch_size=32, width=8,
                                       input_size=(40, 40)))
    res = run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="tiny", weights=tiny_weights, dict_path=tuned,
                                        detector=det, occlusions=["none", "sunglasses"], keep_scores=True))
    scores = write_scores(tmp / "scores.csv", res.scores)
    export_model(tuned, det, tmp / "tiny-model", name="tiny-model", scores=scores, weights=tiny_weights,
                 figures=models.model_figures(res))
    return tmp / "tiny-model"


def test_exported_model_loads_with_its_checksums_and_metadata(tiny_model):
    m = read_model(tiny_model)
    assert m.name == "tiny-model" and not m.builtin and check_files(m) == []
    meta = m.meta
    assert meta["trunk"] == "tiny" and meta["grid"] == 5 and meta["tau"] == 0.25
    assert set(meta["files"]) == {"dict.h5", "detector.pt", "trunk.pt"}
    assert meta["figures"]["synthetic"]["sunglasses"].keys() >= {"baseline", "pdsn"}
    assert "maximum accuracy over" in meta["threshold"]["calibrated_on"]
    # the documented embeddings of the generated reference chips are what the files give
    e, blocks = reference_embeddings(m.dict_path, m.detector_path, m.weights_path)
    np.testing.assert_allclose(e, np.array(meta["reference"]["embeddings"]), atol=2e-5)
    assert [np.flatnonzero(b.reshape(-1)).tolist() for b in blocks] == meta["reference"]["blocks"]


def test_head_is_stored_in_float16_within_cosine_0999(tiny_model):
    meta = read_model(tiny_model).meta
    with h5py.File(tiny_model / "dict.h5") as f:
        dtypes = {f["head"][k].dtype for k in f["head"]}
    if meta["head_dtype"] == "float16":
        assert dtypes == {np.dtype(np.float16)} and meta["fp16_min_cosine_to_fp32"] >= 0.999
    else:  # the check refused it: recorded why
        assert dtypes == {np.dtype(np.float32)} and meta["fp16_min_cosine_to_fp32"] < 0.999


def test_a_damaged_model_file_is_reported(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model, tmp_path / "m")
    data = bytearray((copy / "detector.pt").read_bytes())
    data[-20] ^= 0xFF
    (copy / "detector.pt").write_bytes(bytes(data))
    assert check_files(read_model(copy)) == ["detector.pt: sha256 differs from model.json"]
    with pytest.raises(SchemaError, match="is damaged: detector.pt: sha256 differs"):
        resolve_model(copy)  # what --model, --pdsn and verify go through: a damaged model is never used
    (copy / "model.json").write_text("{")
    with pytest.raises(SchemaError, match="not readable JSON"):
        read_model(copy)


def test_model_option_equals_its_files_and_refuses_both(tiny_model, tiny_weights):
    base = dict(dataset="synthetic", trunk="tiny", occlusions=["sunglasses"], keep_scores=True)
    options = BenchmarkConfig(model=str(tiny_model), **base)
    a = run_benchmark(options)
    assert options.dict_path is None and run_benchmark(options)["results"] == a["results"]  # the options run again
    b = run_benchmark(BenchmarkConfig(dict_path=tiny_model / "dict.h5", detector=tiny_model / "detector.pt",
                                      weights=str(tiny_model / "trunk.pt"), **base))
    assert a["occlusion_source"] == "detector"  # a model brings a detector: used unless told otherwise
    np.testing.assert_array_equal(a.scores["scores"][("sunglasses", "pdsn")], b.scores["scores"][("sunglasses", "pdsn")])
    with pytest.raises(BadInputError, match="drop --dict and --detector"):
        apply_model(str(tiny_model), tiny_model / "dict.h5", None, None)
    with pytest.raises(BadInputError, match="drop --weights"):
        apply_model(str(tiny_model), None, None, None, tiny_weights)
    with pytest.raises(BadInputError, match="no PDSN model 'nope'"):
        resolve_model("nope")


def test_calibration_threshold_maximises_pooled_accuracy():
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.4])
    same = np.array([1, 1, 0, 0, 1, 0], bool)
    t = calibrate(scores, same, ["none"] * 4 + ["mask"] * 2)
    assert 0.4 <= t["value"] < 0.6 and t["accuracy"] == 1.0
    assert t["per_occlusion"]["mask"] == {"pairs": 2, "accuracy": 1.0, "far": 0.0, "tar": 1.0}


def test_scores_file_round_trips(tmp_path):
    s = {"pairs": [("a/1.jpg", "a/2.jpg"), ("a/1.jpg", "b/1.jpg")], "same": np.array([True, False]),
         "fold": np.array([0, 1]), "scores": {("none", "pdsn"): np.array([0.5, -0.25])}}
    cols = read_scores(write_scores(tmp_path / "s.csv", s))
    assert cols["score"].tolist() == [0.5, -0.25] and cols["same"].tolist() == [True, False]
    (tmp_path / "bad.csv").write_text("x,y\n")
    with pytest.raises(BadInputError, match="not a pdsn benchmark --scores file"):
        read_scores(tmp_path / "bad.csv")


# ---- pdsn verify ----------------------------------------------------------------------------------------------
@needs_dlib
def test_verify_gives_the_benchmarks_scores_for_the_same_pairs(tiny_model, tmp_path):
    root = write_tiny_lfw(tmp_path / "lfw")
    res = run_benchmark(BenchmarkConfig(dataset="lfw", data_dir=root, trunk="tiny", model=str(tiny_model),
                                        occlusions=["none"], keep_scores=True))
    pairs, bench = res.scores["pairs"], res.scores["scores"][("none", "pdsn")]
    v = verify(VerifyConfig([(root / a, root / b) for a, b in pairs], model=str(tiny_model)))
    assert len(v["pairs"]) == len(pairs) and not v["skipped"]
    np.testing.assert_allclose([r["score"] for r in v["pairs"]], bench, atol=1e-5)
    assert all(r["same"] == (r["score"] > v["threshold"]) for r in v["pairs"])


@needs_dlib
def test_verify_command_table_json_explain_and_exit_codes(tiny_model, face_folder, tmp_path):
    a, b, c = sorted(face_folder.glob("*/*.jpg"))[:3]
    explain, js = tmp_path / "why.png", tmp_path / "v.json"
    r = runner.invoke(app, ["verify", str(a), str(b), str(a), str(c), "--model", str(tiny_model), "--explain",
                            str(explain), "--json", str(js), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "threshold" in r.output and ("same" in r.output or "different" in r.output)
    out = json.loads(js.read_text())
    assert [p["image2"] for p in out["pairs"]] == [str(b), str(c)] and out["model"] == "tiny-model"
    assert explain.stat().st_size > 0
    # bad inputs: one line, exit 2, nothing written
    (tmp_path / "note.jpg").write_text("not an image")
    for args, message in [([str(a)], "two by two"), ([str(a), str(tmp_path / "note.jpg")], "not an image"),
                          ([str(a), str(face_folder)], "is a folder"), ([str(a), str(tmp_path / "x.jpg")], "no such image"),
                          ([str(a), str(b), "--face", "left"], "--face must be one of")]:
        js2 = tmp_path / "never.json"
        r = runner.invoke(app, ["verify", *args, "--model", str(tiny_model), "--json", str(js2)])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert not js2.exists()
    # a photo without a face: the pair is skipped and listed, exit 3
    write_jpeg(tmp_path / "wall.jpg", np.full((160, 160, 3), 128, np.uint8))
    r = runner.invoke(app, ["verify", str(a), str(tmp_path / "wall.jpg"), "--model", str(tiny_model), "--json", "-"])
    assert r.exit_code == 3 and "no face found" in r.output


def test_pairs_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "p.tsv").write_text("# pairs\na.jpg b.jpg\nx y.jpg\tz.jpg  # tab: spaces inside paths\n")
    assert read_pairs_file(tmp_path / "p.tsv") == [(tmp_path / "a.jpg", tmp_path / "b.jpg"),
                                                   (tmp_path / "x y.jpg", tmp_path / "z.jpg")]
    (tmp_path / "q.tsv").write_text("a.jpg b.jpg c.jpg\n")
    with pytest.raises(BadInputError, match="q.tsv:1: expected two image paths"):
        read_pairs_file(tmp_path / "q.tsv")


def test_a_model_of_another_trunk_is_refused_in_one_line(tiny_model, face_folder, tmp_path):
    r = runner.invoke(app, ["embed", "--input", str(face_folder), "--trunk", "dlib-resnet", "--model",
                            str(tiny_model), "--out", str(tmp_path / "e.h5")])
    assert r.exit_code == 2 and "is for trunk tiny, not dlib-resnet" in r.output
    r = runner.invoke(app, ["embed", "--input", str(face_folder), "--pdsn", "--model", str(tiny_model),
                            "--out", str(tmp_path / "e.h5")])
    assert r.exit_code == 2 and "give one of them" in r.output


def test_models_command_lists_builtin_and_work_folder_models(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PDSN_WORK", str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "exports" / "mine")
    r = runner.invoke(app, ["models", "--check", "--json", "-"])
    assert r.exit_code == 0, r.output
    names = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    assert "tiny-model" in names and names["tiny-model"]["damaged_files"] == []
    assert {m.name for m in builtin_models()} <= set(names)


# ---- the shipped model ----------------------------------------------------------------------------------------
def test_the_shipped_model_matches_its_checksums_metadata_and_reference_embeddings():
    shipped = {m.name: m for m in builtin_models()}
    assert models.DEFAULT_MODEL in shipped
    m = resolve_model("builtin")
    assert m.builtin and check_files(m) == []
    meta = m.meta
    assert meta["trunk"] == "dlib-resnet" and meta["trunk_weights"] is None and meta["tool_version"]
    assert sum(f["bytes"] for f in meta["files"].values()) <= 25 * 2**20
    assert meta["training"]["images"] > 1000 and "LFW View 2" in meta["threshold"]["calibrated_on"]
    e, blocks = reference_embeddings(m.dict_path, m.detector_path)
    np.testing.assert_allclose(e, np.array(meta["reference"]["embeddings"]), atol=2e-5)
    assert [np.flatnonzero(b.reshape(-1)).tolist() for b in blocks] == meta["reference"]["blocks"]


@needs_dlib
def test_a_model_exported_without_scores_needs_a_threshold_until_calibrated(tiny_model, face_folder, tmp_path):
    src = tiny_model.parent
    export_model(src / "dict-ft.h5", src / "detector.pt", tmp_path / "m", name="m", weights=str(tiny_model / "trunk.pt"))
    assert read_model(tmp_path / "m").threshold is None
    a, b = sorted(face_folder.glob("*/*.jpg"))[:2]
    with pytest.raises(BadInputError, match="no calibrated threshold"):
        verify(VerifyConfig([(a, b)], model=str(tmp_path / "m")))
    assert verify(VerifyConfig([(a, b)], model=str(tmp_path / "m"), threshold=0.5))["threshold"] == 0.5
    summary = models.calibrate_model(tmp_path / "m", src / "scores.csv")
    assert summary["threshold"] == read_model(tiny_model).threshold and check_files(read_model(tmp_path / "m")) == []
