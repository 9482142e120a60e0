"""Occlusion synthesis: paste an occluder onto an aligned face chip and say exactly which pixels it replaced.

Every call returns the occluded image, the *pixel mask* of the replaced pixels and the K×K *block occupancy*
(the fraction of each grid block the occluder covers), which is what PDSN's per-block mask generators learn
from. Kinds:

- ``block``: one grid block (given or drawn), filled with a patch cut from another occluder (cloth, skin,
  plastic, paper, lens), never a flat square;
- anatomical, placed from the landmarks: ``sunglasses``, ``eyeglasses``, ``scarf`` (from below the nose
  down), ``mask`` (surgical, from the nose bridge to the chin);
- objects at random positions over the face: ``hand``, ``phone``, ``cup``, ``book``;
- ``random``: one of the above, drawn from the same generator.

How it stays fast and exact: each kind has a bank of sprites (RGBA, drawn once per process with a fixed seed
in *face units*, 1 unit = the inter-ocular distance). A call picks a sprite, builds one affine map from the
landmarks plus random scale/rotation/flip/offset, warps the sprite onto the chip, thresholds its alpha at
one half (binary alpha), recolours it (channel gains and a shading gradient) and copies it in. So the mask is
exactly the set of pixels written, and everything random comes from the caller's ``rng``.

Eyeglasses: the frame replaces pixels; the lenses are tinted glass (the face shows through with a faint tint
and glare streaks). Tinted lens pixels do change, so they count as occluded: the eyeglasses mask is frame +
lenses, and the eye blocks read as partly occluded rather than clean.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.errors import BadInputError

__all__ = [
    "OCCLUDERS",
    "Occlusion",
    "block_bounds",
    "block_occupancy",
    "occlude",
    "contact_sheet",
    "render_sprite",
    "write_assets",
    "prepare",
]

OCCLUDERS = ("block", "sunglasses", "eyeglasses", "scarf", "mask", "hand", "phone", "cup", "book", "square", "random")
#: what ``random`` draws from: ``square`` (a benchmark occluder, black 2×2 blocks) stays out, so seeded random
#: pair files keep the mix they had before it existed
RANDOM_KINDS = ("block", "sunglasses", "eyeglasses", "scarf", "mask", "hand", "phone", "cup", "book")
ANATOMICAL = ("sunglasses", "eyeglasses", "scarf", "mask")
OBJECTS = ("hand", "phone", "cup", "book")
SPRITE_KINDS = ANATOMICAL + OBJECTS

# canonical landmark geometry in face units (eye midpoint at the origin, inter-ocular distance 1, y down);
# the mouth height is the ArcFace template's (1.15 inter-ocular distances below the eyes)
_MOUTH_V = 1.15

_S = 40  # sprite resolution: pixels per face unit
_BANK_SIZE = 12  # sprites per kind
_BANK_SEED = 20190927
_SHIFT = 4
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


@dataclass
class Occlusion:
    """An occluded chip: ``mask`` is exactly the set of pixels replaced; ``blocks`` its K×K occupancy."""

    image: np.ndarray
    mask: np.ndarray
    blocks: np.ndarray
    kind: str


# --------------------------------------------------------------------------------------------------------
# the grid


@functools.lru_cache(maxsize=64)
def _edges(n: int, grid: int) -> np.ndarray:
    e = np.linspace(0, n, grid + 1).round().astype(np.int64)
    e.flags.writeable = False
    return e


def _check_grid(h: int, w: int, grid: int) -> None:
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise BadInputError(f"grid must be a positive integer, got {grid!r}")
    if grid > min(h, w):
        raise BadInputError(f"grid {grid}×{grid} is finer than the {h}×{w} image")


def block_bounds(h: int, w: int, grid: int, j: int) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(y0, y1, x0, x1)`` of grid block ``j`` (row-major, ``j = r*grid + c``)."""
    _check_grid(h, w, grid)
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
    _check_grid(h, w, grid)
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


# --------------------------------------------------------------------------------------------------------
# sprite drawing (done once per process, in face units)


@dataclass
class _Sprite:
    rgba: np.ndarray  # h×w×4 uint8, colours bled past the silhouette so warping leaves no dark fringe
    opacity: np.ndarray | None  # h×w uint8 for see-through parts (eyeglass lenses); None = all opaque
    anchor: tuple[float, float]  # sprite pixel that lands on the placement point
    crops: dict[int, np.ndarray]  # window size → top-left corners of fully opaque windows (for `block`)


class _Pen:
    """Draws polygons given in face units onto an RGBA canvas covering ``[x0, x1] × [y0, y1]``."""

    def __init__(self, x0: float, y0: float, x1: float, y1: float, s: int = _S):
        self.s, self.x0, self.y0 = s, x0, y0
        w, h = int(math.ceil((x1 - x0) * s)), int(math.ceil((y1 - y0) * s))
        self.rgb = np.zeros((h, w, 3), np.uint8)
        self.alpha = np.zeros((h, w), np.uint8)
        self.op: np.ndarray | None = None
        self._u = (np.arange(w, dtype=np.float32) + 0.5) / s + x0
        self._v = (np.arange(h, dtype=np.float32) + 0.5) / s + y0

    def _p(self, pts) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return np.round((pts - (self.x0, self.y0)) * self.s * _ONE).astype(np.int32)

    def px(self, u: float, v: float) -> tuple[float, float]:
        return (u - self.x0) * self.s, (v - self.y0) * self.s

    def fill(self, pts, color, solid: bool = True, opacity: float | None = None) -> None:
        p = self._p(pts)
        cv2.fillPoly(self.rgb, [p], _col(color), _AA, _SHIFT)
        if solid:
            cv2.fillPoly(self.alpha, [p], 255, _AA, _SHIFT)
        if opacity is not None:
            self._opacity()
            cv2.fillPoly(self.op, [p], float(opacity * 255), _AA, _SHIFT)

    def line(self, pts, color, width: float, closed: bool = False, solid: bool = True, opacity=None) -> None:
        p = self._p(pts)
        th = max(1, int(round(width * self.s)))
        cv2.polylines(self.rgb, [p], closed, _col(color), th, _AA, _SHIFT)
        if solid:
            cv2.polylines(self.alpha, [p], closed, 255, th, _AA, _SHIFT)
        if opacity is not None:
            self._opacity()
            cv2.polylines(self.op, [p], closed, float(opacity * 255), th, _AA, _SHIFT)

    def _opacity(self) -> None:
        if self.op is None:
            self.op = np.full(self.alpha.shape, 255, np.uint8)

    def region(self, pts) -> np.ndarray:
        m = np.zeros(self.alpha.shape, np.uint8)
        cv2.fillPoly(m, [self._p(pts)], 255, _AA, _SHIFT)
        return m.astype(np.float32) / 255

    def shade(self, pts, fn) -> None:
        """Multiply the colours inside ``pts`` by ``fn(u, v)`` (u, v face-unit grids), feathered at the edge."""
        w = self.region(pts) if pts is not None else np.ones(self.alpha.shape, np.float32)
        f = np.asarray(fn(self._u[None, :], self._v[:, None]), np.float32)
        f = 1 + (np.broadcast_to(f, w.shape) - 1) * w
        self.rgb = np.clip(self.rgb * f[..., None], 0, 255).astype(np.uint8)

    def pattern(self, pts, img: np.ndarray) -> None:
        """Paint a full-canvas texture inside ``pts``."""
        w = self.region(pts)[..., None]
        self.rgb = (self.rgb * (1 - w) + img * w).astype(np.uint8)
        cv2.fillPoly(self.alpha, [self._p(pts)], 255, _AA, _SHIFT)

    def sprite(self, anchor_uv: tuple[float, float] = (0.0, 0.0)) -> _Sprite:
        return _finish(self.rgb, self.alpha, self.op, self.px(*anchor_uv))


def _col(c) -> tuple:
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def _shade(c, f) -> np.ndarray:
    return np.clip(np.asarray(c, np.float32) * f, 0, 255)


def _ellipse(cx, cy, ax, ay, t0=0.0, t1=2 * np.pi, n=40) -> np.ndarray:
    t = np.linspace(t0, t1, n, endpoint=(t1 - t0) < 2 * np.pi - 1e-9)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)


def _rrect(x0, y0, x1, y1, r, n=8) -> np.ndarray:
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    out = []
    corners = ((x1 - r, y0 + r, -np.pi / 2), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, np.pi / 2), (x0 + r, y0 + r, np.pi))
    for cx, cy, a0 in corners:
        t = np.linspace(a0, a0 + np.pi / 2, n)
        out.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1))
    return np.concatenate(out)


def _capsule(p0, p1, w, n=10) -> np.ndarray:
    """A finger: segment p0→p1 of width w with a round end at p1 (flat at p0)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    d /= np.linalg.norm(d)
    nrm = np.array([-d[1], d[0]]) * w / 2
    a = math.atan2(nrm[1], nrm[0])
    t = np.linspace(a, a - np.pi, n)
    tip = p1 + np.stack([np.cos(t), np.sin(t)], 1) * w / 2
    return np.concatenate([[p0 + nrm], tip, [p0 - nrm]])


def _finish(rgb, alpha, op, anchor) -> _Sprite:
    a = alpha.astype(np.float32) / 255
    col = rgb.astype(np.float32)
    # edge pixels were blended with the empty (black) canvas: un-premultiply them, then bleed colour outwards
    part = (a > 0) & (a < 1)
    col[part] = np.clip(col[part] / a[part, None], 0, 255)
    known = (a > 0).astype(np.float32)
    for _ in range(3):
        num = cv2.blur(col * known[..., None], (5, 5))
        den = cv2.blur(known, (5, 5))
        grow = (known == 0) & (den > 0)
        col[grow] = num[grow] / den[grow, None]
        known = np.maximum(known, grow.astype(np.float32))
    rgba = np.dstack([np.clip(col, 0, 255).astype(np.uint8), alpha])
    if op is not None:
        op = np.where(alpha > 0, op, 0).astype(np.uint8)
    # fully opaque windows, for cutting `block` patches out of this sprite
    solid = (alpha == 255).astype(np.uint8)
    if op is not None:
        solid &= (op == 255).astype(np.uint8)
    crops = {}
    for size in (12, 20, 28):
        if min(alpha.shape) <= size:
            continue
        ok = cv2.erode(solid, np.ones((size, size), np.uint8), anchor=(0, 0), borderValue=0)
        ys, xs = np.nonzero(ok[: -size + 1, : -size + 1])
        if len(ys):
            crops[size] = np.stack([ys, xs], 1).astype(np.int32)
    return _Sprite(rgba=rgba, opacity=op, anchor=anchor, crops=crops)


# ---- cloth patterns (scarves, sleeves) ----------------------------------------------------------------


def _palette(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    base = rng.uniform(20, 235, 3)
    out = [base]
    for _ in range(n - 1):
        c = base + rng.normal(0, 70, 3) if rng.random() < 0.6 else rng.uniform(20, 240, 3)
        out.append(np.clip(c, 0, 255))
    return out


def _cloth(pen: _Pen, rng: np.random.Generator) -> np.ndarray:
    """A full-canvas cloth texture: stripes, tartan, dots, knit or plain weave, with folds."""
    h, w = pen.alpha.shape
    u, v = pen._u[None, :], pen._v[:, None]
    cols = _palette(rng, 3)
    kind = rng.choice(["stripes", "tartan", "dots", "knit", "plain", "zigzag"])
    img = np.empty((h, w, 3), np.float32)
    img[:] = cols[0]
    ang = rng.uniform(-0.4, 0.4) if rng.random() < 0.6 else rng.uniform(0, np.pi)
    ru = u * math.cos(ang) + v * math.sin(ang)
    rv = -u * math.sin(ang) + v * math.cos(ang)
    if kind == "stripes":
        period = rng.uniform(0.15, 0.5)
        band = (np.mod(rv, period) < period * rng.uniform(0.3, 0.6)) * np.ones_like(ru)
        img = np.where(band[..., None] > 0, cols[1], img)
        thin = np.mod(rv + period * 0.8, period) < period * 0.08
        img = np.where((thin * np.ones_like(ru))[..., None] > 0, cols[2], img)
    elif kind == "tartan":
        p = rng.uniform(0.3, 0.6)
        a1 = (np.mod(ru, p) < p * 0.35).astype(np.float32)
        a2 = (np.mod(rv, p) < p * 0.35).astype(np.float32)
        t1 = (np.mod(ru + p * 0.6, p) < p * 0.06).astype(np.float32)
        t2 = (np.mod(rv + p * 0.6, p) < p * 0.06).astype(np.float32)
        mix = (a1 + a2)[..., None] * 0.35
        img = img * (1 - mix) + np.asarray(cols[1]) * mix
        thin = np.clip(t1 + t2, 0, 1)[..., None]
        img = img * (1 - thin) + np.asarray(cols[2]) * thin
    elif kind == "dots":
        p = rng.uniform(0.15, 0.3)
        du = np.mod(ru, p) - p / 2
        dv = np.mod(rv + (np.floor(ru / p) % 2) * p / 2, p) - p / 2
        dot = (du**2 + dv**2) < (p * rng.uniform(0.2, 0.35)) ** 2
        img = np.where(dot[..., None], cols[1], img)
    elif kind == "knit":
        p = rng.uniform(0.07, 0.12)
        col_idx = np.floor(u / p)
        vv = v + np.abs(np.mod(u, p) - p / 2) * 1.2
        rib = np.sin(vv / p * 2 * np.pi) * 0.5 + 0.5
        img = img * (0.8 + 0.25 * rib[..., None])
        img = img * (0.9 + 0.1 * (col_idx % 2)[..., None] * np.ones_like(v)[..., None])
        if rng.random() < 0.5:
            band = (np.mod(v, 0.9) < 0.18) * np.ones_like(u)
            img = np.where(band[..., None] > 0, np.asarray(cols[1]) * (0.8 + 0.25 * rib[..., None]), img)
    elif kind == "zigzag":
        p = rng.uniform(0.2, 0.4)
        z = rv + np.abs(np.mod(ru, p) - p / 2)
        band = np.mod(z, p) < p * 0.45
        img = np.where(band[..., None], cols[1], img)
    # weave grain + folds: soft sinusoidal shading bands, slightly curved like draped cloth
    grain = 0.96 + 0.04 * np.sin(u * 190) * np.sin(v * 170)
    k = rng.uniform(2.5, 5.0)
    phase = rng.uniform(0, 2 * np.pi)
    fold = 1 + rng.uniform(0.12, 0.25) * np.sin(k * 2 * np.pi * (v + 0.12 * u**2) / 2.0 + phase)
    img = img * (grain * fold)[..., None]
    return np.clip(img, 0, 255)


# ---- the sprites --------------------------------------------------------------------------------------

_DARK_FRAMES = [(20, 20, 22), (45, 30, 20), (95, 60, 30), (60, 60, 65), (120, 20, 30), (15, 25, 60)]
_METAL = [(205, 175, 95), (190, 190, 195), (150, 120, 80)]


def _lens_shape(style: str, cx: float, cy: float, a: float, b: float, side: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    if style == "round":
        return np.stack([cx + a * c, cy + b * 1.1 * s], 1)
    if style == "aviator":  # teardrop: a deeper lower half that bulges outwards
        y = np.where(s > 0, b * 1.25 * s, b * 0.85 * s)
        x = a * c * np.where(s > 0, 1 - 0.15 * s, 1.0) + side * 0.08 * np.maximum(s, 0) * (c * side > 0)
        return np.stack([cx + x, cy + y], 1)
    if style == "cateye":  # outer top corners raised
        x = a * np.sign(c) * np.abs(c) ** 0.7
        y = b * np.sign(s) * np.abs(s) ** 0.8 - 0.12 * b * np.maximum(-s, 0) * np.maximum(c * side, 0) * 2
        return np.stack([cx + x, cy + y], 1)
    # wayfarer / rectangle: a rounded trapezoid, wider at the top
    x = a * np.sign(c) * np.abs(c) ** 0.35 * np.where(s > 0, 0.88, 1.0)
    y = b * np.sign(s) * np.abs(s) ** 0.45
    return np.stack([cx + x, cy + y], 1)


def _sunglasses(rng: np.random.Generator) -> _Sprite:
    pen = _Pen(-1.5, -0.6, 1.5, 0.55)
    style = rng.choice(["wayfarer", "aviator", "round", "cateye", "sport"])
    frames = _METAL if style == "aviator" else _DARK_FRAMES
    frame = np.asarray(frames[rng.integers(len(frames))], float)
    lenses = [(22, 22, 26), (30, 42, 32), (55, 38, 25), (35, 50, 90), (70, 30, 40)]
    lens_col = np.asarray(lenses[rng.integers(len(lenses))], float)
    mirror = rng.random() < 0.25
    a, b = rng.uniform(0.33, 0.4), rng.uniform(0.23, 0.3)
    if style == "aviator":
        b *= 1.05
    fw = rng.uniform(0.035, 0.06) if style != "aviator" else 0.025
    top = -b * 0.9
    # temples: from the outer top corner towards the ears
    for side in (-1, 1):
        pen.line([[side * (0.5 + a * 0.9), top + 0.03], [side * 1.12, top + 0.06]], frame, fw * 0.9)
    if style == "sport":
        shape = np.concatenate([
            _ellipse(0, 0.02, 0.92, b * 1.15, np.pi, 2 * np.pi, 30),
            [[0.92, 0.05], [0.7, 0.26], [0.25, 0.3], [0.1, 0.16]],
            [[-0.1, 0.16], [-0.25, 0.3], [-0.7, 0.26], [-0.92, 0.05]],
        ])
        shapes = [shape]
    else:
        shapes = [_lens_shape(style, side * 0.5, 0.02, a, b, side) for side in (-1, 1)]
        bridge_y = top + 0.08 if style != "aviator" else top + 0.05
        pen.line(_ellipse(0, bridge_y + 0.1, 0.5 - a * 0.92, 0.08, np.pi * 1.1, np.pi * 1.9, 10), frame, fw * 1.1)
        if style == "aviator":  # the double bridge
            pen.line([[-0.5 + a * 0.8, top + 0.02], [0.5 - a * 0.8, top + 0.02]], frame, fw)
    for sh in shapes:
        pen.fill(sh, lens_col)
        # darker at the top (gradient tint), a diagonal glare band, a mirror sheen
        pen.shade(sh, lambda u, v: 0.75 + 0.9 * np.clip(v + 0.25, 0, 0.5))
        gl = 1.7 if mirror else 1.35
        pen.shade(sh, lambda u, v, gl=gl: np.where(np.abs((u * 0.8 + v) % 0.9 - 0.35) < 0.06, gl, 1.0))
        if mirror:
            pen.shade(sh, lambda u, v: 1.0 + 0.8 * np.exp(-((v + 0.05) ** 2) / 0.01))
        pen.line(sh, frame, fw, closed=True)
    return pen.sprite()


def _eyeglasses(rng: np.random.Generator) -> _Sprite:
    pen = _Pen(-1.5, -0.6, 1.5, 0.55)
    style = rng.choice(["wayfarer", "round", "cateye", "rect", "rimless"])
    metal = rng.random() < 0.4
    frames = _METAL if metal else _DARK_FRAMES
    frame = np.asarray(frames[rng.integers(len(frames))], float)
    fw = rng.uniform(0.018, 0.03) if metal else rng.uniform(0.03, 0.05)
    a, b = rng.uniform(0.29, 0.36), rng.uniform(0.17, 0.24)
    tint = np.asarray(rng.choice([(225, 232, 240), (235, 225, 205), (215, 235, 225), (240, 240, 240)]), float)
    t = rng.uniform(0.12, 0.2)
    top = -b * 0.95
    for side in (-1, 1):
        pen.line([[side * (0.5 + a * 0.95), top + 0.04], [side * 1.12, top + 0.07]], frame, fw)
    lens_style = "wayfarer" if style in ("rect", "rimless") else style
    for side in (-1, 1):
        sh = _lens_shape(lens_style, side * 0.5, 0.02, a, b * (0.8 if style == "rect" else 1.0), side)
        pen.fill(sh, tint, opacity=t)
        # two glare streaks across each lens, brighter and more opaque
        for off, wdt in ((-0.1, 0.04), (0.04, 0.02)):
            x0 = side * 0.5 + off
            streak = np.array([[x0 - 0.1, -0.1], [x0 - 0.1 + wdt, -0.1], [x0 + 0.1 + wdt, 0.14], [x0 + 0.1, 0.14]])
            pen.fill(streak, (250, 250, 250), solid=False, opacity=t + 0.15)
        # keep the streak inside the lens: redo the outside of the lens as fully transparent
        if style != "rimless":
            pen.line(sh, frame, fw, closed=True, opacity=1.0)
        else:
            pen.line(sh[sh[:, 1] < -0.05], frame, fw, opacity=1.0)
    pen.line(_ellipse(0, top + 0.15, 0.5 - a * 0.95, 0.07, np.pi * 1.1, np.pi * 1.9, 10), frame, fw, opacity=1.0)
    # nose pads for metal frames
    if metal:
        for side in (-1, 1):
            pen.fill(_ellipse(side * 0.13, 0.12, 0.03, 0.05), (215, 215, 210), opacity=0.8)
    # opacity outside the drawn parts must not exceed what the alpha allows
    pen.op = np.where(pen.alpha > 0, pen.op, 0).astype(np.uint8)
    return pen.sprite()


def _scarf(rng: np.random.Generator) -> _Sprite:
    # anchor (0, 0) = the middle of the top edge; the scarf hangs down past the bottom of any chip
    pen = _Pen(-1.8, -0.25, 1.8, 2.8)
    u = np.linspace(-1.7, 1.7, 40)
    wave = rng.uniform(0.02, 0.05) * np.sin(u * rng.uniform(5, 9) + rng.uniform(0, 6))
    top = 0.1 * (u / 1.7) ** 2 + wave
    shape = np.concatenate([np.stack([u, top], 1), [[1.75, 2.8], [-1.75, 2.8]]])
    tex = _cloth(pen, rng)
    pen.pattern(shape, tex)
    # a rolled hem along the top edge and drape shadows falling from it
    hem = np.concatenate([np.stack([u, top], 1), np.stack([u, top + 0.12], 1)[::-1]])
    pen.shade(hem, lambda uu, vv: 1.12)
    pen.line(np.stack([u, top + 0.13], 1), _shade(tex.mean((0, 1)), 0.6), 0.025)
    for x in rng.uniform(-1.2, 1.2, 3):
        pen.shade(shape, lambda uu, vv, x=x: 1 - 0.18 * np.exp(-((uu - x - 0.15 * vv) ** 2) / 0.01) * (vv > 0.2))
    # the sides fold under the chin: darker towards the edges
    pen.shade(shape, lambda uu, vv: 1 - 0.25 * np.clip(np.abs(uu) - 0.9, 0, 1))
    return pen.sprite((0.0, 0.0))


def _surgical_mask(rng: np.random.Generator) -> _Sprite:
    # anchor (0, 0) = top centre of the mask on the nose bridge; the face units here are vertical-aware
    pen = _Pen(-1.35, -0.15, 1.35, 1.6)
    kind = rng.choice(["blue", "blue", "blue", "white", "black", "pink", "green"])
    col = np.asarray({
        "blue": (rng.uniform(140, 185), rng.uniform(190, 215), rng.uniform(222, 245)),
        "white": (236, 238, 240), "black": (38, 38, 42), "pink": (238, 190, 205), "green": (175, 215, 195),
    }[kind], float)
    half = rng.uniform(0.9, 1.0)
    depth = rng.uniform(1.35, 1.5)
    u = np.linspace(-half, half, 41)
    top = 0.27 * (u / half) ** 2 - 0.03 * np.exp(-((u / 0.15) ** 2))  # rises to a peak over the nose
    bottom = depth - 0.5 * (u / half) ** 2
    body = np.concatenate([np.stack([u, top], 1), np.stack([u, bottom], 1)[::-1]])
    loop = _shade(col, 0.97) if kind != "black" else (50, 50, 55)
    # ear loops behind the body: thin elastic towards the ears
    for side in (-1, 1):
        pen.line(_ellipse(side * (half + 0.05), 0.55, 0.3, 0.42, -np.pi / 2 - 0.3 if side > 0 else np.pi / 2 + 0.3,
                          np.pi / 2 - 0.2 if side > 0 else 3 * np.pi / 2 + 0.2, 16), loop, 0.03)
    pen.fill(body, col)
    # pleats: three folds, each a shadow line under a highlight band
    for k, y in enumerate((0.45, 0.72, 0.99)):
        yy = y + 0.12 * (u / half) ** 2 * (1 - k * 0.3)
        pen.line(np.stack([u * 0.97, yy], 1), _shade(col, 0.82), 0.022)
        pen.line(np.stack([u * 0.97, yy - 0.04], 1), _shade(col, 1.06), 0.03)
    # cloth shading: the middle catches the light, the sides turn away
    pen.shade(body, lambda uu, vv: 1.04 - 0.22 * (uu / half) ** 2)
    # binding tape on the sides and a nose wire
    for side in (-1, 1):
        pen.line([[side * half * 0.99, 0.27], [side * half * 0.99, depth - 0.5]], _shade(col, 0.9), 0.06)
    pen.line(np.stack([u[14:27], top[14:27] + 0.04], 1), _shade(col, 0.85), 0.02)
    if rng.random() < 0.5:  # non-woven texture
        pen.shade(body, lambda uu, vv: 1 + 0.025 * np.sin(uu * 220) * np.sin(vv * 200))
    return pen.sprite((0.0, 0.0))


_SKIN_TONES = [(241, 200, 175), (228, 180, 150), (210, 160, 125), (185, 135, 100), (150, 100, 70), (105, 70, 50)]


def _hand(rng: np.random.Generator) -> _Sprite:
    # fingers up, anchor = the middle of the palm; the forearm runs down out of the picture
    pen = _Pen(-1.2, -2.0, 1.25, 3.2)
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    lo = int(t)
    skin = np.asarray(_SKIN_TONES[lo], float) * (1 - t + lo) + np.asarray(_SKIN_TONES[lo + 1], float) * (t - lo)
    skin = skin * rng.uniform(0.95, 1.05, 3)
    dark = _shade(skin, 0.75)
    palm_side = rng.random() < 0.4
    sleeve = rng.random() < 0.6
    spread = rng.uniform(0.0, 1.0)
    lengths = np.array([0.95, 1.08, 1.0, 0.78]) * rng.uniform(0.92, 1.08)
    xs = np.array([-0.45, -0.15, 0.15, 0.44])
    ang = np.radians(np.array([-9, -3, 3, 10]) * spread)
    fw = rng.uniform(0.26, 0.31)
    # forearm and sleeve
    pen.fill([[-0.48, 0.5], [0.52, 0.5], [0.6, 3.2], [-0.6, 3.2]], _shade(skin, 0.95))
    if sleeve:
        sc = _palette(rng, 1)[0]
        cuff = rng.uniform(1.0, 1.6)
        pen.fill([[-0.7, cuff], [0.72, cuff - 0.05], [0.8, 3.2], [-0.8, 3.2]], sc)
        pen.line([[-0.7, cuff], [0.72, cuff - 0.05]], _shade(sc, 0.7), 0.04)
    # thumb, then palm, then fingers on top
    t0 = np.array([0.5, 0.25])
    tdir = np.array([math.sin(math.radians(40 + 20 * spread)), -math.cos(math.radians(40 + 20 * spread))])
    pen.fill(_capsule(t0, t0 + tdir * 0.8, 0.3), skin)
    pen.line(_capsule(t0, t0 + tdir * 0.8, 0.3)[1:-1], dark, 0.015)
    palm = np.concatenate([
        _ellipse(0.02, -0.1, 0.62, 0.45, np.pi, 2 * np.pi, 14),
        [[0.62, 0.1], [0.55, 0.45], [0.48, 0.6], [-0.45, 0.6], [-0.55, 0.4], [-0.62, 0.05]],
    ])
    pen.fill(palm, skin)
    for x, ln, a in zip(xs, lengths, ang):
        base = np.array([x, -0.35])
        tip = base + np.array([math.sin(a), -math.cos(a)]) * ln
        cap = _capsule(base, tip, fw)
        pen.fill(cap, skin)
        pen.line(cap[1:-1], dark, 0.015)
        d = (tip - base) / ln
        nrm = np.array([-d[1], d[0]])
        if not palm_side:  # fingernails and knuckle creases on the back of the hand
            nc = tip - d * 0.13
            ring = np.linspace(0, 2 * np.pi, 16)[:, None]
            nail = nc + nrm * fw * 0.32 * np.cos(ring) + d * 0.1 * np.sin(ring)
            pen.fill(nail, _shade(skin, 1.04) * [1.0, 0.93, 0.93])
            pen.line(nail, _shade(skin, 0.8), 0.01, closed=True)
        for f in (0.42, 0.7):
            c = base + d * ln * f
            pen.line([c - nrm * fw * 0.3, c + nrm * fw * 0.3], _shade(skin, 0.82), 0.012)
    # shading: roundness across the palm and a soft shadow at the finger roots
    pen.shade(None, lambda u, v: 1.0 - 0.12 * np.minimum((u / 0.7) ** 2, 1.0))
    pen.shade(palm, lambda u, v: 1 - 0.08 * np.exp(-((v + 0.3) ** 2) / 0.01))
    if palm_side:  # palm lines
        pen.line(_ellipse(0.05, -0.05, 0.5, 0.25, np.pi * 1.05, np.pi * 1.6, 10), _shade(skin, 0.72), 0.015)
        pen.line(_ellipse(0.3, 0.1, 0.5, 0.35, np.pi * 0.95, np.pi * 1.35, 10), _shade(skin, 0.72), 0.015)
    return pen.sprite((0.0, 0.0))


def _phone(rng: np.random.Generator) -> _Sprite:
    w, h = rng.uniform(1.05, 1.2) / 2, rng.uniform(2.1, 2.45) / 2
    pen = _Pen(-w - 0.05, -h - 0.05, w + 0.05, h + 0.05)
    r = rng.uniform(0.12, 0.2)
    body = _rrect(-w, -h, w, h, r)
    front = rng.random() < 0.6
    if front:
        bezel = np.asarray([(18, 18, 20), (235, 235, 238), (40, 42, 48)][rng.integers(3)], float)
        pen.fill(body, bezel)
        pen.line(body, _shade(bezel, 0.6) + 40, 0.02, closed=True)
        m = rng.uniform(0.04, 0.07)
        scr = _rrect(-w + m, -h + m * 1.5, w - m, h - m * 1.5, max(r - m, 0.03))
        lit = rng.random() < 0.4
        if lit:  # a lit home screen: wallpaper gradient and an icon grid
            c0, c1 = _palette(rng, 2)
            pen.fill(scr, c0)
            pen.shade(scr, lambda u, v: 0.7 + 0.5 * (v + h) / (2 * h))
            step = (2 * w - 2 * m) / 4
            for i in range(4):
                for j in range(5):
                    x = -w + m + step * (i + 0.5)
                    y = -h + m * 1.5 + 0.25 + j * step * 1.1
                    if y + step * 0.3 < h - 0.3:
                        pen.fill(_rrect(x - step * 0.3, y - step * 0.3, x + step * 0.3, y + step * 0.3, 0.04),
                                 rng.uniform(40, 250, 3))
        else:
            pen.fill(scr, (14, 16, 24))
            pen.shade(scr, lambda u, v: 1 + 0.6 * np.clip(0.3 - (u + v * 0.4 + 0.2) ** 2, 0, 1))
        # glare: a bright diagonal band across the glass
        g0 = rng.uniform(-0.4, 0.4)
        pen.shade(scr, lambda u, v: np.where(np.abs(u * 0.9 - v * 0.45 - g0) < 0.12, 1.55 if lit else 3.5, 1.0))
        pen.fill(_ellipse(0, -h + m * 0.75, 0.025, 0.025), (40, 45, 60))
    else:
        col = np.asarray([(25, 25, 28), (230, 230, 232), (60, 90, 150), (235, 190, 200), (210, 185, 140),
                          (80, 120, 90)][rng.integers(6)], float)
        pen.fill(body, col)
        pen.shade(body, lambda u, v: 0.9 + 0.2 * (u + w) / (2 * w))
        cam = _rrect(-w + 0.08, -h + 0.08, -w + 0.5, -h + 0.5, 0.1)
        pen.fill(cam, _shade(col, 0.85))
        for cx, cy in ((-w + 0.2, -h + 0.2), (-w + 0.38, -h + 0.2), (-w + 0.2, -h + 0.38)):
            pen.fill(_ellipse(cx, cy, 0.07, 0.07), (20, 20, 25))
            pen.fill(_ellipse(cx + 0.015, cy - 0.015, 0.02, 0.02), (120, 130, 150))
        pen.fill(_ellipse(0, 0, 0.12, 0.12), _shade(col, 0.8 if col.mean() > 100 else 1.6))
        pen.shade(body, lambda u, v: np.where(np.abs(u * 0.9 - v * 0.45) < 0.15, 1.15, 1.0))
    return pen.sprite((0.0, 0.0))


def _cup(rng: np.random.Generator) -> _Sprite:
    pen = _Pen(-1.0, -1.05, 1.45, 1.0)
    paper = rng.random() < 0.3
    col = np.asarray(rng.choice([(240, 240, 236), (200, 40, 40), (40, 80, 160), (245, 200, 60), (60, 150, 90),
                                 (30, 30, 32), (235, 140, 50), (160, 100, 170)]), float)
    if paper:  # a takeaway cup: tapered, sleeve, lid
        w0, w1, y0, y1 = 0.62, 0.46, -0.7, 0.85
        body = np.array([[-w0, y0], [w0, y0], [w1, y1], [-w1, y1]])
        pen.fill(body, (245, 243, 238))
        sl = np.array([[-0.58, -0.2], [0.58, -0.2], [0.52, 0.35], [-0.52, 0.35]])
        pen.fill(sl, (165, 120, 80))
        pen.fill(_rrect(-0.7, -0.9, 0.7, -0.68, 0.06), (250, 250, 250) if rng.random() < 0.5 else (30, 30, 30))
        pen.fill(_rrect(-0.55, -1.0, 0.55, -0.86, 0.05), _shade((235, 235, 235), 0.95))
        pen.fill(_ellipse(0, 0.07, 0.18, 0.12), col)
        shape = body
    else:  # a mug: cylinder body, rim, handle
        w, top, bot = rng.uniform(0.58, 0.7), -0.72, 0.72
        hx = w + 0.22
        pen.line(_ellipse(hx - 0.08, 0.0, 0.3, 0.36, -np.pi / 2 - 0.2, np.pi / 2 + 0.2, 20), col, 0.15)
        body = np.concatenate([[[-w, top], [w, top]], _ellipse(0, bot - 0.1, w, 0.1, 0, np.pi, 12)])
        pen.fill(body, col)
        deco = rng.integers(4)
        if deco == 1:
            pen.fill([[-w, -0.25], [w, -0.25], [w, 0.05], [-w, 0.05]], _palette(rng, 1)[0])
        elif deco == 2:
            for x in np.arange(-w + 0.12, w, 0.25):
                for y in np.arange(-0.55, 0.6, 0.25):
                    pen.fill(_ellipse(x, y, 0.05, 0.05), _palette(rng, 1)[0])
        elif deco == 3:
            pen.fill(_ellipse(0, -0.05, 0.28, 0.28), _shade(col, 0.6) if col.mean() > 128 else _shade(col, 2.5))
        # the opening: rim ellipse with the drink inside
        pen.fill(_ellipse(0, top, w, 0.13), _shade(col, 0.9))
        pen.fill(_ellipse(0, top + 0.01, w * 0.9, 0.1), rng.choice([(70, 40, 25), (110, 70, 45), (185, 150, 110)]))
        shape = body
    # cylinder shading with a highlight stripe
    hl = rng.uniform(-0.35, -0.1)
    def cylinder(u, v):
        return 0.72 + 0.4 * np.cos(np.clip(u / 0.75, -1.2, 1.2) * 1.2) ** 0.5 + 0.35 * np.exp(-((u - hl) ** 2) / 0.004)

    pen.shade(shape, cylinder)
    return pen.sprite((0.0, 0.0))


def _book(rng: np.random.Generator) -> _Sprite:
    w, h = rng.uniform(1.5, 1.8) / 2, rng.uniform(2.2, 2.6) / 2
    pen = _Pen(-w - 0.25, -h - 0.1, w + 0.25, h + 0.25)
    cols = _palette(rng, 3)
    if rng.random() < 0.65:  # closed, seen a little from the side: page block visible right and bottom
        d = rng.uniform(0.08, 0.14)
        pages = np.array([[w, -h], [w + d, -h + d], [w + d, h + d], [-w + d, h + d], [-w, h], [w, h]])
        pen.fill(pages, (238, 232, 215))
        for k in np.linspace(0.15, 0.85, 7):
            pen.line([[w + d * k, -h + d * k], [w + d * k, h + d * k]], (190, 182, 165), 0.008)
            pen.line([[-w + d * k, h + d * k], [w + d * k, h + d * k]], (190, 182, 165), 0.008)
        cover = _rrect(-w, -h, w, h, 0.03)
        pen.fill(cover, cols[0])
        pen.fill([[-w, -h], [-w + 0.16, -h], [-w + 0.16, h], [-w, h]], _shade(cols[0], 0.75))  # spine hinge
        # title block and "text": bars of varying length
        ty = -h + rng.uniform(0.25, 0.5)
        pen.fill([[-w + 0.3, ty], [w - 0.15, ty], [w - 0.15, ty + 0.45], [-w + 0.3, ty + 0.45]], cols[1])
        for k in range(2):
            ln = rng.uniform(0.5, 1.0) * (2 * w - 0.65)
            pen.line([[-w + 0.4, ty + 0.13 + k * 0.18], [-w + 0.4 + ln, ty + 0.13 + k * 0.18]], cols[2], 0.07)
        emblem = rng.integers(3)
        if emblem == 0:
            pen.fill(_ellipse(0.05, 0.35, 0.3, 0.3), cols[2])
        elif emblem == 1:
            pen.fill([[0.05, 0.0], [0.4, 0.65], [-0.3, 0.65]], cols[2])
        ln = rng.uniform(0.4, 0.8) * (2 * w - 0.65)
        pen.line([[-w + 0.4, h - 0.3], [-w + 0.4 + ln, h - 0.3]], _shade(cols[1], 0.8), 0.05)
        pen.shade(cover, lambda u, v: 0.9 + 0.15 * (u + w) / (2 * w))
    else:  # open: two pages of text around the gutter, the cover showing at the edges
        cover = _rrect(-w - 0.2, -h - 0.05, w + 0.2, h + 0.15, 0.04)
        pen.fill(cover, cols[0])
        for side in (-1, 1):
            page = np.array([[0, -h + 0.05], [side * (w + 0.1), -h], [side * (w + 0.1), h + 0.05], [0, h + 0.1]])
            pen.fill(page, (243, 238, 225))
            for y in np.arange(-h + 0.25, h - 0.1, 0.11):
                x0, x1 = side * 0.15, side * (w - 0.05) * rng.uniform(0.8, 1.0)
                pen.line([[x0, y], [x1, y]], (120, 118, 115), 0.025)
        pen.shade(cover, lambda u, v: 1 - 0.35 * np.exp(-(u**2) / 0.01))
    return pen.sprite((0.0, 0.0))


_PAINTERS = {
    "sunglasses": _sunglasses,
    "eyeglasses": _eyeglasses,
    "scarf": _scarf,
    "mask": _surgical_mask,
    "hand": _hand,
    "phone": _phone,
    "cup": _cup,
    "book": _book,
}

_BANKS: dict[str, list[_Sprite]] = {}


def _bank(kind: str) -> list[_Sprite]:
    bank = _BANKS.get(kind)
    if bank is None:
        k = SPRITE_KINDS.index(kind)
        bank = [_PAINTERS[kind](np.random.default_rng([_BANK_SEED, k, i])) for i in range(_BANK_SIZE)]
        _BANKS[kind] = bank
    return bank


def prepare(kinds=SPRITE_KINDS) -> None:
    """Draw the sprite banks now (e.g. before forking workers) instead of on first use."""
    for kind in kinds:
        _bank(kind)


def render_sprite(kind: str, variant: int = 0) -> np.ndarray:
    """The RGBA sprite (uint8 H×W×4, 40 px per inter-ocular distance) of one bank variant of ``kind``."""
    if kind not in _PAINTERS:
        raise BadInputError(f"no sprite for occluder {kind!r}; choose one of {', '.join(_PAINTERS)}")
    spr = _bank(kind)[variant % _BANK_SIZE]
    rgba = spr.rgba.copy()
    rgba[..., 3] = np.where(spr.rgba[..., 3] >= 128, 255, 0) if spr.opacity is None else (
        np.where(spr.rgba[..., 3] >= 128, spr.opacity, 0))
    rgba[rgba[..., 3] == 0, :3] = 0
    return rgba


# --------------------------------------------------------------------------------------------------------
# placement


def _face_frame(landmarks: np.ndarray):
    """Affine maps from face units to chip pixels: ``iso`` (similarity, scale = inter-ocular distance) and
    ``face`` (vertical unit stretched so the mouth sits at 1.15), plus the nose tip in face units."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise BadInputError(f"landmarks must be 5×2 finite chip coordinates, got shape {lm.shape}")
    # plain floats: this runs once per call and numpy's per-op overhead would dominate
    (lx, ly), (rx, ry), (nx, ny), (m1x, m1y), (m2x, m2y) = lm.tolist()
    ex, ey = rx - lx, ry - ly
    iod = math.hypot(ex, ey)
    if iod < 2.0:
        raise BadInputError(f"eye landmarks are {iod:.1f} px apart: too close to place an occluder")
    xd = (ex / iod, ey / iod)
    yd = (-xd[1], xd[0])
    mx, my = (lx + rx) / 2, (ly + ry) / 2
    dv = ((m1x + m2x) / 2 - mx) * yd[0] + ((m1y + m2y) / 2 - my) * yd[1]
    vs = min(max(dv / _MOUTH_V, 0.7 * iod), 1.5 * iod)
    iso = np.array([[xd[0] * iod, yd[0] * iod, mx], [xd[1] * iod, yd[1] * iod, my]])
    face = np.array([[xd[0] * iod, yd[0] * vs, mx], [xd[1] * iod, yd[1] * vs, my]])
    nose = (((nx - mx) * xd[0] + (ny - my) * xd[1]) / iod, ((nx - mx) * yd[0] + (ny - my) * yd[1]) / vs)
    return iso, face, nose


def _similarity(scale_x: float, scale_y: float, angle: float, flip: bool) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    f = -1.0 if flip else 1.0
    return np.array([[c * scale_x * f, -s * scale_y], [s * scale_x * f, c * scale_y]])


def _place(spr: _Sprite, lin_face: np.ndarray, local: np.ndarray, target_px: np.ndarray) -> np.ndarray:
    """2×3 map sprite px → chip px: sprite px → face units (/S, anchor at 0) → ``local`` → ``lin_face``."""
    a = lin_face @ local / _S
    t = target_px - a @ np.asarray(spr.anchor)
    return np.hstack([a, t[:, None]])


def _roi(m: np.ndarray, shape: tuple[int, int], h: int, w: int) -> tuple[int, int, int, int]:
    """Chip rectangle (x0, y0, x1, y1) the warped sprite can touch: only that much is warped and recoloured."""
    sh, sw = shape
    (a, b, c), (d, e, f) = m.tolist()
    xs = (c, a * sw + c, b * sh + c, a * sw + b * sh + c)
    ys = (f, d * sw + f, e * sh + f, d * sw + e * sh + f)
    x0, y0 = max(math.floor(min(xs)) - 1, 0), max(math.floor(min(ys)) - 1, 0)
    x1, y1 = min(math.ceil(max(xs)) + 1, w), min(math.ceil(max(ys)) + 1, h)
    return x0, y0, x1, y1


_STEPS4 = np.array([-0.5, -1 / 6, 1 / 6, 0.5])


def _recolour(rgb: np.ndarray, rng: np.random.Generator, gain_sd: float, shade: float) -> np.ndarray:
    """Channel gains + brightness + a linear shading gradient, all from ``rng``; uint8 in and out."""
    h, w = rgb.shape[:2]
    gains = np.clip(rng.normal(1.0, gain_sd, 3), 0.6, 1.4) * rng.uniform(0.85, 1.12)
    a = rng.uniform(0, 2 * np.pi)
    k = rng.uniform(0, shade)
    # the factor map (gradient in [1 - k/2, 1 + k/2] times the channel gains, ×128 as uint8) is made 4×4 and
    # upsampled: a linear gradient survives linear interpolation, and it costs one resize instead of 4 passes
    g = _STEPS4 * k
    small = (np.add.outer(math.sin(a) * g, math.cos(a) * g) + 1.0)[..., None] * (gains * 128)
    f = cv2.resize(np.clip(small, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.multiply(rgb, f, scale=1 / 128)


def _paste(out: np.ndarray, x0: int, y0: int, rgb: np.ndarray, mask: np.ndarray, op: np.ndarray | None) -> None:
    """Write ``rgb`` into ``out`` at (x0, y0) where ``mask``; see-through parts (``op`` < 255) are blended."""
    h, w = mask.shape
    roi = out[y0 : y0 + h, x0 : x0 + w]
    if op is not None:  # eyeglass lenses: a tinted mix of glass and face, still only inside the mask
        t = op.astype(np.float32) / 255
        rgb = cv2.blendLinear(rgb, roi, t, 1 - t)
    cv2.copyTo(rgb, mask.view(np.uint8), roi)


def _block_patch(rng: np.random.Generator, hh: int, ww: int) -> np.ndarray:
    """A patch for the `block` occluder: a fully opaque window cut from a random sprite of another kind."""
    kinds = ("sunglasses", "scarf", "mask", "hand", "phone", "cup", "book")
    while True:
        spr = _bank(kinds[rng.integers(len(kinds))])[rng.integers(_BANK_SIZE)]
        sizes = sorted(spr.crops)
        if sizes:
            break
    size = sizes[rng.integers(len(sizes))]
    y, x = spr.crops[size][rng.integers(len(spr.crops[size]))]
    patch = spr.rgba[y : y + size, x : x + size, :3]
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return cv2.resize(np.ascontiguousarray(patch), (ww, hh), interpolation=cv2.INTER_LINEAR)


def _square(chip: np.ndarray, grid: int, rng: np.random.Generator, block: int | None) -> Occlusion:
    """A black square over 2×2 grid blocks at a random grid position (``block``: its top-left block) — the
    issue's "random 2×2-block square", the occlusion studied on dlib's own pipeline."""
    h, w = chip.shape[:2]
    if grid < 2:
        raise BadInputError("square needs a grid of at least 2×2")
    if block is None:
        r, c = (int(v) for v in rng.integers(grid - 1, size=2))
    else:
        r, c = divmod(int(block), grid)
        if r > grid - 2 or c > grid - 2:
            raise BadInputError(f"square at block {block}: its 2×2 blocks would leave the {grid}×{grid} grid")
    y0, _, x0, _ = block_bounds(h, w, grid, r * grid + c)
    _, y1, _, x1 = block_bounds(h, w, grid, (r + 1) * grid + c + 1)
    image = chip.copy()
    image[y0:y1, x0:x1] = 0
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return Occlusion(image=image, mask=mask, blocks=block_occupancy(mask, grid), kind="square")


def occlude(
    chip: np.ndarray,
    landmarks: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    grid: int = 5,
    block: int | None = None,
) -> Occlusion:
    """Occlude an aligned face ``chip`` (uint8 H×W×3 RGB) whose 5 ``landmarks`` are in chip pixels.

    ``block`` (0..grid²-1, row-major) is where a ``block`` occluder goes (drawn when None), the top-left block of
    a ``square``, and where an object (hand, phone, cup, book) is centred; anatomical kinds are placed by the face and refuse a block. With
    ``kind="random"`` the kind is drawn from ``rng`` (among those that honour ``block`` when one is given).
    """
    if kind not in OCCLUDERS:
        raise BadInputError(f"unknown occluder {kind!r}; choose one of {', '.join(OCCLUDERS)}")
    chip = np.asarray(chip)
    if chip.ndim != 3 or chip.shape[2] != 3 or chip.dtype != np.uint8:
        raise BadInputError(f"chip must be uint8 H×W×3, got {chip.dtype} {chip.shape}")
    h, w = chip.shape[:2]
    _check_grid(h, w, grid)
    if block is not None and (not isinstance(block, (int, np.integer)) or not 0 <= block < grid * grid):
        raise BadInputError(f"block {block!r} is outside the {grid}×{grid} grid (0..{grid * grid - 1})")
    if kind == "random":
        choices = RANDOM_KINDS if block is None else ("block",) + OBJECTS
        kind = choices[rng.integers(len(choices))]
    elif block is not None and kind in ANATOMICAL:
        raise BadInputError(f"{kind} is placed by the landmarks; block= only applies to block, {', '.join(OBJECTS)}")

    if kind == "square":
        return _square(chip, grid, rng, block)

    iso, face, (nose_u, nose_v) = _face_frame(landmarks)

    if kind == "block":
        j = int(rng.integers(grid * grid)) if block is None else int(block)
        y0, y1, x0, x1 = block_bounds(h, w, grid, j)
        image = chip.copy()
        image[y0:y1, x0:x1] = _recolour(_block_patch(rng, y1 - y0, x1 - x0), rng, 0.08, 0.3)
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        return Occlusion(image=image, mask=mask, blocks=block_occupancy(mask, grid), kind=kind)

    spr = _bank(kind)[rng.integers(_BANK_SIZE)]
    if kind in ("sunglasses", "eyeglasses"):
        s = rng.uniform(0.96, 1.1)
        local = _similarity(s, s, math.radians(rng.normal(0, 1.5)), False)
        target = iso @ np.array([rng.normal(0, 0.02), rng.normal(0.0, 0.02), 1.0])
        m = _place(spr, iso[:, :2], local, target)
        gain_sd, shade = 0.06, 0.3
    elif kind == "scarf":
        sx, sy = rng.uniform(0.95, 1.1, 2)
        local = _similarity(sx, sy, math.radians(rng.normal(0, 3)), rng.random() < 0.5)
        target = face @ np.array([nose_u * 0.5, nose_v + rng.uniform(0.07, 0.16), 1.0])
        m = _place(spr, face[:, :2], local, target)
        gain_sd, shade = 0.1, 0.5
    elif kind == "mask":
        local = _similarity(rng.uniform(0.96, 1.08), rng.uniform(0.95, 1.05), math.radians(rng.normal(0, 2)), False)
        top = max(nose_v - rng.uniform(0.24, 0.34), 0.24)
        target = face @ np.array([nose_u * 0.6, top, 1.0])
        m = _place(spr, face[:, :2], local, target)
        gain_sd, shade = 0.04, 0.35
    else:  # objects over the face
        spec = _OBJECT_SPEC[kind]
        if block is not None:
            y0, y1, x0, x1 = block_bounds(h, w, grid, int(block))
            target = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        else:
            target = face @ np.array([rng.uniform(-0.9, 0.9), rng.uniform(-0.4, 1.7), 1.0])
        s = rng.uniform(*spec["scale"])
        ang = math.radians(rng.uniform(-spec["rot"], spec["rot"]) + spec.get("base", 0.0) * rng.choice([-1, 0, 1]))
        local = _similarity(s, s, ang, rng.random() < 0.5)
        m = _place(spr, iso[:, :2], local, target)
        gain_sd, shade = spec["gain"], 0.5

    image = chip.copy()
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = _roi(m, spr.rgba.shape[:2], h, w)
    if x1 > x0 and y1 > y0:
        m[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        rgba = cv2.warpAffine(spr.rgba, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        op = None if spr.opacity is None else cv2.warpAffine(spr.opacity, m, size, flags=cv2.INTER_LINEAR)
        # binary alpha: the mask is exactly the set of pixels written below
        roi_mask = rgba[..., 3] >= 128
        rgb = _recolour(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), rng, gain_sd, shade)
        _paste(image, x0, y0, rgb, roi_mask, op)
        mask[y0:y1, x0:x1] = roi_mask
    else:  # the sprite missed the chip entirely; keep the rng stream the same length either way
        _recolour(np.zeros((1, 1, 3), np.uint8), rng, gain_sd, shade)
    return Occlusion(image=image, mask=mask, blocks=block_occupancy(mask, grid), kind=kind)


# scale in inter-ocular distances (1 = the sprite as drawn), rotation range in degrees, colour gain spread
_OBJECT_SPEC = {
    "hand": {"scale": (0.75, 1.05), "rot": 70.0, "base": 35.0, "gain": 0.04},
    "phone": {"scale": (0.8, 1.05), "rot": 35.0, "gain": 0.1},
    "cup": {"scale": (0.8, 1.1), "rot": 15.0, "gain": 0.12},
    "book": {"scale": (0.75, 1.0), "rot": 30.0, "gain": 0.12},
}


# --------------------------------------------------------------------------------------------------------
# looking at it


def _write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    path = check_writable(path)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise BadInputError(f"could not encode {path} as PNG")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(buf.tobytes())
    return path


def contact_sheet(
    images: list[np.ndarray], path: str | os.PathLike, cols: int = 8, labels: list[str] | None = None
) -> Path:
    """Tile RGB images (any sizes) into one PNG, with a small text label under each when given."""
    if not images:
        raise BadInputError("contact sheet needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise BadInputError(f"{len(labels)} labels for {len(images)} images")
    cols = max(1, min(int(cols), len(images)))
    th = max(im.shape[0] for im in images)
    tw = max(im.shape[1] for im in images)
    lab_h = 14 if labels is not None else 0
    rows = (len(images) + cols - 1) // cols
    pad = 2
    sheet = np.full((rows * (th + lab_h + pad) + pad, cols * (tw + pad) + pad, 3), 32, np.uint8)
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, 2)
        r, c = divmod(i, cols)
        y, x = pad + r * (th + lab_h + pad), pad + c * (tw + pad)
        sheet[y : y + im.shape[0], x : x + im.shape[1]] = im[..., :3]
        if labels is not None:
            scale = 0.35
            cv2.putText(sheet, str(labels[i])[: max(4, tw // 6)], (x + 2, y + th + lab_h - 4),
                        cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)
    return _write_png(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def write_assets(folder: str | os.PathLike) -> list[Path]:
    """Write each sprite kind's canonical look (bank variant 0) as ``<kind>.png`` (RGBA) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for kind in SPRITE_KINDS:
        rgba = render_sprite(kind, 0)
        bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
        out.append(_write_png(folder / f"{kind}.png", bgra))
    return out


def _preview(path: str, seed: int) -> Path:
    from pdsn_cli.data.synthetic import synthetic_faces

    rng = np.random.default_rng(seed)
    faces = synthetic_faces(identities=8, images_per_identity=1, seed=seed, size=250)
    images, labels = [], []
    for i, kind in enumerate(k for k in OCCLUDERS if k != "random"):
        for f in (faces[i % 8], faces[(i + 3) % 8]):
            chip, lm = f.image[50:200, 50:200], f.landmarks - 50
            occ = occlude(chip, lm, kind, rng)
            images.append(occ.image)
            labels.append(kind)
    return contact_sheet(images, path, cols=6, labels=labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdsn_cli.occlusion.occluders", description=__doc__.split("\n")[0])
    p.add_argument("--write-assets", metavar="DIR", help="write each occluder sprite as an RGBA PNG into DIR")
    p.add_argument("--preview", metavar="PNG", help="write a contact sheet of every kind on synthetic faces")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.write_assets or args.preview):
        p.print_usage()
        return 2
    from pdsn_cli.errors import PdsnError

    try:
        if args.write_assets:
            for path in write_assets(args.write_assets):
                print(f"{path}  {path.stat().st_size / 1024:.1f} KB")
        if args.preview:
            print(_preview(args.preview, args.seed))
    except PdsnError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
