"""Every matplotlib figure of the project: ROC, CMC, per-block heatmaps, the FDM dictionary, occluded probes.

Figures are drawn on a bare ``Figure`` with the Agg canvas (no pyplot state, no display) and written atomically.
matplotlib is the optional extra ``pdsn-cli[plots]``: ``_matplotlib`` is the one place it is imported.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.errors import BadInputError
from pdsn_cli.report.tables import block_grids, count, headline

if TYPE_CHECKING:
    from pdsn_cli.pdsn.fdm import FdmDict

PROBES_PER_ROW = 8


# ---- matplotlib ----------------------------------------------------------------------------------------------
def _matplotlib(option: str = "--report") -> SimpleNamespace:
    """The matplotlib pieces the figures use; refuses, naming the option and the extra to install, when
    matplotlib is missing (an optional dependency: imported here, only when a figure is asked for)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize, TwoSlopeNorm
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise BadInputError(f"{option} needs matplotlib: pip install 'pdsn-cli[plots]'") from None
    return SimpleNamespace(colormaps=matplotlib.colormaps, FigureCanvasAgg=FigureCanvasAgg, Normalize=Normalize,
                           TwoSlopeNorm=TwoSlopeNorm, Figure=Figure, Line2D=Line2D, MaxNLocator=MaxNLocator)


def require_matplotlib(option: str = "--report") -> None:
    """Refuse, naming the option and the extra to install, when matplotlib is missing."""
    _matplotlib(option)


def _figure(figsize: tuple[float, float], dpi: int = 120, option: str = "--plot",
            layout: str | None = "constrained"):
    """A Figure on the Agg canvas (constrained layout unless told otherwise)."""
    mpl = _matplotlib(option)
    fig = mpl.Figure(figsize=figsize, dpi=dpi, layout=layout)
    mpl.FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_output(path) as tmp:  # the temp name ends in .partial: say the format
        fig.savefig(tmp, format="png")
    return path


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Break a title into lines that fit ``width_in`` inches (about 0.55 em per character)."""
    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 72 / (0.55 * fontsize))))) or text


def _cmap(name: str, bad: str = "0.85"):
    return _matplotlib().colormaps[name].with_extremes(bad=bad)


def _split(label: str) -> tuple[str, str] | None:
    parts = [p.strip() for p in str(label).split(" / ")]
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def _line_styles(labels: list[str]):
    """Per label a style, and the legend handles. Labels of the form ``method / occlusion`` with more than one
    method share a colour per occlusion and a line style per method (baseline dashed, PDSN solid), so the
    pairs to compare stand side by side and the legend lists occlusions and methods once each."""
    Line2D = _matplotlib().Line2D
    palette = [f"C{i}" for i in range(10)]
    split = [_split(lab) for lab in labels]
    methods = list(dict.fromkeys(s[0] for s in split if s))
    if all(split) and len(methods) > 1:
        occlusions = list(dict.fromkeys(s[1] for s in split))
        colour, others = {}, iter(palette * 3)
        for o in occlusions:
            colour[o] = "0.15" if o in ("none", "clean") else next(others)
        dash = {"baseline": (0, (4, 2)), "pdsn": "-"}
        spare = iter([":", "-.", (0, (1, 3))] * 3)
        for m in methods:
            dash.setdefault(m, next(spare))
        styles = {lab: dict(color=colour[o], linestyle=dash[m]) for lab, (m, o) in zip(labels, split)}
        handles = [Line2D([], [], color=colour[o], lw=2.5, label=o) for o in occlusions]
        handles += [Line2D([], [], color="0.3", lw=1.6, linestyle=dash[m], label=m) for m in methods]
        return styles, handles
    styles = {lab: dict(color=palette[i % 10], linestyle="-") for i, lab in enumerate(labels)}
    handles = [Line2D([], [], label=str(lab), lw=1.6, **styles[lab]) for lab in labels]
    return styles, handles


# ---- ROC -----------------------------------------------------------------------------------------------------
def check_roc(curves: dict[str, tuple]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not curves:
        raise BadInputError("no ROC curves to plot")
    out = {}
    for label, curve in curves.items():
        try:
            fpr, tpr = (np.asarray(a, float) for a in curve)
        except (TypeError, ValueError):
            raise BadInputError(f"ROC curve {label!r} must be (fpr, tpr), two arrays of numbers") from None
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size == 0:
            raise BadInputError(f"ROC curve {label!r}: fpr and tpr must be 1-D, non-empty and of equal length")
        out[str(label)] = fpr, tpr
    return out


def plot_roc(curves: dict[str, tuple], path: str | os.PathLike, title: str = "ROC", *, log_far: bool = True,
             option: str = "--plot") -> Path:
    """Write ROC curves (``{label: (fpr, tpr)}``) to a PNG, FAR on a log axis from 1e-4 to 1 (``log_far``) or a
    linear one. A dotted line marks FAR = 1e-3, where the results report TAR."""
    require_matplotlib(option)
    arrays = check_roc(curves)
    path = check_writable(path)
    fig = _figure((6, 5), 120, option)
    ax = fig.add_subplot()
    styles, handles = _line_styles(list(arrays))
    for label, (fpr, tpr) in arrays.items():
        ax.plot(fpr, tpr, linewidth=1.5, **styles[label])
    if log_far:
        # FAR = 0 cannot sit on a log axis; clipping draws it at the left edge instead of dropping it
        ax.set_xscale("log", nonpositive="clip")
        ax.set_xlim(1e-4, 1.0)
        ax.axvline(1e-3, color="0.5", linestyle=":", linewidth=1)
    else:
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(_wrap(title, 5.5, 12))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    return _save(fig, path)


# ---- CMC -----------------------------------------------------------------------------------------------------
def check_cmc(cmc: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for label, c in cmc.items():
        if not isinstance(c, dict):
            raise BadInputError(f"CMC entry {label!r} must be a dict with sizes/rank1 and/or ranks/cmc_at_largest")
        e = {}
        for x, y in (("sizes", "rank1"), ("ranks", "cmc_at_largest")):
            if c.get(x) is None and c.get(y) is None:
                continue
            xs, ys = np.asarray(c.get(x, []), float), np.asarray(c.get(y, []), float)
            if xs.ndim != 1 or xs.shape != ys.shape or xs.size == 0:
                raise BadInputError(f"CMC entry {label!r}: {x} and {y} must be 1-D, non-empty and of equal length")
            e[x], e[y] = xs, ys
        if not e:
            raise BadInputError(f"CMC entry {label!r} has neither sizes/rank1 nor ranks/cmc_at_largest")
        out[str(label)] = e
    if not out:
        raise BadInputError("no CMC curves to plot")
    return out


def plot_cmc(cmc: dict[str, dict], path: str | os.PathLike, title: str = "", option: str = "--report") -> Path:
    """Two panels: rank-1 identification rate against the number of distractors (log x), and the CMC curve
    (identification rate within rank r) at the largest gallery. The first is left out when every curve has a
    single gallery size (a closed-set protocol such as AR), the second when no curve has ranks."""
    cmc = check_cmc(cmc)
    has_sizes = any(len(c.get("sizes", ())) > 1 for c in cmc.values())  # one gallery size: no curve to draw
    has_ranks = any("ranks" in c for c in cmc.values())
    has_sizes = has_sizes or not has_ranks
    path = check_writable(path)
    fig = _figure((5.5 * (has_sizes + has_ranks), 4.6), 120, option)
    axes = list(np.atleast_1d(fig.subplots(1, has_sizes + has_ranks)))
    left = axes.pop(0) if has_sizes else None
    right = axes.pop(0) if has_ranks else None
    styles, handles = _line_styles(list(cmc))
    largest = set()
    for label, c in cmc.items():
        if "sizes" in c:
            largest.add(float(c["sizes"].max()))
        if "sizes" in c and left is not None:
            left.plot(c["sizes"], c["rank1"], marker="o", markersize=3.5, linewidth=1.5, **styles[label])
        if "ranks" in c:
            right.plot(c["ranks"], c["cmc_at_largest"], linewidth=1.5, **styles[label])
    if left is not None:
        left.set_xscale("log", nonpositive="clip")
        left.set_xlabel("gallery size (distractors)")
        left.set_ylabel("rank-1 identification rate")
        left.set_title("rank-1 against gallery size")
    if right is not None:
        if max(c["ranks"].max() for c in cmc.values() if "ranks" in c) > 20:
            right.set_xscale("log")
        else:
            right.xaxis.set_major_locator(_matplotlib(option).MaxNLocator(integer=True))
        right.set_xlabel("rank")
        right.set_ylabel("identification rate")
        right.set_title("CMC at the largest gallery" + (f" ({count(largest.pop())})" if len(largest) == 1 else ""))
    for ax in (left, right):
        if ax is not None:
            ax.set_ylim(0.0, 1.01)
            ax.grid(True, which="both", alpha=0.3)
    (right or left).legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
    if title:
        fig.suptitle(_wrap(title, fig.get_figwidth() - 0.3, 12))
    return _save(fig, path)


# ---- per-block heatmaps --------------------------------------------------------------------------------------
def _measure(rows: list[dict]) -> str:
    if any("accuracy" in r for r in rows):
        return "verification accuracy"
    sizes = {max(r["rank1"], key=float) for r in rows if isinstance(r.get("rank1"), dict) and r["rank1"]}
    at = f" at {count(float(sizes.pop()))} distractors" if len(sizes) == 1 else ""
    return "rank-1 identification rate" + at


def _annotate(ax, values: np.ndarray, image, fmt: str) -> None:
    """Write each cell's value, dark or light to stay readable on its colour; the block index in a corner."""
    k = values.shape[0]
    small = 6 if k <= 6 else 5
    for r in range(k):
        for c in range(values.shape[1]):
            v = values[r, c]
            if np.isfinite(v):
                rgba = image.cmap(image.norm(v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(c, r + 0.06, fmt.format(v), ha="center", va="center", fontsize=9 if k <= 6 else 7,
                        color="black" if light else "white")
            else:
                light = True
                ax.text(c, r, "n/a", ha="center", va="center", fontsize=8, color="0.4")
            ax.text(c - 0.44, r - 0.42, str(r * k + c), ha="left", va="top", fontsize=small,
                    color="0.25" if light else "0.85")


def plot_blocks(rows: list[dict], path: str | os.PathLike, title: str = "", grid: int | None = None,
                option: str = "--report") -> Path | None:
    """K×K heatmaps of the headline measure (accuracy or rank-1) with one block occluded, per method on a shared
    colour scale, and PDSN − baseline on a diverging one. Returns None (and writes nothing) when there are no
    single-block rows (a ``block`` index)."""
    grid, grids = block_grids(rows, grid)
    if not grids:
        return None
    require_matplotlib(option)
    path = check_writable(path)
    mpl = _matplotlib(option)

    methods = list(grids)
    diff = None
    if "baseline" in grids and "pdsn" in grids:
        diff = 100 * (grids["pdsn"] - grids["baseline"])
    panels = len(methods) + (diff is not None)
    fig = _figure((3.9 * panels + 0.8, 4.4), 120, option)
    axes = np.atleast_1d(fig.subplots(1, panels))
    pct = {m: 100 * g for m, g in grids.items()}
    finite = np.concatenate([g[np.isfinite(g)] for g in pct.values()])
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 0.5:  # an almost flat grid: keep the colours from exaggerating noise
        mid = (hi + lo) / 2
        lo, hi = mid - 0.25, mid + 0.25
    norm = mpl.Normalize(lo, hi)
    image = None
    for ax, m in zip(axes, methods):
        image = ax.imshow(pct[m], cmap=_cmap("viridis"), norm=norm)
        _annotate(ax, pct[m], image, "{:.1f}")
        mean = np.nanmean(pct[m])
        ax.set_title(f"{_method_name(m)} — mean {mean:.2f}%", fontsize=10)
    measure = _measure(rows)
    fig.colorbar(image, ax=list(axes[:len(methods)]), shrink=0.85,
                 label="accuracy (%)" if measure.startswith("verification") else "rank-1 (%)")
    if diff is not None:
        ax = axes[-1]
        span = max(float(np.nanmax(np.abs(diff))), 0.5)
        im = ax.imshow(diff, cmap=_cmap("RdBu"), norm=mpl.TwoSlopeNorm(0.0, -span, span))
        _annotate(ax, diff, im, "{:+.1f}")
        ax.set_title(f"PDSN − baseline — mean {np.nanmean(diff):+.2f} pp", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85, label="percentage points (blue: PDSN better)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    clean = next((headline(r) for r in rows if r.get("method") == "baseline" and r.get("occlusion") == "none"),
                 None)
    head = f"{title}: " if title else ""
    head += f"{measure} with one block of the {grid}×{grid} grid occluded"
    if clean is not None:
        head += f" (clean baseline {100 * clean:.2f}%)"
    fig.suptitle(_wrap(head, fig.get_figwidth() - 0.3, 11), fontsize=11)
    return _save(fig, path)


def _method_name(m: str) -> str:
    return "PDSN" if m == "pdsn" else m


# ---- the FDM dictionary --------------------------------------------------------------------------------------
def plot_dict(d: FdmDict, path: str | os.PathLike, option: str = "--plot") -> Path:
    """Per block: where its discarded elements lie (fraction of channels, on the feature map) and how many."""
    require_matplotlib(option)
    path = check_writable(path)
    k = d.grid
    disc = (~d.fdm).astype(np.float32)  # K²×C×H×W
    spatial = disc.mean(axis=1)  # K²×H×W: fraction of channels discarded at each position
    # a fixed grid (a layout engine costs seconds on K² axes): 1.9 × 2.0 inches per block, a colour bar column
    top = 0.45 if k >= 4 else 0.65  # a narrow figure takes the title on two lines
    fw, fh = 1.9 * k + 1.1, 2.0 * k + top
    fig = _figure((fw, fh), 110, option, layout=None)
    fig.subplots_adjust(left=0.1 / fw, right=1 - 1.1 / fw, bottom=0.1 / fh, top=1 - top / fh, wspace=0.12,
                        hspace=0.25)
    axes = np.atleast_1d(fig.subplots(k, k)).ravel()
    vmax = max(float(spatial.max()), 1e-6)
    image = None
    for j, ax in enumerate(axes):
        image = ax.imshow(spatial[j], vmin=0, vmax=vmax, cmap="magma")
        n = int(disc[j].sum())
        ax.set_title(f"block {j}: {n:,}" + ("" if d.trained[j] else " (untrained)"), fontsize=7,
                     color="black" if d.trained[j] else "firebrick")
        ax.set_xticks([])
        ax.set_yticks([])
    cax = fig.add_axes((1 - 0.85 / fw, 0.25, 0.15 / fw, 0.5))
    fig.colorbar(image, cax=cax, label="fraction of channels discarded")
    per = int(np.prod(d.fdm.shape[1:]))
    shape = "×".join(map(str, d.fdm.shape[1:]))
    fig.suptitle(f"FDM dictionary — {d.trunk} @ {d.mask_point} ({shape}), τ={d.tau}:" + ("\n" if k < 4 else " ")
                 + f"discarded elements of {per:,} per block, by position", fontsize=9, y=1 - 0.08 / fh, va="top")
    return _save(fig, path)


# ---- occluded probes -----------------------------------------------------------------------------------------
def check_probes(probes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, images in probes.items():
        a = np.asarray(images)
        if a.ndim == 3:
            a = np.repeat(a[..., None], 3, axis=3)
        if a.ndim != 4 or a.shape[3] != 3 or a.dtype != np.uint8 or len(a) == 0:
            raise BadInputError(f"probes {name!r} must be a non-empty uint8 N×H×W×3 array, got "
                                f"{a.dtype} {a.shape}")
        out[str(name)] = a[:PROBES_PER_ROW]
    if not out:
        raise BadInputError("no probe images to show")
    return out


def plot_probes(probes: dict[str, np.ndarray], path: str | os.PathLike, title: str = "",
                option: str = "--report") -> Path:
    """One row per occlusion (its first ``PROBES_PER_ROW`` images), labelled on the left, on one mosaic."""
    probes = check_probes(probes)
    require_matplotlib(option)
    path = check_writable(path)
    h = max(a.shape[1] for a in probes.values())
    w = max(a.shape[2] for a in probes.values())
    cols = max(len(a) for a in probes.values())
    gap = max(2, h // 40)
    sheet = np.full((len(probes) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r, a in enumerate(probes.values()):
        for c, img in enumerate(a):
            y, x = r * (h + gap), c * (w + gap)
            sheet[y:y + img.shape[0], x:x + img.shape[1]] = img
    # one image pixel per output pixel (small chips enlarged by a whole factor to about 96 pixels tall, wide
    # sheets shrunk to 2400 pixels), with fixed margins in inches for the row labels
    # and the title: a layout engine would shrink an image axes of fixed aspect and clip the labels
    dpi = 100
    title = title or "occluded probes"
    scale = min(float(max(1, 96 // h)), 2400 / sheet.shape[1])
    width, height = scale * sheet.shape[1] / dpi, scale * sheet.shape[0] / dpi
    left = 0.25 + 0.085 * max(len(n) for n in probes)
    top, bottom, right = 0.35, 0.08, 0.08
    fw = max(left + width + right, 0.4 + 0.075 * len(title))
    fh = bottom + height + top
    fig = _figure((fw, fh), dpi, option, layout=None)
    ax = fig.add_axes((left / fw, bottom / fh, width / fw, height / fh))
    ax.imshow(sheet, interpolation="nearest" if scale >= 1 else "antialiased")
    ax.set_yticks([r * (h + gap) + h / 2 for r in range(len(probes))], list(probes), fontsize=10)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.suptitle(title, fontsize=10, y=1 - 0.06 / fh, va="top")
    return _save(fig, path)
