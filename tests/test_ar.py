"""The AR face database: its two distributed layouts, found by name; the .raw frames; protocols 1 and 2; and
the images aligned through the chip cache. The database itself is not redistributable: ``ar_fixture`` writes a
synthetic stand-in with the real names and formats."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from ar_fixture import file_name, raw_bytes, subject_names, write_fixture
from conftest import needs_dlib
from pdsn_cli.data.ar import (
    PROTOCOLS, RAW_BYTES, ArImage, ar_items, image_kind, parse_name, protocol, read_ar_image, read_raw, scan,
)
from pdsn_cli.errors import BadInputError
from pdsn_cli.data.faces import BadImage, FaceItem, read_image

SUNGLASSES = {8, 9, 10, 21, 22, 23}
SCARF = {11, 12, 13, 24, 25, 26}


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """Martínez & Kak's layout: 4 subjects × 26 images, ``AR/M-001-01.bmp`` … (read-only: copy to change)."""
    root = tmp_path_factory.mktemp("ar-cropped")
    write_fixture(root, "cropped", subjects=4, seed=0, folder="AR")
    return root


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original release: 2 subjects × images 1, 8, 11, 14 as 768×576 ``.raw`` frames."""
    root = tmp_path_factory.mktemp("ar-original")
    write_fixture(root, "original", subjects=["m-001", "w-002"], indices=[1, 8, 11, 14], seed=1)
    return root


# ---- names -------------------------------------------------------------------------------------------------
def test_parse_name_and_kinds():
    assert parse_name("M-001-08.bmp") == ("m", 1, 8)
    assert parse_name("w-056-26.raw") == ("w", 56, 26)
    assert parse_name("F-07-1.RAW") == ("w", 7, 1)  # the official page's F-xx-yy, unpadded numbers
    assert parse_name("m_012_14.PNG") == ("m", 12, 14)
    for bad in ("m-001-27.bmp", "m-001-00.bmp", "m-000-01.bmp", "x-001-01.bmp", "m-001-01.txt", "m-001-01.raw.Z",
                "m-001-01", "face_001_01.png", "m-0001-01.bmp"):
        assert parse_name(bad) is None, bad
    assert [image_kind(i) for i in range(1, 14)] == (
        ["neutral"] + ["expression"] * 3 + ["light"] * 3 + ["sunglasses"] * 3 + ["scarf"] * 3)
    assert [image_kind(i + 13) for i in range(1, 14)] == [image_kind(i) for i in range(1, 14)]
    assert subject_names(3) == ["m-001", "m-002", "w-001"]
    assert file_name("w-002", 8, "cropped") == "W-002-08.bmp" and file_name("m-001", 1, "original") == "m-001-01.raw"


# ---- scanning ------------------------------------------------------------------------------------------------
def test_scan_cropped_layout(cropped):
    s = scan(cropped)
    assert len(s) == 104 and s.ignored == 0 and not s.duplicates
    assert s.subjects() == ["m-001", "m-002", "w-001", "w-002"]
    summary = s.summary()
    assert summary["men"] == 2 and summary["women"] == 2 and summary["sessions"] == {1: 52, 2: 52}
    assert summary["kinds"] == {"neutral": 8, "expression": 24, "light": 24, "sunglasses": 24, "scarf": 24}
    assert summary["formats"] == {".bmp": 104}
    im = next(i for i in s if i.path == "AR/M-001-08.bmp")
    assert im == ArImage("AR/M-001-08.bmp", "m", 1, 8, 1, "sunglasses", "m-001")
    assert im.condition == "sunglasses"
    im = next(i for i in s if i.path == "AR/W-002-25.bmp")
    assert (im.subject, im.session, im.kind, im.condition) == ("w-002", 2, "scarf", "scarf + left light")
    assert [i.index for i in s if i.subject == "w-001"] == list(range(1, 27))  # sorted by subject, then image
    a = read_ar_image(cropped, im)
    assert a.shape == (165, 120, 3) and a.dtype == np.uint8


def test_scan_counts_other_files_and_compressed_frames(cropped, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(cropped, root)
    for junk in ("README.txt", "AR/Thumbs.db", "AR/x-001-01.bmp", "AR/m-001-27.bmp", "notes/m-001-00.png"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"junk")
    (root / "cd1").mkdir()
    (root / "cd1" / "m-003-01.raw.Z").write_bytes(b"\x1f\x9d")
    (root / "AR" / "M-009-01.bmp").symlink_to(root / "gone.bmp")
    os.mkfifo(root / "AR" / "M-009-02.bmp")  # would block a reader forever
    s = scan(root)
    assert len(s) == 104 and s.ignored == 5 and len(s.ignored_examples) == 5
    assert s.compressed == ["cd1/m-003-01.raw.Z"] and s.summary()["compressed_files"] == 1
    assert "m-003" not in s.subjects() and "m-009" not in s.subjects()
    assert [sk.path for sk in s.skipped] == ["AR/M-009-01.bmp", "AR/M-009-02.bmp"]
    assert all("not a regular file" in sk.reason for sk in s.skipped)


def test_duplicates_are_resolved_deterministically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # the same two images in three copies each, written in opposite orders into the two roots
    for root, order in ((a, ("jpg", "png", "deep")), (b, ("deep", "png", "jpg"))):
        for what in order:
            if what == "deep":
                write_fixture(root, "cropped", subjects=["m-001"], indices=[1, 8], folder="x/y")
            else:
                write_fixture(root, "cropped", subjects=["m-001"], indices=[1, 8], ext="." + what)
    sa, sb = scan(a), scan(b)
    assert [i.path for i in sa] == [i.path for i in sb] == ["M-001-01.png", "M-001-08.png"]
    assert [d.as_dict() for d in sa.duplicates] == [d.as_dict() for d in sb.duplicates] == [
        {"kept": "M-001-01.png", "dropped": "x/y/M-001-01.bmp"},
        {"kept": "M-001-01.png", "dropped": "M-001-01.jpg"},
        {"kept": "M-001-08.png", "dropped": "x/y/M-001-08.bmp"},
        {"kept": "M-001-08.png", "dropped": "M-001-08.jpg"},
    ]


def test_scan_errors(tmp_path):
    with pytest.raises(BadInputError, match="AR data folder not found"):
        scan(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError) as e:
        scan(empty)
    msg = str(e.value)
    assert "\n" not in msg and str(empty) in msg and "m-001-01.raw" in msg and "W-050-26.bmp" in msg
    other = tmp_path / "lfw"
    (other / "Aaron").mkdir(parents=True)
    (other / "Aaron" / "Aaron_0001.jpg").write_bytes(b"x")
    (other / "pairs.txt").write_text("1\n")
    with pytest.raises(BadInputError, match=r"no AR face database images under .*lfw.*found 2 other files"):
        scan(other)
    z = tmp_path / "compressed"
    z.mkdir()
    (z / "w-001-01.raw.Z").write_bytes(b"\x1f\x9d")
    with pytest.raises(BadInputError, match=r"1 compressed \.raw\.Z file: uncompress them first"):
        scan(z)


# ---- the original release's .raw frames ------------------------------------------------------------------------
def test_raw_frames_are_planar_rgb(tmp_path):
    rgb = np.zeros((576, 768, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    rgb[5, 700] = (250, 1, 2)  # a marker near the top right: rows of 768, planes R then G then B
    data = raw_bytes(rgb)
    assert len(data) == RAW_BYTES == 1_327_104
    assert data[5 * 768 + 700] == 250 and data[576 * 768 + 5 * 768 + 700] == 1 and data[2 * 576 * 768] == 30
    p = tmp_path / "m-001-01.raw"
    p.write_bytes(data)
    got = read_raw(p)
    assert got.shape == (576, 768, 3) and got.flags.c_contiguous and np.array_equal(got, rgb)
    assert np.array_equal(read_ar_image(tmp_path, "m-001-01.raw"), rgb)
    assert np.array_equal(read_image(p), rgb)  # the project's reader (and so the chip cache) reads it too
    short = tmp_path / "m-001-02.raw"
    short.write_bytes(data[:-1])
    with pytest.raises(BadImage, match=r"not an AR \.raw frame: 1,327,103 bytes, expected 1,327,104"):
        read_ar_image(tmp_path, "m-001-02.raw")
    # any other .raw is what it was before: not an image
    with pytest.raises(BadImage, match="not an image"):
        read_image(short)


def test_scan_original_layout(original):
    s = scan(original)
    assert [i.path for i in s] == [f"m-001-{k:02d}.raw" for k in (1, 8, 11, 14)] + [
        f"w-002-{k:02d}.raw" for k in (1, 8, 11, 14)]
    assert [i.kind for i in s[:4]] == ["neutral", "sunglasses", "scarf", "neutral"]
    assert [i.session for i in s[:4]] == [1, 1, 1, 2]
    a = read_ar_image(original, s[0])
    assert a.shape == (576, 768, 3) and a.dtype == np.uint8 and a.std() > 10


# ---- protocols -----------------------------------------------------------------------------------------------
def test_protocol_splits(cropped):
    s = scan(cropped)
    p2 = protocol(s, 2)
    assert [i.path for i in p2.gallery] == [f"AR/{n}-00{k}-01.bmp" for n in "MW" for k in (1, 2)]
    assert {i.index for i in p2.probes["sunglasses"]} == SUNGLASSES and len(p2.probes["sunglasses"]) == 24
    assert {i.index for i in p2.probes["scarf"]} == SCARF and len(p2.probes["scarf"]) == 24
    assert all(i.kind == k for k in ("sunglasses", "scarf") for i in p2.probes[k])
    assert p2.dropped_subjects == [] and p2.dropped_probes == [] and p2.incomplete_gallery == {}
    assert "protocol 2" in p2.description and "image 01 " in p2.description and "24 scarf" in p2.description

    p1 = protocol(s, "1")
    assert len(p1.gallery) == 32 and {i.index for i in p1.gallery} == {1, 2, 3, 4, 14, 15, 16, 17}
    assert p1.probes == p2.probes  # both protocols probe with every occluded image
    assert p1.subjects() == p2.subjects() == s.subjects()
    gallery_paths = {i.path for i in p1.gallery}
    assert not gallery_paths & {i.path for k in p1.probes for i in p1.probes[k]}
    assert p1.summary()["gallery_images"] == 32 and p1.summary()["probes"] == {"sunglasses": 24, "scarf": 24}
    assert set(PROTOCOLS) == {1, 2}


def test_protocol_drops_subjects_without_gallery(cropped):
    s = scan(cropped)
    # m-002 lost its neutral session-1 image; w-001 lost every protocol-1 gallery image; w-002 lost two of them;
    # m-009 only has occluded images
    gone = {("m-002", 1)} | {("w-001", k) for k in PROTOCOLS[1].gallery} | {("w-002", 2), ("w-002", 15)}
    extra = [ArImage(f"AR/M-009-{k:02d}.bmp", "m", 9, k, 1, image_kind(k), "m-009") for k in (8, 11)]
    images = [i for i in s if (i.subject, i.index) not in gone] + extra
    p2 = protocol(images, 2)
    assert p2.subjects() == ["m-001", "w-002"]
    assert p2.dropped_subjects == ["m-002", "m-009", "w-001"]
    assert len(p2.dropped_probes) == 12 * 2 + 2 and "AR/M-009-08.bmp" in p2.dropped_probes
    assert {i.subject for k in p2.probes for i in p2.probes[k]} == {"m-001", "w-002"}
    assert len(p2.probes["sunglasses"]) == len(p2.probes["scarf"]) == 12
    assert p2.summary()["dropped_probes"] == 26

    p1 = protocol(images, 1)
    assert p1.subjects() == ["m-001", "m-002", "w-002"]  # m-002 still has 7 of the 8 protocol-1 gallery images
    assert p1.dropped_subjects == ["m-009", "w-001"] and len(p1.dropped_probes) == 12 + 2
    assert p1.incomplete_gallery == {"m-002": 7, "w-002": 6}
    assert len(p1.gallery) == 8 + 7 + 6


def test_protocol_errors(cropped):
    s = scan(cropped)
    with pytest.raises(BadInputError, match=r"unknown AR protocol 3: choose 1 \(.*\); 2 \(.*\)"):
        protocol(s, 3)
    with pytest.raises(BadInputError, match="unknown AR protocol 'x'"):
        protocol(s, "x")
    with pytest.raises(BadInputError, match=r"protocol 2 enrols image 01 .*none of the 4 subject"):
        protocol([i for i in s if i.index != 1], 2)
    with pytest.raises(BadInputError, match="protocol 1: no probe image"):
        protocol([i for i in s if i.kind not in ("sunglasses", "scarf")], 1)


def test_ar_items(cropped):
    p = protocol(scan(cropped), 2)
    items = ar_items(p)
    assert len(items) == 4 + 24 + 24
    assert [it.path for it in items[:4]] == [i.path for i in p.gallery]
    assert all(it.identity == it.path.split("/")[1][:5].lower() for it in items)
    assert all(it.file is None for it in items)


# ---- through the chip cache ----------------------------------------------------------------------------------
@needs_dlib
def test_chips_load_through_the_cache(cropped, original, tmp_path):
    from pdsn_cli.data.chip_cache import ChipCache

    p = protocol(scan(cropped), 2)
    # the gallery and two sunglasses probes, all found by dlib's HOG detector (a miss costs seconds of CNN)
    items = [it for it in ar_items(p) if it.path.endswith("-01.bmp") or it.path.startswith("AR/M-00")
             and it.path.endswith("-08.bmp")]
    assert len(items) == 6
    chips, rep = ChipCache(cropped, "arc112x96", tmp_path / "cache").ensure_and_load(items)
    assert chips.image.shape == (6, 112, 96, 3) and list(chips.source) == [it.path for it in items]
    assert [chips.identity[k] for k in chips.label] == [it.identity for it in items]
    assert rep.aligned_now == 6 and not rep.skipped

    po = protocol(scan(original), 2)
    items = ar_items(po)
    assert [it.path for it in items] == ["m-001-01.raw", "w-002-01.raw", "m-001-08.raw", "w-002-08.raw",
                                         "m-001-11.raw", "w-002-11.raw"]
    # unoccluded frames only: a HOG miss on a 768×576 frame sends it to dlib's CNN detector (~30 s on a CPU)
    items = items[:2] + [FaceItem("w-002-14.raw", "w-002")]
    chips, rep = ChipCache(original, "arc112x96", tmp_path / "cache").ensure_and_load(items)
    assert chips.image.shape == (3, 112, 96, 3) and rep.aligned_now == 3 and not rep.skipped
    assert rep.fallbacks == 0  # the .raw frames were decoded (a grey or garbled frame has no face to find)
    assert [chips.identity[k] for k in chips.label] == ["m-001", "w-002", "w-002"]
