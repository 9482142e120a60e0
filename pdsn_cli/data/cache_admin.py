"""What ``pdsn cache info|verify|clear`` does: look into, check and empty the cache folder (``PDSN_CACHE``).

Layout: ``chips/<data folder>-<key>/<template>/`` holds aligned-chip shards (``chips-*.h5``) and the records of
undecodable files (``skipped*.json``); ``features/`` holds trunk features of pairs files (``*.npz``, the
occluded chips' ones in a memory-mapped ``*.occluded.npy``) and of distractor sets (``*.h5``). Files being
written carry ``.partial``. Only files of these kinds are ever removed,
so a cache folder pointed by mistake at a folder holding other files loses none of them; a temp file whose
writer is still running is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli.atomic import lock_path
from pdsn_cli.data.chip_cache import STAMP, CacheEntry, default_cache_dir, stat_or_none
from pdsn_cli.data.chips_h5 import KIND as CHIPS_KIND
from pdsn_cli.data.chips_h5 import SCHEMA as CHIPS_SCHEMA
from pdsn_cli.errors import BadInputError

KINDS = ("chips", "features")
_CHIP_FILES = re.compile(r"^(chips-.*\.h5|skipped.*\.json)$")
_FEATURE_FILES = re.compile(r"^.*\.(npz|npy|h5)$")
#: the writer's PID in a temp name made by ``atomic.unique_partial_path``
_PARTIAL_PID = re.compile(r"\.(\d+)-[0-9a-f]+\.partial$")


def cache_info(cache_dir: Path | None = None) -> dict:
    """Sizes and counts per cache: chip folders (data root, template, shards, cached images) and features."""
    root = Path(cache_dir or default_cache_dir())
    chips = []
    for folder in _chip_folders(root):
        shards = sorted(folder.glob("chips-*.h5"))
        entries, data_root = 0, None
        for shard in shards:
            with contextlib.suppress(OSError, KeyError):
                with h5py.File(shard, "r") as f:
                    entries += len(f["source"])
                    data_root = data_root or str(f.attrs.get("data_root", ""))
        chips.append({"folder": str(folder), "data_root": data_root, "template": folder.name,
                      "shards": len(shards), "images": entries, "bytes": _bytes(folder.iterdir())})
    features = sorted(p for p in _files(root / "features") if _FEATURE_FILES.match(p.name))
    return {
        "cache_dir": str(root),
        "exists": root.is_dir(),
        "chips": {"folders": chips, "images": sum(c["images"] for c in chips), "bytes": sum(c["bytes"] for c in chips)},
        "features": {"files": len(features), "bytes": _bytes(features)},
        "bytes": sum(c["bytes"] for c in chips) + _bytes(features),
    }


def verify_cache(cache_dir: Path | None = None, remove_damaged: bool = False) -> dict:
    """Re-check every cache entry: shards open and are consistent chips files, each chip's source file still
    has the identity it was aligned from (else the entry is stale: never used again, re-aligned on demand),
    feature files open. ``remove_damaged`` deletes the damaged files (a later run recomputes them).
    ``ok`` is False when a damaged file was found."""
    root = Path(cache_dir or default_cache_dir())
    damaged: list[dict] = []
    counts = {"shards": 0, "images": 0, "fresh": 0, "stale": 0, "source_missing": 0, "feature_files": 0}
    for folder in _chip_folders(root):
        for shard in sorted(folder.glob("chips-*.h5")):
            counts["shards"] += 1
            problem, checked = _check_shard(shard)
            if problem:
                damaged.append({"path": str(shard), "problem": problem})
                continue
            for k in ("images", "fresh", "stale", "source_missing"):
                counts[k] += checked[k]
    for p in sorted(_files(root / "features")):
        if _FEATURE_FILES.match(p.name):
            counts["feature_files"] += 1
            problem = _check_features(p)
            if problem:
                damaged.append({"path": str(p), "problem": problem})
    if remove_damaged:
        for d in damaged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d["path"])
    return {"cache_dir": str(root), "ok": not damaged, **counts, "damaged": damaged,
            "removed": [d["path"] for d in damaged] if remove_damaged else []}


def clear_cache(cache_dir: Path | None = None, kinds: tuple[str, ...] = KINDS, dry_run: bool = False) -> dict:
    """Remove the cache's files of ``kinds`` ("chips", "features"); nothing else is touched, symlinks are not
    followed, and temp files of writers still running are kept. Emptied cache folders are removed."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise BadInputError(f"unknown --kind {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    root = Path(cache_dir or default_cache_dir())
    targets: list[Path] = []
    in_progress: list[str] = []
    folders: list[Path] = []
    if "chips" in kinds:
        for folder in _chip_folders(root):
            folders += [folder, folder.parent]
            _collect(folder, _CHIP_FILES, targets, in_progress)
    if "features" in kinds:
        folders.append(root / "features")
        _collect(root / "features", _FEATURE_FILES, targets, in_progress)
    size = _bytes(targets)
    if not dry_run:
        for p in targets:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for folder in folders + [root / "chips"]:
            with contextlib.suppress(OSError):  # not empty (a file of another kind, or a run writing): kept
                folder.rmdir()
    return {"cache_dir": str(root), "kinds": list(kinds), "dry_run": dry_run, "removed_files": len(targets),
            "removed_bytes": size, "kept_in_progress": in_progress}


# ---- helpers -------------------------------------------------------------------------------------------------
def _chip_folders(root: Path) -> list[Path]:
    """``chips/<data>/<template>/`` folders (real folders only: a symlink could lead out of the cache)."""
    return [t for d in _dirs(root / "chips") for t in _dirs(d)]


def _dirs(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _files(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def _bytes(paths) -> int:
    return sum(st.st_size for p in paths if (st := _lstat(p)) is not None)


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except OSError:
        return None


def _collect(folder: Path, pattern: re.Pattern, targets: list[Path], in_progress: list[str]) -> None:
    for p in _files(folder):
        if p.name.endswith(".partial"):
            (in_progress.append(str(p)) if _writer_running(p) else targets.append(p))
        elif pattern.match(p.name):
            targets.append(p)


def _writer_running(partial: Path) -> bool:
    m = _PARTIAL_PID.search(partial.name)
    if m:
        return _pid_alive(int(m.group(1)))
    final = partial.with_name(partial.name[: -len(".partial")])
    lock = lock_path(final)
    if not lock.exists():
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_shard(shard: Path) -> tuple[str | None, dict]:
    """(what is wrong with the shard or None, counts of its entries by freshness)."""
    counts = {"images": 0, "fresh": 0, "stale": 0, "source_missing": 0}
    try:
        with h5py.File(shard, "r") as f:
            if f.attrs.get("pdsn_kind") != CHIPS_KIND or int(f.attrs.get("pdsn_schema", -1)) != CHIPS_SCHEMA:
                return "not a chips shard of this version", counts
            n = len(f["source"])
            lengths = {k: len(f[k]) for k in ("image", "landmarks", "label", "aligned_by")}
            if STAMP in f:
                lengths[STAMP] = len(f[STAMP])
            if any(v != n for v in lengths.values()):
                return f"datasets of different lengths ({n} sources, {lengths})", counts
            if n and int(f["label"][()].max(initial=0)) >= len(f["identity"]):
                return "labels beyond the identity list", counts
            sources = f["source"].asstr()[()]
            stamps = f[STAMP][()] if STAMP in f else None
            data_root = Path(str(f.attrs.get("data_root", "")))
            if n:
                f["image"][n - 1]  # the last chunk is where a cut-off file fails
    except (OSError, KeyError, ValueError) as e:
        return f"unreadable: {e}", counts
    shard_mtime = shard.stat().st_mtime_ns
    for i, s in enumerate(sources):
        counts["images"] += 1
        st = stat_or_none(data_root / s)
        entry = CacheEntry(shard, i, None if stamps is None else tuple(int(v) for v in stamps[i]), shard_mtime)
        if st is None:
            counts["source_missing"] += 1
        elif entry.fresh(st, given=None):
            counts["fresh"] += 1
        else:
            counts["stale"] += 1
    return None, counts


def _check_features(path: Path) -> str | None:
    try:
        if path.suffix == ".npy":  # train-block's memory-mapped features: the header and the size must agree
            np.load(path, mmap_mode="r")
            return None
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"corrupt member {bad}" if bad else None
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return "no features dataset"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"unreadable: {e}"
    return None
