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

import dataclasses
import json
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
from pdsn_cli.errors import BadInputError, JobFailed, SchemaError
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.pdsn.models import apply_model
from pdsn_cli.train.processes import Processes

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
    #: a PDSN model (``builtin``, a built-in name or an exported folder): its dictionary and detector
    model: str | None = None
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


def _load_input(cfg: EmbedConfig, template: str, progress=None, shard: tuple[int, int] = (0, 1), device=None):
    """(chips, occupancy or None, report, (lo, hi)) for any supported input: the rows lo..hi of ``chips`` are the
    ``shard`` (rank, world) this process embeds. Images to align are sharded before aligning (each process aligns
    its own); files of chips are read row range by row range."""
    p = cfg.input
    if p.is_dir():
        items, skipped = list_identity_folder(p)
        return _align(p, items, skipped, template, cfg, progress, shard, device)
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
            # only the chips asked for (occluded ones are regenerated from a schema-2 file)
            pr = pairs_h5.read_pairs(p, masks=False, clean=cfg.which == "clean", occluded=cfg.which == "occluded")
            if pr.attrs["template"] != template:
                raise SchemaError(f"{p} holds {pr.attrs['template']} chips, trunk needs {template}")
            img = pr.clean if cfg.which == "clean" else pr.occluded
            occ = pr.blocks if cfg.which == "occluded" else np.zeros_like(pr.blocks)
            ids = [pr.identity[i] for i in pr.label]
            chips = chips_from_arrays(img, pr.landmarks, ids, pr.source, np.zeros(len(ids)), template, False)
            return chips, occ, AlignReport(images=len(ids)), shard_bounds(len(ids), *shard)
        if kind == chips_h5.KIND:
            # images stay in the file and are read chunk by chunk, while the GPU works on the previous one
            ch = chips_h5.read_chips(p, lazy_images=True)
            if ch.template != template:
                raise SchemaError(f"{p} holds {ch.template} chips, trunk needs {template}")
            return ch, None, AlignReport(images=len(ch)), shard_bounds(len(ch), *shard)
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
    return _align(Path(root), items, [], template, cfg, progress, shard, device)


def _align(root, items, skipped, template, cfg, progress, shard, device=None):
    lo, hi = shard_bounds(len(items), *shard)
    # on a GPU the ported CNN detector aligns there too (--face-detector cnn; dlib's HOG is CPU-only)
    align_device = device if device is not None and device.type == "cuda" else None
    chips, rep = ChipCache(root, template, cfg.cache_dir, align_device=align_device).ensure_and_load(
        items[lo:hi], skipped if shard[0] == 0 else [], cfg.workers, progress,
        what=f"the images in {cfg.input}" + (f" (shard {shard[0] + 1} of {shard[1]})" if shard[1] > 1 else ""))
    return chips, None, rep, (0, len(chips))


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows rank·n/world .. (rank+1)·n/world: contiguous shards, so that merging them in rank order keeps the input
    order."""
    return rank * n // world, (rank + 1) * n // world


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.shard-{rank:05d}-of-{world:05d}")


def embed(cfg: EmbedConfig, progress=None) -> dict | None:
    """Embed ``cfg.input`` into ``cfg.out``. Under ``torchrun`` each process embeds a contiguous shard of the inputs
    into ``<out>.shard-R-of-W`` and rank 0 merges them, in input order, into ``<out>`` (``--resume`` keeps the
    complete shards of an interrupted run); only rank 0 returns the result."""
    with Processes(cfg.gpu) as procs:
        return _embed(cfg, procs, progress if procs.main else None)


def _embed(cfg: EmbedConfig, procs: Processes, progress) -> dict | None:
    t0 = time.perf_counter()
    device = procs.device
    check_writable(cfg.out)
    shards = [shard_path(cfg.out, r, procs.world) for r in range(procs.world)] if procs.distributed else []
    if not procs.distributed:
        check_resumable(cfg.out, partial_path(cfg.out), cfg.resume)
    elif cfg.resume and cfg.out.exists() and not any(p.exists() for p in shards):
        raise BadInputError(f"--resume: no shard of an interrupted run beside {cfg.out}; remove it or choose "
                            "another --out")
    if cfg.batch_size < 1:
        raise BadInputError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    check_precision(cfg.precision)
    d, det, source, weights = apply_model(cfg.model, cfg.dict_path, cfg.detector, cfg.occlusion_source, cfg.weights,
                                          cfg.trunk)
    # a copy: the caller's options can run again
    cfg = dataclasses.replace(cfg, dict_path=d, detector=det, occlusion_source=source, weights=weights, model=None)
    # without a dictionary nothing is masked, so --occlusion is moot
    embedder = Embedder.load(cfg.trunk, cfg.weights, cfg.dict_path,
                             cfg.occlusion_source if cfg.dict_path else "oracle", cfg.detector, device,
                             cfg.block_threshold, flip=cfg.flip, batch_size=cfg.batch_size,
                             head_batch_size=max(256, cfg.batch_size), precision=cfg.precision, compile=cfg.compile)
    trunk, point, dictionary = embedder.trunk, embedder.point, embedder.dictionary
    stage = (lambda name: (lambda d, n: progress(name, d, n))) if progress else (lambda name: None)
    chips, occ, rep, (lo, hi) = _load_input(cfg, trunk.template, stage("align"), (procs.rank, procs.world), device)
    if dictionary is not None and cfg.occlusion_source == "oracle" and occ is None:
        raise BadInputError("--occlusion oracle needs a pairs file as input (its occlusion masks are known)")
    if dictionary is not None and cfg.occlusion_source == "oracle" and occ.shape[1:] != (dictionary.grid,) * 2:
        raise SchemaError(f"{cfg.input} marks occlusions on a {occ.shape[1]}×{occ.shape[2]} grid, {cfg.dict_path} "
                          f"has a {dictionary.grid}×{dictionary.grid} grid")
    attrs = dict(trunk=trunk.name, mask_point=point, template=trunk.template, flip=cfg.flip,
                 dictionary=str(cfg.dict_path or ""), occlusion_source=cfg.occlusion_source if dictionary else "")
    writer = _Writer(embedder, chips, occ, cfg.features, attrs, device, progress)
    if not procs.distributed:
        tmp = partial_path(cfg.out)
        start = _resume_rows(tmp, trunk.name, point) if cfg.resume and tmp.exists() else 0
        with atomic_output(cfg.out, keep_partial_on_interrupt=True) as tmp_out:
            writer.write(tmp_out, lo, hi, start)
        resumed, report = start, rep.as_dict()
    else:
        mine, reused = shards[procs.rank], False
        if cfg.resume and _complete_shard(mine, attrs, str(cfg.input), cfg.features):
            with h5py.File(mine, "r") as f:
                report, writer.fallbacks, reused = json.loads(f.attrs["align_report"]), int(f.attrs["fallbacks"]), True
        else:
            report = rep.as_dict()
            with atomic_output(mine) as tmp_out:
                writer.write(tmp_out, lo, hi, 0, shard=dict(input=str(cfg.input), features=cfg.features,
                                                            align_report=json.dumps(report)))
        parts = procs.gather((report, writer.fallbacks, reused))
        if not procs.main:
            return None
        _merge_shards(shards, cfg.out)
        for p in shards:
            p.unlink()
        report = _merge_reports([r for r, _, _ in parts])
        writer.fallbacks = sum(f for _, f, _ in parts)
        resumed = sum(r for _, _, r in parts)
    with h5py.File(cfg.out, "r") as f:
        images, identities = len(f["embedding"]), len(f["identity"])
    return {
        "out": str(cfg.out), "input": str(cfg.input), "trunk": trunk.name, "mask_point": point,
        "images": images, "identities": identities, "embedding_dim": trunk.embedding_dim,
        "flip": cfg.flip, "features": cfg.features, "dictionary": str(cfg.dict_path) if cfg.dict_path else None,
        "all_blocks_discarded_fallbacks": writer.fallbacks, "align": report,
        "seconds": round(time.perf_counter() - t0, 2), "device": str(device), "world_size": procs.world,
        # one process: rows kept from an interrupted run; torchrun: shards kept
        "resumed_from": resumed,
        "precision": "bf16" if device.type == "cuda" and cfg.precision == "bf16" else "fp32",
    }


class _Writer:
    """Embeds rows lo..hi of the chips into an embeddings file, chunk by chunk (the unit of ``--resume``)."""

    def __init__(self, embedder: Embedder, chips, occ, features: bool, attrs: dict, device, progress):
        self.embedder, self.chips, self.occ, self.features, self.attrs = embedder, chips, occ, features, attrs
        self.device, self.progress, self.fallbacks = device, progress, 0

    def write(self, path: Path, lo: int, hi: int, start: int, shard: dict | None = None) -> None:
        emb, chips, occ = self.embedder, self.chips, self.occ
        trunk = emb.trunk
        c, h, w = trunk.feature_shape(emb.point)
        if start == 0:
            with open_for_writing(path) as f:
                stamp(f, KIND, SCHEMA, **self.attrs, complete=False)
                make_growable(f, "embedding", (trunk.embedding_dim,), np.float32, compress=False)
                if self.features:
                    make_growable(f, "features", (c, h, w), np.float32, chunk_rows=16)
                make_growable(f, "fdm_kept", (), np.float32, compress=False)
                make_growable(f, "label", (), np.int64, compress=False)
                make_growable(f, "source", (), STR, compress=False)
                names = chips.identity if lo == 0 and hi == len(chips) else \
                    list(dict.fromkeys(chips.identity[i] for i in chips.label[lo:hi]))
                f.create_dataset("identity", data=np.array(names, dtype=object), dtype=STR)
                for k, v in (shard or {}).items():
                    f.attrs[k] = v
        with interrupt_between_steps() as check_interrupt, open_for_writing(path, "r+") as f:
            at = {n: i for i, n in enumerate(f["identity"].asstr()[()].tolist())}
            relabel = np.array([at.get(n, -1) for n in chips.identity], np.int64)
            # a GPU wants several batches queued per chunk; on the CPU small chunks make resuming finer
            chunk = CHUNK if self.device.type == "cpu" else max(CHUNK, 8 * emb.batch_size)
            starts = list(range(lo + start, hi, chunk))
            rows = chips.image[starts[0]:min(starts[0] + chunk, hi)] if starts else None
            for a in starts:
                sl = slice(a, min(a + chunk, hi))
                cur = rows
                feats = emb.features([cur], on_device=True)
                # the next chunk is read (HDF5, disk) while the device still works on this one
                rows = chips.image[sl.stop:min(sl.stop + chunk, hi)] if sl.stop < hi else None
                out = emb.from_features(feats, cur, occ[sl] if occ is not None else None)
                self.fallbacks += out.fallbacks
                if not np.isfinite(out.embeddings).all():
                    raise JobFailed(f"trunk {trunk.name} gives non-finite embeddings (NaN/inf) for images "
                                    f"{sl.start}..{sl.stop - 1}; check --weights")
                append_rows(f["embedding"], out.embeddings)
                if self.features:
                    append_rows(f["features"], (feats[:, 0] if emb.flip else feats).cpu().numpy())
                append_rows(f["fdm_kept"], out.kept)
                append_rows(f["label"], relabel[chips.label[sl]])
                append_rows(f["source"], chips.source[sl])
                f.flush()
                if self.progress:
                    self.progress("embed", sl.stop - lo, hi - lo)
                check_interrupt()
            f.attrs["complete"] = True
            f.attrs["fallbacks"] = self.fallbacks


def _complete_shard(path: Path, attrs: dict, input: str, features: bool) -> bool:
    """A shard written by an earlier run of the same command, whole."""
    try:
        with h5py.File(path, "r") as f:
            same = all(f.attrs.get(k) == v for k, v in attrs.items())
            return bool(same and f.attrs.get("complete") and f.attrs.get("input") == input
                        and bool(f.attrs.get("features")) == features)
    except OSError:
        return False


def _merge_shards(shards: list[Path], out: Path) -> None:
    """The shards, in rank order, as one embeddings file; identities in order of first appearance (as one process
    would have listed them)."""
    names: dict[str, int] = {}
    with atomic_output(out) as tmp, open_for_writing(tmp) as fo:
        for k, path in enumerate(shards):
            with h5py.File(path, "r") as fi:
                if k == 0:
                    for key, v in fi.attrs.items():
                        if key not in ("input", "features", "align_report", "fallbacks"):
                            fo.attrs[key] = v
                    for name in ("embedding", "features", "fdm_kept", "label", "source"):
                        if name in fi:
                            d = fi[name]
                            fo.create_dataset(name, shape=(0, *d.shape[1:]), maxshape=(None, *d.shape[1:]),
                                              dtype=d.dtype, chunks=d.chunks, compression=d.compression)
                own = fi["identity"].asstr()[()].tolist()
                to_global = np.array([names.setdefault(n, len(names)) for n in own], np.int64)
                for a in range(0, len(fi["embedding"]), CHUNK):
                    for name in ("embedding", "features", "fdm_kept", "source"):
                        if name in fi:
                            append_rows(fo[name], fi[name][a:a + CHUNK])
                    append_rows(fo["label"], to_global[fi["label"][a:a + CHUNK]])
        fo.create_dataset("identity", data=np.array(list(names), dtype=object), dtype=STR)
        fo.attrs["complete"] = True


def _merge_reports(reports: list[dict]) -> dict:
    out = dict(reports[0])
    for r in reports[1:]:
        for k, v in r.items():
            out[k] = out[k] + v
    return out


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
