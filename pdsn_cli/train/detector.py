"""``pdsn train-detector``: training the occlusion detector (``pdsn_cli.pdsn.detector``) on make-pairs data.

Every occluded chip of a pairs file comes with the fraction of each block its occluder covers (``blocks``), and
every clean chip is a free negative (all blocks at 0). The loss is per-block binary cross-entropy against that
*soft* occupancy (see the network's module for why).

Training uses both halves of every pair (clean chips once per source image), random horizontal flips (the grid
is mirror-symmetric, so the target flips with the image) and mild brightness/contrast jitter, AdamW with a cosine
learning rate, in the shared loop (``pdsn_cli.train.loop``: ``--resume``, torchrun, Ctrl-C, NaN stop). The
train/validation split is by source image, so no face appears on both sides. Everything random draws from
generators seeded by ``seed``: on CPU two runs with the same data and seed give bitwise equal weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.atomic import check_resumable, check_writable
from pdsn_cli.data import pairs_h5
from pdsn_cli.data.face_sets import FaceSets, read_face_sets
from pdsn_cli.device import seed_everything
from pdsn_cli.errors import BadInputError, SchemaError, check_training_options
from pdsn_cli.occlusion.occluders import DRAWN, occlude
from pdsn_cli.pdsn.detector import DetectorNet, OcclusionDetector, resize_chips, to_tensor
from pdsn_cli.train import augment
from pdsn_cli.train.loop import Checkpoints, Processes, Task, steps_per_epoch, train
from pdsn_cli.train.splits import split_by_source

__all__ = ["TrainDetectorConfig", "DetectorData", "read_detector_data", "block_metrics", "train_detector"]

CHECKPOINT_FORMAT = "pdsn-train-detector"
#: rows read from a pairs file at a time: bounds memory to the resized copy plus one chunk of full chips
READ_CHUNK = 1024


@dataclass
class TrainDetectorConfig:
    pairs: list[Path]
    out: Path
    #: face sets (chips files of pdsn align) whose faces get occluders drawn here, no pairs file needed
    faces: list[Path] = dataclasses.field(default_factory=list)
    #: occluded copies drawn per face of ``faces`` (each face also serves once as a clean negative)
    per_face: int = 4
    #: K of the K×K grid learnt from ``faces`` alone (with pairs files: theirs)
    grid: int = 5
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    #: fraction of the source images held out for the reported precision / recall
    val_fraction: float = 0.1
    #: occupancy at or above which a block counts as occluded (truth and prediction alike)
    threshold: float = 0.5
    #: (H, W) the chips are resized to; ≥ 4·grid a side, best a multiple of 16·grid/5 … 16·grid
    input_size: tuple[int, int] = (80, 80)
    #: channels of the stem; the stages have 2× and 4× that
    width: int = 16
    #: random horizontal flips and brightness/contrast jitter during training
    augment: bool = True
    #: with ``augment``: the probability of a greyscale copy and, separately, of a low-resolution one (the face
    #: downscaled to 16-40 px, then back): chips of other photos than the training ones (0: off)
    degrade: float = 0.3
    gpu: int | None = None
    #: continue from the checkpoint ``<out>.ckpt`` of an interrupted run
    resume: bool = False

    def plain(self) -> dict:
        d = dataclasses.asdict(self)
        d["pairs"] = [str(p) for p in self.pairs]
        d["faces"] = [str(p) for p in self.faces]
        d["out"] = str(self.out)
        d["input_size"] = [int(v) for v in self.input_size]
        del d["resume"]  # how the run was started, not what it trains (saved with the detector)
        return d


@dataclass
class DetectorData:
    """Resized training chips: occluded ones with their block occupancy, and clean ones (target all 0)."""

    images: np.ndarray  # M×h×w×3 uint8
    blocks: np.ndarray  # M×K×K float32
    clean: np.ndarray  # M bool: a clean chip (negative)
    kind: list[str]  # occluder kind, "clean" for clean chips
    source: list[str]
    grid: int
    template: str
    chip_size: tuple[int, int]


def pairs_layout(paths: list[Path]) -> list[tuple[Path, int, str, tuple[int, int], int]]:
    """(path, grid, template, chip size, rows) of each pairs file; refuses files of different layouts."""
    metas = []
    for p in paths:
        with pairs_h5.PairsFile(p) as pf:
            metas.append((Path(p), pf.grid, str(pf.attrs["template"]),
                          (int(pf.attrs["height"]), int(pf.attrs["width"])), pf.n))
    p0, grid, template, chip_size, _ = metas[0]
    for p, g, t, s, _ in metas[1:]:
        if (g, t, s) != (grid, template, chip_size):
            raise SchemaError(
                f"{p} has grid {g}, template {t} {s[0]}×{s[1]}; {p0} has grid {grid}, template {template} "
                f"{chip_size[0]}×{chip_size[1]}: a detector learns one layout"
            )
    return metas


def read_detector_data(paths: list[Path], input_size: tuple[int, int], progress=None) -> DetectorData:
    """Both halves of every pair, resized; each source image's clean chip once per file. Chips are read (occluded
    ones regenerated, ``pairs_h5``) ``READ_CHUNK`` rows at a time: memory holds the resized set and one chunk."""
    metas = pairs_layout(paths)
    _, grid, template, chip_size, _ = metas[0]
    total_rows = sum(m[4] for m in metas)
    if total_rows == 0:
        raise BadInputError("the pairs files hold no pairs")
    images, blocks, clean, kinds, sources = [], [], [], [], []
    done = 0
    for p, *_, n in metas:
        seen: set[str] = set()
        with pairs_h5.PairsFile(p) as pf:
            src_all, kind_all = pf.source, pf.kind
            for a in range(0, n, READ_CHUNK):
                b = min(n, a + READ_CHUNK)
                rows = np.arange(a, b)
                images.append(resize_chips(pf.occluded(rows)[0], input_size))
                blocks.append(pf.blocks(rows).astype(np.float32))
                clean.append(np.zeros(b - a, bool))
                kinds += kind_all[a:b]
                sources += src_all[a:b]
                # per_image > 1 repeats a clean chip; one negative per image keeps the clean images
                # equally weighted and the clean false-positive rate counted per image
                first = [i for i in range(a, b) if not (src_all[i] in seen or seen.add(src_all[i]))]
                if first:
                    images.append(resize_chips(pf.clean(np.array(first)), input_size))
                    blocks.append(np.zeros((len(first), grid, grid), np.float32))
                    clean.append(np.ones(len(first), bool))
                    kinds += ["clean"] * len(first)
                    sources += [src_all[i] for i in first]
                done += b - a
                if progress:
                    progress(done, total_rows)
    return DetectorData(
        images=np.concatenate(images), blocks=np.concatenate(blocks), clean=np.concatenate(clean),
        kind=kinds, source=sources, grid=grid, template=template, chip_size=chip_size,
    )


def draw_detector_data(faces: FaceSets, grid: int, input_size: tuple[int, int], per_face: int, seed: int,
                       progress=None) -> DetectorData:
    """Training chips drawn from face sets: each face once clean (a negative) and ``per_face`` times under an
    occluder of any kind (seeded per face, so a rerun draws the same), resized."""
    h, w = faces.image.shape[1:3]
    n = len(faces)
    images = np.empty((n * (per_face + 1), *input_size, 3), np.uint8)
    blocks = np.zeros((len(images), grid, grid), np.float32)
    clean = np.zeros(len(images), bool)
    kinds, sources = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 4, i])
        chip, lm = faces.image[i], faces.landmarks[i]
        drawn = [occlude(chip, lm, DRAWN[rng.integers(len(DRAWN))], rng, grid=grid) for _ in range(per_face)]
        at = i * (per_face + 1)
        images[at:at + per_face + 1] = resize_chips(np.stack([chip] + [o.image for o in drawn]), input_size)
        clean[at] = True
        blocks[at + 1:at + per_face + 1] = np.stack([o.blocks for o in drawn])
        kinds += ["clean"] + [o.kind for o in drawn]
        sources += [faces.sources[i]] * (per_face + 1)
        if progress and (i % 256 == 0 or i == n - 1):
            progress(i + 1, n)
    return DetectorData(images=images, blocks=blocks, clean=clean, kind=kinds, source=sources, grid=grid,
                        template=faces.template, chip_size=(h, w))


def _concat(a: DetectorData, b: DetectorData) -> DetectorData:
    if (a.grid, a.template, a.chip_size) != (b.grid, b.template, b.chip_size):
        raise SchemaError(f"the pairs files are grid {a.grid}, {a.template} {a.chip_size[0]}×{a.chip_size[1]}; the "
                          f"face sets {b.grid}, {b.template} {b.chip_size[0]}×{b.chip_size[1]}: a detector learns one")
    return DetectorData(np.concatenate([a.images, b.images]), np.concatenate([a.blocks, b.blocks]),
                        np.concatenate([a.clean, b.clean]), a.kind + b.kind, a.source + b.source, a.grid, a.template,
                        a.chip_size)


def _prf(tp: int, fp: int, fn: int) -> dict:
    """None where a ratio has nothing to count (no flagged blocks: no precision)."""
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def block_metrics(pred: np.ndarray, truth: np.ndarray, clean: np.ndarray, kinds: list[str], threshold: float) -> dict:
    """Block-level precision / recall / F1 of ``pred ≥ threshold`` against ``truth ≥ threshold``.

    Overall figures count every block of every chip (occluded and clean); ``per_kind`` counts the
    occluded chips of each kind; ``clean_fpr`` is the fraction of clean chips' blocks flagged, and
    ``clean_chip_fpr`` the fraction of clean chips with at least one block flagged.
    """
    p = pred >= threshold
    t = truth >= threshold

    def counts(sel):
        return int((p[sel] & t[sel]).sum()), int((p[sel] & ~t[sel]).sum()), int((~p[sel] & t[sel]).sum())

    everything = np.ones(len(pred), bool)
    out = _prf(*counts(everything))
    kinds_arr = np.asarray(kinds, dtype=object)
    out["per_kind"] = {}
    for k in sorted(set(kinds_arr[~clean].tolist())):
        sel = (kinds_arr == k) & ~clean
        out["per_kind"][k] = {"chips": int(sel.sum()), **_prf(*counts(sel))}
    out["clean_chips"] = int(clean.sum())
    out["occluded_chips"] = int((~clean).sum())
    out["clean_fpr"] = float(p[clean].mean()) if clean.any() else None
    out["clean_chip_fpr"] = float(p[clean].any(axis=(1, 2)).mean()) if clean.any() else None
    out["occupancy_mae"] = float(np.abs(pred - truth).mean()) if len(pred) else None
    return out


def validate(cfg: TrainDetectorConfig) -> None:
    if not cfg.pairs and not cfg.faces:
        raise BadInputError("give at least one pairs file (--pairs) or face set (--faces)")
    if cfg.per_face < 1:
        raise BadInputError(f"--per-face must be ≥ 1, got {cfg.per_face}")
    check_training_options(epochs=cfg.epochs, batch_size=cfg.batch_size, width=cfg.width, lr=cfg.lr,
                           val_fraction=cfg.val_fraction)
    if not 0.0 < cfg.threshold < 1.0:
        raise BadInputError(f"--threshold must be in (0, 1), got {cfg.threshold}")
    if len(cfg.input_size) != 2:
        raise BadInputError(f"--input-size must be H W, got {cfg.input_size}")
    for p in [*cfg.pairs, *cfg.faces]:
        if not Path(p).is_file():
            raise BadInputError(f"no such {'pairs' if p in cfg.pairs else 'chips'} file: {p}")
    grid = pairs_layout([Path(p) for p in cfg.pairs])[0][1] if cfg.pairs else cfg.grid
    if min(cfg.input_size) < 4 * grid:
        raise BadInputError(f"--input-size {cfg.input_size[0]}×{cfg.input_size[1]} is too small for a "
                            f"{grid}×{grid} grid (need ≥ {4 * grid} px a side)")
    if not 0.0 <= cfg.degrade <= 1.0:
        raise BadInputError(f"--degrade is a probability in [0, 1], got {cfg.degrade}")
    check_writable(cfg.out)
    check_resumable(cfg.out, str(cfg.out) + ".ckpt", cfg.resume)


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator,
             degrade: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    y = torch.where(flip.view(-1, 1, 1).to(y.device), y.flip(2), y)
    # mild photometric jitter; with ``degrade``, greyscale and low-resolution chips (pdsn_cli.train.augment)
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    bias = 40.0 * torch.rand(n, 1, 1, 1, generator=g) - 20.0
    x = augment.expose(x, gain, bias)
    if degrade > 0:
        # the occupancy the chips are trained on stays the same
        grey = torch.rand(n, generator=g) < degrade
        side = int(torch.randint(16, 41, (1,), generator=g))
        low = torch.rand(n, generator=g) < degrade
        x = augment.degrade(x, grey, low, side)
    return x, y


@torch.inference_mode()
def _predict_tensor(net: nn.Module, images: np.ndarray, device: torch.device, batch: int = 512) -> np.ndarray:
    net.eval()
    out = [torch.sigmoid(net(to_tensor(images[a : a + batch], device))).float().cpu().numpy()
           for a in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, net.grid, net.grid), np.float32)


class _DetectorTask(Task):
    """One step: a (flipped, re-lit) batch of chips, BCE of the K×K logits against the soft block occupancy.
    Under torchrun each process takes every WORLD_SIZE-th chip of the global batch."""

    def __init__(self, cfg: TrainDetectorConfig, net: DetectorNet, data: DetectorData, train_idx: np.ndarray,
                 val_idx: np.ndarray, procs: Processes):
        self.cfg, self.net, self.data, self.val_idx, self.procs = cfg, net, data, val_idx, procs
        self.model, self.modules = net, {"model": net}
        self.epochs, self.steps_per_epoch = cfg.epochs, steps_per_epoch(len(train_idx), cfg.batch_size, procs.world)
        # one stream draws the epoch order and the augmentation (each process its own; rank 0's order is used)
        self.generators = {"augment": torch.Generator().manual_seed(cfg.seed + 7_919 * procs.rank)}
        # the whole (resized, uint8) training set lives on the device: at 80×80 that is 19 KB a chip
        self.images = torch.from_numpy(data.images).to(procs.device)
        self.targets = torch.from_numpy(data.blocks).to(procs.device)
        self.train_t = torch.from_numpy(train_idx)
        self.history: list[float] = []
        self.val_history: list[float] = []
        self.pred: np.ndarray | None = None  # the last epoch's validation predictions, i.e. the saved weights'

    def optimizer(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def scheduler(self, opt, total):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    def plan(self, epoch):
        self.net.train()
        order = self.train_t[torch.randperm(len(self.train_t), generator=self.generators["augment"])]
        return self.procs.broadcast(order)

    def step(self, model, plan, i):
        device, b = self.procs.device, self.cfg.batch_size
        idx = plan[i * b : (i + 1) * b][self.procs.rank :: self.procs.world].to(device)
        x = self.images[idx].permute(0, 3, 1, 2).float()
        y = self.targets[idx]
        if self.cfg.augment:
            x, y = _augment(x, y, self.generators["augment"], self.cfg.degrade)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        return loss, torch.stack([loss.detach(), loss.detach() * len(idx)])

    def end_epoch(self, epoch, stats, world):
        loss_sum = torch.zeros((), dtype=stats.dtype)
        for v in stats[:, 1]:  # in step order, as a running sum
            loss_sum += v
        self.history.append(float(loss_sum) / len(self.train_t))
        if len(self.val_idx):
            self.pred = _predict_tensor(self.net, self.data.images[self.val_idx], self.procs.device)
            pv_t = torch.from_numpy(self.pred).clamp(1e-6, 1 - 1e-6)
            truth = torch.from_numpy(self.data.blocks[self.val_idx])
            self.val_history.append(float(F.binary_cross_entropy(pv_t, truth)))

    def state_dict(self):
        return {"history": self.history, "val_history": self.val_history,
                "pred": None if self.pred is None else torch.from_numpy(self.pred)}

    def load_state_dict(self, state):
        self.history, self.val_history = list(state["history"]), list(state["val_history"])
        self.pred = None if state["pred"] is None else state["pred"].numpy()


def train_detector(cfg: TrainDetectorConfig, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train on ``cfg.pairs``, save to ``cfg.out``; returns held-out block metrics and timings.
    ``progress(stage, done, total)`` for the stages "read" and "train"."""
    validate(cfg)
    with Processes(cfg.gpu) as procs:
        return _train_detector(cfg, procs, progress if procs.main else None)


def _train_detector(cfg: TrainDetectorConfig, procs: Processes, progress) -> dict:
    t0 = time.perf_counter()
    device = procs.device
    seed_everything(cfg.seed)
    input_size = (int(cfg.input_size[0]), int(cfg.input_size[1]))
    read_progress = (lambda d, n: progress("read", d, n)) if progress else None
    data = read_detector_data([Path(p) for p in cfg.pairs], input_size, read_progress) if cfg.pairs else None
    if cfg.faces:
        faces = read_face_sets([Path(p) for p in cfg.faces], data.template if data else None, None, cfg.seed)
        drawn = draw_detector_data(faces, data.grid if data else cfg.grid, input_size, cfg.per_face, cfg.seed,
                                   (lambda d, n: progress("draw", d, n)) if progress else None)
        data = drawn if data is None else _concat(data, drawn)
    t_read = time.perf_counter() - t0

    is_val = split_by_source(data.source, cfg.val_fraction, cfg.seed)
    train_idx = np.flatnonzero(~is_val)
    val_idx = np.flatnonzero(is_val)
    if len(train_idx) < 2:
        raise BadInputError(f"only {len(train_idx)} training chips after the split; make more pairs")

    torch.manual_seed(cfg.seed)
    # channels-last: the uint8 N×H×W×3 batches already are, and CPU convolutions run ~20% faster in it
    net = DetectorNet(data.grid, input_size, cfg.width).to(device, memory_format=torch.channels_last)
    task = _DetectorTask(cfg, net, data, train_idx, val_idx, procs)
    settings = {k: v for k, v in cfg.plain().items() if k not in ("out", "gpu")}
    ckpt = Path(str(cfg.out) + ".ckpt")
    run = train(task, procs, Checkpoints(ckpt, CHECKPOINT_FORMAT, resume=cfg.resume, must_match=settings), progress)

    detector = OcclusionDetector(net, template=data.template, chip_size=data.chip_size,
                                 threshold=cfg.threshold, device=device)
    metrics = None
    if len(val_idx):
        metrics = block_metrics(task.pred, data.blocks[val_idx], data.clean[val_idx],
                                [data.kind[i] for i in val_idx], cfg.threshold)
    n_val_src = len(set(data.source[i] for i in val_idx))
    n_src = len(set(data.source))
    summary = {
        "out": str(cfg.out),
        "device": str(device),
        "grid": data.grid,
        "template": data.template,
        "chip_size": list(data.chip_size),
        "input_size": list(input_size),
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_chips": {"occluded": int((~data.clean[train_idx]).sum()), "clean": int(data.clean[train_idx].sum())},
        "val_chips": {"occluded": int((~data.clean[val_idx]).sum()), "clean": int(data.clean[val_idx].sum())},
        "train_images": n_src - n_val_src,
        "val_images": n_val_src,
        "epochs": cfg.epochs,
        "resumed_from": run.resumed_from,
        "loss_history": task.history,
        "val_loss_history": task.val_history,
        "threshold": cfg.threshold,
        # held-out figures (None without a validation split)
        **{k: metrics[k] if metrics else None for k in ("precision", "recall", "f1", "clean_fpr", "clean_chip_fpr",
                                                        "occupancy_mae")},
        "per_kind": metrics["per_kind"] if metrics else {},
        "read_seconds": round(t_read, 3),
        "train_seconds": round(run.seconds, 3),
    }
    if procs.main:
        detector.save(cfg.out, train_config=cfg.plain(), metrics=summary)
        ckpt.unlink(missing_ok=True)
    procs.barrier()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
