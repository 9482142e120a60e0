"""``pdsn verify``: are these two photos the same person? With a PDSN model (the built-in one by default).

Each photo is aligned (dlib: the face nearest the centre, or the largest), the model's detector judges which grid
blocks of each chip are occluded, and the FDM of the blocks occluded in *either* photo masks the features of
both (a detector does not know which photo of a pair is the occluded one; ``pdsn benchmark`` with a detector
applies the same rule, so the two give the same score for the same pair). The masked features go through the
model's fine-tuned head; the cosine similarity of the two embeddings is compared with the model's threshold,
calibrated on LFW View 2 (``model.json``). The plain trunk's score (no PDSN) is reported next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdsn_cli.align.aligner import FaceAligner
from pdsn_cli.align.templates import align_with_points
from pdsn_cli.data.faces import read_photo
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.pdsn.models import resolve_model
from pdsn_cli.report.tables import Result


@dataclass
class VerifyConfig:
    pairs: list[tuple[Path, Path]]
    model: str = "builtin"
    face: str = "centre"  # centre | largest: which face of a photo with several
    threshold: float | None = None  # default: the model's calibrated one
    gpu: int | None = None


def read_pairs_file(path: Path) -> list[tuple[Path, Path]]:
    """Two image paths per line (separated by a tab, or by spaces when neither path has one); ``#`` starts a
    comment; relative paths are relative to the file's folder."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read --pairs {path}: {getattr(e, 'strerror', None) or e}") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) != 2:
            raise BadInputError(f"{path}:{n}: expected two image paths, found {len(parts)} fields")
        pairs.append(tuple(p if Path(p).is_absolute() else Path(path).parent / p for p in map(Path, parts)))
    if not pairs:
        raise BadInputError(f"--pairs {path} lists no pair")
    return pairs


def pairs_from_args(images: list[Path]) -> list[tuple[Path, Path]]:
    if len(images) % 2:
        raise BadInputError(f"give images two by two (A B [C D ...]); got {len(images)}")
    return [(images[i], images[i + 1]) for i in range(0, len(images), 2)]


def verify(cfg: VerifyConfig, progress=None) -> Result:
    t0 = time.perf_counter()
    if not cfg.pairs:
        raise BadInputError("no pair to verify: give two images, or --pairs FILE")
    if cfg.threshold is not None and not -1.0 <= cfg.threshold <= 1.0:
        raise BadInputError(f"--threshold is a cosine similarity in [-1, 1], got {cfg.threshold}")
    device = resolve_device(cfg.gpu)
    model = resolve_model(cfg.model)
    embedder = Embedder.load(None, model.weights_path, model.dict_path, "detector", model.detector_path, device)
    aligner = FaceAligner(pick=cfg.face)
    # every distinct photo decoded before any work, or one line naming the first that is not an image
    images = {p: read_photo(p) for p in dict.fromkeys(p for pair in cfg.pairs for p in pair)}

    chips, faces, problem = {}, {}, {}
    for i, (p, image) in enumerate(images.items()):
        arc5, dlib5, _, detected, n = aligner.find_points(image)
        faces[p] = n
        if not detected:
            problem[p] = "no face found"
        else:
            chips[p] = align_with_points(image, arc5, dlib5, embedder.trunk.template)[0]
        if progress:
            progress("align", i + 1, len(images))
    order = list(chips)
    threshold = model.threshold if cfg.threshold is None else float(cfg.threshold)
    if threshold is None:
        raise BadInputError(f"model {model.name} has no calibrated threshold: give --threshold, or export it with "
                            "--scores (pdsn benchmark --model DIR --scores FILE)")
    rows, skipped = [], []
    if order:
        stack = np.stack([chips[p] for p in order])
        feats = embedder.features([stack])
        blocks = embedder.occluded_blocks(stack)
        plain = embedder.plain(feats)
        at = {p: i for i, p in enumerate(order)}
        done = [(a, b) for a, b in cfg.pairs if a in at and b in at]
        if done:
            ia, ib = np.array([at[a] for a, _ in done]), np.array([at[b] for _, b in done])
            union = blocks[ia] | blocks[ib]
            masks, _ = embedder.masks(union)
            ea, eb = embedder.masked(feats[ia], masks), embedder.masked(feats[ib], masks)
            score = (ea * eb).sum(1)
            base = (plain[ia] * plain[ib]).sum(1)
            kept = masks.reshape(len(masks), -1).mean(1)
            for k, (a, b) in enumerate(done):
                rows.append({
                    "image1": str(a), "image2": str(b), "score": float(score[k]), "same": bool(score[k] > threshold),
                    "threshold": threshold, "baseline_score": float(base[k]),
                    "occluded_blocks1": _ids(blocks[ia[k]]), "occluded_blocks2": _ids(blocks[ib[k]]),
                    "fdm_kept": float(kept[k]), "faces1": faces[a], "faces2": faces[b]})
    for a, b in cfg.pairs:
        if a not in chips or b not in chips:
            bad = [p for p in (a, b) if p not in chips]
            skipped.append({"image1": str(a), "image2": str(b),
                            "reason": "; ".join(f"{p}: {problem[p]}" for p in bad)})
    several = sorted(str(p) for p, n in faces.items() if n > 1 and p in chips)
    res = Result({
        "model": model.name, "trunk": model.meta["trunk"], "threshold": threshold,
        "threshold_calibration": (model.meta["threshold"] or {}).get("calibrated_on", "given by --threshold"), "face": cfg.face,
        "grid": embedder.grid, "pairs": rows, "skipped": skipped, "several_faces": several,
        "seconds": round(time.perf_counter() - t0, 2),
    }, figures={"chips": {str(p): c for p, c in chips.items()}, "grid": embedder.grid})
    return res


def _ids(blocks: np.ndarray) -> list[int]:
    return np.flatnonzero(np.asarray(blocks).reshape(-1)).tolist()
