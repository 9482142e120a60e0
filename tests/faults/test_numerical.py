"""Numerical faults. A loss that turns NaN/inf stops train-block, train-trunk and train-detector with exit code 4,
one clear line, no output under the final name, and the last good checkpoint kept — from which ``--resume``
finishes exactly like a run that never failed. A trunk whose weights hold a NaN is caught, not embedded. An image
whose every block is occluded (its dictionary entries AND to nothing) still gets a finite, unit-norm embedding,
and the fallback is counted in embed's and benchmark's JSON.

tests/test_pdsn.py and test_cli.py already stop a train-block run diverging from its first step (--lr 1e30), and
test_train_trunk.py keeps train-trunk's last good checkpoint in-process; here the faults strike mid-run, through
the command line, and the runs are resumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import h5_datasets
from pdsn_cli.cli.app import app


def invoke(args: list):
    return CliRunner().invoke(app, [str(a) for a in args])


def failed(r, *phrases: str) -> str:
    """Exit 4 with one ``error:`` line naming all ``phrases``; returns the line."""
    assert r.exit_code == 4, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for p in phrases:
        assert p in lines[0], lines[0]
    return lines[0]


def nan_after(calls: int, fn):
    """``fn`` whose output turns NaN from its ``calls``-th call on."""
    n = {"calls": 0}

    def wrapped(*a, **k):
        n["calls"] += 1
        out = fn(*a, **k)
        return out * float("nan") if n["calls"] >= calls else out

    return wrapped


def nan_weights(src: str, dst: Path) -> Path:
    sd = torch.load(src, weights_only=True)
    sd["stage3.0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, dst)
    return dst


# ---- train-block --------------------------------------------------------------------------------------------------
def test_train_block_nan_mid_run_keeps_last_epoch_and_resume_matches_a_clean_run(
        block_pairs, tiny_weights, trained_blocks, tmp_path, monkeypatch):
    from pdsn_cli.pdsn.mask_generator import MaskGenerators
    from pdsn_cli.train.blocks import load_blocks_file

    out = tmp_path / "all.pt"
    # trained_blocks: --block all, 2 epochs of 2 steps (12 pairs per block, batch 8), the defaults otherwise
    args = ["train-block", "--pairs", block_pairs, "--trunk", "tiny", "--weights", tiny_weights, "--epochs", "2",
            "--batch-size", "8", "--out", out, "--quiet"]
    monkeypatch.setattr(MaskGenerators, "forward", nan_after(3, MaskGenerators.forward))  # epoch 2, step 1
    failed(invoke(args), "loss became nan at epoch 2 step 1", "all.pt.ckpt", "--resume")
    ckpt = out.with_name(out.name + ".ckpt")
    assert not out.exists() and ckpt.exists()
    kept = load_blocks_file(ckpt)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["generators"].values()
                                      if v.is_floating_point())
    monkeypatch.undo()
    r = invoke([*args, "--resume"])
    assert r.exit_code == 0, r.output
    a, b = load_blocks_file(out), load_blocks_file(trained_blocks[0])
    assert a["history"] == b["history"]
    assert torch.equal(a["mean_masks"], b["mean_masks"])
    for k, v in b["generators"].items():
        assert torch.equal(a["generators"][k], v), k
    assert not ckpt.exists()


def test_train_block_nan_features_fail_without_claiming_a_checkpoint(block_pairs, tiny_weights, tmp_path):
    out = tmp_path / "b3.pt"
    line = failed(invoke(["train-block", "--pairs", block_pairs, "--trunk", "tiny", "--weights",
                          nan_weights(tiny_weights, tmp_path / "nan.pt"), "--block", "3", "--epochs", "1",
                          "--out", out, "--quiet"]), "loss became nan at epoch 1 step 1")
    assert "no checkpoint" in line and "is kept" not in line
    assert list(tmp_path.iterdir()) == [tmp_path / "nan.pt"]


# ---- train-trunk --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> Path:
    from pdsn_cli.data.chip_cache import DataSpec, export_chips

    path = tmp_path_factory.mktemp("numerical") / "chips.h5"
    export_chips(DataSpec(None, 6, 4), "arc112x96", path)  # 4 of 6 identities train: 16 images, 4 steps an epoch
    return path


def trunk_args(chips: Path, out: Path) -> list:
    return ["train-trunk", "--data", chips, "--trunk", "tiny", "--epochs", "2", "--batch-size", "4", "--lr", "0.05",
            "--precision", "fp32", "--checkpoint-every", "2", "--out", out, "--quiet"]


def test_train_trunk_nan_mid_run_keeps_last_checkpoint_and_resume_matches_a_clean_run(chips, tmp_path, monkeypatch):
    from pdsn_cli.train.heads import CosFace
    from pdsn_cli.trunks.checkpoint import load_checkpoint

    assert invoke(trunk_args(chips, tmp_path / "straight")).exit_code == 0
    run = tmp_path / "run"
    monkeypatch.setattr(CosFace, "target_logit", nan_after(6, CosFace.target_logit))
    failed(invoke(trunk_args(chips, run)), "loss became nan at step 6/8", "(step 4) is kept")
    assert not (run / "trunk.pt").exists() and load_checkpoint(run / "checkpoint.pt")["step"] == 4
    monkeypatch.undo()
    js = tmp_path / "r.json"
    assert invoke([*trunk_args(chips, run), "--resume", "--json", js]).exit_code == 0
    assert json.loads(js.read_text())["resumed_from"] == 4
    a, b = load_checkpoint(run / "trunk.pt"), load_checkpoint(tmp_path / "straight" / "trunk.pt")
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k


def test_train_trunk_huge_learning_rate_fails_cleanly(chips, tmp_path):
    from pdsn_cli.trunks.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = trunk_args(chips, run)
    args[args.index("--lr") + 1] = "1e30"
    failed(invoke([*args, "--checkpoint-every", "1"]), "lower --lr")
    assert not (run / "trunk.pt").exists()
    if (run / "checkpoint.pt").exists():  # whatever was kept holds finite weights
        ck = load_checkpoint(run / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ---- train-detector -----------------------------------------------------------------------------------------------
def test_train_detector_nan_loss_fails_and_leaves_the_previous_detector(block_pairs, tmp_path, monkeypatch):
    from pdsn_cli.pdsn.detector import DetectorNet

    out = tmp_path / "detector.pt"
    out.write_bytes(b"an earlier detector")
    monkeypatch.setattr(DetectorNet, "forward", nan_after(2, DetectorNet.forward))
    failed(invoke(["train-detector", "--pairs", block_pairs, "--epochs", "1", "--val-fraction", "0", "--out", out,
                   "--quiet"]), "diverged", "lower --lr")
    assert out.read_bytes() == b"an earlier detector"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector.pt"]


# ---- a trunk that computes NaN ------------------------------------------------------------------------------------
def test_embed_with_nan_weights_fails_instead_of_writing_nan(block_pairs, tiny_weights, tmp_path):
    out = tmp_path / "e.h5"
    failed(invoke(["embed", "--input", block_pairs, "--trunk", "tiny", "--weights",
                   nan_weights(tiny_weights, tmp_path / "nan.pt"), "--out", out, "--quiet"]), "non-finite")
    assert not out.exists() and not out.with_name("e.h5.partial").exists()


def test_benchmark_with_nan_weights_fails_instead_of_scoring_nan(tiny_weights, tmp_path):
    js = tmp_path / "r.json"
    failed(invoke(["benchmark", "--dataset", "synthetic", "--trunk", "tiny", "--weights",
                   nan_weights(tiny_weights, tmp_path / "nan.pt"), "--json", js, "--quiet"]), "non-finite")
    assert not js.exists()


# ---- every block occluded: the FDMs AND to nothing -----------------------------------------------------------------
def residue_dict(src: Path, dst: Path) -> Path:
    """Block j discards the feature elements whose flat index ≡ j (mod K²): any one block keeps 96% of them,
    every block together discards all."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        fdm = np.ones(f["fdm"].shape, bool)
        k2 = len(fdm)
        flat = fdm.reshape(k2, -1)
        for j in range(k2):
            flat[j, j::k2] = False
        f["fdm"][...] = fdm
    return dst


def test_all_occluded_image_gets_a_unit_embedding_and_is_counted(block_pairs, tiny_weights, fdm_dict, tmp_path):
    pairs = tmp_path / "pairs.h5"
    shutil.copyfile(block_pairs, pairs)
    with h5py.File(pairs, "r+") as f:
        f["blocks"][:3] = 1.0  # the first three faces: every block covered
    d = residue_dict(fdm_dict, tmp_path / "dict.h5")
    base = ["embed", "--input", pairs, "--which", "occluded", "--trunk", "tiny", "--weights", tiny_weights, "--quiet"]
    r = invoke([*base, "--dict", d, "--occlusion", "oracle", "--out", tmp_path / "pdsn.h5", "--json",
                tmp_path / "r.json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["all_blocks_discarded_fallbacks"] == 3
    assert invoke([*base, "--out", tmp_path / "plain.h5"]).exit_code == 0
    masked, plain = h5_datasets(tmp_path / "pdsn.h5"), h5_datasets(tmp_path / "plain.h5")
    emb = masked["embedding"]
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # the fallback is "no mask": those three rows are the plain embedding, the others are masked
    np.testing.assert_allclose(emb[:3], plain["embedding"][:3], atol=1e-6)
    assert (masked["fdm_kept"][:3] == 1).all() and (masked["fdm_kept"][3:] < 1).all()


def test_benchmark_counts_pairs_whose_mask_discards_everything(tiny_weights, fdm_dict, tmp_path):
    d = tmp_path / "dict.h5"
    shutil.copyfile(fdm_dict, d)
    with h5py.File(d, "r+") as f:
        fdm = f["fdm"][()]
        fdm[12] = False  # block 12's entry discards every element
        f["fdm"][...] = fdm
    js = tmp_path / "r.json"
    r = invoke(["benchmark", "--dataset", "synthetic", "--trunk", "tiny", "--weights", tiny_weights, "--dict", d,
                "--occluder", "block:12", "--json", js, "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    rows = {row["method"]: row for row in res["results"]}
    assert rows["pdsn"]["all_discarded_fallbacks"] == res["pairs"]
    assert rows["pdsn"]["accuracy"] == rows["baseline"]["accuracy"]  # no mask left: the baseline's embeddings


def test_blank_images_get_finite_unit_embeddings(tiny_weights, tmp_path):
    from pdsn_cli.data.chips_h5 import ChipsWriter

    chips = tmp_path / "blank.h5"
    with h5py.File(chips, "w") as f:
        w = ChipsWriter(f, "arc112x96", (112, 96), "", True)
        w.add([np.full((112, 96, 3), v, np.uint8) for v in (0, 255, 128)], [np.zeros((5, 2), np.float32)] * 3,
              ["black", "white", "grey"], ["b", "w", "g"], [2] * 3)
        w.close()
    out = tmp_path / "e.h5"
    assert invoke(["embed", "--input", chips, "--trunk", "tiny", "--weights", tiny_weights, "--out", out,
                   "--quiet"]).exit_code == 0
    emb = h5_datasets(out)["embedding"]
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


# ---- train-detector and finetune: NaN mid-run keeps the last epoch's checkpoint --------------------------------------
def nan_in_training_after(calls: int, fn):
    """``fn`` whose outputs turn NaN from its ``calls``-th call with gradients on (a training step) on."""
    n = {"calls": 0}

    def wrapped(*a, **k):
        out = fn(*a, **k)
        if not torch.is_grad_enabled():
            return out
        n["calls"] += 1
        if n["calls"] < calls:
            return out
        return [o * float("nan") for o in out] if isinstance(out, list) else out * float("nan")

    return wrapped


def test_train_detector_nan_mid_run_keeps_last_epoch_and_resume_matches_a_clean_run(block_pairs, tmp_path,
                                                                                   monkeypatch):
    from pdsn_cli.pdsn.detector import DetectorNet

    def args(out):  # 312 chips, batches of 64: 5 steps an epoch
        return ["train-detector", "--pairs", block_pairs, "--epochs", "2", "--val-fraction", "0", "--out", out,
                "--quiet"]

    assert invoke(args(tmp_path / "straight.pt")).exit_code == 0
    out = tmp_path / "det.pt"
    monkeypatch.setattr(DetectorNet, "forward", nan_in_training_after(7, DetectorNet.forward))
    failed(invoke(args(out)), "diverged", "loss became nan at epoch 2 step 2", "(step 5) is kept", "--resume")
    assert not out.exists() and torch.load(f"{out}.ckpt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    assert invoke([*args(out), "--resume"]).exit_code == 0
    a, b = torch.load(out, weights_only=True), torch.load(tmp_path / "straight.pt", weights_only=True)
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    assert not Path(f"{out}.ckpt").exists()


def test_finetune_nan_mid_run_keeps_last_epoch_and_resume_matches_a_clean_run(fdm_dict, block_pairs, tiny_weights,
                                                                             tmp_path, monkeypatch):
    from pdsn_cli.train import finetune as ft

    def args(out):  # 225 training pairs, batches of 64: 4 steps an epoch
        return ["finetune", "--dict", fdm_dict, "--pairs", block_pairs, "--weights", tiny_weights, "--epochs", "2",
                "--lr", "1e-3", "--out", out, "--quiet"]

    assert invoke(args(tmp_path / "straight.h5")).exit_code == 0
    out = tmp_path / "ft.h5"
    monkeypatch.setattr(ft._StudentHead, "forward", nan_in_training_after(5, ft._StudentHead.forward))
    failed(invoke(args(out)), "loss became nan at epoch 2 step 1", "(step 4) is kept")
    assert not out.exists() and torch.load(f"{out}.ckpt", weights_only=True)["step"] == 4
    monkeypatch.undo()
    assert invoke([*args(out), "--resume"]).exit_code == 0
    with h5py.File(out) as fa, h5py.File(tmp_path / "straight.h5") as fb:
        for k in fb["head"]:
            assert np.array_equal(fa["head"][k][()], fb["head"][k][()]), k
    assert not Path(f"{out}.ckpt").exists()
