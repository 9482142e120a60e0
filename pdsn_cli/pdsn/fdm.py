"""The Feature Discarding Mask dictionary: one binary mask per grid block, and their use at test time.

``build`` merges train-block outputs (one ``--block all`` file or many ``--block J`` files), binarises each
block's mean mask by zeroing its lowest fraction τ, and writes one HDF5 file (``pdsn_kind = "fdm-dict"``):

- ``fdm``        bool    K²×C×H×W  1 = keep the feature element, 0 = discard it
- ``mean_mask``  float32 K²×C×H×W  mean over the block's training pairs of the min-max scaled masks
- ``trained``    bool    K²        blocks that had a trained generator (the others keep everything)
- attrs: trunk, mask_point, template, grid, tau, sources (JSON list of train-block files)
- ``head/<param>`` (optional, written by ``pdsn finetune``): the trunk head fine-tuned on masked features; PDSN
  embeddings use it, the baseline keeps the trunk's own head

At test time the FDM of an image is the logical AND of the entries of its occluded blocks (all ones when none).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.data.h5util import open_checked, open_for_writing, stamp
from pdsn_cli.pdsn.mask_generator import load_blocks_file

KIND = "fdm-dict"
SCHEMA = 1


@dataclass
class FdmDict:
    fdm: np.ndarray  # bool K²×C×H×W
    mean_mask: np.ndarray
    trained: np.ndarray
    trunk: str
    mask_point: str
    template: str
    grid: int
    tau: float
    #: fine-tuned head parameters (``pdsn finetune``), or None
    head: dict | None = None

    def masked_trunk(self, trunk):
        """The trunk PDSN embeddings run through: a copy with the fine-tuned head, or ``trunk`` itself."""
        if not self.head:
            return trunk
        own = trunk.state_dict()
        wrong = [k for k, v in self.head.items() if k not in own or tuple(own[k].shape) != v.shape]
        if wrong:
            raise SchemaError(f"the dictionary's fine-tuned head does not fit trunk {trunk.name}: {', '.join(wrong[:5])}")
        out = copy.deepcopy(trunk)
        with torch.no_grad():
            for k, v in self.head.items():
                out.state_dict()[k].copy_(torch.from_numpy(v))
        return out.eval()

    def head_digest(self) -> str:
        """A digest of the fine-tuned parameters (a cache key for features they compute)."""
        h = hashlib.sha1()
        for k in sorted(self.head or {}):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.head[k]).tobytes())
        return h.hexdigest()[:16]

    def combine(self, occluded: np.ndarray) -> tuple[np.ndarray, int]:
        """occluded: bool N×K² (or N×K×K) → float32 N×C×H×W masks, and how many images lost every element
        (those fall back to no mask, so their embedding stays defined)."""
        occ = np.asarray(occluded, bool).reshape(len(occluded), -1)
        if occ.shape[1] != self.grid**2:
            raise BadInputError(f"occlusion has {occ.shape[1]} blocks, the dictionary a {self.grid}×{self.grid} grid")
        out = np.ones((len(occ), *self.fdm.shape[1:]), bool)
        for i, row in enumerate(occ):
            for j in np.flatnonzero(row):
                out[i] &= self.fdm[j]
        empty = ~out.reshape(len(out), -1).any(1)
        out[empty] = True
        return out.astype(np.float32), int(empty.sum())

    def masks_for(self, occluded: np.ndarray, flip: bool = False) -> tuple[np.ndarray, int]:
        """``combine``, plus the mirrored view's masks when embeddings use test-time flip (N×2×C×H×W): the
        mirrored image's occluded blocks are the mirrored block set."""
        masks, empty = self.combine(occluded)
        if flip:
            k = self.grid
            mm, _ = self.combine(mirror_blocks(np.asarray(occluded).reshape(len(occluded), k, k)))
            masks = np.stack([masks, mm], axis=1)
        return masks, empty

    def check_for(self, trunk: str, mask_point: str, path="dictionary") -> None:
        if self.trunk != trunk or self.mask_point != mask_point:
            raise SchemaError(f"{path} was built for trunk {self.trunk} at {self.mask_point}, "
                              f"not {trunk} at {mask_point}")

    def check_features(self, shape: tuple[int, int, int], path="dictionary") -> None:
        """Refuse masks that do not fit the trunk's features (a file edited or made by another tool)."""
        if tuple(self.fdm.shape[1:]) != tuple(shape):
            raise SchemaError(f"{path} holds masks of shape {tuple(self.fdm.shape[1:])}, the trunk's features at "
                              f"{self.mask_point} are {tuple(shape)}")


def mirror_blocks(blocks: np.ndarray) -> np.ndarray:
    """Occupancy of the horizontally flipped image: block (r, c) ↔ (r, K−1−c)."""
    return blocks[..., ::-1]


def binarize(mean_mask: np.ndarray, tau: float) -> np.ndarray:
    """Zero exactly the floor(τ·size) lowest elements (ties broken by position, so the count is exact)."""
    flat = mean_mask.reshape(-1)
    k = int(np.floor(tau * flat.size))
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep.reshape(mean_mask.shape)


def block_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(q for q in p.glob("*.pt"))
        elif p.is_file():
            files.append(p)
        else:
            raise BadInputError(f"no such file or folder: {p}")
    if not files:
        raise BadInputError("no train-block outputs (*.pt) found in " + ", ".join(map(str, inputs)))
    return files


def build(inputs: list[Path], out: Path, tau: float = 0.25) -> dict:
    if not 0.0 < tau < 1.0:
        raise BadInputError(f"--tau must be in (0, 1), got {tau}")
    check_writable(out)
    files = block_files(inputs)
    first = None
    means: dict[int, np.ndarray] = {}
    source: dict[int, Path] = {}
    overridden: dict[tuple[Path, Path], list[int]] = {}  # (earlier file, later file) -> blocks the later one wins
    for path in files:
        st = load_blocks_file(path)
        _check_blocks_file(st, path)
        key = {k: st[k] for k in ("trunk", "mask_point", "grid", "template", "feature_shape")}
        if first is None:
            first = key
        elif key != first:
            diff = ", ".join(f"{k}: {first[k]!r} vs {key[k]!r}" for k in key if key[k] != first[k])
            raise SchemaError(f"{path} does not match the other block files ({diff})")
        for k, j in enumerate(st["blocks"]):
            means[int(j)] = st["mean_masks"][k].numpy()  # a later file overrides an earlier one
            if int(j) in source:
                overridden.setdefault((source[int(j)], path), []).append(int(j))
            source[int(j)] = path
    grid = int(first["grid"])
    shape = tuple(first["feature_shape"])
    mean = np.ones((grid * grid, *shape), np.float32)
    fdm = np.ones((grid * grid, *shape), bool)
    trained = np.zeros(grid * grid, bool)
    for j, m in means.items():
        mean[j] = m
        fdm[j] = binarize(m, tau)
        trained[j] = True
    with atomic_output(out) as tmp:
        with open_for_writing(tmp) as f:
            stamp(f, KIND, SCHEMA, trunk=first["trunk"], mask_point=first["mask_point"],
                  template=first["template"], grid=grid, tau=tau, sources=json.dumps([str(p) for p in files]))
            f.create_dataset("fdm", data=fdm, compression="gzip")
            f.create_dataset("mean_mask", data=mean, compression="gzip")
            f.create_dataset("trained", data=trained)
    discarded = (~fdm.reshape(grid * grid, -1)).sum(1)
    overlap = _mean_pairwise_iou(fdm[trained])
    return {
        "out": str(out), "trunk": first["trunk"], "mask_point": first["mask_point"], "grid": grid, "tau": tau,
        "feature_shape": list(shape), "blocks_trained": int(trained.sum()), "missing_blocks":
        [int(j) for j in np.flatnonzero(~trained)], "discarded_per_block": discarded.tolist(),
        "mean_pairwise_discard_iou": overlap, "sources": [str(p) for p in files],
        "warnings": [f"block(s) {', '.join(map(str, js))} trained in both {old} and {new}: {new.name} is used "
                     f"(files are read in name order, a later one wins)" for (old, new), js in overridden.items()],
    }


def _check_blocks_file(st: dict, path: Path) -> None:
    """The entries build reads, and that they agree with each other (blocks on the grid, one mask per block)."""
    missing = [k for k in ("trunk", "mask_point", "grid", "template", "feature_shape", "blocks", "mean_masks")
               if k not in st]
    if missing:
        raise SchemaError(f"{path} is a damaged train-block checkpoint: it lacks {', '.join(missing)}")
    grid, blocks, masks = st["grid"], st["blocks"], st["mean_masks"]
    if not isinstance(grid, int) or not 1 <= grid <= 16 or not isinstance(blocks, list) \
            or not all(isinstance(j, int) and 0 <= j < grid * grid for j in blocks):
        raise SchemaError(f"{path} is a damaged train-block checkpoint: block list {blocks!r} does not fit a "
                          f"{grid}×{grid} grid")
    want = (len(blocks), *st["feature_shape"])
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != tuple(want):
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise SchemaError(f"{path} is a damaged train-block checkpoint: mean_masks are {got}, "
                          f"{len(blocks)} block(s) of {tuple(st['feature_shape'])} features need {want}")


def _mean_pairwise_iou(fdm: np.ndarray) -> float | None:
    """How much the blocks' discarded sets overlap (1 = every block discards the same elements)."""
    if len(fdm) < 2:
        return None
    d = ~fdm.reshape(len(fdm), -1)
    inter = d.astype(np.float32) @ d.T.astype(np.float32)
    size = d.sum(1).astype(np.float32)
    union = size[:, None] + size[None, :] - inter
    iu = np.triu_indices(len(fdm), 1)
    return float((inter[iu] / np.maximum(union[iu], 1)).mean())


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def load(path: str | os.PathLike) -> FdmDict:
    with open_checked(path, KIND, SCHEMA) as f:
        missing = [name for name in ("fdm", "mean_mask", "trained") if name not in f]
        if missing:
            raise SchemaError(f"{path} lacks datasets {', '.join(missing)}: not a complete fdm-dict file")
        d = FdmDict(
            fdm=f["fdm"][()].astype(bool), mean_mask=f["mean_mask"][()].astype(np.float32), trained=f["trained"][()],
            trunk=str(f.attrs["trunk"]), mask_point=str(f.attrs["mask_point"]), template=str(f.attrs["template"]),
            grid=int(f.attrs["grid"]), tau=float(f.attrs["tau"]),
            # a shipped model stores its head in float16 (pdsn_cli.pdsn.models); the head runs in float32
            head={k: _float32(v[()]) for k, v in f["head"].items()} if "head" in f else None,
        )
    if not len(d.fdm) == len(d.mean_mask) == len(d.trained) == d.grid**2:
        raise SchemaError(f"{path} is damaged: {len(d.fdm)} masks for a {d.grid}×{d.grid} grid")
    return d
