"""Painters of the accessories placed from the landmarks: sunglasses, eyeglasses, scarf, surgical mask.

Each takes the bank's ``rng`` and returns a :class:`Sprite` drawn in face units; the anchor is the point that
placement.py puts on the face (the eye midpoint for glasses, the top edge's middle for scarf and mask)."""

from __future__ import annotations

import numpy as np

from pdsn_cli.occlusion.sprites import Pen, Sprite, cloth_texture, ellipse, shaded


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


def sunglasses_sprite(rng: np.random.Generator) -> Sprite:
    pen = Pen(-1.5, -0.6, 1.5, 0.55)
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
            ellipse(0, 0.02, 0.92, b * 1.15, np.pi, 2 * np.pi, 30),
            [[0.92, 0.05], [0.7, 0.26], [0.25, 0.3], [0.1, 0.16]],
            [[-0.1, 0.16], [-0.25, 0.3], [-0.7, 0.26], [-0.92, 0.05]],
        ])
        shapes = [shape]
    else:
        shapes = [_lens_shape(style, side * 0.5, 0.02, a, b, side) for side in (-1, 1)]
        bridge_y = top + 0.08 if style != "aviator" else top + 0.05
        pen.line(ellipse(0, bridge_y + 0.1, 0.5 - a * 0.92, 0.08, np.pi * 1.1, np.pi * 1.9, 10), frame, fw * 1.1)
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


def eyeglasses_sprite(rng: np.random.Generator) -> Sprite:
    pen = Pen(-1.5, -0.6, 1.5, 0.55)
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
    pen.line(ellipse(0, top + 0.15, 0.5 - a * 0.95, 0.07, np.pi * 1.1, np.pi * 1.9, 10), frame, fw, opacity=1.0)
    # nose pads for metal frames
    if metal:
        for side in (-1, 1):
            pen.fill(ellipse(side * 0.13, 0.12, 0.03, 0.05), (215, 215, 210), opacity=0.8)
    # opacity outside the drawn parts must not exceed what the alpha allows
    pen.op = np.where(pen.alpha > 0, pen.op, 0).astype(np.uint8)
    return pen.sprite()


def scarf_sprite(rng: np.random.Generator) -> Sprite:
    # anchor (0, 0) = the middle of the top edge; the scarf hangs down past the bottom of any chip
    pen = Pen(-1.8, -0.25, 1.8, 2.8)
    u = np.linspace(-1.7, 1.7, 40)
    wave = rng.uniform(0.02, 0.05) * np.sin(u * rng.uniform(5, 9) + rng.uniform(0, 6))
    top = 0.1 * (u / 1.7) ** 2 + wave
    shape = np.concatenate([np.stack([u, top], 1), [[1.75, 2.8], [-1.75, 2.8]]])
    tex = cloth_texture(pen, rng)
    pen.pattern(shape, tex)
    # a rolled hem along the top edge and drape shadows falling from it
    hem = np.concatenate([np.stack([u, top], 1), np.stack([u, top + 0.12], 1)[::-1]])
    pen.shade(hem, lambda uu, vv: 1.12)
    pen.line(np.stack([u, top + 0.13], 1), shaded(tex.mean((0, 1)), 0.6), 0.025)
    for x in rng.uniform(-1.2, 1.2, 3):
        pen.shade(shape, lambda uu, vv, x=x: 1 - 0.18 * np.exp(-((uu - x - 0.15 * vv) ** 2) / 0.01) * (vv > 0.2))
    # the sides fold under the chin: darker towards the edges
    pen.shade(shape, lambda uu, vv: 1 - 0.25 * np.clip(np.abs(uu) - 0.9, 0, 1))
    return pen.sprite((0.0, 0.0))


def surgical_mask_sprite(rng: np.random.Generator) -> Sprite:
    # anchor (0, 0) = top centre of the mask on the nose bridge; the face units here are vertical-aware
    pen = Pen(-1.35, -0.15, 1.35, 1.6)
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
    loop = shaded(col, 0.97) if kind != "black" else (50, 50, 55)
    # ear loops behind the body: thin elastic towards the ears
    for side in (-1, 1):
        pen.line(ellipse(side * (half + 0.05), 0.55, 0.3, 0.42, -np.pi / 2 - 0.3 if side > 0 else np.pi / 2 + 0.3,
                          np.pi / 2 - 0.2 if side > 0 else 3 * np.pi / 2 + 0.2, 16), loop, 0.03)
    pen.fill(body, col)
    # pleats: three folds, each a shadow line under a highlight band
    for k, y in enumerate((0.45, 0.72, 0.99)):
        yy = y + 0.12 * (u / half) ** 2 * (1 - k * 0.3)
        pen.line(np.stack([u * 0.97, yy], 1), shaded(col, 0.82), 0.022)
        pen.line(np.stack([u * 0.97, yy - 0.04], 1), shaded(col, 1.06), 0.03)
    # cloth shading: the middle catches the light, the sides turn away
    pen.shade(body, lambda uu, vv: 1.04 - 0.22 * (uu / half) ** 2)
    # binding tape on the sides and a nose wire
    for side in (-1, 1):
        pen.line([[side * half * 0.99, 0.27], [side * half * 0.99, depth - 0.5]], shaded(col, 0.9), 0.06)
    pen.line(np.stack([u[14:27], top[14:27] + 0.04], 1), shaded(col, 0.85), 0.02)
    if rng.random() < 0.5:  # non-woven texture
        pen.shade(body, lambda uu, vv: 1 + 0.025 * np.sin(uu * 220) * np.sin(vv * 200))
    return pen.sprite((0.0, 0.0))
