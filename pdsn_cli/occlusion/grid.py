"""The K×K grid PDSN masks by: block rectangles, per-block occupancy of an occlusion mask, and the
:class:`Occlusion` every occluder returns."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from pdsn_cli.errors import BadInputError


@dataclass
class Occlusion:
    """An occluded chip: ``mask`` is exactly the set of pixels replaced; ``blocks`` its K×K occupancy."""

    image: np.ndarray
    mask: np.ndarray
    blocks: np.ndarray
    kind: str


@functools.lru_cache(maxsize=64)
def _edges(n: int, grid: int) -> np.ndarray:
    e = np.linspace(0, n, grid + 1).round().astype(np.int64)
    e.flags.writeable = False
    return e


def check_grid(h: int, w: int, grid: int) -> None:
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise BadInputError(f"grid must be a positive integer, got {grid!r}")
    if grid > min(h, w):
        raise BadInputError(f"grid {grid}×{grid} is finer than the {h}×{w} image")


def block_bounds(h: int, w: int, grid: int, j: int) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(y0, y1, x0, x1)`` of grid block ``j`` (row-major, ``j = r*grid + c``)."""
    check_grid(h, w, grid)
    if not isinstance(j, (int, np.integer)) or not 0 <= j < grid * grid:
        raise BadInputError(f"block {j!r} is outside the {grid}×{grid} grid (0..{grid * grid - 1})")
    r, c = divmod(int(j), grid)
    ye, xe = _edges(h, grid), _edges(w, grid)
    return int(ye[r]), int(ye[r + 1]), int(xe[c]), int(xe[c + 1])


def block_occupancy(mask: np.ndarray, grid: int) -> np.ndarray:
    """Fraction of each of the ``grid×grid`` blocks covered by ``mask`` (bool H×W), float32 K×K."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BadInputError(f"mask must be H×W, got shape {mask.shape}")
    h, w = mask.shape
    check_grid(h, w, grid)
    # integral image: every block sum is four lookups
    m8 = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    ii = cv2.integral(np.ascontiguousarray(m8))
    ye, xe = _edges(h, grid), _edges(w, grid)
    s = ii[ye][:, xe]
    sums = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]
    return (sums / _areas(h, w, grid)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _areas(h: int, w: int, grid: int) -> np.ndarray:
    a = np.outer(np.diff(_edges(h, grid)), np.diff(_edges(w, grid))).astype(np.float64)
    a.flags.writeable = False
    return a

