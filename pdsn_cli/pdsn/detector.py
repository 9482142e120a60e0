"""The test-time occlusion detector: which K×K grid blocks of an aligned face chip are occluded.

PDSN picks its Feature Discarding Mask from the set of occluded blocks, and at test time nobody tells us
that set. This module holds the network and the inference class; ``pdsn_cli.train.detector`` learns it from
make-pairs data, where every occluded chip comes with the fraction of each block its occluder covers
(``blocks``), and every clean chip is a free negative (all blocks at 0).

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

Checkpoints are plain tensors and dicts (``torch.load(weights_only=True)``), written atomically.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["DetectorNet", "OcclusionDetector", "resize_chips"]

CHECKPOINT_FORMAT = "pdsn-occlusion-detector"
CHECKPOINT_VERSION = 1


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
