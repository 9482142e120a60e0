"""dlib's test-time jitter (``compute_face_descriptor(..., num_jitters=N)``), reproduced without dlib.

dlib describes a face by the mean of its raw descriptors over N randomly jittered copies of the chip
(``dlib::jitter_image``): rotation U(−3°, 3°), a crop of height (size − 6)/U(0.97, 0.99999) (a slight zoom),
a translation of ±2 % rounded to whole pixels, and a mirror with probability ½; the crop is resampled like
``extract_image_chip`` (bilinear, black where a neighbour falls outside, values truncated). The copies here match
dlib's within one grey level on ~0.1 % of pixels.

Each image draws its jitter from ``(seed, crc32(source))``: its descriptor does not depend on the batch, on the
other images of the run, or on resuming.
"""

from __future__ import annotations

import math
import zlib

import cv2
import numpy as np
import torch

from pdsn_cli.errors import BadInputError
from pdsn_cli.trunks.features import to_input

MAX_ROTATION_DEGREES = 3.0
MIN_OBJECT_HEIGHT, MAX_OBJECT_HEIGHT = 0.97, 0.99999
TRANSLATE = 0.02


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # dlib's vector<double> → point conversion


def jitter_params(rng: np.random.Generator, size: int):
    """One draw of dlib's jitter: crop rectangle (l, t, r, b) in chip pixels, angle (radians), mirror."""
    side = size - 6  # dlib shrinks the chip rectangle by 3 px on each side first
    tx = _round(rng.uniform(-TRANSLATE, TRANSLATE) * side)
    ty = _round(rng.uniform(-TRANSLATE, TRANSLATE) * side)
    box = int(side / rng.uniform(MIN_OBJECT_HEIGHT, MAX_OBJECT_HEIGHT))  # dlib truncates to long
    left, top = size // 2 + tx - box // 2, size // 2 + ty - box // 2
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    return (left, top, left + box - 1, top + box - 1), angle, rng.random() > 0.5


def extract_chip(img: np.ndarray, rect, angle: float, size: int) -> np.ndarray:
    """``dlib::extract_image_chip`` for a rotated rectangle: chip corners map onto the rectangle's corners
    rotated by ``angle`` about its centre."""
    l, t, r, b = map(float, rect)
    cx, cy = (l + r) / 2, (t + b) / 2
    c, s = math.cos(angle), math.sin(angle)

    def rot(x, y):
        return cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)

    m = cv2.getAffineTransform(np.float32([[0, 0], [size - 1, 0], [0, size - 1]]),
                               np.float32([rot(l, t), rot(r, t), rot(l, b)]))
    out = cv2.warpAffine(img.astype(np.float32), m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    g = np.arange(size, dtype=np.float64)
    sx = m[0, 0] * g[None, :] + m[0, 1] * g[:, None] + m[0, 2]
    sy = m[1, 0] * g[None, :] + m[1, 1] * g[:, None] + m[1, 2]
    h, w = img.shape[:2]
    out[~((sx >= 0) & (sy >= 0) & (np.floor(sx) + 1 < w) & (np.floor(sy) + 1 < h))] = 0
    return np.clip(np.floor(out + 1e-3), 0, 255).astype(np.uint8)


def jitter_views(chip: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` jittered copies (uint8 n×H×W×3) of a square chip; the chip itself is not among them (as in dlib)."""
    if chip.shape[0] != chip.shape[1]:
        raise BadInputError(f"dlib's jitter needs square chips, got {chip.shape[0]}×{chip.shape[1]}")
    out = np.empty((n, *chip.shape), np.uint8)
    for k in range(n):
        rect, angle, mirror = jitter_params(rng, chip.shape[0])
        v = extract_chip(chip, rect, angle, chip.shape[0])
        out[k] = v[:, ::-1] if mirror else v
    return out


def image_rng(seed: int, source: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(source.encode("utf-8", "surrogateescape"))])


@torch.no_grad()
def embed_jittered(trunk, chips: np.ndarray, sources: list[str], n: int, seed: int = 0, batch_size: int = 64,
                   device: torch.device | None = None, normalize: bool = True, progress=None) -> np.ndarray:
    """Mean of the trunk's raw embeddings over ``n`` jittered views of every chip (dlib's ``num_jitters``),
    then L2-normalised unless ``normalize`` is False (dlib compares the raw means by Euclidean distance)."""
    if n < 1:
        raise BadInputError(f"--jitter must be ≥ 1, got {n}")
    device = device or torch.device("cpu")
    per = max(1, batch_size // n)
    outs = []
    for a in range(0, len(chips), per):
        idx = range(a, min(a + per, len(chips)))
        views = np.concatenate([jitter_views(chips[i], n, image_rng(seed, sources[i])) for i in idx])
        e = trunk(to_input(views, device)).float().cpu().numpy()
        outs.append(e.reshape(len(idx), n, -1).mean(1))
        if progress:
            progress(idx[-1] + 1, len(chips))
    e = np.concatenate(outs) if outs else np.zeros((0, trunk.embedding_dim), np.float32)
    if normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e.astype(np.float32)
