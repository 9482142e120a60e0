"""The (clean, occluded) pair dataset: the training material of PDSN, the detector and the benchmarks.

Schema (``pdsn_kind = "pairs"``, ``pdsn_schema = 1``), N pairs of H×W chips on a K×K grid:

==============  =====================  =========================================================
dataset         dtype / shape          meaning
==============  =====================  =========================================================
``clean``       uint8 N×H×W×3          aligned RGB chip
``occluded``    uint8 N×H×W×3          the same chip with an occluder composited in
``mask``        uint8 N×H×⌈W/8⌉        pixel occlusion mask, bit-packed along W (``np.packbits``)
``blocks``      float32 N×K×K          fraction of each grid block covered (row-major block j = r·K + c)
``landmarks``   float32 N×5×2          eye centres, nose tip, mouth corners in chip pixels
``label``       int64 N                index into ``identity``
``identity``    str C                  identity names
``source``      str N                  source image (relative path, or synthetic id)
``kind``        str N                  occluder kind actually drawn (``random`` resolves to one)
``target``      int16 N                targeted block for ``--block``, else −1
==============  =====================  =========================================================

attrs: ``grid``, ``template``, ``height``, ``width``, ``occluder`` (the spec asked for), ``seed``,
``per_image``, ``synthetic``, ``data_root``, ``tool_version``, ``complete`` (False while being written).
Chunked by rows; chips raw (lzf saved 7% at 14× the write time), masks lzf-compressed. Row i of a run depends only on (seed, image, repeat, block),
so appending, resuming and parallel generation give the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from pdsn_cli.errors import SchemaError
from pdsn_cli.data.h5util import STR, append_rows, make_growable, open_checked, read_rows, read_strings, stamp

KIND = "pairs"
SCHEMA = 1
#: attrs that must agree for --append / --resume to add rows to an existing file
COMPAT_ATTRS = ("grid", "template", "height", "width")
DATASETS = ("clean", "occluded", "mask", "blocks", "landmarks", "label", "identity", "source", "kind", "target")


@dataclass
class Pairs:
    clean: np.ndarray
    occluded: np.ndarray
    mask: np.ndarray  # bool N×H×W (unpacked)
    blocks: np.ndarray
    landmarks: np.ndarray
    label: np.ndarray
    identity: list[str]
    source: list[str]
    kind: list[str]
    target: np.ndarray
    attrs: dict

    def __len__(self) -> int:
        return len(self.label)


def create(f: h5py.File, *, grid: int, template: str, size: tuple[int, int], **attrs) -> None:
    h, w = size
    stamp(f, KIND, SCHEMA, grid=grid, template=template, height=h, width=w, complete=False, **attrs)
    # chips are stored raw: lzf saved 7% on face chips but capped writing at ~900 chips/s (14× slower)
    make_growable(f, "clean", (h, w, 3), np.uint8, chunk_rows=16, compress=False)
    make_growable(f, "occluded", (h, w, 3), np.uint8, chunk_rows=16, compress=False)
    make_growable(f, "mask", (h, (w + 7) // 8), np.uint8, chunk_rows=64)
    make_growable(f, "blocks", (grid, grid), np.float32, compress=False)
    make_growable(f, "landmarks", (5, 2), np.float32, compress=False)
    make_growable(f, "label", (), np.int64, compress=False)
    make_growable(f, "source", (), STR, compress=False)
    make_growable(f, "kind", (), STR, compress=False)
    make_growable(f, "target", (), np.int16, compress=False)
    f.create_dataset("identity", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))


def check_compatible(f: h5py.File, path, **want) -> None:
    """Refuse to add rows to a pairs file made with another grid/template/size, naming what differs."""
    diffs = [f"{k}: file has {f.attrs.get(k)!r}, asked {v!r}" for k, v in want.items() if f.attrs.get(k) != v]
    if diffs:
        raise SchemaError(f"{path} has another schema; " + "; ".join(diffs))


def identity_labels(f: h5py.File, names: list[str]) -> np.ndarray:
    """Labels for ``names`` in the file's identity list, extending it with new names."""
    known = read_strings(f["identity"])
    lut = {n: i for i, n in enumerate(known)}
    new = []
    out = np.empty(len(names), np.int64)
    for i, n in enumerate(names):
        if n not in lut:
            lut[n] = len(known) + len(new)
            new.append(n)
        out[i] = lut[n]
    if new:
        append_rows(f["identity"], new)
    return out


def append(f: h5py.File, *, clean, occluded, mask, blocks, landmarks, identities, sources, kinds, targets) -> None:
    append_rows(f["clean"], clean)
    append_rows(f["occluded"], occluded)
    append_rows(f["mask"], np.packbits(np.asarray(mask, bool), axis=-1))
    append_rows(f["blocks"], np.asarray(blocks, np.float32))
    append_rows(f["landmarks"], np.asarray(landmarks, np.float32))
    append_rows(f["label"], identity_labels(f, list(identities)))
    append_rows(f["source"], list(sources))
    append_rows(f["kind"], list(kinds))
    append_rows(f["target"], np.asarray(targets, np.int16))


def open_pairs(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    f = open_checked(path, KIND, SCHEMA, mode)
    missing = [name for name in DATASETS if name not in f]
    if missing:
        f.close()
        raise SchemaError(f"{path} lacks datasets {', '.join(missing)}: not a complete pairs file")
    if mode == "r" and not f.attrs.get("complete", False):
        f.close()
        raise SchemaError(f"{path} is incomplete (its writer was interrupted); rerun make-pairs with --resume")
    return f


def num_pairs(path: str | os.PathLike) -> int:
    with open_pairs(path) as f:
        return int(f["label"].shape[0])


def read_pairs(path: str | os.PathLike, select=None, images: bool = True, masks: bool = True) -> Pairs:
    """Load a pairs file (or the rows in ``select``); ``images=False`` skips the big arrays, ``masks=False`` the
    pixel masks."""
    with open_pairs(path) as f:
        sel = slice(None) if select is None else np.sort(np.asarray(select))
        w = int(f.attrs["width"])

        def get(name):
            return f[name][()] if select is None else read_rows(f[name], sel)
        n = f["label"].shape[0] if select is None else len(sel)

        def strs(name):
            s = read_strings(f[name])
            return s if select is None else [s[i] for i in sel]

        return Pairs(
            clean=get("clean") if images else np.empty((n, 0)),
            occluded=get("occluded") if images else np.empty((n, 0)),
            mask=np.unpackbits(get("mask"), axis=-1, count=w).astype(bool) if images and masks else np.empty((n, 0)),
            blocks=get("blocks"),
            landmarks=get("landmarks"),
            label=get("label"),
            identity=read_strings(f["identity"]),
            source=strs("source"),
            kind=strs("kind"),
            target=get("target"),
            attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        )
