"""Placing a sprite on a chip: face frame from the 5 landmarks, the affine map sprite px → chip px, the
region it touches, recolouring and pasting (see occluders.py for how they combine)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.sprites import PX_PER_UNIT, Sprite

# canonical landmark geometry in face units (eye midpoint at the origin, inter-ocular distance 1, y down);
# the mouth height is the ArcFace template's (1.15 inter-ocular distances below the eyes)
MOUTH_V = 1.15


def face_frame(landmarks: np.ndarray):
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
    vs = min(max(dv / MOUTH_V, 0.7 * iod), 1.5 * iod)
    iso = np.array([[xd[0] * iod, yd[0] * iod, mx], [xd[1] * iod, yd[1] * iod, my]])
    face = np.array([[xd[0] * iod, yd[0] * vs, mx], [xd[1] * iod, yd[1] * vs, my]])
    nose = (((nx - mx) * xd[0] + (ny - my) * xd[1]) / iod, ((nx - mx) * yd[0] + (ny - my) * yd[1]) / vs)
    return iso, face, nose


def similarity(scale_x: float, scale_y: float, angle: float, flip: bool) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    f = -1.0 if flip else 1.0
    return np.array([[c * scale_x * f, -s * scale_y], [s * scale_x * f, c * scale_y]])


def place_sprite(spr: Sprite, lin_face: np.ndarray, local: np.ndarray, target_px: np.ndarray) -> np.ndarray:
    """2×3 map sprite px → chip px: sprite px → face units (/S, anchor at 0) → ``local`` → ``lin_face``."""
    a = lin_face @ local / PX_PER_UNIT
    t = target_px - a @ np.asarray(spr.anchor)
    return np.hstack([a, t[:, None]])


def sprite_roi(m: np.ndarray, shape: tuple[int, int], h: int, w: int) -> tuple[int, int, int, int]:
    """Chip rectangle (x0, y0, x1, y1) the warped sprite can touch: only that much is warped and recoloured."""
    sh, sw = shape
    (a, b, c), (d, e, f) = m.tolist()
    xs = (c, a * sw + c, b * sh + c, a * sw + b * sh + c)
    ys = (f, d * sw + f, e * sh + f, d * sw + e * sh + f)
    x0, y0 = max(math.floor(min(xs)) - 1, 0), max(math.floor(min(ys)) - 1, 0)
    x1, y1 = min(math.ceil(max(xs)) + 1, w), min(math.ceil(max(ys)) + 1, h)
    return x0, y0, x1, y1


_STEPS4 = np.array([-0.5, -1 / 6, 1 / 6, 0.5])


def recolour(rgb: np.ndarray, rng: np.random.Generator, gain_sd: float, shade: float) -> np.ndarray:
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


def paste(out: np.ndarray, x0: int, y0: int, rgb: np.ndarray, mask: np.ndarray, op: np.ndarray | None) -> None:
    """Write ``rgb`` into ``out`` at (x0, y0) where ``mask``; see-through parts (``op`` < 255) are blended."""
    h, w = mask.shape
    roi = out[y0 : y0 + h, x0 : x0 + w]
    if op is not None:  # eyeglass lenses: a tinted mix of glass and face, still only inside the mask
        t = op.astype(np.float32) / 255
        rgb = cv2.blendLinear(rgb, roi, t, 1 - t)
    cv2.copyTo(rgb, mask.view(np.uint8), roi)
