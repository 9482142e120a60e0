"""A stand-in for the AR face database, written in the layouts users have (tests only: the real one is not
redistributable). ``from ar_fixture import write_fixture`` in any test (``tests/`` is on the import path).

Each AR subject is one synthetic identity (``pdsn_cli.data.synthetic``); its image ``k`` (1–26) is that identity's
synthetic photo ``k-1``, with the AR condition applied: sunglasses (8–10, 21–23) or a scarf (11–13, 24–26)
drawn by ``pdsn_cli.occlusion.occluders.occlude`` on the photo's known landmarks, and a side light (5, 6, 7, 9, 10, 12,
13 and their second-session twins) as a left/right brightness ramp.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from pdsn_cli.data.ar import RAW_HEIGHT, RAW_WIDTH

CROPPED_SIZE = (165, 120)  # H, W of Martínez & Kak's cropped faces


def subject_names(subjects: int | Iterable[str]) -> list[str]:
    """``4`` → ``['m-001', 'm-002', 'w-001', 'w-002']`` (men first, then women); names pass through."""
    if isinstance(subjects, int):
        men = (subjects + 1) // 2
        return [f"m-{i:03d}" for i in range(1, men + 1)] + [f"w-{i:03d}" for i in range(1, subjects - men + 1)]
    return [s.lower() for s in subjects]


def file_name(subject: str, index: int, layout: str, ext: str | None = None) -> str:
    """The name a layout gives image ``index`` of ``subject``: cropped ``M-001-08.bmp``, original
    ``m-001-08.raw``."""
    sex, person = subject.split("-")
    if layout == "cropped":
        return f"{sex.upper()}-{int(person):03d}-{index:02d}{ext or '.bmp'}"
    if layout == "original":
        return f"{sex}-{int(person):03d}-{index:02d}{ext or '.raw'}"
    raise ValueError(f"layout must be 'cropped' or 'original', got {layout!r}")


def _light(img: np.ndarray, side: str) -> np.ndarray:
    w = img.shape[1]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)
    gain = {"left": 1.35 - 0.6 * x, "right": 0.75 + 0.6 * x, "both": 1.2 - 0.3 * np.abs(x - 0.5)}[side]
    return np.clip(img.astype(np.float32) * gain[None, :, None], 0, 255).round().astype(np.uint8)


def ar_condition_image(face, index: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic photo with AR condition ``index`` (1–26) applied."""
    from pdsn_cli.occlusion.occluders import occlude

    c = (index - 1) % 13 + 1
    img = face.image
    if 8 <= c <= 13:
        img = occlude(img, face.landmarks, "sunglasses" if c <= 10 else "scarf", rng).image
    side = {5: "left", 9: "left", 12: "left", 6: "right", 10: "right", 13: "right", 7: "both"}.get(c)
    return _light(img, side) if side else img


def _cropped(img: np.ndarray) -> np.ndarray:
    # the synthetic 250×250 photo has the eyes' midpoint at (125, 112) and 44 px between the eyes; cut a
    # 150×206 window around the face (eyes 40% down, as in the cropped AR set) and shrink it to 120×165
    s = img.shape[0] / 250.0
    x0, x1, y0, y1 = (round(v * s) for v in (50, 200, 30, 236))
    h, w = CROPPED_SIZE
    return cv2.resize(img[y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_AREA)


def _original(img: np.ndarray) -> np.ndarray:
    # a 576×576 photo in the middle of the 768×576 frame, the sides continuing its border
    pad = (RAW_WIDTH - img.shape[1]) // 2
    return cv2.copyMakeBorder(img, 0, 0, pad, RAW_WIDTH - img.shape[1] - pad, cv2.BORDER_REPLICATE)


def raw_bytes(rgb: np.ndarray) -> bytes:
    """An RGB 576×768 image as the original release stores it: R plane, G plane, B plane, no header."""
    assert rgb.shape == (RAW_HEIGHT, RAW_WIDTH, 3) and rgb.dtype == np.uint8
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()


def write_image(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".raw":
        path.write_bytes(raw_bytes(rgb))
    else:
        ok, buf = cv2.imencode(path.suffix.lower(), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok, path
        path.write_bytes(buf.tobytes())
    return path


def write_fixture(
    root: str | Path,
    layout: str = "cropped",
    subjects: int | Iterable[str] = 4,
    seed: int = 0,
    indices: Iterable[int] = range(1, 27),
    folder: str | None = None,
    ext: str | None = None,
) -> list[Path]:
    """Write an AR-like database under ``root`` (in ``root/folder`` when given) and return the files written.

    ``layout="cropped"``: 165×120 ``M-001-01.bmp`` … (Martínez & Kak's aligned subset); ``layout="original"``:
    768×576 header-less planar-RGB ``m-001-01.raw`` … (the original release; ``ext=".png"`` etc. writes a
    converted copy with the same names instead, ~1.3 MB per .raw frame). ``subjects``: a count (men first, then
    women: ``m-001``, ``m-002``, ``w-001`` …) or the subject names. ``indices``: which of the 26 images to write.
    Deterministic in ``seed``; subject ``j`` of the list is synthetic identity ``j``.
    """
    from pdsn_cli.data.synthetic import synthetic_faces

    if layout not in ("cropped", "original"):
        raise ValueError(f"layout must be 'cropped' or 'original', got {layout!r}")
    out_dir = Path(root) / folder if folder else Path(root)
    names = subject_names(subjects)
    faces = synthetic_faces(len(names), 26, seed=seed, size=250 if layout == "cropped" else RAW_HEIGHT)
    indices = list(indices)
    written = []
    for j, subject in enumerate(names):
        for index in indices:
            img = ar_condition_image(faces[j * 26 + index - 1], index, np.random.default_rng([seed, j, index]))
            img = _cropped(img) if layout == "cropped" else _original(img)
            written.append(write_image(out_dir / file_name(subject, index, layout, ext), img))
    return written
