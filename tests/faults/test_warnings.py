"""Surprises that deserve a word: each is printed as ``warning: …`` and recorded in the JSON under "warnings",
with the exit code unchanged — ``--identities`` names absent from the data, train-block on one identity,
build-dict given two files training the same block. ``--resume`` with nothing to resume next to a finished
output is refused (exit 2, the file untouched), and a resumed run's summary says it resumed, and from where.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from pdsn_cli.cli.app import app

runner = CliRunner()
SMALL = ["--template", "arc112x96", "--quiet"]


def ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return r


@pytest.fixture(scope="module")
def one_identity(tmp_path_factory, tiny_weights) -> dict[str, Path]:
    """Block pairs of a single synthetic identity and the blocks trained on them (tiny trunk, 1 epoch)."""
    d = tmp_path_factory.mktemp("one-identity")
    pairs, blocks, js = d / "pairs.h5", d / "blocks" / "all.pt", d / "train.json"
    blocks.parent.mkdir()
    ok(["make-pairs", "--block", "all", "--synthetic-identities", "1", "--synthetic-images", "2", "--out", str(pairs),
        *SMALL])
    r = ok(["train-block", "--pairs", str(pairs), "--trunk", "tiny", "--weights", tiny_weights, "--epochs", "1",
            "--batch-size", "4", "--out", str(blocks), "--quiet", "--json", str(js)])
    return {"pairs": pairs, "blocks": blocks, "json": js, "stderr": r.stderr}


def test_identities_absent_from_the_data_are_named(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("synthetic_0001\nnobody_here\nsynthetic_9999\n")
    js = tmp_path / "r.json"
    r = ok(["make-pairs", "--occluder", "scarf", "--identities", str(ids), "--synthetic-identities", "3",
            "--synthetic-images", "1", "--out", str(tmp_path / "p.h5"), "--json", str(js), *SMALL])
    assert "warning:" in r.stderr and "nobody_here" in r.stderr and "synthetic_9999" in r.stderr
    warnings = json.loads(js.read_text())["warnings"]
    assert len(warnings) == 1 and "2 of 3 names" in warnings[0]
    # every name found: no warning
    ids.write_text("synthetic_0001\n")
    r = ok(["make-pairs", "--occluder", "scarf", "--identities", str(ids), "--synthetic-identities", "3",
            "--synthetic-images", "1", "--out", str(tmp_path / "q.h5"), "--json", str(js), *SMALL])
    assert "warning:" not in r.stderr and json.loads(js.read_text())["warnings"] == []


def test_train_block_on_one_identity_warns(one_identity):
    assert "warning:" in one_identity["stderr"] and "1 identity" in one_identity["stderr"]
    assert "1 identity" in json.loads(one_identity["json"].read_text())["warnings"][0]


def test_build_dict_says_which_of_two_block_files_wins(one_identity, tmp_path):
    folder = tmp_path / "blocks"
    folder.mkdir()
    shutil.copyfile(one_identity["blocks"], folder / "all.pt")
    st = torch.load(one_identity["blocks"], weights_only=False)
    st["blocks"], st["mean_masks"] = [7], st["mean_masks"][7:8].clone()
    torch.save(st, folder / "block07.pt")
    js = tmp_path / "d.json"
    r = ok(["build-dict", "--blocks", str(folder), "--out", str(tmp_path / "d.h5"), "--json", str(js)])
    warnings = json.loads(js.read_text())["warnings"]
    assert len(warnings) == 1 and "block(s) 7" in warnings[0] and "block07.pt is used" in warnings[0]
    assert "block07.pt is used" in " ".join(r.stderr.split())
    r = ok(["build-dict", "--blocks", str(folder / "all.pt"), "--out", str(tmp_path / "e.h5"), "--json", str(js)])
    assert json.loads(js.read_text())["warnings"] == [] and "warning:" not in r.stderr


def _refused_resume(args: list[str], finished: Path):
    before = finished.read_bytes()
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 2, r.output
    assert "remove it or choose another --out" in " ".join(r.stderr.split())
    assert "Traceback" not in r.output and finished.read_bytes() == before


def test_resume_with_nothing_to_resume_never_replaces_a_finished_output(one_identity, tiny_weights, tmp_path):
    pairs = tmp_path / "p.h5"
    args = ["make-pairs", "--occluder", "scarf", "--synthetic-identities", "2", "--synthetic-images", "1",
            "--out", str(pairs), *SMALL]
    ok(args)
    _refused_resume([*args[:-len(SMALL)], "--seed", "5", *SMALL], pairs)  # another seed: would replace the file
    blocks = tmp_path / "all.pt"
    shutil.copyfile(one_identity["blocks"], blocks)
    _refused_resume(["train-block", "--pairs", str(one_identity["pairs"]), "--trunk", "tiny", "--weights",
                     tiny_weights, "--epochs", "1", "--out", str(blocks), "--quiet"], blocks)


def test_resumed_run_says_it_resumed(tmp_path):
    out = tmp_path / "p.h5"
    args = ["make-pairs", "--block", "all", "--synthetic-identities", "2", "--synthetic-images", "6",
            "--out", str(out), *SMALL]
    ok(args)
    # a .partial as an interrupted run leaves it: 256 of the 300 rows written (one chunk), not complete
    shutil.copyfile(out, str(out) + ".partial")
    with h5py.File(str(out) + ".partial", "r+") as f:
        f.attrs["complete"] = False
    js = tmp_path / "r.json"
    r = ok([*args, "--resume", "--json", str(js)])
    res = json.loads(js.read_text())
    assert res["resumed_from"] == 256 and res["pairs_written"] == 44 and res["pairs_in_file"] == 300
    assert "resumed after 256" in r.stdout
