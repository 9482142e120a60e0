"""The test-time occlusion detector: which K×K grid blocks of an aligned face chip are occluded.

PDSN picks its Feature Discarding Mask from the set of occluded blocks, and at test time nobody tells us
that set. This module learns it from make-pairs data, where every occluded chip comes with the fraction of
each block its occluder covers (``blocks``), and every clean chip is a free negative (all blocks at 0).

Model. A small fully convolutional net on the chip resized to ``input_size`` (80×80 by default): a stride-2
stem, then stride-2 stages of conv3×3-BN-ReLU pairs until the map has about K cells a side (80 px / 16 = 5
for K = 5), a 1×1 conv to one logit per cell, and adaptive average pooling to exactly K×K. With the default
sizes each output cell sits over exactly one grid block, and the last stages see the whole face, which is
what tells a dark sunglasses lens from a dark eye.

Target. Per-block occupancy with binary cross-entropy against the *soft* occupancy (not the thresholded
label): BCE is a proper scoring rule, so the sigmoid output estimates the covered fraction itself, the
threshold can be changed after training without retraining, and a block covered 45% is not punished like
a fully clean one. We chose this over a per-pixel mask head: the decision PDSN needs is per block, the
block loss already has 25 targets per chip, and a dense decoder would double the cost of a net that must
screen thousands of chips a second on a CPU.

Training uses both halves of every pair (clean chips once per source image), random horizontal flips
(the grid is mirror-symmetric, so the target flips with the image) and mild brightness/contrast jitter,
AdamW with a cosine learning rate. The train/validation split is by source image, so no face appears on
both sides. Everything random draws from generators seeded by ``seed``: on CPU two runs with the same
data and seed give bitwise equal weights.

Checkpoints are plain tensors and dicts (``torch.load(weights_only=True)``), written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pdsn_cli.data import pairs_h5
from pdsn_cli.atomic import check_writable
from pdsn_cli.device import resolve_device, seed_everything
from pdsn_cli.errors import BadInputError, JobFailed, SchemaError, check_training_options
from pdsn_cli.data.h5util import read_strings
from pdsn_cli.trunks.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "TrainDetectorConfig",
    "DetectorNet",
    "OcclusionDetector",
    "train_detector",
    "resize_chips",
    "block_metrics",
]

CHECKPOINT_FORMAT = "pdsn-occlusion-detector"
CHECKPOINT_VERSION = 1
#: rows read from a pairs file at a time: bounds memory to the resized copy plus one chunk of full chips
READ_CHUNK = 1024


@dataclass
class TrainDetectorConfig:
    pairs: list[Path]
    out: Path
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
    gpu: int | None = None

    def plain(self) -> dict:
        d = dataclasses.asdict(self)
        d["pairs"] = [str(p) for p in self.pairs]
        d["out"] = str(self.out)
        d["input_size"] = [int(v) for v in self.input_size]
        return d


# ---------------------------------------------------------------------------------------------- model


def conv_bn_relu(inplanes: int, planes: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=True),
    )


def num_downsamplings(input_size: tuple[int, int], grid: int) -> int:
    """Stride-2 steps that bring the shorter input side closest to ``grid`` cells without going under it."""
    return int(min(5, max(2, math.floor(math.log2(min(input_size) / grid)))))


class DetectorNet(nn.Module):
    """uint8-range RGB N×3×H×W → K×K occupancy logits. Normalises its input itself, like the trunks."""

    def __init__(self, grid: int = 5, input_size: tuple[int, int] = (80, 80), width: int = 16):
        super().__init__()
        self.grid = grid
        self.input_size = tuple(int(v) for v in input_size)
        self.width = width
        n_down = num_downsamplings(self.input_size, grid)
        chans = [width] + [min(4 * width, width * 2**i) for i in range(1, n_down)]
        layers = [conv_bn_relu(3, chans[0], stride=2)]
        for cin, cout in zip(chans, chans[1:]):
            layers += [conv_bn_relu(cin, cout, stride=2), conv_bn_relu(cout, cout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(chans[-1], 1, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        # Start at "mostly clean" (sigmoid ≈ 0.1): most blocks of most chips are, and a 0.5 start spends the
        # first epoch unlearning false alarms.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.constant_(self.head.bias, -2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 127.5 - 1.0
        y = self.head(self.body(x))
        return F.adaptive_avg_pool2d(y, self.grid).squeeze(1)


# ----------------------------------------------------------------------------------------- images


def check_chips(chips: np.ndarray) -> np.ndarray:
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[-1] != 3:
        raise BadInputError(f"chips must be N×H×W×3 RGB, got shape {chips.shape}")
    if chips.dtype != np.uint8:
        raise BadInputError(f"chips must be uint8, got {chips.dtype}")
    return chips


def resize_chips(chips: np.ndarray, size: tuple[int, int], batch: int = 1024) -> np.ndarray:
    """uint8 N×H×W×3 → uint8 N×h×w×3, antialiased bilinear (no aliasing when shrinking).

    Training and prediction both go through here, so the detector sees the same pixels either way. Torch
    resizes uint8 channels-last batches directly (an N×H×W×3 array viewed as N×3×H×W is exactly that),
    2–3× faster than a per-chip ``cv2.resize(INTER_AREA)`` loop.
    """
    h, w = size
    if chips.shape[1:3] == (h, w):
        return np.ascontiguousarray(chips)
    out = np.empty((len(chips), h, w, 3), np.uint8)
    for a in range(0, len(chips), batch):
        x = torch.from_numpy(np.ascontiguousarray(chips[a : a + batch])).permute(0, 3, 1, 2)
        y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out[a : a + len(x)] = y.permute(0, 2, 3, 1).numpy()
    return out


def fuse_for_inference(net: DetectorNet) -> DetectorNet:
    """An eval copy with each BatchNorm folded into its conv, in channels-last layout (≈1.5–2× faster on CPU)."""
    fused = copy.deepcopy(net).eval()
    for m in fused.modules():
        if isinstance(m, nn.Sequential) and len(m) > 1 and isinstance(m[0], nn.Conv2d) \
                and isinstance(m[1], nn.BatchNorm2d):
            m[0] = fuse_conv_bn_eval(m[0], m[1])
            m[1] = nn.Identity()
    return fused.to(memory_format=torch.channels_last)


def to_tensor(chips: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [0, 255] on ``device`` (the conversion happens there)."""
    return torch.from_numpy(chips).to(device).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------------- data


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
        with pairs_h5.open_pairs(p) as f:
            metas.append((Path(p), int(f.attrs["grid"]), str(f.attrs["template"]),
                          (int(f.attrs["height"]), int(f.attrs["width"])), int(f["label"].shape[0])))
    p0, grid, template, chip_size, _ = metas[0]
    for p, g, t, s, _ in metas[1:]:
        if (g, t, s) != (grid, template, chip_size):
            raise SchemaError(
                f"{p} has grid {g}, template {t} {s[0]}×{s[1]}; {p0} has grid {grid}, template {template} "
                f"{chip_size[0]}×{chip_size[1]}: a detector learns one layout"
            )
    return metas


def read_detector_data(paths: list[Path], input_size: tuple[int, int], progress=None) -> DetectorData:
    """Both halves of every pair, resized; each source image's clean chip once per file."""
    metas = pairs_layout(paths)
    _, grid, template, chip_size, _ = metas[0]
    total_rows = sum(m[4] for m in metas)
    if total_rows == 0:
        raise BadInputError("the pairs files hold no pairs")
    images, blocks, clean, kinds, sources = [], [], [], [], []
    done = 0
    for p, *_, n in metas:
        seen: set[str] = set()
        with pairs_h5.open_pairs(p) as f:
            src_all = read_strings(f["source"])
            kind_all = read_strings(f["kind"])
            for a in range(0, n, READ_CHUNK):
                b = min(n, a + READ_CHUNK)
                occluded, clean_rows = f["occluded"][a:b], f["clean"][a:b]  # slices: h5py fancy indexing is slow
                images.append(resize_chips(occluded, input_size))
                blocks.append(f["blocks"][a:b].astype(np.float32))
                clean.append(np.zeros(b - a, bool))
                kinds += kind_all[a:b]
                sources += src_all[a:b]
                # per_image > 1 repeats a clean chip; one negative per image keeps the clean images
                # equally weighted and the clean false-positive rate counted per image
                first = [i for i in range(a, b) if not (src_all[i] in seen or seen.add(src_all[i]))]
                if first:
                    images.append(resize_chips(clean_rows[np.array(first) - a], input_size))
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


def split_by_source(sources: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: a seeded ``val_fraction`` of the distinct source images."""
    names, inverse = np.unique(np.asarray(sources, dtype=object).astype(str), return_inverse=True)
    n_val = round(val_fraction * len(names))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(1, n_val), len(names) - 1)
    else:
        n_val = 0
    held = np.zeros(len(names), bool)
    held[np.random.default_rng([seed, 1]).permutation(len(names))[:n_val]] = True
    return held[inverse]


# ---------------------------------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------------------------------- detector


class OcclusionDetector:
    """A trained detector: chips in, per-block occupancy out."""

    def __init__(self, net: DetectorNet, *, template: str, chip_size: tuple[int, int], threshold: float = 0.5,
                 device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.net = net.to(self.device).eval()
        self.grid = net.grid
        self.input_size = net.input_size
        self.template = template
        self.chip_size = tuple(int(v) for v in chip_size)
        self.threshold = float(threshold)
        # what predict runs; ``net`` stays unfused so that ``save`` writes the trained parameters as they are
        self._fast = fuse_for_inference(self.net)

    # -- persistence
    def state(self, **extra) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": {
                "grid": self.grid,
                "template": self.template,
                "chip_size": list(self.chip_size),
                "input_size": list(self.input_size),
                "width": self.net.width,
                "threshold": self.threshold,
            },
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            **extra,
        }

    def save(self, path: str | os.PathLike, **extra) -> Path:
        """Write atomically; ``extra`` (plain values: training config, metrics) rides along."""
        return save_checkpoint(path, **self.state(**extra))

    @classmethod
    def load(cls, path: str | os.PathLike, gpu: int | None = None) -> OcclusionDetector:
        ck = load_checkpoint(path)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise SchemaError(f"{path} is not an occlusion detector checkpoint (format={ck.get('format')!r})")
        if ck.get("version") != CHECKPOINT_VERSION:
            raise SchemaError(f"{path} is detector checkpoint version {ck.get('version')!r}; "
                              f"this version reads {CHECKPOINT_VERSION}")
        try:
            c = ck["config"]
            net = DetectorNet(int(c["grid"]), tuple(c["input_size"]), int(c["width"]))
            net.load_state_dict(ck["state_dict"], strict=True)
            return cls(net, template=str(c["template"]), chip_size=tuple(c["chip_size"]),
                       threshold=float(c["threshold"]), device=resolve_device(gpu))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SchemaError(f"{path} is a damaged detector checkpoint: {first[:200]}") from None

    def check_for(self, template: str, grid: int | None = None, path="detector") -> None:
        """Refuse, before any work, a detector trained on another chip template or grid than the run uses."""
        if template != self.template:
            raise SchemaError(f"{path} was trained on {self.template} chips; the trunk needs {template} chips")
        if grid is not None and grid != self.grid:
            raise SchemaError(f"{path} predicts a {self.grid}×{self.grid} grid, the dictionary has a "
                              f"{grid}×{grid} grid")

    # -- inference
    def _check_layout(self, chips: np.ndarray, template: str | None) -> None:
        if template is not None and template != self.template:
            raise SchemaError(f"chips are {template} chips; this detector was trained on {self.template} chips")
        h, w = chips.shape[1:3]
        th, tw = self.chip_size
        # Resizing is fine (the grid is relative to the chip), distorting the face is not.
        if abs(math.log((h / w) / (th / tw))) > 0.02:
            raise SchemaError(f"chips are {h}×{w}; this detector was trained on {th}×{tw} {self.template} chips "
                              f"(another aspect ratio, so another alignment)")

    @torch.inference_mode()
    def predict(self, chips: np.ndarray, template: str | None = None, batch_size: int = 256) -> np.ndarray:
        """uint8 N×H×W×3 aligned chips → float32 N×K×K predicted occupancy (block j = r·K + c)."""
        chips = check_chips(chips)
        self._check_layout(chips, template)
        out = np.empty((len(chips), self.grid, self.grid), np.float32)
        for a in range(0, len(chips), batch_size):
            x = to_tensor(resize_chips(chips[a : a + batch_size], self.input_size), self.device)
            out[a : a + len(x)] = torch.sigmoid(self._fast(x)).float().cpu().numpy()
        return out

    def occluded_blocks(self, chips: np.ndarray, threshold: float | None = None,
                        template: str | None = None) -> np.ndarray:
        """bool N×K×K: predicted occupancy ≥ ``threshold`` (the one saved with the detector by default)."""
        t = self.threshold if threshold is None else float(threshold)
        if not 0.0 < t < 1.0:
            raise BadInputError(f"threshold must be in (0, 1), got {t}")
        return self.predict(chips, template) >= t


# ---------------------------------------------------------------------------------------- training


def validate(cfg: TrainDetectorConfig) -> None:
    if not cfg.pairs:
        raise BadInputError("give at least one pairs file")
    check_training_options(epochs=cfg.epochs, batch_size=cfg.batch_size, width=cfg.width, lr=cfg.lr,
                           val_fraction=cfg.val_fraction)
    if not 0.0 < cfg.threshold < 1.0:
        raise BadInputError(f"--threshold must be in (0, 1), got {cfg.threshold}")
    if len(cfg.input_size) != 2:
        raise BadInputError(f"--input-size must be H W, got {cfg.input_size}")
    for p in cfg.pairs:
        if not Path(p).is_file():
            raise BadInputError(f"no such pairs file: {p}")
    grid = pairs_layout([Path(p) for p in cfg.pairs])[0][1]
    if min(cfg.input_size) < 4 * grid:
        raise BadInputError(f"--input-size {cfg.input_size[0]}×{cfg.input_size[1]} is too small for a "
                            f"{grid}×{grid} grid (need ≥ {4 * grid} px a side)")
    check_writable(cfg.out)


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    y = torch.where(flip.view(-1, 1, 1).to(y.device), y.flip(2), y)
    # mild photometric jitter: real chips vary in exposure far more than a synthetic training set
    gain = (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)).to(x.device)
    bias = (40.0 * torch.rand(n, 1, 1, 1, generator=g) - 20.0).to(x.device)
    return (x * gain + bias).clamp_(0, 255), y


@torch.inference_mode()
def _predict_tensor(net: nn.Module, images: np.ndarray, device: torch.device, batch: int = 512) -> np.ndarray:
    net.eval()
    out = [torch.sigmoid(net(to_tensor(images[a : a + batch], device))).float().cpu().numpy()
           for a in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, net.grid, net.grid), np.float32)


def train_detector(cfg: TrainDetectorConfig, progress: Callable[[int, int], None] | None = None,
                   read_progress: Callable[[int, int], None] | None = None) -> dict:
    """Train on ``cfg.pairs``, save to ``cfg.out``; returns held-out block metrics and timings."""
    validate(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.gpu)
    seed_everything(cfg.seed)
    input_size = (int(cfg.input_size[0]), int(cfg.input_size[1]))
    data = read_detector_data([Path(p) for p in cfg.pairs], input_size, read_progress)
    t_read = time.perf_counter() - t0

    is_val = split_by_source(data.source, cfg.val_fraction, cfg.seed)
    train_idx = np.flatnonzero(~is_val)
    val_idx = np.flatnonzero(is_val)
    if len(train_idx) < 2:
        raise BadInputError(f"only {len(train_idx)} training chips after the split; make more pairs")

    torch.manual_seed(cfg.seed)
    # channels-last: the uint8 N×H×W×3 batches already are, and CPU convolutions run ~20% faster in it
    net = DetectorNet(data.grid, input_size, cfg.width).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(cfg.seed)

    # the whole (resized, uint8) training set lives on the device: at 80×80 that is 19 KB a chip
    images = torch.from_numpy(data.images).to(device)
    targets = torch.from_numpy(data.blocks).to(device)
    train_t = torch.from_numpy(train_idx)
    history, val_history = [], []
    step = 0
    t1 = time.perf_counter()
    for epoch in range(cfg.epochs):
        net.train()
        order = train_t[torch.randperm(len(train_t), generator=g)]
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)
            x = images[idx].permute(0, 3, 1, 2).float()
            y = targets[idx]
            if cfg.augment:
                x, y = _augment(x, y, g)
            loss = F.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            step += 1
            if progress:
                progress(step, total)
        epoch_loss = float(loss_sum) / len(order)
        if not math.isfinite(epoch_loss):
            raise JobFailed(f"training diverged at epoch {epoch + 1} (loss {epoch_loss}); try a lower --lr")
        history.append(epoch_loss)
        if len(val_idx):
            pred = _predict_tensor(net, data.images[val_idx], device)
            pv_t = torch.from_numpy(pred).clamp(1e-6, 1 - 1e-6)
            val_history.append(float(F.binary_cross_entropy(pv_t, torch.from_numpy(data.blocks[val_idx]))))
    t_train = time.perf_counter() - t1

    detector = OcclusionDetector(net, template=data.template, chip_size=data.chip_size,
                                 threshold=cfg.threshold, device=device)
    metrics = None
    if len(val_idx):  # ``pred``: the last epoch's predictions, i.e. the saved weights'
        metrics = block_metrics(pred, data.blocks[val_idx], data.clean[val_idx],
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
        "loss_history": history,
        "val_loss_history": val_history,
        "threshold": cfg.threshold,
        # held-out figures (None without a validation split)
        **{k: metrics[k] if metrics else None for k in ("precision", "recall", "f1", "clean_fpr", "clean_chip_fpr",
                                                        "occupancy_mae")},
        "per_kind": metrics["per_kind"] if metrics else {},
        "read_seconds": round(t_read, 3),
        "train_seconds": round(t_train, 3),
    }
    detector.save(cfg.out, train_config=cfg.plain(), metrics=summary)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary

