"""Reading face photos: identity-folder datasets and robust image decoding.

Layout ``root/<identity>/<image>`` (LFW, CASIA-WebFace, ORL, VGGFace). A bad file never crashes a run: it is
skipped and reported with the reason (zero-byte, truncated, not an image, too small, too large, unreadable).
The memory an image needs is estimated from its header before any pixel is decoded, and the EXIF orientation
of phone photos is applied, so every image is read upright.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pdsn_cli.errors import BadInputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp", ".gif"}
#: refuse to decode images above this many pixels (a 20000×20000 header would need 1.2 GB)
MAX_PIXELS = 40_000_000
#: refuse to decode an image whose decoding would need more memory than this (estimated from the header;
#: ``PDSN_MAX_IMAGE_MB`` overrides it). Every image under MAX_PIXELS in 8-bit RGB fits with room to spare.
MAX_DECODE_BYTES = 1 << 30
#: smaller images hold no usable face
MIN_SIDE = 16
#: the AR face database's original frames: header-less .raw files of this size (see ``read_raw``)
RAW_WIDTH, RAW_HEIGHT = 768, 576
RAW_BYTES = RAW_WIDTH * RAW_HEIGHT * 3  # 1,327,104


class BadImage(Exception):
    """A file that cannot be used as a face image; ``str(e)`` is the reason shown to the user."""


@dataclass(frozen=True)
class FaceItem:
    path: str  # relative to the data root, '/'-separated, printable (see ``printable``)
    identity: str
    #: the relative path on disk when it differs from ``path`` (a non-UTF-8 name, surrogate-escaped)
    file: str | None = None


@dataclass
class Skipped:
    path: str
    reason: str

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


#: control characters (ESC, newline, BEL, C1 codes) shown as \\xNN: a file name must never drive the terminal
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(name: str) -> str:
    """A file name that survives UTF-8 output and HDF5 and is safe on a terminal (non-UTF-8 bytes and control
    characters shown as \\xNN)."""
    try:
        text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decoding produced
        text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL_ESCAPES)


#: skip reasons that depend on this run's settings or memory, not on the file: never remembered for later runs
TRANSIENT_REASONS = ("image too large to decode", "out of memory")


def max_decode_bytes() -> int:
    mb = os.environ.get("PDSN_MAX_IMAGE_MB", "").strip()
    if not mb:
        return MAX_DECODE_BYTES
    try:
        value = float(mb)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise BadInputError(f"PDSN_MAX_IMAGE_MB must be a positive number of megabytes, got {mb!r}")
    return int(value * 2**20)


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Peak memory ``read_image`` needs for an image of this mode and size: the decoded pixels, an upright copy
    (EXIF orientation), and the conversion to RGB uint8 (float arrays for 16-bit, float and transparent images)."""
    per_pixel = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}.get(mode, len(mode))
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        convert = 8 + 8 + 1 + 3  # float64 copy, scaled copy, uint8, RGB
    elif mode in ("RGBA", "LA", "PA", "P"):
        convert = 4 + 16 + 12 + 3  # RGBA, float32 RGBA, float32 RGB, RGB
    else:
        convert = 3 + 3  # RGB, contiguous copy
    return width * height * (2 * per_pixel + convert)


def read_image(path: str | bytes | os.PathLike) -> np.ndarray:
    """Decode any common image to upright RGB uint8 H×W×3, or raise BadImage with the reason.

    Pillow reads the header first, so a decompression bomb or an image that would need more than
    ``max_decode_bytes()`` is refused before any pixel is decoded, and its strict decoder reports truncated files
    that OpenCV would silently pad with grey. The EXIF orientation (JPEG, PNG, TIFF, WebP) is applied.
    """
    path = Path(os.fsdecode(path))  # bytes paths (non-UTF-8 names) become surrogate-escaped str
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage(f"cannot stat: {e.strerror or e}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    if path.suffix.lower() == ".raw":  # the AR face database's header-less frames (no other .raw is decodable)
        if size == RAW_BYTES:
            return read_raw(path)
    try:
        with open(path, "rb") as fh:
            with Image.open(fh) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"image too large ({w}×{h} > {MAX_PIXELS:,} pixels)")
                if min(w, h) < MIN_SIDE:
                    raise BadImage(f"image too small ({w}×{h})")
                need, ceiling = decode_bytes(im.mode, w, h), max_decode_bytes()
                if need > ceiling:
                    raise BadImage(f"image too large to decode ({w}×{h} {im.mode} needs about {need / 2**20:,.0f} MB, "
                                   f"over the per-image ceiling of {ceiling / 2**20:,.0f} MB; PDSN_MAX_IMAGE_MB raises it)")
                im.load()
                arr = _to_rgb8(_upright(im))
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb refused: {e}") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except MemoryError:
        raise BadImage("out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    return arr


def read_photo(path: Path) -> np.ndarray:
    """One photo a user named (``pdsn verify``, ``pdsn occlude``): decoded as ``read_image`` does, or one line
    (BadInputError) saying why not — a folder, a missing file, or the reason it is not a readable image."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path} is a folder, not an image (pdsn embed --input embeds a folder)")
    if not path.exists():
        raise BadInputError(f"no such image: {path}")
    try:
        return read_image(path)
    except BadImage as e:
        raise BadInputError(f"{path}: {e}") from None


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """One frame of the original release: 768×576, three whole colour planes (R, G, B) of 576 rows × 768
    bytes, no header. Returns RGB uint8 576×768×3, or raises BadImage with the reason."""
    path = Path(os.fsdecode(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read(RAW_BYTES + 1)
    except PermissionError:
        raise BadImage("permission denied") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if len(data) != RAW_BYTES:
        size = f"{len(data):,} bytes" if len(data) <= RAW_BYTES else f"more than {RAW_BYTES:,} bytes"
        raise BadImage(f"not an AR .raw frame: {size}, expected {RAW_BYTES:,} "
                       f"({RAW_WIDTH}×{RAW_HEIGHT} RGB planes, no header)")
    planes = np.frombuffer(data, np.uint8).reshape(3, RAW_HEIGHT, RAW_WIDTH)
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


def _upright(im):
    """The image as it is meant to be seen: EXIF orientation 2–8 applied (a damaged EXIF block is ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns of corrupt EXIF data on stderr: here it only means upright
        try:
            if im.getexif().get(0x0112, 1) not in (2, 3, 4, 5, 6, 7, 8):
                return im
            return ImageOps.exif_transpose(im)
        except MemoryError:
            raise
        except Exception:  # Pillow raises many types on malformed EXIF; the pixels themselves are fine
            return im


def _to_rgb8(im) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        a = (a * (255.0 / hi)).round() if hi > 255 else a
        a = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255
        return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # composite on mid-grey: transparent pixels carry no face
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha + 128.0 * (1 - alpha)
        return rgb.round().astype(np.uint8)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def list_identity_folder(root: str | os.PathLike, identities: set[str] | None = None) -> tuple[list[FaceItem], list[Skipped]]:
    """All candidate images under ``root/<identity>/``, sorted; files that are obviously not images are
    reported as skipped (content problems are found later, when decoding)."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"data folder not found: {root}")
    items: list[FaceItem] = []
    skipped: list[Skipped] = []
    try:
        people = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise BadInputError(f"cannot read data folder {root}: {e.strerror}") from None
    for person in people:
        try:
            if not person.is_dir():  # stray files at the top level (pairs.txt, README) are not faces
                continue
        except OSError:
            skipped.append(Skipped(printable(person.name), "unreadable entry"))
            continue
        ident = printable(person.name)
        if identities is not None and ident not in identities:
            continue
        try:
            files = sorted(os.scandir(person.path), key=lambda e: e.name)
        except OSError as e:
            skipped.append(Skipped(ident + "/", f"cannot list folder: {e.strerror}"))
            continue
        for f in files:
            rel = f"{ident}/{printable(f.name)}"
            try:
                is_file = f.is_file()  # follows symlinks; a loop raises OSError (ELOOP)
            except OSError as e:
                skipped.append(Skipped(rel, f"unreadable: {e.strerror}"))
                continue
            if not is_file:
                if f.is_symlink():
                    skipped.append(Skipped(rel, "broken or looping symlink"))
                elif Path(f.name).suffix.lower() in IMAGE_EXTENSIONS:  # a FIFO would block the reader forever
                    skipped.append(Skipped(rel, "not a regular file (a folder, FIFO or device)"))
                continue
            if Path(f.name).suffix.lower() not in IMAGE_EXTENSIONS:
                if not is_landmark_sidecar(f.name):
                    skipped.append(Skipped(rel, "not an image file extension"))
                continue
            disk = f"{person.name}/{f.name}"
            items.append(FaceItem(rel, ident, None if disk == rel else disk))
    return items, skipped


def is_landmark_sidecar(name: str) -> bool:
    """``photo.jpg.json``: an image's landmark file (``data/landmark_files.py``), not a stray file."""
    stem, ext = os.path.splitext(name)
    return ext.lower() == ".json" and os.path.splitext(stem)[1].lower() in IMAGE_EXTENSIONS


def read_identity_list(path: str | os.PathLike) -> set[str]:
    """``--identities FILE``: one identity name per line (blank lines and '#' comments ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise BadInputError(f"cannot read identities file {path}: {e.strerror}") from None
    names = {printable(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")}
    if not names:
        raise BadInputError(f"identities file {path} lists no identity")
    return names


def resolve_inside(root: Path, rel: str) -> Path:
    """Join a relative path from a protocol file to the data root, refusing anything that escapes it."""
    if os.path.isabs(rel):
        raise BadInputError(f"path {rel!r} is absolute; protocol paths must be relative to the data root")
    root_real = root.resolve()
    p = (root / rel).resolve()
    if p != root_real and root_real not in p.parents:
        raise BadInputError(f"path {rel!r} points outside the data root {root}")
    return p
