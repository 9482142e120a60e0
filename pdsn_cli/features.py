"""Batched trunk inference: chips → mask-point features → (masked) embeddings.

Everything that runs a trunk over many images goes through here, so batching, no-grad, device moves and
progress are written once.
"""

from __future__ import annotations

import numpy as np
import torch

from pdsn_cli.models.base import Trunk


def to_input(chips_u8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [0, 255] (the Trunk input convention)."""
    x = torch.from_numpy(np.ascontiguousarray(chips_u8)).to(device)
    return x.permute(0, 3, 1, 2).float()


@torch.no_grad()
def extract_features(trunk: Trunk, chips: np.ndarray, point: str | None = None, batch_size: int = 64,
                     device: torch.device | None = None, flip: bool = False, progress=None) -> np.ndarray:
    """Features at ``point`` for every chip, float32 N×C×H×W (``flip`` → also returns the mirrored chips'
    features stacked as a second array: (N, 2, C, H, W))."""
    device = device or torch.device("cpu")
    point = trunk.check_point(point)
    outs = []
    for a in range(0, len(chips), batch_size):
        x = to_input(chips[a:a + batch_size], device)
        f = trunk.features(x, point)
        if flip:
            f = torch.stack([f, trunk.features(torch.flip(x, dims=[3]), point)], dim=1)
        # NCHW whatever layout the trunk ran in (oneDNN may hand back channels-last), as the feature cache stores
        # them: downstream kernels round differently per layout, and a resumed train-block would not match
        outs.append(f.float().cpu().contiguous().numpy())
        if progress:
            progress(min(a + batch_size, len(chips)), len(chips))
    if not outs:
        c = trunk.feature_shape(point)
        return np.zeros((0, 2, *c) if flip else (0, *c), np.float32)
    return np.concatenate(outs)


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
        f = torch.from_numpy(np.ascontiguousarray(feats[a:a + batch_size])).to(device)
        if masks is not None:
            m = masks if masks.ndim == 3 else masks[a:a + batch_size]
            m = torch.from_numpy(np.ascontiguousarray(m)).to(device=device, dtype=f.dtype)
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
