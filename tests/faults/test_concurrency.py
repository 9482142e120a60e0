"""Two runs at once never corrupt each other: a second writer of one output is refused in one line naming the
first one's PID (a lock left by a dead process is taken over), and runs sharing one chip cache both keep all
their aligned work. Each case is run 20 times with two processes released together by a barrier."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import h5py
import numpy as np
import pytest

from pdsn_cli.atomic import atomic_output, lock_path, output_lock
from pdsn_cli.data import chip_cache
from pdsn_cli.data.chip_cache import ChipCache
from pdsn_cli.errors import BadInputError

from .test_cache import TEMPLATE, FixedPoints, folder

REPEAT = 20
ROWS = 6
FORK = mp.get_context("fork")  # the children inherit the test's monkeypatches and start in milliseconds


def both_at_once(target, *args) -> list[str]:
    """Run ``target(barrier, i, *args)`` in two processes released together; returns what each reported."""
    barrier, results = FORK.Barrier(2), FORK.Queue()

    def child(i):
        try:
            results.put((i, target(barrier, i, *args)))
        except BaseException:
            results.put((i, "TRACEBACK " + traceback.format_exc()))

    procs = [FORK.Process(target=child, args=(i,)) for i in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [got[0], got[1]]


def write_rows(barrier, i, out) -> str:
    barrier.wait()
    try:
        with atomic_output(out) as tmp:
            with h5py.File(tmp, "w") as f:
                rows = f.create_dataset("writer", (0,), np.int64, maxshape=(None,), chunks=(1,))
                for _ in range(ROWS):
                    rows.resize(len(rows) + 1, axis=0)
                    rows[-1] = i
                    f.flush()
                    time.sleep(0.002)
    except BadInputError as e:
        return f"refused {e}"
    return f"ok {os.getpid()}"


def test_two_writers_of_one_output(tmp_path):
    for rep in range(REPEAT):
        out = tmp_path / f"out{rep}.h5"
        results = both_at_once(write_rows, out)
        assert not any(r.startswith("TRACEBACK") for r in results), results
        assert any(r.startswith("ok") for r in results)
        for r in results:
            if r.startswith("refused"):
                holder = next(x for x in results if x.startswith("ok")).split()[1]
                assert f"already being written by PID {holder}" in r and "\n" not in r
        with h5py.File(out, "r") as f:  # one writer's rows, all of them
            rows = f["writer"][()]
        assert len(rows) == ROWS and len(set(rows.tolist())) == 1
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(out.name)) == [out.name]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out.txt"
    dead = FORK.Process(target=lambda: None)
    dead.start()
    dead.join()
    lock_path(out).write_text(f"{dead.pid}\n")  # what a killed writer leaves behind
    with atomic_output(out) as tmp:
        tmp.write_text("done")
    assert out.read_text() == "done" and not lock_path(out).exists()


def test_a_live_lock_is_refused_with_the_holders_pid_and_its_partial_kept(tmp_path):
    out = tmp_path / "out.txt"
    with output_lock(out):
        (tmp_path / "out.txt.partial").write_text("the holder's work")
        with pytest.raises(BadInputError, match=f"already being written by PID {os.getpid()}"):
            with atomic_output(out) as tmp:
                tmp.write_text("mine")
        assert (tmp_path / "out.txt.partial").read_text() == "the holder's work"
    assert not out.exists()


def align_share(barrier, i, root, cache, items) -> str:
    barrier.wait()
    rep = ChipCache(root, TEMPLATE, cache).ensure(items)
    return f"aligned {rep.aligned_now}"


def test_two_runs_sharing_one_cache_keep_all_their_work(tmp_path, monkeypatch):
    monkeypatch.setattr(chip_cache, "_init_worker", lambda *a: setattr(chip_cache, "_ALIGNER", FixedPoints()))
    monkeypatch.setattr(chip_cache, "SHARD_SIZE", 2)  # several shards per run: many chances to collide
    root = tmp_path / "data"
    items = folder(root, 9)
    want = ChipCache(root, TEMPLATE, tmp_path / "reference").ensure_and_load(items)[0]
    subsets = [items[:6], items[3:]]  # two "seeds": overlapping samples of one folder
    for rep in range(REPEAT):
        cache = tmp_path / f"cache{rep}"
        results = both_at_once(lambda barrier, i: align_share(barrier, i, root, cache, subsets[i]))
        assert all(r.startswith("aligned") for r in results), results
        chips, again = ChipCache(root, TEMPLATE, cache).ensure_and_load(items)
        assert (again.from_cache, again.aligned_now) == (9, 0)  # nothing either run aligned was lost
        assert np.array_equal(chips.image, want.image) and chips.source == want.source  # no mixed rows
        assert not list(ChipCache(root, TEMPLATE, cache).dir.glob("*.partial"))
