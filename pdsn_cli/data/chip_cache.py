"""Aligned chips for a dataset, computed once and cached.

Real photos: the cache is a folder of HDF5 shards (``chips_h5`` schema), one per batch of newly aligned images,
each written atomically, so an interrupted alignment resumes from the last finished shard and a later run
with more images only aligns the new ones. Files that cannot be decoded are remembered (``skipped.json``) and
reported again without being re-read. The built-in synthetic faces have known landmarks and are aligned in
memory (no cache needed: generating and warping them is faster than reading them back).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli.align.aligner import FaceAligner, align_with_points, get_template
from pdsn_cli.atomic import atomic_output
from pdsn_cli.data.chips_h5 import ALIGNED_DETECTED, ALIGNED_FALLBACK, ALIGNED_KNOWN, Chips, ChipsWriter
from pdsn_cli.errors import BadInputError
from pdsn_cli.data.h5util import read_rows
from pdsn_cli.data.faces import BadImage, FaceItem, Skipped, list_identity_folder, read_image
from pdsn_cli.data.h5util import open_for_writing

SHARD_SIZE = 512


def default_cache_dir() -> Path:
    return Path(os.environ.get("PDSN_CACHE", Path.home() / ".cache" / "pdsn"))


@dataclass
class AlignReport:
    images: int = 0
    aligned_now: int = 0
    from_cache: int = 0
    fallbacks: int = 0
    several_faces: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "aligned_now": self.aligned_now,
            "from_cache": self.from_cache,
            "fallback_crops": self.fallbacks,
            "skipped": len(self.skipped),
            "skipped_files": [s.as_dict() for s in self.skipped],
        }


# ---- worker side (one FaceAligner per process) -------------------------------------------------------------
_ALIGNER: FaceAligner | None = None


def _init_worker(max_centre_offset: float | None = None) -> None:
    global _ALIGNER
    import cv2

    cv2.setNumThreads(1)
    _ALIGNER = FaceAligner(max_centre_offset=max_centre_offset)


def _align_file(args):
    root, rel, template, disk, landmarks = args
    try:
        image = read_image(Path(root) / disk)
    except BadImage as e:
        return rel, None, str(e)
    arc5, dlib5, dlib68, detected, faces = _ALIGNER.find_points(image)
    chip, lm = align_with_points(image, arc5, dlib5, template, dlib68 if landmarks == 68 else None)
    return rel, (chip, lm, ALIGNED_DETECTED if detected else ALIGNED_FALLBACK, faces), None


# ---- the cache ---------------------------------------------------------------------------------------------
class ChipCache:
    def __init__(self, data_root: Path, template: str, cache_dir: Path | None = None,
                 centred: float | None = None, landmarks: int = 5):
        """``centred``: the subject is centred by construction (LFW): faces farther than this fraction of the
        shorter side from the centre are not taken (see ``FaceAligner``); such chips are cached apart.
        ``landmarks=68``: dlib templates are fitted on the 68-point model's landmarks (dlib's original chip for
        its ResNet descriptor) instead of the 5-point model's; cached apart too."""
        if landmarks not in (5, 68):
            raise BadInputError(f"--landmarks must be 5 or 68, got {landmarks}")
        self.root = Path(data_root).resolve()
        self.template = get_template(template)
        self.centred = centred
        self.landmarks = landmarks
        key = hashlib.sha1(str(self.root).encode("utf-8", "surrogateescape")).hexdigest()[:10]
        name = template if centred is None else f"{template}-centred{centred:g}"
        if landmarks == 68 and self.template.dst68 is not None:
            name += "-lm68"
        self.dir = (cache_dir or default_cache_dir()) / "chips" / f"{self.root.name}-{key}" / name
        self.dir.mkdir(parents=True, exist_ok=True)

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("chips-*.h5"))

    def index(self) -> dict[str, tuple[Path, int]]:
        idx: dict[str, tuple[Path, int]] = {}
        for shard in self.shards():
            with h5py.File(shard, "r") as f:
                for i, s in enumerate(f["source"].asstr()[()]):
                    idx[s] = (shard, i)
        return idx

    def _bad(self) -> dict[str, str]:
        p = self.dir / "skipped.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def _save_bad(self, bad: dict[str, str]) -> None:
        with atomic_output(self.dir / "skipped.json") as tmp:
            tmp.write_text(json.dumps(bad, indent=0, sort_keys=True))

    def ensure(self, items: list[FaceItem], workers: int = 1, progress=None) -> AlignReport:
        """Align every item not cached yet; returns what happened (the cache then holds all decodable items)."""
        rep = AlignReport(images=len(items))
        idx = self.index()
        bad = self._bad()
        todo = [it for it in items if it.path not in idx and it.path not in bad]
        rep.from_cache = sum(1 for it in items if it.path in idx)
        rep.skipped = [Skipped(it.path, bad[it.path]) for it in items if it.path in bad]
        if progress:
            progress(rep.from_cache + len(rep.skipped), len(items))
        if not todo:
            return rep
        n0 = len(self.shards())
        ident = {it.path: it.identity for it in items}
        jobs = [(str(self.root), it.path, self.template.name, it.file or it.path, self.landmarks) for it in todo]
        pool = None
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(self.centred,))
            results = pool.imap(_align_file, jobs, chunksize=8)
        else:
            _init_worker(self.centred)
            results = map(_align_file, jobs)
        try:
            buf: list = []
            done = rep.from_cache + len(rep.skipped)
            for rel, res, reason in results:
                done += 1
                if res is None:
                    bad[rel] = reason
                    rep.skipped.append(Skipped(rel, reason))
                else:
                    buf.append((rel, res))
                    rep.aligned_now += 1
                    rep.fallbacks += res[2] == ALIGNED_FALLBACK
                    rep.several_faces += res[3] > 1
                if len(buf) >= SHARD_SIZE:
                    self._write_shard(n0, buf, ident)
                    n0 += 1
                    buf = []
                    self._save_bad(bad)
                if progress:
                    progress(done, len(items))
            if buf:
                self._write_shard(n0, buf, ident)
            self._save_bad(bad)
        finally:
            if pool is not None:
                pool.terminate()
        return rep

    def _write_shard(self, n: int, buf, ident) -> None:
        h, w = self.template.size
        with atomic_output(self.dir / f"chips-{n:05d}.h5") as tmp:
            with open_for_writing(tmp) as f:
                wr = ChipsWriter(f, self.template.name, (h, w), str(self.root), synthetic=False)
                wr.add(
                    [r[0] for _, r in buf],
                    [r[1] for _, r in buf],
                    [ident[rel] for rel, _ in buf],
                    [rel for rel, _ in buf],
                    [r[2] for _, r in buf],
                )
                wr.close()

    def ensure_and_load(self, items: list[FaceItem], skipped: list[Skipped] = (), workers: int = 1,
                        progress=None, what: str = "the images") -> tuple[Chips, AlignReport]:
        """Align what is missing, then load every readable item in order; ``skipped`` (found while listing)
        is reported with the files that failed to decode."""
        rep = self.ensure(items, workers=workers, progress=progress)
        rep.skipped = list(skipped) + rep.skipped
        bad = {s.path for s in rep.skipped}
        good = [it.path for it in items if it.path not in bad]
        if not good:
            raise BadInputError(f"none of {what} could be read")
        return self.load(good), rep

    def load(self, sources: list[str]) -> Chips:
        """Chips for ``sources`` (all cached), in that order; labels index the identities in order of appearance."""
        idx = self.index()
        h, w = self.template.size
        image = np.empty((len(sources), h, w, 3), np.uint8)
        landmarks = np.empty((len(sources), 5, 2), np.float32)
        aligned_by = np.empty(len(sources), np.uint8)
        ids = np.empty(len(sources), object)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for out_i, s in enumerate(sources):
            shard, row = idx[s]
            by_shard.setdefault(shard, []).append((out_i, row))
        for shard, pairs in by_shard.items():
            with h5py.File(shard, "r") as f:
                ident_names = f["identity"].asstr()[()]
                labels = f["label"][()]
                # h5py reads strictly increasing rows: read each row once, then fan out (a source may repeat)
                rows, back = np.unique(np.array([r for _, r in pairs]), return_inverse=True)
                outs = np.array([o for o, _ in pairs])
                image[outs] = read_rows(f["image"], rows)[back]
                landmarks[outs] = f["landmarks"][rows][back]
                aligned_by[outs] = f["aligned_by"][rows][back]
                ids[outs] = ident_names[labels[rows]][back]
        return chips_from_arrays(image, landmarks, list(ids), list(sources), aligned_by, self.template.name, False)


def chips_from_arrays(image, landmarks, identities, sources, aligned_by, template, synthetic) -> Chips:
    names: list[str] = []
    lut: dict[str, int] = {}
    label = np.empty(len(identities), np.int64)
    for i, name in enumerate(identities):
        if name not in lut:
            lut[name] = len(names)
            names.append(name)
        label[i] = lut[name]
    return Chips(image, landmarks, label, names, list(sources), np.asarray(aligned_by, np.uint8), template, synthetic)


# ---- one entry point for every command ---------------------------------------------------------------------
@dataclass
class DataSpec:
    """Where faces come from: a folder (``root``) or, when ``root`` is None, the built-in synthetic set."""

    root: Path | None = None
    synthetic_identities: int = 60
    synthetic_images: int = 10
    synthetic_seed: int = 0

    @property
    def synthetic(self) -> bool:
        return self.root is None

    def describe(self) -> str:
        if self.synthetic:
            return (f"built-in SYNTHETIC faces ({self.synthetic_identities} identities × "
                    f"{self.synthetic_images} images, seed {self.synthetic_seed})")
        return str(self.root)


def select_items(items: list[FaceItem], limit: int | None, seed: int) -> list[FaceItem]:
    """``--limit N``: a seeded sample of N images (sorted back into dataset order)."""
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        raise BadInputError(f"--limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def load_chips(
    spec: DataSpec,
    template: str,
    identities: set[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 1,
    cache_dir: Path | None = None,
    progress=None,
) -> tuple[Chips, AlignReport]:
    get_template(template)
    if limit is not None and limit <= 0:
        raise BadInputError(f"--limit must be positive, got {limit}")
    if spec.synthetic:
        return _synthetic_chips(spec, template, identities, limit, seed, progress)
    items, skipped = list_identity_folder(spec.root, identities)
    items = select_items(items, limit, seed)
    if not items:
        raise BadInputError(f"no images found under {spec.root}" + (" for the given identities" if identities else ""))
    return ChipCache(spec.root, template, cache_dir).ensure_and_load(
        items, skipped, workers, progress, what=f"the {len(items)} images under {spec.root}")


def _synthetic_chips(spec: DataSpec, template, identities, limit, seed, progress):
    from pdsn_cli.data.synthetic import synthetic_faces

    faces = list(synthetic_faces(spec.synthetic_identities, spec.synthetic_images, seed=spec.synthetic_seed))
    if identities is not None:
        faces = [f for f in faces if f.identity in identities]
    if limit is not None and limit < len(faces):
        keep = np.sort(np.random.default_rng(seed).choice(len(faces), size=limit, replace=False))
        faces = [faces[i] for i in keep]
    if not faces:
        raise BadInputError("no synthetic faces selected (check --identities)")
    chips, lms = [], []
    for i, f in enumerate(faces):
        c, lm = align_with_points(f.image, f.landmarks, f.dlib5, template)
        chips.append(c)
        lms.append(lm)
        if progress:
            progress(i + 1, len(faces))
    rep = AlignReport(images=len(faces), aligned_now=len(faces))
    return chips_from_arrays(
        np.stack(chips), np.stack(lms), [f.identity for f in faces], [f.source for f in faces],
        np.full(len(faces), ALIGNED_KNOWN), template, True,
    ), rep


def export_chips(spec: DataSpec, template: str, out: Path, identities=None, limit=None, seed=0, workers=1,
                 progress=None) -> dict:
    """Write the aligned chips of a dataset to one chips HDF5 file (atomically)."""
    from pdsn_cli.atomic import check_writable

    check_writable(out)
    chips, rep = load_chips(spec, template, identities, limit, seed, workers, progress=progress)
    with atomic_output(out) as tmp:
        with open_for_writing(tmp) as f:
            wr = ChipsWriter(f, template, chips.image.shape[1:3], spec.describe(), spec.synthetic)
            for a in range(0, len(chips), 1024):
                s = slice(a, a + 1024)
                wr.add(chips.image[s], chips.landmarks[s], [chips.identity[i] for i in chips.label[s]],
                       chips.source[s], chips.aligned_by[s])
            wr.close()
    return {"out": str(out), "data": spec.describe(), "template": template, "images": len(chips),
            "identities": len(chips.identity), "align": rep.as_dict()}
