"""make-pairs: the pairs HDF5 schema, mask/pixel agreement, determinism, --append/--resume, atomic writes,
bad inputs and skipped files (engine and command line)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import assert_same_datasets, needs_dlib, write_schema1
from pdsn_cli.data import pairs_h5
from pdsn_cli.align.templates import get_template
from pdsn_cli.atomic import interrupt_between_steps, partial_path
from pdsn_cli.data.chip_cache import DataSpec
from pdsn_cli.cli.app import app
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs
from pdsn_cli.occlusion.occluders import block_occupancy

REPO = Path(__file__).resolve().parents[1]


def _cfg(out, ids=4, imgs=3, **kw) -> MakePairsConfig:
    kw.setdefault("template", "arc112x96")
    return MakePairsConfig(out=Path(out), data=DataSpec(None, ids, imgs), **kw)


@pytest.fixture(scope="module")
def random_pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mp") / "random.h5"
    make_pairs(_cfg(out, occluder="random", per_image=3, seed=5))
    return out


# ---- schema ---------------------------------------------------------------------------------------------------
def test_schema_round_trip(block_pairs):
    p = pairs_h5.read_pairs(block_pairs)
    n = 4 * 3 * 25
    assert len(p) == n
    assert p.clean.shape == p.occluded.shape == (n, 112, 96, 3) and p.clean.dtype == np.uint8
    assert p.mask.shape == (n, 112, 96) and p.mask.dtype == bool
    assert p.blocks.shape == (n, 5, 5) and p.blocks.dtype == np.float32
    assert p.landmarks.shape == (n, 5, 2) and p.target.dtype == np.int16
    assert p.attrs["pdsn_kind"] == "pairs" and p.attrs["complete"]
    assert (p.attrs["grid"], p.attrs["template"], p.attrs["height"], p.attrs["width"]) == (5, "arc112x96", 112, 96)
    assert p.attrs["occluder"] == "block" and p.attrs["synthetic"]
    assert p.identity == [f"synthetic_{i:04d}" for i in range(4)]
    # each row's label names the identity its source came from
    assert all(src.startswith(f"synthetic://{p.identity[lab]}/") for src, lab in zip(p.source, p.label))
    assert set(p.kind) == {"block"}
    # synthetic landmarks are known: after alignment they sit on the arc112x96 template (within pose residuals)
    assert np.abs(p.landmarks - get_template("arc112x96").dst).max() < 12
    with h5py.File(block_pairs, "r") as f:
        # schema 2: each clean chip once, rows name it and their draw key; occluded chips and masks are not stored
        assert f.attrs["pdsn_schema"] == 2 and not f.attrs["store_occluded"]
        assert f["chips"].shape == (12, 112, 96, 3) and f["chip"].shape == (n,)
        assert "occluded" not in f and "mask" not in f and "clean" not in f
        assert np.array_equal(f["chips"][()][f["chip"][()]], p.clean)
        assert np.array_equal(f["draw"][()], np.repeat(np.arange(12), 25)) and (f["seed"][()] == 0).all()
    # row selection and the image-less read agree with the full read
    sub = pairs_h5.read_pairs(block_pairs, select=[7, 3])
    assert np.array_equal(sub.occluded, p.occluded[[3, 7]]) and sub.source == [p.source[3], p.source[7]]
    meta = pairs_h5.read_pairs(block_pairs, images=False)
    assert np.array_equal(meta.blocks, p.blocks) and pairs_h5.num_pairs(block_pairs) == n


@pytest.mark.parametrize("which", ["block_pairs", "random_pairs"])
def test_masks_are_exactly_the_changed_pixels(which, request):
    p = pairs_h5.read_pairs(request.getfixturevalue(which))
    changed = (p.clean != p.occluded).any(axis=-1)
    assert not (changed & ~p.mask).any(), "pixels changed outside the occlusion mask"
    for i in range(len(p)):
        assert np.array_equal(p.blocks[i], block_occupancy(p.mask[i], 5))
        if p.kind[i] != "eyeglasses":  # see-through lenses may leave a pixel as it was
            assert p.mask[i].any()
            # inside the mask every pixel is replaced; a replacement equal to the face is a rare coincidence
            assert changed[i][p.mask[i]].mean() > 0.98, (i, p.kind[i])


def test_random_occluder_draws_several_kinds(random_pairs):
    p = pairs_h5.read_pairs(random_pairs)
    assert len(p) == 4 * 3 * 3 and (p.target == -1).all()
    assert len(set(p.kind)) >= 4 and "random" not in p.kind


def test_block_all_targets_every_block_once_per_image(block_pairs):
    p = pairs_h5.read_pairs(block_pairs, images=False)
    flat = p.blocks.reshape(len(p), -1)
    assert (flat.argmax(1) == p.target).all()
    assert np.array_equal(flat, np.eye(25, dtype=np.float32)[p.target])  # a block occluder fills its block only
    for src in set(p.source):
        rows = [i for i, s in enumerate(p.source) if s == src]
        assert sorted(p.target[rows]) == list(range(25))


# ---- regeneration: the occluded chips read back are the ones make-pairs drew ----------------------------------
@pytest.mark.parametrize("occluder", ["block", "random"])
def test_regenerated_rows_equal_the_stored_ones(occluder, tmp_path):
    kw = dict(block="all") if occluder == "block" else dict(occluder="random", per_image=3, seed=5)
    drawn, stored = tmp_path / "drawn.h5", tmp_path / "stored.h5"
    make_pairs(_cfg(drawn, **kw))
    make_pairs(_cfg(stored, store_occluded=True, **kw))  # the chips make-pairs drew, kept as they were drawn
    with h5py.File(stored, "r") as f:
        assert f["occluded"].shape[0] == f["chip"].shape[0] and f["mask"].shape[2] == 12  # bit-packed along W
    a, b = pairs_h5.read_pairs(drawn), pairs_h5.read_pairs(stored)
    for name in ("clean", "occluded", "mask", "blocks", "landmarks", "label", "target"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.source == b.source and a.kind == b.kind
    # and one row drawn here, by the driver's seeding rule, from nothing but the row's key
    from pdsn_cli.occlusion.driver import OcclusionVariant, draw
    i = len(a) - 7
    with h5py.File(drawn, "r") as f:
        seed, n, t = int(f["seed"][i]), int(f["draw"][i]), int(f["target"][i])
    o = draw(a.clean[i], a.landmarks[i], OcclusionVariant(occluder, None if t < 0 else t), seed, n, 5)
    assert np.array_equal(o.image, b.occluded[i]) and np.array_equal(o.mask, b.mask[i])


def test_streamed_batches_equal_the_whole_read(random_pairs):
    whole = pairs_h5.read_pairs(random_pairs)
    with pairs_h5.PairsFile(random_pairs) as pf:
        got = list(pf.batches(np.arange(3, 30), batch=8, masks=True))
        assert [len(b) for b in got] == [8, 8, 8, 3]
        assert np.array_equal(np.concatenate([b.rows for b in got]), np.arange(3, 30))
        for name in ("clean", "occluded", "mask", "blocks"):
            assert np.array_equal(np.concatenate([getattr(b, name) for b in got]), getattr(whole, name)[3:30])
        assert pf.n_chips == 12 and np.array_equal(pf.chips(pf.chip_index), whole.clean)
        lazy = pairs_h5.LazyRows(pf, [5, 2, 9], "occluded")
        assert np.array_equal(lazy[1:], whole.occluded[[2, 9]]) and lazy.shape == (3, 112, 96, 3)
    only = pairs_h5.read_pairs(random_pairs, select=[4, 1], masks=False, clean=False)
    assert only.clean.shape == (2, 0) and np.array_equal(only.occluded, whole.occluded[[1, 4]])


def test_a_changed_occluder_is_caught_not_returned(random_pairs, tmp_path):
    out = tmp_path / "tampered.h5"
    shutil.copyfile(random_pairs, out)
    with h5py.File(out, "r+") as f:
        f["checksum"][5] = f["checksum"][5] ^ 1  # as if this version drew row 5 differently
    pairs_h5.read_pairs(out, select=[4, 6])  # other rows still read
    with pytest.raises(SchemaError, match="row 5.*differs"):
        pairs_h5.read_pairs(out, select=[5])


def test_schema_1_files_still_read_and_refuse_appends(random_pairs, tmp_path):
    old = tmp_path / "old.h5"
    write_schema1(random_pairs, old)
    a, b = pairs_h5.read_pairs(old), pairs_h5.read_pairs(random_pairs)
    for name in ("clean", "occluded", "mask", "blocks", "landmarks", "label", "target"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.source == b.source and a.kind == b.kind and a.identity == b.identity
    with pairs_h5.PairsFile(old) as pf1, pairs_h5.PairsFile(random_pairs) as pf2:
        assert pf1.schema == 1 and pf1.n_chips == pf2.n_chips
        assert np.array_equal(pf1.chip_index, pf2.chip_index) and pf1.chip_source == pf2.chip_source
        assert np.array_equal(pf1.chips(np.arange(pf1.n_chips)), pf2.chips(np.arange(pf2.n_chips)))
    before = old.read_bytes()
    with pytest.raises(SchemaError, match="schema-1 pairs file") as e:
        make_pairs(_cfg(old, occluder="random", per_image=3, seed=5, append=True))
    assert "\n" not in str(e.value) and old.read_bytes() == before
    with h5py.File(old, "r+") as f:
        f.attrs["pdsn_schema"] = 3
    with pytest.raises(SchemaError, match="schema 3, this version reads schemas 1 and 2"):
        pairs_h5.read_pairs(old)


def test_append_keeps_its_layout(block_pairs, tmp_path):
    out = tmp_path / "grow.h5"
    shutil.copyfile(block_pairs, out)
    with pytest.raises(SchemaError, match="--store-occluded"):
        make_pairs(_cfg(out, block="all", append=True, store_occluded=True))
    make_pairs(_cfg(out, block="all", seed=4, append=True))
    with h5py.File(out, "r") as f:  # the same 12 images: their chips are not stored twice
        assert f["chips"].shape[0] == 12 and f["chip"].shape[0] == 600
        assert np.array_equal(f["seed"][300:], np.full(300, 4))


# ---- determinism ----------------------------------------------------------------------------------------------
def test_same_seed_same_file_for_any_worker_count(block_pairs, tmp_path):
    for workers in (1, 2):  # 300 rows = 2 chunks, so 2 workers really split the work
        out = tmp_path / f"w{workers}.h5"
        res = make_pairs(_cfg(out, block="all", workers=workers))
        assert res["pairs_written"] == 300
        assert_same_datasets(out, block_pairs)
    other = tmp_path / "seed1.h5"
    make_pairs(_cfg(other, block="all", seed=1))
    a, b = pairs_h5.read_pairs(block_pairs), pairs_h5.read_pairs(other)
    assert np.array_equal(a.clean, b.clean) and not np.array_equal(a.occluded, b.occluded)


# ---- --append -------------------------------------------------------------------------------------------------
def test_append_adds_rows(block_pairs, tmp_path):
    out = tmp_path / "grow.h5"
    shutil.copyfile(block_pairs, out)
    res = make_pairs(_cfg(out, ids=5, imgs=1, block="all", seed=3, append=True))
    assert res["pairs_written"] == 125 and res["pairs_in_file"] == 425
    assert res["identities_in_file"] == 5  # one new identity, four known ones reuse their labels
    grown, base = pairs_h5.read_pairs(out), pairs_h5.read_pairs(block_pairs)
    assert np.array_equal(grown.occluded[:300], base.occluded) and grown.source[:300] == base.source
    assert grown.attrs["complete"]
    new_ids = [grown.identity[i] for i in grown.label[300:]]
    assert new_ids == [s.split("/")[2] for s in grown.source[300:]]
    assert not partial_path(out).exists()




def test_interrupted_append_leaves_the_original_and_reruns_cleanly(block_pairs, tmp_path):
    out = tmp_path / "grow.h5"
    shutil.copyfile(block_pairs, out)

    def stop_after_one_chunk(done, total):
        if done >= 256:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_pairs(_cfg(out, block="all", append=True), progress=stop_after_one_chunk)
    assert out.read_bytes() == block_pairs.read_bytes()  # the original is untouched until the append commits
    assert not partial_path(out).exists()  # nothing half-appended is kept: rerunning the append is the resume
    make_pairs(_cfg(out, block="all", append=True))
    grown, base = pairs_h5.read_pairs(out), pairs_h5.read_pairs(block_pairs)
    assert len(grown) == 600
    # same data and seed: the appended rows repeat the original ones
    assert np.array_equal(grown.occluded[:300], base.occluded) and np.array_equal(grown.occluded[300:], base.occluded)


def test_append_refuses_a_foreign_schema(block_pairs, tmp_path):
    grid4 = tmp_path / "grid4.h5"
    make_pairs(_cfg(grid4, ids=1, imgs=2, occluder="sunglasses", grid=4))
    before = grid4.read_bytes()
    with pytest.raises(SchemaError, match="grid"):
        make_pairs(_cfg(grid4, ids=1, imgs=2, occluder="sunglasses", append=True))
    assert grid4.read_bytes() == before and not partial_path(grid4).exists()

    other_template = tmp_path / "copy.h5"
    shutil.copyfile(block_pairs, other_template)
    with pytest.raises(SchemaError, match="template"):
        make_pairs(_cfg(other_template, ids=1, imgs=1, occluder="sunglasses", template="dlib150", append=True))


def test_non_pairs_files_refused(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(SchemaError, match="not a pdsn pairs"):
        make_pairs(_cfg(plain, ids=1, imgs=1, occluder="scarf", append=True))
    with pytest.raises(SchemaError, match="not a pdsn pairs"):
        pairs_h5.read_pairs(plain)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(SchemaError, match="not a readable HDF5"):
        pairs_h5.read_pairs(text)
    with pytest.raises(BadInputError, match="does not exist"):
        make_pairs(_cfg(tmp_path / "none.h5", ids=1, imgs=1, occluder="scarf", append=True))


# ---- interruption: SIGKILL leaves nothing under the final name, SIGINT exits 130; --resume finishes ---------
# 14,400 pairs: 57 chunks of 256 rows, a few seconds of drawing (rows are ~150 bytes: the file grows slowly)
KILL_IDS, KILL_IMGS, KILL_PER_IMAGE = 12, 3, 16


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    make_pairs(_cfg(out, ids=KILL_IDS, imgs=KILL_IMGS, block="all", per_image=KILL_PER_IMAGE))
    return out


def _cli_args(out: Path) -> list[str]:
    return ["make-pairs", "--block", "all", "--template", "arc112x96", "--synthetic-identities", str(KILL_IDS),
            "--synthetic-images", str(KILL_IMGS), "--per-image", str(KILL_PER_IMAGE), "--out", str(out), "--quiet"]


def _start_and_stop_midway(out: Path, sig: int, full_size: int) -> subprocess.CompletedProcess:
    """Run make-pairs in a subprocess and send ``sig`` once it has written its first chunk of rows
    (``full_size``: the size of the complete file)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps it ignored
    proc = subprocess.Popen([sys.executable, "-m", "pdsn_cli", *_cli_args(out)], cwd=out.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tmp = partial_path(out)
    deadline = time.monotonic() + 60
    # the chips and the first chunks of every row dataset take ~77% of the file at once; past 83% several
    # chunks of rows are written, and most are still to come
    while not (tmp.exists() and tmp.stat().st_size > 0.83 * full_size):
        assert proc.poll() is None, f"make-pairs ended before it could be interrupted: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "make-pairs did not start writing within 60 s"
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigkill_leaves_no_final_file_and_resume_completes(uninterrupted, tmp_path):
    out = tmp_path / "killed.h5"
    res = _start_and_stop_midway(out, signal.SIGKILL, uninterrupted.stat().st_size)
    assert res.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run left a file under the final name"
    assert partial_path(out).exists()
    with pytest.raises(SchemaError, match="incomplete"):
        pairs_h5.read_pairs(partial_path(out))
    r = CliRunner().invoke(app, [*_cli_args(out), "--resume", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["resumed_from"] > 0 and summary["resumed_from"] % 256 == 0
    assert summary["pairs_in_file"] == KILL_IDS * KILL_IMGS * KILL_PER_IMAGE * 25
    assert_same_datasets(out, uninterrupted)
    assert not partial_path(out).exists()


def test_sigint_exits_130_with_a_resume_hint(uninterrupted, tmp_path):
    out = tmp_path / "interrupted.h5"
    res = _start_and_stop_midway(out, signal.SIGINT, uninterrupted.stat().st_size)
    assert res.returncode == 130, res.stderr
    assert "--resume" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and partial_path(out).exists()
    # resuming with other options is refused rather than mixing two runs in one file
    with pytest.raises(SchemaError, match="seed"):
        make_pairs(_cfg(out, ids=KILL_IDS, imgs=KILL_IMGS, block="all", per_image=KILL_PER_IMAGE, seed=9,
                        resume=True))
    res = make_pairs(_cfg(out, ids=KILL_IDS, imgs=KILL_IMGS, block="all", per_image=KILL_PER_IMAGE, resume=True))
    assert res["resumed_from"] > 0
    assert_same_datasets(out, uninterrupted)


def test_sigint_is_acted_on_between_steps_only():
    # Python drops a KeyboardInterrupt raised inside a weakref callback (h5py runs many): the write loops
    # therefore only note Ctrl-C and stop at the next chunk boundary
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupt_between_steps() as check:
            check()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler has run by now and raised nothing
            with pytest.raises(KeyboardInterrupt):
                check()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


# ---- command line: bad arguments and skipped files ----------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--block", "25"], "outside the 5×5 grid"),
    (["--occluder", "umbrella"], "unknown occluder"),
    (["--grid", "0"], "--grid 0"),
    (["--block", "all", "--grid", "0"], "--grid"),
    (["--occluder", "scarf", "--block", "3"], "not both"),
    (["--per-image", "0"], "--per-image"),
    (["--out", "{tmp}/missing/pairs.h5"], "output folder does not exist"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(args, message, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("PDSN_WORK", str(work))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(work / "pairs.h5")]
    r = CliRunner().invoke(app, ["make-pairs", "--synthetic-identities", "2", "--synthetic-images", "1", *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert r.stdout == ""
    assert list(work.iterdir()) == [] and not (tmp_path / "missing").exists()


@needs_dlib
def test_bad_files_in_an_identity_folder_are_skipped_and_listed(face_folder, tmp_path):
    root = tmp_path / "people"
    shutil.copytree(face_folder, root)
    person = sorted(p for p in root.iterdir())[0]
    good = sorted(person.iterdir())[0]
    (person / "empty.jpg").write_bytes(b"")
    (person / "letter.jpg").write_text("Dear Sir,\n" * 30)
    (person / "cut.jpg").write_bytes(good.read_bytes()[:2000])
    (person / "README.txt").write_text("not a face")
    with open(os.fsencode(person) + b"/na\xefve.jpg", "wb") as fh:  # a valid photo with a non-UTF-8 name
        fh.write(good.read_bytes())
    n_good = sum(1 for _ in face_folder.glob("*/*.jpg")) + 1
    out, js = tmp_path / "pairs.h5", tmp_path / "r.json"
    r = CliRunner().invoke(app, ["make-pairs", "--data-dir", str(root), "--occluder", "sunglasses", "--template",
                                 "arc112x96", "--out", str(out), "--json", str(js), "--quiet"])
    assert r.exit_code == 3, r.output
    res = json.loads(js.read_text())
    skipped = {s["path"].split("/", 1)[1]: s["reason"] for s in res["align"]["skipped_files"]}
    assert skipped.keys() == {"empty.jpg", "letter.jpg", "cut.jpg", "README.txt"}
    assert "empty" in skipped["empty.jpg"] and "not an image" in skipped["letter.jpg"]
    assert "truncated" in skipped["cut.jpg"] and "extension" in skipped["README.txt"]
    assert "skipped files" in r.stdout and "cut.jpg" in r.stdout
    p = pairs_h5.read_pairs(out)
    assert len(p) == res["images"] == n_good
    assert f"{person.name}/na\\xefve.jpg" in p.source
    assert not p.attrs["synthetic"] and p.attrs["data_root"] == str(root)


def test_several_face_sets_keep_their_people_apart(face_folder, tmp_path):
    """Two --data-dir sets (here the same people under two folder names): identities and sources are SET/…, an
    --identities file filters the set its SET/IDENTITY lines name and leaves the other whole."""
    import shutil

    from pdsn_cli.data.chip_cache import DataSpec, set_names
    from pdsn_cli.data.pairs_h5 import PairsFile

    other = tmp_path / "more"
    shutil.copytree(face_folder, other)
    people = sorted(p.name for p in face_folder.iterdir())
    ids = tmp_path / "ids.txt"
    ids.write_text(f"people/{people[0]}\npeople/{people[1]}\n")
    out = tmp_path / "two.h5"
    res = make_pairs(MakePairsConfig(out=out, data=[DataSpec(face_folder), DataSpec(other)], occluder="scarf",
                                     template="arc112x96", identities=ids))
    assert set_names([DataSpec(face_folder), DataSpec(other)]) == ["people", "more"]
    assert res["identities"] == 2 + len(people) and res["images"] == 2 * 3 + 3 * len(people)
    assert " + " in res["data"]
    with PairsFile(out) as pf:
        names = set(pf.identity)
        assert names == {f"people/{people[0]}", f"people/{people[1]}"} | {f"more/{p}" for p in people}
        assert all(s.split("/")[0] in ("people", "more") for s in pf.chip_source)


_LAZY = None


def _read_lazy(index):
    return _LAZY[index]


def test_lazy_chips_read_what_loading_reads(face_folder, tmp_path):
    """make-pairs leaves the chips in the cache's shards (StoredImages): every way of indexing them, in this process
    and in a forked one, and two sets joined, gives the pixels an in-memory load gives."""
    import multiprocessing as mp
    import pickle
    import shutil

    from pdsn_cli.data.chip_cache import DataSpec, load_chips, load_face_sets
    from pdsn_cli.data.chips_h5 import StoredImages

    eager, _ = load_chips(DataSpec(face_folder), "arc112x96")
    lazy, _ = load_chips(DataSpec(face_folder), "arc112x96", lazy=True)
    assert isinstance(lazy.image, StoredImages) and lazy.image.shape == eager.image.shape
    n = len(eager)
    assert np.array_equal(lazy.image[3], eager.image[3]) and np.array_equal(lazy.image[-1], eager.image[-1])
    pick = np.array([n - 1, 0, 2, 2, 1])  # unsorted, repeated
    mask = np.arange(n) % 2 == 0
    for index in (slice(None), slice(1, n, 2), pick, mask):
        assert np.array_equal(lazy.image[index], eager.image[index])
    assert np.array_equal(np.asarray(lazy.image), eager.image)
    assert np.array_equal(lazy.landmarks, eager.landmarks) and lazy.source == eager.source
    with pytest.raises(IndexError):
        lazy.image[n]
    global _LAZY
    _LAZY = lazy.image
    lazy.image[0]  # a file open here when forking: the child opens its own (make-pairs' workers)
    with mp.get_context("fork").Pool(1) as pool:
        assert np.array_equal(pool.apply(_read_lazy, (pick,)), eager.image[pick])
    assert np.array_equal(pickle.loads(pickle.dumps(lazy.image))[pick], eager.image[pick])  # spawned workers

    other = tmp_path / "more"
    shutil.copytree(face_folder, other)
    both, _ = load_face_sets([DataSpec(face_folder), DataSpec(other)], "arc112x96", lazy=True)
    assert isinstance(both.image, StoredImages) and len(both.image.paths) >= 2
    assert np.array_equal(both.image[:], np.concatenate([eager.image, eager.image]))
