"""Train a face trunk with a margin softmax head: the engine behind ``pdsn train-trunk``.

The recipe is the paper's (CosFace-style): SGD, momentum 0.9, weight decay 5e-4, lr 0.1 divided by 10 at
16/30, 24/30 and 28/30 of training (CosFace's 16k/24k/28k of 30k iterations), random horizontal flips.
Images come from a chips file (or the ``clean`` half of a pairs file) and live in memory as uint8.

A slice of the identities is held out of training; after training, verification accuracy on pairs of
held-out images (2-fold threshold choice) says whether the trunk learned identity rather than the classes.

Runs are resumable and reproducible: a checkpoint (atomic) holds weights, optimizer, step and every
process's RNG states, and the data order is a pure function of (seed, epoch), so an interrupted run
resumed from its checkpoint ends with weights bitwise equal to an uninterrupted one on CPU.

Under ``torchrun`` (RANK / WORLD_SIZE in the environment) it trains data-parallel: gloo on CPU, NCCL on
CUDA, a DistributedSampler shard per process, the batch size split between processes, rank 0 writing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from pdsn_cli.accel import prepare_module
from pdsn_cli.atomic import check_resumable
from pdsn_cli.device import seed_everything
from pdsn_cli.data import pairs_h5
from pdsn_cli.data.chips_h5 import read_chips
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.train.heads import build_head, head_names
from pdsn_cli.train.loop import Checkpoints, Processes, StepLR, Task, train
from pdsn_cli.train.splits import split_identities
from pdsn_cli.trunks import build_trunk, trunk_names
from pdsn_cli.trunks.checkpoint import save_checkpoint

CHECKPOINT_NAME = "checkpoint.pt"
TRUNK_NAME = "trunk.pt"
CHECKPOINT_FORMAT = "pdsn-train-trunk"

#: config fields that must match for a resumed run to continue the same trajectory
RESUME_MUST_MATCH = (
    "trunk", "head", "s", "m", "epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_steps",
    "lr_factor", "warmup_steps", "seed", "flip", "holdout", "init_weights",
)


@dataclass
class TrainTrunkConfig:
    data: str
    out: str
    trunk: str = "tiny"
    head: str = "cosface"
    #: margin head scale / margin; None takes the head's default (CosFace 30/0.35, ArcFace 64/0.5)
    s: float | None = None
    m: float | None = None
    epochs: int = 20
    #: global batch size, split evenly between DDP processes
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: fractions of the total steps at which lr is multiplied by lr_factor
    lr_steps: tuple[float, ...] = (16 / 30, 24 / 30, 28 / 30)
    lr_factor: float = 0.1
    #: linear warm-up from lr/warmup_steps to lr over the first steps (0 = the paper's: none)
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 500
    resume: bool = False
    gpu: int | None = None
    #: bfloat16 autocast; only ever used on CUDA
    amp: bool = True
    flip: bool = True
    #: fraction of identities kept out of training for the held-out verification check (0 = none)
    holdout: float = 0.1
    eval_pairs: int = 400
    #: start from these trunk weights instead of a random init (fine-tuning)
    init_weights: str | None = None

    def plain(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_steps"] = [float(x) for x in self.lr_steps]
        return d


# ----------------------------------------------------------------------------------------------- data


@dataclass
class TrainData:
    images: np.ndarray  # N×H×W×3 uint8
    labels: np.ndarray  # N int64
    template: str
    kind: str


def read_training_images(path: str | os.PathLike) -> TrainData:
    """Images and labels from a chips file, or the ``clean`` images of a pairs file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"no such data file: {path}")
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("pdsn_kind")
    except OSError as e:
        raise SchemaError(f"{path} is not a readable HDF5 file (truncated or foreign?): {e}") from None
    if kind == "chips":
        chips = read_chips(path)
        return TrainData(chips.image, chips.label.astype(np.int64), chips.template, "chips")
    if kind == "pairs":
        with pairs_h5.PairsFile(path) as pf:
            # a pairs file repeats each clean chip once per occluded copy; train (and hold out) each once,
            # or held-out "same identity" pairs could be an image against itself
            _, first = np.unique(np.array(pf.source, dtype=object), return_index=True)
            rows = np.sort(first)
            return TrainData(pf.clean(rows), pf.label[rows].astype(np.int64), str(pf.attrs.get("template", "")),
                             "pairs")
    raise SchemaError(f"{path} is neither a pdsn chips nor a pairs file (pdsn_kind={kind!r})")


def make_pairs(labels: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About ``n_pairs`` index pairs, half same-identity, half different; returns (pairs K×2, same K)."""
    rng = np.random.default_rng(seed)
    by_id = [np.flatnonzero(labels == i) for i in np.unique(labels)]
    multi = [g for g in by_id if len(g) >= 2]
    pos = [rng.choice(multi[rng.integers(len(multi))], 2, replace=False) for _ in range(n_pairs // 2)]
    neg = []
    for _ in range(n_pairs - len(pos)):
        a, b = rng.choice(len(by_id), 2, replace=False)
        neg.append((rng.choice(by_id[a]), rng.choice(by_id[b])))
    pairs = np.array(pos + neg, np.int64).reshape(-1, 2)
    same = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    return pairs, same


def two_fold_accuracy(scores: np.ndarray, same: np.ndarray, seed: int = 0) -> float:
    """Accuracy with the threshold chosen on one half of the pairs and applied to the other, both ways."""
    order = np.random.default_rng(seed).permutation(len(scores))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    correct = 0
    for fit, test in (halves, halves[::-1]):
        cands = np.unique(scores[fit])
        accs = [((scores[fit] >= t) == same[fit]).mean() for t in cands]
        t = cands[int(np.argmax(accs))]
        correct += int(((scores[test] >= t) == same[test]).sum())
    return correct / len(scores)


@torch.no_grad()
def embed(trunk: nn.Module, images: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    was_training = trunk.training
    trunk.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).to(device).permute(0, 3, 1, 2).float()
        out.append(F.normalize(trunk(x).float(), dim=1).cpu())
    trunk.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


class _TrainNet(nn.Module):
    """Trunk + margin head as one module, so that DDP syncs both with one set of hooks."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.trunk(x)
        # the margin head stays in float32 under autocast: s·cos θ with a 0.35 margin is lost in bf16
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.head(emb.float(), y)


def lr_at(cfg: TrainTrunkConfig, step: int, total: int) -> float:
    drops = sum(step >= round(f * total) for f in cfg.lr_steps)
    lr = cfg.lr * cfg.lr_factor**drops
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def _validate(cfg: TrainTrunkConfig, world: int) -> None:
    if cfg.trunk not in trunk_names():
        raise BadInputError(f"unknown trunk {cfg.trunk!r}; choose one of {', '.join(trunk_names())}")
    if cfg.head not in head_names():
        raise BadInputError(f"unknown head {cfg.head!r}; choose one of {', '.join(head_names())}")
    for name in ("epochs", "batch_size", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise BadInputError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise BadInputError(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.holdout < 1:
        raise BadInputError(f"holdout must be in [0, 1), got {cfg.holdout}")
    if cfg.holdout > 0 and cfg.eval_pairs < 2:
        raise BadInputError(f"eval_pairs must be >= 2 when identities are held out, got {cfg.eval_pairs}")
    if any(not 0 < f <= 1 for f in cfg.lr_steps):
        raise BadInputError(f"lr_steps are fractions of training in (0, 1], got {list(cfg.lr_steps)}")
    if cfg.batch_size % world:
        raise BadInputError(f"batch size {cfg.batch_size} does not split evenly over {world} processes")
    if cfg.batch_size // world < 2:
        raise BadInputError(f"batch size {cfg.batch_size} leaves < 2 images per process (BatchNorm needs 2)")



class _TrunkTask(Task):
    """One step: a batch of (flipped) images through trunk + margin head, cross-entropy on the margin logits."""

    def __init__(self, cfg: TrainTrunkConfig, net: _TrainNet, data: TrainData, train_idx: np.ndarray,
                 train_labels: np.ndarray, procs: Processes):
        self.cfg, self.net, self.procs = cfg, net, procs
        self.model, self.modules = net, {"model": net.trunk, "head_state": net.head}
        self.local_bs = cfg.batch_size // procs.world
        self.sampler = DistributedSampler(range(len(train_idx)), num_replicas=procs.world, rank=procs.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
        self.epochs, self.steps_per_epoch = cfg.epochs, len(self.sampler) // self.local_bs
        self.images = torch.from_numpy(data.images)  # stays uint8 on the CPU; batches are cast on the device
        self.labels = torch.from_numpy(train_labels.astype(np.int64))
        self.train_idx = torch.from_numpy(train_idx)
        # each process its own dropout / flip streams, all derived from the seed
        torch.manual_seed(cfg.seed + 1_000_003 * procs.rank)
        self.generators = {"flip": torch.Generator().manual_seed(cfg.seed + 7_919 * (procs.rank + 1))}
        self.epoch_losses: list[float] = []

    def optimizer(self):
        cfg, device = self.cfg, self.procs.device
        return torch.optim.SGD(
            [p for p in self.net.parameters() if p.requires_grad],
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            fused=device.type == "cuda",  # one kernel for the whole update instead of one per parameter
        )

    def scheduler(self, opt, total):
        return StepLR(opt, lambda step: lr_at(self.cfg, step, total))

    def plan(self, epoch):
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.int64)

    def step(self, model, plan, i):
        device, cuda = self.procs.device, self.procs.device.type == "cuda"
        pos = plan[i * self.local_bs : (i + 1) * self.local_bs]
        x = self.images[self.train_idx[pos]].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        y = self.labels[pos].to(device, non_blocking=True)
        if self.cfg.flip:
            flip = (torch.rand(len(pos), generator=self.generators["flip"]) < 0.5).to(device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.cfg.amp and cuda):
            # the permuted NHWC batch is already channels_last, what the CUDA model runs in
            logits = model(x if cuda else x.contiguous(), y)
        loss = F.cross_entropy(logits.float(), y)
        return loss, loss.detach().float().view(1)

    def end_epoch(self, epoch, stats, world):
        losses = [v / world for v in stats[:, 0].tolist()]
        self.epoch_losses.append(sum(losses) / len(losses))

    def where(self, step, total):
        return f"step {step}/{total}"

    def state_dict(self):
        return {"epoch_losses": self.epoch_losses}

    def load_state_dict(self, state):
        self.epoch_losses = list(state["epoch_losses"])


def train_trunk(cfg: TrainTrunkConfig, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train ``cfg.trunk`` on ``cfg.data``; returns a summary dict (see module docstring).

    ``progress(stage, done, total)`` is called on rank 0 after every step. SIGINT stops at the next step boundary
    after writing a checkpoint, then raises KeyboardInterrupt; ``resume=True`` continues from it.
    """
    with Processes(cfg.gpu) as procs:
        return _train(cfg, procs, progress)


def _train(cfg: TrainTrunkConfig, procs: Processes, progress) -> dict:
    _validate(cfg, procs.world)
    device = procs.device
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out must be a folder, {out} is a file")
    # the folder is created at the first checkpoint: check now that it can be, not after the first steps
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot create --out {out}: {base} is not a folder" if not base.is_dir()
                            else f"cannot create --out {out}: {base} is not writable")
    ckpt_path, trunk_path = out / CHECKPOINT_NAME, out / TRUNK_NAME
    check_resumable(trunk_path, ckpt_path, cfg.resume)
    if ckpt_path.exists() and not cfg.resume:
        raise BadInputError(f"{out} already holds a training checkpoint; resume it or choose another --out")

    data = read_training_images(cfg.data)
    seed_everything(cfg.seed)
    trunk = build_trunk(cfg.trunk, cfg.init_weights).train()
    if tuple(data.images.shape[1:3]) != tuple(trunk.input_size):
        h, w = data.images.shape[1:3]
        raise BadInputError(
            f"{cfg.data} holds {h}×{w} chips (template {data.template or '?'}), trunk {cfg.trunk} needs "
            f"{trunk.input_size[0]}×{trunk.input_size[1]} (template {trunk.template}); re-align with that template"
        )
    is_train, is_held = split_identities(data.labels, cfg.holdout, cfg.seed)
    train_idx = np.flatnonzero(is_train)
    classes, train_labels = np.unique(data.labels[train_idx], return_inverse=True)
    if len(classes) < 2:
        raise BadInputError(f"{cfg.data} has {len(classes)} training identities; a margin head needs 2 or more")
    # DistributedSampler(drop_last): each process gets len // world images, in batches of batch_size // world
    if len(train_idx) // procs.world // (cfg.batch_size // procs.world) == 0:
        raise BadInputError(
            f"{len(train_idx)} training images cannot fill one batch of {cfg.batch_size}; lower the batch size"
        )
    head = build_head(cfg.head, trunk.embedding_dim, len(classes), cfg.s, cfg.m)
    # CUDA + bf16: channels_last and cuDNN autotuning (pdsn_cli.accel); the CPU runs as before
    net = prepare_module(_TrainNet(trunk, head), device, "bf16" if cfg.amp else "fp32")
    task = _TrunkTask(cfg, net, data, train_idx, train_labels, procs)
    settings = {k: v for k, v in cfg.plain().items() if k in RESUME_MUST_MATCH}
    checkpoints = Checkpoints(
        ckpt_path, CHECKPOINT_FORMAT, every=cfg.checkpoint_every, resume=cfg.resume,
        must_match={**settings, "train_images": int(len(train_idx)), "classes": int(len(classes))},
        extra=dict(config=cfg.plain(), trunk=cfg.trunk, head=cfg.head, classes=int(len(classes)),
                   train_images=int(len(train_idx))),
        advice=" or check the data",
    )
    run = train(task, procs, checkpoints, progress)
    total, start = run.steps, run.resumed_from or 0
    epoch_losses = task.epoch_losses

    result = {
        "steps": total,
        "steps_this_run": total - start,
        "resumed_from": run.resumed_from,
        "epochs": cfg.epochs,
        "final_loss": epoch_losses[-1] if epoch_losses else None,
        "epoch_losses": epoch_losses,
        "seconds": run.seconds,
        "img_per_s": (total - start) * cfg.batch_size / run.seconds if total > start and run.seconds > 0 else None,
        "checkpoint": str(ckpt_path),
        "trunk_weights": str(trunk_path),
        "trunk": cfg.trunk,
        "head": cfg.head,
        "train_images": int(len(train_idx)),
        "train_identities": int(len(classes)),
        "world_size": procs.world,
        "device": str(device),
        "heldout_identities": int(len(np.unique(data.labels[is_held]))),
        "heldout_pairs": 0,
        "heldout_accuracy": None,
    }
    if procs.main:
        save_checkpoint(
            trunk_path,
            state_dict=trunk.state_dict(), trunk=cfg.trunk, template=trunk.template,
            embedding_dim=int(trunk.embedding_dim), steps=total, classes=int(len(classes)),
        )
        if result["heldout_identities"] >= 2:
            held_idx = np.flatnonzero(is_held)
            pairs, same = make_pairs(data.labels[held_idx], cfg.eval_pairs, cfg.seed)
            emb = embed(trunk, data.images[held_idx], device)
            scores = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(1).numpy()
            result["heldout_pairs"] = int(len(pairs))
            result["heldout_accuracy"] = two_fold_accuracy(scores, same, cfg.seed)
    procs.barrier()
    return result


__all__ = [
    "TrainTrunkConfig",
    "train_trunk",
    "read_training_images",
    "split_identities",
    "make_pairs",
    "two_fold_accuracy",
    "lr_at",
]
