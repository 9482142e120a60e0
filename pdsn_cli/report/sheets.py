"""PNG contact sheets and occluder sprite previews (rendering stays in report/, the engine only draws)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.data.synthetic import synthetic_faces
from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.occluders import OCCLUDERS, SPRITE_KINDS, occlude, render_sprite

__all__ = ["contact_sheet", "occluder_preview", "verify_sheet", "write_assets", "write_image", "write_png"]


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write a BGR(A) uint8 image as a maximally compressed PNG, atomically."""
    path = check_writable(path)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise BadInputError(f"could not encode {path} as PNG")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(buf.tobytes())
    return path


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image in the format its suffix names (.png, .jpg/.jpeg: quality 95), atomically."""
    path = check_writable(path)
    ext = Path(path).suffix.lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        raise BadInputError(f"{path}: write .png or .jpg")
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext != ".png" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise BadInputError(f"could not encode {path}")
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
    return write_png(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def write_assets(folder: str | os.PathLike) -> list[Path]:
    """Write each sprite kind's canonical look (bank variant 0) as ``<kind>.png`` (RGBA) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for kind in SPRITE_KINDS:
        rgba = render_sprite(kind, 0)
        bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
        out.append(write_png(folder / f"{kind}.png", bgra))
    return out


def occluder_preview(path: str | os.PathLike, seed: int = 0) -> Path:
    """A contact sheet of every occluder kind, each on two synthetic faces (150×150 centre crops)."""
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


def verify_sheet(result: dict, chips: dict[str, np.ndarray], grid: int, path: str | os.PathLike,
                 scale: int = 2) -> Path:
    """``pdsn verify --explain``: one row per pair, both chips with the blocks judged occluded outlined (red: in
    that photo; both photos' features lose the FDM of all of them), the score and the decision under them."""
    rows = []
    for r in result["pairs"]:
        tiles = []
        for key, blocks in (("image1", r["occluded_blocks1"]), ("image2", r["occluded_blocks2"])):
            chip = cv2.resize(chips[r[key]], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            h, w = chip.shape[:2]
            for j in blocks:
                row, col = divmod(j, grid)
                y0, y1 = round(row * h / grid), round((row + 1) * h / grid) - 1
                x0, x1 = round(col * w / grid), round((col + 1) * w / grid) - 1
                cv2.rectangle(chip, (x0, y0), (x1, y1), (230, 30, 30), 2)
            tiles.append(chip)
        pair = np.concatenate([tiles[0], np.full((tiles[0].shape[0], 8, 3), 32, np.uint8), tiles[1]], axis=1)
        text = np.full((26, pair.shape[1], 3), 32, np.uint8)
        verdict = "same person" if r["same"] else "different people"
        cv2.putText(text, f"{r['score']:.3f} vs {r['threshold']:.3f}: {verdict}", (4, 18), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5, (120, 230, 120) if r["same"] else (235, 235, 235), 1, cv2.LINE_AA)
        rows.append(np.concatenate([pair, text], axis=0))
    if not rows:
        raise BadInputError("--explain: no pair was verified, nothing to draw")
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=32) for r in rows])
    return write_png(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
