"""PDSN's mask generators, their loss, and the mean masks the FDM dictionary is built from.

For grid block j, a mask generator reads |f(clean) − f(occluded)| at the trunk's mask point and outputs a
sigmoid mask M over the features (the paper's Conv3×3 → PReLU → BN → Sigmoid). The frozen trunk head embeds
M⊙f(clean) and M⊙f(occluded); the loss (:func:`pdsn_loss`) is

    0.5·CE(M⊙f(clean)) + 0.5·CE(M⊙f(occluded)) + λ·L1(M⊙f(occluded), M⊙f(clean))

with CosFace logits (s, m) against a frozen classifier. The K² generators of a grid run as one module (a grouped
convolution). After training, each block's masks over its pairs are min-max scaled and averaged
(:func:`mean_block_masks`): what ``build-dict`` binarises into the block's Feature Discarding Mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.errors import SchemaError
from pdsn_cli.trunks.checkpoint import load_checkpoint
from pdsn_cli.trunks.features import as_tensor

__all__ = ["MaskGenerators", "cosface_logits", "pdsn_loss", "mean_block_masks", "load_blocks_file", "CKPT_KIND"]

#: what a train-block output (generators + mean masks) says it is
CKPT_KIND = "pdsn-blocks"


class MaskGenerators(nn.Module):
    """``n`` independent mask generators over C×H×W features, run as one grouped convolution."""

    def __init__(self, n: int, channels: int):
        super().__init__()
        self.n, self.c = n, channels
        self.conv = nn.Conv2d(n * channels, n * channels, 3, padding=1, bias=False, groups=n)
        self.prelu = nn.PReLU(n * channels)
        self.bn = nn.BatchNorm2d(n * channels)

    def forward(self, diff: torch.Tensor) -> torch.Tensor:
        """diff: n×B×C×H×W → masks n×B×C×H×W in (0, 1)."""
        n, b, c, h, w = diff.shape
        x = diff.permute(1, 0, 2, 3, 4).reshape(b, n * c, h, w)
        del diff  # a copy was made: the caller's tensor can go before the layers' outputs are made
        m = torch.sigmoid(self.bn(self.prelu(self.conv(x))))
        return m.reshape(b, n, c, h, w).permute(1, 0, 2, 3, 4)


def cosface_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, m: float):
    cos = F.normalize(emb, dim=1) @ weight.t()
    return s * (cos - m * F.one_hot(labels, weight.shape[0]).to(cos.dtype))


def pdsn_loss(generators: nn.Module, clean: torch.Tensor, occluded: torch.Tensor,
              head: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, labels: torch.Tensor, *,
              s: float, m: float, lam: float, autocast=nullcontext):
    """The PDSN loss of n blocks' batches of pairs: clean, occluded n×B×C×H×W features, ``labels`` the n·B classes
    (rows of the frozen classifier ``weight``). Per-generator mean losses, summed, so that each generator's
    gradient does not depend on n. Returns (loss, per-block CE n, per-block L1 n); ``autocast`` wraps the
    generators and the head (mixed precision on CUDA)."""
    n, b, c, h, w = occluded.shape
    with autocast():
        masks = generators((clean - occluded).abs())
        mc, mo = masks * clean, masks * occluded
        ec = head(mc.reshape(-1, c, h, w))
        eo = head(mo.reshape(-1, c, h, w))
    ce = (F.cross_entropy(cosface_logits(ec.float(), weight, labels, s, m), labels, reduction="none")
          + F.cross_entropy(cosface_logits(eo.float(), weight, labels, s, m), labels, reduction="none")) * 0.5
    ce = ce.reshape(n, -1).mean(1)
    l1 = (mo.float() - mc.float()).abs().reshape(n, b, -1).mean(dim=(1, 2))
    return (ce + lam * l1).sum(), ce, l1


@torch.no_grad()
def mean_block_masks(gen: MaskGenerators, feats, blocks: list[int], device, batch: int = 64, procs=None):
    """Per block: the mean over its pairs (of every process) of the min-max scaled masks (n×C×H×W), and the
    fraction > 0.5. ``feats``: the pairs' features (``train.blocks.PairFeatures``); ``procs``: the processes of a
    distributed run, whose sums are added up.

    Every generator runs on its own block's pairs in the same step (the grouped convolution keeps them apart);
    blocks with fewer pairs cycle, and the repeats are left out of the mean."""
    gen.eval()
    c, h, w = feats.clean.shape[1:]
    rows = [np.flatnonzero(feats.target == j) for j in blocks]
    batch = min(batch, max(len(r) for r in rows))  # a batch longer than every block would only cycle repeats
    steps = math.ceil(max(len(r) for r in rows) / batch)
    fc_all, fo_all = as_tensor(feats.clean, device), as_tensor(feats.occluded, device)
    cidx = torch.from_numpy(feats.clean_index).to(device)
    out = torch.zeros(len(blocks), c * h * w, dtype=torch.float64, device=device)
    for s in range(steps):
        pos = np.arange(s * batch, (s + 1) * batch)
        it = torch.from_numpy(np.stack([r[pos % len(r)] for r in rows])).to(device)
        valid = torch.from_numpy(np.stack([pos < len(r) for r in rows])).to(device)
        # in place where the values allow (the same arithmetic): a step of 25 blocks × 64 pairs is 52 MB per
        # temporary at dlib-resnet's level2; this pass set train-block's peak memory (batch 256: +0.75 GB on LFW)
        diff = fc_all[cidx[it]].float()
        diff = (diff.sub_(fo_all[it]) if diff.dtype == fo_all.dtype else diff - fo_all[it].float()).abs_()
        m = gen(diff)
        del diff
        m = m.reshape(len(blocks), batch, -1)
        lo, hi = m.min(2, keepdim=True).values, m.max(2, keepdim=True).values
        m = m.sub_(lo).div_((hi - lo).clamp_min(1e-12))
        out += m.mul_(valid[..., None]).sum(1).double()
    count = torch.tensor([len(r) for r in rows], device=device, dtype=torch.float64)
    if procs is not None:
        out, count = procs.all_sum(out), procs.all_sum(count)
    out = (out / count[:, None]).cpu().numpy()
    out = out.reshape(len(blocks), c, h, w)
    return out.astype(np.float32), (out > 0.5).mean(axis=(1, 2, 3))


def load_blocks_file(path: Path) -> dict:
    """A train-block output (or its epoch checkpoint), loaded without executing code (weights_only)."""
    if not Path(path).is_file():
        raise SchemaError(f"no such file: {path}")
    try:
        st = load_checkpoint(path)
    except SchemaError as e:  # one message for every refused file, naming what it would run, never torch's advice
        raise SchemaError(f"not a loadable train-block checkpoint: {e}") from None
    if not isinstance(st, dict) or st.get("kind") != CKPT_KIND:
        raise SchemaError(f"{path} is not a train-block checkpoint")
    return st
