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
from pdsn_cli.eval.benchmark import CommonOptions, check_outputs, finish, occlude_chips, parse_occlusions, stages
from pdsn_cli.data.chip_cache import ChipCache, default_cache_dir
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, JobFailed
from pdsn_cli.data.faces import FaceItem
from pdsn_cli.trunks.features import embed_features, extract_features
from pdsn_cli.data.h5util import open_for_writing
from pdsn_cli.data.lfw import CENTRED_FACE

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

    def __len__(self) -> int:
        return self.feats.shape[0]

    def read(self, a: int, b: int) -> np.ndarray:
        return self.feats[a:b].astype(np.float32)

    @classmethod
    def build(cls, cache: ChipCache, sources: list[str], trunk, point: str, flip: bool, batch_size: int, device,
              key: str, cache_dir: Path | None, progress=None) -> DistractorFeatures:
        folder = Path(cache_dir or default_cache_dir()) / "features"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"distractors-{key}.h5"
        if path.is_file():
            return cls(path)
        shape = trunk.feature_shape(point)
        shape = (2, *shape) if flip else shape
        step = 1024
        with atomic_output(path) as tmp:
            with open_for_writing(tmp) as f:
                ds = f.create_dataset("features", (len(sources), *shape), np.float16,
                                      chunks=(min(64, max(1, len(sources))), *shape))
                for a in range(0, len(sources), step):
                    chips = cache.load(sources[a:a + step])
                    ds[a:a + len(chips)] = extract_features(trunk, chips.image, point, batch_size, device, flip=flip)
                    if progress:
                        progress(min(a + step, len(sources)), len(sources))
        return cls(path)


class MaskedGallery:
    """The gallery seen by probes sharing one FDM: the real distractors embedded under that FDM, then synthetic
    ones drawn from the same FDM's embedding distribution. Rows are produced on demand, chunk by chunk."""

    def __init__(self, store: DistractorFeatures, n_real: int, trunk, point: str, mask, synthetic: int,
                 model: str, seed: int, device, fit_rows: int = 50_000):
        self.store, self.trunk, self.point, self.mask, self.device = store, trunk, point, mask, device
        self.n_real = n_real
        self.synthetic = synthetic
        self.dim = trunk.embedding_dim
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
        return embed_features(self.trunk, self.store.read(a, b), self.point, self.mask, device=self.device)

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
        from pdsn_cli.eval.search import threshold_at_far

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


def score_group(tally: Tally, probes: ProbeSide, idx: np.ndarray, e_probe: np.ndarray, gallery, trunk, point,
                mask, device, chunk_rows: int | None = None) -> None:
    """Search one group of probes (sharing one FDM) and count its trials."""
    from pdsn_cli.eval.search import topk

    res = topk(e_probe, gallery, tally.ranks, sizes=tally.sizes, histogram_bins=HIST_BINS, chunk_rows=chunk_rows,
               device=device)
    tally.hist = res.hist if tally.hist is None else tally.hist + res.hist
    labels = probes.chips.label[idx]
    for c in np.unique(labels):
        sel = np.flatnonzero(labels == c)
        imgs = probes.by_id[c]
        e_gal = embed_features(trunk, probes.feats[imgs], point, mask, device=device)
        g = e_probe[sel] @ e_gal.T
        valid = idx[sel][:, None] != imgs[None, :]
        tally.add(res.scores[:, sel, :], g, valid)


# ---- the run ------------------------------------------------------------------------------------------------
def run_identification(cfg: IdentificationConfig, progress=None) -> dict:
    from pdsn_cli.data import megaface as mf

    t0 = time.perf_counter()
    device = resolve_device(cfg.gpu)
    if cfg.synthetic_model not in ("gaussian", "uniform"):
        raise BadInputError(f"--synthetic-model must be gaussian or uniform, got {cfg.synthetic_model!r}")
    if cfg.synthetic_distractors < 0:
        raise BadInputError("--synthetic-distractors must be ≥ 0")
    if not 1 <= cfg.ranks <= 100:
        raise BadInputError(f"--ranks must be in 1..100, got {cfg.ranks}")
    models = cfg.load_models(device)
    trunk, point, dictionary = models.trunk, models.point, models.dictionary
    variants = parse_occlusions(cfg.occlusions, models.grid)
    check_outputs(report=cfg.report)
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

    key = hashlib.sha1("|".join([str(dcache.dir), trunk.name, str(cfg.weights), point, str(cfg.flip),
                                 trunk.template] + dist_sources).encode()).hexdigest()[:16]
    store = DistractorFeatures.build(dcache, dist_sources, trunk, point, cfg.flip, cfg.batch_size, device, key,
                                     cfg.cache_dir, stage("distractor features"))
    by_id = [np.flatnonzero(pchips.label == c) for c in range(len(pchips.identity))]
    probes = ProbeSide(pchips, extract_features(trunk, pchips.image, point, cfg.batch_size, device, flip=cfg.flip,
                                                progress=stage("probe features")), by_id)
    if not np.isfinite(probes.feats).all():
        raise JobFailed(f"trunk {trunk.name} gives non-finite features (NaN/inf); check --weights")

    def gallery(mask):
        # masked galleries embed through the dictionary's fine-tuned head when it has one
        t = trunk if mask is None else models.masked_trunk
        return MaskedGallery(store, len(dist_sources), t, point, mask, n_syn, cfg.synthetic_model, cfg.seed, device)

    rows, cmc_curves, shown = [], {}, {}
    all_idx = np.arange(len(pchips))
    for vi, variant in enumerate(variants):
        occ_chips, occ = occlude_chips(pchips, all_idx, variant, models.grid, cfg.seed)
        f_occ = probes.feats if variant == "none" else extract_features(
            trunk, occ_chips, point, cfg.batch_size, device, flip=cfg.flip, progress=stage(f"{variant} features"))
        shown[variant] = occ_chips[:: max(1, len(occ_chips) // 8)][:8]
        base = Tally(sizes, cfg.ranks)
        score_group(base, probes, all_idx, embed_features(trunk, f_occ, point, device=device), gallery(None),
                    trunk, point, None, device)
        results = {"baseline": (base, {})}
        if dictionary is not None:
            blocks = models.occluded_blocks(occ_chips, occ, cfg.block_threshold).reshape(len(all_idx), -1)
            combos, which = np.unique(blocks, axis=0, return_inverse=True)
            which = which.ravel()
            tally, empty = Tally(sizes, cfg.ranks), 0
            for ci, combo in enumerate(combos):
                idx = np.flatnonzero(which == ci)
                mask, e = dictionary.masks_for(combo[None], flip=cfg.flip)
                mask = mask[0]
                empty += e * len(idx)
                e_p = embed_features(models.masked_trunk, f_occ[idx], point, mask, device=device)
                score_group(tally, probes, idx, e_p, gallery(mask), models.masked_trunk, point, mask, device)
                if progress:
                    progress(f"{variant}: PDSN masks", ci + 1, len(combos))
            results["pdsn"] = (tally, {"occlusion_source": cfg.occlusion_source, "distinct_fdms": len(combos),
                                       "blocks_marked": float(blocks.mean()), "all_discarded_fallbacks": empty})
        for method, (t, extra) in results.items():
            r = t.result()
            rows.append({"method": method, "occlusion": variant, **r, **extra})
            cmc_curves[f"{method} / {variant}"] = {"sizes": sizes, "rank1": [r["rank1"][str(n)] for n in sizes],
                                                   "ranks": list(range(1, cfg.ranks + 1)),
                                                   "cmc_at_largest": r["cmc_at_largest"]}
        if progress:
            progress("occlusions", vi + 1, len(variants))
    _add_recovery(rows, str(sizes[-1]))
    exported = None
    if cfg.export_devkit is not None:
        exported = export_devkit(cfg, probes, pchips, store, dist_sources, trunk, point, device, variants,
                                 models.grid, lists)
    result = {
        "dataset": cfg.dataset,
        **models.header(),
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
    return finish(result, models, cfg.report, t0, f"{cfg.dataset} — {trunk.name}", cmc=cmc_curves, probes=shown)


def _add_recovery(rows: list[dict], largest: str) -> None:
    """recovery of rank-1 at the largest gallery: (PDSN − baseline_occ) / (baseline_clean − baseline_occ)."""
    clean = next((r["rank1"][largest] for r in rows if r["method"] == "baseline" and r["occlusion"] == "none"), None)
    if clean is None:
        return
    base = {r["occlusion"]: r["rank1"][largest] for r in rows if r["method"] == "baseline"}
    for r in rows:
        if r["method"] == "pdsn" and r["occlusion"] != "none":
            lost = clean - base[r["occlusion"]]
            r["recovery"] = float((r["rank1"][largest] - base[r["occlusion"]]) / lost) if lost > 1e-9 else None


def export_devkit(cfg, probes, pchips, store, dist_sources, trunk, point, device, variants, grid, lists):
    """Baseline features in the devkit's layout, one folder per occlusion variant (probes) plus the clean
    distractors, and the template lists they answer to. PDSN cannot be expressed there: its gallery depends on the
    probe's FDM, and the official scorer compares one fixed vector per image."""
    from pdsn_cli.data import megaface as mf

    out = Path(cfg.export_devkit)
    suffix = mf.devkit_suffix(trunk.name)
    g = MaskedGallery(store, len(dist_sources), trunk, point, None, 0, "gaussian", cfg.seed, device)
    n = 0
    for a in range(0, len(dist_sources), 4096):
        e = g.read(a, min(a + 4096, len(dist_sources)))
        n += mf.export_features(out / "megaface", dist_sources[a:a + len(e)], e, suffix)
    for variant in variants:
        occ_chips, _ = occlude_chips(pchips, np.arange(len(pchips)), variant, grid, cfg.seed)
        f = probes.feats if variant == "none" else extract_features(trunk, occ_chips, point, cfg.batch_size, device,
                                                                    flip=cfg.flip)
        n += mf.export_features(out / f"facescrub-{variant.replace(':', '')}", pchips.source,
                                embed_features(trunk, f, point, device=device), suffix)
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


def run_ar(cfg: ArConfig, progress=None) -> dict:
    """Rank-1 (and CMC) per probe kind of an AR protocol, baseline vs PDSN.

    PDSN needs each probe's occluded blocks. ``detector``: the trained occlusion detector reads them from the
    photo. ``oracle``: AR has no pixel masks, so the blocks are those the toolkit's own occluder of the probe's
    kind (sunglasses, scarf) covers when placed on that probe's landmarks — the kind is known, the shape is not.
    """
    from pdsn_cli.data import ar
    from pdsn_cli.occlusion.occluders import occlude

    t0 = time.perf_counter()
    device = resolve_device(cfg.gpu)
    if cfg.data_dir is None:
        raise BadInputError("--dataset ar needs --data-dir (the folder holding the AR images)")
    if not 1 <= cfg.ranks <= 100:
        raise BadInputError(f"--ranks must be in 1..100, got {cfg.ranks}")
    models = cfg.load_models(device)
    trunk, point, dictionary = models.trunk, models.point, models.dictionary
    check_outputs(report=cfg.report)
    stage = stages(progress)
    images = ar.scan(cfg.data_dir)
    proto = ar.protocol(images, cfg.protocol)
    chips, rep = ChipCache(cfg.data_dir, trunk.template, cfg.cache_dir).ensure_and_load(
        ar.ar_items(proto), workers=cfg.workers, progress=stage("align"), what="the AR protocol's images")
    pos = chips.index_of_source()
    feats = extract_features(trunk, chips.image, point, cfg.batch_size, device, flip=cfg.flip,
                             progress=stage("features"))
    if not np.isfinite(feats).all():
        raise JobFailed(f"trunk {trunk.name} gives non-finite features (NaN/inf); check --weights")
    subject = np.array([chips.identity[c] for c in chips.label])
    g_idx = np.array([pos[im.path] for im in proto.gallery if im.path in pos])
    rows, shown, cmc_curves = [], {}, {}
    for kind, probes in proto.probes.items():
        p_idx = np.array([pos[im.path] for im in probes if im.path in pos])
        if len(p_idx) == 0:
            continue
        shown[kind] = chips.image[p_idx[:8]]
        results = {"baseline": closed_set_ranks(
            embed_features(trunk, feats[p_idx], point, device=device),
            embed_features(trunk, feats[g_idx], point, device=device), subject[g_idx], subject[p_idx], cfg.ranks)}
        extra = {}
        if dictionary is not None:
            occ = np.zeros((len(p_idx), models.grid, models.grid), np.float32)
            if models.detector is None:
                for n, i in enumerate(p_idx):
                    occ[n] = occlude(chips.image[i], chips.landmarks[i], kind, np.random.default_rng([cfg.seed, n]),
                                     grid=models.grid).blocks
            blocks = models.occluded_blocks(chips.image[p_idx], occ, cfg.block_threshold).reshape(len(p_idx), -1)
            combos, which = np.unique(blocks, axis=0, return_inverse=True)
            which = which.ravel()
            hits = np.zeros(cfg.ranks, np.int64)
            for ci, combo in enumerate(combos):
                sel = p_idx[which == ci]
                mask = dictionary.masks_for(combo[None], flip=cfg.flip)[0][0]
                mt = models.masked_trunk
                hits += closed_set_ranks(embed_features(mt, feats[sel], point, mask, device=device),
                                         embed_features(mt, feats[g_idx], point, mask, device=device),
                                         subject[g_idx], subject[sel], cfg.ranks)
            results["pdsn"] = hits
            extra = {"occlusion_source": cfg.occlusion_source, "distinct_fdms": len(combos),
                     "blocks_marked": float(blocks.mean())}
        for method, hits in results.items():
            cmc = hits / len(p_idx)
            rows.append({"method": method, "occlusion": kind, "rank1": float(cmc[0]),
                         "cmc": [float(v) for v in cmc], "probes": int(len(p_idx)),
                         **(extra if method == "pdsn" else {})})
            cmc_curves[f"{method} / {kind}"] = {"sizes": [len(np.unique(subject[g_idx]))], "rank1": [float(cmc[0])],
                                                "ranks": list(range(1, cfg.ranks + 1)),
                                                "cmc_at_largest": [float(v) for v in cmc]}
    result = {
        "dataset": f"ar protocol {proto.number}",
        **models.header(),
        "protocol": proto.summary(),
        "align": rep.as_dict(),
        "skipped_files": rep.as_dict()["skipped_files"],
        "results": rows,
    }
    return finish(result, models, cfg.report, t0, f"AR protocol {proto.number} — {trunk.name}", cmc=cmc_curves,
                  probes=shown)
