"""``pdsn occlude``: an occluder drawn on a photo's face, as the benchmarks draw it on the aligned chip."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from conftest import hog_detectable_faces, needs_dlib, write_jpeg
from pdsn_cli.align.aligner import FaceAligner
from pdsn_cli.data.faces import read_image
from pdsn_cli.occlusion.photo import occlude_photo
from pdsn_cli.cli import app

runner = CliRunner()


@needs_dlib
def test_occluder_lands_on_the_face_and_nowhere_else(tmp_path):
    face = next(iter(hog_detectable_faces(1, 1, seed=3).values()))[0]
    res = occlude_photo(face.image, "sunglasses", seed=1, aligner=FaceAligner(use_cnn=False))
    changed = np.abs(res.image.astype(int) - face.image.astype(int)).max(2) > 8
    assert res.kind == "sunglasses" and res.pixels > 100
    ys, xs = np.nonzero(changed)
    eyes = face.landmarks[:2]  # the eye centres, in photo pixels
    assert ys.min() <= eyes[:, 1].min() <= ys.max() and xs.min() <= eyes[:, 0].min() and eyes[:, 0].max() <= xs.max()
    assert changed.mean() < 0.25  # the rest of the photo is untouched
    # same seed, same drawing
    again = occlude_photo(face.image, "sunglasses", seed=1, aligner=FaceAligner(use_cnn=False))
    np.testing.assert_array_equal(again.image, res.image)


@needs_dlib
def test_occlude_command_writes_the_photo_and_refuses_bad_input(tmp_path):
    face = next(iter(hog_detectable_faces(1, 1, seed=3).values()))[0]
    photo = write_jpeg(tmp_path / "me.jpg", face.image)
    r = runner.invoke(app, ["occlude", str(photo), "--occluder", "mask", "--out", str(tmp_path / "out.png")])
    assert r.exit_code == 0, r.output
    assert read_image(tmp_path / "out.png").shape == face.image.shape and "mask drawn over" in r.output
    write_jpeg(tmp_path / "wall.jpg", np.full((120, 120, 3), 90, np.uint8))
    for args, message in [([str(tmp_path / "wall.jpg"), "--occluder", "mask"], "no face found"),
                          ([str(photo), "--occluder", "none"], "draws nothing"),
                          ([str(photo), "--occluder", "hat"], "unknown occlusion"),
                          ([str(photo), "--occluder", "block"], "give one (block:J"),
                          ([str(tmp_path), "--occluder", "mask"], "is a folder, not an image"),
                          ([str(tmp_path / "nope.jpg"), "--occluder", "mask"], "no such image")]:
        r = runner.invoke(app, ["occlude", *args, "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert not (tmp_path / "x.png").exists()
    r = runner.invoke(app, ["occlude", str(photo), "--occluder", "mask", "--out", str(photo)])
    assert r.exit_code == 2  # the photo itself is never overwritten
