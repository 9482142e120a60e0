"""Block pairs drawn from face sets when they are read, never written: ``train-block --faces``.

The rows are the ones ``make-pairs --block …`` would write for the same faces, seed and ``--per-image`` (image
by image, then repeat, then block; each occluded chip drawn from (seed, image · per_image + repeat, block) by the
one occluder driver), so training on them gives what training on that file gives. :class:`DrawnPairs` answers
the part of :class:`pdsn_cli.data.pairs_h5.PairsFile` the trainers read: rows' metadata, clean chips, and
occluded chips drawn on demand."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pdsn_cli.data.face_sets import FaceSets, read_face_sets
from pdsn_cli.data.pairs_h5 import draw_rows
from pdsn_cli.occlusion.driver import OcclusionVariant

__all__ = ["DrawnPairs", "drawn_block_pairs"]


class DrawnPairs:
    def __init__(self, faces: FaceSets, grid: int, blocks: list[int], seed: int, per_image: int = 1,
                 files: list[Path] = ()):
        self.faces, self.grid, self.blocks, self.seed, self.per_image = faces, grid, list(blocks), seed, per_image
        self.files = [Path(p) for p in files]
        self.path = " + ".join(str(p) for p in self.files) or "face sets"  # named in messages, as a file's path
        h, w = faces.image.shape[1:3]
        self.width = w
        self.attrs = {"template": faces.template, "height": h, "width": w, "grid": grid, "seed": seed,
                      "per_image": per_image, "occluder": "block"}
        n_img, nb = len(faces), len(self.blocks)
        image = np.repeat(np.arange(n_img, dtype=np.int64), per_image * nb)
        repeat = np.tile(np.repeat(np.arange(per_image, dtype=np.int64), nb), n_img)
        self.chip_index = image
        self.draw_n = image * per_image + repeat
        self.target = np.tile(np.asarray(self.blocks, np.int64), n_img * per_image)
        self.n = len(self.target)
        names = list(dict.fromkeys(faces.names))
        at = {name: i for i, name in enumerate(names)}
        self.identity = names
        self.chip_label = np.array([at[name] for name in faces.names], np.int64)
        self.label = self.chip_label[self.chip_index]
        self.chip_landmarks = faces.landmarks

    def __enter__(self) -> DrawnPairs:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def source(self) -> list[str]:
        return [self.faces.sources[i] for i in self.chip_index]

    @property
    def n_chips(self) -> int:
        return len(self.faces)

    def chips(self, index) -> np.ndarray:
        """uint8 clean chips ``index`` (any order, repeats allowed)."""
        return self.faces.image[np.asarray(index, np.int64)]

    def clean(self, rows) -> np.ndarray:
        return self.chips(self.chip_index[np.asarray(rows, np.int64)])

    def occluded(self, rows, masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The occluded chips of ``rows`` (any order) and, with ``masks``, their bool pixel masks, drawn now."""
        rows = np.asarray(rows, np.int64)
        return draw_rows(self, rows, [OcclusionVariant("block", int(self.target[r])) for r in rows],
                         np.full(len(rows), self.seed), self.draw_n[rows], masks)

    def cache_key(self) -> str:
        """What the rows depend on: the files (path, size, time), the faces taken, grid, blocks, seed, repeats."""
        stats = [(str(p.resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self.files]
        picked = hashlib.sha1("\n".join(self.faces.sources).encode("utf-8", "surrogateescape")).hexdigest()
        return repr(("drawn-v1", stats, picked, self.grid, self.blocks, self.seed, self.per_image))


def drawn_block_pairs(files: list[Path], grid: int, blocks: list[int], seed: int, per_image: int = 1,
                      max_faces: int | None = None) -> DrawnPairs:
    """The block pairs of the chips files ``files`` (``pdsn align``; several sets' people kept apart)."""
    return DrawnPairs(read_face_sets(files, None, max_faces, seed), grid, blocks, seed, per_image, files)
