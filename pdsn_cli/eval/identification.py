"""Identification benchmarks: MegaFace Challenge 1 (and ``megaface-lfw``, the same protocol on LFW).

The protocol, as the devkit scores it: every ordered pair (a, b) of two images of one probe identity is a trial;
a is the probe, the gallery is b plus the first N distractors. The trial is a hit at rank r when fewer than r
distractors score above s(a, b). Reported: rank-1 rate at N = 10, 100, …, 10⁶ (nested galleries: the first N of
one order), the CMC at the largest N, and verification TAR at FAR = 10⁻⁶ (genuine: the trials' scores; impostors:
every probe × every distractor, through a score histogram — see :func:`pdsn_cli.eval.search.threshold_at_far`).

Occlusion: the probe a is occluded (seeded per image, every method sees the same images); b and the distractors
stay clean, as in the paper. PDSN: the FDM of the occluded probe masks the probe, b and every distractor (one mask
for both sides of each comparison, the rule the verification benchmark uses), so the gallery is re-embedded from
cached features for each distinct FDM in use; probes sharing an FDM are searched together.

Synthetic distractors (``--synthetic-distractors N``, to reach 10⁶ where only thousands of real faces exist): by
default drawn from the Gaussian (mean, covariance) of the real distractors' embeddings under the same FDM, then
L2-normalised — a face-like cloud. ``uniform`` draws uniform unit vectors instead, which in 128-D are almost
orthogonal to every face and so barely compete with a genuine match (reported for contrast).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli.atomic import atomic_output
from pdsn_cli.data import ar
from pdsn_cli.data import megaface as mf
from pdsn_cli.data.chip_cache import ChipCache, default_cache_dir
from pdsn_cli.data.faces import FaceItem
from pdsn_cli.data.h5util import open_for_writing
from pdsn_cli.data.lfw import CENTRED_FACE
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, JobFailed
from pdsn_cli.eval.benchmark import CommonOptions, finish, stages
from pdsn_cli.eval.recovery import add_recovery
from pdsn_cli.eval.search import threshold_at_far, topk
from pdsn_cli.occlusion.driver import OcclusionVariant, occlude_chips, parse_occlusions
from pdsn_cli.pdsn.embedder import Embedder, TwinFeatures, all_finite

FAR = 1e-6
HIST_BINS = 1 << 16  # threshold resolution 2/65536 ≈ 3e-5 in cosine
SYNTH_BLOCK = 1 << 16  # synthetic rows are generated in fixed blocks, so they do not depend on search chunking


@dataclass
class IdentificationConfig(CommonOptions):
    dataset: str = "megaface-lfw"  # megaface | megaface-lfw
    megaface_images: Path | None = None
    facescrub_images: Path | None = None
    devkit: Path | None = None
    occlusions: list[str] = field(default_factory=lambda: ["none"])
    synthetic_distractors: int = 0
    synthetic_model: str = "gaussian"  # gaussian | uniform
    max_distractors: int | None = None
    limit_identities: int | None = None  # quick runs: a seeded sample of probe identities
    ranks: int = 10
    export_devkit: Path | None = None


@dataclass
class ProbeSide:
    chips: object  # Chips (label = identity)
    feats: np.ndarray  # clean features
    by_id: list[np.ndarray]  # image indices per identity


# ---- the distractors: features cached once, embedded per FDM ----------------------------------------------
class DistractorFeatures:
    """Trunk features of the real distractors in one HDF5 file (float16: 10⁶ faces at 128×8×8 are 16 GB), keyed by
    everything they depend on, so reruns and other occluders reuse them."""

    def __init__(self, path: Path):
        self.path = path
        self.f = h5py.File(path, "r")
        self.feats = self.f["features"]
        # a dictionary that tunes the trunk: its features too (PDSN's side of the comparison)
        self.tuned = self.f["tuned"] if "tuned" in self.f else None

    def __len__(self) -> int:
        return self.feats.shape[0]

    def read(self, a: int, b: int):
        base = self.feats[a:b].astype(np.float32)
        return base if self.tuned is None else TwinFeatures(base, self.tuned[a:b].astype(np.float32))

    @classmethod
    def build(cls, cache: ChipCache, sources: list[str], embedder: Embedder, key: str, cache_dir: Path | None,
              progress=None) -> DistractorFeatures:
        folder = Path(cache_dir or default_cache_dir()) / "features"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"distractors-{key}.h5"
        if path.is_file():
            return cls(path)
        shape = embedder.trunk.feature_shape(embedder.point)
        shape = (2, *shape) if embedder.flip else shape
        step = 1024
        with atomic_output(path, shared=True) as tmp:  # a cache entry: concurrent runs may write it too
            with open_for_writing(tmp) as f:
                names = ("features", "tuned") if embedder.tuned_features else ("features",)
                ds = [f.create_dataset(name, (len(sources), *shape), np.float16,
                                       chunks=(min(64, max(1, len(sources))), *shape)) for name in names]
                for a in range(0, len(sources), step):
                    chips = cache.load(sources[a:a + step])
                    feats = embedder.features([chips.image])
                    for d, part in zip(ds, (feats.base, feats.tuned) if embedder.tuned_features else (feats,)):
                        d[a:a + len(chips)] = part
                    if progress:
                        progress(min(a + step, len(sources)), len(sources))
        return cls(path)


class MaskedGallery:
    """The gallery seen by probes sharing one FDM (``mask``; None: the baseline's unmasked gallery): the real
    distractors embedded under that FDM, then synthetic ones drawn from the same FDM's embedding distribution.
    Rows are produced on demand, chunk by chunk."""

    def __init__(self, store: DistractorFeatures, n_real: int, embedder: Embedder, mask, synthetic: int,
                 model: str, seed: int, fit_rows: int = 50_000):
        self.store, self.embedder, self.mask = store, embedder, mask
        self.n_real = n_real
        self.synthetic = synthetic
        self.dim = embedder.trunk.embedding_dim
        self.seed = seed
        self.model = model
        self._block = (None, None)
        self.mu = self.chol = None
        if synthetic and model == "gaussian":
            e = self.real_rows(0, min(self.n_real, fit_rows))
            if len(e) < 2:
                raise BadInputError("gaussian synthetic distractors need at least 2 real distractors to fit")
            self.mu = e.mean(0)
            cov = np.cov(e, rowvar=False) + 1e-6 * np.eye(self.dim)
            self.chol = np.linalg.cholesky(cov).astype(np.float32)

    def __len__(self) -> int:
        return self.n_real + self.synthetic

    def real_rows(self, a: int, b: int) -> np.ndarray:
        return embed_side(self.embedder, self.store.read(a, b), self.mask)

    def _synthetic_block(self, k: int) -> np.ndarray:
        if self._block[0] != k:
            rng = np.random.default_rng([self.seed, 7919, k])
            n = min(SYNTH_BLOCK, self.synthetic - k * SYNTH_BLOCK)
            z = rng.standard_normal((n, self.dim), dtype=np.float32)
            x = z if self.model == "uniform" else self.mu + z @ self.chol.T
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            self._block = (k, x.astype(np.float32))
        return self._block[1]

    def read(self, a: int, b: int) -> np.ndarray:
        parts = []
        if a < self.n_real:
            parts.append(self.real_rows(a, min(b, self.n_real)))
        s = max(a, self.n_real) - self.n_real
        e = b - self.n_real
        while s < e:
            k = s // SYNTH_BLOCK
            blk = self._synthetic_block(k)
            lo = s - k * SYNTH_BLOCK
            hi = min(e - k * SYNTH_BLOCK, len(blk))
            parts.append(blk[lo:hi])
            s = k * SYNTH_BLOCK + hi
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


# ---- scoring ------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Hits per (gallery size, rank), the trials' genuine scores and the impostor score histogram."""

    sizes: list[int]
    ranks: int
    hits: np.ndarray = None
    trials: int = 0
    genuine: list = field(default_factory=list)
    hist: np.ndarray = None

    def __post_init__(self):
        self.hits = np.zeros((len(self.sizes), self.ranks), np.int64)

    def add(self, top: np.ndarray, g: np.ndarray, valid: np.ndarray) -> None:
        """top: S×A×R distractor scores (descending) of A probes; g: A×B genuine scores; valid: A×B (b ≠ a)."""
        above = (top[:, :, None, :] > g[None, :, :, None]).sum(-1)  # S×A×B distractors above each genuine
        for r in range(self.ranks):
            self.hits[:, r] += ((above <= r) & valid[None]).sum((1, 2))
        self.trials += int(valid.sum())
        self.genuine.append(g[valid])

    def result(self) -> dict:
        if self.trials == 0:
            raise BadInputError("no trials: every probe identity needs at least two images")
        rate = self.hits / self.trials
        gen = np.concatenate(self.genuine)
        thr = threshold_at_far(self.hist[-1], FAR)
        return {
            "rank1": {str(n): float(rate[s, 0]) for s, n in enumerate(self.sizes)},
            "cmc_at_largest": [float(v) for v in rate[-1]],
            "tar_at_far_1e-6": float((gen > thr).mean()),
            "threshold_at_far_1e-6": float(thr),
            "trials": self.trials,
        }


def embed_side(embedder: Embedder, feats: np.ndarray, mask) -> np.ndarray:
    """Gallery-side embeddings: plain for the baseline (``mask`` None), else PDSN-masked by the probes' FDM."""
    return embedder.plain(feats) if mask is None else embedder.masked(feats, mask)


def score_group(tally: Tally, probes: ProbeSide, idx: np.ndarray, e_probe: np.ndarray, gallery, embedder: Embedder,
                mask, chunk_rows: int | None = None) -> None:
    """Search one group of probes (sharing one FDM, ``mask``) and count its trials."""
    res = topk(e_probe, gallery, tally.ranks, sizes=tally.sizes, histogram_bins=HIST_BINS, chunk_rows=chunk_rows,
               device=embedder.device)
    tally.hist = res.hist if tally.hist is None else tally.hist + res.hist
    labels = probes.chips.label[idx]
    for c in np.unique(labels):
        sel = np.flatnonzero(labels == c)
        imgs = probes.by_id[c]
        e_gal = embed_side(embedder, probes.feats[imgs], mask)
        g = e_probe[sel] @ e_gal.T
        valid = idx[sel][:, None] != imgs[None, :]
        tally.add(res.scores[:, sel, :], g, valid)


# ---- the run ------------------------------------------------------------------------------------------------
def run_identification(cfg: IdentificationConfig, progress=None) -> dict:
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    device = resolve_device(cfg.gpu)
    if cfg.synthetic_model not in ("gaussian", "uniform"):
        raise BadInputError(f"--synthetic-model must be gaussian or uniform, got {cfg.synthetic_model!r}")
    if cfg.synthetic_distractors < 0:
        raise BadInputError("--synthetic-distractors must be ≥ 0")
    if not 1 <= cfg.ranks <= 100:
        raise BadInputError(f"--ranks must be in 1..100, got {cfg.ranks}")
    embedder = cfg.load_embedder(device)
    trunk, point, dictionary = embedder.trunk, embedder.point, embedder.dictionary
    variants = parse_occlusions(cfg.occlusions, embedder.grid)
    stage = stages(progress)

    # the two sides of the protocol, as lists of images in their data roots
    if cfg.dataset == "megaface-lfw":
        if cfg.data_dir is None:
            raise BadInputError("--dataset megaface-lfw needs --data-dir (LFW: <name>/<image>.jpg)")
        probe_items, dist_items, skipped = mf.lfw_split(cfg.data_dir)
        probe_root = dist_root = cfg.data_dir
        centred = CENTRED_FACE
        lists = None
        dist_sources = [it.path for it in dist_items]
    elif cfg.dataset == "megaface":
        if cfg.synthetic_distractors:
            raise BadInputError("--synthetic-distractors is for megaface-lfw; MegaFace brings its own million")
        layout = mf.MegafaceLayout.resolve(cfg.data_dir, cfg.megaface_images, cfg.facescrub_images, cfg.devkit)
        probe_items, skipped = layout.probe_items(), []
        probe_root, dist_root = layout.probe_root, layout.distractor_root
        centred = None  # Flickr photos and FaceScrub: the subject may be anywhere
        lists = layout.distractor_lists()
        if cfg.max_distractors:
            lists = {n: p for n, p in lists.items() if n <= cfg.max_distractors} or dict([min(lists.items())])
        dist_sources = mf.nested_order(lists)
        if dist_sources is None:
            raise BadInputError(f"the distractor lists in {layout.templatelists} are not nested subsets of each other; "
                                "score each size separately with --max-distractors N")
    else:
        raise BadInputError(f"unknown identification dataset {cfg.dataset!r}; use megaface or megaface-lfw")

    if cfg.limit_identities:
        ids = sorted({it.identity for it in probe_items})
        keep = set(np.random.default_rng(cfg.seed).choice(ids, min(cfg.limit_identities, len(ids)), replace=False))
        probe_items = [it for it in probe_items if it.identity in keep]
    pcache = ChipCache(probe_root, trunk.template, cfg.cache_dir, centred)
    pchips, prep = pcache.ensure_and_load(probe_items, skipped, cfg.workers, stage("align probes"),
                                          what="the probe images")
    dcache = ChipCache(dist_root, trunk.template, cfg.cache_dir, centred)
    drep = dcache.ensure([FaceItem(p, p.split("/")[0]) for p in dist_sources], cfg.workers, stage("align distractors"))
    bad = {s.path for s in drep.skipped}
    dist_sources = [p for p in dist_sources if p not in bad]
    n_syn = 0
    if cfg.dataset == "megaface-lfw":
        # one seeded order, so that the gallery of N is the first N of it (a random sample of the real faces)
        dist_sources = [dist_sources[i] for i in np.random.default_rng([cfg.seed, 1]).permutation(len(dist_sources))]
        cap = cfg.max_distractors or len(dist_sources) + cfg.synthetic_distractors
        dist_sources = dist_sources[:cap]
        n_syn = min(cfg.synthetic_distractors, cap - len(dist_sources))
        sizes = mf.gallery_sizes(len(dist_sources) + n_syn)
    else:
        sizes = [n - sum(1 for p in lists[n] if p in bad) for n in lists]
    if not dist_sources:
        raise BadInputError("no usable real distractors")
    sizes = [s for s in sizes if s > 0]

    tuned = embedder.dictionary.head_digest() if embedder.tuned_features else ""
    key = hashlib.sha1("|".join([str(dcache.dir), trunk.name, str(cfg.weights), point, str(cfg.flip), tuned,
                                 trunk.template, dcache.content_key(dist_sources)] + dist_sources
                                ).encode()).hexdigest()[:16]
    store = DistractorFeatures.build(dcache, dist_sources, embedder, key, cfg.cache_dir, stage("distractor features"))
    by_id = [np.flatnonzero(pchips.label == c) for c in range(len(pchips.identity))]
    probes = ProbeSide(pchips, embedder.features([pchips.image], stage("probe features")), by_id)
    if not all_finite(probes.feats):
        raise JobFailed(f"trunk {trunk.name} gives non-finite features (NaN/inf); check --weights")

    def gallery(mask):
        return MaskedGallery(store, len(dist_sources), embedder, mask, n_syn, cfg.synthetic_model, cfg.seed)

    rows, cmc_curves, shown = [], {}, {}
    all_idx = np.arange(len(pchips))
    for vi, variant in enumerate(variants):
        occ_chips, occ = occlude_chips(pchips, all_idx, variant, embedder.grid, cfg.seed)
        f_occ = probes.feats if variant.is_clean else embedder.features([occ_chips], stage(f"{variant.name} features"))
        shown[variant.name] = occ_chips[:: max(1, len(occ_chips) // 8)][:8].copy()  # not a view of them all
        base = Tally(sizes, cfg.ranks)
        score_group(base, probes, all_idx, embedder.plain(f_occ), gallery(None), embedder, None)
        results = {"baseline": (base, {})}
        if dictionary is not None:
            blocks = embedder.occluded_blocks(occ_chips, occ).reshape(len(all_idx), -1)
            combos, which = np.unique(blocks, axis=0, return_inverse=True)
            which = which.ravel()
            tally, empty = Tally(sizes, cfg.ranks), 0
            for ci, combo in enumerate(combos):
                idx = np.flatnonzero(which == ci)
                mask, e = embedder.masks(combo[None])
                mask = mask[0]
                empty += e * len(idx)
                score_group(tally, probes, idx, embedder.masked(f_occ[idx], mask), gallery(mask), embedder, mask)
                if progress:
                    progress(f"{variant.name}: PDSN masks", ci + 1, len(combos))
            results["pdsn"] = (tally, {"occlusion_source": cfg.occlusion_source, "distinct_fdms": len(combos),
                                       "blocks_marked": float(blocks.mean()), "all_discarded_fallbacks": empty})
        for method, (t, extra) in results.items():
            r = t.result()
            rows.append({"method": method, "occlusion": variant.name, "block": variant.block, **r, **extra})
            cmc_curves[f"{method} / {variant.name}"] = {"sizes": sizes, "rank1": [r["rank1"][str(n)] for n in sizes],
                                                   "ranks": list(range(1, cfg.ranks + 1)),
                                                   "cmc_at_largest": r["cmc_at_largest"]}
        if progress:
            progress("occlusions", vi + 1, len(variants))
    add_recovery(rows, lambda r, largest=str(sizes[-1]): r["rank1"][largest])  # at the largest gallery
    exported = None
    if cfg.export_devkit is not None:
        exported = export_devkit(cfg, probes, pchips, store, dist_sources, embedder, variants, lists)
    result = {
        "dataset": cfg.dataset,
        **embedder.header(),
        "probes": len(pchips),
        "probe_identities": len(pchips.identity),
        "real_distractors": len(dist_sources),
        "synthetic_distractors": n_syn,
        "synthetic_model": cfg.synthetic_model if n_syn else None,
        "sizes": sizes,
        "flip": cfg.flip,
        "align": {"probes": prep.as_dict(), "distractors": drep.as_dict()},
        "skipped_files": [s.as_dict() for s in prep.skipped + drep.skipped],
        "results": rows,
        "devkit_export": exported,
    }
    return finish(result, embedder, t0, f"{cfg.dataset} — {trunk.name}", cmc=cmc_curves, probes=shown)


def export_devkit(cfg, probes, pchips, store, dist_sources, embedder: Embedder, variants, lists):
    """Baseline features in the devkit's layout, one folder per occlusion variant (probes) plus the clean
    distractors, and the template lists they answer to. PDSN cannot be expressed there: its gallery depends on the
    probe's FDM, and the official scorer compares one fixed vector per image."""
    out = Path(cfg.export_devkit)
    suffix = mf.devkit_suffix(embedder.trunk.name)
    g = MaskedGallery(store, len(dist_sources), embedder, None, 0, "gaussian", cfg.seed)
    n = 0
    for a in range(0, len(dist_sources), 4096):
        e = g.read(a, min(a + 4096, len(dist_sources)))
        n += mf.export_features(out / "megaface", dist_sources[a:a + len(e)], e, suffix)
    for variant in variants:
        occ_chips, _ = occlude_chips(pchips, np.arange(len(pchips)), variant, embedder.grid, cfg.seed)
        f = probes.feats if variant.is_clean else embedder.features([occ_chips])
        n += mf.export_features(out / f"facescrub-{variant.name.replace(':', '')}", pchips.source,
                                embedder.plain(f), suffix)
    if lists is None:
        lists = {s: dist_sources[:s] for s in mf.gallery_sizes(len(dist_sources))}
    have = set(dist_sources)  # images that could not be read have no feature file: keep the lists consistent
    lists = {s: [p for p in paths if p in have] for s, paths in lists.items()}
    mf.write_template_lists(out / "templatelists", [pchips.identity[c] for c in pchips.label], pchips.source, lists)
    return {"folder": str(out), "suffix": suffix, "files": n}


# ---- AR: closed-set identification with real sunglasses and scarves ----------------------------------------
@dataclass
class ArConfig(CommonOptions):
    protocol: int = 1
    ranks: int = 10


def closed_set_ranks(e_probe: np.ndarray, e_gallery: np.ndarray, g_subject: np.ndarray, p_subject: np.ndarray,
                     ranks: int) -> np.ndarray:
    """hits[r] = probes whose own subject is among the r+1 best subjects (a subject scores its best gallery image)."""
    s = e_probe @ e_gallery.T
    subjects = np.unique(g_subject)
    best = np.full((len(e_probe), len(subjects)), -np.inf, np.float32)
    for k, c in enumerate(subjects):
        best[:, k] = s[:, g_subject == c].max(1)
    own = best[np.arange(len(e_probe)), np.searchsorted(subjects, p_subject)]
    above = (best > own[:, None]).sum(1)
    return np.array([(above <= r).sum() for r in range(ranks)], np.int64)


def detector_vs_drawn(found: np.ndarray, drawn: np.ndarray) -> dict:
    """Block precision and recall of the detector's decisions on real occluders, taking as truth the blocks the
    toolkit's occluder of the same kind covers on the same face (AR has no pixel masks: an approximation)."""
    found, drawn = found.reshape(len(found), -1), drawn.reshape(len(drawn), -1)
    tp = int((found & drawn).sum())
    return {"detector_precision_vs_drawn": tp / max(int(found.sum()), 1),
            "detector_recall_vs_drawn": tp / max(int(drawn.sum()), 1)}


def run_ar(cfg: ArConfig, progress=None) -> dict:
    """Rank-1 (and CMC) per probe kind of an AR protocol, baseline vs PDSN.

    PDSN needs each probe's occluded blocks. ``detector``: the trained occlusion detector reads them from the
    photo. ``oracle``: AR has no pixel masks, so the blocks are those the toolkit's own occluder of the probe's
    kind (sunglasses, scarf) covers when placed on that probe's landmarks — the kind is known, the shape is not.
    """
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    device = resolve_device(cfg.gpu)
    if cfg.data_dir is None:
        raise BadInputError("--dataset ar needs --data-dir (the folder holding the AR images)")
    if not 1 <= cfg.ranks <= 100:
        raise BadInputError(f"--ranks must be in 1..100, got {cfg.ranks}")
    embedder = cfg.load_embedder(device)
    trunk, dictionary = embedder.trunk, embedder.dictionary
    stage = stages(progress)
    images = ar.scan(cfg.data_dir)
    proto = ar.protocol(images, cfg.protocol)
    chips, rep = ChipCache(cfg.data_dir, trunk.template, cfg.cache_dir).ensure_and_load(
        ar.ar_items(proto), workers=cfg.workers, progress=stage("align"), what="the AR protocol's images")
    pos = chips.index_of_source()
    feats = embedder.features([chips.image], stage("features"))
    if not all_finite(feats):
        raise JobFailed(f"trunk {trunk.name} gives non-finite features (NaN/inf); check --weights")
    subject = np.array([chips.identity[c] for c in chips.label])
    g_idx = np.array([pos[im.path] for im in proto.gallery if im.path in pos])
    rows, shown, cmc_curves = [], {}, {}
    # the share of the clean gallery faces' blocks the detector flags
    g_marked = (float(embedder.occluded_blocks(chips.image[g_idx]).mean())
                if dictionary is not None and embedder.detector is not None else None)
    for kind, probes in proto.probes.items():
        p_idx = np.array([pos[im.path] for im in probes if im.path in pos])
        if len(p_idx) == 0:
            continue
        shown[kind] = chips.image[p_idx[:8]]
        results = {"baseline": closed_set_ranks(embedder.plain(feats[p_idx]), embedder.plain(feats[g_idx]),
                                                subject[g_idx], subject[p_idx], cfg.ranks)}
        extra = {}
        if dictionary is not None:
            # oracle: the blocks the toolkit's own occluder of the probe's kind covers on that probe
            occ = None if embedder.detector is not None else \
                occlude_chips(chips, p_idx, OcclusionVariant(kind), embedder.grid, cfg.seed)[1]
            blocks = embedder.occluded_blocks(chips.image[p_idx], occ).reshape(len(p_idx), -1)
            combos, which = np.unique(blocks, axis=0, return_inverse=True)
            which = which.ravel()
            hits = np.zeros(cfg.ranks, np.int64)
            for ci, combo in enumerate(combos):
                sel = p_idx[which == ci]
                mask = embedder.masks(combo[None])[0]  # one row: every image of the group
                hits += closed_set_ranks(embedder.masked(feats[sel], mask), embedder.masked(feats[g_idx], mask),
                                         subject[g_idx], subject[sel], cfg.ranks)
            results["pdsn"] = hits
            extra = {"occlusion_source": cfg.occlusion_source, "distinct_fdms": len(combos),
                     "blocks_marked": float(blocks.mean())}
            if embedder.detector is not None:  # its decisions on real occluders, against where ours would sit
                extra.update(detector_vs_drawn(blocks, occlude_chips(
                    chips, p_idx, OcclusionVariant(kind), embedder.grid, cfg.seed)[1] >= embedder.block_threshold))
                extra["gallery_blocks_marked"] = g_marked
        for method, hits in results.items():
            cmc = hits / len(p_idx)
            rows.append({"method": method, "occlusion": kind, "block": None, "rank1": float(cmc[0]),
                         "cmc": [float(v) for v in cmc], "probes": int(len(p_idx)),
                         **(extra if method == "pdsn" else {})})
            cmc_curves[f"{method} / {kind}"] = {"sizes": [len(np.unique(subject[g_idx]))], "rank1": [float(cmc[0])],
                                                "ranks": list(range(1, cfg.ranks + 1)),
                                                "cmc_at_largest": [float(v) for v in cmc]}
    result = {
        "dataset": f"ar protocol {proto.number}",
        **embedder.header(),
        "protocol": proto.summary(),
        "align": rep.as_dict(),
        "skipped_files": rep.as_dict()["skipped_files"],
        "results": rows,
    }
    return finish(result, embedder, t0, f"AR protocol {proto.number} — {trunk.name}", cmc=cmc_curves,
                  probes=shown)
