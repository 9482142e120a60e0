"""Small HDF5 helpers shared by every file format of the toolkit (chips, pairs, embeddings, dictionary).

Every file the toolkit writes carries ``attrs["pdsn_kind"]`` (what it is) and ``attrs["pdsn_schema"]``
(an integer bumped on incompatible change), so that a command handed the wrong file refuses it in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli import __version__
from pdsn_cli.errors import SchemaError

STR = h5py.string_dtype("utf-8")


def open_checked(path: str | os.PathLike, kind: str, schema: int, mode: str = "r") -> h5py.File:
    """Open an HDF5 file the toolkit wrote and check what it is; refuse anything else with one line."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"no such file: {path}")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        raise SchemaError(f"{path} is not a readable HDF5 file (truncated or foreign?): {e}") from None
    got_kind = f.attrs.get("pdsn_kind")
    got_schema = f.attrs.get("pdsn_schema")
    if got_kind != kind:
        f.close()
        raise SchemaError(f"{path} is not a pdsn {kind} file (pdsn_kind={got_kind!r})")
    if got_schema is None or int(got_schema) != schema:
        f.close()
        raise SchemaError(f"{path} has {kind} schema {got_schema}, this version reads schema {schema}")
    return f


def stamp(f: h5py.File, kind: str, schema: int, **attrs) -> None:
    f.attrs["pdsn_kind"] = kind
    f.attrs["pdsn_schema"] = schema
    f.attrs["tool_version"] = __version__
    for k, v in attrs.items():
        f.attrs[k] = v


def make_growable(f: h5py.File, name: str, shape_tail: tuple, dtype, chunk_rows: int = 64, compress=True):
    """An N×... dataset that grows along axis 0, chunked by rows (and gzip-compressed for images)."""
    kw = {}
    if compress:
        # lzf: ~5x faster than gzip at a similar ratio on face chips (make-pairs writes >60 MB/s)
        kw = dict(compression="lzf", shuffle=True)
    return f.create_dataset(
        name,
        shape=(0, *shape_tail),
        maxshape=(None, *shape_tail),
        dtype=dtype,
        chunks=(chunk_rows, *shape_tail) if shape_tail else (max(chunk_rows, 1024),),
        **kw,
    )


def append_rows(ds: h5py.Dataset, rows) -> None:
    rows = np.asarray(rows) if ds.dtype != STR else rows
    n = ds.shape[0]
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


def read_strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]
