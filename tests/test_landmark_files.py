"""A dataset's own landmarks and boxes (landmarks.csv, <image>.json sidecars) replace detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jpeg
from pdsn_cli.align.templates import align_with_points
from pdsn_cli.data.chip_cache import ChipCache, DataSpec, load_chips
from pdsn_cli.data.chips_h5 import ALIGNED_KNOWN
from pdsn_cli.data.faces import list_identity_folder, read_image
from pdsn_cli.data.landmark_files import GivenFace, GivenLandmarks, read_sidecar, read_table
from pdsn_cli.data.synthetic import synthetic_faces
from pdsn_cli.errors import BadInputError


def _csv(path: Path, rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def _xy_header(n: int) -> list[str]:
    return [f"{a}{i}" for i in range(1, n + 1) for a in "xy"]


def test_table_reads_points_boxes_and_both(tmp_path):
    pts = np.arange(10, dtype=float).reshape(5, 2) + 50
    t = read_table(_csv(tmp_path / "landmarks.csv", [
        ["path", *_xy_header(5), "left", "top", "right", "bottom"],
        ["a/1.jpg", *pts.ravel(), "", "", "", ""],
        ["a/2.jpg", *[""] * 10, 10, 20, 110, 130],
        ["b\\3.jpg", *pts.ravel(), 10, 20, 110, 130],
    ]))
    np.testing.assert_array_equal(t["a/1.jpg"].points, pts)
    assert t["a/1.jpg"].box is None
    assert t["a/2.jpg"].points is None and t["a/2.jpg"].box == (10, 20, 110, 130)
    assert t["b/3.jpg"].box is not None and t["b/3.jpg"].points is not None  # backslashes read as '/'
    pts68 = np.random.default_rng(0).uniform(0, 200, (68, 2))
    t68 = read_table(_csv(tmp_path / "t68.csv", [["path", *_xy_header(68)], ["x.png", *pts68.ravel()]]))
    np.testing.assert_allclose(t68["x.png"].points, pts68)


@pytest.mark.parametrize("rows, message", [
    ([["file", "x1", "y1"]], "'path' column"),
    ([["path", "x1", "y1"]], "no point columns"),
    ([["path", "left", "top", "right", "bottom"], ["a.jpg", 10, 20, 5, 30]], "line 2: box must be"),
    ([["path", *_xy_header(5)], ["a.jpg", *["nan"] * 10]], "line 2: 5 points"),
    ([["path", *_xy_header(5)], ["a.jpg", "one", *[1] * 9]], "line 2: points must be"),
])
def test_table_errors_name_the_file_and_line(tmp_path, rows, message):
    with pytest.raises(BadInputError, match=message):
        read_table(_csv(tmp_path / "landmarks.csv", rows))


def test_sidecars_points_box_and_megaface(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"points": [[1, 2]] * 5, "box": [0, 0, 9, 9]}))
    (tmp_path / "m.json").write_text(json.dumps({"bounding_box": {"x": 10, "y": 20, "width": 50, "height": 60},
                                                 "landmarks": {}}))
    (tmp_path / "none.json").write_text(json.dumps({"other": 1}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "three.json").write_text(json.dumps({"points": [[1, 2]] * 3}))
    g = read_sidecar(tmp_path / "p.json")
    assert g.points.shape == (5, 2) and g.box == (0, 0, 9, 9)
    assert read_sidecar(tmp_path / "m.json") == GivenFace(None, (10, 20, 60, 80))
    assert read_sidecar(tmp_path / "none.json") is None
    with pytest.raises(BadInputError, match="bad.json: not a readable JSON"):
        read_sidecar(tmp_path / "bad.json")
    with pytest.raises(BadInputError, match="3 points"):
        read_sidecar(tmp_path / "three.json")
    assert GivenFace(np.ones((5, 2))).digest() != GivenFace(np.ones((5, 2)) + 0.01).digest()


def _photo_set(root: Path, n: int = 4):
    """n synthetic photos of 2 people, with their true landmarks."""
    faces = list(synthetic_faces(2, n // 2, seed=3))
    truth = {}
    for f in faces:
        rel = f"{f.identity}/{f.identity}_{len(truth) + 1:04d}.png"  # png: pixels as drawn, no JPEG loss
        (root / f.identity).mkdir(parents=True, exist_ok=True)
        import cv2
        cv2.imwrite(str(root / rel), f.image[:, :, ::-1])
        truth[rel] = f
    return truth


def test_given_landmarks_align_without_a_detector_and_edits_realign(tmp_path):
    root = tmp_path / "people"
    truth = _photo_set(root)
    rels = sorted(truth)
    rows = [["path", *_xy_header(5)]] + [[r, *np.round(truth[r].landmarks, 3).ravel()] for r in rels]
    _csv(root / "landmarks.csv", rows)
    # a sidecar wins over the table for its image
    side = truth[rels[0]].landmarks + [1.5, -0.5]
    (root / f"{rels[0]}.json").write_text(json.dumps({"points": side.tolist()}))

    items, skipped = list_identity_folder(root)
    assert len(items) == 4 and not skipped  # neither the table nor the sidecar is reported as a stray file
    for template in ("arc112x112", "dlib150"):
        chips, rep = load_chips(DataSpec(root), template)
        assert rep.from_landmark_files == 4 and rep.aligned_now == 4 and rep.fallbacks == 0
        assert (chips.aligned_by == ALIGNED_KNOWN).all()
        for i, rel in enumerate(chips.source):
            pts = side if rel == rels[0] else np.round(truth[rel].landmarks, 3)
            want, _ = align_with_points(read_image(root / rel), pts, None, template)
            diff = np.abs(chips.image[i].astype(int) - want)  # OpenCV's warp rounds per thread block: ±1 level
            assert diff.max() <= 1 and (diff == 0).mean() > 0.999
        # a second run reads the cache; an edited landmark file aligns that image again
        _, again = load_chips(DataSpec(root), template)
        assert again.from_cache == 4 and again.aligned_now == 0

    (root / f"{rels[0]}.json").unlink()
    _, after = load_chips(DataSpec(root), "arc112x112")
    assert after.aligned_now == 1 and after.from_cache == 3


def test_a_box_gives_the_landmarks_of_the_predictors(tmp_path):
    """A box alone: the shape predictors run in it, as after a detection (no detector is loaded)."""
    from pdsn_cli.align.aligner import FaceAligner

    root = tmp_path / "people"
    truth = _photo_set(root, 2)
    rel = sorted(truth)[0]
    image = read_image(root / rel)
    box = (60, 70, 190, 200)
    (root / f"{rel}.json").write_text(json.dumps({"box": list(box)}))
    g = GivenLandmarks(root).get(rel)
    aligner = FaceAligner()
    arc5, dlib5, dlib68 = aligner.given_points(image, g)
    a2, d2, p2 = aligner.landmarks(image, box)
    np.testing.assert_array_equal(arc5, a2)
    np.testing.assert_array_equal(dlib68, p2)
    assert aligner._cnn is None


def test_old_three_column_stamps_still_hit(tmp_path, face_folder):
    """Shards written before landmark files (stamps of 3 columns) stay valid for detected chips."""
    import h5py

    from pdsn_cli.data.chip_cache import STAMP

    cache = tmp_path / "cache"
    items, _ = list_identity_folder(face_folder)
    items = items[:2]
    c = ChipCache(face_folder, "dlib150", cache)
    c.ensure(items)
    for shard in c.shards():
        with h5py.File(shard, "r+") as f:
            old = f[STAMP][()][:, :3]
            del f[STAMP]
            f.create_dataset(STAMP, data=old)
        os.utime(shard)
    rep = ChipCache(face_folder, "dlib150", cache).ensure(items)
    assert rep.from_cache == 2 and rep.aligned_now == 0


# ---- which detector finds the faces (--face-detector) -------------------------------------------------------
def test_face_detector_choice_without_dlib(monkeypatch, tmp_path):
    """Without dlib, auto is the ported CNN; dlib-hog is refused in one line; each detector's chips are cached apart."""
    from typer.testing import CliRunner

    from pdsn_cli.align import aligner
    from pdsn_cli.cli import app as pdsn_app

    monkeypatch.setattr(aligner, "dlib_installed", lambda: False)
    monkeypatch.delenv(aligner.FACE_DETECTOR_ENV, raising=False)
    assert aligner.resolve_face_detector() == "cnn"
    with pytest.raises(BadInputError, match="dlib-hog needs dlib"):
        aligner.resolve_face_detector("dlib-hog")
    with pytest.raises(BadInputError, match="must be one of"):
        aligner.resolve_face_detector("haar")
    assert ChipCache(tmp_path, "dlib150", tmp_path / "c").dir.name == "dlib150-cnn"
    r = CliRunner().invoke(pdsn_app, ["--face-detector", "dlib-hog", "occluders"])
    assert r.exit_code == 2 and "dlib-hog needs dlib" in r.output
    monkeypatch.setattr(aligner, "dlib_installed", lambda: True)
    assert aligner.resolve_face_detector() == "dlib-hog"
    assert ChipCache(tmp_path, "dlib150", tmp_path / "c").dir.name == "dlib150"  # the caches made before the port


def test_ported_cnn_aligner_finds_and_landmarks_generated_faces():
    """The no-dlib path end to end on generated photos: a face found near the truth, landmarks near the truth."""
    from pdsn_cli.align.aligner import FaceAligner

    al = FaceAligner(face_detector="cnn")
    assert al.hog is None
    for f in list(synthetic_faces(2, 1, seed=5)):
        arc5, dlib5, dlib68, detected, n = al.find_points(f.image)
        assert detected and n >= 1
        eye_dist = np.hypot(*(f.landmarks[1] - f.landmarks[0]))
        assert np.abs(arc5[:2] - f.landmarks[:2]).max() < 0.25 * eye_dist
