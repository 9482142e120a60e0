"""The (clean, occluded) pair dataset: the training material of PDSN, the detector and the benchmarks.

Schema 2 (``pdsn_kind = "pairs"``, ``pdsn_schema = 2``, written by this version): each clean chip is stored once,
and each of the N rows names its chip and the key its occluder was drawn from, so the occluded chip is
*regenerated* when read (``pdsn_cli.occlusion.driver.draw``: bit-identical, checked against a CRC-32 of the chip
make-pairs drew). U clean H×W chips on a K×K grid:

==================  =====================  =====================================================================
dataset             dtype / shape          meaning
==================  =====================  =====================================================================
``chips``           uint8 U×H×W×3          the aligned RGB chips, each once
``chip_landmarks``  float32 U×5×2          eye centres, nose tip, mouth corners in chip pixels
``chip_label``      int64 U                index into ``identity``
``chip_source``     str U                  source image (relative path, or synthetic id)
``identity``        str C                  identity names
``occluder_names``  str T                  names the occluder codes below refer to
``chip``            int32 N                the row's clean chip (row of ``chips``)
``occluder``        uint8 N                occluder asked for (code; ``random``, ``block``, ``sunglasses``, …)
``seed``, ``draw``  int64 N, int64 N       the draw key: the row's occluder comes from
                                           ``driver.draw(chip, landmarks, variant(occluder, target), seed, draw)``
``target``          int16 N                targeted block for ``--block``, else −1
``kind``            uint8 N                occluder kind actually drawn (code; ``random`` resolves to one)
``blocks``          float32 N×K×K          fraction of each grid block covered (row-major block j = r·K + c)
``checksum``        uint32 N               CRC-32 of the occluded chip's bytes, verified on every regeneration
``occluded``        uint8 N×H×W×3          only in files made with ``--store-occluded`` (then read, not drawn)
``mask``            uint8 N×H×⌈W/8⌉        only with ``occluded``: pixel mask, bit-packed along W
==================  =====================  =====================================================================

A row costs ~40 bytes (+ 100 for ``blocks`` on a 5×5 grid) instead of 2 chips (135 KB at 150×150): LFW's 25 block
pairs of 1,549 photos take 110 MB instead of 5.2 GB. The pixel mask is not stored: it comes with the regenerated
chip (``read_pairs(masks=True)``). Rows written by :func:`append` from arrays (tests, other tools) have no draw key
(``seed = draw = -1``) and need a file created with ``store_occluded=True``.

Schema 1 (every row stores both chips; older versions wrote it) stays readable through the same API:

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

attrs (both): ``grid``, ``template``, ``height``, ``width``, ``occluder`` (the spec asked for), ``seed``,
``per_image``, ``synthetic``, ``data_root``, ``tool_version``, ``complete`` (False while being written); schema 2
also ``store_occluded``. Chunked by rows; chips raw (lzf saved 7% at 14× the write time), masks lzf-compressed.
Row i of a run depends only on (seed, image, repeat, block), so appending, resuming and parallel generation give
the same rows.

Readers: :func:`read_pairs` (the rows asked for, as arrays: the same arrays for both schemas) and
:class:`PairsFile` (the clean chips once, row metadata, occluded chips of any rows, :meth:`PairsFile.batches`
to stream rows in batches).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from pdsn_cli.errors import SchemaError
from pdsn_cli.data.h5util import STR, append_rows, make_growable, open_checked, read_rows, read_strings, stamp
from pdsn_cli.occlusion.driver import OcclusionVariant, draw

KIND = "pairs"
SCHEMA = 2
#: schemas this version reads (it writes SCHEMA only)
READABLE = (1, 2)
#: attrs that must agree for --append / --resume to add rows to an existing file
COMPAT_ATTRS = ("grid", "template", "height", "width")
DATASETS_1 = ("clean", "occluded", "mask", "blocks", "landmarks", "label", "identity", "source", "kind", "target")
CHIP_DATASETS = ("chips", "chip_landmarks", "chip_label", "chip_source")
ROW_DATASETS = ("chip", "occluder", "seed", "draw", "blocks", "target", "kind", "checksum")
DATASETS_2 = CHIP_DATASETS + ROW_DATASETS + ("identity", "occluder_names")
DATASETS = DATASETS_2
#: rows read or drawn at a time by the streaming readers
BATCH = 256


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
    #: the file rows these are (set by :meth:`PairsFile.batches` and :meth:`PairsFile.read`)
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)


# ---- writing ---------------------------------------------------------------------------------------------------
def create(f: h5py.File, *, grid: int, template: str, size: tuple[int, int], store_occluded: bool = False,
           **attrs) -> None:
    """An empty schema-2 pairs file; ``store_occluded`` also stores every occluded chip and its pixel mask."""
    h, w = size
    stamp(f, KIND, SCHEMA, grid=grid, template=template, height=h, width=w, complete=False,
          store_occluded=bool(store_occluded), **attrs)
    # chips are stored raw: lzf saved 7% on face chips but capped writing at ~900 chips/s (14× slower)
    make_growable(f, "chips", (h, w, 3), np.uint8, chunk_rows=16, compress=False)
    make_growable(f, "chip_landmarks", (5, 2), np.float32, compress=False)
    make_growable(f, "chip_label", (), np.int64, compress=False)
    make_growable(f, "chip_source", (), STR, compress=False)
    make_growable(f, "chip", (), np.int32, compress=False)
    make_growable(f, "occluder", (), np.uint8, compress=False)
    make_growable(f, "seed", (), np.int64, compress=False)
    make_growable(f, "draw", (), np.int64, compress=False)
    make_growable(f, "target", (), np.int16, compress=False)
    make_growable(f, "kind", (), np.uint8, compress=False)
    make_growable(f, "blocks", (grid, grid), np.float32, chunk_rows=1024)
    make_growable(f, "checksum", (), np.uint32, compress=False)
    if store_occluded:
        _create_stored(f, h, w)
    f.create_dataset("identity", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))
    f.create_dataset("occluder_names", shape=(0,), maxshape=(None,), dtype=STR, chunks=(64,))


def _create_stored(f: h5py.File, h: int, w: int) -> None:
    make_growable(f, "occluded", (h, w, 3), np.uint8, chunk_rows=16, compress=False)
    make_growable(f, "mask", (h, (w + 7) // 8), np.uint8, chunk_rows=64)
    f.attrs["store_occluded"] = True


def schema_of(f: h5py.File) -> int:
    return int(f.attrs["pdsn_schema"])


def check_compatible(f: h5py.File, path, **want) -> None:
    """Refuse to add rows to a pairs file made with another grid/template/size or schema, naming what differs."""
    if schema_of(f) != SCHEMA:
        raise SchemaError(f"{path} is a schema-{schema_of(f)} pairs file (written by an older version); this "
                          f"version appends schema-{SCHEMA} rows only: write a new file instead of --append/--resume")
    diffs = [f"{k}: file has {f.attrs.get(k)!r}, asked {v!r}" for k, v in want.items() if f.attrs.get(k) != v]
    if diffs:
        raise SchemaError(f"{path} has another schema; " + "; ".join(diffs))


def identity_labels(f: h5py.File, names: list[str]) -> np.ndarray:
    """Labels for ``names`` in the file's identity list, extending it with new names."""
    return _codes(f, "identity", names, np.int64)


def occluder_codes(f: h5py.File, names: list[str]) -> np.ndarray:
    """Codes of occluder ``names`` in the file's ``occluder_names``, extending it with new names."""
    codes = _codes(f, "occluder_names", names, np.int64)
    if len(codes) and codes.max() > 255:
        raise SchemaError("more than 256 occluder names in one pairs file")
    return codes.astype(np.uint8)


def _codes(f: h5py.File, table: str, names: list[str], dtype) -> np.ndarray:
    known = read_strings(f[table])
    lut = {n: i for i, n in enumerate(known)}
    new = []
    out = np.empty(len(names), dtype)
    for i, n in enumerate(names):
        if n not in lut:
            lut[n] = len(known) + len(new)
            new.append(n)
        out[i] = lut[n]
    if new:
        append_rows(f[table], new)
    return out


def add_chips(f: h5py.File, images, landmarks, identities, sources, dedup: bool = True) -> np.ndarray:
    """Add clean chips to the chip table; returns each one's row in it. With ``dedup`` a chip whose source is
    already in the table with the same pixels (and landmarks) reuses that row."""
    images, landmarks = np.asarray(images), np.asarray(landmarks, np.float32)
    sources = list(sources)
    out = np.full(len(sources), -1, np.int64)
    if dedup and f["chips"].shape[0]:
        have: dict[str, list[int]] = {}
        for i, s in enumerate(read_strings(f["chip_source"])):
            have.setdefault(s, []).append(i)
        for k, s in enumerate(sources):
            for i in have.get(s, ()):
                if np.array_equal(f["chips"][i], images[k]) and np.array_equal(f["chip_landmarks"][i], landmarks[k]):
                    out[k] = i
                    break
    # chips repeated within this call (a row-wise append of a chip's several occluded copies) are stored once
    first: dict[tuple, int] = {}
    new = []
    for k in np.flatnonzero(out < 0):
        key = (sources[k], images[k].tobytes(), landmarks[k].tobytes()) if dedup else (k,)
        if key in first:
            out[k] = -2 - first[key]  # resolved below
        else:
            first[key] = k
            new.append(k)
    n0 = f["chips"].shape[0]
    if new:
        new = np.asarray(new)
        append_rows(f["chips"], images[new])
        append_rows(f["chip_landmarks"], landmarks[new])
        append_rows(f["chip_label"], identity_labels(f, [identities[k] for k in new]))
        append_rows(f["chip_source"], [sources[k] for k in new])
        out[new] = n0 + np.arange(len(new))
    pending = out <= -2
    out[pending] = out[-2 - out[pending]]
    return out


def occluded_checksum(image: np.ndarray) -> int:
    """The CRC-32 of an occluded chip's bytes (C order), stored per row and checked on regeneration."""
    return zlib.crc32(np.ascontiguousarray(image, np.uint8).data)


def append_drawn(f: h5py.File, *, chip, occluders, seeds, draws, targets, kinds, blocks, checksums,
                 occluded=None, mask=None) -> None:
    """Rows whose occluded chip is regenerated from (chip, occluder, seed, draw, target); ``occluded`` / ``mask``
    only (and then required) in a file that stores them."""
    stored = "occluded" in f
    if stored != (occluded is not None):
        raise SchemaError("occluded chips must be given exactly when the file stores them (store_occluded)")
    append_rows(f["chip"], np.asarray(chip, np.int32))
    append_rows(f["occluder"], occluder_codes(f, list(occluders)))
    append_rows(f["seed"], np.asarray(seeds, np.int64))
    append_rows(f["draw"], np.asarray(draws, np.int64))
    append_rows(f["target"], np.asarray(targets, np.int16))
    append_rows(f["kind"], occluder_codes(f, list(kinds)))
    append_rows(f["blocks"], np.asarray(blocks, np.float32))
    append_rows(f["checksum"], np.asarray(checksums, np.uint32))
    if stored:
        append_rows(f["occluded"], occluded)
        append_rows(f["mask"], np.packbits(np.asarray(mask, bool), axis=-1))


def append(f: h5py.File, *, clean, occluded, mask, blocks, landmarks, identities, sources, kinds, targets) -> None:
    """Rows given as arrays (the schema-1 writer's signature), for occluded chips no draw key regenerates: the
    file stores them (``create(store_occluded=True)``, or a file still without rows); clean chips are stored once."""
    if "occluded" not in f:
        if f["chip"].shape[0]:
            raise SchemaError("this pairs file regenerates its occluded chips; rows given as arrays need a file "
                              "created with store_occluded=True")
        _create_stored(f, int(f.attrs["height"]), int(f.attrs["width"]))
    chip = add_chips(f, clean, landmarks, list(identities), list(sources))
    n = len(chip)
    occluded = np.asarray(occluded)
    append_drawn(f, chip=chip, occluders=list(kinds), seeds=np.full(n, -1), draws=np.full(n, -1), targets=targets,
                 kinds=list(kinds), blocks=blocks, checksums=[occluded_checksum(o) for o in occluded],
                 occluded=occluded, mask=mask)


# ---- reading ---------------------------------------------------------------------------------------------------
def open_pairs(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """Open a pairs file of any readable schema (check ``schema_of(f)``); refuses incomplete ones for reading."""
    f = open_checked(path, KIND, READABLE, mode)
    need = DATASETS_1 if schema_of(f) == 1 else DATASETS_2
    missing = [name for name in need if name not in f]
    if missing:
        f.close()
        raise SchemaError(f"{path} lacks datasets {', '.join(missing)}: not a complete pairs file")
    if mode == "r" and not f.attrs.get("complete", False):
        f.close()
        raise SchemaError(f"{path} is incomplete (its writer was interrupted); rerun make-pairs with --resume")
    return f


def num_pairs(path: str | os.PathLike) -> int:
    with PairsFile(path) as pf:
        return pf.n


def _sorted_rows(select, n: int) -> np.ndarray:
    return np.arange(n) if select is None else np.sort(np.asarray(select, np.int64))


class PairsFile:
    """A pairs file open for reading, either schema: clean chips once (``chips`` / ``chip_index``), per-row
    metadata, the occluded chips of any rows (regenerated in schema 2), rows streamed in batches."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.f = open_pairs(path)
        self.schema = schema_of(self.f)
        self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in self.f.attrs.items()}
        self.grid, self.width = int(self.attrs["grid"]), int(self.attrs["width"])
        self.n = int(self.f["target"].shape[0])
        self.stored = "occluded" in self.f

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> PairsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the chip table (schema 1: the first row of each source) --
    @cached_property
    def _first_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Schema 1: (row of each distinct source's first appearance, row → its index in that list)."""
        src = read_strings(self.f["source"])
        first: dict[str, int] = {}
        index = np.empty(len(src), np.int64)
        for i, s in enumerate(src):
            index[i] = first.setdefault(s, len(first))
        _, rows = np.unique(index, return_index=True)  # the first row of each (index counts up from 0)
        return rows.astype(np.int64), index

    @cached_property
    def chip_index(self) -> np.ndarray:
        """int64 N: each row's clean chip (its row in :meth:`chips`)."""
        if self.schema == 1:
            return self._first_rows[1]
        return self.f["chip"][()].astype(np.int64)

    @property
    def n_chips(self) -> int:
        return len(self._first_rows[0]) if self.schema == 1 else int(self.f["chips"].shape[0])

    def chips(self, index) -> np.ndarray:
        """uint8 clean chips of chip-table rows ``index`` (any order, repeats allowed)."""
        index = np.asarray(index, np.int64)
        if self.schema == 1:
            rows, ds = self._first_rows[0][index], self.f["clean"]
        else:
            rows, ds = index, self.f["chips"]
        uniq, inv = np.unique(rows, return_inverse=True)
        return read_rows(ds, uniq)[inv.reshape(-1)] if len(uniq) else ds[0:0]

    @cached_property
    def chip_label(self) -> np.ndarray:
        return (self.f["label"][()][self._first_rows[0]] if self.schema == 1 else self.f["chip_label"][()]).astype(np.int64)

    @cached_property
    def chip_source(self) -> list[str]:
        if self.schema == 1:
            src = read_strings(self.f["source"])
            return [src[i] for i in self._first_rows[0]]
        return read_strings(self.f["chip_source"])

    @cached_property
    def chip_landmarks(self) -> np.ndarray:
        if self.schema == 1:
            return read_rows(self.f["landmarks"], self._first_rows[0]) if self.n else np.zeros((0, 5, 2), np.float32)
        return self.f["chip_landmarks"][()]

    # -- per-row metadata --
    @cached_property
    def identity(self) -> list[str]:
        return read_strings(self.f["identity"])

    @cached_property
    def label(self) -> np.ndarray:
        return self.f["label"][()] if self.schema == 1 else self.chip_label[self.chip_index]

    @cached_property
    def source(self) -> list[str]:
        if self.schema == 1:
            return read_strings(self.f["source"])
        cs = self.chip_source
        return [cs[i] for i in self.chip_index]

    @cached_property
    def target(self) -> np.ndarray:
        return self.f["target"][()]

    @cached_property
    def _names(self) -> list[str]:
        return read_strings(self.f["occluder_names"])

    @cached_property
    def kind(self) -> list[str]:
        if self.schema == 1:
            return read_strings(self.f["kind"])
        names = self._names
        return [names[c] for c in self.f["kind"][()]]

    def blocks(self, rows=None) -> np.ndarray:
        return self.f["blocks"][()] if rows is None else read_rows(self.f["blocks"], rows)

    def landmarks(self, rows=None) -> np.ndarray:
        if self.schema == 1:
            return self.f["landmarks"][()] if rows is None else read_rows(self.f["landmarks"], rows)
        return self.chip_landmarks[self.chip_index if rows is None else self.chip_index[rows]]

    # -- images --
    def clean(self, rows) -> np.ndarray:
        """The clean chip of every row in ``rows`` (sorted or not)."""
        return self.chips(self.chip_index[np.asarray(rows, np.int64)])

    def occluded(self, rows, masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The occluded chips of ``rows`` (sorted, or any order) and, with ``masks``, their bool pixel masks: read
        where the file stores them, else regenerated exactly as make-pairs drew them (checked by CRC-32)."""
        rows = np.asarray(rows, np.int64)
        if self.stored:
            order = np.argsort(rows, kind="stable")
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            srt = rows[order]
            img = read_rows(self.f["occluded"], srt)[inv]
            m = np.unpackbits(read_rows(self.f["mask"], srt), axis=-1, count=self.width).astype(bool)[inv] \
                if masks else None
            return img, m
        return self._draw(rows, masks)

    def _draw(self, rows: np.ndarray, masks: bool) -> tuple[np.ndarray, np.ndarray | None]:
        keys = self._keys
        names = self._names
        if len(rows) and (keys[1][rows] < 0).any():
            r = rows[keys[1][rows] < 0][0]
            raise SchemaError(f"{self.path} row {r} has no draw key and its occluded chip is not stored")

        def check(n: int, image: np.ndarray) -> None:
            r = rows[n]
            if occluded_checksum(image) != keys[4][r]:
                raise SchemaError(
                    f"{self.path} row {r}: the occluder drawn now differs from the one make-pairs drew (file made "
                    f"by pdsn {self.attrs.get('tool_version')}: its occluders were drawn differently); remake the "
                    f"file with this version, or use that version")
        variants = [OcclusionVariant(names[keys[0][r]], None if keys[3][r] < 0 else int(keys[3][r])) for r in rows]
        return draw_rows(self, rows, variants, keys[1][rows], keys[2][rows], masks, check)

    @cached_property
    def _keys(self):
        f = self.f
        return (f["occluder"][()], f["seed"][()], f["draw"][()], f["target"][()], f["checksum"][()])

    # -- whole reads and streams --
    def read(self, select=None, images: bool = True, masks: bool = True, clean: bool = True,
             occluded: bool = True) -> Pairs:
        """The rows ``select`` (all when None; returned in sorted order) as arrays. ``images=False`` skips every
        image (and mask); ``clean`` / ``occluded`` = False skip one kind (an empty N×0 array in its place)."""
        rows = _sorted_rows(select, self.n)
        n = len(rows)
        empty = np.empty((n, 0))
        occ, m = (self.occluded(rows, masks) if images and occluded else (empty, None))
        if images and masks and m is None:  # masks come with the occluded chips
            _, m = self.occluded(rows, True)
        return Pairs(
            clean=self.clean(rows) if images and clean else empty,
            occluded=occ,
            mask=m if images and masks else empty,
            blocks=self.blocks(None if select is None else rows),
            landmarks=self.landmarks(None if select is None else rows),
            label=self.label[rows].astype(np.int64),
            identity=self.identity,
            source=[self.source[i] for i in rows] if select is not None else list(self.source),
            kind=[self.kind[i] for i in rows] if select is not None else list(self.kind),
            target=self.target[rows],
            attrs=dict(self.attrs),
            rows=rows,
        )

    def batches(self, rows=None, batch: int = BATCH, images: bool = True, masks: bool = False, clean: bool = True,
                occluded: bool = True) -> Iterator[Pairs]:
        """:meth:`read` of consecutive batches of ``rows`` (sorted; all when None): memory for one batch of chips."""
        rows = _sorted_rows(rows, self.n)
        for a in range(0, len(rows), batch):
            yield self.read(rows[a:a + batch], images=images, masks=masks, clean=clean, occluded=occluded)


def draw_rows(pairs, rows: np.ndarray, variants: list, seeds, draws, masks: bool, check=None):
    """The occluded chips of ``rows`` of ``pairs`` (a PairsFile or a ``DrawnPairs``: ``chip_index``, ``chips``,
    ``chip_landmarks``, ``grid``) drawn now — row ``rows[n]`` with ``variants[n]``, ``seeds[n]``, ``draws[n]``
    — and, with ``masks``, their pixel masks; ``check(n, image)`` may refuse a drawn chip. Each chip is read once."""
    cidx = pairs.chip_index[rows]
    uniq, inv = np.unique(cidx, return_inverse=True)
    chips = pairs.chips(uniq)
    lms = pairs.chip_landmarks[uniq]
    h, w = chips.shape[1:3] if len(uniq) else (int(pairs.attrs["height"]), pairs.width)
    out = np.empty((len(rows), h, w, 3), np.uint8)
    mout = np.empty((len(rows), h, w), bool) if masks else None
    for n, u in enumerate(inv.reshape(-1)):
        o = draw(chips[u], lms[u], variants[n], int(seeds[n]), int(draws[n]), pairs.grid)
        if check is not None:
            check(n, o.image)
        out[n] = o.image
        if masks:
            mout[n] = o.mask
    return out, mout


class LazyRows:
    """A sliceable stand-in for an N×H×W×3 array of a pairs file's clean or occluded chips: slices are read (or
    regenerated) when taken, so batched consumers (``extract_features``) hold one batch at a time."""

    def __init__(self, pf: PairsFile, rows, what: str):
        if what not in ("clean", "occluded", "chips"):
            raise ValueError(what)
        self.pf, self.rows, self.what = pf, np.asarray(rows, np.int64), what

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), int(self.pf.attrs["height"]), self.pf.width, 3)

    def __getitem__(self, key):
        sel = self.rows[key]
        if np.ndim(sel) == 0:
            return self._get(np.array([sel]))[0]
        return self._get(sel)

    def _get(self, rows: np.ndarray) -> np.ndarray:
        if self.what == "chips":
            return self.pf.chips(rows)
        if self.what == "clean":
            return self.pf.clean(rows)
        return self.pf.occluded(rows)[0]


def read_pairs(path: str | os.PathLike, select=None, images: bool = True, masks: bool = True, *,
               clean: bool = True, occluded: bool = True) -> Pairs:
    """Load a pairs file (or the rows in ``select``, in sorted order); ``images=False`` skips the big arrays,
    ``masks=False`` the pixel masks, ``clean`` / ``occluded`` = False one kind of chip. Either schema; schema-2
    occluded chips (and masks) are regenerated. Whole files at scale: stream with :meth:`PairsFile.batches`."""
    with PairsFile(path) as pf:
        return pf.read(select, images=images, masks=masks, clean=clean, occluded=occluded)
