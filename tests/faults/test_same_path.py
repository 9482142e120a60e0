"""An output that is an input, or another output of the same run, is refused by every command: exit 2, one
``error:`` line, and nothing written (no output, no ``.partial``, no JSON, no work folder); the input stays
byte for byte. Folder outputs (``--report``, ``--export-devkit``, ``--work``) also refuse an input inside them.

The rule is ``atomic.check_distinct_paths`` (its spellings: tests/faults/test_output_paths.py); here every
command and every output option reaches it. The check comes before any work, so the inputs are small placeholder
files: a command that read one would fail with another message. (``datasets fetch`` has one output, ``--dest``,
and no input: nothing to collide.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdsn_cli.cli.app import app

SAME = "is the same file as"
INSIDE = "which this run writes into"

#: the inputs of a run, each a placeholder with its own bytes; "lfw" and "blocks" are folders
INPUTS = ["ids.txt", "pairs.h5", "pairs2.h5", "weights.pt", "dict.h5", "det.pt", "chips.h5", "b.pt",
          "lfw/pairs.txt", "blocks/all.pt", "reports/dict.h5", "run/trunk.pt"]

#: (command line, what the error says). A case names an input by its file name above (relative to the test's
#: folder, its current folder) and a new output as o.*; every spelling of one file reaches the same rule.
CASES = [
    # make-pairs: --out, --json, --preview against --identities / --data-dir, and against each other
    ("make-pairs --identities ids.txt --out ids.txt", SAME),
    ("make-pairs --identities ids.txt --out o.h5 --json ids.txt", SAME),
    ("make-pairs --identities ids.txt --out o.h5 --preview ./ids.txt", SAME),
    ("make-pairs --data-dir lfw --out lfw", SAME),
    ("make-pairs --out o.h5 --json ./o.h5", SAME),
    ("make-pairs --out o.h5 --preview o.h5", SAME),
    ("make-pairs --out o.h5 --json o.png --preview o.png", SAME),
    # align
    ("align --identities ids.txt --out ids.txt", SAME),
    ("align --identities ids.txt --out o.h5 --json ids.txt", SAME),
    ("align --out o.h5 --json o.h5", SAME),
    # datasets lfw-train-ids: its input is the folder and the pairs.txt in it
    ("datasets lfw-train-ids --data-dir lfw --out lfw/pairs.txt", SAME),
    ("datasets lfw-train-ids --data-dir lfw --out lfw", SAME),
    # occluders
    ("occluders --write-assets o-assets --preview o-assets", SAME),
    # train-block
    ("train-block --pairs pairs.h5 --weights weights.pt --out pairs.h5", SAME),
    ("train-block --pairs pairs.h5 --weights weights.pt --out weights.pt", SAME),
    ("train-block --pairs pairs.h5 --out o.pt --json pairs.h5", SAME),
    ("train-block --pairs pairs.h5 --out o.pt --json o.pt", SAME),
    # build-dict: the block files of a --blocks folder are inputs too
    ("build-dict --blocks b.pt --out b.pt", SAME),
    ("build-dict --blocks blocks --out blocks/all.pt", SAME),
    ("build-dict --blocks b.pt --out o.h5 --plot b.pt", SAME),
    ("build-dict --blocks b.pt --out o.h5 --json b.pt", SAME),
    ("build-dict --blocks b.pt --out o.h5 --plot o.h5", SAME),
    ("build-dict --blocks b.pt --out o.h5 --plot o.png --json o.png", SAME),
    # finetune
    ("finetune --dict dict.h5 --pairs pairs.h5 --out dict.h5", SAME),
    ("finetune --dict dict.h5 --pairs pairs.h5 --pairs pairs2.h5 --out pairs2.h5", SAME),
    ("finetune --dict dict.h5 --pairs pairs.h5 --weights weights.pt --out weights.pt", SAME),
    ("finetune --dict dict.h5 --pairs pairs.h5 --out o.h5 --json pairs.h5", SAME),
    ("finetune --dict dict.h5 --pairs pairs.h5 --out o.h5 --json o.h5", SAME),
    # train-trunk: --out is a folder holding checkpoint.pt and trunk.pt
    ("train-trunk --data chips.h5 --trunk tiny --out chips.h5", SAME),
    ("train-trunk --data chips.h5 --trunk tiny --init-weights run/trunk.pt --out run", SAME),
    ("train-trunk --data chips.h5 --trunk tiny --out o-run --json chips.h5", SAME),
    ("train-trunk --data chips.h5 --trunk tiny --out run --json run/checkpoint.pt", SAME),
    # train-detector
    ("train-detector --pairs pairs.h5 --out pairs.h5", SAME),
    ("train-detector --pairs pairs.h5 --pairs pairs2.h5 --out pairs2.h5", SAME),
    ("train-detector --pairs pairs.h5 --out o.pt --json pairs.h5", SAME),
    ("train-detector --pairs pairs.h5 --out o.pt --json o.pt", SAME),
    # embed
    ("embed --input pairs.h5 --out pairs.h5", SAME),
    ("embed --input pairs.h5 --dict dict.h5 --out dict.h5", SAME),
    ("embed --input pairs.h5 --detector det.pt --out det.pt", SAME),
    ("embed --input pairs.h5 --weights weights.pt --out weights.pt", SAME),
    ("embed --input pairs.h5 --data-dir lfw --out lfw", SAME),
    ("embed --input pairs.h5 --out o.h5 --json pairs.h5", SAME),
    ("embed --input pairs.h5 --out o.h5 --json o.h5", SAME),
    # benchmark: --plot, --json, and the folders --report and --export-devkit
    ("benchmark --dataset synthetic --trunk tiny --dict dict.h5 --plot dict.h5", SAME),
    ("benchmark --dataset synthetic --trunk tiny --weights weights.pt --plot weights.pt", SAME),
    ("benchmark --dataset synthetic --trunk tiny --detector det.pt --occlusion detector --json det.pt", SAME),
    ("benchmark --dataset lfw --data-dir lfw --plot lfw/pairs.txt", SAME),
    ("benchmark --dataset lfw --data-dir lfw --pairs-file pairs.h5 --json pairs.h5", SAME),
    ("benchmark --dataset synthetic --trunk tiny --plot o.png --json o.png", SAME),
    ("benchmark --dataset synthetic --trunk tiny --dict dict.h5 --report dict.h5", SAME),
    ("benchmark --dataset synthetic --trunk tiny --dict reports/dict.h5 --report reports", INSIDE),
    ("benchmark --dataset synthetic --trunk tiny --report o-report --json o-report", SAME),
    ("benchmark --dataset megaface-lfw --data-dir lfw --export-devkit lfw", SAME),
    ("benchmark --dataset megaface-lfw --data-dir lfw --weights run/trunk.pt --export-devkit run", INSIDE),
    # pipeline: --work is a folder
    ("pipeline --trunk tiny --weights weights.pt --work weights.pt", SAME),
    ("pipeline --trunk tiny --weights run/trunk.pt --work run", INSIDE),
    ("pipeline --trunk tiny --data-dir lfw --work lfw", SAME),
    ("pipeline --trunk tiny --weights weights.pt --work o-work --json weights.pt", SAME),
    ("pipeline --trunk tiny --work o-work --json o-work", SAME),
    ("pipeline --trunk tiny --weights run/trunk.pt --work o-work --export-model run", INSIDE),
    ("benchmark --dataset synthetic --trunk tiny --dict dict.h5 --scores dict.h5", SAME),
    ("benchmark --dataset synthetic --trunk tiny --scores o.csv --json o.csv", SAME),
    # verify, occlude, export-model
    ("verify --pairs ids.txt --json ids.txt", SAME),
    ("verify dict.h5 det.pt --explain det.pt", SAME),
    ("verify --pairs ids.txt --explain o.png --json o.png", SAME),
    ("occlude ids.txt --occluder mask --out ids.txt", SAME),
    ("export-model --dict dict.h5 --detector det.pt --scores pairs.h5 --out o-m --json dict.h5", SAME),
    ("export-model --dict reports/dict.h5 --detector det.pt --scores pairs.h5 --out reports", INSIDE),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("same-path")
    for i, name in enumerate(INPUTS):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(f"input {i}: {name}\n".encode() * 64)
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("line, says", CASES, ids=[c for c, _ in CASES])
def test_an_output_on_an_input_or_on_another_output_is_refused(line, says, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("PDSN_WORK", str(work))
    before = snapshot(folder)
    r = CliRunner().invoke(app, [*line.split(), "--quiet"] if _has_quiet(line) else line.split())
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert r.stdout == ""
    assert snapshot(folder) == before, "a refused command wrote or changed a file"
    assert not any(work.iterdir())


def _has_quiet(line: str) -> bool:
    return line.split()[0] not in ("datasets", "occluders", "build-dict", "occlude", "export-model")


def test_every_command_with_an_output_is_covered():
    from tests.faults.test_bad_arguments import BASE

    assert set(BASE) | {"finetune", "datasets", "occluders", "verify", "occlude", "export-model"} == {
        c.split()[0] for c, _ in CASES}
