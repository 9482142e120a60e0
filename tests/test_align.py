"""Alignment geometry: the similarity fit, the arc templates, and pixel equality with dlib's get_face_chip."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from conftest import LFW_DIR, needs_dlib
from pdsn_cli.align.aligner import FaceAligner
from pdsn_cli.align.shape_predictor import shipped_predictor_file
from pdsn_cli.align.templates import TEMPLATES, align_with_points, get_template, similarity_transform, transform_points
from pdsn_cli.data.faces import read_image
from pdsn_cli.data.synthetic import synthetic_faces
from pdsn_cli.errors import BadInputError


def _similarity(scale, angle_deg, tx, ty) -> np.ndarray:
    a = math.radians(angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([scale * r, [[tx], [ty]]])


@pytest.mark.parametrize("scale, angle, tx, ty", [(1.0, 0.0, 0.0, 0.0), (0.43, 17.0, -12.5, 80.25),
                                                  (2.7, -163.0, 300.0, -4.0)])
def test_similarity_transform_recovers_a_known_similarity(scale, angle, tx, ty):
    m = _similarity(scale, angle, tx, ty)
    src = np.random.default_rng(0).uniform(0, 250, (5, 2))
    dst = src @ m[:, :2].T + m[:, 2]
    got = similarity_transform(src, dst)
    np.testing.assert_allclose(got, m, atol=1e-9)
    np.testing.assert_allclose(transform_points(got, src), dst, atol=1e-4)


def test_similarity_transform_never_reflects():
    src = np.random.default_rng(1).uniform(0, 100, (5, 2))
    mirrored = src * [-1, 1]
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0  # best proper similarity, not the mirror


def _blobs(shape, points, sigma=1.6) -> np.ndarray:
    """A grey image with a small Gaussian spot at every point (sub-pixel positions)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat((np.clip(img, 0, 1) * 250).astype(np.uint8)[..., None], 3, axis=2)


def _centroid(img: np.ndarray, near, radius=6) -> np.ndarray:
    x0, y0 = int(round(near[0])), int(round(near[1]))
    win = img[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1, 0].astype(np.float64)
    yy, xx = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
    return np.array([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])


@pytest.mark.parametrize("template", ["arc112x96", "arc112x112"])
def test_arc_templates_put_the_landmarks_on_the_template_points(template):
    t = get_template(template)
    # a face photographed rotated, scaled and shifted: its landmarks are a similarity of the template's
    m = _similarity(2.1, 23.0, 40.0, 10.0)
    arc5 = t.dst @ m[:, :2].T + m[:, 2]
    photo = _blobs((300, 320), arc5, sigma=3.0)
    chip, lm = align_with_points(photo, arc5, None, template)
    assert chip.shape == (*t.size, 3)
    np.testing.assert_allclose(lm, t.dst, atol=1e-3)  # the returned landmarks
    for p in t.dst:  # and the pixels: each spot lands on its template point
        assert np.hypot(*(_centroid(chip, p) - p)) < 0.5


def test_templates_and_errors():
    assert TEMPLATES["arc112x96"].size == (112, 96) and TEMPLATES["dlib150"].size == (150, 150)
    # 112×96 is the 112×112 template with 8 px cut off each side
    np.testing.assert_allclose(TEMPLATES["arc112x96"].dst, TEMPLATES["arc112x112"].dst - [8, 0])
    with pytest.raises(BadInputError, match="unknown template"):
        get_template("arc96")
    # a dlib template without dlib's points (a dataset's own 5 landmarks): the arc points go to their mean place
    t = TEMPLATES["dlib150"]
    arc5 = t.dst_arc5 * 1.7 + [30.0, 12.0]
    _, lm = align_with_points(np.zeros((300, 300, 3), np.uint8), arc5, None, "dlib150")
    # dlib's chip geometry maps pixel corners, N·s − 1 apart, not the fit itself: within a pixel of it
    np.testing.assert_allclose(lm, t.dst_arc5, atol=1.0)


def _dlib_photos():
    """A few real LFW photos when available, else synthetic face photos (dlib finds most of them)."""
    if LFW_DIR.is_dir():
        files = sorted(LFW_DIR.glob("*/*.jpg"))[::1700][:6]
        return [read_image(f) for f in files]
    return [f.image for f in synthetic_faces(4, 2, seed=3)]


@needs_dlib
@pytest.mark.parametrize("points", [5, 68])
def test_dlib150_chip_equals_dlib_get_face_chip(points):
    """Fitted on the 5-point model's landmarks, or on the 68-point model's (dlib's original chip)."""
    import dlib

    detect = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(shipped_predictor_file(points))
    compared = 0
    for img in _dlib_photos():
        rects = detect(img, 1)
        if not rects:
            continue
        shape = sp(img, rects[0])
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(points)], np.float64)
        ref = np.asarray(dlib.get_face_chip(img, shape, 150, 0.25))
        if points == 5:
            ours, _ = align_with_points(img, pts, pts, "dlib150")
        else:
            ours, _ = align_with_points(img, pts[[36, 45, 30, 48, 54]], None, "dlib150", dlib68=pts)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1, f"dlib150 chip ({points} points) differs from dlib's by {diff.max()} grey levels"
        assert diff.mean() < 0.01
        compared += 1
    assert compared >= 4, "dlib found too few faces to compare"


@needs_dlib
def test_face_aligner_finds_synthetic_faces_or_falls_back_to_a_centred_crop():
    aligner = FaceAligner(use_cnn=False)
    face = synthetic_faces(1, 1)[0]
    arc5, dlib5, _, detected, n = aligner.find_points(face.image)
    assert detected and n == 1
    # the 68-point eye centres, nose tip and mouth corners land near the drawn ones (a few pixels)
    assert np.abs(arc5 - face.landmarks).max() < 8
    blank = np.full((120, 100, 3), 90, np.uint8)
    arc5, dlib5, dlib68, detected, n = aligner.find_points(cv2.GaussianBlur(blank, (5, 5), 0))
    assert not detected and n == 0
    assert arc5.shape == (5, 2) and (arc5[:, 0] < 100).all() and (arc5[:, 1] < 120).all()


@needs_dlib
def test_centred_face_rule_passes_over_bystanders():
    face = synthetic_faces(1, 1, size=250)[0].image
    canvas = np.full((600, 600, 3), 90, np.uint8)
    canvas[:250, :250] = face  # a face only in the corner: a bystander for a centred dataset
    assert FaceAligner(use_cnn=False).find_points(canvas)[3]
    _, _, _, detected, _ = FaceAligner(use_cnn=False, max_centre_offset=0.2).find_points(canvas)
    assert not detected
    canvas[175:425, 175:425] = face  # the subject in the middle is taken
    arc5, _, _, detected, n = FaceAligner(use_cnn=False, max_centre_offset=0.2).find_points(canvas)
    assert detected and n == 2 and np.abs(arc5.mean(0) - 300).max() < 40
