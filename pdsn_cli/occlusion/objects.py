"""Painters of the objects held over the face (hand, phone, cup, book) and how each is placed."""

from __future__ import annotations

import math

import numpy as np

from pdsn_cli.occlusion.sprites import Pen, Sprite, capsule, ellipse, palette, rounded_rect, shaded

# scale in inter-ocular distances (1 = the sprite as drawn), rotation range in degrees, colour gain spread
OBJECT_PLACEMENT = {
    "hand": {"scale": (0.75, 1.05), "rot": 70.0, "base": 35.0, "gain": 0.04},
    "phone": {"scale": (0.8, 1.05), "rot": 35.0, "gain": 0.1},
    "cup": {"scale": (0.8, 1.1), "rot": 15.0, "gain": 0.12},
    "book": {"scale": (0.75, 1.0), "rot": 30.0, "gain": 0.12},
}

_SKIN_TONES = [(241, 200, 175), (228, 180, 150), (210, 160, 125), (185, 135, 100), (150, 100, 70), (105, 70, 50)]


def hand_sprite(rng: np.random.Generator) -> Sprite:
    # fingers up, anchor = the middle of the palm; the forearm runs down out of the picture
    pen = Pen(-1.2, -2.0, 1.25, 3.2)
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    lo = int(t)
    skin = np.asarray(_SKIN_TONES[lo], float) * (1 - t + lo) + np.asarray(_SKIN_TONES[lo + 1], float) * (t - lo)
    skin = skin * rng.uniform(0.95, 1.05, 3)
    dark = shaded(skin, 0.75)
    palm_side = rng.random() < 0.4
    sleeve = rng.random() < 0.6
    spread = rng.uniform(0.0, 1.0)
    lengths = np.array([0.95, 1.08, 1.0, 0.78]) * rng.uniform(0.92, 1.08)
    xs = np.array([-0.45, -0.15, 0.15, 0.44])
    ang = np.radians(np.array([-9, -3, 3, 10]) * spread)
    fw = rng.uniform(0.26, 0.31)
    # forearm and sleeve
    pen.fill([[-0.48, 0.5], [0.52, 0.5], [0.6, 3.2], [-0.6, 3.2]], shaded(skin, 0.95))
    if sleeve:
        sc = palette(rng, 1)[0]
        cuff = rng.uniform(1.0, 1.6)
        pen.fill([[-0.7, cuff], [0.72, cuff - 0.05], [0.8, 3.2], [-0.8, 3.2]], sc)
        pen.line([[-0.7, cuff], [0.72, cuff - 0.05]], shaded(sc, 0.7), 0.04)
    # thumb, then palm, then fingers on top
    t0 = np.array([0.5, 0.25])
    tdir = np.array([math.sin(math.radians(40 + 20 * spread)), -math.cos(math.radians(40 + 20 * spread))])
    pen.fill(capsule(t0, t0 + tdir * 0.8, 0.3), skin)
    pen.line(capsule(t0, t0 + tdir * 0.8, 0.3)[1:-1], dark, 0.015)
    palm = np.concatenate([
        ellipse(0.02, -0.1, 0.62, 0.45, np.pi, 2 * np.pi, 14),
        [[0.62, 0.1], [0.55, 0.45], [0.48, 0.6], [-0.45, 0.6], [-0.55, 0.4], [-0.62, 0.05]],
    ])
    pen.fill(palm, skin)
    for x, ln, a in zip(xs, lengths, ang):
        base = np.array([x, -0.35])
        tip = base + np.array([math.sin(a), -math.cos(a)]) * ln
        cap = capsule(base, tip, fw)
        pen.fill(cap, skin)
        pen.line(cap[1:-1], dark, 0.015)
        d = (tip - base) / ln
        nrm = np.array([-d[1], d[0]])
        if not palm_side:  # fingernails and knuckle creases on the back of the hand
            nc = tip - d * 0.13
            ring = np.linspace(0, 2 * np.pi, 16)[:, None]
            nail = nc + nrm * fw * 0.32 * np.cos(ring) + d * 0.1 * np.sin(ring)
            pen.fill(nail, shaded(skin, 1.04) * [1.0, 0.93, 0.93])
            pen.line(nail, shaded(skin, 0.8), 0.01, closed=True)
        for f in (0.42, 0.7):
            c = base + d * ln * f
            pen.line([c - nrm * fw * 0.3, c + nrm * fw * 0.3], shaded(skin, 0.82), 0.012)
    # shading: roundness across the palm and a soft shadow at the finger roots
    pen.shade(None, lambda u, v: 1.0 - 0.12 * np.minimum((u / 0.7) ** 2, 1.0))
    pen.shade(palm, lambda u, v: 1 - 0.08 * np.exp(-((v + 0.3) ** 2) / 0.01))
    if palm_side:  # palm lines
        pen.line(ellipse(0.05, -0.05, 0.5, 0.25, np.pi * 1.05, np.pi * 1.6, 10), shaded(skin, 0.72), 0.015)
        pen.line(ellipse(0.3, 0.1, 0.5, 0.35, np.pi * 0.95, np.pi * 1.35, 10), shaded(skin, 0.72), 0.015)
    return pen.sprite((0.0, 0.0))


def phone_sprite(rng: np.random.Generator) -> Sprite:
    w, h = rng.uniform(1.05, 1.2) / 2, rng.uniform(2.1, 2.45) / 2
    pen = Pen(-w - 0.05, -h - 0.05, w + 0.05, h + 0.05)
    r = rng.uniform(0.12, 0.2)
    body = rounded_rect(-w, -h, w, h, r)
    front = rng.random() < 0.6
    if front:
        bezel = np.asarray([(18, 18, 20), (235, 235, 238), (40, 42, 48)][rng.integers(3)], float)
        pen.fill(body, bezel)
        pen.line(body, shaded(bezel, 0.6) + 40, 0.02, closed=True)
        m = rng.uniform(0.04, 0.07)
        scr = rounded_rect(-w + m, -h + m * 1.5, w - m, h - m * 1.5, max(r - m, 0.03))
        lit = rng.random() < 0.4
        if lit:  # a lit home screen: wallpaper gradient and an icon grid
            c0, c1 = palette(rng, 2)
            pen.fill(scr, c0)
            pen.shade(scr, lambda u, v: 0.7 + 0.5 * (v + h) / (2 * h))
            step = (2 * w - 2 * m) / 4
            for i in range(4):
                for j in range(5):
                    x = -w + m + step * (i + 0.5)
                    y = -h + m * 1.5 + 0.25 + j * step * 1.1
                    if y + step * 0.3 < h - 0.3:
                        pen.fill(rounded_rect(x - step * 0.3, y - step * 0.3, x + step * 0.3, y + step * 0.3, 0.04),
                                 rng.uniform(40, 250, 3))
        else:
            pen.fill(scr, (14, 16, 24))
            pen.shade(scr, lambda u, v: 1 + 0.6 * np.clip(0.3 - (u + v * 0.4 + 0.2) ** 2, 0, 1))
        # glare: a bright diagonal band across the glass
        g0 = rng.uniform(-0.4, 0.4)
        pen.shade(scr, lambda u, v: np.where(np.abs(u * 0.9 - v * 0.45 - g0) < 0.12, 1.55 if lit else 3.5, 1.0))
        pen.fill(ellipse(0, -h + m * 0.75, 0.025, 0.025), (40, 45, 60))
    else:
        col = np.asarray([(25, 25, 28), (230, 230, 232), (60, 90, 150), (235, 190, 200), (210, 185, 140),
                          (80, 120, 90)][rng.integers(6)], float)
        pen.fill(body, col)
        pen.shade(body, lambda u, v: 0.9 + 0.2 * (u + w) / (2 * w))
        cam = rounded_rect(-w + 0.08, -h + 0.08, -w + 0.5, -h + 0.5, 0.1)
        pen.fill(cam, shaded(col, 0.85))
        for cx, cy in ((-w + 0.2, -h + 0.2), (-w + 0.38, -h + 0.2), (-w + 0.2, -h + 0.38)):
            pen.fill(ellipse(cx, cy, 0.07, 0.07), (20, 20, 25))
            pen.fill(ellipse(cx + 0.015, cy - 0.015, 0.02, 0.02), (120, 130, 150))
        pen.fill(ellipse(0, 0, 0.12, 0.12), shaded(col, 0.8 if col.mean() > 100 else 1.6))
        pen.shade(body, lambda u, v: np.where(np.abs(u * 0.9 - v * 0.45) < 0.15, 1.15, 1.0))
    return pen.sprite((0.0, 0.0))


def cup_sprite(rng: np.random.Generator) -> Sprite:
    pen = Pen(-1.0, -1.05, 1.45, 1.0)
    paper = rng.random() < 0.3
    col = np.asarray(rng.choice([(240, 240, 236), (200, 40, 40), (40, 80, 160), (245, 200, 60), (60, 150, 90),
                                 (30, 30, 32), (235, 140, 50), (160, 100, 170)]), float)
    if paper:  # a takeaway cup: tapered, sleeve, lid
        w0, w1, y0, y1 = 0.62, 0.46, -0.7, 0.85
        body = np.array([[-w0, y0], [w0, y0], [w1, y1], [-w1, y1]])
        pen.fill(body, (245, 243, 238))
        sl = np.array([[-0.58, -0.2], [0.58, -0.2], [0.52, 0.35], [-0.52, 0.35]])
        pen.fill(sl, (165, 120, 80))
        pen.fill(rounded_rect(-0.7, -0.9, 0.7, -0.68, 0.06), (250, 250, 250) if rng.random() < 0.5 else (30, 30, 30))
        pen.fill(rounded_rect(-0.55, -1.0, 0.55, -0.86, 0.05), shaded((235, 235, 235), 0.95))
        pen.fill(ellipse(0, 0.07, 0.18, 0.12), col)
        shape = body
    else:  # a mug: cylinder body, rim, handle
        w, top, bot = rng.uniform(0.58, 0.7), -0.72, 0.72
        hx = w + 0.22
        pen.line(ellipse(hx - 0.08, 0.0, 0.3, 0.36, -np.pi / 2 - 0.2, np.pi / 2 + 0.2, 20), col, 0.15)
        body = np.concatenate([[[-w, top], [w, top]], ellipse(0, bot - 0.1, w, 0.1, 0, np.pi, 12)])
        pen.fill(body, col)
        deco = rng.integers(4)
        if deco == 1:
            pen.fill([[-w, -0.25], [w, -0.25], [w, 0.05], [-w, 0.05]], palette(rng, 1)[0])
        elif deco == 2:
            for x in np.arange(-w + 0.12, w, 0.25):
                for y in np.arange(-0.55, 0.6, 0.25):
                    pen.fill(ellipse(x, y, 0.05, 0.05), palette(rng, 1)[0])
        elif deco == 3:
            pen.fill(ellipse(0, -0.05, 0.28, 0.28), shaded(col, 0.6) if col.mean() > 128 else shaded(col, 2.5))
        # the opening: rim ellipse with the drink inside
        pen.fill(ellipse(0, top, w, 0.13), shaded(col, 0.9))
        pen.fill(ellipse(0, top + 0.01, w * 0.9, 0.1), rng.choice([(70, 40, 25), (110, 70, 45), (185, 150, 110)]))
        shape = body
    # cylinder shading with a highlight stripe
    hl = rng.uniform(-0.35, -0.1)
    def cylinder(u, v):
        return 0.72 + 0.4 * np.cos(np.clip(u / 0.75, -1.2, 1.2) * 1.2) ** 0.5 + 0.35 * np.exp(-((u - hl) ** 2) / 0.004)

    pen.shade(shape, cylinder)
    return pen.sprite((0.0, 0.0))


def book_sprite(rng: np.random.Generator) -> Sprite:
    w, h = rng.uniform(1.5, 1.8) / 2, rng.uniform(2.2, 2.6) / 2
    pen = Pen(-w - 0.25, -h - 0.1, w + 0.25, h + 0.25)
    cols = palette(rng, 3)
    if rng.random() < 0.65:  # closed, seen a little from the side: page block visible right and bottom
        d = rng.uniform(0.08, 0.14)
        pages = np.array([[w, -h], [w + d, -h + d], [w + d, h + d], [-w + d, h + d], [-w, h], [w, h]])
        pen.fill(pages, (238, 232, 215))
        for k in np.linspace(0.15, 0.85, 7):
            pen.line([[w + d * k, -h + d * k], [w + d * k, h + d * k]], (190, 182, 165), 0.008)
            pen.line([[-w + d * k, h + d * k], [w + d * k, h + d * k]], (190, 182, 165), 0.008)
        cover = rounded_rect(-w, -h, w, h, 0.03)
        pen.fill(cover, cols[0])
        pen.fill([[-w, -h], [-w + 0.16, -h], [-w + 0.16, h], [-w, h]], shaded(cols[0], 0.75))  # spine hinge
        # title block and "text": bars of varying length
        ty = -h + rng.uniform(0.25, 0.5)
        pen.fill([[-w + 0.3, ty], [w - 0.15, ty], [w - 0.15, ty + 0.45], [-w + 0.3, ty + 0.45]], cols[1])
        for k in range(2):
            ln = rng.uniform(0.5, 1.0) * (2 * w - 0.65)
            pen.line([[-w + 0.4, ty + 0.13 + k * 0.18], [-w + 0.4 + ln, ty + 0.13 + k * 0.18]], cols[2], 0.07)
        emblem = rng.integers(3)
        if emblem == 0:
            pen.fill(ellipse(0.05, 0.35, 0.3, 0.3), cols[2])
        elif emblem == 1:
            pen.fill([[0.05, 0.0], [0.4, 0.65], [-0.3, 0.65]], cols[2])
        ln = rng.uniform(0.4, 0.8) * (2 * w - 0.65)
        pen.line([[-w + 0.4, h - 0.3], [-w + 0.4 + ln, h - 0.3]], shaded(cols[1], 0.8), 0.05)
        pen.shade(cover, lambda u, v: 0.9 + 0.15 * (u + w) / (2 * w))
    else:  # open: two pages of text around the gutter, the cover showing at the edges
        cover = rounded_rect(-w - 0.2, -h - 0.05, w + 0.2, h + 0.15, 0.04)
        pen.fill(cover, cols[0])
        for side in (-1, 1):
            page = np.array([[0, -h + 0.05], [side * (w + 0.1), -h], [side * (w + 0.1), h + 0.05], [0, h + 0.1]])
            pen.fill(page, (243, 238, 225))
            for y in np.arange(-h + 0.25, h - 0.1, 0.11):
                x0, x1 = side * 0.15, side * (w - 0.05) * rng.uniform(0.8, 1.0)
                pen.line([[x0, y], [x1, y]], (120, 118, 115), 0.025)
        pen.shade(cover, lambda u, v: 1 - 0.35 * np.exp(-(u**2) / 0.01))
    return pen.sprite((0.0, 0.0))

