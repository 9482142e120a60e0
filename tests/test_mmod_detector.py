"""dlib's CNN (MMOD) face detector in PyTorch: the model file, dlib's geometry, and parity with dlib itself."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest

from conftest import needs_dlib
from pdsn_cli.align.model_files import models_dir
from pdsn_cli.align.mmod_detector import (
    MODEL_FILE,
    BoxOverlap,
    MMODFaceDetector,
    _round,
    pyramid_up,
    tiled_pyramid_rects,
)
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.dlib_format import DlibReader, _read_loss, read_net_file

MODEL = os.path.join(models_dir(), MODEL_FILE)


@pytest.fixture(scope="module")
def detector() -> MMODFaceDetector:
    return MMODFaceDetector.from_file()


@pytest.fixture(scope="module")
def dlib_detector():
    import dlib

    return dlib.cnn_face_detection_model_v1(MODEL)


def canvas(height: int, width: int, placements, seed: int) -> np.ndarray:
    """A smooth random background with synthetic faces (index into a fixed set, side, x, y) pasted on it."""
    from pdsn_cli.data.synthetic import synthetic_faces

    faces = synthetic_faces(12, 2, seed=0, size=160)
    rng = np.random.default_rng(seed)
    low = rng.uniform(60, 200, (3, 4, 3)).astype(np.float32)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    for index, side, x, y in placements:
        img[y:y + side, x:x + side] = cv2.resize(faces[index].image, (side, side), interpolation=cv2.INTER_AREA)
    return img


# Faces dlib finds at these sizes: ~40-55 px faces for upsample 1, ~80-100 px ones for upsample 0.
SMALL_FACES = (150, 330, [(0, 90, 5, 10), (12, 110, 100, 30), (13, 100, 220, 45)])
LARGE_FACES = (300, 470, [(22, 160, 5, 5), (2, 190, 160, 100), (11, 150, 320, 10)])


# -- the model file -----------------------------------------------------------------------------


def test_parses_the_shipped_detector():
    net = read_net_file(MODEL)
    assert net.kinds() == ["con", "affine", "relu"] * 6 + ["con"]
    convs = [layer for layer in net.layers if layer.kind == "con"]
    assert [c.attrs["num_filters"] for c in convs] == [16, 32, 32, 45, 45, 45, 1]
    assert [c.attrs["stride"] for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 4
    assert [c.attrs["padding"] for c in convs] == [(0, 0)] * 3 + [(2, 2)] * 3 + [(4, 4)]
    assert convs[-1].arrays["weight"].shape == (1, 45, 9, 9)
    assert net.input.kind == "input_rgb_image_pyramid"
    assert net.input.attrs["pyramid_padding"] == 10 and net.input.attrs["pyramid_outer_padding"] == 11
    np.testing.assert_allclose(net.input.attrs["mean_rgb"], (122.782, 117.001, 104.298), atol=1e-4)
    opts = net.loss.attrs
    assert net.loss.kind == "loss_mmod"
    assert opts["detector_windows"] == [(80, 80, "")]
    assert opts["overlaps_nms"][1] == 1.0 and 0.3 < opts["overlaps_nms"][0] < 0.4
    assert opts["assume_image_pyramid"] and not opts["use_bounding_box_regression"]


def _dlib_int(v: int) -> bytes:
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little")
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def _dlib_float(v: float) -> bytes:
    m, e = math.frexp(v)
    return _dlib_int(int(m * 2**53)) + _dlib_int(e - 53)


def _dlib_str(s: str) -> bytes:
    return _dlib_int(len(s)) + s.encode()


def test_reads_mmod_options_version_4():
    # two labelled windows, then the fields versions 3 and 4 added
    data = (_dlib_str("loss_mmod_") + _dlib_int(4) + _dlib_int(2)
            + _dlib_int(2) + _dlib_int(70) + _dlib_int(40) + _dlib_str("car")
            + _dlib_int(2) + _dlib_int(40) + _dlib_int(70) + _dlib_str("person")
            + b"".join(_dlib_float(v) for v in (1.0, 2.0, 0.5, 0.4, 0.9, 0.5, 1.0))
            + b"\x00" + b"1" + _dlib_float(50.0))  # use_image_pyramid::no is a raw uint8_t
    r = DlibReader(data)
    loss = _read_loss(r)
    assert r.pos == len(data)
    assert loss.attrs["detector_windows"] == [(70, 40, "car"), (40, 70, "person")]
    assert loss.attrs["loss_per_missed_target"] == 2.0
    assert loss.attrs["overlaps_nms"] == (0.4, 0.9) and loss.attrs["overlaps_ignore"] == (0.5, 1.0)
    assert loss.attrs["assume_image_pyramid"] is False
    assert loss.attrs["use_bounding_box_regression"] is True and loss.attrs["bbr_lambda"] == 50.0


def test_rejects_a_net_that_is_not_a_detector():
    with pytest.raises(SchemaError, match="not a dlib MMOD detector"):
        MMODFaceDetector.from_file(os.path.join(models_dir(), "dlib_face_recognition_resnet_model_v1.dat"))


def test_rejects_images_it_cannot_read(detector):
    with pytest.raises(BadInputError):
        detector(np.zeros((50, 50, 3), np.float32))
    with pytest.raises(BadInputError):
        detector(np.zeros((50, 50, 4), np.uint8))


# -- dlib's geometry -----------------------------------------------------------------------------


def test_tiled_pyramid_layout():
    rects, rows, cols = tiled_pyramid_rects(501, 502)
    assert rects[0] == (11, 11, 11 + 502 - 1, 11 + 501 - 1) and cols == 502 + 22
    sizes = [(b - t + 1, r - l + 1) for l, t, r, b in rects]
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]):
        assert (h1, w1) == (math.floor(h0 * 5 / 6), math.floor(w0 * 5 / 6))
    assert sizes[-1][0] >= 5
    for i, a in enumerate(rects):
        assert 11 <= a[0] and 11 <= a[1] and a[2] < cols - 11 and a[3] < rows - 11
        for b in rects[i + 1:]:  # tiles never overlap
            assert min(a[2], b[2]) < max(a[0], b[0]) or min(a[3], b[3]) < max(a[1], b[1])
    assert tiled_pyramid_rects(0, 10) == ([], 0, 0)


def test_box_overlap_divides_by_the_bounding_box_of_both():
    # 10x10 boxes offset by 5 in x and y: intersection 25, union 175, bounding box of both 225
    a, b = (0, 0, 9, 9), (5, 5, 14, 14)
    assert BoxOverlap(0.11)(a, b) and not BoxOverlap(0.12)(a, b)  # 25/225 = 0.111 (25/175 would be 0.143)
    assert not BoxOverlap(0.0)(a, (20, 20, 29, 29))
    assert BoxOverlap(0.9, 0.5)(a, (2, 2, 7, 7))  # the small box lies inside the other one


@needs_dlib
def test_rounding_is_dlibs():
    import dlib

    for v in (-2.5, -1.5, -0.5, -0.49, 0.5, 1.5, 2.5, 3.49999):
        r = dlib.rectangle(dlib.drectangle(v, v, v, v))
        assert r.left() == _round(v), v


@needs_dlib
def test_pyramid_up_resize_is_bit_exact():
    import dlib

    rng = np.random.default_rng(7)
    for h, w in ((37, 53), (120, 97), (9, 250)):
        img = np.clip(np.cumsum(rng.normal(0, 20, (h, w, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
        up = pyramid_up(img)
        assert up.shape == (2 * h + 1, 2 * w + 2, 3)
        np.testing.assert_array_equal(up, dlib.resize_image(img, *up.shape[:2]))


# -- parity with dlib ----------------------------------------------------------------------------


def _dlib_boxes(dlib_detector, img, upsample):
    return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
            for d in dlib_detector(img, upsample)]


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def _assert_same_boxes(got, want):
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):  # both sorted by confidence
        assert _iou(g, w) >= 0.95, (got, want)
        assert g[4] == pytest.approx(w[4], abs=1e-4), (got, want)


@needs_dlib
@pytest.mark.parametrize("upsample, layout", [(1, SMALL_FACES), (0, LARGE_FACES)], ids=["upsample1", "upsample0"])
def test_matches_dlib(detector, dlib_detector, upsample, layout):
    img = canvas(*layout, seed=upsample)
    want = _dlib_boxes(dlib_detector, img, upsample)
    assert len(want) >= 2  # the scene is worth comparing
    got = detector(img, upsample)
    _assert_same_boxes(got, want)
    assert all(isinstance(v, int) for box in got for v in box[:4])


def test_batch_equals_one_by_one(detector):
    small, large = canvas(*SMALL_FACES, seed=1), canvas(*LARGE_FACES, seed=0)
    singles = [detector(img, 0) for img in (small, large, small)]
    assert detector.detect_batch([small, large, small], upsample=0) == singles
    assert singles[1]  # the large faces are found without upsampling


def test_grayscale_is_read_as_grey_rgb(detector):
    grey = cv2.cvtColor(canvas(*LARGE_FACES, seed=0), cv2.COLOR_RGB2GRAY)
    assert detector(grey, 0) == detector(np.repeat(grey[:, :, None], 3, axis=2), 0)

