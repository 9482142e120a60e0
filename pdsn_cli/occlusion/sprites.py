"""Sprite drawing in *face units* (1 unit = the inter-ocular distance): the pen, the shape primitives and
the cloth textures the occluder painters use. Sprites are drawn once per process (see occluders.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PX_PER_UNIT = 40  # sprite resolution: pixels per face unit
_SHIFT = 4
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


@dataclass
class Sprite:
    rgba: np.ndarray  # h×w×4 uint8, colours bled past the silhouette so warping leaves no dark fringe
    opacity: np.ndarray | None  # h×w uint8 for see-through parts (eyeglass lenses); None = all opaque
    anchor: tuple[float, float]  # sprite pixel that lands on the placement point
    crops: dict[int, np.ndarray]  # window size → top-left corners of fully opaque windows (for `block`)


class Pen:
    """Draws polygons given in face units onto an RGBA canvas covering ``[x0, x1] × [y0, y1]``."""

    def __init__(self, x0: float, y0: float, x1: float, y1: float, s: int = PX_PER_UNIT):
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

    def sprite(self, anchor_uv: tuple[float, float] = (0.0, 0.0)) -> Sprite:
        return _finish(self.rgb, self.alpha, self.op, self.px(*anchor_uv))


def _col(c) -> tuple:
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def shaded(c, f) -> np.ndarray:
    return np.clip(np.asarray(c, np.float32) * f, 0, 255)


def ellipse(cx, cy, ax, ay, t0=0.0, t1=2 * np.pi, n=40) -> np.ndarray:
    t = np.linspace(t0, t1, n, endpoint=(t1 - t0) < 2 * np.pi - 1e-9)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)


def rounded_rect(x0, y0, x1, y1, r, n=8) -> np.ndarray:
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    out = []
    corners = ((x1 - r, y0 + r, -np.pi / 2), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, np.pi / 2), (x0 + r, y0 + r, np.pi))
    for cx, cy, a0 in corners:
        t = np.linspace(a0, a0 + np.pi / 2, n)
        out.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1))
    return np.concatenate(out)


def capsule(p0, p1, w, n=10) -> np.ndarray:
    """A finger: segment p0→p1 of width w with a round end at p1 (flat at p0)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    d /= np.linalg.norm(d)
    nrm = np.array([-d[1], d[0]]) * w / 2
    a = math.atan2(nrm[1], nrm[0])
    t = np.linspace(a, a - np.pi, n)
    tip = p1 + np.stack([np.cos(t), np.sin(t)], 1) * w / 2
    return np.concatenate([[p0 + nrm], tip, [p0 - nrm]])


def _finish(rgb, alpha, op, anchor) -> Sprite:
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
    return Sprite(rgba=rgba, opacity=op, anchor=anchor, crops=crops)


# ---- cloth patterns (scarves, sleeves) ----------------------------------------------------------------


def palette(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    base = rng.uniform(20, 235, 3)
    out = [base]
    for _ in range(n - 1):
        c = base + rng.normal(0, 70, 3) if rng.random() < 0.6 else rng.uniform(20, 240, 3)
        out.append(np.clip(c, 0, 255))
    return out


def cloth_texture(pen: Pen, rng: np.random.Generator) -> np.ndarray:
    """A full-canvas cloth texture: stripes, tartan, dots, knit or plain weave, with folds."""
    h, w = pen.alpha.shape
    u, v = pen._u[None, :], pen._v[:, None]
    cols = palette(rng, 3)
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

