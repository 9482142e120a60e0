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


def open_checked(path: str | os.PathLike, kind: str, schema: int | tuple[int, ...], mode: str = "r") -> h5py.File:
    """Open an HDF5 file the toolkit wrote and check what it is (``schema``: the one, or the several, this version
    reads); refuse anything else with one line."""
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
    schemas = (schema,) if isinstance(schema, int) else tuple(schema)
    if got_schema is None or int(got_schema) not in schemas:
        f.close()
        which = f"schema {schemas[0]}" if len(schemas) == 1 else "schemas " + " and ".join(map(str, schemas))
        raise SchemaError(f"{path} has {kind} schema {got_schema}, this version reads {which}")
    return f


def open_for_writing(path: str | os.PathLike, mode: str = "w") -> h5py.File:
    """``h5py.File`` for writing, without HDF5's raw-data chunk cache.

    With the cache, a chunk whose write fails (disk full) is only written when the cache evicts it, inside a
    destructor where h5py drops the error, and the next flush crashes the process (segfault, HDF5 2.0 / h5py
    3.16). Without it the write itself raises ``OSError(ENOSPC)``, which the job reports. Appends of whole
    chunks of rows, as the toolkit's writers do, lose nothing by it.
    """
    return h5py.File(path, mode, rdcc_nbytes=0)


def stamp(f: h5py.File, kind: str, schema: int, **attrs) -> None:
    f.attrs["pdsn_kind"] = kind
    f.attrs["pdsn_schema"] = schema
    f.attrs["tool_version"] = __version__
    for k, v in attrs.items():
        f.attrs[k] = v


def make_growable(f: h5py.File, name: str, shape_tail: tuple, dtype, chunk_rows: int = 64, compress=True):
    """An N×... dataset that grows along axis 0, chunked by rows, lzf-compressed unless ``compress=False``."""
    kw = {}
    if compress:
        # lzf: several times faster than gzip at a similar ratio
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


def read_rows(ds: h5py.Dataset, rows) -> np.ndarray:
    """``ds[rows]`` for sorted row indices, read as contiguous runs: h5py's fancy indexing with thousands of
    indices is orders of magnitude slower than slicing."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return ds[0:0]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return np.concatenate([ds[rows[a]:rows[b - 1] + 1] for a, b in zip(starts, ends)])
