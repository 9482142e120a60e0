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

import math

import cv2
import numpy as np

from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.accessories import eyeglasses_sprite, scarf_sprite, sunglasses_sprite, surgical_mask_sprite
from pdsn_cli.occlusion.grid import Occlusion, block_bounds, block_occupancy, check_grid
from pdsn_cli.occlusion.objects import OBJECT_PLACEMENT, book_sprite, cup_sprite, hand_sprite, phone_sprite
from pdsn_cli.occlusion.placement import face_frame, paste, place_sprite, recolour, similarity, sprite_roi
from pdsn_cli.occlusion.sprites import Sprite

__all__ = [
    "OCCLUDERS",
    "Occlusion",
    "block_bounds",
    "block_occupancy",
    "occlude",
    "render_sprite",
    "prepare",
]

OCCLUDERS = ("block", "sunglasses", "eyeglasses", "scarf", "mask", "hand", "phone", "cup", "book", "square", "random")
#: what ``random`` draws from: ``square`` (a benchmark occluder, black 2×2 blocks) stays out, so seeded random
#: pair files keep the mix they had before it existed
RANDOM_KINDS = ("block", "sunglasses", "eyeglasses", "scarf", "mask", "hand", "phone", "cup", "book")
#: every kind a trainer drawing its own occlusions draws from (``random`` is their mix, so it is not listed again)
DRAWN = tuple(k for k in OCCLUDERS if k != "random")
ANATOMICAL = ("sunglasses", "eyeglasses", "scarf", "mask")
OBJECTS = ("hand", "phone", "cup", "book")
SPRITE_KINDS = ANATOMICAL + OBJECTS

_BANK_SIZE = 12  # sprites per kind
_BANK_SEED = 20190927

_PAINTERS = {
    "sunglasses": sunglasses_sprite,
    "eyeglasses": eyeglasses_sprite,
    "scarf": scarf_sprite,
    "mask": surgical_mask_sprite,
    "hand": hand_sprite,
    "phone": phone_sprite,
    "cup": cup_sprite,
    "book": book_sprite,
}

_BANKS: dict[str, list[Sprite]] = {}


def _bank(kind: str) -> list[Sprite]:
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
    check_grid(h, w, grid)
    if block is not None and (not isinstance(block, (int, np.integer)) or not 0 <= block < grid * grid):
        raise BadInputError(f"block {block!r} is outside the {grid}×{grid} grid (0..{grid * grid - 1})")
    if kind == "random":
        choices = RANDOM_KINDS if block is None else ("block",) + OBJECTS
        kind = choices[rng.integers(len(choices))]
    elif block is not None and kind in ANATOMICAL:
        raise BadInputError(f"{kind} is placed by the landmarks; block= only applies to block, {', '.join(OBJECTS)}")

    if kind == "square":
        return _square(chip, grid, rng, block)

    iso, face, (nose_u, nose_v) = face_frame(landmarks)

    if kind == "block":
        j = int(rng.integers(grid * grid)) if block is None else int(block)
        y0, y1, x0, x1 = block_bounds(h, w, grid, j)
        image = chip.copy()
        image[y0:y1, x0:x1] = recolour(_block_patch(rng, y1 - y0, x1 - x0), rng, 0.08, 0.3)
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        return Occlusion(image=image, mask=mask, blocks=block_occupancy(mask, grid), kind=kind)

    spr = _bank(kind)[rng.integers(_BANK_SIZE)]
    if kind in ("sunglasses", "eyeglasses"):
        s = rng.uniform(0.96, 1.1)
        local = similarity(s, s, math.radians(rng.normal(0, 1.5)), False)
        target = iso @ np.array([rng.normal(0, 0.02), rng.normal(0.0, 0.02), 1.0])
        m = place_sprite(spr, iso[:, :2], local, target)
        gain_sd, shade = 0.06, 0.3
    elif kind == "scarf":
        sx, sy = rng.uniform(0.95, 1.1, 2)
        local = similarity(sx, sy, math.radians(rng.normal(0, 3)), rng.random() < 0.5)
        target = face @ np.array([nose_u * 0.5, nose_v + rng.uniform(0.07, 0.16), 1.0])
        m = place_sprite(spr, face[:, :2], local, target)
        gain_sd, shade = 0.1, 0.5
    elif kind == "mask":
        local = similarity(rng.uniform(0.96, 1.08), rng.uniform(0.95, 1.05), math.radians(rng.normal(0, 2)), False)
        top = max(nose_v - rng.uniform(0.24, 0.34), 0.24)
        target = face @ np.array([nose_u * 0.6, top, 1.0])
        m = place_sprite(spr, face[:, :2], local, target)
        gain_sd, shade = 0.04, 0.35
    else:  # objects over the face
        spec = OBJECT_PLACEMENT[kind]
        if block is not None:
            y0, y1, x0, x1 = block_bounds(h, w, grid, int(block))
            target = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        else:
            target = face @ np.array([rng.uniform(-0.9, 0.9), rng.uniform(-0.4, 1.7), 1.0])
        s = rng.uniform(*spec["scale"])
        ang = math.radians(rng.uniform(-spec["rot"], spec["rot"]) + spec.get("base", 0.0) * rng.choice([-1, 0, 1]))
        local = similarity(s, s, ang, rng.random() < 0.5)
        m = place_sprite(spr, iso[:, :2], local, target)
        gain_sd, shade = spec["gain"], 0.5

    image = chip.copy()
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = sprite_roi(m, spr.rgba.shape[:2], h, w)
    if x1 > x0 and y1 > y0:
        m[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        rgba = cv2.warpAffine(spr.rgba, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        op = None if spr.opacity is None else cv2.warpAffine(spr.opacity, m, size, flags=cv2.INTER_LINEAR)
        # binary alpha: the mask is exactly the set of pixels written below
        roi_mask = rgba[..., 3] >= 128
        rgb = recolour(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), rng, gain_sd, shade)
        paste(image, x0, y0, rgb, roi_mask, op)
        mask[y0:y1, x0:x1] = roi_mask
    else:  # the sprite missed the chip entirely; keep the rng stream the same length either way
        recolour(np.zeros((1, 1, 3), np.uint8), rng, gain_sd, shade)
    return Occlusion(image=image, mask=mask, blocks=block_occupancy(mask, grid), kind=kind)

