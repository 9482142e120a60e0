"""Which occluder goes on which image: the occlusion variants and the one seeding rule.

A variant is ``none``, an occluder kind (``sunglasses``, ``random``, ...) or one grid block (``block:J``). The
n-th image a run occludes with a variant draws its occluder from ``default_rng([seed, sha1(variant)[:8], n])``:
the same (seed, variant, n) gives the same occluder in ``make-pairs`` (n = image · per_image + repeat) and in
every benchmark (n = position of the image among those the variant occludes), whatever the chunking, the number
of worker processes, or resuming.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pdsn_cli.data.chips_h5 import Chips
from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.occluders import OCCLUDERS, Occlusion, occlude


@dataclass(frozen=True)
class OcclusionVariant:
    """What an image is occluded with: ``kind`` is ``none``, an occluder kind or ``block`` (then ``block`` is
    the grid block J, row-major)."""

    kind: str
    block: int | None = None

    @property
    def name(self) -> str:
        """The variant as results and options spell it: ``none``, ``sunglasses``, ``block:12``."""
        return f"block:{self.block}" if self.block is not None else self.kind

    @property
    def is_clean(self) -> bool:
        return self.kind == "none"

    def __str__(self) -> str:
        return self.name


NONE = OcclusionVariant("none")


def parse_occlusions(spec: list[str], grid: int) -> list[OcclusionVariant]:
    """``none``, occluder kinds, ``block`` (every block, one variant each) or ``block:J``; duplicates dropped."""
    out: list[OcclusionVariant] = []
    for s in spec:
        if s in ("none", "clean"):
            out.append(NONE)
        elif s == "block":
            out += [OcclusionVariant("block", j) for j in range(grid * grid)]
        elif s.startswith("block:"):
            try:
                j = int(s.split(":", 1)[1])
            except ValueError:
                raise BadInputError(f"bad occlusion {s!r}: use block:J") from None
            if not 0 <= j < grid * grid:
                raise BadInputError(f"block {j} is outside the {grid}×{grid} grid")
            out.append(OcclusionVariant("block", j))
        elif s in OCCLUDERS:
            out.append(OcclusionVariant(s))
        else:
            raise BadInputError(f"unknown occlusion {s!r}; use none, block, block:J or one of {', '.join(OCCLUDERS)}")
    return list(dict.fromkeys(out))


def occluder_rng(seed: int, variant: OcclusionVariant, index: int) -> np.random.Generator:
    """THE seeding rule: the generator of the ``index``-th image a run occludes with ``variant``."""
    key = int(hashlib.sha1(variant.name.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([seed, key, index])


def draw(image: np.ndarray, landmarks: np.ndarray, variant: OcclusionVariant, seed: int, index: int,
         grid: int) -> Occlusion:
    """The occluded copy of one aligned chip (its pixel mask, K×K occupancy and the kind drawn)."""
    return occlude(image, landmarks, variant.kind, occluder_rng(seed, variant, index), grid=grid,
                   block=variant.block)


def occlude_chips(chips: Chips, index: np.ndarray, variant: OcclusionVariant, grid: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Occluded copies of ``chips[index]`` (the n-th drawn with index n: every method sees the same images) and
    their float32 N×K×K occupancy (zeros for ``none``)."""
    out = chips.image[index].copy()
    occ = np.zeros((len(index), grid, grid), np.float32)
    if variant.is_clean:
        return out, occ
    for n, i in enumerate(index):
        o = draw(chips.image[i], chips.landmarks[i], variant, seed, n, grid)
        out[n] = o.image
        occ[n] = o.blocks
    return out, occ
