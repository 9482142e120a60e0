"""Occlusion synthesis: masks are exactly the pixels written, blocks are targeted, placement follows the face."""

from __future__ import annotations

import glob
import os

import cv2
import numpy as np
import pytest

from conftest import LFW_DIR
from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.occluders import OCCLUDERS, SPRITE_KINDS, block_bounds, block_occupancy, occlude
from pdsn_cli.report.sheets import contact_sheet, write_assets
from pdsn_cli.data.synthetic import synthetic_faces

# 5-point templates (left eye, right eye, nose tip, left/right mouth corner) for the chip sizes trunks use
_ARC = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
TEMPLATES = {
    (150, 150): np.array([[45.0, 45.0], [102.0, 45.0], [73.5, 79.0], [50.0, 103.5], [97.0, 103.5]]),  # dlib-like
    (112, 96): _ARC,
    (112, 112): _ARC + [8.0, 0.0],
}
SIZES = list(TEMPLATES)
KINDS = [k for k in OCCLUDERS if k != "random"]


def _align(img, lm, size):
    m, _ = cv2.estimateAffinePartial2D(lm.astype(np.float32), TEMPLATES[size].astype(np.float32))
    h, w = size
    chip = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return chip, (lm @ m[:, :2].T + m[:, 2]).astype(np.float32)


@pytest.fixture(scope="module")
def chips():
    faces = synthetic_faces(identities=4, images_per_identity=2, seed=7)
    return {size: [_align(f.image, f.landmarks, size) for f in faces] for size in SIZES}


def _changed(a, b):
    return np.any(a != b, axis=2)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", OCCLUDERS)
def test_mask_is_exactly_what_changed(chips, kind, size):
    rng = np.random.default_rng(1)
    areas = np.outer(np.diff(np.linspace(0, size[0], 6).round()), np.diff(np.linspace(0, size[1], 6).round()))
    for chip, lm in chips[size]:
        occ = occlude(chip, lm, kind, rng)
        assert occ.image.shape == chip.shape and occ.image.dtype == np.uint8
        assert occ.mask.shape == size and occ.mask.dtype == np.bool_
        assert occ.blocks.shape == (5, 5) and occ.blocks.dtype == np.float32
        assert occ.kind in KINDS and (kind == "random" or occ.kind == kind)
        changed = _changed(occ.image, chip)
        assert not np.any(changed & ~occ.mask), "a pixel outside the mask changed"
        n = occ.mask.sum()
        assert n > 0.01 * chip.shape[0] * chip.shape[1]
        assert changed[occ.mask].mean() > (0.9 if occ.kind == "eyeglasses" else 0.97)
        np.testing.assert_array_equal(occ.blocks, block_occupancy(occ.mask, 5))
        assert abs(float((occ.blocks * areas).sum()) - n) < 1e-3 * n + 1
        assert 0.0 <= occ.blocks.min() and occ.blocks.max() <= 1.0


@pytest.mark.parametrize("kind", OCCLUDERS)
def test_deterministic_by_seed(chips, kind):
    chip, lm = chips[(112, 96)][0]
    a = [occlude(chip, lm, kind, np.random.default_rng(5)) for _ in range(2)]
    np.testing.assert_array_equal(a[0].image, a[1].image)
    np.testing.assert_array_equal(a[0].mask, a[1].mask)
    assert a[0].kind == a[1].kind
    others = [occlude(chip, lm, kind, np.random.default_rng(s)) for s in range(6, 10)]
    assert any(not np.array_equal(o.image, a[0].image) for o in others)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_block_targets_each_block(chips, size):
    chip, lm = chips[size][1]
    rng = np.random.default_rng(0)
    for j in range(25):
        occ = occlude(chip, lm, "block", rng, grid=5, block=j)
        flat = occ.blocks.ravel()
        assert flat[j] == 1.0 and int(np.argmax(flat)) == j
        assert np.all(np.delete(flat, j) == 0.0)
        y0, y1, x0, x1 = block_bounds(*size, 5, j)
        expect = np.zeros(size, bool)
        expect[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(occ.mask, expect)
        patch = occ.image[y0:y1, x0:x1].reshape(-1, 3)
        assert len(np.unique(patch, axis=0)) > 8, "block content should be a texture, not a flat square"


def test_random_kind_draws_many_kinds_and_honours_block(chips):
    chip, lm = chips[(150, 150)][2]
    rng = np.random.default_rng(3)
    seen = {occlude(chip, lm, "random", rng).kind for _ in range(80)}
    assert len(seen) >= 7 and "random" not in seen
    for j in (0, 7, 12, 24):
        for _ in range(4):
            occ = occlude(chip, lm, "random", rng, block=j)
            assert occ.kind in ("block", "hand", "phone", "cup", "book")
            y0, y1, x0, x1 = block_bounds(150, 150, 5, j)
            assert occ.mask[(y0 + y1) // 2, (x0 + x1) // 2], "object not centred on the requested block"


def _px(p):
    return int(round(float(p[1]))), int(round(float(p[0])))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_anatomical_placement(chips, size):
    rng = np.random.default_rng(11)
    for chip, lm in chips[size]:
        for _ in range(3):
            for kind in ("sunglasses", "eyeglasses"):
                m = occlude(chip, lm, kind, rng).mask
                assert m[_px(lm[0])] and m[_px(lm[1])], f"{kind} miss an eye"
                assert not m[_px(lm[3])] and not m[_px(lm[4])], f"{kind} reach the mouth"
            for kind in ("scarf", "mask"):
                m = occlude(chip, lm, kind, rng).mask
                assert m[_px(lm[3])] and m[_px(lm[4])], f"{kind} misses a mouth corner"
                for eye in lm[:2]:  # the eye and a little of the lower lid stay visible
                    y, x = _px(eye)
                    assert not m[y : y + 3, x - 1 : x + 2].any(), f"{kind} covers an eye"
            scarf = occlude(chip, lm, "scarf", rng).mask
            assert scarf[-1].mean() > 0.5, "a scarf hangs down to the bottom of the chip"


def test_block_occupancy_matches_brute_force():
    rng = np.random.default_rng(0)
    for h, w, grid in [(150, 150, 5), (112, 96, 5), (112, 112, 7), (37, 23, 3), (10, 10, 1), (9, 9, 9)]:
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        ye = np.linspace(0, h, grid + 1).round().astype(int)
        xe = np.linspace(0, w, grid + 1).round().astype(int)
        expect = np.array(
            [[mask[ye[r] : ye[r + 1], xe[c] : xe[c + 1]].mean() for c in range(grid)] for r in range(grid)]
        )
        got = block_occupancy(mask, grid)
        assert got.dtype == np.float32 and got.shape == (grid, grid)
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6)
        # bounds tile the image exactly, row-major
        cover = np.zeros((h, w), int)
        for j in range(grid * grid):
            y0, y1, x0, x1 = block_bounds(h, w, grid, j)
            assert (y0, y1, x0, x1) == (ye[j // grid], ye[j // grid + 1], xe[j % grid], xe[j % grid + 1])
            cover[y0:y1, x0:x1] += 1
        assert np.all(cover == 1)
    assert np.all(block_occupancy(np.ones((20, 30), bool), 4) == 1.0)
    assert np.all(block_occupancy(np.zeros((20, 30), bool), 4) == 0.0)


def test_bad_input_is_refused(chips):
    chip, lm = chips[(112, 112)][0]
    rng = np.random.default_rng(0)
    with pytest.raises(BadInputError, match="unknown occluder"):
        occlude(chip, lm, "helmet", rng)
    for bad in (-1, 25, 100):
        with pytest.raises(BadInputError, match="outside the 5×5 grid"):
            occlude(chip, lm, "block", rng, block=bad)
        with pytest.raises(BadInputError):
            block_bounds(112, 112, 5, bad)
    with pytest.raises(BadInputError):
        occlude(chip, lm, "sunglasses", rng, block=3)
    with pytest.raises(BadInputError, match="landmarks"):
        occlude(chip, lm[:3], "mask", rng)
    with pytest.raises(BadInputError, match="too close"):
        occlude(chip, np.zeros((5, 2), np.float32), "mask", rng)
    with pytest.raises(BadInputError):
        occlude(chip.astype(np.float32), lm, "mask", rng)
    with pytest.raises(BadInputError):
        block_occupancy(np.zeros((4, 4), bool), 5)
    with pytest.raises(BadInputError):
        block_occupancy(np.zeros((4, 4), bool), 0)
    # every message is one line
    try:
        occlude(chip, lm, "helmet", rng)
    except BadInputError as e:
        assert "\n" not in str(e)


def test_contact_sheet(tmp_path, chips):
    imgs = [c for c, _ in chips[(112, 96)][:5]] + [chips[(150, 150)][0][0]]
    out = contact_sheet(imgs, tmp_path / "sheet.png", cols=4, labels=[f"im{i}" for i in range(6)])
    sheet = cv2.imread(str(out))
    assert sheet is not None and sheet.shape[0] > 2 * 150 and sheet.shape[1] > 4 * 150
    assert not (tmp_path / "sheet.png.partial").exists()
    with pytest.raises(BadInputError):
        contact_sheet([], tmp_path / "empty.png")
    with pytest.raises(BadInputError):
        contact_sheet(imgs, tmp_path / "x.png", labels=["one"])
    with pytest.raises(BadInputError):
        contact_sheet(imgs, tmp_path / "missing" / "x.png")


def test_write_assets(tmp_path):
    paths = write_assets(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{k}.png" for k in SPRITE_KINDS)
    for p in paths:
        assert p.stat().st_size <= 30 * 1024
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 3 and img.shape[2] == 4
        alpha = img[..., 3]
        assert (alpha == 0).any() and (alpha > 0).mean() > 0.1
    # the committed previews are these same renders
    repo_assets = os.path.join(os.path.dirname(__file__), "..", "assets", "occluders")
    for p in paths:
        committed = os.path.join(repo_assets, p.name)
        if os.path.exists(committed):
            assert os.path.getsize(committed) <= 30 * 1024




@pytest.mark.skipif(not glob.glob(os.path.join(LFW_DIR, "*", "*.jpg"))[:1], reason="LFW not present")
def test_real_photos_center_crops():
    files = sorted(glob.glob(os.path.join(LFW_DIR, "*", "*.jpg")))[:: 2000][:6]
    lm = (np.array([[0.35, 0.42], [0.65, 0.42], [0.5, 0.58], [0.38, 0.72], [0.62, 0.72]]) * 150).astype(np.float32)
    rng = np.random.default_rng(0)
    for f in files:
        chip = cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB)[50:200, 50:200].copy()
        for kind in KINDS:
            occ = occlude(chip, lm, kind, rng)
            assert not np.any(_changed(occ.image, chip) & ~occ.mask)


def test_square_is_black_2x2_blocks_anywhere_on_the_grid(chips):
    chip, lm = chips[(150, 150)][0]
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(60):
        occ = occlude(chip, lm, "square", rng)
        assert occ.kind == "square" and occ.mask.sum() == 60 * 60
        assert (occ.image[occ.mask] == 0).all()
        full = np.argwhere(occ.blocks == 1.0)
        assert len(full) == 4 and np.ptp(full[:, 0]) == 1 and np.ptp(full[:, 1]) == 1
        corners.add(tuple(full.min(0)))
    assert len(corners) == 16, "every top-left position of a 5×5 grid is drawn"
    occ = occlude(chip, lm, "square", rng, block=18)  # row 3, col 3: the bottom-right square
    assert occ.blocks[3:, 3:].min() == 1.0
    with pytest.raises(BadInputError):
        occlude(chip, lm, "square", rng, block=4)  # would leave the grid
    assert all(occlude(chip, lm, "random", rng).kind != "square" for _ in range(40))
