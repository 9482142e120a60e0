"""``pdsn benchmark``: verification accuracy, baseline trunk vs PDSN, clean and occluded.

Protocol (LFW View 2, or the built-in synthetic set): 10 folds, threshold chosen on 9 and tested on the 10th.
For an occlusion, the *second* image of every pair is occluded (seeded per pair: every method sees the same
images). PDSN: the occluded blocks of that image (``oracle``: from the known occlusion mask; ``detector``: from
the trained detector) select the dictionary entries, whose AND is applied to the features of *both* images
(the paper's protocol), which are then embedded by the trunk head and compared by cosine similarity.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdsn_cli.align.aligner import get_template
from pdsn_cli.data.chip_cache import AlignReport, ChipCache, DataSpec, load_chips
from pdsn_cli.data.chips_h5 import Chips
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, JobFailed
from pdsn_cli.data.faces import FaceItem
from pdsn_cli.trunks.features import embed_features, extract_features
from pdsn_cli.trunks import build_trunk
from pdsn_cli.report.markdown import plot_roc
from pdsn_cli.eval.verification import roc_curve, summarize


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


def lfw_set(root: Path, pairs_file: Path | None, template: str, limit_pairs: int | None, workers: int = 1,
            cache_dir: Path | None = None, progress=None, landmarks: int = 5) -> VerificationSet:
    from pdsn_cli.data.lfw import CENTRED_FACE, read_pairs
    from pdsn_cli.data.lfw import limit_pairs as limit

    pairs_file = pairs_file or Path(root) / "pairs.txt"
    if not Path(pairs_file).is_file():
        raise BadInputError(f"pairs file not found: {pairs_file}")
    pairs = read_pairs(pairs_file, root)
    if limit_pairs:
        pairs = limit(pairs, limit_pairs)
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


# ---- occluding the second image of every pair ---------------------------------------------------------------
def parse_occlusions(spec: list[str], grid: int) -> list[str]:
    """``none``, occluder kinds, ``block`` (every block, one variant each) or ``block:J``."""
    from pdsn_cli.occlusion.occluders import OCCLUDERS

    out: list[str] = []
    for s in spec:
        if s in ("none", "clean"):
            out.append("none")
        elif s == "block":
            out += [f"block:{j}" for j in range(grid * grid)]
        elif s.startswith("block:"):
            try:
                j = int(s.split(":", 1)[1])
            except ValueError:
                raise BadInputError(f"bad occlusion {s!r}: use block:J") from None
            if not 0 <= j < grid * grid:
                raise BadInputError(f"block {j} is outside the {grid}×{grid} grid")
            out.append(s)
        elif s in OCCLUDERS:
            out.append(s)
        else:
            raise BadInputError(f"unknown occlusion {s!r}; use none, block, block:J or one of {', '.join(OCCLUDERS)}")
    return list(dict.fromkeys(out))


def occlude_second(vs: VerificationSet, variant: str, grid: int, seed: int):
    """Occluded copies of the second image of every pair, and their K×K occupancy (zeros for 'none')."""
    return occlude_chips(vs.chips, vs.i2, variant, grid, seed)


def occlude_chips(chips: Chips, index: np.ndarray, variant: str, grid: int, seed: int):
    """Occluded copies of ``chips[index]`` (seeded by variant and position: every method sees the same images),
    and their K×K occupancy (zeros for 'none')."""
    from pdsn_cli.occlusion.occluders import occlude

    out = chips.image[index].copy()
    occ = np.zeros((len(index), grid, grid), np.float32)
    if variant == "none":
        return out, occ
    kind, block = ("block", int(variant.split(":")[1])) if variant.startswith("block:") else (variant, None)
    vkey = int(hashlib.sha1(variant.encode()).hexdigest()[:8], 16)
    for n, i in enumerate(index):
        rng = np.random.default_rng([seed, vkey, n])
        o = occlude(chips.image[i], chips.landmarks[i], kind, rng, grid=grid, block=block)
        out[n] = o.image
        occ[n] = o.blocks
    return out, occ


# ---- what every benchmark loads -----------------------------------------------------------------------------
@dataclass
class Models:
    trunk: object
    point: str
    dictionary: object | None  # FdmDict
    detector: object | None  # OcclusionDetector (``--occlusion detector``)
    source: str  # oracle | detector
    dict_path: Path | None = None
    #: the trunk PDSN-masked features are embedded with (the dictionary's fine-tuned head, if it has one)
    masked_trunk: object | None = None

    def header(self) -> dict:
        """The result keys every benchmark starts with: what was measured, with which trunk and dictionary."""
        return {"trunk": self.trunk.name, "mask_point": self.point,
                "dictionary": str(self.dict_path) if self.dict_path else None,
                "finetuned_head": bool(self.dictionary is not None and self.dictionary.head),
                "occlusion_source": self.source if self.dictionary is not None else None}

    @property
    def grid(self) -> int:
        return self.dictionary.grid if self.dictionary is not None else 5

    def occluded_blocks(self, chips: np.ndarray, occupancy: np.ndarray, threshold: float) -> np.ndarray:
        """bool N×K×K: the blocks PDSN treats as occluded, from the detector or the known occupancy."""
        if self.detector is not None:
            return self.detector.predict(chips, template=self.trunk.template) >= threshold
        return occupancy >= threshold


def load_models(trunk_name: str, weights, dict_path, occlusion_source: str, detector_path, device,
                block_threshold: float = 0.25) -> Models:
    """The trunk, the FDM dictionary and the occlusion detector, checked against each other before any work."""
    from pdsn_cli.pdsn import fdm as fdm_mod

    if occlusion_source not in ("oracle", "detector"):
        raise BadInputError(f"--occlusion must be oracle or detector, got {occlusion_source!r}")
    if not 0 < block_threshold <= 1:
        raise BadInputError(f"--block-threshold must be in (0, 1], got {block_threshold}")
    trunk = build_trunk(trunk_name, weights).to(device)
    point = trunk.default_mask_point
    dictionary = None
    if dict_path is not None:
        dictionary = fdm_mod.load(dict_path)
        dictionary.check_for(trunk.name, dictionary.mask_point, dict_path)
        point = trunk.check_point(dictionary.mask_point)
        dictionary.check_features(trunk.feature_shape(point), dict_path)
    detector = None
    if occlusion_source == "detector":
        if detector_path is None:
            raise BadInputError("--occlusion detector needs --detector FILE (pdsn train-detector)")
        from pdsn_cli.pdsn.detector import OcclusionDetector

        detector = OcclusionDetector.load(detector_path)
        detector.check_for(trunk.template, dictionary.grid if dictionary else None, detector_path)
    masked = dictionary.masked_trunk(trunk).to(device) if dictionary is not None else trunk
    return Models(trunk, point, dictionary, detector, occlusion_source, dict_path, masked)


def stages(progress):
    """``stage(name)`` → a callback(done, total) for that stage's bar, or None without progress."""
    return (lambda name: (lambda d, n: progress(name, d, n))) if progress else (lambda name: None)


def finish(result: dict, models: Models, report: Path | None, t0: float, title: str, **plots) -> dict:
    """Write the ``--report`` folder (ROC/CMC, blocks, dictionary, probes) and stamp the run time."""
    if report is not None:
        from pdsn_cli.report.markdown import write_report

        result["report"] = [str(p) for p in write_report(report, result, dictionary=models.dictionary,
                                                         title=title, grid=models.grid, **plots)]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def check_outputs(plot: Path | None = None, report: Path | None = None) -> None:
    """Refuse unwritable plot/report destinations before any work."""
    if plot is not None:
        from pdsn_cli.atomic import check_writable

        check_writable(plot)
    if report is not None:
        from pdsn_cli.report.markdown import check_report_dir

        check_report_dir(report)


# ---- the run ------------------------------------------------------------------------------------------------
@dataclass
class CommonOptions:
    """What every benchmark (verification, identification, AR) is configured with."""

    data_dir: Path | None = None
    trunk: str = "dlib-resnet"
    weights: str | None = None
    dict_path: Path | None = None
    occlusion_source: str = "oracle"  # oracle | detector
    detector: Path | None = None
    block_threshold: float = 0.25
    flip: bool = False
    seed: int = 0
    gpu: int | None = None
    batch_size: int = 64
    workers: int = 1
    report: Path | None = None  # folder: ROC/CMC, per-block heatmaps, dictionary, occluded probes, index.md
    cache_dir: Path | None = None

    def load_models(self, device) -> Models:
        return load_models(self.trunk, self.weights, self.dict_path, self.occlusion_source, self.detector, device,
                           self.block_threshold)


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
    plot: Path | None = None


def run_benchmark(cfg: BenchmarkConfig, progress=None) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.gpu)
    if cfg.batch_size < 1:
        raise BadInputError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    if cfg.metric not in ("cosine", "euclidean"):
        raise BadInputError(f"--metric must be cosine or euclidean, got {cfg.metric!r}")
    if cfg.jitter < 0:
        raise BadInputError(f"--jitter must be ≥ 0, got {cfg.jitter}")
    if cfg.fdm_on not in ("both", "occluded"):
        raise BadInputError(f"--fdm-on must be both or occluded, got {cfg.fdm_on!r}")
    if cfg.jitter and cfg.flip:
        raise BadInputError("--jitter already mirrors half of its views; drop --flip")
    if cfg.jitter and cfg.dict_path is not None:
        raise BadInputError("--jitter applies to the whole trunk; PDSN masks the features of the chip itself "
                            "(drop --dict, or --jitter)")
    if cfg.landmarks not in LANDMARK_SETS:
        raise BadInputError(f"--landmarks must be one of {', '.join(LANDMARK_SETS)}, got {cfg.landmarks!r}")
    if cfg.landmarks != "5" and cfg.dataset != "lfw":
        raise BadInputError("--landmarks 68 / 5+68 applies to real photos: --dataset lfw")
    if cfg.jitter and cfg.landmarks == "5+68":
        raise BadInputError("--jitter does not combine with --landmarks 5+68; choose one")
    models = cfg.load_models(device)
    trunk, point, dictionary, grid = models.trunk, models.point, models.dictionary, models.grid
    if cfg.fdm_on == "occluded" and not (dictionary is not None and dictionary.head):
        raise BadInputError("--fdm-on occluded needs a dictionary with a fine-tuned head (pdsn finetune): the "
                            "trunk's own head does not map masked features to clean embeddings")
    if cfg.landmarks != "5" and get_template(trunk.template).dst68 is None:
        raise BadInputError(f"--landmarks {cfg.landmarks} needs a dlib template; trunk {trunk.name} uses {trunk.template}")
    variants = parse_occlusions(cfg.occlusions, grid)
    check_outputs(cfg.plot, cfg.report)
    stage = stages(progress)
    if cfg.dataset == "lfw":
        if cfg.data_dir is None:
            raise BadInputError("--dataset lfw needs --data-dir (the folder with lfw/<name>/*.jpg and pairs.txt)")
        sets = [lfw_set(cfg.data_dir, cfg.pairs_file, trunk.template, cfg.limit_pairs, cfg.workers, cfg.cache_dir,
                        progress=stage("align"), landmarks=lm) for lm in LANDMARK_SETS[cfg.landmarks]]
        if any(s.chips.source != sets[0].chips.source or (s.i1 != sets[0].i1).any() for s in sets[1:]):
            raise JobFailed("the 5- and 68-landmark chip caches hold different images; delete one and rerun")
        vs = sets[0]
    elif cfg.dataset == "synthetic":
        vs = synthetic_set(trunk.template)
        sets = [vs]
    else:
        raise BadInputError(f"unknown dataset {cfg.dataset!r} for verification; use lfw or synthetic")

    def views(chip_sets, name=None):
        """Features of every chip set (with --flip, each also mirrored), stacked as views: N×V×C×H×W."""
        fs = [extract_features(trunk, c, point, cfg.batch_size, device, flip=cfg.flip,
                               progress=stage(name) if name else None) for c in chip_sets]
        if len(fs) == 1:
            return fs[0]
        return np.concatenate([f if f.ndim == 5 else f[:, None] for f in fs], axis=1)

    if cfg.jitter:
        from pdsn_cli.pdsn.jitter import embed_jittered

        def jittered(chips, sources, name=None):
            return embed_jittered(trunk, chips, sources, cfg.jitter, cfg.seed, cfg.batch_size, device,
                                  normalize=cfg.metric == "cosine", progress=stage(name) if name else None)

        feats = jittered(vs.chips.image, vs.chips.source, "jittered views")
    else:
        feats = views([s.chips.image for s in sets], "features")
    if not np.isfinite(feats).all():
        raise JobFailed(f"trunk {trunk.name} gives non-finite features (NaN/inf); check --weights")
    rows, curves, shown = [], {}, {}
    for vi, variant in enumerate(variants):
        occ_sets = [occlude_second(s, variant, grid, cfg.seed) for s in sets]
        occ_chips, occ = occ_sets[0]
        shown[variant] = occ_chips[:8]
        f1 = feats[vs.i1]
        if cfg.jitter:  # feats are embeddings already
            f2 = feats[vs.i2] if variant == "none" else jittered(occ_chips, [vs.chips.source[i] for i in vs.i2])
            results = {"baseline": pair_scores(f1, f2, cfg.metric)}
        else:
            f2 = feats[vs.i2] if variant == "none" else views([c for c, _ in occ_sets])
            plain = [_embed(trunk, f, point, None, device, cfg.metric) for f in (f1, f2)]
            results = {"baseline": pair_scores(*plain, cfg.metric)}
        if dictionary is not None:
            blocks = models.occluded_blocks(occ_chips, occ, cfg.block_threshold)
            masks, empty = dictionary.masks_for(blocks, flip=cfg.flip)
            if cfg.flip and len(sets) > 1:  # one (chip, mirror) mask pair per chip set
                masks = np.concatenate([masks] * len(sets), axis=1)
            if cfg.fdm_on == "both":
                results["pdsn"] = pair_scores(*[_embed(models.masked_trunk, f, point, masks, device, cfg.metric)
                                                for f in (f1, f2)], cfg.metric)
            else:  # the first image's plain embedding against the second's masked one where it has occluded blocks
                e2 = plain[1].copy()
                hit = blocks.reshape(len(blocks), -1).any(1)
                if hit.any():
                    e2[hit] = _embed(models.masked_trunk, f2[hit], point, masks[hit], device, cfg.metric)
                results["pdsn"] = pair_scores(plain[0], e2, cfg.metric)
            occluded_frac = float(blocks.reshape(len(blocks), -1).mean())
        for method, s in results.items():
            r = summarize(s, vs.same, vs.fold)
            row = {"method": method, "occlusion": variant, "accuracy": r["accuracy"], "std": r["std"],
                   "tar_at_far_1e-3": r["tar_at_far_1e-3"], "auc": r["auc"]}
            if method == "pdsn":
                row.update(occlusion_source=cfg.occlusion_source, blocks_marked=occluded_frac,
                           all_discarded_fallbacks=empty)
            rows.append(row)
            if not variant.startswith("block:"):
                fpr, tpr, _ = roc_curve(s, vs.same)
                curves[f"{method} / {variant}"] = (fpr, tpr)
        if progress:
            progress("occlusions", vi + 1, len(variants))
    _add_block_summary(rows)
    _add_recovery(rows)
    if cfg.plot is not None and curves:
        plot_roc(curves, cfg.plot, title=f"{vs.name} — {trunk.name}")
    result = {
        "dataset": vs.name + (" (SYNTHETIC)" if vs.chips.synthetic else ""),
        **models.header(),
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
    return finish(result, models, cfg.report, t0, f"{vs.name} — {trunk.name}", roc=curves, probes=shown)


#: --landmarks → the landmark models whose chips are embedded
LANDMARK_SETS = {"5": [5], "68": [68], "5+68": [5, 68]}


def _embed(trunk, f, point, masks, device, metric: str = "cosine") -> np.ndarray:
    """Embeddings of features ``f`` (optionally FDM-masked) as ``metric`` compares them."""
    cos = metric == "cosine"
    e = embed_features(trunk, f, point, masks, device=device, normalize=cos)
    if not cos and f.ndim == 5:  # flip sums the views' raw embeddings: compare their means
        e = e / f.shape[1]
    return e


def pair_scores(e1: np.ndarray, e2: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Similarities, higher = same person: the dot product of unit embeddings (``cosine``), or minus the distance
    of raw embeddings (``euclidean``: dlib's metric, its model was trained with a margin on that distance)."""
    if metric == "euclidean":
        return -np.linalg.norm(e1 - e2, axis=1)
    return (e1 * e2).sum(1)


def _add_block_summary(rows: list[dict]) -> None:
    """The mean over single-block variants, per method (the issue's 'mean over the K² blocks')."""
    for method in dict.fromkeys(r["method"] for r in rows):
        b = [r for r in rows if r["method"] == method and r["occlusion"].startswith("block:")]
        if len(b) > 1:
            rows.append({"method": method, "occlusion": "block:mean",
                         "accuracy": float(np.mean([r["accuracy"] for r in b])),
                         "std": float(np.mean([r["std"] for r in b])),
                         "tar_at_far_1e-3": float(np.mean([r["tar_at_far_1e-3"] for r in b])),
                         "auc": float(np.mean([r["auc"] for r in b]))})


def _add_recovery(rows: list[dict]) -> None:
    """recovery = (PDSN − baseline_occluded) / (baseline_clean − baseline_occluded), when a clean row exists."""
    clean = next((r["accuracy"] for r in rows if r["method"] == "baseline" and r["occlusion"] == "none"), None)
    if clean is None:
        return
    base = {r["occlusion"]: r["accuracy"] for r in rows if r["method"] == "baseline"}
    for r in rows:
        if r["method"] == "pdsn" and r["occlusion"] != "none":
            lost = clean - base[r["occlusion"]]
            r["recovery"] = float((r["accuracy"] - base[r["occlusion"]]) / lost) if lost > 1e-9 else None
