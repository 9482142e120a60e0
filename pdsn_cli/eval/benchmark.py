"""``pdsn benchmark``: verification accuracy, baseline trunk vs PDSN, clean and occluded.

Protocol (LFW View 2, or the built-in synthetic set): 10 folds, threshold chosen on 9 and tested on the 10th.
For an occlusion, the *second* image of every pair is occluded (seeded per pair: every method sees the same
images). PDSN: the occluded blocks of that image (``oracle``: from the known occlusion mask; ``detector``: from
the trained detector) select the dictionary entries, whose AND is applied to the features of *both* images
(the paper's protocol), which are then embedded by the trunk head and compared by cosine similarity.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdsn_cli.data.verification_sets import lfw_set, synthetic_set
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, JobFailed
from pdsn_cli.eval.recovery import add_recovery
from pdsn_cli.eval.verification import roc_curve, summarize
from pdsn_cli.occlusion.driver import parse_occlusions
from pdsn_cli.pdsn.embedder import LANDMARK_SETS, Embedder, all_finite
from pdsn_cli.pdsn.models import apply_model
from pdsn_cli.report.tables import Result


def stages(progress):
    """``stage(name)`` → a callback(done, total) for that stage's bar, or None without progress."""
    return (lambda name: (lambda d, n: progress(name, d, n))) if progress else (lambda name: None)


def finish(result: dict, embedder: Embedder, t0: float, title: str, **plots) -> Result:
    """Stamp the run time, and keep beside the JSON what a report draws: ``plots`` (roc or cmc curves, occluded
    probes), the dictionary, the grid and a title."""
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return Result(result, figures=dict(dictionary=embedder.dictionary, grid=embedder.grid, title=title, **plots))


#: every ``--dataset`` of ``pdsn benchmark``: verification (lfw, synthetic) and identification (the others)
DATASETS = ("lfw", "synthetic", "megaface", "megaface-lfw", "ar")


def check_verification_options(dataset: str, landmarks: str = "5", fdm_on: str = "both") -> None:
    """Refuse an unknown dataset and the options of a protocol the dataset does not run: ``landmarks`` (68-point
    chips of real photos: lfw) and ``fdm_on`` (verification: lfw, synthetic). One rule for ``pdsn benchmark`` and
    ``run_benchmark``."""
    if dataset not in DATASETS:
        raise BadInputError(f"unknown --dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if landmarks != "5" and dataset != "lfw":
        if landmarks not in LANDMARK_SETS:  # name the valid values first, as Embedder.load does
            raise BadInputError(f"--landmarks must be one of {', '.join(LANDMARK_SETS)}, got {landmarks!r}")
        raise BadInputError(f"--landmarks {landmarks} applies to real photos: --dataset lfw")
    if fdm_on != "both" and dataset not in ("lfw", "synthetic"):
        raise BadInputError("--fdm-on applies to verification (--dataset lfw or synthetic); identification "
                            "masks the gallery with the probe's FDM")


# ---- the run ------------------------------------------------------------------------------------------------
@dataclass
class CommonOptions:
    """What every benchmark (verification, identification, AR) is configured with."""

    data_dir: Path | None = None
    trunk: str = "dlib-resnet"
    weights: str | None = None
    dict_path: Path | None = None
    #: oracle | detector; None: the detector when there is one (--detector or a model), else the oracle
    occlusion_source: str | None = None
    detector: Path | None = None
    #: a PDSN model (``builtin``, a built-in name or an exported folder): its dictionary and detector
    model: str | None = None
    block_threshold: float = 0.25
    flip: bool = False
    seed: int = 0
    gpu: int | None = None
    batch_size: int = 64
    workers: int = 1
    cache_dir: Path | None = None

    def resolved(self):
        """A copy whose dictionary, detector, trunk weights and occlusion source are the ones a run uses: those of
        ``model`` when one is named (it is then None), the occlusion source decided when none was given. The
        caller's options stay as they were, so that one options object can run twice."""
        d, det, source, weights = apply_model(self.model, self.dict_path, self.detector, self.occlusion_source,
                                              self.weights, self.trunk)
        return dataclasses.replace(self, dict_path=d, detector=det, occlusion_source=source, weights=weights,
                                   model=None)

    def load_embedder(self, device, **views) -> Embedder:
        """The test-time embedder these options describe (``views``: jitter, landmarks, ... of Embedder.load);
        options given a ``model`` are :meth:`resolved` first."""
        if self.model is not None:
            raise ValueError("load_embedder takes resolved options: call resolved() first")
        return Embedder.load(self.trunk, self.weights, self.dict_path, self.occlusion_source, self.detector, device,
                             self.block_threshold, flip=self.flip, seed=self.seed, batch_size=self.batch_size,
                             **views)


@dataclass
class BenchmarkConfig(CommonOptions):
    dataset: str = "lfw"  # lfw | synthetic
    pairs_file: Path | None = None
    occlusions: list[str] = field(default_factory=lambda: ["none"])
    limit_pairs: int | None = None
    jitter: int = 0  # dlib's num_jitters: mean raw embedding over N jittered views (baseline only)
    #: landmark model the dlib150 chips are fitted on: "5", "68" (dlib's original chip), or "5+68" (both chips
    #: of every image are embedded and their embeddings summed, like --flip's views)
    landmarks: str = "5"
    metric: str = "cosine"  # cosine | euclidean (dlib's: distance of the raw, unnormalised embeddings)
    #: which image of a pair PDSN masks: "both" (the paper's protocol: the occluded image's FDM on both), or
    #: "occluded" (only the occluded one, through the fine-tuned head, compared with the other image's plain
    #: embedding: the head was distilled to map masked features to the clean embedding, so the clean image need
    #: not lose what the FDM discards; an image with no occluded block keeps its plain embedding)
    fdm_on: str = "both"
    #: keep every pair's score (``Result.figures["scores"]``, written by ``write_scores``)
    keep_scores: bool = False


def run_benchmark(cfg: BenchmarkConfig, progress=None) -> dict:
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    device = resolve_device(cfg.gpu)
    if cfg.batch_size < 1:
        raise BadInputError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    if cfg.metric not in ("cosine", "euclidean"):
        raise BadInputError(f"--metric must be cosine or euclidean, got {cfg.metric!r}")
    if cfg.fdm_on not in ("both", "occluded"):
        raise BadInputError(f"--fdm-on must be both or occluded, got {cfg.fdm_on!r}")
    check_verification_options(cfg.dataset, cfg.landmarks, cfg.fdm_on)
    embedder = cfg.load_embedder(device, jitter=cfg.jitter, landmarks=cfg.landmarks)
    trunk, dictionary, grid = embedder.trunk, embedder.dictionary, embedder.grid
    if cfg.fdm_on == "occluded" and not (dictionary is not None and dictionary.head):
        raise BadInputError("--fdm-on occluded needs a dictionary with a fine-tuned head (pdsn finetune): the "
                            "trunk's own head does not map masked features to clean embeddings")
    variants = parse_occlusions(cfg.occlusions, grid)
    stage = stages(progress)
    if cfg.dataset == "lfw":
        if cfg.data_dir is None:
            raise BadInputError("--dataset lfw needs --data-dir (the folder with lfw/<name>/*.jpg and pairs.txt)")
        sets = [lfw_set(cfg.data_dir, cfg.pairs_file, trunk.template, cfg.limit_pairs, cfg.workers, cfg.cache_dir,
                        progress=stage("align"), landmarks=lm) for lm in embedder.landmark_sets]
        if any(s.chips.source != sets[0].chips.source or (s.i1 != sets[0].i1).any() for s in sets[1:]):
            raise JobFailed("the 5- and 68-landmark chip caches hold different images; delete one and rerun")
        vs = sets[0]
    elif cfg.dataset == "synthetic":
        vs = synthetic_set(trunk.template)
        sets = [vs]
    else:
        raise BadInputError(f"unknown dataset {cfg.dataset!r} for verification; use lfw or synthetic "
                            f"(identification: {', '.join(d for d in DATASETS if d not in ('lfw', 'synthetic'))})")

    normalize = cfg.metric == "cosine"
    if cfg.jitter:  # the views are embedded by the trunk whole: feats are embeddings already
        feats = embedder.jittered(vs.chips.image, vs.chips.source, normalize, stage("jittered views"))
    else:
        feats = embedder.features([s.chips.image for s in sets], stage("features"))
    if not all_finite(feats):
        raise JobFailed(f"trunk {trunk.name} gives non-finite features (NaN/inf); check --weights")
    f1 = feats[vs.i1]  # the first images are never occluded: their baseline embeddings serve every variant
    plain1 = None if cfg.jitter else embedder.plain(f1, normalize)
    # a detector does not know which image of a pair is occluded: the blocks it finds in either are masked (the
    # oracle knows: the first image is clean), as pdsn verify does
    blocks1 = (embedder.occluded_blocks(vs.chips.image[vs.i1]) if dictionary is not None and embedder.detector
               is not None and cfg.fdm_on == "both" else None)
    rows, curves, shown, kept = [], {}, {}, {}
    for vi, variant in enumerate(variants):
        occ_sets = [s.occlude_second(variant, grid, cfg.seed) for s in sets]
        occ_chips, occ = occ_sets[0]
        shown[variant.name] = occ_chips[:8].copy()  # a view would keep the variant's 6,000 chips alive
        if cfg.jitter:
            f2 = feats[vs.i2] if variant.is_clean else embedder.jittered(
                occ_chips, [vs.chips.source[i] for i in vs.i2], normalize)
            results = {"baseline": pair_scores(f1, f2, cfg.metric)}
        else:
            f2 = feats[vs.i2] if variant.is_clean else embedder.features([c for c, _ in occ_sets])
            plain = [plain1, embedder.plain(f2, normalize)]
            results = {"baseline": pair_scores(*plain, cfg.metric)}
        if dictionary is not None:
            # the occluded image's FDM masks both images (the paper's protocol), or only the occluded one
            blocks = embedder.occluded_blocks(occ_chips, occ)
            if blocks1 is not None:
                blocks = blocks | blocks1
            masks, empty = embedder.masks(blocks)
            if cfg.fdm_on == "both":
                results["pdsn"] = pair_scores(*[embedder.masked(f, masks, normalize) for f in (f1, f2)], cfg.metric)
            else:  # the first image's plain embedding against the second's masked one where it has occluded blocks
                e2 = plain[1].copy()
                hit = blocks.reshape(len(blocks), -1).any(1)
                if hit.any():
                    e2[hit] = embedder.masked(f2[hit], masks[hit], normalize)
                results["pdsn"] = pair_scores(plain[0], e2, cfg.metric)
            occluded_frac = float(blocks.reshape(len(blocks), -1).mean())
        for method, s in results.items():
            if cfg.keep_scores:
                kept[(variant.name, method)] = s
            r = summarize(s, vs.same, vs.fold)
            row = {"method": method, "occlusion": variant.name, "block": variant.block, "accuracy": r["accuracy"],
                   "std": r["std"], "tar_at_far_1e-3": r["tar_at_far_1e-3"], "auc": r["auc"]}
            if method == "pdsn":
                row.update(occlusion_source=cfg.occlusion_source, blocks_marked=occluded_frac,
                           all_discarded_fallbacks=empty)
            rows.append(row)
            if variant.block is None:
                fpr, tpr, _ = roc_curve(s, vs.same)
                curves[f"{method} / {variant.name}"] = (fpr, tpr)
        if progress:
            progress("occlusions", vi + 1, len(variants))
        # this variant's chips and features go before the next one's are made (LFW: ~0.4 GB of chips each)
        del occ_sets, occ_chips, occ, f2, results
    _add_block_summary(rows)
    add_recovery(rows, lambda r: r["accuracy"])
    result = {
        "dataset": vs.name + (" (SYNTHETIC)" if vs.chips.synthetic else ""),
        **embedder.header(),
        "pairs": int(len(vs.same)),
        "dropped_pairs": vs.dropped_pairs,
        "images": len(vs.chips),
        "flip": cfg.flip,
        "jitter": cfg.jitter,
        "metric": cfg.metric,
        "landmarks": cfg.landmarks,
        "fdm_on": cfg.fdm_on if dictionary is not None else None,
        "align": vs.report.as_dict() | {"several_faces": vs.report.several_faces},
        **({"align_68": sets[1].report.as_dict()} if len(sets) > 1 else {}),
        "results": rows,
    }
    scores = None
    if cfg.keep_scores:
        scores = {"pairs": [(vs.chips.source[a], vs.chips.source[b]) for a, b in zip(vs.i1, vs.i2)],
                  "same": vs.same, "fold": vs.fold, "scores": kept}
    res = finish(result, embedder, t0, f"{vs.name} — {trunk.name}", roc=curves, probes=shown)
    res.scores = scores
    return res


def pair_scores(e1: np.ndarray, e2: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Similarities, higher = same person: the dot product of unit embeddings (``cosine``), or minus the distance
    of raw embeddings (``euclidean``: dlib's metric, its model was trained with a margin on that distance)."""
    if metric == "euclidean":
        return -np.linalg.norm(e1 - e2, axis=1)
    return (e1 * e2).sum(1)


def _add_block_summary(rows: list[dict]) -> None:
    """The mean over single-block variants, per method (the issue's 'mean over the K² blocks')."""
    for method in dict.fromkeys(r["method"] for r in rows):
        b = [r for r in rows if r["method"] == method and r["block"] is not None]
        if len(b) > 1:
            rows.append({"method": method, "occlusion": "block:mean", "block": None,
                         "accuracy": float(np.mean([r["accuracy"] for r in b])),
                         "std": float(np.mean([r["std"] for r in b])),
                         "tar_at_far_1e-3": float(np.mean([r["tar_at_far_1e-3"] for r in b])),
                         "auc": float(np.mean([r["auc"] for r in b]))})
