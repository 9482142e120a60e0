"""Exact top-k cosine search of probes against a gallery of up to millions of embeddings, in bounded memory.

MegaFace-style identification scores a few thousand probes against 10^6 distractors: ~3.5e9 scores, 14 GB as
float32, so the probes×gallery matrix is never built. The gallery is streamed in chunks of rows (from memory,
HDF5, or generated on the fly), each chunk is scored against a tile of probes with one matrix product, and a
running top-k per probe absorbs it. Peak extra memory is one gallery chunk plus one probe-tile × chunk block
of scores, whatever the gallery size.

MegaFace evaluates nested galleries (the first 10, 100, ..., 10^6 distractors); one pass serves them all:
chunks are cut at those sizes and the running top-k (and score histogram) is copied out at each of them.

Results are exact (no approximate index) and deterministic: among equal scores the lower gallery index wins,
as a stable sort of the full score row would give. Scores are cosines: probes and gallery rows are
L2-normalised here unless the caller says they already are (``normalize=False``).

Why the merge is not ``torch.topk`` on every chunk: after j chunks, a chunk holds a new top-k entry of a
probe with probability about k/j, so nearly every score is below the probe's running k-th best. One
max-reduction over column groups finds the few places worth a look and only those scores are gathered and
sorted. A full top-k per chunk costs more than the matrix product itself at D=128 on CPU (measured: ~6 ns
per score against ~4 for the product on 2 busy cores); the group maxima cost ~1 ns per score.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import h5py
import numpy as np
import torch

from pdsn_cli.errors import BadInputError, SchemaError

#: CPU defaults, measured on 2 cores (benchmarks/search_vs_faiss.py): 8192-row chunks make ~120 merge steps
#: per 10^6 rows, few enough that their fixed cost is small next to the matrix products; a probe tile of
#: up to 4096 keeps the score block at 128 MiB.
CPU_CHUNK_ROWS = 8192
CPU_SCORE_BLOCK = 1 << 25
#: GPU defaults: large chunks amortise the host→device copy and kernel launches; 2^28 scores = 1 GiB.
GPU_CHUNK_ROWS = 65536
GPU_SCORE_BLOCK = 1 << 28

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# Gallery sources


class GallerySource(Protocol):
    """What ``topk`` streams from: rows ``[start, stop)`` on demand, so the gallery need not fit in memory."""

    dim: int

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArrayGallery:
    """A gallery already in memory or memory-mapped (``np.load(..., mmap_mode="r")``): rows are views."""

    def __init__(self, array):
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if not hasattr(array, "shape") or len(array.shape) != 2:
            raise BadInputError(f"gallery must be a 2-D array (rows × dim), got shape {getattr(array, 'shape', None)}")
        self.array = array
        self.dim = int(array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop], dtype=np.float32)


class H5Gallery:
    """Gallery rows read chunk by chunk from an HDF5 dataset (``pdsn embed`` output: ``embedding``, N×D).

    Given a path it opens (and ``close()`` closes) the file; given an open ``h5py.Dataset`` it only reads it.
    """

    def __init__(self, source, dataset: str = "embedding"):
        self._file = None
        if isinstance(source, h5py.Dataset):
            ds = source
        else:
            path = os.fspath(source)
            if not os.path.isfile(path):
                raise SchemaError(f"no such file: {path}")
            try:
                self._file = h5py.File(path, "r")
            except OSError as e:
                raise SchemaError(f"{path} is not a readable HDF5 file (truncated or foreign?): {e}") from None
            if dataset not in self._file or not isinstance(self._file[dataset], h5py.Dataset):
                self.close()
                raise SchemaError(f"{path} has no dataset {dataset!r} to search")
            ds = self._file[dataset]
        if ds.ndim != 2 or ds.dtype.kind != "f":
            msg = f"gallery dataset {ds.name} must be 2-D floating point, got shape {ds.shape} {ds.dtype}"
            self.close()
            raise SchemaError(msg)
        self.dataset = ds
        self.dim = int(ds.shape[1])

    def __len__(self) -> int:
        return int(self.dataset.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.dataset.dtype == np.float32:
            out = np.empty((stop - start, self.dim), dtype=np.float32)
            # straight into our buffer: no intermediate array per chunk
            self.dataset.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])
            return out
        return self.dataset[start:stop].astype(np.float32)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GeneratedGallery:
    """A gallery made on demand by ``make_chunk(start, stop)`` (synthetic distractors): never stored whole.

    Row i must not depend on how rows are split into ranges: ``topk`` asks for ranges cut by ``chunk_rows``
    and by the nested sizes, so seed per row (or per fixed block of rows), not per call.
    """

    def __init__(self, n: int, dim: int, make_chunk: Callable[[int, int], np.ndarray]):
        if int(n) < 0 or int(dim) < 1:
            raise BadInputError(f"generated gallery needs n >= 0 and dim >= 1, got n={n}, dim={dim}")
        self.n, self.dim, self.make_chunk = int(n), int(dim), make_chunk

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> np.ndarray:
        rows = self.make_chunk(start, stop)
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (stop - start, self.dim):
            raise BadInputError(f"generated gallery chunk [{start}, {stop}) has shape {rows.shape}, "
                                f"expected {(stop - start, self.dim)}")
        return rows


def as_gallery(gallery) -> GallerySource:
    """Arrays and tensors become ``ArrayGallery``; anything with ``read``/``dim``/``__len__`` is used as is."""
    if hasattr(gallery, "read") and hasattr(gallery, "dim") and hasattr(gallery, "__len__"):
        return gallery
    if isinstance(gallery, (np.ndarray, torch.Tensor)) or hasattr(gallery, "shape"):
        return ArrayGallery(gallery)
    raise BadInputError(f"cannot search a gallery of type {type(gallery).__name__}: "
                        "give an array, ArrayGallery, H5Gallery or GeneratedGallery")


# ---------------------------------------------------------------------------------------------------------
# Search


@dataclass
class SearchResult:
    """Top-k per probe for each nested gallery size; ``hist`` counts every probe×gallery score when asked.

    scores: float32 [S, P, k], descending; -inf where a prefix has fewer than k rows.
    index:  int64   [S, P, k], gallery row of each score; -1 for padding.
    sizes:  the S prefix sizes, ascending.
    hist:   int64 [S, bins] over [-1, 1] (edges ``np.linspace(-1, 1, bins + 1)``), or None.
    """

    scores: np.ndarray
    index: np.ndarray
    sizes: list[int]
    hist: np.ndarray | None = None


def topk(probes, gallery, k: int, *, sizes: Sequence[int] | None = None, chunk_rows: int | None = None,
         device=None, dtype=None, histogram_bins: int | None = None,
         progress: Callable[[int, int], None] | None = None, normalize: bool = True) -> SearchResult:
    """Exact top-``k`` cosine scores of each probe among the first ``sizes[s]`` gallery rows, for every s.

    probes: float [P, D]. gallery: array/tensor or a GallerySource (``ArrayGallery``, ``H5Gallery``,
    ``GeneratedGallery``). sizes: ascending prefix sizes, default ``[len(gallery)]``; rows past the last are
    never read. chunk_rows: gallery rows per step (the memory bound; defaults per device). device: where to
    compute (``"cuda"`` streams chunks through pinned memory). dtype: matrix-product precision, float32 on
    CPU by default (bfloat16 allowed), float16 on CUDA (bfloat16 allowed); the top-k bookkeeping is float32
    either way. histogram_bins: also count all scores per size in that many bins over [-1, 1] (see
    ``threshold_at_far``); on CPU this makes the search about 2.5× slower (2 cores, D=128: a pass to bin each
    score, and torch's bincount is single-threaded). progress: called as ``progress(rows_done, rows_total)``
    after each chunk.
    normalize: False when rows are already unit length (skips one pass over each chunk; scores are then
    plain inner products).
    """
    gallery = as_gallery(gallery)
    dev = _device(device)
    cdtype = _compute_dtype(dtype, dev)
    q = _probes(probes, gallery.dim, normalize)
    n_gallery = len(gallery)
    if n_gallery == 0:
        raise BadInputError("the gallery is empty")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BadInputError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    sizes = _sizes(sizes, n_gallery)
    if chunk_rows is None:
        chunk_rows = GPU_CHUNK_ROWS if dev.type == "cuda" else CPU_CHUNK_ROWS
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise BadInputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    chunk_rows = int(min(chunk_rows, sizes[-1]))
    bins = None
    if histogram_bins is not None:
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, (int, np.integer)) \
                or histogram_bins < 1:
            raise BadInputError(f"histogram_bins must be a positive integer, got {histogram_bins!r}")
        bins = int(histogram_bins)

    n_probes = q.shape[0]
    block = GPU_SCORE_BLOCK if dev.type == "cuda" else CPU_SCORE_BLOCK
    tile = max(1, min(n_probes, block // chunk_rows))
    q = q.to(dev).to(cdtype)
    # the running top-k lives on the host in numpy: see _merge
    best_s = np.full((n_probes, k), -np.inf, dtype=np.float32)
    best_i = np.full((n_probes, k), -1, dtype=np.int64)
    out_s = np.empty((len(sizes), n_probes, k), dtype=np.float32)
    out_i = np.empty((len(sizes), n_probes, k), dtype=np.int64)
    hist_run = torch.zeros(bins, dtype=torch.int64, device=dev) if bins else None
    out_h = np.empty((len(sizes), bins), dtype=np.int64) if bins else None
    scores_buf = None
    if dev.type == "cpu" and cdtype == torch.float32:
        scores_buf = torch.empty(tile * chunk_rows, dtype=torch.float32)
    upload = _Uploader(dev, chunk_rows, gallery.dim) if dev.type == "cuda" else None

    done = 0
    for s, (start, stop) in _chunks(sizes, chunk_rows):
        rows = gallery.read(start, stop)
        if not isinstance(rows, np.ndarray) or rows.shape != (stop - start, gallery.dim):
            raise BadInputError(f"gallery rows [{start}, {stop}) came back with shape "
                                f"{getattr(rows, 'shape', None)}, expected {(stop - start, gallery.dim)}")
        g = _checked_rows(upload(rows) if upload else rows, start, normalize).to(cdtype)
        for p0 in range(0, n_probes, tile):
            p1 = min(n_probes, p0 + tile)
            sc = _scores(q[p0:p1], g, scores_buf)
            _merge(best_s[p0:p1], best_i[p0:p1], sc, start)
            if hist_run is not None:
                _histogram(sc, hist_run)  # last: it overwrites sc
        done = stop
        if s is not None:
            out_s[s] = best_s
            out_i[s] = best_i
            if out_h is not None:
                out_h[s] = hist_run.cpu().numpy()
        if progress is not None:
            progress(done, sizes[-1])
    return SearchResult(scores=out_s, index=out_i, sizes=list(sizes), hist=out_h)


def threshold_at_far(hist, far: float):
    """The score threshold accepting at most a fraction ``far`` of the impostor scores counted in ``hist``.

    ``hist`` is one row of ``SearchResult.hist`` (bins over [-1, 1]), or the whole [S, bins] array (one
    threshold per size). The answer is the lowest bin edge t such that the scores in bins at or above t are at
    most ``far`` of all, so "accept when score > t" has FAR <= far. Resolution: the exact quantile lies
    within one bin width (2 / bins) below t; 20,000 bins give 1e-4, finer than the rounding of float16
    inputs in a GPU search. Near FAR=1e-6 of 3.5e9 scores the tail holds ~3,500 scores, so counts, not bins,
    set the noise.
    """
    h = np.asarray(hist)
    if h.ndim == 2:
        return np.array([threshold_at_far(row, far) for row in h])
    if h.ndim != 1 or h.size == 0:
        raise BadInputError(f"hist must be 1-D (bins) or 2-D (sizes × bins), got shape {h.shape}")
    if not (0 <= far <= 1) or not math.isfinite(far):
        raise BadInputError(f"far must lie in [0, 1], got {far}")
    h = h.astype(np.int64)
    total = int(h.sum())
    if total <= 0:
        raise BadInputError("the histogram is empty: no scores to set a threshold from")
    bins = h.size
    # tail[j] = scores in bins j.. (scores >= edge j); tail[bins] = 0
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0]])
    j = int(np.argmax(tail <= far * total))
    return -1.0 + 2.0 * j / bins


# ---------------------------------------------------------------------------------------------------------
# Internals


def _device(device) -> torch.device:
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise BadInputError(f"not a torch device: {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {dev} asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"search runs on cpu or cuda, not {dev.type}")
    return dev


def _compute_dtype(dtype, dev: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise BadInputError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BadInputError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.float16 and dev.type == "cpu":
        raise BadInputError("float16 search is for CUDA; on CPU use float32 or bfloat16")
    return dtype


def _probes(probes, dim: int, normalize: bool) -> torch.Tensor:
    if isinstance(probes, torch.Tensor):
        probes = probes.detach().cpu().numpy()
    try:
        p = np.asarray(probes, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"probes must be a numeric P×D array: {e}") from None
    if p.ndim != 2:
        raise BadInputError(f"probes must be a 2-D array (P × D), got shape {p.shape}")
    if p.shape[0] == 0:
        raise BadInputError("no probes to search")
    if p.shape[1] != dim:
        raise BadInputError(f"probes have dimension {p.shape[1]}, the gallery has {dim}")
    return _checked_rows(p, 0, normalize, what="probe")


def _checked_rows(x, offset: int, normalize: bool, what: str = "gallery row") -> torch.Tensor:
    """Refuse NaN/inf (and, for cosines, zero) rows using the row norms, which normalising needs anyway.

    Host arrays are checked in numpy: one small single-threaded pass, cheaper than a round of parallel torch
    operations on a busy CPU. Rows already on the GPU are checked there.
    """
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        ok = np.isfinite(norms) & (norms > 0) if normalize else np.isfinite(norms)
        bad = None if ok.all() else int(np.flatnonzero(~ok)[0])
    else:
        norms = torch.linalg.vector_norm(x.float(), dim=1)
        ok = torch.isfinite(norms) & (norms > 0) if normalize else torch.isfinite(norms)
        bad = None if bool(ok.all()) else int((~ok).nonzero()[0, 0])
    if bad is not None:
        why = "has NaN or infinite values" if not math.isfinite(float(norms[bad])) else \
            "is all zeros (cosine undefined)"
        raise BadInputError(f"{what} {offset + bad} {why}")
    if isinstance(x, np.ndarray):
        x = x / norms[:, None] if normalize else (x if x.flags.writeable else x.copy())
        return torch.from_numpy(x)
    return x / norms[:, None] if normalize else x


def _sizes(sizes, n_gallery: int) -> list[int]:
    if sizes is None:
        return [n_gallery]
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError):
        raise BadInputError(f"sizes must be a list of integers, got {sizes!r}") from None
    if not sizes:
        raise BadInputError("sizes is empty: give at least one gallery size")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise BadInputError(f"sizes must be strictly ascending, got {sizes}")
    if sizes[0] < 1 or sizes[-1] > n_gallery:
        raise BadInputError(f"sizes must lie in 1..{n_gallery} (the gallery's rows), got {sizes}")
    return sizes


def _chunks(sizes: list[int], chunk_rows: int):
    """(size index or None, (start, stop)) over rows [0, sizes[-1]); no chunk straddles a size."""
    start = 0
    for s, end in enumerate(sizes):
        while start < end:
            stop = min(end, start + chunk_rows)
            yield (s if stop == end else None), (start, stop)
            start = stop


def _scores(q: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    if buf is not None:
        out = buf[: q.shape[0] * g.shape[0]].view(q.shape[0], g.shape[0])
        return torch.mm(q, g.T, out=out)
    if q.is_cuda and q.dtype != torch.float32:
        try:  # float32 output keeps the ranking resolution of the float32 accumulator
            return torch.mm(q, g.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    return torch.mm(q, g.T).float()


def _histogram(sc: torch.Tensor, hist: torch.Tensor) -> None:
    """Add the scores ``sc`` to ``hist`` (bins over [-1, 1]), overwriting ``sc`` to save a buffer. Scores a
    rounding error outside [-1, 1] (or raw inner products with ``normalize=False``) count in the end bins.

    Bin indices by arithmetic, then ``bincount``: exact int64 counts (``torch.histc`` counts in float32,
    exact only below 2^24 per bin) and somewhat faster on CPU.
    """
    bins = hist.numel()
    b = sc.clamp_(-1.0, 1.0).add_(1.0).mul_(bins / 2).to(torch.int32)
    h = torch.bincount(b.view(-1), minlength=bins + 1)
    hist += h[:bins]
    hist[-1] += h[bins]  # score == 1.0 exactly: the last bin is closed


#: column groups per row for locating candidates: group g holds columns g, g + G, g + 2G, ..., so that the
#: group maxima come from one vectorised pass (an element-wise max over contiguous slices of the row)
_GROUPS = 64
#: scores gathered per step of the merge: bounds its index arrays to ~8 MiB
_GATHER = 1 << 20


def _merge(best_s: np.ndarray, best_i: np.ndarray, sc: torch.Tensor, offset: int) -> None:
    """Fold one chunk's scores ``sc`` [p, c] (gallery rows offset..) into the running top-k, in place.

    Only scores strictly above a probe's current k-th best can enter (an equal score has a higher index and
    loses the tie), and after j chunks a chunk holds a new top-k entry with probability about k/j. So one
    max-reduction over column groups on the device finds the few (probe, group) pairs worth a look, only
    those scores are gathered, and the bookkeeping runs in numpy on the host: it is a few small arrays per
    chunk, where torch's per-operation cost (and, on CPU, thread hand-offs) would cost more than the work.
    Where most groups qualify (the first chunk, when the threshold is still -inf) the row is first cut to its
    chunk top-k on the device, keeping every score tied with the k-th so that ties are decided by index.
    """
    k = best_s.shape[1]
    p, c = sc.shape
    thr = best_s[:, -1]
    per, stride = c // _GROUPS, _GROUPS
    many = 2 * k + 8  # more candidates than this in a row: cut it to its chunk top-k first
    if c % _GROUPS == 0 and per >= 4:
        hit = sc.view(p, per, _GROUPS).amax(dim=1).cpu().numpy() > thr[:, None]  # [p, G]
        heavy = hit.sum(axis=1) > min(many, _GROUPS // 2)
    else:  # a ragged chunk (at a size boundary or the gallery's end): each row is one group
        per, stride = c, 1
        t = torch.from_numpy(thr).to(sc.device)[:, None]
        hit = (sc.amax(dim=1, keepdim=True) > t).cpu().numpy()  # [p, 1]
        heavy = (sc > t).sum(dim=1).cpu().numpy() > many if c > many else np.zeros(p, dtype=bool)
    parts = []
    if heavy.any():
        heavy_rows = np.flatnonzero(heavy)
        dev_rows = torch.from_numpy(heavy_rows).to(sc.device)
        hs = sc if heavy_rows.size == p else sc.index_select(0, dev_rows)
        kth = hs.topk(k, dim=1, sorted=False).values.amin(dim=1)
        cut = torch.nextafter(kth, kth.new_tensor(-math.inf))  # keep scores == kth: ties go by index
        cut = torch.maximum(cut, torch.from_numpy(thr[heavy_rows]).to(sc.device))
        hr, hc = (hs > cut[:, None]).nonzero(as_tuple=True)
        parts.append((heavy_rows[hr.cpu().numpy()], hc.cpu().numpy(), hs[hr, hc].cpu().numpy()))
        hit[heavy] = False
    gr, gg = np.nonzero(hit)
    step = max(1, _GATHER // per)  # hit groups gathered at a time
    flat = sc.numpy().reshape(-1) if sc.device.type == "cpu" else sc.reshape(-1)
    for h0 in range(0, gr.size, step):
        r_, g_ = gr[h0:h0 + step], gg[h0:h0 + step]
        lin = (r_ * c + g_)[:, None] + stride * np.arange(per)  # [H, per] flat positions in sc
        if sc.device.type == "cpu":
            vals = flat[lin]
        else:
            vals = flat[torch.from_numpy(lin).to(sc.device)].cpu().numpy()
        h, m = np.nonzero(vals > thr[r_][:, None])
        parts.append((r_[h], g_[h] + stride * m, vals[h, m]))
    if not parts:
        return
    r, col, v = (np.concatenate(x) for x in zip(*parts))
    # candidates in (probe, gallery index) order, so that a stable sort leaves equal scores in index order
    order = np.argsort(r * c + col)
    r, col, v = r[order], col[order], v[order]
    # one padded row per updated probe: its old top-k (lower indices than any candidate), then candidates
    rows, local, counts = np.unique(r, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    width = k + int(counts.max())
    val = np.full((rows.size, width), -np.inf, dtype=np.float32)
    idx = np.full((rows.size, width), -1, dtype=np.int64)
    val[:, :k] = best_s[rows]
    idx[:, :k] = best_i[rows]
    slot = k + np.arange(r.size) - starts[local]
    val[local, slot] = v
    idx[local, slot] = col + offset
    top = np.argsort(-val, axis=1, kind="stable")[:, :k]
    best_s[rows] = np.take_along_axis(val, top, axis=1)
    best_i[rows] = np.take_along_axis(idx, top, axis=1)


class _Uploader:
    """Host→GPU copies through two pinned buffers, so a copy can overlap the previous chunk's compute."""

    def __init__(self, dev: torch.device, chunk_rows: int, dim: int):
        self.dev = dev
        self.bufs = [torch.empty((chunk_rows, dim), dtype=torch.float32).pin_memory() for _ in range(2)]
        self.events = [None, None]
        self.turn = 0

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy out of this buffer two chunks ago is finished
        host = self.bufs[i][: rows.shape[0]]
        host.numpy()[...] = rows  # numpy copy: fine with read-only (memory-mapped) rows
        g = host.to(self.dev, non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        return g
