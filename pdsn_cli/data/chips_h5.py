"""The aligned-chip cache: every face aligned once, reused by every later stage.

Schema (``pdsn_kind = "chips"``, ``pdsn_schema = 1``):

- ``image``      uint8  N×H×W×3  aligned RGB chips (raw, chunked by rows)
- ``landmarks``  float32 N×5×2   landmarks in chip pixels: left eye centre, right eye centre, nose tip,
                                 left mouth corner, right mouth corner (image left/right)
- ``label``      int64  N        index into ``identity``
- ``identity``   str    C        identity names (class list)
- ``source``     str    N        source image path (relative to the data root) or synthetic id
- ``aligned_by`` uint8  N        0 = detector + landmarks, 1 = fallback crop (no face found), 2 = known landmarks
- attrs: ``template``, ``data_root``, ``synthetic`` (bool), ``tool_version``
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from pdsn_cli.data.h5util import STR, append_rows, make_growable, open_checked, read_rows, read_strings, stamp

KIND = "chips"
SCHEMA = 1

ALIGNED_DETECTED, ALIGNED_FALLBACK, ALIGNED_KNOWN = 0, 1, 2


@dataclass
class Chips:
    """A chips file loaded in memory (LFW at 150 px is ~0.9 GB; use ``select`` to load a subset)."""

    image: np.ndarray
    landmarks: np.ndarray
    label: np.ndarray
    identity: list[str]
    source: list[str]
    aligned_by: np.ndarray
    template: str
    synthetic: bool

    def __len__(self) -> int:
        return len(self.label)

    def index_of_source(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.source)}


class ChipsWriter:
    def __init__(self, f: h5py.File, template: str, size: tuple[int, int], data_root: str, synthetic: bool):
        self.f = f
        h, w = size
        stamp(f, KIND, SCHEMA, template=template, data_root=data_root, synthetic=bool(synthetic))
        make_growable(f, "image", (h, w, 3), np.uint8, chunk_rows=32, compress=False)  # lzf: 7% smaller, 14× slower
        make_growable(f, "landmarks", (5, 2), np.float32, compress=False)
        make_growable(f, "label", (), np.int64, compress=False)
        make_growable(f, "source", (), STR, compress=False)
        make_growable(f, "aligned_by", (), np.uint8, compress=False)
        self.identity: list[str] = []
        self._ids: dict[str, int] = {}

    def label_for(self, identity: str) -> int:
        if identity not in self._ids:
            self._ids[identity] = len(self.identity)
            self.identity.append(identity)
        return self._ids[identity]

    def add(self, images, landmarks, identities, sources, aligned_by) -> None:
        if len(images) == 0:
            return
        append_rows(self.f["image"], np.stack(images).astype(np.uint8))
        append_rows(self.f["landmarks"], np.stack(landmarks).astype(np.float32))
        append_rows(self.f["label"], np.array([self.label_for(i) for i in identities], np.int64))
        append_rows(self.f["source"], list(sources))
        append_rows(self.f["aligned_by"], np.asarray(aligned_by, np.uint8))

    def close(self) -> None:
        if "identity" in self.f:
            del self.f["identity"]
        self.f.create_dataset("identity", data=np.array(self.identity, dtype=object), dtype=STR)


class StoredImages:
    """Images left where they are stored: image ``i`` is row ``row[i]`` of the ``image`` dataset of the HDF5 file
    ``paths[file[i]]`` (chip-cache shards), read when indexed — an int gives one image, a slice, index array or
    boolean mask a stack. Holds ~12 bytes an image instead of its pixels (67.5 KB at 150×150), so a face set of any
    size loads; each process opens the files it reads itself (so it works in forked workers)."""

    def __init__(self, paths: list[str | os.PathLike], file, row, image_shape: tuple[int, ...]):
        self.paths = [str(p) for p in paths]
        self.file, self.row = np.asarray(file, np.int32), np.asarray(row, np.int64)
        self.shape, self.dtype, self.ndim = (len(self.row), *image_shape), np.dtype(np.uint8), 1 + len(image_shape)
        self._pid, self._open = None, {}

    @classmethod
    def concat(cls, parts: list["StoredImages"]) -> "StoredImages":
        paths = list(dict.fromkeys(p for part in parts for p in part.paths))
        where = {p: k for k, p in enumerate(paths)}
        file = np.concatenate([np.array([where[p] for p in part.paths], np.int32)[part.file] for part in parts])
        return cls(paths, file, np.concatenate([part.row for part in parts]), parts[0].shape[1:])

    def subset(self, index) -> "StoredImages":
        """The images ``index`` (int array, slice or mask), still unread."""
        return StoredImages(self.paths, self.file[index], self.row[index], self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def _images(self, k: int) -> h5py.Dataset:
        if self._pid != os.getpid():  # handles inherited through fork are the parent's: open our own
            self._pid, self._open = os.getpid(), {}
        if k not in self._open:
            self._open[k] = h5py.File(self.paths[k], "r")["image"]
        return self._open[k]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = range(len(self))[index]  # an IndexError out of bounds, as an array's
            return self._images(int(self.file[i]))[self.row[i]]
        idx = np.arange(len(self))[index]
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        for k in np.unique(self.file[idx]):
            sel = np.flatnonzero(self.file[idx] == k)
            rows, back = np.unique(self.row[idx[sel]], return_inverse=True)  # h5py reads increasing rows
            out[sel] = read_rows(self._images(int(k)), rows)[back]
        return out

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def __getstate__(self):  # picklable (spawned workers): the open files stay behind
        return {**self.__dict__, "_pid": None, "_open": {}}

    def close(self) -> None:
        """Close the files this process opened (they reopen when indexed again): before forking workers."""
        for ds in self._open.values():
            ds.file.close()
        self._open = {}


def read_chips(path: str | os.PathLike, select: np.ndarray | None = None, lazy_images: bool = False) -> Chips:
    """``select``: those rows (sorted); ``lazy_images``: ``image`` is a :class:`StoredImages` (images read when
    indexed) instead of an array in memory."""
    with open_checked(path, KIND, SCHEMA) as f:
        n = f["image"].shape[0]
        sel = slice(None) if select is None else np.sort(np.asarray(select))
        source = read_strings(f["source"])
        if select is not None:
            source = [source[i] for i in sel]
        rows = np.arange(n)[sel]
        return Chips(
            image=StoredImages([path], np.zeros(len(rows)), rows, f["image"].shape[1:]) if lazy_images
            else f["image"][sel],
            landmarks=f["landmarks"][sel],
            label=f["label"][sel],
            identity=read_strings(f["identity"]),
            source=source,
            aligned_by=f["aligned_by"][sel],
            template=str(f.attrs["template"]),
            synthetic=bool(f.attrs["synthetic"]),
        )
