"""Result rows as tables: one model that the terminal (``pdsn_cli.cli.render``) and ``index.md``
(``pdsn_cli.report.markdown``) both render, so a column is defined once.

A benchmark result is ``{"results": [row, ...], "dataset": ..., ...}``. Each row has ``method`` and
``occlusion``, its measures (verification: ``accuracy``, ``std``, ``tar_at_far_1e-3``, ``auc``; identification:
``rank1`` per gallery size or a number, ``tar_at_far_1e-6``, ``cmc``), ``recovery`` on PDSN rows, and ``block``:
the grid block J a single-block occlusion covers (None for every other occlusion).
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pdsn_cli.errors import BadInputError


@dataclass
class Column:
    header: str
    numeric: bool = True  # right-aligned
    cell: Callable[[dict], str] = lambda row: ""


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[list[str]] = field(default_factory=list)
    show_header: bool = True


class Result(dict):
    """A command's JSON result, and beside it (``figures``, never serialised) the arrays its plots need: ROC or
    CMC curves, occluded probe chips, the dictionary, preview pairs; and ``scores`` (every pair's score, when a
    benchmark was asked to keep them)."""

    figures: dict
    scores: dict | None

    def __init__(self, *args, figures: dict | None = None, scores: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.figures = figures or {}
        self.scores = scores


def count(n: float) -> str:
    """A gallery size short enough for a column header: 1M, 10M, otherwise with thousands separators."""
    if n >= 1e6 and n % 1e6 == 0:
        return f"{n / 1e6:g}M"
    return f"{int(n):,}"


def _pct(v) -> str:
    return "" if v is None else f"{100 * float(v):.2f}%"


def row_block(row: dict) -> int | None:
    """The grid block a row's occlusion covers, None for every other occlusion (and for block:mean)."""
    b = row.get("block")
    return b if isinstance(b, int) and not isinstance(b, bool) else None


def headline(row: dict) -> float | None:
    """A row's headline measure: verification ``accuracy``, else identification ``rank1`` (a number, or per
    gallery size ``{size: rate}``, then the rate at the largest gallery)."""
    v = row.get("accuracy", row.get("rank1"))
    if isinstance(v, dict) and v:
        v = v[max(v, key=lambda n: float(n))]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def block_grids(rows: list[dict], grid: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """From single-block rows, per method a K×K array of headline measures (NaN where a block has no row). K is
    ``grid`` when given, else inferred: √n when the rows cover blocks 0..n−1 of a square grid, otherwise the
    smallest grid of at least 5×5 (the benchmark's default) that holds the highest block."""
    measure: dict[str, dict[int, float]] = {}
    for r in rows:
        j = row_block(r)
        if j is not None:
            measure.setdefault(str(r["method"]), {})[j] = headline(r)
    if not measure:
        return 0, {}
    blocks = set().union(*measure.values())
    if grid is None:
        n = max(blocks) + 1
        k = math.isqrt(n)
        grid = k if k * k == n and blocks == set(range(n)) else max(5, math.ceil(math.sqrt(n)))
    if max(blocks) >= grid * grid or min(blocks) < 0:
        raise BadInputError(f"block rows up to block:{max(blocks)} do not fit a {grid}×{grid} grid")
    out = {}
    for method, by_block in measure.items():
        a = np.full(grid * grid, np.nan)
        for j, v in by_block.items():
            a[j] = v
        out[method] = a.reshape(grid, grid)
    return grid, out


def _measure_columns(rows: list[dict]) -> list[Column]:
    """The columns for the measures the rows carry, after method and occlusion."""
    def has(key):
        return any(r.get(key) is not None for r in rows)

    def accuracy(r):
        if r.get("accuracy") is None:
            return ""
        return _pct(r["accuracy"]) + (f" ± {100 * float(r['std']):.2f}" if r.get("std") is not None else "")

    cols: list[Column] = []
    if has("accuracy"):
        cols.append(Column("accuracy", cell=accuracy))
    if has("tar_at_far_1e-3"):
        cols.append(Column("TAR@FAR=1e-3", cell=lambda r: _pct(r.get("tar_at_far_1e-3"))))
    if has("auc"):
        cols.append(Column("AUC", cell=lambda r: "" if r.get("auc") is None else f"{float(r['auc']):.4f}"))
    sizes = sorted({n for r in rows if isinstance(r.get("rank1"), dict) for n in r["rank1"]}, key=float)
    for n in sizes:
        cols.append(Column(f"rank-1 @ {count(float(n))}",
                           cell=lambda r, n=n: _pct(r["rank1"].get(n)) if isinstance(r.get("rank1"), dict) else ""))
    if any(isinstance(r.get("rank1"), (int, float)) for r in rows):
        cols.append(Column("rank-1", cell=lambda r: _pct(r["rank1"]) if isinstance(r.get("rank1"), (int, float))
                           else ""))
    if any(isinstance(r.get("rank1"), (int, float)) and r.get("cmc") for r in rows):
        cols.append(Column("rank-5", cell=lambda r: _pct(r["cmc"][min(4, len(r["cmc"]) - 1)]) if r.get("cmc")
                           else ""))
    if has("tar_at_far_1e-6"):
        cols.append(Column("TAR@FAR=1e-6", cell=lambda r: _pct(r.get("tar_at_far_1e-6"))))
    if any("recovery" in r for r in rows):
        cols.append(Column("recovery", cell=lambda r: "" if "recovery" not in r else "n/a" if r["recovery"] is None
                           else f"{float(r['recovery']):+.2f}"))
    if any(isinstance(r.get("probes"), int) for r in rows):  # AR: probe images per row
        cols.append(Column("probes", cell=lambda r: str(r.get("probes", ""))))
    return cols


def _title(result: dict) -> str:
    source = f", PDSN occlusion: {result['occlusion_source']}" if result.get("occlusion_source") else ""
    head = f"{result.get('dataset', '')} — {result.get('trunk', '')} @ {result.get('mask_point', '')}"
    if "protocol" in result:  # AR
        p = result["protocol"]
        return f"{head}: {p['subjects']} subjects, {p['gallery_images']} gallery images{source}"
    if "sizes" in result:  # MegaFace
        return (f"{head}: {result['probes']} probes of {result['probe_identities']} identities, "
                f"{result['real_distractors']:,} real + {result['synthetic_distractors']:,} synthetic distractors"
                f"{source}")
    return f"{head}, {result.get('pairs', 0)} pairs{source}"


def results_table(result: dict) -> Table:
    """One line per result row: method, occlusion, then the measures the rows carry."""
    rows = result.get("results", [])
    cols = [Column("method", numeric=False, cell=lambda r: str(r["method"])),
            Column("occlusion", numeric=False, cell=lambda r: str(r["occlusion"])), *_measure_columns(rows)]
    return Table(_title(result), cols, [[c.cell(r) for c in cols] for r in rows])


def block_grid_table(result: dict) -> Table | None:
    """The headline measure per grid block laid out as the K×K grid (baseline → PDSN); None without at least two
    single-block rows."""
    grid, grids = block_grids(result.get("results", []))
    if "baseline" not in grids or np.isfinite(grids["baseline"]).sum() < 2:
        return None
    base, pdsn = grids["baseline"], grids.get("pdsn")
    title = "single-block occlusion, accuracy per grid block: baseline" + (" → PDSN" if pdsn is not None else "")
    rows = []
    for r in range(grid):
        cells = []
        for c in range(grid):
            j = r * grid + c
            b = base[r, c]
            p = None if pdsn is None or not np.isfinite(pdsn[r, c]) else pdsn[r, c]
            cells.append("" if not np.isfinite(b) else f"{j}: {100 * b:.1f}" + (f" → {100 * p:.1f}" if p is not None
                                                                                 else ""))
        rows.append(cells)
    return Table(title, [Column("", numeric=False) for _ in range(grid)], rows, show_header=False)


def verify_table(result: dict) -> Table:
    """``pdsn verify``: one row per pair — the photos (file names; the JSON has the paths), the score, the decision,
    the blocks judged occluded in each photo, the share of features kept and the plain trunk's score."""
    t = Table(f"pdsn verify — model {result['model']}, threshold {result['threshold']:.3f}", [
        Column("photos", False), Column("PDSN score"), Column("decision", False),
        Column("occluded blocks", False), Column("kept"), Column("no-PDSN score")])
    for r in result["pairs"]:
        t.rows.append([f"1: {Path(r['image1']).name}\n2: {Path(r['image2']).name}", f"{r['score']:.4f}",
                       "same" if r["same"] else "different",
                       f"1: {_block_list(r['occluded_blocks1'])}\n2: {_block_list(r['occluded_blocks2'])}",
                       f"{100 * r['fdm_kept']:.0f}%", f"{r['baseline_score']:.4f}"])
    return t


def _block_list(ids: list[int]) -> str:
    return ",".join(map(str, ids)) if ids else "none"


def models_table(models: list[dict]) -> Table:
    """``pdsn models``: the PDSN models a command can select with ``--pdsn`` / ``--model``."""
    t = Table("PDSN models (--pdsn: the built-in default; --model NAME|DIR)", [
        Column("name", False), Column("trunk / mask point", False), Column("threshold"), Column("size"),
        Column("trained on", False), Column("LFW, detector: plain → PDSN %", False)])
    for m in models:
        figs = m.get("figures", {}).get("lfw", {})
        lfw = ", ".join(f"{k} {v['baseline']:.2f}→{v['pdsn']:.2f}" for k, v in figs.items()) if figs else ""
        t.rows.append([m["name"] + ("\n(built in)" if m["builtin"] else f"\n{m['path']}"),
                       f"{m['trunk']} / {m['mask_point']}",
                       f"{m['threshold']:.3f}" if m["threshold"] is not None else "none",
                       f"{m['bytes'] / 2**20:.1f} MB", m["trained_on"], lfw])
    return t
