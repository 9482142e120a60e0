"""Interruption: SIGKILL and SIGINT sent to real ``pdsn`` processes while train-block, train-trunk and embed are
working. A killed run leaves nothing under its final name, only its checkpoint / ``.partial``; Ctrl-C exits with
130 and prints the command that resumes it; ``--resume`` continues, and the result equals — bitwise, on CPU —
an uninterrupted run with the same seed. Each test chains kill → resume → Ctrl-C → resume, so a resumed run is
itself interrupted once.

The processes run with one torch thread, like the in-process reference runs (conftest sets one thread), so the
floating-point reductions happen in the same order. tests/test_make_pairs.py does the same for make-pairs, and
test_pdsn.py / test_train_trunk.py / test_embed.py resume in-process after a KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_same_datasets
from pdsn_cli.atomic import partial_path
from pdsn_cli.cli.app import app

REPO = Path(__file__).resolve().parents[2]
#: run in the child before the command line: one thread, plus what a test adds
PRELUDE = "import torch; torch.set_num_threads(1)\n"
MAIN = "import sys; sys.argv[0] = 'pdsn'; from pdsn_cli.cli.app import main; main()\n"


def start(args: list, prelude: str = "", env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **(env or {})}
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps it ignored
    return subprocess.Popen([sys.executable, "-c", PRELUDE + prelude + MAIN, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def killed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def interrupted(proc: subprocess.Popen) -> str:
    """Ctrl-C: exit code 130, one message naming the command that resumes, no traceback; returns stderr."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err, err
    hint = err[err.index("continue with:"):]
    assert hint.count("--resume") == 1, hint  # also when the interrupted run was itself a resumed one
    return err


def resume_in_process(args: list) -> None:
    r = CliRunner().invoke(app, [*map(str, args), "--resume"])
    assert r.exit_code == 0, (r.output, r.exception)


# ---- train-block: an epoch checkpoint <out>.ckpt --------------------------------------------------------------
#: in the child: a pause after each checkpoint is written, so that the signals land mid-run however loaded the
#: machine is (epochs of one block take milliseconds)
PAUSE_AFTER_CHECKPOINTS = """
import time
import pdsn_cli.train.loop as _loop
def _paused(save):
    def paused(*a, **k):
        out = save(*a, **k)
        time.sleep(0.3)
        return out
    return paused
_loop.save_checkpoint = _paused(_loop.save_checkpoint)
"""


def epoch_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def test_train_block_killed_and_interrupted_resumes_to_the_straight_result(block_pairs, tiny_weights, tmp_path):
    from pdsn_cli.train.blocks import TrainBlockConfig, load_blocks_file, train_blocks

    epochs = 6
    straight = tmp_path / "straight.pt"
    train_blocks(TrainBlockConfig(pairs=block_pairs, out=straight, trunk="tiny", weights=tiny_weights, block="7",
                                  epochs=epochs, batch_size=4))
    out = tmp_path / "b7.pt"
    ckpt = out.with_name("b7.pt.ckpt")
    args = ["train-block", "--pairs", block_pairs, "--trunk", "tiny", "--weights", tiny_weights, "--block", 7,
            "--epochs", epochs, "--batch-size", 4, "--out", out, "--quiet"]

    proc = start(args, PAUSE_AFTER_CHECKPOINTS)
    wait_for(proc, lambda: epoch_of(ckpt) >= 1, "a first epoch checkpoint")
    killed(proc)
    first = epoch_of(ckpt)
    assert not out.exists() and 1 <= first < epochs

    proc = start([*args, "--resume"], PAUSE_AFTER_CHECKPOINTS)
    wait_for(proc, lambda: epoch_of(ckpt) > first, "a checkpoint of the resumed run")
    interrupted(proc)
    second = epoch_of(ckpt)
    assert not out.exists() and first < second < epochs

    resume_in_process(args)
    a, b = load_blocks_file(out), load_blocks_file(straight)
    assert [h["epoch"] for h in a["history"]] == list(range(1, epochs + 1))
    assert a["history"] == b["history"]
    assert torch.equal(a["mean_masks"], b["mean_masks"])
    for k, v in b["generators"].items():
        assert torch.equal(a["generators"][k], v), k
    assert not ckpt.exists()


# ---- train-trunk: <out>/checkpoint.pt every step ---------------------------------------------------------------
def step_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> Path:
    from pdsn_cli.data.chip_cache import DataSpec, export_chips

    path = tmp_path_factory.mktemp("interruption") / "chips.h5"
    export_chips(DataSpec(None, 6, 4), "arc112x96", path)  # 16 training images: 4 steps an epoch at batch 4
    return path


def test_train_trunk_killed_and_interrupted_resumes_to_the_straight_result(chips, tmp_path):
    from pdsn_cli.trunks.checkpoint import load_checkpoint

    def args(out):
        return ["train-trunk", "--data", chips, "--trunk", "tiny", "--epochs", 4, "--batch-size", 4, "--lr", 0.05,
                "--precision", "fp32", "--checkpoint-every", 2, "--out", out, "--quiet"]

    r = CliRunner().invoke(app, list(map(str, args(tmp_path / "straight"))))
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    ckpt, final = out / "checkpoint.pt", out / "trunk.pt"

    proc = start(args(out), PAUSE_AFTER_CHECKPOINTS)
    wait_for(proc, lambda: step_of(ckpt) >= 2, "a checkpoint")
    killed(proc)
    first = step_of(ckpt)
    assert not final.exists() and 2 <= first < 16

    proc = start([*args(out), "--resume"], PAUSE_AFTER_CHECKPOINTS)
    wait_for(proc, lambda: step_of(ckpt) > first, "a checkpoint of the resumed run")
    interrupted(proc)
    second = step_of(ckpt)  # SIGINT stops at the next step boundary, after checkpointing it
    assert not final.exists() and first < second < 16

    resume_in_process(args(out))
    a, b = load_checkpoint(final), load_checkpoint(tmp_path / "straight" / "trunk.pt")
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    ca, cb = load_checkpoint(ckpt), load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert ca["epoch_losses"] == cb["epoch_losses"] and ca["step"] == cb["step"] == 16
    for k, v in cb["head_state"].items():
        assert torch.equal(ca["head_state"][k], v), k


# ---- embed: rows appended to <out>.partial a chunk at a time ----------------------------------------------------
#: in the child: 64-row chunks (300 rows → 5), and each chunk announces itself in a file and then waits, so the
#: signals land between two chunks' writes, mid-run (a kill inside an HDF5 write is make-pairs' test's business)
SLOW_CHUNKS = """
import os, time
import pdsn_cli.embed as _embed
import pdsn_cli.pdsn.embedder as _embedder
_embed.CHUNK = 64
_features, _calls = _embedder.Embedder.features, [0]
def _announced(*a, **k):
    _calls[0] += 1
    with open(os.environ["PDSN_TEST_CHUNKS"], "w") as fh:
        fh.write(str(_calls[0]))
    time.sleep(0.4)
    return _features(*a, **k)
_embedder.Embedder.features = _announced
"""


def chunks_started(probe: Path) -> int:
    try:
        return int(probe.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_embed_killed_and_interrupted_resumes_to_the_straight_result(block_pairs, tiny_weights, tmp_path,
                                                                       monkeypatch):
    from pdsn_cli import embed as embed_mod

    monkeypatch.setattr(embed_mod, "CHUNK", 64)
    straight = tmp_path / "straight.h5"
    args = ["embed", "--input", block_pairs, "--trunk", "tiny", "--weights", tiny_weights, "--features", "--quiet"]
    r = CliRunner().invoke(app, [*map(str, args), "--out", str(straight)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "emb.h5"
    args += ["--out", out]
    probe = tmp_path / "chunks"
    env = {"PDSN_TEST_CHUNKS": str(probe)}

    proc = start(args, SLOW_CHUNKS, env)
    wait_for(proc, lambda: chunks_started(probe) >= 2, "a first chunk written")  # chunk 2 started: 1 is flushed
    killed(proc)
    assert not out.exists() and partial_path(out).exists()

    probe.unlink()
    proc = start([*args, "--resume"], SLOW_CHUNKS, env)
    wait_for(proc, lambda: chunks_started(probe) >= 2, "a chunk written by the resumed run")
    interrupted(proc)  # Ctrl-C during the resumed run's 2nd chunk: that chunk is finished, then it stops
    assert not out.exists() and partial_path(out).exists()

    r = CliRunner().invoke(app, [*map(str, args), "--resume", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert '"resumed_from": 192' in (tmp_path / "r.json").read_text()  # 1 chunk, then 2 more before Ctrl-C
    assert_same_datasets(out, straight)
    assert not partial_path(out).exists()


# ---- Ctrl-C in-process: train-block, train-detector and finetune stop at the next step boundary ---------------------
def ctrl_c_at(call: int, fn, counted=lambda: True):
    """``fn`` that sends this process SIGINT during its ``call``-th counted call (a real Ctrl-C mid-step)."""
    n = {"calls": 0}

    def wrapped(*a, **k):
        if counted():
            n["calls"] += 1
            if n["calls"] == call:
                os.kill(os.getpid(), signal.SIGINT)
        return fn(*a, **k)

    return wrapped


def interrupted_in_process(args: list) -> None:
    r = CliRunner().invoke(app, list(map(str, args)))
    assert r.exit_code == 130, (r.exit_code, r.output, r.exception)
    assert "interrupted" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_train_block_ctrl_c_mid_epoch_checkpoints_and_resumes_to_the_straight_result(
        block_pairs, tiny_weights, trained_blocks, tmp_path, monkeypatch):
    from pdsn_cli.pdsn.mask_generator import MaskGenerators
    from pdsn_cli.train.blocks import load_blocks_file

    out = tmp_path / "all.pt"
    ckpt = out.with_name("all.pt.ckpt")
    # trained_blocks: --block all, 2 epochs of 2 steps (batch 8); Ctrl-C in step 3 (epoch 2, step 1)
    args = ["train-block", "--pairs", block_pairs, "--trunk", "tiny", "--weights", tiny_weights, "--epochs", 2,
            "--batch-size", 8, "--out", out, "--quiet"]
    monkeypatch.setattr(MaskGenerators, "forward", ctrl_c_at(3, MaskGenerators.forward, torch.is_grad_enabled))
    interrupted_in_process(args)
    assert not out.exists() and load_blocks_file(ckpt)["step"] == 3  # mid-epoch: the epoch's order is saved
    monkeypatch.undo()
    resume_in_process(args)
    a, b = load_blocks_file(out), load_blocks_file(trained_blocks[0])
    assert a["history"] == b["history"] and torch.equal(a["mean_masks"], b["mean_masks"])
    for k, v in b["generators"].items():
        assert torch.equal(a["generators"][k], v), k
    assert not ckpt.exists()


def test_train_detector_ctrl_c_checkpoints_and_resumes_to_the_straight_result(block_pairs, tmp_path, monkeypatch):
    from pdsn_cli.pdsn.detector import DetectorNet

    def args(out):  # 312 chips, batches of 64: 5 steps an epoch
        return ["train-detector", "--pairs", block_pairs, "--epochs", 2, "--val-fraction", 0, "--out", out, "--quiet"]

    r = CliRunner().invoke(app, list(map(str, args(tmp_path / "straight.pt"))))
    assert r.exit_code == 0, r.output
    out = tmp_path / "det.pt"
    monkeypatch.setattr(DetectorNet, "forward", ctrl_c_at(3, DetectorNet.forward, torch.is_grad_enabled))
    interrupted_in_process(args(out))
    assert not out.exists() and torch.load(f"{out}.ckpt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    resume_in_process(args(out))
    a, b = torch.load(out, weights_only=True), torch.load(tmp_path / "straight.pt", weights_only=True)
    assert a["metrics"]["loss_history"] == b["metrics"]["loss_history"]
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    assert not Path(f"{out}.ckpt").exists()


def test_finetune_ctrl_c_checkpoints_and_resumes_to_the_straight_result(fdm_dict, block_pairs, tiny_weights,
                                                                        tmp_path, monkeypatch):
    import h5py

    from pdsn_cli.train import finetune as ft

    def args(out):  # 225 training pairs, batches of 64: 4 steps an epoch
        return ["finetune", "--dict", fdm_dict, "--pairs", block_pairs, "--weights", tiny_weights, "--epochs", 2,
                "--lr", 1e-3, "--out", out, "--quiet"]

    r = CliRunner().invoke(app, list(map(str, args(tmp_path / "straight.h5"))))
    assert r.exit_code == 0, r.output
    out = tmp_path / "ft.h5"
    monkeypatch.setattr(ft._StudentHead, "forward", ctrl_c_at(6, ft._StudentHead.forward, torch.is_grad_enabled))
    interrupted_in_process(args(out))
    assert not out.exists() and torch.load(f"{out}.ckpt", weights_only=True)["step"] == 6
    monkeypatch.undo()
    resume_in_process(args(out))
    with h5py.File(out) as fa, h5py.File(tmp_path / "straight.h5") as fb:
        assert fa["head"].attrs["kept_epoch"] == fb["head"].attrs["kept_epoch"]
        for k in fb["head"]:
            assert (fa["head"][k][()] == fb["head"][k][()]).all(), k
    assert not Path(f"{out}.ckpt").exists()
