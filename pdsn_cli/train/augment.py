"""Photometric augmentation shared by the trainers that see chips (train-detector, finetune --faces).

Real photos vary in exposure far more than a synthetic training set, and some are unlike any training chip:
greyscale, or faces a few dozen pixels wide (AR's 55×40 images, surveillance frames) upsampled to the chip.
The caller draws the random values (from its own generator, so that a resumed run draws the same ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expose(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x·gain + bias, clamped to [0, 255]; ``gain``, ``bias``: one per image (N×1×1×1)."""
    return (x * gain.to(x.device) + bias.to(x.device)).clamp_(0, 255)


def degrade(x: torch.Tensor, grey: torch.Tensor, low: torch.Tensor, side: int) -> torch.Tensor:
    """Images flagged ``grey`` (bool N) turned greyscale; those flagged ``low`` downscaled so that their height is
    ``side`` pixels (area) and upsampled back (bilinear). x: float N×3×H×W in [0, 255]."""
    grey, low = grey.view(-1, 1, 1, 1).to(x.device), low.view(-1, 1, 1, 1).to(x.device)
    x = torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)
    h, w = x.shape[2:]
    small = F.interpolate(F.interpolate(x, size=(side, side * w // h), mode="area"), size=(h, w),
                          mode="bilinear", align_corners=False)
    return torch.where(low, small, x)
