"""``pdsn embed``: images → L2-normalised embeddings in HDF5 (optionally PDSN-masked, optionally with features).

Inputs: an identity folder (aligned on the fly, through the chip cache), a text list of image paths, or an HDF5
file of chips (``chips``) or pairs (``clean`` or ``occluded`` rows). Output (``pdsn_kind = "embeddings"``):

- ``embedding``  float32 N×D   L2-normalised
- ``features``   float32 N×C×H×W (``--features``): the trunk's mask-point features, unmasked
- ``fdm_kept``   float32 N     fraction of feature elements kept by the FDM (``--dict``)
- ``label`` int64 N, ``identity`` str C, ``source`` str N
- attrs: trunk, mask_point, template, flip, dictionary, occlusion_source

Rows are written in chunks to ``<out>.partial``; ``--resume`` continues after the last complete chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli.accel import check_precision
from pdsn_cli.atomic import atomic_output, check_resumable, check_writable, interrupt_between_steps, partial_path
from pdsn_cli.data import chips_h5, pairs_h5
from pdsn_cli.data.chip_cache import AlignReport, ChipCache, chips_from_arrays
from pdsn_cli.data.faces import FaceItem, list_identity_folder, printable, resolve_inside
from pdsn_cli.data.h5util import STR, append_rows, make_growable, open_for_writing, stamp
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, JobFailed, SchemaError
from pdsn_cli.pdsn.embedder import Embedder

KIND = "embeddings"
SCHEMA = 1
CHUNK = 512


@dataclass
class EmbedConfig:
    input: Path
    out: Path
    trunk: str = "dlib-resnet"
    weights: str | None = None
    which: str = "clean"  # for pairs files: clean | occluded
    data_dir: Path | None = None  # root for relative paths of a list file
    dict_path: Path | None = None
    occlusion_source: str = "detector"  # oracle (pairs files only) | detector
    detector: Path | None = None
    block_threshold: float = 0.25
    flip: bool = False
    features: bool = False
    batch_size: int = 64
    gpu: int | None = None
    workers: int = 1
    resume: bool = False
    cache_dir: Path | None = None
    precision: str = "bf16"  # CUDA only (pdsn_cli.accel)
    compile: str = "auto"


def _load_input(cfg: EmbedConfig, template: str, progress=None):
    """(chips, occupancy or None, report) for any supported input."""
    p = cfg.input
    if p.is_dir():
        items, skipped = list_identity_folder(p)
        return _align(p, items, skipped, template, cfg, progress)
    if not p.is_file():
        raise BadInputError(f"input not found: {p}")
    if p.suffix in (".h5", ".hdf5"):
        try:
            with h5py.File(p, "r") as f:
                kind = f.attrs.get("pdsn_kind")
        except OSError as e:
            raise SchemaError(f"{p} is not a readable HDF5 file (truncated or foreign?): {e}") from None
        if kind == pairs_h5.KIND:
            if cfg.which not in ("clean", "occluded"):
                raise BadInputError(f"--which must be clean or occluded, got {cfg.which!r}")
            pr = pairs_h5.read_pairs(p)
            if pr.attrs["template"] != template:
                raise SchemaError(f"{p} holds {pr.attrs['template']} chips, trunk needs {template}")
            img = pr.clean if cfg.which == "clean" else pr.occluded
            occ = pr.blocks if cfg.which == "occluded" else np.zeros_like(pr.blocks)
            ids = [pr.identity[i] for i in pr.label]
            return chips_from_arrays(img, pr.landmarks, ids, pr.source, np.zeros(len(ids)), template, False), occ, AlignReport(images=len(ids))
        if kind == chips_h5.KIND:
            # images stay in the file and are read chunk by chunk, while the GPU works on the previous one
            ch = chips_h5.read_chips(p, lazy_images=True)
            if ch.template != template:
                raise SchemaError(f"{p} holds {ch.template} chips, trunk needs {template}")
            return ch, None, AlignReport(images=len(ch))
        raise SchemaError(f"{p} is not a pdsn chips or pairs file (pdsn_kind={kind!r})")
    # a text list of image paths
    root = cfg.data_dir or p.parent
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            resolve_inside(Path(root), line)
        except BadInputError as e:
            raise SchemaError(f"{p}:{n}: {e}") from None
        items.append(FaceItem(printable(line), printable(Path(line).parent.name or "unknown"),
                              None if printable(line) == line else line))
    if not items:
        raise BadInputError(f"{p} lists no image")
    return _align(Path(root), items, [], template, cfg, progress)


def _align(root, items, skipped, template, cfg, progress):
    chips, rep = ChipCache(root, template, cfg.cache_dir).ensure_and_load(
        items, skipped, cfg.workers, progress, what=f"the images in {cfg.input}")
    return chips, None, rep


def embed(cfg: EmbedConfig, progress=None) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.gpu)
    check_writable(cfg.out)
    check_resumable(cfg.out, partial_path(cfg.out), cfg.resume)
    if cfg.batch_size < 1:
        raise BadInputError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    check_precision(cfg.precision)
    # without a dictionary nothing is masked, so --occlusion is moot
    embedder = Embedder.load(cfg.trunk, cfg.weights, cfg.dict_path,
                             cfg.occlusion_source if cfg.dict_path else "oracle", cfg.detector, device,
                             cfg.block_threshold, flip=cfg.flip, batch_size=cfg.batch_size,
                             head_batch_size=max(256, cfg.batch_size), precision=cfg.precision, compile=cfg.compile)
    trunk, point, dictionary = embedder.trunk, embedder.point, embedder.dictionary
    stage = (lambda name: (lambda d, n: progress(name, d, n))) if progress else (lambda name: None)
    chips, occ, rep = _load_input(cfg, trunk.template, stage("align"))
    if dictionary is not None and cfg.occlusion_source == "oracle" and occ is None:
        raise BadInputError("--occlusion oracle needs a pairs file as input (its occlusion masks are known)")
    if dictionary is not None and cfg.occlusion_source == "oracle" and occ.shape[1:] != (dictionary.grid,) * 2:
        raise SchemaError(f"{cfg.input} marks occlusions on a {occ.shape[1]}×{occ.shape[2]} grid, {cfg.dict_path} "
                          f"has a {dictionary.grid}×{dictionary.grid} grid")
    c, h, w = trunk.feature_shape(point)
    tmp = partial_path(cfg.out)
    start = _resume_rows(tmp, trunk.name, point) if cfg.resume and tmp.exists() else 0
    empty_total = 0
    with atomic_output(cfg.out, keep_partial_on_interrupt=True) as tmp_out:
        if start == 0:
            with open_for_writing(tmp_out) as f:
                stamp(f, KIND, SCHEMA, trunk=trunk.name, mask_point=point, template=trunk.template, flip=cfg.flip,
                      dictionary=str(cfg.dict_path or ""), occlusion_source=cfg.occlusion_source if dictionary else "",
                      complete=False)
                make_growable(f, "embedding", (trunk.embedding_dim,), np.float32, compress=False)
                if cfg.features:
                    make_growable(f, "features", (c, h, w), np.float32, chunk_rows=16)
                make_growable(f, "fdm_kept", (), np.float32, compress=False)
                make_growable(f, "label", (), np.int64, compress=False)
                make_growable(f, "source", (), STR, compress=False)
                f.create_dataset("identity", data=np.array(chips.identity, dtype=object), dtype=STR)
        with interrupt_between_steps() as check_interrupt, open_for_writing(tmp_out, "r+") as f:
            # a GPU wants several batches queued per chunk; on the CPU small chunks make resuming finer
            chunk = CHUNK if device.type == "cpu" else max(CHUNK, 8 * cfg.batch_size)
            starts = list(range(start, len(chips), chunk))
            rows = chips.image[starts[0]:starts[0] + chunk] if starts else None
            for a in starts:
                sl = slice(a, min(a + chunk, len(chips)))
                cur = rows
                feats = embedder.features([cur], on_device=True)
                # the next chunk is read (HDF5, disk) while the device still works on this one
                rows = chips.image[sl.stop:sl.stop + chunk] if sl.stop < len(chips) else None
                out = embedder.from_features(feats, cur, occ[sl] if occ is not None else None)
                empty_total += out.fallbacks
                emb = out.embeddings
                if not np.isfinite(emb).all():
                    raise JobFailed(f"trunk {trunk.name} gives non-finite embeddings (NaN/inf) for images "
                                    f"{sl.start}..{sl.stop - 1}; check --weights")
                append_rows(f["embedding"], emb)
                if cfg.features:
                    append_rows(f["features"], (feats[:, 0] if cfg.flip else feats).cpu().numpy())
                append_rows(f["fdm_kept"], out.kept)
                append_rows(f["label"], chips.label[sl])
                append_rows(f["source"], chips.source[sl])
                f.flush()
                if progress:
                    progress("embed", sl.stop, len(chips))
                check_interrupt()
            f.attrs["complete"] = True
    return {
        "out": str(cfg.out), "input": str(cfg.input), "trunk": trunk.name, "mask_point": point,
        "images": len(chips), "identities": len(chips.identity), "embedding_dim": trunk.embedding_dim,
        "flip": cfg.flip, "features": cfg.features, "dictionary": str(cfg.dict_path) if cfg.dict_path else None,
        "all_blocks_discarded_fallbacks": empty_total, "resumed_from": start, "align": rep.as_dict(),
        "seconds": round(time.perf_counter() - t0, 2), "device": str(device),
        "precision": "bf16" if device.type == "cuda" and cfg.precision == "bf16" else "fp32",
    }


def _resume_rows(tmp: Path, trunk: str, point: str) -> int:
    try:
        f = h5py.File(tmp, "r+")
    except OSError:
        raise SchemaError(f"{tmp} is damaged and cannot be resumed; delete it and start again") from None
    with f:
        if f.attrs.get("pdsn_kind") != KIND or f.attrs.get("trunk") != trunk or f.attrs.get("mask_point") != point:
            raise SchemaError(f"{tmp} was written by another embed run; delete it or use the same options")
        names = [d for d in ("embedding", "features", "fdm_kept", "label", "source") if d in f]
        n = min(f[d].shape[0] for d in names)
        n -= n % CHUNK
        for d in names:
            f[d].resize(n, axis=0)
        return n
