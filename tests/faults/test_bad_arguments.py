"""Bad arguments, command by command: exit code 2, one ``error:`` line on stderr, nothing on stdout, and nothing
written — no output, no ``.partial``, no work folder.

"Read-only" output locations: we run as root, and root ignores permission bits, so an unwritable location is
made portable as a path under a regular FILE (``somefile/out.h5``: the OS refuses it for root too). Where the
machine lets us mount, a read-only tmpfs gives a real EROFS folder as well (skipped elsewhere).
Cases already covered in tests/test_make_pairs.py, test_cli.py, test_pdsn.py, test_fdm.py, test_benchmark.py,
test_detector.py and test_train_trunk.py are not repeated here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pdsn_cli.cli.app import app

#: the smallest valid invocation of each command; a case appends options (for a repeated option the last wins)
BASE = {
    "make-pairs": ["--occluder", "scarf", "--template", "arc112x96", "--synthetic-identities", "1",
                   "--synthetic-images", "1", "--out", "{tmp}/pairs.h5", "--quiet"],
    "align": ["--template", "arc112x96", "--synthetic-identities", "1", "--synthetic-images", "1",
              "--out", "{tmp}/chips.h5", "--quiet"],
    "train-block": ["--pairs", "{pairs}", "--trunk", "tiny", "--weights", "{weights}", "--epochs", "1",
                    "--out", "{tmp}/b.pt", "--quiet"],
    "build-dict": ["--blocks", "{blocks}", "--out", "{tmp}/d.h5"],
    "train-trunk": ["--data", "{pairs}", "--trunk", "tiny", "--epochs", "1", "--batch-size", "4", "--precision",
                    "fp32", "--out", "{tmp}/run", "--quiet"],
    "train-detector": ["--pairs", "{pairs}", "--epochs", "1", "--out", "{tmp}/det.pt", "--quiet"],
    "embed": ["--input", "{pairs}", "--trunk", "tiny", "--weights", "{weights}", "--out", "{tmp}/e.h5", "--quiet"],
    "benchmark": ["--dataset", "synthetic", "--trunk", "tiny", "--weights", "{weights}", "--quiet"],
    "pipeline": ["--trunk", "tiny", "--weights", "{weights}", "--work", "{tmp}/pipe", "--epochs", "1", "--quiet"],
}

UNDER_FILE = "output folder does not exist: {tmp}/somefile"
GPU = "--gpu 1 asked for"  # then "CUDA is not available" or "this machine has 1 GPU(s)"
ORACLE = ["--dict", "{dict}", "--occlusion", "oracle"]

CASES = [
    # make-pairs (test_make_pairs.py has --block 25, unknown occluder, --grid 0, both, --per-image 0, missing folder)
    ("make-pairs", ["--template", "arc999"], "unknown template 'arc999'"),
    ("make-pairs", ["--occluder", "block", "--block", "all", "--grid", "25"], "--grid 25 does not fit"),
    ("make-pairs", ["--out", "{tmp}/somefile/pairs.h5"], UNDER_FILE),
    ("make-pairs", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    ("make-pairs", ["--preview", "{tmp}/somefile/p.png"], UNDER_FILE),
    ("make-pairs", ["--workers", "0"], "--workers must be ≥ 1"),
    ("make-pairs", ["--limit", "-1"], "--limit must be positive"),
    ("make-pairs", ["--limit", "0"], "--limit must be positive"),
    ("make-pairs", ["--identities", "{tmp}/nobody.txt"], "cannot read identities file"),
    ("make-pairs", ["--data-dir", "{tmp}/no-such-folder"], "data folder not found"),
    # align
    ("align", ["--template", "arc999"], "unknown template 'arc999'"),
    ("align", ["--out", "{tmp}/missing/chips.h5"], "output folder does not exist: {tmp}/missing"),
    ("align", ["--out", "{tmp}/somefile/chips.h5"], UNDER_FILE),
    ("align", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    ("align", ["--limit", "-1"], "--limit must be positive"),
    ("align", ["--data-dir", "{tmp}/no-such-folder"], "data folder not found"),
    # train-block (test_cli.py: missing pairs, --gpu 0; test_pdsn.py: the engine's checks)
    ("train-block", ["--block", "26"], "--block 26 is outside the 5×5 grid"),
    ("train-block", ["--block", "-1"], "--block -1 is outside the 5×5 grid"),
    ("train-block", ["--block", "eyes"], "--block must be a block index or 'all'"),
    ("train-block", ["--trunk", "resnet9000"], "unknown trunk 'resnet9000'"),
    ("train-block", ["--gpu", "1"], GPU),
    ("train-block", ["--out", "{tmp}/somefile/b.pt"], UNDER_FILE),
    ("train-block", ["--out", "{tmp}/missing/b.pt"], "output folder does not exist: {tmp}/missing"),
    ("train-block", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    # build-dict (test_cli.py: --tau 2; test_fdm.py: the engine's τ checks)
    ("build-dict", ["--tau", "0"], "--tau must be in (0, 1)"),
    ("build-dict", ["--tau", "1"], "--tau must be in (0, 1)"),
    ("build-dict", ["--out", "{tmp}/somefile/d.h5"], UNDER_FILE),
    ("build-dict", ["--plot", "{tmp}/somefile/d.png"], UNDER_FILE),
    ("build-dict", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    ("build-dict", ["--blocks", "{tmp}/no-such.pt"], "no such file or folder"),
    # train-trunk (test_train_trunk.py: unknown trunk, batch, missing data, template — at the engine)
    ("train-trunk", ["--head", "sphereface"], "unknown head 'sphereface'"),
    ("train-trunk", ["--precision", "fp16"], "--precision must be bf16 or fp32"),
    ("train-trunk", ["--gpu", "1"], GPU),
    ("train-trunk", ["--epochs", "0"], "epochs must be >= 1"),
    ("train-trunk", ["--out", "{tmp}/somefile"], "--out must be a folder"),
    ("train-trunk", ["--out", "{tmp}/somefile/run"], "{tmp}/somefile is not a folder"),
    ("train-trunk", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    # train-detector (test_detector.py: the engine's checks)
    ("train-detector", ["--gpu", "1"], GPU),
    ("train-detector", ["--out", "{tmp}/somefile/det.pt"], UNDER_FILE),
    ("train-detector", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    # embed (test_cli.py: input not found; test_embed.py: --which, --occlusion, layouts — at the engine)
    ("embed", ["--trunk", "resnet9000"], "unknown trunk 'resnet9000'"),
    ("embed", ["--gpu", "1"], GPU),
    ("embed", ["--out", "{tmp}/somefile/e.h5"], UNDER_FILE),
    ("embed", ["--out", "{tmp}/missing/e.h5"], "output folder does not exist: {tmp}/missing"),
    ("embed", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    ("embed", ["--batch-size", "0"], "--batch-size must be ≥ 1"),
    ("embed", [*ORACLE, "--block-threshold", "0"], "--block-threshold must be in (0, 1]"),
    ("embed", [*ORACLE, "--block-threshold", "1.5"], "--block-threshold must be in (0, 1]"),
    # benchmark (test_cli.py: unknown trunk, other trunk's dict; test_benchmark.py: the engine's checks)
    ("benchmark", ["--occluder", "block:25"], "block 25 is outside the 5×5 grid"),
    ("benchmark", ["--gpu", "1"], GPU),
    ("benchmark", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    ("benchmark", ["--plot", "{tmp}/somefile/roc.png"], UNDER_FILE),
    ("benchmark", ["--batch-size", "0"], "--batch-size must be ≥ 1"),
    # pipeline: everything is checked before its first stage starts
    ("pipeline", ["--tau", "2"], "--tau must be in (0, 1)"),
    ("pipeline", ["--gpu", "1"], GPU),
    ("pipeline", ["--occluder", "umbrella"], "unknown occlusion 'umbrella'"),
    ("pipeline", ["--epochs", "0"], "--epochs must be ≥ 1"),
    ("pipeline", ["--finetune-epochs", "-1"], "--finetune-epochs must be ≥ 0"),
    ("pipeline", ["--json", "{tmp}/somefile/r.json"], UNDER_FILE),
    ("pipeline", ["--work", "{tmp}/somefile/pipe"], "cannot create --work {tmp}/somefile/pipe"),
    ("pipeline", ["--mask-point", "stage9"], "no mask point 'stage9'"),
]


@pytest.fixture
def paths(tmp_path, monkeypatch, tiny_weights, block_pairs, trained_blocks, fdm_dict):
    """Placeholders of the cases; a regular file ``somefile`` and an empty work folder in a fresh folder."""
    root = tmp_path / "out"
    root.mkdir()
    (root / "somefile").write_text("a regular file, not a folder\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("PDSN_WORK", str(work))
    return {"tmp": str(root), "weights": tiny_weights, "pairs": str(block_pairs), "blocks": str(trained_blocks[0]),
            "dict": str(fdm_dict)}


def fill(args: list[str], paths: dict) -> list[str]:
    out = []
    for a in args:
        for k, v in paths.items():
            a = a.replace("{" + k + "}", v)
        out.append(a)
    return out


def assert_refused(result, message: str) -> None:
    """Exit 2, no traceback, one ``error:`` line on stderr that says ``message``, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture
def no_pipeline_work(monkeypatch):
    """A refused pipeline must not reach its first stage (which would take minutes, not fail)."""
    from pdsn_cli import pipeline

    def started(*a, **k):
        raise AssertionError("the pipeline started working before refusing its arguments")

    monkeypatch.setattr(pipeline, "make_pairs", started)


@pytest.mark.parametrize("command, extra, message", CASES,
                         ids=[f"{c}:{' '.join(e)}" for c, e, _ in CASES])
def test_refused_with_exit_2_one_line_and_nothing_written(command, extra, message, paths, no_pipeline_work):
    if GPU in message and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a second GPU, so --gpu 1 is valid")
    r = CliRunner().invoke(app, [command, *fill(BASE[command] + extra, paths)])
    assert_refused(r, fill([message], paths)[0])
    root = Path(paths["tmp"])
    assert sorted(p.name for p in root.iterdir()) == ["somefile"], "a refused command wrote something"
    assert not any((root.parent / "work").iterdir())


def test_every_command_with_an_output_is_covered():
    assert set(BASE) == {c for c, _, _ in CASES}


def test_bad_optimizer_is_refused_before_trunk_features_are_computed(paths, monkeypatch):
    from pdsn_cli.train import blocks as pdsn

    def computed(*a, **k):
        raise AssertionError("trunk features were computed before the arguments were checked")

    monkeypatch.setattr(pdsn, "cached_pair_features", computed)
    r = CliRunner().invoke(app, ["train-block", *fill(BASE["train-block"], paths), "--optimizer", "rmsprop"])
    assert_refused(r, "--optimizer must be sgd or adam")


# ---- a real read-only folder: a read-only tmpfs (root cannot write there either) ------------------------------
@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the somefile/ cases cover it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


READ_ONLY = [
    ("make-pairs", "pairs.h5"), ("align", "chips.h5"), ("train-block", "b.pt"), ("build-dict", "d.h5"),
    ("train-detector", "det.pt"), ("embed", "e.h5"),
]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX only")
def test_read_only_folder_is_refused(paths, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        for command, name in READ_ONLY:
            r = CliRunner().invoke(app, [command, *fill(BASE[command], paths), "--out", str(ro / name)])
            assert_refused(r, f"output folder is not writable: {ro}")
        r = CliRunner().invoke(app, ["benchmark", *fill(BASE["benchmark"], paths), "--json", str(ro / "r.json")])
        assert_refused(r, f"output folder is not writable: {ro}")
        assert list(ro.iterdir()) == []
