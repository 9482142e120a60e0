"""Drawing one synthetic face photo from an identity's parameters (see synthetic.py for the dataset).

The face is drawn in canonical units (1 unit = the nominal inter-ocular distance, origin at the midpoint between
the eyes, y down) through one similarity map per image; head yaw moves each feature by its depth on a rounded
face. Then lighting, blur, sensor noise, tone curve and maybe JPEG make it a "photo".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

# Fraction of the image width taken by the nominal inter-ocular distance, and where the eye midpoint sits:
# close to LFW's 250×250 framing (eyes ~45 px apart, slightly above the centre).
_IOD_FRAC = 0.176
_EYE_MID = (0.5, 0.45)


@dataclass
class Identity:
    """The drawing parameters of one identity, in canonical units (drawn by synthetic.sample_identity)."""

    skin: np.ndarray
    face_a: float  # half width of the face
    face_top: float  # forehead height above the face centre
    face_bot: float  # chin depth below the face centre
    face_cy: float
    jaw: float  # how much the lower face narrows
    hair: np.ndarray
    hair_style: str
    hairline: float
    hair_volume: float
    hair_part: float
    eye_sep: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: np.ndarray
    brow_y: float
    brow_thick: float
    brow_arch: float
    brow_len: float
    brow_color: np.ndarray
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_upper: float
    lip_lower: float
    lip_color: np.ndarray
    beard: int  # 0 none, 1 stubble, 2 full
    moustache: bool
    moles: np.ndarray  # M×3: x, y, radius
    ear_size: float
    cheek: float


# --------------------------------------------------------------------------------------------------------
# drawing helpers (canonical units → pixels)


_CIRCLE = np.linspace(0, 2 * np.pi, 36, endpoint=False)


_COS_SIN = np.stack([np.cos(_CIRCLE), np.sin(_CIRCLE)], 1)


def _ellipse(cx, cy, ax, ay, t0=None, t1=None, n=36):
    if t0 is None:
        return _COS_SIN * (ax, ay) + (cx, cy)
    t = np.linspace(t0, t1, n)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)


class _Canvas:
    """Draws canonical-unit polygons onto an RGB image through a 2×3 affine map, anti-aliased."""

    def __init__(self, img: np.ndarray, m: np.ndarray):
        self.img = img
        self.m = m.astype(np.float64)
        self._a, self._b = self.m[:, :2].T.copy(), self.m[:, 2].copy()
        self._a16, self._b16 = self._a * _ONE, self._b * _ONE
        self.scale = math.sqrt(abs(np.linalg.det(self.m[:, :2])))

    def px(self, pts) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return pts @ self._a + self._b

    def _fixed(self, pts):
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return np.rint(pts @ self._a16 + self._b16).astype(np.int32)

    def fill(self, pts, color) -> None:
        cv2.fillPoly(self.img, [self._fixed(pts)], _col(color), _AA, _SHIFT)

    def line(self, pts, color, width: float, closed: bool = False) -> None:
        th = max(1, int(round(width * self.scale)))
        cv2.polylines(self.img, [self._fixed(pts)], closed, _col(color), th, _AA, _SHIFT)


def _col(c) -> tuple:
    # OpenCV saturates the colour to the image's range itself
    return tuple(c.tolist()) if isinstance(c, np.ndarray) else tuple(c)


def _shade(c, f):
    return np.minimum(np.asarray(c, np.float32) * f, 255.0)


# --------------------------------------------------------------------------------------------------------
# one image


@dataclass
class _Pose:
    yaw: float
    smile: float
    open_mouth: float
    lid: float  # 0 = eyes wide open, 1 = closed
    gaze: tuple[float, float]
    brow_raise: float


def _depth(x: np.ndarray, face_a: float) -> np.ndarray:
    # depth of the face surface at horizontal position x: a cylinder-ish head, so off-centre points move less
    r = face_a * 1.05
    return np.sqrt(np.maximum(r * r - x * x, 0.0)) - 0.78 * r


def _yaw_x(x, z, yaw):
    return x * math.cos(yaw) + z * math.sin(yaw)


def _face_contour(idn: Identity, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    s, c = np.sin(t), np.cos(t)
    low = np.maximum(s, 0)
    x = idn.face_a * c * (1 - idn.jaw * low**2) * (1 + 0.06 * np.maximum(-s, 0))
    # a flatter forehead: superellipse-like top half
    y = np.where(s < 0, -idn.face_top * np.abs(s) ** 0.85, idn.face_bot * s)
    return np.stack([x, idn.face_cy + y], 1)


def render_face(idn: Identity, rng: np.random.Generator, size: int):
    pose = _Pose(
        yaw=float(np.clip(rng.normal(0, 0.2), -0.45, 0.45)),
        smile=float(rng.uniform(-0.2, 1.0)),
        open_mouth=float(rng.uniform(0, 1) if rng.random() < 0.3 else 0.0),
        lid=float(rng.uniform(0.0, 0.35) if rng.random() < 0.85 else rng.uniform(0.5, 0.9)),
        gaze=(float(rng.normal(0, 0.015)), float(rng.normal(0, 0.008))),
        brow_raise=float(rng.normal(0, 0.02)),
    )
    # the same person is never drawn quite the same: hair falls differently, the face is lit differently
    idn = dataclasses.replace(
        idn,
        hair_volume=max(0.03, idn.hair_volume + rng.normal(0, 0.04)),
        hairline=idn.hairline + rng.normal(0, 0.04),
        hair_part=idn.hair_part + rng.normal(0, 0.1),
    )
    iod = _IOD_FRAC * size * rng.uniform(0.92, 1.08)
    ang = math.radians(float(np.clip(rng.normal(0, 6.0), -15, 15)))
    cx = _EYE_MID[0] * size + rng.normal(0, 0.02 * size)
    cy = _EYE_MID[1] * size + rng.normal(0, 0.02 * size)
    ca, sa = math.cos(ang) * iod, math.sin(ang) * iod
    m = np.array([[ca, -sa, cx], [sa, ca, cy]])

    img = _background(rng, size)
    cv = _Canvas(img, m)
    yaw = pose.yaw

    def fx(x, extra_z=0.0):
        x = np.asarray(x, np.float64)
        return _yaw_x(x, _depth(x, idn.face_a) + extra_z, yaw)

    skin = idn.skin * rng.uniform(0.96, 1.04)
    skin_dark = _shade(skin, 0.82)

    # clothes and neck: per image, like a different shirt every photo
    shirt = rng.uniform(20, 235, 3)
    cv.fill(_ellipse(0.0, idn.face_cy + idn.face_bot + 1.55, 2.4, 1.15), shirt)
    if rng.random() < 0.5:  # a collar
        cv.fill([[-0.45, 2.05], [0.0, 2.75], [0.45, 2.05]], _shade(shirt, 0.6))
    neck_top = idn.face_cy + idn.face_bot * 0.55
    nw = idn.face_a * 0.55
    cv.fill([[-nw, neck_top], [nw, neck_top], [nw * 1.05, 2.3], [0.0, 2.5], [-nw * 1.05, 2.3]], skin_dark)

    hair = idn.hair * rng.uniform(0.95, 1.05)
    contour = _face_contour(idn)
    contour_yawed = contour.copy()
    contour_yawed[:, 0] = contour[:, 0] * math.cos(yaw) + 0.08 * math.sin(yaw)

    _hair_back(cv, idn, hair, yaw)

    # ears: behind the face, shifted against the yaw
    for side in (-1, 1):
        ex = side * idn.face_a * 0.97
        ex = _yaw_x(ex, -0.45, yaw)
        ey = 0.3
        cv.fill(_ellipse(ex, ey, 0.15 * idn.ear_size, 0.28 * idn.ear_size), skin_dark)
        cv.fill(_ellipse(ex + side * 0.02, ey, 0.07 * idn.ear_size, 0.17 * idn.ear_size), _shade(skin, 0.7))

    cv.fill(contour_yawed, skin)
    # soft volume: a lighter inner face and cheek colour
    inner = contour_yawed * np.array([0.78, 0.82]) + np.array([0.06 * math.sin(yaw), 0.02 + idn.face_cy * 0.18])
    cv.fill(inner, _shade(skin, 1.04))
    if idn.cheek > 0.05:
        blush = skin * (1 - 0.12 * idn.cheek) + np.array([220, 90, 90]) * 0.12 * idn.cheek
        for side in (-1, 1):
            x = fx(side * 0.55)
            cv.fill(_ellipse(float(x), 0.72, 0.2, 0.13), blush)

    if idn.beard:
        _beard(cv, idn, hair, contour_yawed, fx)

    landmarks = np.zeros((5, 2))
    dlib5 = np.zeros((5, 2))
    _eyes(cv, idn, pose, skin, fx, landmarks, dlib5)
    _brows(cv, idn, pose, fx)
    _nose(cv, idn, skin, fx, yaw, landmarks, dlib5)
    _mouth(cv, idn, pose, skin, fx, landmarks)
    if idn.moustache:
        bot = idn.mouth_y - idn.lip_upper + 0.01
        top = max(bot - 0.09, idn.nose_len + 0.1)
        w = idn.mouth_w * 0.55
        u = np.linspace(-1, 1, 9)
        xs = fx(u * w, 0.18 * (1 - u**2))
        band = np.concatenate([np.stack([xs, top + 0.05 * u**2], 1), np.stack([xs, bot + 0.06 * u**2], 1)[::-1]])
        cv.fill(band, _shade(hair, 0.9))
    for mx, my, mr in idn.moles:
        cv.fill(_ellipse(float(fx(mx)), float(my), mr, mr), _shade(skin, 0.45))

    _hair_front(cv, idn, hair, contour_yawed)

    img = _photo(img, rng, size)
    return img, cv.px(landmarks).astype(np.float32), cv.px(dlib5).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # drawn at a quarter of the resolution and upscaled: an out-of-focus backdrop for free
    s = max(8, size // 4)
    # muted colours, like rooms and streets rather than a paint box
    base = rng.uniform(30, 230, 3) * 0.6 + rng.uniform(40, 200) * 0.4
    bg = np.empty((s, s, 3), np.uint8)
    bg[:] = _col(base)
    for _ in range(int(rng.integers(3, 9))):
        c = _col(base + rng.normal(0, 45, 3))
        kind = rng.integers(3)
        p = (rng.uniform(-0.1, 1.1, 2) * s * _ONE).astype(int)
        if kind == 0:
            q = p + (rng.uniform(0.1, 0.6, 2) * s * _ONE).astype(int)
            cv2.rectangle(bg, tuple(int(v) for v in p), tuple(int(v) for v in q), c, -1, _AA, _SHIFT)
        elif kind == 1:
            cv2.circle(bg, tuple(int(v) for v in p), int(rng.uniform(0.05, 0.3) * s * _ONE), c, -1, _AA, _SHIFT)
        else:
            q = (rng.uniform(-0.1, 1.1, 2) * s * _ONE).astype(int)
            cv2.line(bg, tuple(int(v) for v in p), tuple(int(v) for v in q), c, int(rng.integers(1, 4)), _AA, _SHIFT)
    return cv2.resize(bg, (size, size), interpolation=cv2.INTER_LINEAR)


def _hair_back(cv, idn, hair, yaw):
    style = idn.hair_style
    top = idn.face_cy - idn.face_top
    a = idn.face_a
    v = idn.hair_volume
    if style in ("long", "bob"):
        bottom = 2.4 if style == "long" else idn.face_cy + idn.face_bot * 0.55
        w = a + 0.12 + v
        pts = np.concatenate([
            _ellipse(0.05 * math.sin(yaw), top + 1.0, w, 1.0 + v, np.pi, 2 * np.pi, 20),
            [[w * (1.05 if style == "long" else 0.98), bottom], [-w * (1.05 if style == "long" else 0.98), bottom]],
        ])
        cv.fill(pts, _shade(hair, 0.85))
    elif style == "curly":
        cv.fill(_ellipse(0.0, top + 0.8, a + 0.25 + v, 1.05 + v), _shade(hair, 0.85))


def _hair_front(cv, idn, hair, contour):
    style = idn.hair_style
    if style == "bald":
        return
    top = idn.face_cy - idn.face_top
    a = idn.face_a
    v = idn.hair_volume if style not in ("buzz",) else 0.02
    # the upper part of the head outline, grown by the hair volume
    upper = contour[contour[:, 1] < idn.face_cy - 0.05]
    upper = upper[np.argsort(np.arctan2(upper[:, 1] - idn.face_cy, upper[:, 0]))]  # left side → top → right
    grown = upper.copy()
    grown[:, 0] *= 1 + v * 0.5
    grown[:, 1] = idn.face_cy + (grown[:, 1] - idn.face_cy) * (1 + v * 0.6)
    hl = idn.hairline if style != "buzz" else idn.hairline - 0.1
    n = 15
    xs = np.linspace(grown[-1, 0] * 0.98, grown[0, 0] * 0.98, n)  # right → left along the hairline
    u = np.linspace(1, -1, n)
    if style == "side":
        # a side parting: the fringe sweeps down on one side of the part, up on the other
        ys = hl + 0.18 * (1 - np.abs(u)) * (u < idn.hair_part) + 0.3 * np.abs(u) ** 3 - 0.15 * (u > idn.hair_part)
    elif style in ("bob", "long"):
        ys = hl + 0.45 + 0.036 * np.cos(u * 9) + 0.25 * np.abs(u) ** 2  # bangs
        ys = np.minimum(ys, -0.2)
    else:
        ys = hl + 0.35 * np.abs(u) ** 2.5 + 0.04 * np.cos(u * 7)
    # ends of the hairline go down the temples to the sides of the head
    side_y = min(grown[0, 1], grown[-1, 1])
    ys = np.maximum(ys, top + 0.1)
    ys[0] = ys[-1] = max(side_y, -0.25)
    pts = np.concatenate([grown, np.stack([xs, ys], 1)])
    cv.fill(pts, hair)
    if style == "curly":
        for t in np.linspace(np.pi * 1.05, np.pi * 1.95, 9):
            r = 0.2 + v * 0.5
            cx = (a + v * 0.4) * math.cos(t)
            cy = idn.face_cy + (idn.face_top + v * 0.4) * math.sin(t)
            cv.fill(_ellipse(cx, cy, r, r), _shade(hair, 1.0 + 0.08 * math.cos(5 * t)))
    else:  # a few strands so it does not read as a helmet
        for k in range(5):
            x0 = (k - 2) * 0.3
            cv.line([[x0 * 1.1, top + 0.05], [x0, hl + 0.05 + 0.1 * abs(x0)]], _shade(hair, 0.75), 0.015)


def _beard(cv, idn, hair, contour, fx):
    low = contour[contour[:, 1] > 0.45]
    low = low[np.argsort(low[:, 0])]
    mouth_y = idn.mouth_y
    w = idn.mouth_w * 0.75
    inner = np.array([[w, mouth_y - 0.12], [w * 0.5, mouth_y + 0.18], [-w * 0.5, mouth_y + 0.18], [-w, mouth_y - 0.12]])
    inner[:, 0] = fx(inner[:, 0])
    color = hair if idn.beard == 2 else idn.skin * 0.65 + hair * 0.35
    cv.fill(np.concatenate([low, inner]), color)


def _eyes(cv, idn, pose, skin, fx, lm, d5):
    half = idn.eye_sep / 2
    lid_skin = _shade(skin, 0.93)
    for i, side in enumerate((-1, 1)):
        ex = side * half
        ey = 0.0
        z = _depth(np.array([ex]), idn.face_a)[0]
        cx = _yaw_x(ex, z, pose.yaw)
        w = idn.eye_w * (1 - 0.25 * abs(pose.yaw) + side * 0.3 * pose.yaw)
        h = idn.eye_h
        # corners: outer one slightly higher for an upward tilt
        outer = (cx + side * w, ey - idn.eye_tilt)
        inner = (cx - side * w, ey + idn.eye_tilt * 0.3)
        t = np.linspace(0, 1, 12)
        xs = outer[0] + (inner[0] - outer[0]) * t
        base = outer[1] + (inner[1] - outer[1]) * t
        bump = np.sin(np.pi * t)
        upper = np.stack([xs, base - h * bump**0.8], 1)
        lower = np.stack([xs[::-1], (base + h * 0.75 * bump**0.9)[::-1]], 1)
        almond = np.concatenate([upper, lower])
        # eye socket shadow, then the white, iris, pupil, glint
        cv.fill(_ellipse(cx, ey - 0.02, w * 1.35, h * 2.0), _shade(skin, 0.9))
        cv.fill(almond, (235, 232, 226))
        gx, gy = pose.gaze
        r = min(h * 0.95, w * 0.55)
        ic = (cx + gx + 0.05 * pose.yaw, ey + gy + h * 0.05)
        cv.fill(_ellipse(ic[0], ic[1], r, r), idn.iris)
        cv.fill(_ellipse(ic[0], ic[1], r * 0.75, r * 0.75), _shade(idn.iris, 0.8))
        cv.fill(_ellipse(ic[0], ic[1], r * 0.42, r * 0.42), (18, 14, 12))
        cv.fill(_ellipse(ic[0] + r * 0.3, ic[1] - r * 0.3, r * 0.16, r * 0.16), (250, 250, 250))
        # skin around the almond clips the iris to the eye opening
        above = np.concatenate([upper, [[inner[0], ey - h * 2.2], [outer[0], ey - h * 2.2]]])
        below = np.concatenate([lower, [[outer[0], ey + h * 2.0], [inner[0], ey + h * 2.0]]])
        cv.fill(above, _shade(skin, 0.9))
        cv.fill(below, _shade(skin, 0.9))
        # the upper lid comes down with the expression
        if pose.lid > 0.02:
            lid = upper.copy()
            lid[:, 1] = base - h * bump**0.8 * (1 - pose.lid) + h * 0.7 * bump * pose.lid
            cv.fill(np.concatenate([upper, lid[::-1]]), lid_skin)
            lash = lid
        else:
            lash = upper
        cv.line(lash, (30, 22, 20), 0.022)
        cv.line(lower[2:-2], _shade(skin, 0.7), 0.008)
        # crease above the lid
        crease = np.stack([xs, base - h * bump**0.8 * 1.55 - 0.03], 1)[2:-1]
        cv.line(crease, _shade(skin, 0.78), 0.01)
        img_side = 0 if side < 0 else 1
        lm[img_side] = ((outer[0] + inner[0]) / 2, (outer[1] + inner[1]) / 2)
        if side > 0:  # image-right eye: dlib points 0 (outer) and 1 (inner)
            d5[0], d5[1] = outer, inner
        else:
            d5[2], d5[3] = outer, inner


def _brows(cv, idn, pose, fx):
    half = idn.eye_sep / 2
    for side in (-1, 1):
        x_in = side * (half - idn.brow_len * 0.55)
        x_out = side * (half + idn.brow_len * 0.6)
        xs = np.linspace(x_in, x_out, 10)
        t = np.linspace(0, 1, 10)
        y = idn.brow_y + pose.brow_raise - idn.brow_arch * np.sin(np.pi * (t * 0.8 + 0.1)) + 0.04 * t
        th = idn.brow_thick * (1.1 - 0.6 * t)
        xs_y = fx(xs, 0.05)
        pts = np.concatenate([np.stack([xs_y, y - th / 2], 1), np.stack([xs_y, y + th / 2], 1)[::-1]])
        cv.fill(pts, idn.brow_color)


def _nose(cv, idn, skin, fx, yaw, lm, d5):
    nl = idn.nose_len
    nw = idn.nose_w
    tip_z = 0.32  # the nose tip sticks out: under yaw it moves furthest
    tip_x = float(fx(0.0, tip_z))
    root_x = float(fx(0.0, 0.05))
    shadow = _shade(skin, 0.78)
    # bridge: a shadow line down the side facing away from the light/yaw
    s = -1 if yaw >= 0 else 1
    mid_x = (root_x + tip_x) / 2
    bridge = [[root_x + s * 0.08, 0.05], [mid_x + s * 0.09, nl * 0.55], [tip_x + s * nw * 0.75, nl - 0.05]]
    cv.line(bridge, _shade(skin, 0.85), 0.03)
    # tip and wings
    cv.fill(_ellipse(tip_x, nl - 0.02, nw * 0.55, 0.08), _shade(skin, 1.03))
    for side in (-1, 1):
        wx = float(fx(side * nw * 0.85, tip_z * 0.4))
        arc = _ellipse(wx, nl, nw * 0.35, 0.085, -np.pi / 2 - side * 0.9, np.pi / 2 + side * 0.3, 8)
        if side < 0:
            arc = _ellipse(wx, nl, nw * 0.35, 0.085, np.pi / 2 - 0.3, 3 * np.pi / 2 + 0.9, 8)
        cv.line(arc, shadow, 0.02)
        nx = float(fx(side * nw * 0.42, tip_z * 0.6))
        cv.fill(_ellipse(nx, nl + 0.04, nw * 0.2, 0.035), _shade(skin, 0.5))
    base_x = float(fx(0.0, tip_z * 0.6))
    lm[2] = (tip_x, nl)
    d5[4] = (base_x, nl + 0.07)


def _mouth(cv, idn, pose, skin, fx, lm):
    my = idn.mouth_y
    w = idn.mouth_w / 2 * (1 + 0.12 * pose.smile)
    lift = 0.06 * pose.smile  # corners go up with a smile
    opening = 0.12 * pose.open_mouth
    xs = np.linspace(-w, w, 15)
    u = xs / w
    z = 0.15 * (1 - u**2)
    X = fx(xs, z)
    corner_y = my - lift
    mid = corner_y + lift * (1 - u**2)  # the lip line bends with the smile
    up = idn.lip_upper * (1 - u**2) ** 0.7
    bow = 0.015 * np.exp(-((u * 6) ** 2))  # cupid's bow dip in the middle
    lo = idn.lip_lower * (1 - u**2) ** 0.7
    upper = np.concatenate([np.stack([X, mid - up + bow], 1), np.stack([X, mid - opening * 0.3 * (1 - u**2)], 1)[::-1]])
    drop = mid + opening * (1 - u**2)
    lower = np.concatenate([np.stack([X, drop], 1), np.stack([X, drop + lo], 1)[::-1]])
    if pose.open_mouth > 0.05:
        inside = np.concatenate([np.stack([X, mid - opening * 0.3 * (1 - u**2)], 1),
                                 np.stack([X, mid + opening * (1 - u**2)], 1)[::-1]])
        cv.fill(inside, (60, 20, 25))
        teeth = np.concatenate([np.stack([X[2:-2], (mid - opening * 0.3 * (1 - u**2))[2:-2]], 1),
                                np.stack([X[2:-2], (mid + opening * 0.35 * (1 - u**2))[2:-2]], 1)[::-1]])
        cv.fill(teeth, (235, 230, 215))
    cv.fill(upper, _shade(idn.lip_color, 0.9))
    cv.fill(lower, idn.lip_color)
    cv.line(np.stack([X, mid], 1), _shade(idn.lip_color, 0.55), 0.012)
    lm[3] = (X[0], corner_y)
    lm[4] = (X[-1], corner_y)


def _photo(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    # lighting: a linear gradient across the picture with a colour cast, then lens blur, sensor noise, the
    # camera's tone curve and maybe JPEG. All in uint8 with saturating OpenCV ops: this is the hot loop.
    a = rng.uniform(0, 2 * np.pi)
    k = rng.uniform(0.0, 0.8)
    g = np.linspace(-0.5 * k, 0.5 * k, 8, dtype=np.float32)
    gain = np.add.outer(math.sin(a) * g, math.cos(a) * g) + np.float32(rng.uniform(0.75, 1.15))
    wb = rng.uniform(0.9, 1.1, 3).astype(np.float32)  # white balance
    small = np.clip(gain[..., None] * wb * 128, 0, 255).astype(np.uint8)
    # a linear gradient survives linear upsampling, so the full-size gain map costs one resize
    out = cv2.multiply(img, cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR), scale=1 / 128)
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.6) * size / 250)
    pos, neg = _noise(size, rng)
    out = cv2.subtract(cv2.add(out, pos), neg)
    out = cv2.LUT(out, _gamma_lut(round(float(rng.uniform(0.75, 1.3)), 2)))
    if rng.random() < 0.5:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 90))])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


@functools.lru_cache(maxsize=128)
def _gamma_lut(gamma: float) -> np.ndarray:
    return np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)


_NOISE_LEVELS = (1.0, 2.5, 4.0, 6.0)  # sensor noise standard deviations, in grey levels


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    # one fixed field of Gaussian noise per level, split into its positive and negative parts so that adding
    # it is two saturating uint8 ops; each image takes a random window of it
    n = np.random.default_rng(12345).standard_normal((size + size // 2, size + size // 2, 3)).astype(np.float32)
    out = []
    for level in _NOISE_LEVELS:
        v = np.rint(n * level)
        out.append((np.clip(v, 0, 255).astype(np.uint8), np.clip(-v, 0, 255).astype(np.uint8)))
    return out


def _noise(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = _noise_bank(size)[int(rng.integers(len(_NOISE_LEVELS)))]
    dy, dx = rng.integers(0, size // 2 + 1, 2)
    return pos[dy : dy + size, dx : dx + size], neg[dy : dy + size, dx : dx + size]
