"""Bad images inside a dataset folder, through the command line: the run completes, exit code 3, and ``--json``
lists every bad file with its reason; images that are odd but valid (RGBA, 16-bit, grayscale, a non-UTF-8 name)
are used, not skipped.

Unreadable files: we run as root, and chmod 000 does not stop root, so ``locked.jpg`` is chmod 000 AND, when
running as root, its ``open`` is made to fail with EACCES in-process (what a non-root user gets from the OS).
A FIFO and a folder named ``*.jpg`` are the files root cannot read as images either: both are tested for real.
tests/test_faces.py covers the decoder itself and tests/test_make_pairs.py a first set of these through
make-pairs; here every command that reads a folder (align, embed, make-pairs, benchmark) meets all of them.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import hog_detectable_faces, needs_dlib, write_jpeg
from pdsn_cli.data import faces
from pdsn_cli.cli.app import app

pytestmark = needs_dlib  # real folders are aligned with dlib's detector and landmarks

#: file name in the first identity's folder → what its skip reason must say
BAD = {
    "empty.jpg": "empty file (0 bytes)",
    "cut.jpg": "truncated",
    "letter.jpg": "not an image",
    "dot.png": "too small (1×1)",
    "huge.png": "pixels",  # the 20000×20000 header is refused before any pixel is decoded
    "fifo.jpg": "not a regular file",
    "folder.jpg": "not a regular file",
    "loop.jpg": "symbolic links",
    "bad\\xff.jpg": "empty file (0 bytes)",  # a non-UTF-8 name, shown escaped
    "locked.jpg": "permission denied",
}
#: odd but valid images that must be used
ODD = ["rgba.png", "gray16.png", "gray.jpg", "caf\\xe9.jpg"]


def encoded(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its header claiming another size (CRC fixed, so decoders believe it)."""
    body = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + png[33:]


def odd_images(face: np.ndarray) -> dict[str, bytes]:
    """RGBA (top rows transparent), 16-bit grayscale and 8-bit grayscale versions of a face photo."""
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:12, :, 3] = 0
    gray = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    out = {"rgba": encoded(rgba), "gray16": encoded(gray.astype(np.uint16) * 257), "gray": encoded(gray, "JPEG")}
    modes = {k: Image.open(io.BytesIO(v)).mode for k, v in out.items()}
    assert modes == {"rgba": "RGBA", "gray16": "I;16", "gray": "L"}, modes  # what the cases are about
    return out


def broken_images(good_jpeg: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "cut": good_jpeg[: len(good_jpeg) // 3],
        "letter": b"Dear Sir or Madam,\n" * 40,
        "dot": encoded(np.zeros((1, 1, 3), np.uint8)),
        "huge": with_ihdr_size(encoded(np.zeros((16, 16, 3), np.uint8)), 20000, 20000),
    }


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> tuple[Path, str, int]:
    """(root, the identity holding the bad files, number of usable images)."""
    root = tmp_path_factory.mktemp("bad-images") / "people"
    people = hog_detectable_faces(2, 2)
    for name, fs in people.items():
        for k, f in enumerate(fs, 1):
            write_jpeg(root / name / f"{name}_{k:04d}.jpg", f.image)
    name = sorted(people)[0]
    d = root / name
    face = people[name][0].image
    good = (d / f"{name}_0001.jpg").read_bytes()
    for stem, data in broken_images(good).items():
        (d / f"{stem}{'.png' if stem in ('dot', 'huge') else '.jpg'}").write_bytes(data)
    for stem, data in odd_images(face).items():
        (d / f"{stem}{'.jpg' if stem == 'gray' else '.png'}").write_bytes(data)
    os.mkfifo(d / "fifo.jpg")
    (d / "folder.jpg").mkdir()
    os.symlink("loop.jpg", d / "loop.jpg")
    (d / "locked.jpg").write_bytes(good)
    os.chmod(d / "locked.jpg", 0)
    raw = os.fsencode(d)
    with open(raw + b"/bad\xff.jpg", "wb"):
        pass
    with open(raw + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(good)
    return root, name, 2 * 2 + len(ODD)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each command reads the folder itself (the chip cache would otherwise answer for it)."""
    monkeypatch.setenv("PDSN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def locked_for_root(monkeypatch):
    """chmod 000 stops everyone but root; as root, opening locked.jpg fails as it would for a user."""
    if os.geteuid() != 0:
        return

    def guarded_open(file, *args, **kwargs):
        if os.fsdecode(file).endswith("/locked.jpg"):
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(faces, "open", guarded_open, raising=False)


def run(args: list, tmp_path: Path) -> tuple[object, dict]:
    js = tmp_path / "result.json"
    r = CliRunner().invoke(app, [*(str(a) for a in args), "--json", str(js), "--quiet"])
    assert r.exit_code == 3, (r.exit_code, r.output, r.exception)
    assert "skipped files" in r.stdout
    return r, json.loads(js.read_text(encoding="utf-8"))


def check_skipped(report: dict, name: str) -> None:
    skipped = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert skipped.keys() == {f"{name}/{f}" for f in BAD}, sorted(skipped)
    for f, reason in BAD.items():
        assert reason in skipped[f"{name}/{f}"], (f, skipped[f"{name}/{f}"])
    assert report["skipped"] == len(BAD)


def check_used(sources: list[str], name: str, images: int) -> None:
    assert len(sources) == images
    assert {f"{name}/{f}" for f in ODD} <= set(sources)


def test_align_skips_and_lists_bad_images(bad_folder, tmp_path):
    from pdsn_cli.data.chips_h5 import read_chips

    root, name, images = bad_folder
    out = tmp_path / "chips.h5"
    r, res = run(["align", "--data-dir", root, "--template", "arc112x96", "--out", out], tmp_path)
    check_skipped(res["align"], name)
    assert res["images"] == images
    chips = read_chips(out)
    check_used(list(chips.source), name, images)
    assert "locked.jpg" in r.stdout  # the table on the console names them too


def test_embed_skips_and_lists_bad_images(bad_folder, tiny_weights, tmp_path):
    root, name, images = bad_folder
    out = tmp_path / "emb.h5"
    _, res = run(["embed", "--input", root, "--trunk", "tiny", "--weights", tiny_weights, "--out", out], tmp_path)
    check_skipped(res["align"], name)
    with h5py.File(out, "r") as f:
        emb = f["embedding"][()]
        check_used([s.decode() for s in f["source"][()]], name, images)
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_make_pairs_skips_and_lists_bad_images(bad_folder, tmp_path):
    from pdsn_cli.data import pairs_h5

    root, name, images = bad_folder
    out = tmp_path / "pairs.h5"
    _, res = run(["make-pairs", "--data-dir", root, "--occluder", "scarf", "--template", "arc112x96", "--out", out],
                 tmp_path)
    check_skipped(res["align"], name)
    check_used(pairs_h5.read_pairs(out).source, name, images)


def test_a_second_run_reports_the_same_files_from_the_cache(bad_folder, tmp_path, monkeypatch):
    root, name, images = bad_folder
    run(["align", "--data-dir", root, "--template", "arc112x96", "--out", tmp_path / "a.h5"], tmp_path)
    from pdsn_cli.data import chip_cache as chips

    monkeypatch.setattr(chips, "read_image", lambda p: pytest.fail(f"{p} was decoded again"))
    _, res = run(["align", "--data-dir", root, "--template", "arc112x96", "--out", tmp_path / "b.h5"], tmp_path)
    check_skipped(res["align"], name)
    assert res["align"]["from_cache"] == images and res["align"]["aligned_now"] == 0


# ---- benchmark: LFW layout, pairs.txt naming bad photos --------------------------------------------------------
def lfw_with_bad_photos(root: Path) -> tuple[Path, dict[str, str]]:
    """3 identities × 2 good photos plus bad and odd ones under LFW's ``.jpg`` names, and a 2-fold pairs.txt;
    returns the root and {bad photo: what its skip reason says}."""
    people = hog_detectable_faces(3, 2, seed=3)
    a, b, c = sorted(people)
    for name in (a, b, c):
        for k, f in enumerate(people[name], 1):
            write_jpeg(root / name / f"{name}_{k:04d}.jpg", f.image)
    broken = broken_images((root / a / f"{a}_0001.jpg").read_bytes())
    odd = odd_images(people[a][0].image)
    bad = {f"{a}/{a}_0003.jpg": ("empty", "empty file"), f"{a}/{a}_0004.jpg": ("cut", "truncated"),
           f"{b}/{b}_0003.jpg": ("letter", "not an image"), f"{b}/{b}_0005.jpg": ("dot", "too small"),
           f"{c}/{c}_0004.jpg": ("huge", "pixels")}
    for rel, (kind, _) in bad.items():
        (root / rel).write_bytes(broken[kind])
    for rel, kind in {f"{a}/{a}_0005.jpg": "rgba", f"{b}/{b}_0004.jpg": "gray16", f"{c}/{c}_0003.jpg": "gray"}.items():
        (root / rel).write_bytes(odd[kind])
    folds = [  # 5 of the 12 pairs name a bad photo; each fold keeps pairs of both kinds
        [f"{a}\t1\t2", f"{b}\t1\t2", f"{c}\t1\t3", f"{a}\t3\t{b}\t1", f"{a}\t5\t{c}\t2", f"{b}\t4\t{c}\t1"],
        [f"{a}\t1\t4", f"{b}\t2\t3", f"{c}\t2\t1", f"{a}\t2\t{b}\t5", f"{c}\t4\t{a}\t1", f"{b}\t1\t{c}\t3"],
    ]
    (root / "pairs.txt").write_text("2\t3\n" + "\n".join(line for fold in folds for line in fold) + "\n")
    return root, {rel: reason for rel, (_, reason) in bad.items()}


def test_benchmark_drops_pairs_of_bad_photos_and_lists_them(tiny_weights, tmp_path):
    root, bad = lfw_with_bad_photos(tmp_path / "lfw")
    _, res = run(["benchmark", "--dataset", "lfw", "--data-dir", root, "--trunk", "tiny", "--weights", tiny_weights],
                 tmp_path)
    reasons = {s["path"]: s["reason"] for s in res["align"]["skipped_files"]}
    assert reasons.keys() == bad.keys()
    assert all(bad[p] in r for p, r in reasons.items()), reasons
    assert res["dropped_pairs"] == 5 and res["pairs"] == 7 and res["images"] == 14 - 5
    assert all(np.isfinite(row["accuracy"]) for row in res["results"])
