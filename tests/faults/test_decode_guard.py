"""Huge images never exhaust memory: the decoder's memory need is read from the header, a photo too large for
the per-image ceiling is skipped and listed, and a large photo that fits is searched for faces on a downscaled
copy (the detectors' cost grows with pixels: dlib's CNN detector took 11 GB and 93 s on a 6000×6000 PNG), its
landmarks and chip taken from the full-resolution image."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from conftest import hog_detectable_faces, needs_dlib
from pdsn_cli.align import aligner
from pdsn_cli.align.aligner import HOG_MAX_SIDE, FaceAligner
from pdsn_cli.align.templates import align_with_points
from pdsn_cli.data.chip_cache import ChipCache
from pdsn_cli.data.faces import BadImage, FaceItem, read_image
from pdsn_cli.errors import BadInputError

pytestmark = needs_dlib

SIDE, ZOOM = 6000, 8  # the 250 px synthetic photo enlarged 8× in the middle of a 6000×6000 grey canvas


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """(data root, the small photo, its 6000×6000 enlargement's path) — a PNG of about 1 MB."""
    face = next(iter(hog_detectable_faces(1, 1, seed=5).values()))[0]
    root = tmp_path_factory.mktemp("huge")
    big = np.full((SIDE, SIDE, 3), 128, np.uint8)
    side = face.image.shape[0] * ZOOM
    at = (SIDE - side) // 2
    big[at:at + side, at:at + side] = cv2.resize(face.image, (side, side), interpolation=cv2.INTER_NEAREST)
    (root / "person").mkdir()
    ok, png = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    (root / "person" / "huge.png").write_bytes(png.tobytes())
    ok, small = cv2.imencode(".png", cv2.cvtColor(face.image, cv2.COLOR_RGB2BGR))
    (root / "person" / "small.png").write_bytes(small.tobytes())
    return root, face, at


def test_6000px_photo_is_aligned_on_a_downscaled_copy_quickly(huge, tmp_path, monkeypatch):
    root, face, at = huge
    seen = []
    real = aligner.downscaled

    def spy(image, max_side):
        small, s = real(image, max_side)
        seen.append(small.shape[:2])
        return small, s

    monkeypatch.setattr(aligner, "downscaled", spy)
    t = time.perf_counter()
    chips, rep = ChipCache(root, "arc112x96", tmp_path).ensure_and_load([FaceItem("person/huge.png", "person")])
    assert time.perf_counter() - t < 20
    assert rep.aligned_now == 1 and not rep.skipped and rep.fallbacks == 0  # the face was found
    assert seen and max(max(s) for s in seen) <= HOG_MAX_SIDE  # no detector saw the full 6000×6000 image
    # the chip's geometry is the one the small photo's landmarks give on the full image: the rectangle was mapped
    # back right (pixels are not compared: the enlarged noise texture aliases differently under sub-pixel shifts)
    arc5, dlib5, _, found, _ = FaceAligner(use_cnn=False).find_points(face.image)
    assert found
    arc5, dlib5 = [(p + 0.5) * ZOOM - 0.5 + at for p in (arc5, dlib5)]  # small photo pixels → enlarged photo's
    _, want_lm = align_with_points(face.image, arc5, dlib5, "arc112x96")  # landmarks only: any image will do
    assert np.abs(chips.landmarks[0] - want_lm).max() < 2.0


def test_photo_over_the_memory_ceiling_is_skipped_and_listed_before_decoding(huge, tmp_path, monkeypatch):
    root, _, _ = huge
    monkeypatch.setenv("PDSN_MAX_IMAGE_MB", "64")  # 6000×6000 RGB needs ~400 MB to read
    t = time.perf_counter()
    with pytest.raises(BadImage, match=r"too large to decode \(6000×6000 RGB needs about \d+ MB.*ceiling of 64 MB"):
        read_image(root / "person" / "huge.png")
    chips, rep = ChipCache(root, "arc112x96", tmp_path).ensure_and_load(
        [FaceItem("person/huge.png", "person"), FaceItem("person/small.png", "person")])
    assert time.perf_counter() - t < 10
    assert [s.path for s in rep.skipped] == ["person/huge.png"]
    assert "too large to decode" in rep.skipped[0].reason
    assert chips.source == ["person/small.png"]


def test_out_of_memory_while_aligning_skips_the_file_instead_of_crashing(huge, tmp_path, monkeypatch):
    root, _, _ = huge

    def no_memory(self, image):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(FaceAligner, "find_points", no_memory)
    rep = ChipCache(root, "arc112x96", tmp_path).ensure([FaceItem("person/small.png", "person")])
    assert [(s.path, s.reason) for s in rep.skipped] == [("person/small.png", "out of memory while aligning (250×250)")]


def test_a_skip_that_depends_on_memory_is_not_remembered(huge, tmp_path, monkeypatch):
    """The ceiling and an out-of-memory are this run's, not the file's: a later run with more room retries."""
    root, _, _ = huge
    cache = ChipCache(root, "arc112x96", tmp_path)

    def no_memory(self, image):
        raise MemoryError("std::bad_alloc")

    with monkeypatch.context() as m:
        m.setattr(FaceAligner, "find_points", no_memory)
        assert [s.path for s in cache.ensure([FaceItem("person/small.png", "person")]).skipped] == ["person/small.png"]
    rep = cache.ensure([FaceItem("person/small.png", "person")])
    assert rep.skipped == [] and rep.aligned_now == 1


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_memory_ceiling_is_refused_once_not_blamed_on_every_image(huge, tmp_path, monkeypatch, value):
    root, _, _ = huge
    monkeypatch.setenv("PDSN_MAX_IMAGE_MB", value)
    with pytest.raises(BadInputError, match="PDSN_MAX_IMAGE_MB must be a positive number"):
        ChipCache(root, "arc112x96", tmp_path).ensure([FaceItem("person/small.png", "person")])
