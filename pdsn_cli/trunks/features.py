"""Batched trunk inference: chips → mask-point features → (masked) embeddings.

Everything that runs a trunk over many images goes through here, so batching, no-grad, device moves and
progress are written once.
"""

from __future__ import annotations

import numpy as np
import torch

from pdsn_cli.accel import FastForward, compile_wanted, use_bf16
from pdsn_cli.trunks.base import Trunk


def to_input(chips_u8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [0, 255] (the Trunk input convention)."""
    x = torch.from_numpy(np.ascontiguousarray(chips_u8)).to(device)
    return x.permute(0, 3, 1, 2).float()


def as_tensor(a, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy or torch → tensor on ``device`` (no copy when it is there already)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)


def fast_forward(trunk: Trunk, device: torch.device, precision: str = "bf16", compile: str = "auto",
                 images: int = 0, batch_size: int = 64) -> FastForward:
    """One FastForward per (trunk, device, settings), kept on the trunk so that a compiled graph is reused."""
    cache = trunk.__dict__.setdefault("_pdsn_fast", {})
    key = (str(device), use_bf16(device, precision), compile_wanted(device, compile, images), batch_size)
    if key not in cache:
        cache[key] = FastForward(trunk, device, precision, compile, images, batch_size)
    return cache[key]


@torch.no_grad()
def extract_features(trunk: Trunk, chips, point: str | None = None, batch_size: int = 64,
                     device: torch.device | None = None, flip: bool = False, progress=None,
                     precision: str = "bf16", compile: str = "auto", on_device: bool = False,
                     dtype: torch.dtype = torch.float32, out=None):
    """Features at ``point`` for every chip, float32 N×C×H×W (``flip`` → also returns the mirrored chips'
    features stacked as a second array: (N, 2, C, H, W)).

    ``chips``: anything sliceable to uint8 N×H×W×3 arrays (numpy, or rows read lazily from HDF5).
    ``on_device``: return a tensor of ``dtype`` that stays on ``device`` (PDSN training keeps its feature cache
    in GPU memory) instead of a numpy array. ``out``: a float32 array of the result's shape to fill and return
    instead (a memory-mapped file: features of more chips than fit in memory). bf16 / compile apply on CUDA only
    (pdsn_cli.accel).
    """
    device = device or torch.device("cpu")
    point = trunk.check_point(point)
    n = len(chips)
    shape = (n, 2, *trunk.feature_shape(point)) if flip else (n, *trunk.feature_shape(point))
    if out is not None:
        if on_device or tuple(out.shape) != shape:
            raise ValueError(f"out must be a host array of shape {shape}")
    else:
        out = torch.empty(shape, dtype=dtype, device=device) if on_device else np.empty(shape, np.float32)
    ff = fast_forward(trunk, device, precision, compile, n * (2 if flip else 1), batch_size)
    for a in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(chips[a:a + batch_size])).to(device, non_blocking=True)
        f = ff(x, point)
        if flip:
            f = torch.stack([f, ff(torch.flip(x, dims=[2]), point)], dim=1)
        # NCHW whatever layout the trunk ran in (oneDNN / channels_last hand back NHWC strides), as the feature
        # cache stores them: downstream kernels round differently per layout, and a resumed train-block would
        # not match
        if on_device:
            out[a:a + len(x)] = f
        else:
            out[a:a + len(x)] = f.cpu().contiguous().numpy()
        if progress:
            progress(min(a + batch_size, n), n)
    return out


@torch.no_grad()
def embed_features(trunk: Trunk, feats: np.ndarray, point: str | None = None, masks: np.ndarray | None = None,
                   batch_size: int = 256, device: torch.device | None = None, normalize: bool = True) -> np.ndarray:
    """Run the head on (optionally masked) features; ``masks`` broadcast against ``feats`` (N×C×H×W or C×H×W).

    Features with a flip axis (N×2×C×H×W) are embedded per view and summed, dlib's test-time flip.
    """
    device = device or torch.device("cpu")
    point = trunk.check_point(point)
    outs = []
    for a in range(0, len(feats), batch_size):
        f = as_tensor(feats[a:a + batch_size], device, torch.float32)
        if masks is not None:
            m = masks if masks.ndim == 3 else masks[a:a + batch_size]
            m = as_tensor(m, device, f.dtype)
            if f.ndim == 5 and m.ndim == 4:
                m = m[:, None]
            f = f * m
        if f.ndim == 5:
            n, v = f.shape[:2]
            e = trunk.head(f.reshape(n * v, *f.shape[2:]), point).reshape(n, v, -1).sum(1)
        else:
            e = trunk.head(f, point)
        outs.append(e.float().cpu().numpy())
    e = np.concatenate(outs) if outs else np.zeros((0, trunk.embedding_dim), np.float32)
    if normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e.astype(np.float32)
