"""train-trunk: margin heads, learning, bitwise resume, NaN stop, refusals, and a 2-process DDP run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from pdsn_cli.data.chips_h5 import ChipsWriter
from pdsn_cli.errors import BadInputError, JobFailed
from pdsn_cli.train.heads import ArcFace, CosFace, build_head
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.checkpoint import load_checkpoint
from pdsn_cli.train.splits import split_identities
from pdsn_cli.train.trunk import (
    TrainTrunkConfig,
    lr_at,
    make_pairs,
    read_training_images,
    train_trunk,
    two_fold_accuracy,
)

from conftest import write_schema1

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def class_images(identities: int, per: int, seed: int = 0, size=(112, 96)):
    """Identity = a smooth random colour field; an image = a shifted, re-lit, noisy crop of it."""
    rng = np.random.default_rng(seed)
    h, w = size
    images, labels = [], []
    for c in range(identities):
        field = cv2.resize(rng.uniform(0, 255, (4, 3, 3)).astype(np.float32), (w + 16, h + 16),
                           interpolation=cv2.INTER_CUBIC)
        for _ in range(per):
            dy, dx = rng.integers(0, 17, 2)
            im = field[dy : dy + h, dx : dx + w] * rng.uniform(0.8, 1.2) + rng.normal(0, 12, (h, w, 3))
            images.append(np.clip(im, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


def write_chips(path, identities=8, per=6, size=(112, 96), seed=0):
    images, labels = class_images(identities, per, seed, size)
    with h5py.File(path, "w") as f:
        w = ChipsWriter(f, "arc112x96", size, "", True)
        w.add(list(images), [np.zeros((5, 2), np.float32)] * len(images), [f"id{c:03d}" for c in labels],
              [f"test://{i}" for i in range(len(images))], [2] * len(images))
        w.close()
    return str(path)


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return write_chips(tmp_path_factory.mktemp("data") / "chips.h5")


def cfg_for(data, out, **kw):
    base = dict(data=data, out=str(out), trunk="tiny", epochs=2, batch_size=8, lr=0.05, holdout=0.25,
                eval_pairs=60, checkpoint_every=1000)
    base.update(kw)
    return TrainTrunkConfig(**base)


# ---------------------------------------------------------------------------------------------- heads


def test_margin_heads_apply_margin_to_the_true_class_only():
    torch.manual_seed(0)
    emb, y = torch.randn(5, 16), torch.tensor([0, 1, 2, 3, 0])
    cos = CosFace(16, 4)
    plain, margin = cos.logits(emb), cos(emb, y)
    diff = plain - margin
    onehot = torch.nn.functional.one_hot(y, 4).bool()
    torch.testing.assert_close(diff[onehot], torch.full((5,), 30 * 0.35))
    assert torch.equal(diff[~onehot], torch.zeros(15))

    arc = ArcFace(16, 4)
    cos_t = arc.cosine(emb).gather(1, y.view(-1, 1)).squeeze(1)
    theta = torch.arccos(cos_t)
    expect = torch.where(theta + 0.5 < math.pi, torch.cos(theta + 0.5), cos_t - math.sin(math.pi - 0.5) * 0.5)
    torch.testing.assert_close(arc(emb, y)[onehot], 64 * expect, rtol=1e-5, atol=1e-4)
    assert torch.equal((arc.logits(emb) - arc(emb, y))[~onehot], torch.zeros(15))


def test_head_registry():
    h = build_head("arcface", 8, 3, s=10, m=0.2)
    assert isinstance(h, ArcFace) and (h.s, h.m) == (10.0, 0.2) and h.weight.shape == (3, 8)
    assert (build_head("cosface", 8, 3).s, build_head("cosface", 8, 3).m) == (30.0, 0.35)
    with pytest.raises(BadInputError, match="unknown head"):
        build_head("sphereface", 8, 3)


# -------------------------------------------------------------------------------------------- helpers


def test_schedule_split_pairs_and_accuracy():
    cfg = TrainTrunkConfig(data="", out="", lr=0.1)
    assert [lr_at(cfg, s, 300) for s in (0, 159, 160, 240, 280, 299)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.0001, 0.0001]
    )
    labels = np.repeat(np.arange(20), 3)
    train, held = split_identities(labels, 0.2, seed=1)
    assert held.sum() == 12 and not (train & held).any() and (train | held).all()
    assert not set(labels[train]) & set(labels[held])
    pairs, same = make_pairs(labels[held], 50, seed=0)
    sub = labels[held]
    assert same.sum() == 25 and (sub[pairs[same, 0]] == sub[pairs[same, 1]]).all()
    assert (sub[pairs[~same, 0]] != sub[pairs[~same, 1]]).all() and (pairs[:, 0] != pairs[:, 1]).all()
    assert two_fold_accuracy(np.where(same, 0.9, 0.1), same) == 1.0


# ------------------------------------------------------------------------------------------- training


def test_training_learns_and_writes_loadable_weights(chips, tmp_path):
    r = train_trunk(cfg_for(chips, tmp_path / "run", epochs=6))
    losses = r["epoch_losses"]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    assert r["train_identities"] == 6 and r["heldout_identities"] == 2 and r["heldout_pairs"] == 60
    assert 0.0 <= r["heldout_accuracy"] <= 1.0 and r["img_per_s"] > 0
    ck = load_checkpoint(r["checkpoint"])
    assert ck["step"] == r["steps"] == 6 * (36 // 8)
    trunk = build_trunk("tiny", r["trunk_weights"])
    assert trunk.name == "tiny" and not trunk.training
    with pytest.raises(BadInputError, match="already holds a training checkpoint"):
        train_trunk(cfg_for(chips, tmp_path / "run", epochs=6))


def test_interrupted_and_resumed_run_is_bitwise_identical(chips, tmp_path):
    straight = train_trunk(cfg_for(chips, tmp_path / "a"))
    steps_per_epoch = straight["steps"] // 2

    def interrupt_after_first_epoch(stage, step, total):
        if step == steps_per_epoch:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled at the next step boundary

    with pytest.raises(KeyboardInterrupt):
        train_trunk(cfg_for(chips, tmp_path / "b"), progress=interrupt_after_first_epoch)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == steps_per_epoch
    with pytest.raises(BadInputError, match="different settings: lr"):
        train_trunk(cfg_for(chips, tmp_path / "b", lr=0.01, resume=True))
    resumed = train_trunk(cfg_for(chips, tmp_path / "b", resume=True))
    assert resumed["resumed_from"] == steps_per_epoch and resumed["steps_this_run"] == steps_per_epoch

    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for part in ("model", "head_state"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["epoch_losses"] == b["epoch_losses"] == resumed["epoch_losses"]
    assert straight["heldout_accuracy"] == resumed["heldout_accuracy"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(chips, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = CosFace.target_logit

    def faulty(self, cos_t):  # a numerical fault from the 4th step on
        calls["n"] += 1
        out = real(self, cos_t)
        return out * float("nan") if calls["n"] >= 4 else out

    monkeypatch.setattr(CosFace, "target_logit", faulty)
    with pytest.raises(JobFailed, match=r"loss became nan at step 4/.*step 2\) is kept"):
        train_trunk(cfg_for(chips, tmp_path / "run", checkpoint_every=2))
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "checkpoint.pt.partial").exists()


def test_refusals(chips, tmp_path):
    small = write_chips(tmp_path / "small.h5", identities=4, per=4, size=(112, 112))
    with pytest.raises(BadInputError, match="112×112 chips .* needs 112×96"):
        train_trunk(cfg_for(small, tmp_path / "o1"))
    with pytest.raises(BadInputError, match="unknown trunk"):
        train_trunk(cfg_for(chips, tmp_path / "o2", trunk="vgg"))
    with pytest.raises(BadInputError, match="cannot fill one batch"):
        train_trunk(cfg_for(chips, tmp_path / "o3", batch_size=64))
    with pytest.raises(BadInputError, match="no such data file"):
        train_trunk(cfg_for(str(tmp_path / "absent.h5"), tmp_path / "o4"))
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3", "o4"))


def test_reads_clean_images_of_a_pairs_file_once_per_source(tmp_path):
    pairs_h5 = pytest.importorskip("pdsn_cli.data.pairs_h5")
    images, labels = class_images(6, 4)
    n = len(images)
    path = tmp_path / "pairs.h5"
    with h5py.File(path, "w") as f:
        pairs_h5.create(f, grid=5, template="arc112x96", size=(112, 96))
        for _ in range(2):  # two occluded copies of every clean chip
            pairs_h5.append(
                f, clean=images, occluded=images, mask=np.zeros((n, 112, 96), bool),
                blocks=np.zeros((n, 5, 5)), landmarks=np.zeros((n, 5, 2)),
                identities=[f"id{c}" for c in labels], sources=[f"test://{i}" for i in range(n)],
                kinds=["block"] * n, targets=[-1] * n,
            )
        f.attrs["complete"] = True
    with h5py.File(path, "r") as f:  # rows given as arrays: each clean chip stored once, the occluded ones stored
        assert f["chips"].shape[0] == n and f["occluded"].shape[0] == 2 * n
    r = train_trunk(cfg_for(str(path), tmp_path / "run", epochs=1, holdout=0))
    assert r["train_images"] == n and r["train_identities"] == 6 and r["heldout_accuracy"] is None
    old = tmp_path / "old.h5"  # the same rows as an older version wrote them (schema 1)
    write_schema1(path, old)
    a, b = read_training_images(path), read_training_images(old)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and len(a.images) == n


# ------------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from pdsn_cli.train.trunk import TrainTrunkConfig, train_trunk
r = train_trunk(TrainTrunkConfig(data=sys.argv[1], out=sys.argv[2], trunk="tiny", epochs=1, batch_size=8,
                                 lr=0.05, holdout=0.25, eval_pairs=40))
print("RESULT" + json.dumps({k: r[k] for k in ("steps", "world_size", "heldout_accuracy")}), flush=True)
"""


def test_ddp_two_processes_gloo(chips, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         chips, str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two processes share stdout: their lines may run into one another, so each result is found on its own
    results = [json.loads(m) for m in re.findall(r"RESULT(\{[^{}]*\})", proc.stdout)]
    assert len(results) == 2 and all(r["world_size"] == 2 for r in results)
    # 36 training images, 18 per process, 4 per process per step -> 4 steps
    assert all(r["steps"] == 4 for r in results)
    ck = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert ck["world_size"] == 2 and ck["step"] == 4 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["flip"], ck["rng"][1]["flip"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint.pt", "trunk.pt"]
    build_trunk("tiny", str(tmp_path / "out" / "trunk.pt"))
