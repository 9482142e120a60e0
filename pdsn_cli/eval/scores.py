"""Every pair's score of a verification benchmark (``pdsn benchmark --scores FILE``), as CSV: what a threshold
is calibrated on (``pdsn export-model``) and what ``pdsn verify`` is checked against."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pdsn_cli.atomic import atomic_output
from pdsn_cli.errors import BadInputError

SCORES_HEADER = ["occlusion", "method", "pair", "fold", "same", "image1", "image2", "score"]


def write_scores(path: Path, scores: dict) -> Path:
    """Every pair's score of a benchmark run (``keep_scores``) as CSV, one row per (occlusion, method, pair)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SCORES_HEADER)
        for (occlusion, method), s in scores["scores"].items():
            for i, ((a, b), same, fold, v) in enumerate(zip(scores["pairs"], scores["same"], scores["fold"], s)):
                w.writerow([occlusion, method, i, int(fold), int(same), a, b, f"{float(v):.7f}"])
    return Path(path)


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """A ``write_scores`` file as columns (score float64, same bool, the others as strings/ints)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise BadInputError(f"cannot read scores file {path}: {e.strerror}") from None
    if not rows or rows[0] != SCORES_HEADER:
        raise BadInputError(f"{path} is not a pdsn benchmark --scores file (header {','.join(SCORES_HEADER)})")
    cols = list(zip(*rows[1:])) if len(rows) > 1 else [()] * len(SCORES_HEADER)
    out = dict(zip(SCORES_HEADER, (np.asarray(c) for c in cols)))
    out["score"] = out["score"].astype(np.float64)
    out["same"] = out["same"].astype(int).astype(bool)
    out["pair"] = out["pair"].astype(int)
    return out
