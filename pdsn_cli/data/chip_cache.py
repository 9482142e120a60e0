"""Aligned chips for a dataset, computed once and cached.

Real photos: the cache is a folder of HDF5 shards (``chips_h5`` schema), one per batch of newly aligned images,
each written under a temp name unique to its writer and published by an atomic rename, so an interrupted
alignment keeps what it aligned (a part-filled batch is flushed on Ctrl-C), a later run with more images only
aligns the new ones, and runs sharing one cache never overwrite each other's shards. Every entry is stamped
with its source file's identity (size, mtime_ns, inode) and used only while the file still has it: a photo
replaced at the same path is aligned again. Files that cannot be decoded are remembered (``skipped-*.json``,
stamped the same way) and reported again without being re-read until they change. The built-in synthetic faces
have known landmarks and are aligned in memory (no cache needed: generating and warping them is faster than
reading them back).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from pdsn_cli.align.aligner import FaceAligner, resolve_face_detector
from pdsn_cli.align.batch_align import DETECTED, UNREADABLE, BatchAligner
from pdsn_cli.align.templates import align_with_points, get_template
from pdsn_cli.atomic import atomic_output, check_writable, interrupt_between_steps
from pdsn_cli.data.chips_h5 import ALIGNED_DETECTED, ALIGNED_FALLBACK, ALIGNED_KNOWN, Chips, ChipsWriter, StoredImages
from pdsn_cli.data.faces import (TRANSIENT_REASONS, BadImage, FaceItem, Skipped, list_identity_folder,
                                  max_decode_bytes, read_image)
from pdsn_cli.data.h5util import open_for_writing, read_rows
from pdsn_cli.data.landmark_files import GivenLandmarks
from pdsn_cli.data.synthetic import identity_name, synthetic_faces
from pdsn_cli.errors import BadInputError

SHARD_SIZE = 512
#: shard dataset holding each entry's source stamp (size, mtime_ns, inode, given-landmarks digest; 0: detected);
#: absent in shards of older versions, 3 columns (no digest) in shards written before landmark files were read
STAMP = "source_stamp"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PDSN_CACHE", Path.home() / ".cache" / "pdsn"))


def source_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What identifies a file's content without reading it: size, modification time (ns) and inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


@dataclass(frozen=True)
class CacheEntry:
    shard: Path
    row: int
    stamp: tuple[int, ...] | None  # None: a shard written before entries were stamped
    shard_mtime_ns: int

    def fresh(self, st: os.stat_result | None, given: int | None = 0) -> bool:
        """Whether this entry still describes the file whose current stat is ``st``, aligned from the given
        landmarks of digest ``given`` (0: detected; None: whatever it was aligned from)."""
        if st is None:
            return False
        if self.stamp is None:  # unstamped: valid while the file has not changed since the shard was written
            return given in (0, None) and max(st.st_mtime_ns, st.st_ctime_ns) <= self.shard_mtime_ns
        digest = self.stamp[3] if len(self.stamp) > 3 else 0
        return self.stamp[:3] == source_stamp(st) and given in (digest, None)


@dataclass
class AlignReport:
    images: int = 0
    aligned_now: int = 0
    from_cache: int = 0
    fallbacks: int = 0
    several_faces: int = 0
    from_landmark_files: int = 0  # aligned now from the dataset's own landmarks or boxes, not detected
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # shown by the CLI, a result's "warnings"

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "aligned_now": self.aligned_now,
            "from_cache": self.from_cache,
            "fallback_crops": self.fallbacks,
            "from_landmark_files": self.from_landmark_files,
            "skipped": len(self.skipped),
            "skipped_files": [s.as_dict() for s in self.skipped],
        }


# ---- worker side (one FaceAligner per process) -------------------------------------------------------------
_ALIGNER: FaceAligner | None = None


def _init_worker(max_centre_offset: float | None = None) -> None:
    global _ALIGNER
    cv2.setNumThreads(1)
    _ALIGNER = FaceAligner(max_centre_offset=max_centre_offset)


def _init_pool_worker(max_centre_offset: float | None = None) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool and keeps what it received; a worker
    # dying of KeyboardInterrupt instead would leave its task unanswered and the parent waiting forever
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the ported CNN detector runs in torch: one thread per worker process (the workers are the parallelism;
    # OpenMP threads of several workers on the same cores stall each other)
    torch.set_num_threads(1)
    _init_worker(max_centre_offset)


def _align_file(args):
    root, rel, template, disk, landmarks, given = args
    try:
        image = read_image(Path(root) / disk)
    except BadImage as e:
        return rel, None, str(e)
    try:
        if given is not None:
            arc5, dlib5, dlib68 = _ALIGNER.given_points(image, given)
            how, faces = ALIGNED_KNOWN, 1
        else:
            arc5, dlib5, dlib68, detected, faces = _ALIGNER.find_points(image)
            how = ALIGNED_DETECTED if detected else ALIGNED_FALLBACK
        chip, lm = align_with_points(image, arc5, dlib5, template, dlib68 if landmarks == 68 else None)
    except MemoryError:
        h, w = image.shape[:2]
        return rel, None, f"out of memory while aligning ({w}×{h})"
    return rel, (chip, lm, how, faces), None


# ---- the cache ---------------------------------------------------------------------------------------------
class ChipCache:
    def __init__(self, data_root: Path, template: str, cache_dir: Path | None = None,
                 centred: float | None = None, landmarks: int = 5, align_device=None):
        """``centred``: the subject is centred by construction (LFW): faces farther than this fraction of the
        shorter side from the centre are not taken (see ``FaceAligner``); such chips are cached apart.
        ``landmarks=68``: dlib templates are fitted on the 68-point model's landmarks (dlib's original chip for
        its ResNet descriptor) instead of the 5-point model's; cached apart too. ``align_device`` (a torch device, e.g. ``cuda:0``): photos
        are aligned there in batches (``align.batch_align``) when the face detector is the ported CNN (dlib's HOG
        runs on the CPU only)."""
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
        #: which detector finds the faces (``--face-detector``): chips of another detector are cached apart
        self.face_detector = resolve_face_detector()
        self.align_device = align_device if self.face_detector == "cnn" else None
        self._device_declined = align_device is not None and self.align_device is None
        if self.face_detector != "dlib-hog":
            name += f"-{self.face_detector}"
        self.dir = (cache_dir or default_cache_dir()) / "chips" / f"{self.root.name}-{key}" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        #: source → the entry ``ensure`` found fresh, which ``load`` then reads
        self._resolved: dict[str, CacheEntry] = {}

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("chips-*.h5"))

    def entries(self) -> dict[str, list[CacheEntry]]:
        """Every cached chip of every readable shard, by source (a source re-aligned after a change has several)."""
        found: dict[str, list[CacheEntry]] = {}
        for shard in self.shards():
            try:
                mtime_ns = shard.stat().st_mtime_ns
                with h5py.File(shard, "r") as f:
                    sources = f["source"].asstr()[()]
                    stamps = f[STAMP][()].tolist() if STAMP in f else [None] * len(sources)
            except (OSError, KeyError):  # removed by `cache clear` meanwhile, or damaged: not a cache hit
                continue
            for i, (s, stamp) in enumerate(zip(sources, stamps)):
                found.setdefault(s, []).append(CacheEntry(shard, i, stamp and tuple(stamp), mtime_ns))
        return found

    def _bad(self) -> dict[str, dict[tuple | None, str]]:
        """Files that failed to decode: source → {stamp when it failed: reason} (legacy ``skipped.json``: no stamp,
        so they are tried again)."""
        bad: dict[str, dict[tuple | None, str]] = {}
        for p in sorted(self.dir.glob("skipped*.json")):
            try:
                saved = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            for rel, v in saved.items():
                stamp, reason = (tuple(v["stamp"]), v["reason"]) if isinstance(v, dict) else (None, v)
                bad.setdefault(rel, {})[stamp] = reason
        return bad

    def _save_bad(self, found: dict[str, tuple[tuple, str]], token: str) -> None:
        if not found:
            return
        with atomic_output(self.dir / f"skipped-{token}.json", shared=True) as tmp:
            tmp.write_text(json.dumps({rel: {"reason": r, "stamp": list(st)} for rel, (st, r) in found.items()},
                                      indent=0, sort_keys=True))

    def ensure(self, items: list[FaceItem], workers: int = 1, progress=None) -> AlignReport:
        """Align every item not cached yet (or changed since); returns what happened (the cache then holds all
        decodable items). On Ctrl-C the images aligned so far are written to the cache before it propagates."""
        rep = AlignReport(images=len(items))
        max_decode_bytes()  # a bad PDSN_MAX_IMAGE_MB is refused here, not as a skip reason of every image
        entries = self.entries()
        bad = self._bad()
        known = GivenLandmarks(self.root)
        given = {it.path: known.get(it.path, it.file) for it in items}
        todo, stamps = [], {}
        for it in items:
            st = stat_or_none(self.root / (it.file or it.path))
            digest = given[it.path].digest() if given[it.path] is not None else 0
            hit = next((e for e in reversed(entries.get(it.path, ())) if e.fresh(st, digest)), None)
            if hit is not None:
                self._resolved[it.path] = hit
                rep.from_cache += 1
            elif st is not None and source_stamp(st) in bad.get(it.path, {}):
                rep.skipped.append(Skipped(it.path, bad[it.path][source_stamp(st)]))
            else:
                todo.append(it)
                stamps[it.path] = (*source_stamp(st), digest) if st is not None else (-1, -1, -1, digest)
        if progress:
            progress(rep.from_cache + len(rep.skipped), len(items))
        if not todo:
            return rep
        if self._device_declined:
            rep.warnings.append(f"--gpu: the {self.face_detector} detector runs on the CPU; "
                                "`pdsn --face-detector cnn …` aligns on the GPU")
        token = f"{os.getpid()}-{secrets.token_hex(4)}"  # this run's shards never collide with another run's
        shard_no = 0
        ident = {it.path: it.identity for it in items}
        jobs = [(str(self.root), it.path, self.template.name, it.file or it.path, self.landmarks, given[it.path])
                for it in todo]
        pool = None
        if self.align_device is not None:
            results = self._aligned_on_device(jobs)
        elif workers > 1:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_pool_worker, initargs=(self.centred,))
            results = pool.imap(_align_file, jobs, chunksize=8)
        else:
            _init_worker(self.centred)
            results = map(_align_file, jobs)
        buf: list = []
        found_bad: dict[str, tuple[tuple, str]] = {}

        def flush() -> None:
            nonlocal buf, shard_no
            with interrupt_between_steps() as check:  # a second Ctrl-C waits for the shard to be written
                if buf:
                    self._write_shard(f"{shard_no:05d}-{token}", buf, ident, stamps)
                    shard_no += 1
                    buf = []
                self._save_bad(found_bad, token)
            check()

        try:
            done = rep.from_cache + len(rep.skipped)
            for rel, res, reason in results:
                done += 1
                if res is None:
                    if not reason.startswith(TRANSIENT_REASONS):  # a later run with more memory may succeed
                        found_bad[rel] = (stamps[rel][:3], reason)
                    rep.skipped.append(Skipped(rel, reason))
                else:
                    buf.append((rel, res))
                    rep.aligned_now += 1
                    rep.fallbacks += res[2] == ALIGNED_FALLBACK
                    rep.from_landmark_files += res[2] == ALIGNED_KNOWN
                    rep.several_faces += res[3] > 1
                if len(buf) >= SHARD_SIZE:
                    flush()
                if progress:
                    progress(done, len(items))
        except KeyboardInterrupt:
            flush()
            raise
        finally:
            if pool is not None:
                pool.terminate()
        flush()
        return rep

    def _aligned_on_device(self, jobs, batch: int = 256):
        """``_align_file``'s results, the detected photos aligned in batches on ``align_device``; photos with the
        dataset's own landmarks go the per-photo way (no detection to batch)."""
        _init_worker(self.centred)
        aligner = BatchAligner(self.align_device, self.template.name, self.landmarks, max_centre_offset=self.centred)
        detect = [j for j in jobs if j[5] is None]
        yield from map(_align_file, (j for j in jobs if j[5] is not None))
        for a in range(0, len(detect), batch):
            chunk = detect[a:a + batch]
            out = aligner.align_files([Path(root) / disk for root, _, _, disk, _, _ in chunk])
            chips = out.chips.cpu().numpy()
            for i, job in enumerate(chunk):
                if out.status[i] == UNREADABLE:
                    yield job[1], None, out.reasons[i]
                else:
                    how = ALIGNED_DETECTED if out.status[i] == DETECTED else ALIGNED_FALLBACK
                    yield job[1], (chips[i], out.landmarks[i], how, out.faces[i]), None

    def _write_shard(self, name: str, buf, ident, stamps) -> None:
        h, w = self.template.size
        final = self.dir / f"chips-{name}.h5"
        with atomic_output(final, shared=True) as tmp:
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
                f.create_dataset(STAMP, data=np.array([stamps[rel] for rel, _ in buf], np.int64).reshape(-1, 4))
        mtime_ns = final.stat().st_mtime_ns
        for i, (rel, _) in enumerate(buf):
            self._resolved[rel] = CacheEntry(final, i, tuple(stamps[rel]), mtime_ns)

    def ensure_and_load(self, items: list[FaceItem], skipped: list[Skipped] = (), workers: int = 1,
                        progress=None, what: str = "the images", lazy: bool = False) -> tuple[Chips, AlignReport]:
        """Align what is missing, then load every readable item in order (``lazy``: see ``load``); ``skipped``
        (found while listing) is reported with the files that failed to decode."""
        rep = self.ensure(items, workers=workers, progress=progress)
        rep.skipped = list(skipped) + rep.skipped
        bad = {s.path for s in rep.skipped}
        good = [it.path for it in items if it.path not in bad]
        if not good:
            raise BadInputError(f"none of {what} could be read")
        return self.load(good, lazy), rep

    def _lookup(self, sources: list[str]) -> dict[str, CacheEntry]:
        """The entry to read for each source: the one ``ensure`` chose, else the newest fresh one, else the newest."""
        missing = [s for s in dict.fromkeys(sources) if s not in self._resolved]
        if not missing:
            return self._resolved
        entries = self.entries()
        found = dict(self._resolved)
        for s in missing:
            st = stat_or_none(self.root / s)
            cands = entries[s]
            found[s] = next((e for e in reversed(cands) if e.fresh(st, None)), cands[-1])
        return found

    def content_key(self, sources: list[str]) -> str:
        """A digest of which cached chip each source resolves to (shard and row): it changes when a photo was
        replaced and aligned again, so caches derived from these chips (trunk features) never outlive them."""
        idx = self._lookup(sources)
        return hashlib.sha1("|".join(f"{s}:{idx[s].shard.name}:{idx[s].row}" for s in sources).encode()).hexdigest()

    def load(self, sources: list[str], lazy: bool = False) -> Chips:
        """Chips for ``sources`` (all cached), in that order; labels index the identities in order of appearance.
        ``lazy``: the images stay in the cache's shards (``StoredImages``), read when indexed."""
        idx = self._lookup(sources)
        h, w = self.template.size
        image = None if lazy else np.empty((len(sources), h, w, 3), np.uint8)
        landmarks = np.empty((len(sources), 5, 2), np.float32)
        aligned_by = np.empty(len(sources), np.uint8)
        ids = np.empty(len(sources), object)
        shard_of, row_of = np.empty(len(sources), np.int32), np.empty(len(sources), np.int64)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for out_i, s in enumerate(sources):
            e = idx[s]
            by_shard.setdefault(e.shard, []).append((out_i, e.row))
        for k, (shard, pairs) in enumerate(by_shard.items()):
            with h5py.File(shard, "r") as f:
                ident_names = f["identity"].asstr()[()]
                labels = f["label"][()]
                # h5py reads strictly increasing rows: read each row once, then fan out (a source may repeat)
                rows, back = np.unique(np.array([r for _, r in pairs]), return_inverse=True)
                outs = np.array([o for o, _ in pairs])
                if lazy:
                    shard_of[outs], row_of[outs] = k, rows[back]
                else:
                    image[outs] = read_rows(f["image"], rows)[back]
                landmarks[outs] = f["landmarks"][rows][back]
                aligned_by[outs] = f["aligned_by"][rows][back]
                ids[outs] = ident_names[labels[rows]][back]
        if lazy:
            image = StoredImages(list(by_shard), shard_of, row_of, (h, w, 3))
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
    align_device=None,
    lazy: bool = False,
) -> tuple[Chips, AlignReport]:
    """The chips of a face set, aligned now where the cache has none; ``lazy``: images read when indexed
    (``StoredImages``; the built-in synthetic set is always in memory)."""
    get_template(template)
    if limit is not None and limit <= 0:
        raise BadInputError(f"--limit must be positive, got {limit}")
    if spec.synthetic:
        chips, rep = _synthetic_chips(spec, template, identities, limit, seed, progress)
        rep.warnings += missing_identities_warning(
            identities, {identity_name(i) for i in range(spec.synthetic_identities)})
        return chips, rep
    items, skipped = list_identity_folder(spec.root, identities)
    found = {item.identity for item in items}
    items = select_items(items, limit, seed)
    if not items:
        raise BadInputError(f"no images found under {spec.root}" + (" for the given identities" if identities else ""))
    chips, rep = ChipCache(spec.root, template, cache_dir, align_device=align_device).ensure_and_load(
        items, skipped, workers, progress, what=f"the {len(items)} images under {spec.root}", lazy=lazy)
    rep.warnings += missing_identities_warning(identities, found)
    return chips, rep


def set_names(specs: list[DataSpec]) -> list[str]:
    """The name of each face set: its folder's name (numbered when two are alike; ``synthetic`` for the built-in)."""
    names: list[str] = []
    for k, spec in enumerate(specs):
        name = "synthetic" if spec.synthetic else Path(spec.root).name
        names.append(name if name not in names else f"{name}-{k}")
    return names


def load_face_sets(specs: list[DataSpec], template: str, identities: set[str] | None = None, limit: int | None = None,
                   seed: int = 0, workers: int = 1, cache_dir: Path | None = None,
                   progress=None, lazy: bool = False) -> tuple[Chips, AlignReport]:
    """``load_chips`` over several face sets, as one set whose people stay apart: with more than one set, every
    identity is ``<set>/<identity>`` (and every source ``<set>/<source>``). ``identities`` then filters the sets its
    ``<set>/<identity>`` lines name; a set no line names is used whole. ``limit``: per set."""
    if len(specs) == 1:
        return load_chips(specs[0], template, identities, limit, seed, workers, cache_dir, progress, lazy=lazy)
    parts, total = [], AlignReport()
    for tag, spec in zip(set_names(specs), specs):
        mine = None if identities is None else {n[len(tag) + 1:] for n in identities if n.startswith(tag + "/")}
        chips, rep = load_chips(spec, template, mine or None, limit, seed, workers, cache_dir, progress, lazy=lazy)
        parts.append((tag, chips))
        for name in ("images", "aligned_now", "from_cache", "fallbacks", "several_faces", "from_landmark_files"):
            setattr(total, name, getattr(total, name) + getattr(rep, name))
        total.skipped += rep.skipped
        total.warnings += [f"{tag}: {w}" for w in rep.warnings]
    images = [c.image for _, c in parts]
    return chips_from_arrays(
        StoredImages.concat(images) if all(isinstance(i, StoredImages) for i in images)
        else np.concatenate([np.asarray(i) for i in images]), np.concatenate([c.landmarks for _, c in parts]),
        [f"{tag}/{c.identity[k]}" for tag, c in parts for k in c.label],
        [f"{tag}/{src}" for tag, c in parts for src in c.source],
        np.concatenate([c.aligned_by for _, c in parts]), template, all(c.synthetic for _, c in parts)), total


def missing_identities_warning(identities: set[str] | None, found: set[str], shown: int = 10) -> list[str]:
    """``--identities`` names with no image in the data (a typo, another dataset's list): worth a warning."""
    missing = sorted((identities or set()) - found)
    if not missing:
        return []
    names = ", ".join(missing[:shown]) + (f", … ({len(missing) - shown} more)" if len(missing) > shown else "")
    return [f"--identities: {len(missing)} of {len(identities)} names have no image in the data: {names}"]


def _synthetic_chips(spec: DataSpec, template, identities, limit, seed, progress):
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
                 progress=None, align_device=None) -> dict:
    """Write the aligned chips of a dataset to one chips HDF5 file (atomically)."""
    check_writable(out)
    # lazy: chips are copied from the cache's shards 1,024 at a time, not all held in memory
    chips, rep = load_chips(spec, template, identities, limit, seed, workers, progress=progress,
                            align_device=align_device, lazy=True)
    with atomic_output(out) as tmp:
        with open_for_writing(tmp) as f:
            wr = ChipsWriter(f, template, chips.image.shape[1:3], spec.describe(), spec.synthetic)
            for a in range(0, len(chips), 1024):
                s = slice(a, a + 1024)
                wr.add(chips.image[s], chips.landmarks[s], [chips.identity[i] for i in chips.label[s]],
                       chips.source[s], chips.aligned_by[s])
            wr.close()
    return {"out": str(out), "data": spec.describe(), "template": template, "images": len(chips),
            "identities": len(chips.identity), "align": rep.as_dict(), "warnings": rep.warnings}
