"""Held-out splits of the trainers, all by identity or image so that nothing held out was trained on.

Three rules, each kept for a stated reason:

- :func:`split_identities` (train-trunk): a seeded random ``holdout`` share of the identities with ≥ 2 images,
  over integer labels — the held-out check builds same-identity pairs, so a held-out identity needs two images.
- :func:`holdout_identities` (finetune): the identities whose seeded name hashes are lowest — a name lands on the
  same side whatever pairs files it comes from and in whatever order, so several pairs files split consistently.
- :func:`split_by_source` (train-detector): a seeded share of the source *images* — a detector learns occluders,
  not identities, and one image's clean and occluded chips must stay on one side.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["split_identities", "holdout_identities", "split_by_source"]


def split_identities(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, held out): a seeded ``holdout`` fraction of the identities with ≥ 2 images."""
    ids, counts = np.unique(labels, return_counts=True)
    held = np.zeros(0, labels.dtype)
    if holdout > 0:
        eligible = ids[counts >= 2]
        n = min(max(2, round(holdout * len(ids))), len(eligible))
        # training needs ≥ 2 classes and the check needs ≥ 2 identities to build negative pairs
        if n >= 2 and len(ids) - n >= 2:
            held = np.sort(np.random.default_rng(seed).choice(eligible, n, replace=False))
    is_held = np.isin(labels, held)
    return ~is_held, is_held


def holdout_identities(names: list[str], share: float, seed: int) -> np.ndarray:
    """Which of ``names`` are held out: the identities whose seeded name hashes are lowest (round(share × U) of the
    U identities, at least one when share > 0, never all), so every pair of an identity — and every pair of one
    source image — lands on the same side, whatever pairs file it comes from."""
    uniq = sorted(set(names))
    k = min(max(round(share * len(uniq)), 1 if share > 0 else 0), len(uniq) - 1)
    key = seed.to_bytes(8, "little", signed=True)
    held = set(sorted(uniq, key=lambda n: zlib.crc32(key + n.encode()))[:k])
    return np.array([n in held for n in names], bool)


def split_by_source(sources: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: a seeded ``val_fraction`` of the distinct source images."""
    names, inverse = np.unique(np.asarray(sources, dtype=object).astype(str), return_inverse=True)
    n_val = round(val_fraction * len(names))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(1, n_val), len(names) - 1)
    else:
        n_val = 0
    held = np.zeros(len(names), bool)
    held[np.random.default_rng([seed, 1]).permutation(len(names))[:n_val]] = True
    return held[inverse]
