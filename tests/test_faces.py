"""Image decoding and identity-folder listing: every bad file becomes a reason, never a crash."""

from __future__ import annotations

import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from conftest import write_jpeg
from pdsn_cli.errors import BadInputError
from pdsn_cli.data.faces import MAX_PIXELS, BadImage, FaceItem, list_identity_folder, read_identity_list, read_image


def _face(h=64, w=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(40, 220, 3)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (230, 180, 150), -1)
    return img


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size (CRC fixed, so decoders trust the header)."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + png[33:]


def test_reads_jpeg_as_rgb(tmp_path):
    img = _face()
    p = write_jpeg(tmp_path / "a.jpg", img, quality=100)
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 2  # RGB order kept (not BGR)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImage, match="empty file"):
        read_image(p)


def test_truncated_jpeg(tmp_path):
    p = write_jpeg(tmp_path / "t.jpg", _face(200, 200))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        read_image(p)


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 20)
    with pytest.raises(BadImage, match="not an image"):
        read_image(p)


def test_rgba_png_composited_on_grey(tmp_path):
    bgra = np.zeros((32, 32, 4), np.uint8)
    bgra[:, :16] = (255, 0, 0, 255)  # opaque blue (BGR order for cv2)
    bgra[:, 16:] = (0, 0, 255, 0)  # fully transparent red
    p = tmp_path / "a.png"
    p.write_bytes(_png(bgra))
    out = read_image(p)
    assert out.shape == (32, 32, 3)
    assert (out[:, :16] == (0, 0, 255)).all()
    assert (out[:, 16:] == 128).all()


def test_16_bit_png_scaled_to_8_bit(tmp_path):
    a = np.zeros((20, 30), np.uint16)
    a[:, 15:] = 65535
    a[:10, :15] = 32768
    p = tmp_path / "deep.png"
    p.write_bytes(_png(a))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert (out[:, 15:] == 255).all()
    assert (out[10:, :15] == 0).all()
    assert abs(int(out[0, 0, 0]) - 128) <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (24, 1))
    p = tmp_path / "g.png"
    p.write_bytes(_png(g))
    out = read_image(p)
    assert out.shape == (24, 50, 3)
    assert all((out[..., c] == g).all() for c in range(3))


def test_one_pixel_image_is_too_small(tmp_path):
    p = tmp_path / "dot.png"
    p.write_bytes(_png(np.zeros((1, 1, 3), np.uint8)))
    with pytest.raises(BadImage, match="too small"):
        read_image(p)


@pytest.mark.parametrize("side", [7000, 20000])
def test_decompression_bomb_header_refused_without_decoding(tmp_path, side):
    p = tmp_path / "bomb.png"
    p.write_bytes(_with_ihdr_size(_png(_face(16, 16)), side, side))
    assert side * side > MAX_PIXELS
    with pytest.raises(BadImage, match="too large|bomb"):
        read_image(p)


def test_non_utf8_file_name(tmp_path):
    folder = os.fsencode(tmp_path)
    raw = folder + b"/caf\xe9.jpg"  # Latin-1 é: not valid UTF-8
    with open(raw, "wb") as fh:
        fh.write(write_jpeg(tmp_path / "x.jpg", _face()).read_bytes())
    assert read_image(raw).shape == (64, 48, 3)  # the bytes path itself
    assert read_image(os.fsdecode(raw)).shape == (64, 48, 3)  # and its surrogate-escaped str


def test_symlink_loop_and_missing_file(tmp_path):
    loop = tmp_path / "loop.jpg"
    os.symlink(loop.name, loop)
    with pytest.raises(BadImage, match="cannot stat"):
        read_image(loop)
    with pytest.raises(BadImage, match="cannot stat"):
        read_image(tmp_path / "nowhere.jpg")


def test_identity_folder_lists_images_and_reports_skips(tmp_path):
    root = tmp_path / "data"
    write_jpeg(root / "Bob" / "Bob_0002.jpg", _face(seed=2))
    write_jpeg(root / "Bob" / "Bob_0001.jpg", _face(seed=1))
    write_jpeg(root / "Ann" / "Ann_0001.JPG", _face(seed=3))
    (root / "Ann" / "notes.txt").write_text("not a face")
    os.symlink("loop.jpg", root / "Ann" / "loop.jpg")
    os.symlink("gone.jpg", root / "Ann" / "dangling.jpg")
    (root / "Ann" / "sub").mkdir()  # nested folders are not images and not errors
    (root / "pairs.txt").write_text("10\t300\n")  # top-level files are protocol files, not faces
    with open(os.fsencode(root / "Bob") + b"/caf\xe9.jpg", "wb") as fh:
        fh.write((root / "Bob" / "Bob_0001.jpg").read_bytes())

    items, skipped = list_identity_folder(root)
    assert items == [
        FaceItem("Ann/Ann_0001.JPG", "Ann"),
        FaceItem("Bob/Bob_0001.jpg", "Bob"),
        FaceItem("Bob/Bob_0002.jpg", "Bob"),
        # shown with the bad byte escaped (printable everywhere), opened by its name on disk
        FaceItem("Bob/caf\\xe9.jpg", "Bob", os.fsdecode(b"Bob/caf\xe9.jpg")),
    ]
    reasons = {s.path: s.reason for s in skipped}
    assert reasons.keys() == {"Ann/notes.txt", "Ann/loop.jpg", "Ann/dangling.jpg"}
    assert "extension" in reasons["Ann/notes.txt"]
    assert "symbolic links" in reasons["Ann/loop.jpg"] or "symlink" in reasons["Ann/loop.jpg"]
    assert "symlink" in reasons["Ann/dangling.jpg"]
    assert all(s.as_dict() == {"path": s.path, "reason": s.reason} for s in skipped)

    only_bob, _ = list_identity_folder(root, identities={"Bob"})
    assert {i.identity for i in only_bob} == {"Bob"}


def test_identity_folder_errors(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        list_identity_folder(tmp_path / "missing")
    ids = tmp_path / "ids.txt"
    ids.write_text("# train identities\nAnn\n\nBob  \n")
    assert read_identity_list(ids) == {"Ann", "Bob"}
    ids.write_text("# nothing\n\n")
    with pytest.raises(BadInputError, match="no identity"):
        read_identity_list(ids)
