"""Recovery: the share of what an occlusion takes that PDSN gives back, for any benchmark's result rows."""

from __future__ import annotations

from typing import Callable


def add_recovery(rows: list[dict], metric: Callable[[dict], float]) -> None:
    """Set ``recovery = (PDSN − baseline_occluded) / (baseline_clean − baseline_occluded)`` on every PDSN row of an
    occluded variant, ``metric`` reading the figure compared from a row (accuracy, rank-1 at a gallery size, ...).
    Nothing is set without a clean baseline row; None where the occlusion cost nothing."""
    clean = next((metric(r) for r in rows if r["method"] == "baseline" and r["occlusion"] == "none"), None)
    if clean is None:
        return
    base = {r["occlusion"]: metric(r) for r in rows if r["method"] == "baseline"}
    for r in rows:
        if r["method"] == "pdsn" and r["occlusion"] != "none":
            lost = clean - base[r["occlusion"]]
            r["recovery"] = float((metric(r) - base[r["occlusion"]]) / lost) if lost > 1e-9 else None
