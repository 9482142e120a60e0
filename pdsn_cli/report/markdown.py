"""The ``--report`` folder of ``pdsn benchmark``: the plots a researcher looks at and an ``index.md``.

``write_report`` writes into one folder, from whatever inputs it is given:

- ``roc.png``         verification ROC, TAR against FAR on a log axis
- ``cmc.png``         identification: rank-1 against the number of distractors, and the CMC at the largest gallery
- ``blocks.png``      the headline measure with one grid block occluded, K×K heatmaps for baseline, PDSN, difference
- ``dictionary.png``  the FDM dictionary (``plot_dict``)
- ``probes.png``      a contact sheet of the occluded probes
- ``index.md``        one line per file and the table of result rows, so the folder reads on its own

The plots are drawn by ``pdsn_cli.report.plots``; the table of rows is ``pdsn_cli.report.tables.results_table``,
the same one the terminal shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pdsn_cli.atomic import atomic_output
from pdsn_cli.errors import BadInputError
from pdsn_cli.report.plots import (check_cmc, check_probes, check_roc, plot_blocks, plot_cmc, plot_dict,
                                   plot_probes, plot_roc, require_matplotlib)
from pdsn_cli.report.tables import Table, block_grids, headline, results_table

if TYPE_CHECKING:
    from pdsn_cli.pdsn.fdm import FdmDict

#: the files write_report may write, in order, with the line index.md gives each
FILES = {
    "roc.png": "ROC (verification): true accept rate against false accept rate (log axis), per method and occlusion",
    "cmc.png": "identification: rank-1 rate against the number of distractors, and the CMC at the largest gallery",
    "blocks.png": "the headline measure with a single grid block occluded: baseline, PDSN and PDSN − baseline",
    "dictionary.png": "the FDM dictionary: where each block's entry discards feature elements",
    "probes.png": "contact sheet of occluded probe images, one row per occlusion",
    "index.md": "this file",
}


# ---- the report ----------------------------------------------------------------------------------------------
def check_report_dir(out_dir: str | os.PathLike, option: str = "--report") -> Path:
    """Refuse, before any work, a report folder that cannot be written (or created), or a missing matplotlib."""
    require_matplotlib(option)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BadInputError(f"{option} {out_dir} is a file, not a folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise BadInputError(f"{option} folder is not writable: {out_dir}")
        return out_dir
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"{option} folder {out_dir} cannot be created: {parent} is not a writable folder")
    return out_dir


def write_report(out_dir: str | os.PathLike, result: dict, *, roc: dict[str, tuple] | None = None,
                 cmc: dict[str, dict] | None = None, dictionary: FdmDict | None = None,
                 probes: dict[str, np.ndarray] | None = None, title: str = "", grid: int | None = None,
                 log_far: bool = True) -> list[Path]:
    """Write the plots the inputs allow and ``index.md`` into ``out_dir`` (created if needed); return the paths.

    ``result`` is a benchmark result (``{"results": [rows], "dataset": ..., ...}``); its single-block rows (``block`` J) give
    ``blocks.png`` (grid: ``grid``, else the dictionary's, else inferred). ``roc`` is ``{label: (fpr, tpr)}``,
    ``cmc`` ``{label: {"sizes", "rank1", "ranks", "cmc_at_largest"}}``, ``probes`` ``{occlusion: uint8
    N×H×W×3}``; labels of the form ``method / occlusion`` pair up by colour. Inputs are checked before anything
    is written; each file is written atomically. Files of an earlier report that this one does not rewrite are
    left alone (index.md lists only this report's).
    """
    out_dir = check_report_dir(out_dir)
    rows = list(result.get("results", [])) if isinstance(result, dict) else None
    if rows is None or not all(isinstance(r, dict) and "method" in r and "occlusion" in r and headline(r) is not None
                               for r in rows):
        raise BadInputError("result must be a benchmark result: {'results': [{'method', 'occlusion', 'accuracy' or "
                            "'rank1', ...}, ...]}")
    if grid is None and dictionary is not None:
        grid = dictionary.grid
    # every input checked before the first file is written
    roc = check_roc(roc) if roc else None
    cmc = check_cmc(cmc) if cmc else None
    probes = check_probes(probes) if probes else None
    block_grids(rows, grid)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create the report folder {out_dir}: {e.strerror}") from None

    name = title or _describe(result)
    written: list[Path] = []
    if roc:
        written.append(plot_roc(roc, out_dir / "roc.png", title=f"{name} — verification ROC" if name else "ROC",
                                log_far=log_far, option="--report"))
    if cmc:
        written.append(plot_cmc(cmc, out_dir / "cmc.png", title=f"{name} — identification" if name else ""))
    b = plot_blocks(rows, out_dir / "blocks.png", title=name, grid=grid)
    if b is not None:
        written.append(b)
    if dictionary is not None:
        written.append(plot_dict(dictionary, out_dir / "dictionary.png", option="--report"))
    if probes:
        n = sum(len(a) for a in probes.values())
        written.append(plot_probes(probes, out_dir / "probes.png",
                                   title=f"{name} — occluded probes ({n} shown)" if name else ""))
    index = out_dir / "index.md"
    text = index_markdown(result, [p.name for p in written], title=title)
    with atomic_output(index) as tmp:
        tmp.write_text(text, encoding="utf-8")
    written.append(index)
    return written


def _describe(result: dict) -> str:
    parts = [str(result[k]) for k in ("dataset", "trunk") if result.get(k)]
    return " · ".join(parts)


def markdown_table(table: Table) -> list[str]:
    """The table's lines in GitHub markdown (numeric columns right-aligned); its title is left to the caller."""
    return ["| " + " | ".join(c.header for c in table.columns) + " |",
            "|" + "".join("---:|" if c.numeric else "---|" for c in table.columns),
            *("| " + " | ".join(row) + " |" for row in table.rows)]


def index_markdown(result: dict, files: list[str], title: str = "") -> str:
    """The folder's index: what was run, one line per file, and the table of result rows."""
    lines = [f"# {title or 'PDSN benchmark report'}", ""]
    facts = []
    for key, label in (("dataset", "dataset"), ("trunk", "trunk"), ("mask_point", "mask point"),
                       ("dictionary", "dictionary"), ("occlusion_source", "occluded blocks from"),
                       ("pairs", "pairs"), ("images", "images"), ("probes", "probes"),
                       ("probe_identities", "probe identities"), ("real_distractors", "real distractors"),
                       ("synthetic_distractors", "SYNTHETIC distractors"), ("synthetic_model", "synthetic model"),
                       ("flip", "test-time flip"), ("seconds", "seconds")):
        v = result.get(key)
        if v is not None and not isinstance(v, (dict, list)):
            facts.append(f"{label}: {('yes' if v else 'no') if isinstance(v, bool) else v}")
    if facts:
        lines += [" · ".join(facts), ""]
    lines += ["## Files", ""]
    for f in [*files, "index.md"]:
        lines.append(f"- [`{f}`]({f}) — {FILES.get(f, '')}".rstrip(" —"))
    rows = result.get("results", [])
    if rows:
        notes = []
        if any("accuracy" in r for r in rows):
            notes.append("Accuracy: ten-fold cross-validated verification accuracy ± std over folds.")
        if any("rank1" in r for r in rows):
            notes.append("Rank-1: fraction of searches whose best gallery match is the probe's own identity.")
        if any("recovery" in r for r in rows):
            notes.append("Recovery: (PDSN − occluded baseline) / (clean baseline − occluded baseline), of "
                         + ("accuracy." if any("accuracy" in r for r in rows) else "rank-1 at the largest gallery."))
        lines += ["", "## Results", "", " ".join(notes), "", *markdown_table(results_table(result))]
    return "\n".join(lines) + "\n"
