"""``pdsn make-pairs``: aligned chips → (clean, occluded) pairs in HDF5.

Work is cut into chunks of rows; each row's occluder is drawn by the one seeding rule of
``pdsn_cli.occlusion.driver``, from (seed, variant, image · per_image + repeat), so the output does not depend on the number of workers, and an interrupted run resumed with ``--resume`` (or a file
grown with ``--append``) holds exactly the rows a single uninterrupted run would have written.

The file (``pdsn_cli.data.pairs_h5``, schema 2) stores each clean chip once and, per row, the chip's index and
that draw key (occluder asked for, seed, n, target block) with the CRC-32 of the occluded chip drawn here: readers
regenerate the occluded chip bit for bit instead of storing it (``--store-occluded`` stores it too, as schema 1
did for every row).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli.data import pairs_h5
from pdsn_cli.atomic import atomic_output, check_resumable, check_writable, interrupt_between_steps, partial_path
from pdsn_cli.data.chip_cache import DataSpec, load_face_sets
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.data.faces import read_identity_list
from pdsn_cli.data.h5util import open_for_writing, read_strings
from pdsn_cli.align.templates import get_template
from pdsn_cli.occlusion.driver import OcclusionVariant, draw
from pdsn_cli.occlusion.occluders import OCCLUDERS
from pdsn_cli.report.tables import Result

CHUNK = 256


@dataclass
class MakePairsConfig:
    out: Path
    #: one face set, or several (their people kept apart: pdsn_cli.data.chip_cache.load_face_sets)
    data: DataSpec | list[DataSpec] = field(default_factory=DataSpec)
    occluder: str | None = None  # an occluder kind; None with block set
    block: str | None = None  # "all" or an int as text
    grid: int = 5
    template: str = "dlib150"
    per_image: int = 1
    identities: Path | None = None
    limit: int | None = None
    seed: int = 0
    workers: int = 1
    append: bool = False
    resume: bool = False
    cache_dir: Path | None = None
    #: also store every occluded chip and its pixel mask (readers then read them instead of drawing them again)
    store_occluded: bool = False


def parse_blocks(block: str | None, grid: int) -> list[int] | None:
    if block is None:
        return None
    if grid < 1 or grid > 16:
        raise BadInputError(f"--grid must be between 1 and 16, got {grid}")
    if block == "all":
        return list(range(grid * grid))
    try:
        j = int(block)
    except ValueError:
        raise BadInputError(f"--block must be a block index or 'all', got {block!r}") from None
    if not 0 <= j < grid * grid:
        raise BadInputError(f"--block {j} is outside the {grid}×{grid} grid (0..{grid * grid - 1})")
    return [j]


def check_grid(grid: int, template: str) -> None:
    """A K×K grid must leave blocks of 4 px or more on the template's chip."""
    t = get_template(template)
    if grid < 1 or min(t.size) // grid < 4:
        raise BadInputError(f"--grid {grid} does not fit the {t.size[0]}×{t.size[1]} {template} chip "
                            f"(blocks would be under 4 px)")


def validate(cfg: MakePairsConfig) -> list[tuple[str, int]]:
    """Check every argument before any work; returns the (kind, block) list each image gets."""
    check_grid(cfg.grid, cfg.template)
    t = get_template(cfg.template)
    if cfg.per_image < 1:
        raise BadInputError(f"--per-image must be ≥ 1, got {cfg.per_image}")
    if cfg.workers < 1:
        raise BadInputError(f"--workers must be ≥ 1, got {cfg.workers}")
    blocks = parse_blocks(cfg.block, cfg.grid)
    if blocks is not None and cfg.occluder not in (None, "block"):
        raise BadInputError("give either --occluder or --block, not both")
    if blocks is None:
        kind = cfg.occluder or "random"
        if kind not in OCCLUDERS:
            raise BadInputError(f"unknown occluder {kind!r}; choose one of {', '.join(OCCLUDERS)}")
        if kind == "block":
            raise BadInputError("--occluder block needs --block J (or --block all)")
        specs = [(kind, -1)]
    else:
        specs = [("block", j) for j in blocks]
    check_writable(cfg.out)
    check_resumable(cfg.out, partial_path(cfg.out), cfg.resume)
    if cfg.append and cfg.resume:
        raise BadInputError("--append and --resume do not go together")
    if cfg.append and not cfg.out.exists():
        raise BadInputError(f"--append: {cfg.out} does not exist")
    if cfg.append:
        with pairs_h5.open_pairs(cfg.out) as f:
            _check_append(f, cfg.out, cfg, t.size[0], t.size[1])
    return specs


def _check_append(f, path, cfg: MakePairsConfig, h: int, w: int) -> None:
    pairs_h5.check_compatible(f, path, grid=cfg.grid, template=cfg.template, height=h, width=w)
    if ("occluded" in f) != cfg.store_occluded:
        raise SchemaError(f"{path} {'stores' if 'occluded' in f else 'does not store'} its occluded chips: "
                          f"{'add' if 'occluded' in f else 'drop'} --store-occluded to add rows to it")


# ---- workers: chips are shared by fork (no torch here, so forking is safe) -----------------------------------
_CHIPS = None


def _occlude_rows(args):
    """(image, n, kind asked, block, occluded chip or None, pixel mask or None, blocks, kind drawn, CRC-32) per row;
    the chips travel back only when they are stored (``images``) — the file keeps their draw key instead."""
    rows, seed, grid, images = args
    out = []
    chip_i, chip = -1, None
    for img_i, n, kind, j in rows:  # n: the row's index among the variant's rows (image · per_image + repeat)
        if img_i != chip_i:  # rows come image by image: each chip is read once from where it is stored
            chip_i, chip = img_i, _CHIPS.image[img_i]
        occ = draw(chip, _CHIPS.landmarks[img_i], OcclusionVariant(kind, None if j < 0 else j), seed, n, grid)
        out.append((img_i, n, kind, j, occ.image if images else None, occ.mask if images else None, occ.blocks,
                    occ.kind, pairs_h5.occluded_checksum(occ.image)))
    return out


def make_pairs(cfg: MakePairsConfig, progress=None, align_progress=None) -> dict:
    global _CHIPS
    specs = validate(cfg)
    idents = read_identity_list(cfg.identities) if cfg.identities else None
    t0 = time.perf_counter()
    sets = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    # lazy: the chips stay in the cache's shards and are read as rows need them, so memory does not grow with
    # the face set (500k photos: 33 GB of chips otherwise)
    chips, rep = load_face_sets(sets, cfg.template, idents, cfg.limit, cfg.seed, cfg.workers,
                                cfg.cache_dir, progress=align_progress, lazy=True)
    t_align = time.perf_counter() - t0
    _CHIPS = chips
    jobs = [(i, i * cfg.per_image + k, kind, j) for i in range(len(chips)) for k in range(cfg.per_image)
            for kind, j in specs]
    attrs = dict(
        occluder=cfg.occluder or ("block" if cfg.block is not None else "random"),
        block_spec=str(cfg.block) if cfg.block is not None else "",
        seed=cfg.seed, per_image=cfg.per_image, synthetic=chips.synthetic,
        data_root=" + ".join(d.describe() for d in sets),
    )
    h, w = chips.image.shape[1:3]
    tmp = partial_path(cfg.out)
    start = 0
    if cfg.resume and tmp.exists():
        start = _resume_point(tmp, cfg, attrs, h, w)
    elif cfg.append:
        with pairs_h5.open_pairs(cfg.out) as f:
            _check_append(f, cfg.out, cfg, h, w)
        shutil.copyfile(cfg.out, tmp)
        with h5py.File(tmp, "r+") as f:
            f.attrs["complete"] = False
    t1 = time.perf_counter()
    kinds = Counter()
    # an interrupted append is dropped whole (the original file was never touched): rerunning it is the resume
    with atomic_output(cfg.out, keep_partial_on_interrupt=not cfg.append) as tmp_out:
        assert tmp_out == tmp
        if start == 0 and not cfg.append and not (cfg.resume and tmp.exists()):
            with open_for_writing(tmp) as f:
                pairs_h5.create(f, grid=cfg.grid, template=cfg.template, size=(h, w),
                                store_occluded=cfg.store_occluded, **attrs)
        with interrupt_between_steps() as check_interrupt, open_for_writing(tmp, "r+") as f:
            chip_of = _write_chips(f, chips, dedup=cfg.append, check_interrupt=check_interrupt)
        # the first chunk's chips come back for the preview sheet, stored or not
        chunks = [(jobs[a:a + CHUNK], cfg.seed, cfg.grid, cfg.store_occluded or a == start)
                  for a in range(start, len(jobs), CHUNK)]
        if hasattr(chips.image, "close"):
            chips.image.close()  # the workers open the chips' files themselves
        pool = mp.get_context("fork").Pool(cfg.workers) if cfg.workers > 1 and len(chunks) > 1 else None
        results = pool.imap(_occlude_rows, chunks) if pool else map(_occlude_rows, chunks)
        done = start
        preview = []
        try:
            with interrupt_between_steps() as check_interrupt, open_for_writing(tmp, "r+") as f:
                for res in results:
                    pairs_h5.append_drawn(
                        f, chip=chip_of[[r[0] for r in res]], occluders=[r[2] for r in res],
                        seeds=np.full(len(res), cfg.seed), draws=[r[1] for r in res], targets=[r[3] for r in res],
                        kinds=[r[7] for r in res], blocks=np.stack([r[6] for r in res]),
                        checksums=[r[8] for r in res],
                        occluded=np.stack([r[4] for r in res]) if cfg.store_occluded else None,
                        mask=np.stack([r[5] for r in res]) if cfg.store_occluded else None,
                    )
                    f.flush()
                    kinds.update(r[7] for r in res)
                    if len(preview) < 32:
                        preview += [(chips.image[r[0]], r[4], r[7]) for r in res[: 32 - len(preview)]]
                    done += len(res)
                    if progress:
                        progress(done, len(jobs))
                    check_interrupt()
                f.attrs["complete"] = True
                n_total = int(f["chip"].shape[0])
                n_ids = int(f["identity"].shape[0])
                mean_occ = float(f["blocks"][start:].mean() * cfg.grid**2) if done > start else 0.0
        finally:
            if pool is not None:
                pool.terminate()
    secs = time.perf_counter() - t1
    return Result({
        "out": str(cfg.out),
        "data": " + ".join(d.describe() for d in sets),
        "synthetic": chips.synthetic,
        "template": cfg.template,
        "grid": cfg.grid,
        "occluder": attrs["occluder"],
        "images": len(chips),
        "identities": len(chips.identity),
        "pairs_written": done - start,
        "pairs_in_file": n_total,
        "identities_in_file": n_ids,
        "resumed_from": start,
        "kinds": dict(kinds),
        "mean_occluded_fraction": mean_occ / cfg.grid**2,
        "align": rep.as_dict(),
        "warnings": rep.warnings,
        "align_seconds": round(t_align, 3),
        "pair_seconds": round(secs, 3),
        "pairs_per_second": round((done - start) / secs, 1) if secs > 0 else None,
        "store_occluded": cfg.store_occluded,
        "file_bytes": cfg.out.stat().st_size,
    }, figures={"pairs": preview})  # the first (clean, occluded, kind) triples, for a --preview sheet


def _write_chips(f, chips, dedup: bool, check_interrupt=None) -> np.ndarray:
    """Store the run's clean chips (once each) before any row names them; returns image → row of ``chips``.

    A new file gets them in image order; a resumed one keeps those already written (they must be the same
    images: the rows written name them); an appended one reuses a chip already there (same source, same pixels)."""
    n = len(chips)
    if dedup:  # in chunks too (a chip repeated across chunks is found in the file by the next one's lookup)
        step = 16 * CHUNK  # each chunk reads the file's source list: larger chunks, fewer reads
        return np.concatenate([
            pairs_h5.add_chips(f, chips.image[a:a + step], chips.landmarks[a:a + step],
                               [chips.identity[k] for k in chips.label[a:a + step]], chips.source[a:a + step],
                               dedup=True) for a in range(0, n, step)])
    have = read_strings(f["chip_source"])
    if have != list(chips.source[:len(have)]):
        raise SchemaError(f"{f.filename} holds the chips of other images than this run's (the data changed since "
                          f"it started); delete it and start again")
    for a in range(len(have), n, CHUNK):  # in chunks: an interrupted run resumes from the chips it wrote
        b = min(n, a + CHUNK)
        pairs_h5.add_chips(f, chips.image[a:b], chips.landmarks[a:b],
                           [chips.identity[k] for k in chips.label[a:b]], chips.source[a:b], dedup=False)
        f.flush()
        if check_interrupt:
            check_interrupt()
    return np.arange(n)


def _resume_point(tmp: Path, cfg: MakePairsConfig, attrs: dict, h: int, w: int) -> int:
    try:
        f = h5py.File(tmp, "r+")
    except OSError:
        raise SchemaError(f"{tmp} is damaged and cannot be resumed; delete it and start again") from None
    with f:
        if f.attrs.get("pdsn_kind") != pairs_h5.KIND:
            raise SchemaError(f"{tmp} is not a pdsn pairs file; delete it and start again")
        pairs_h5.check_compatible(f, tmp, grid=cfg.grid, template=cfg.template, height=h, width=w)
        if ("occluded" in f) != cfg.store_occluded:
            raise SchemaError(f"{tmp} was started {'with' if 'occluded' in f else 'without'} --store-occluded; "
                              f"use the same options to resume, or delete it")
        for k in ("occluder", "seed", "per_image", "block_spec"):
            if f.attrs.get(k) != attrs[k]:
                raise SchemaError(f"{tmp} was started with {k}={f.attrs.get(k)!r}, now {attrs[k]!r}; "
                                  f"use the same options to resume, or delete it")
        # rows are written whole chunks at a time, but a kill can land between datasets: keep what all agree on
        names = [d for d in pairs_h5.ROW_DATASETS + ("occluded", "mask") if d in f]
        n = min(f[d].shape[0] for d in names)
        n -= n % CHUNK
        for d in names:
            f[d].resize(n, axis=0)
        return n
