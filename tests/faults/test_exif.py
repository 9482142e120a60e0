"""EXIF orientation is applied on read: a photo stored sideways (as phones do) is read upright, for every
orientation 1–8 and both containers that carry it (JPEG's APP1, PNG's eXIf chunk)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pdsn_cli.data.faces import read_image

ORIENTATION = 0x0112


def upright() -> np.ndarray:
    """A non-square, smooth image with no symmetry: every flip or rotation of it differs clearly."""
    h, w = 48, 80
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 60)], axis=2).astype(np.uint8)
    img[4:16, 4:24] = 255  # a bright patch near the top-left corner
    return img


def stored(img: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for an upright ``img`` under ``orientation`` (the EXIF 2.3 definitions:
    the row/column of the stored image that is the upright image's top row/left column)."""
    return {
        1: img,
        2: img[:, ::-1],  # mirrored left-right
        3: img[::-1, ::-1],  # upside down
        4: img[::-1, :],  # mirrored top-bottom
        5: img.transpose(1, 0, 2),  # mirrored along the main diagonal
        6: np.rot90(img, 1),  # stored turned 90° anticlockwise: shown turned clockwise
        7: img[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
        8: np.rot90(img, -1),  # stored turned clockwise: shown turned anticlockwise
    }[orientation]


def encoded(img: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    extra = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format=fmt, exif=exif.tobytes(), **extra)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, suffix, tolerance", [("PNG", ".png", 0.0), ("JPEG", ".jpg", 3.0)])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_reads_upright(orientation, fmt, suffix, tolerance, tmp_path):
    want = upright()
    p = tmp_path / f"photo{suffix}"
    p.write_bytes(encoded(stored(want, orientation), fmt, orientation))
    got = read_image(p)
    assert got.shape == want.shape
    error = np.abs(got.astype(float) - want).mean()
    assert error <= tolerance
    wrong = min(np.abs(got.astype(float) - o).mean() for o in
                (want[::-1], want[:, ::-1], want[::-1, ::-1]))
    assert wrong > 10 * max(error, 1.0)  # the comparison can tell orientations apart


def test_damaged_exif_block_is_ignored_not_fatal(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(upright()).save(buf, format="PNG")
    png = buf.getvalue()
    payload = b"MM\x00\x2a" + b"\xff" * 12  # a TIFF header whose first IFD offset points nowhere
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    i = png.index(b"IDAT") - 4  # before the first image data chunk, where eXIf belongs
    p = tmp_path / "odd.png"
    p.write_bytes(png[:i] + chunk + png[i:])
    assert np.array_equal(read_image(p), upright())
