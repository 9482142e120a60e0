"""Verification protocols: LFW View 2 (10 folds of pairs) and a synthetic set laid out the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdsn_cli.data.chip_cache import AlignReport, ChipCache, DataSpec, load_chips
from pdsn_cli.data.chips_h5 import Chips
from pdsn_cli.data.faces import FaceItem
from pdsn_cli.data.lfw import CENTRED_FACE, read_pairs
from pdsn_cli.data.lfw import limit_pairs as limit_lfw_pairs
from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.driver import OcclusionVariant, occlude_chips


@dataclass
class VerificationSet:
    name: str
    chips: Chips  # the distinct images of the protocol
    i1: np.ndarray
    i2: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    report: AlignReport = field(default_factory=AlignReport)
    dropped_pairs: int = 0

    def occlude_second(self, variant: OcclusionVariant, grid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Occluded copies of the second image of every pair (the n-th pair's drawn with index n), and their
        K×K occupancy (zeros for ``none``)."""
        return occlude_chips(self.chips, self.i2, variant, grid, seed)


def lfw_set(root: Path, pairs_file: Path | None, template: str, limit_pairs: int | None, workers: int = 1,
            cache_dir: Path | None = None, progress=None, landmarks: int = 5) -> VerificationSet:
    pairs_file = pairs_file or Path(root) / "pairs.txt"
    if not Path(pairs_file).is_file():
        raise BadInputError(f"pairs file not found: {pairs_file}")
    pairs = read_pairs(pairs_file, root)
    if limit_pairs:
        pairs = limit_lfw_pairs(pairs, limit_pairs)
    paths = sorted({p.path1 for p in pairs} | {p.path2 for p in pairs})
    chips, rep = ChipCache(root, template, cache_dir, centred=CENTRED_FACE, landmarks=landmarks).ensure_and_load(
        [FaceItem(p, p.split("/")[0]) for p in paths], workers=workers, progress=progress,
        what=f"the {len(paths)} images of {pairs_file}")
    pos = {p: i for i, p in enumerate(chips.source)}
    kept = [p for p in pairs if p.path1 in pos and p.path2 in pos]
    return VerificationSet(
        "lfw", chips, np.array([pos[p.path1] for p in kept]), np.array([pos[p.path2] for p in kept]),
        np.array([p.same for p in kept]), np.array([p.fold for p in kept]), rep, len(pairs) - len(kept),
    )


def synthetic_set(template: str, identities: int = 40, images: int = 6, seed: int = 1000,
                  pairs_per_fold: int = 60) -> VerificationSet:
    """A 10-fold verification protocol on synthetic identities generated with their own seed, disjoint from
    the default training identities (seed 0), labelled synthetic everywhere."""
    chips, rep = load_chips(DataSpec(None, identities, images, synthetic_seed=seed), template)
    rng = np.random.default_rng(seed)
    by_id = [np.flatnonzero(chips.label == c) for c in range(len(chips.identity))]
    i1, i2, same, fold = [], [], [], []
    half = pairs_per_fold // 2
    id_folds = np.array_split(rng.permutation(len(by_id)), 10)  # identities disjoint across folds, like LFW
    for k, ids_k in enumerate(id_folds):
        for s in (True, False):
            for _ in range(half):
                if s:
                    c = rng.choice(ids_k)
                    a, b = rng.choice(by_id[c], 2, replace=False)
                else:
                    c1, c2 = rng.choice(ids_k, 2, replace=False)
                    a, b = rng.choice(by_id[c1]), rng.choice(by_id[c2])
                i1.append(a), i2.append(b), same.append(s), fold.append(k)
    return VerificationSet("synthetic", chips, np.array(i1), np.array(i2), np.array(same), np.array(fold), rep)
