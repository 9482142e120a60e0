"""The command line: help with examples for every command, the make-pairs → train-block → build-dict →
benchmark chain through the default work folder, and one-line errors with the documented exit codes."""

from __future__ import annotations

import json

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from pdsn_cli import __version__
from pdsn_cli.cli.app import app

runner = CliRunner()


def _commands(group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):  # a sub-app (typer may bring its own click)
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_pipeline_command_is_registered():
    assert {("make-pairs",), ("train-block",), ("build-dict",), ("benchmark",), ("embed",), ("align",),
            ("train-trunk",), ("datasets", "fetch"), ("datasets", "lfw-train-ids")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_an_example(command):
    r = runner.invoke(app, [*command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example" in r.output
    assert f"pdsn {' '.join(command)}" in r.output  # the example runs this very command


def test_top_level_help_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "Exit codes" in r.output and "make-pairs" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"pdsn {__version__}"


def _ok(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def test_pipeline_through_the_work_folder(tmp_path, monkeypatch, tiny_weights):
    work = tmp_path / "work"
    monkeypatch.setenv("PDSN_WORK", str(work))
    js = {name: tmp_path / f"{name}.json" for name in ("pairs", "train", "dict", "bench", "embed")}

    r = _ok(["make-pairs", "--block", "all", "--template", "arc112x96", "--synthetic-identities", "4",
             "--synthetic-images", "3", "--quiet", "--json", str(js["pairs"])])
    assert "SYNTHETIC" in r.stdout
    mp = json.loads(js["pairs"].read_text())
    assert {"out", "data", "synthetic", "template", "grid", "occluder", "images", "identities", "pairs_written",
            "pairs_in_file", "resumed_from", "kinds", "mean_occluded_fraction", "align", "pairs_per_second"} <= mp.keys()
    assert mp["out"] == str(work / "pairs-blocks.h5") and mp["pairs_in_file"] == 300 and mp["synthetic"]
    assert {"images", "aligned_now", "from_cache", "fallback_crops", "skipped", "skipped_files"} <= mp["align"].keys()

    _ok(["train-block", "--trunk", "tiny", "--weights", tiny_weights, "--epochs", "1", "--batch-size", "8", "--quiet",
         "--json", str(js["train"])])
    tb = json.loads(js["train"].read_text())
    assert {"out", "trunk", "mask_point", "feature_shape", "blocks", "pairs", "classes", "epochs", "steps", "history",
            "mean_mask_kept_at_0.5", "feature_seconds", "train_seconds"} <= tb.keys()
    assert tb["out"] == str(work / "blocks" / "all.pt") and tb["blocks"] == list(range(25))
    assert len(tb["history"]) == 1 and {"epoch", "loss", "ce", "l1"} == tb["history"][0].keys()

    r = _ok(["build-dict", "--tau", "0.3", "--json", str(js["dict"])])
    bd = json.loads(js["dict"].read_text())
    assert {"out", "trunk", "mask_point", "grid", "tau", "feature_shape", "blocks_trained", "missing_blocks",
            "discarded_per_block", "mean_pairwise_discard_iou", "sources"} <= bd.keys()
    assert bd["out"] == str(work / "dict.h5") and bd["blocks_trained"] == 25 and bd["tau"] == 0.3
    assert "build-dict" in r.stdout

    r = _ok(["benchmark", "--dataset", "synthetic", "--trunk", "tiny", "--weights", tiny_weights, "--dict",
             bd["out"], "--occluder", "none", "--occluder", "scarf", "--quiet", "--json", str(js["bench"])])
    bm = json.loads(js["bench"].read_text())
    assert {"dataset", "trunk", "mask_point", "dictionary", "occlusion_source", "pairs", "dropped_pairs", "images",
            "flip", "align", "results", "seconds"} <= bm.keys()
    methods = {(row["method"], row["occlusion"]) for row in bm["results"]}
    assert methods == {("baseline", "none"), ("baseline", "scarf"), ("pdsn", "none"), ("pdsn", "scarf")}
    assert all(0 <= row["accuracy"] <= 1 for row in bm["results"])
    assert "recovery" in next(row for row in bm["results"] if row["method"] == "pdsn" and row["occlusion"] == "scarf")
    assert "baseline" in r.stdout and "pdsn" in r.stdout and "SYNTHETIC" in r.stdout

    _ok(["embed", "--input", mp["out"], "--which", "occluded", "--trunk", "tiny", "--weights", tiny_weights, "--dict",
         bd["out"], "--occlusion", "oracle", "--out", str(tmp_path / "emb.h5"), "--quiet", "--json", str(js["embed"])])
    em = json.loads(js["embed"].read_text())
    assert {"out", "input", "trunk", "mask_point", "images", "identities", "embedding_dim", "flip", "features",
            "dictionary", "all_blocks_discarded_fallbacks", "resumed_from", "align", "seconds"} <= em.keys()
    assert em["images"] == 300 and em["dictionary"] == bd["out"]
    assert sorted(p.name for p in work.iterdir()) == ["blocks", "dict.h5", "pairs-blocks.h5"]


def test_align_command_writes_chips(tmp_path):
    from pdsn_cli.data.chips_h5 import read_chips

    out, js = tmp_path / "chips.h5", tmp_path / "a.json"
    _ok(["align", "--out", str(out), "--template", "arc112x112", "--synthetic-identities", "2", "--synthetic-images",
         "2", "--quiet", "--json", str(js)])
    res = json.loads(js.read_text())
    assert res["images"] == 4 and res["identities"] == 2 and res["template"] == "arc112x112"
    ch = read_chips(out)
    assert ch.image.shape == (4, 112, 112, 3) and ch.synthetic and ch.identity == ["synthetic_0000", "synthetic_0001"]


def _one_line_error(r, code: int, message: str):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_errors_are_one_line_with_exit_codes(tmp_path, monkeypatch, tiny_weights, block_pairs, fdm_dict):
    monkeypatch.setenv("PDSN_WORK", str(tmp_path / "work"))
    _one_line_error(runner.invoke(app, ["train-block", "--pairs", str(tmp_path / "no.h5"), "--trunk", "tiny"]),
                    2, "no such file")
    _one_line_error(runner.invoke(app, ["build-dict", "--tau", "2"]), 2, "--tau must be in (0, 1)")
    _one_line_error(runner.invoke(app, ["benchmark", "--dataset", "synthetic", "--trunk", "dlib-resnet", "--dict",
                                        str(fdm_dict)]), 2, "built for trunk tiny")
    _one_line_error(runner.invoke(app, ["embed", "--input", str(tmp_path / "none"), "--out", str(tmp_path / "e.h5"),
                                        "--trunk", "tiny"]), 2, "input not found")
    _one_line_error(runner.invoke(app, ["benchmark", "--dataset", "synthetic", "--trunk", "resnet9000"]),
                    2, "unknown trunk")
    if not torch.cuda.is_available():
        _one_line_error(runner.invoke(app, ["train-block", "--pairs", str(block_pairs), "--trunk", "tiny", "--gpu",
                                            "0"]), 2, "CUDA is not available")
    # a diverging run is a job failure (4), not a usage error
    _one_line_error(runner.invoke(app, ["train-block", "--pairs", str(block_pairs), "--trunk", "tiny", "--weights",
                                        tiny_weights, "--block", "3", "--lr", "1e30", "--lambda", "1e30", "--quiet",
                                        "--out", str(tmp_path / "nan.pt")]), 4, "loss became")
    assert not (tmp_path / "nan.pt").exists()


PNG = b"\x89PNG\r\n\x1a\n"


def test_make_pairs_preview_is_drawn_by_the_command(tmp_path):
    sheet, js = tmp_path / "sheet.png", tmp_path / "p.json"
    _ok(["make-pairs", "--occluder", "scarf", "--template", "arc112x96", "--synthetic-identities", "2",
         "--synthetic-images", "2", "--out", str(tmp_path / "p.h5"), "--preview", str(sheet), "--quiet",
         "--json", str(js)])
    assert sheet.read_bytes()[:8] == PNG and json.loads(js.read_text())["preview"] == str(sheet)


def test_occluders_command(tmp_path):
    r = _ok(["occluders", "--write-assets", str(tmp_path / "assets"), "--preview", str(tmp_path / "kinds.png")])
    assets = sorted((tmp_path / "assets").iterdir())
    assert assets and all(p.read_bytes()[:8] == PNG for p in assets)
    assert (tmp_path / "kinds.png").read_bytes()[:8] == PNG and str(tmp_path / "kinds.png") in r.stdout
    _one_line_error(runner.invoke(app, ["occluders"]), 2, "--write-assets")
    _one_line_error(runner.invoke(app, ["occluders", "--preview", str(tmp_path / "no" / "x.png")]), 2,
                    "output folder does not exist")
    assert not (tmp_path / "no").exists()


def test_json_dash_writes_the_json_alone_to_stdout(tmp_path, monkeypatch):
    """``--json -``: stdout is the JSON and nothing else (the summary table goes to stderr); no file named ``-``.
    The next command without it prints its table to stdout again."""
    monkeypatch.chdir(tmp_path)
    r = _ok(["make-pairs", "--occluder", "scarf", "--template", "arc112x96", "--synthetic-identities", "1",
             "--synthetic-images", "1", "--out", "p.h5", "--quiet", "--json", "-"])
    assert json.loads(r.stdout)["out"] == "p.h5" and "pairs written" in r.stderr
    assert not (tmp_path / "-").exists()
    r = _ok(["make-pairs", "--occluder", "scarf", "--template", "arc112x96", "--synthetic-identities", "1",
             "--synthetic-images", "1", "--out", "p.h5", "--quiet"])
    assert "pairs written" in r.stdout
