"""A dataset's own face landmarks or face boxes, used instead of detection.

Many face sets ship where their faces are (MegaFace a JSON file per image, CASIA-WebFace and VGGFace2 releases
5-point files): aligning from them skips the detector, the slowest stage, and keeps the dataset's own choice of
face in a photo with several. Two places are read; for an image that has both, its sidecar wins.

- ``<image file>.json`` beside the image (``Aaron_0001.jpg`` → ``Aaron_0001.jpg.json``), an object with
  ``"points"``: ``[[x, y], ...]`` and/or ``"box"``: ``[left, top, right, bottom]``. MegaFace's own sidecar,
  ``{"bounding_box": {"x": …, "y": …, "width": …, "height": …}, …}``, is read as a box.
- ``landmarks.csv`` at the data root, one row per image, a header naming the columns: ``path`` (relative to the
  root, ``/``-separated) and either ``x1,y1,…,x5,y5`` (or the 68 pairs ``x1…y68``), or ``left,top,right,bottom``,
  or both. Empty cells leave that part unknown.

Points, in the image's pixels as pdsn reads it (EXIF orientation applied; x right, y down, a pixel's centre at
integer coordinates): 5 points are the eye centres (image-left eye first), nose tip, mouth corners (image-left
first), the ArcFace order; 68 points are the iBUG 300-W scheme (dlib's 68-point model). A box alone: the
landmarks are predicted inside it, as after a detection.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdsn_cli.errors import BadInputError

TABLE = "landmarks.csv"
SIDECAR_SUFFIX = ".json"
BOX_COLUMNS = ("left", "top", "right", "bottom")
POINT_COUNTS = (5, 68)


@dataclass(frozen=True)
class GivenFace:
    """Where the dataset says the face is: landmarks (5×2 or 68×2), a box, or both."""

    points: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None

    def digest(self) -> int:
        """A 63-bit fingerprint of the values: a cached chip made from other given values is not reused."""
        parts = [] if self.points is None else [f"{v:.4f}" for v in np.asarray(self.points).ravel()]
        parts += ["|"] + ([] if self.box is None else [f"{v:.4f}" for v in self.box])
        return int.from_bytes(hashlib.sha1(",".join(parts).encode()).digest()[:8], "little") >> 1


def _points(values, where: str) -> np.ndarray:
    try:
        p = np.asarray(values, np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise BadInputError(f"{where}: points must be [[x, y], ...] numbers") from None
    if len(p) not in POINT_COUNTS or not np.isfinite(p).all():
        raise BadInputError(f"{where}: {len(p)} points; give 5 (eye centres, nose tip, mouth corners) or 68 (iBUG)")
    return p


def _box(values, where: str) -> tuple[float, float, float, float]:
    try:
        b = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise BadInputError(f"{where}: box must be [left, top, right, bottom] numbers") from None
    if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[2] <= b[0] or b[3] <= b[1]:
        raise BadInputError(f"{where}: box must be [left, top, right, bottom] with right > left, bottom > top")
    return b


def read_sidecar(path: Path) -> GivenFace | None:
    """The face a ``<image>.json`` sidecar gives, or None when it names neither points nor a box."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{path}: not a readable JSON landmark file ({e})") from None
    if not isinstance(d, dict):
        return None
    box = None
    if "box" in d:
        box = _box(d["box"], str(path))
    elif isinstance(d.get("bounding_box"), dict):  # MegaFace
        bb = d["bounding_box"]
        try:
            x, y, w, h = (float(bb[k]) for k in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{path}: bounding_box needs numbers x, y, width, height") from None
        box = _box((x, y, x + w, y + h), str(path))
    points = _points(d["points"], str(path)) if "points" in d else None
    if points is None and box is None:
        return None
    return GivenFace(points, box)


def read_table(path: Path) -> dict[str, GivenFace]:
    """``landmarks.csv``: relative path → the face its row gives."""
    out: dict[str, GivenFace] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = [h.strip().lower() for h in next(rows, [])]
            if "path" not in header:
                raise BadInputError(f"{path}: the header must name a 'path' column (see `pdsn align --help`)")
            col = {h: i for i, h in enumerate(header)}
            n_pts = max((k for k in POINT_COUNTS if f"x{k}" in col and f"y{k}" in col), default=0)
            pts_cols = [col[f"{a}{i}"] for i in range(1, n_pts + 1) for a in "xy"] if n_pts else []
            if n_pts and len(pts_cols) != 2 * n_pts:
                raise BadInputError(f"{path}: columns x1,y1 … x{n_pts},y{n_pts} are not all there")
            box_cols = [col[c] for c in BOX_COLUMNS] if all(c in col for c in BOX_COLUMNS) else []
            if not pts_cols and not box_cols:
                raise BadInputError(f"{path}: no point columns (x1,y1,…) and no box columns (left,top,right,bottom)")
            for line_no, row in enumerate(rows, start=2):
                if not row or not row[col["path"]].strip():
                    continue
                where = f"{path} line {line_no}"

                def cells(idx):
                    vals = [row[i].strip() if i < len(row) else "" for i in idx]
                    return None if not idx or all(v == "" for v in vals) else vals
                p, b = cells(pts_cols), cells(box_cols)
                out[row[col["path"]].strip().replace("\\", "/")] = GivenFace(
                    _points(p, where) if p else None, _box(b, where) if b else None)
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(f"{path}: not a readable CSV file ({e})") from None
    return out


class GivenLandmarks:
    """The faces a dataset root gives, looked up per image (a sidecar wins over ``landmarks.csv``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        table = self.root / TABLE
        self.table = read_table(table) if table.is_file() else {}

    def get(self, rel: str, disk: str | None = None) -> GivenFace | None:
        side = self.root / f"{disk or rel}{SIDECAR_SUFFIX}"
        if side.is_file():
            found = read_sidecar(side)
            if found is not None:
                return found
        return self.table.get(rel)
