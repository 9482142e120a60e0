"""The chip cache never lies: an entry is used only while its source file keeps the identity it was aligned from
(size, mtime_ns, inode), so a photo replaced at the same path is aligned again and a repaired file is retried;
Ctrl-C during alignment keeps what was aligned; ``cache info|verify|clear`` see and handle what is there.

The detector is replaced by fixed landmarks (dlib is not needed): the chip is then a pure function of the
photo's pixels, so an old chip served for a new photo shows.
"""

from __future__ import annotations

import json
import os
import signal

import h5py
import numpy as np
import pytest
from PIL import Image

from pdsn_cli.align import aligner
from pdsn_cli.data import cache_admin, chip_cache
from pdsn_cli.data.chip_cache import STAMP, ChipCache
from pdsn_cli.data.faces import FaceItem

TEMPLATE = "arc112x96"


class FixedPoints:
    """Stands in for dlib: the landmarks of a centred face, whatever the photo."""

    calls = 0
    interrupt_at: int | None = None

    def find_points(self, image):
        FixedPoints.calls += 1
        if FixedPoints.calls == FixedPoints.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while "aligning" this image
        h, w = image.shape[:2]
        scale = np.array([w, h], np.float64)
        return aligner._CENTRED_ARC5 * scale, aligner._CENTRED_DLIB5 * scale, None, True, 1


@pytest.fixture(autouse=True)
def fixed_points(monkeypatch):
    FixedPoints.calls, FixedPoints.interrupt_at = 0, None
    monkeypatch.setattr(chip_cache, "_init_worker", lambda *a: setattr(chip_cache, "_ALIGNER", FixedPoints()))


def photo(path, seed: int, mtime_ns: int | None = None):
    """A 64×64 noise photo in PPM, whose byte size is the same for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(pixels).save(path, format="PPM")
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def folder(root, n: int = 4) -> list[FaceItem]:
    for i in range(n):
        photo(root / "p" / f"{i}.ppm", seed=i)
    return [FaceItem(f"p/{i}.ppm", "p") for i in range(n)]


def sources_of(shard) -> list[str]:
    with h5py.File(shard, "r") as f:
        return list(f["source"].asstr()[()])


def chip(root, cache_dir, rel):
    chips, rep = ChipCache(root, TEMPLATE, cache_dir).ensure_and_load([FaceItem(rel, "p")])
    return chips.image[0], rep


def test_unchanged_photos_come_from_the_cache(tmp_path, monkeypatch):
    items = folder(tmp_path / "data")
    ChipCache(tmp_path / "data", TEMPLATE, tmp_path / "cache").ensure(items)
    monkeypatch.setattr(chip_cache, "read_image", lambda p: pytest.fail(f"{p} was decoded again"))
    rep = ChipCache(tmp_path / "data", TEMPLATE, tmp_path / "cache").ensure(items)
    assert (rep.from_cache, rep.aligned_now) == (4, 0)


def test_photo_rewritten_in_place_is_aligned_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    p = photo(root / "p" / "a.ppm", seed=1, mtime_ns=1_700_000_000_000_000_000)
    old, _ = chip(root, cache, "p/a.ppm")
    inode, size = p.stat().st_ino, p.stat().st_size
    photo(p, seed=2, mtime_ns=1_700_000_000_000_000_001)  # same inode, same size, 1 ns later
    assert (p.stat().st_ino, p.stat().st_size) == (inode, size)
    new, rep = chip(root, cache, "p/a.ppm")
    assert rep.aligned_now == 1 and not np.array_equal(new, old)
    photo(tmp_path / "fresh" / "p" / "a.ppm", seed=2)
    assert np.array_equal(new, chip(tmp_path / "fresh", tmp_path / "cache2", "p/a.ppm")[0])  # the new photo's chip


def test_photo_replaced_by_another_file_with_the_same_size_and_mtime_is_aligned_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    p = photo(root / "p" / "a.ppm", seed=1, mtime_ns=1_700_000_000_000_000_000)
    old, _ = chip(root, cache, "p/a.ppm")
    other = photo(tmp_path / "other.ppm", seed=2, mtime_ns=1_700_000_000_000_000_000)
    os.replace(other, p)  # `mv`: a new inode under the old name, size and mtime as before
    new, rep = chip(root, cache, "p/a.ppm")
    assert rep.aligned_now == 1 and not np.array_equal(new, old)


def test_caches_derived_from_chips_see_a_replaced_photo(tmp_path):
    """``content_key`` (what the MegaFace distractor-feature cache is keyed by) changes when a photo is replaced
    and aligned again, and only then."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    items = folder(root)
    sources = [it.path for it in items]
    c = ChipCache(root, TEMPLATE, cache)
    c.ensure(items)
    before = c.content_key(sources)
    c2 = ChipCache(root, TEMPLATE, cache)
    c2.ensure(items)
    assert c2.content_key(sources) == before  # nothing changed: the features cache is reused
    photo(root / "p" / "2.ppm", seed=99, mtime_ns=1_800_000_000_000_000_000)
    c3 = ChipCache(root, TEMPLATE, cache)
    assert c3.ensure(items).aligned_now == 1
    assert c3.content_key(sources) != before


def test_repaired_file_is_tried_again(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    p = photo(root / "p" / "a.ppm", seed=1)
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])  # cut off
    rep = ChipCache(root, TEMPLATE, cache).ensure([FaceItem("p/a.ppm", "p")])
    assert [s.path for s in rep.skipped] == ["p/a.ppm"]
    rep = ChipCache(root, TEMPLATE, cache).ensure([FaceItem("p/a.ppm", "p")])  # still bad: not re-read
    assert len(rep.skipped) == 1 and FixedPoints.calls == 0
    p.write_bytes(good)
    rep = ChipCache(root, TEMPLATE, cache).ensure([FaceItem("p/a.ppm", "p")])
    assert (rep.aligned_now, rep.skipped) == (1, [])


def test_shards_of_older_versions_are_used_only_for_files_unchanged_since(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    items = folder(root, 3)
    cc = ChipCache(root, TEMPLATE, cache)
    cc.ensure(items)
    for shard in cc.shards():  # what a shard written before entries were stamped looks like
        with h5py.File(shard, "r+") as f:
            del f[STAMP]
    photo(root / "p" / "1.ppm", seed=9)  # changed after the shard was written
    rep = ChipCache(root, TEMPLATE, cache).ensure(items)
    assert (rep.from_cache, rep.aligned_now) == (2, 1)


def test_ctrl_c_during_alignment_keeps_the_aligned_images(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    items = folder(root, 6)
    FixedPoints.interrupt_at = 4  # images 1–3 are aligned, the 4th is interrupted (512 would fill a shard)
    with pytest.raises(KeyboardInterrupt):
        ChipCache(root, TEMPLATE, cache).ensure(items)
    FixedPoints.interrupt_at = None
    rep = ChipCache(root, TEMPLATE, cache).ensure(items)
    assert (rep.from_cache, rep.aligned_now) == (3, 3)


def test_cache_info_verify_and_clear(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    items = folder(root, 4)
    cc = ChipCache(root, TEMPLATE, cache)
    cc.ensure(items[:2])
    cc.ensure(items)  # a second shard
    (cache / "features").mkdir()
    np.savez(cache / "features" / "pairs-tiny.npz", x=np.zeros(3))

    info = cache_admin.cache_info(cache)
    assert info["chips"]["images"] == 4 and len(info["chips"]["folders"]) == 1
    assert info["chips"]["folders"][0]["shards"] == 2 and info["features"]["files"] == 1 and info["bytes"] > 0

    ok = cache_admin.verify_cache(cache)
    assert ok["ok"] and (ok["images"], ok["fresh"], ok["stale"]) == (4, 4, 0)

    photo(root / "p" / "0.ppm", seed=7)  # a changed source: its entry is stale (harmless, reported)
    first, second = sorted(cc.shards(), key=lambda shard: "p/0.ppm" not in sources_of(shard))
    second.write_bytes(second.read_bytes()[:1000])  # a damaged shard: the one holding images 2 and 3
    bad = cache_admin.verify_cache(cache, remove_damaged=True)
    assert not bad["ok"] and [d["path"] for d in bad["damaged"]] == [str(second)] and bad["stale"] == 1
    assert not second.exists() and first.exists()
    rep = ChipCache(root, TEMPLATE, cache).ensure(items)  # the lost and the stale entries are aligned again
    assert (rep.from_cache, rep.aligned_now) == (1, 3)

    keep = cache / "notes.txt"  # not a cache file: never removed
    keep.write_text("mine")
    busy = cc.dir / f"chips-00000-x.h5.{os.getpid()}-abcd1234.partial"  # a running writer's temp file
    busy.write_bytes(b"")
    dead = cc.dir / "chips-00009-y.h5.999999999-abcd1234.partial"
    dead.write_bytes(b"")
    dry = cache_admin.clear_cache(cache, dry_run=True)
    assert dry["removed_files"] > 0 and cc.shards()
    done = cache_admin.clear_cache(cache)
    assert done["removed_files"] == dry["removed_files"] and done["kept_in_progress"] == [str(busy)]
    assert keep.read_text() == "mine" and busy.exists() and not dead.exists()
    assert not cc.shards() and not (cache / "features").exists()
    assert cache_admin.cache_info(cache)["chips"]["images"] == 0


def test_cache_commands(tmp_path):
    """``pdsn cache info|verify|clear`` over the same folder: tables, ``--json``, exit 3 for damage left in place."""
    from typer.testing import CliRunner

    from pdsn_cli.cli.app import app

    root, cache = tmp_path / "data", tmp_path / "cache"
    ChipCache(root, TEMPLATE, cache).ensure(folder(root, 3))
    (cache / "features").mkdir()
    (cache / "features" / "pairs-x.npz").write_bytes(b"not a zip")  # damaged
    run = lambda *args: CliRunner().invoke(app, ["cache", *args, "--cache-dir", str(cache)])  # noqa: E731

    r = run("info", "--json", "-")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)  # stdout holds the JSON alone; the table went to stderr
    assert info["chips"]["images"] == 3 and info["features"]["files"] == 1 and "chips of" in r.stderr

    r = run("verify", "--json", "-")
    assert r.exit_code == 3 and [d["path"] for d in json.loads(r.stdout)["damaged"]] == [
        str(cache / "features" / "pairs-x.npz")]
    assert "damaged files" in r.stderr and (cache / "features" / "pairs-x.npz").exists()
    r = run("verify", "--fix", "--json", str(tmp_path / "v.json"))
    assert r.exit_code == 0, r.output
    fixed = json.loads((tmp_path / "v.json").read_text())
    assert fixed["removed"] == [str(cache / "features" / "pairs-x.npz")] and fixed["fresh"] == 3
    assert run("verify").exit_code == 0

    r = run("clear", "--kind", "nope")
    assert r.exit_code == 2 and "unknown --kind nope" in r.stderr
    r = run("clear", "--dry-run", "--kind", "chips", "--json", "-")
    assert r.exit_code == 0 and json.loads(r.stdout)["removed_files"] >= 1
    assert cache_admin.cache_info(cache)["chips"]["images"] == 3
    r = run("clear")
    assert r.exit_code == 0 and "removed" in r.stdout
    assert cache_admin.cache_info(cache)["chips"]["images"] == 0
