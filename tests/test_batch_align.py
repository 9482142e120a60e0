"""BatchAligner (align/batch_align.py) against the one-photo CPU path: FaceAligner(face_detector="cnn") +
align_with_points, on generated photos (JPEG, PNG, EXIF-rotated, not an image, no face, two sizes)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_jpeg
from pdsn_cli.align import aligner as aligner_mod
from pdsn_cli.align import batch_align
from pdsn_cli.align.aligner import FaceAligner
from pdsn_cli.align.batch_align import DETECTED, FALLBACK, UNREADABLE, BatchAligner, warp_batch
from pdsn_cli.align.mmod_detector import pyramid_up, pyramid_up_tensor
from pdsn_cli.align.templates import align_with_points, warp
from pdsn_cli.data.faces import BadImage, read_image
from pdsn_cli.data.synthetic import synthetic_faces


def _cpu_path(path_or_image, template="dlib150", landmarks=5, **kw):
    """(chip, arc5 in chip pixels, status) as the chip cache makes them with the CNN detector."""
    try:
        image = read_image(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    except BadImage:
        return None, None, UNREADABLE
    arc5, dlib5, dlib68, detected, _ = FaceAligner(face_detector="cnn", **kw).find_points(image)
    chip, lm = align_with_points(image, arc5, dlib5, template, dlib68 if landmarks == 68 else None)
    return chip, lm, DETECTED if detected else FALLBACK


def _assert_close(got: torch.Tensor, want: np.ndarray):
    diff = np.abs(got.numpy().astype(int) - want)
    # the warp's float rounding can fall the other way on a pixel: one grey level, rarely
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-photos")
    faces = synthetic_faces(3, 1, seed=5)
    write_jpeg(root / "a.jpg", faces[0].image)
    Image.fromarray(faces[1].image).save(root / "b.png")  # PNG: decoded on the host
    # a phone photo stored sideways (EXIF orientation 6): read_image turns it upright, decode_jpeg would not
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(faces[2].image, 1))).save(root / "c.jpg", exif=exif, quality=95)
    write_jpeg(root / "small.jpg", synthetic_faces(1, 1, seed=7, size=200)[0].image)  # a second size
    (root / "notes.jpg").write_text("not an image")
    yy, xx = np.mgrid[0:250, 0:250]
    write_jpeg(root / "wall.jpg", np.stack([xx, yy, xx // 2 + 60], -1).astype(np.uint8))  # no face: fallback
    return root


def test_pyramid_up_on_tensors_is_the_numpy_port_bit_for_bit():
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (64, 61), (250, 250)):
        imgs = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        up = pyramid_up_tensor(torch.from_numpy(imgs))
        for k in range(2):
            np.testing.assert_array_equal(up[k].numpy(), pyramid_up(imgs[k]))


@pytest.mark.parametrize("truncate", [False, True])
def test_warp_batch_matches_templates_warp(truncate):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 120, 90, 3), dtype=np.uint8)
    imgs = np.ascontiguousarray(np.repeat(np.repeat(imgs[:, ::4, ::3], 4, 1), 3, 2))  # smooth-ish, not noise
    mats = []
    for k in range(3):
        a, s = rng.uniform(-0.4, 0.4), rng.uniform(0.6, 1.6)
        mats.append(np.array([[s * np.cos(a), -s * np.sin(a), rng.uniform(-30, 10)],
                              [s * np.sin(a), s * np.cos(a), rng.uniform(-30, 10)]]))
    out = warp_batch(torch.from_numpy(imgs), np.stack(mats), (112, 96), truncate)
    for k in range(3):
        want = warp(imgs[k], mats[k], (112, 96), truncate=truncate)
        diff = np.abs(out[k].numpy().astype(int) - want)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_files_match_the_cpu_path(photo_folder):
    paths = [photo_folder / n for n in ("a.jpg", "b.png", "c.jpg", "small.jpg", "notes.jpg", "wall.jpg")]
    out = BatchAligner("cpu", "dlib150").align_files(paths)
    assert out.chips.shape == (6, 150, 150, 3) and out.chips.dtype == torch.uint8
    assert out.landmarks.shape == (6, 5, 2)
    assert out.status[4] == UNREADABLE and "not an image" in out.reasons[4]
    assert (out.chips[4] == 0).all() and np.isnan(out.landmarks[4]).all()
    assert out.status[5] == FALLBACK and out.faces[5] == 0
    assert out.status.count(DETECTED) >= 3  # the synthetic faces are found
    assert out.ok.tolist() == [True, True, True, True, False, True]
    for i, p in enumerate(paths):
        chip, lm, status = _cpu_path(p)
        assert out.status[i] == status, p.name
        if chip is not None:
            _assert_close(out.chips[i], chip)
            np.testing.assert_allclose(out.landmarks[i], lm, atol=1e-4)


def test_tensors_arc_template_68_landmarks_and_the_downscale_rule(photo_folder, monkeypatch):
    """align_tensors on decoded photos; a photo above the CNN's size limit is searched on a downscaled copy."""
    images = [read_image(photo_folder / n) for n in ("a.jpg", "small.jpg")]
    for tpl, lm in (("arc112x96", 5), ("dlib150", 68)):
        out = BatchAligner("cpu", tpl, lm).align_tensors([torch.from_numpy(im.copy()) for im in images] + [None])
        assert out.status[2] == UNREADABLE
        for i, im in enumerate(images):
            chip, want_lm, status = _cpu_path(im, tpl, lm)
            assert out.status[i] == status == DETECTED
            _assert_close(out.chips[i], chip)
            np.testing.assert_allclose(out.landmarks[i], want_lm, atol=1e-4)
    monkeypatch.setattr(aligner_mod, "CNN_MAX_SIDE", 220)
    monkeypatch.setattr(batch_align, "CNN_MAX_SIDE", 220)
    out = BatchAligner("cpu", "dlib150", max_centre_offset=0.3).align_tensors([images[0]])
    chip, _, status = _cpu_path(images[0], max_centre_offset=0.3)
    assert out.status[0] == status
    _assert_close(out.chips[0], chip)


def test_a_truncated_jpeg_is_left_to_read_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(synthetic_faces(1, 1, seed=2)[0].image).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert not batch_align._device_decodable((tmp_path / "cut.jpg").read_bytes())
    assert batch_align._device_decodable(buf.getvalue())
    with pytest.raises(BadImage) as e:
        read_image(tmp_path / "cut.jpg")
    out = BatchAligner("cpu").align_files([tmp_path / "cut.jpg"])
    assert out.status == [UNREADABLE] and out.reasons == [str(e.value)]


def test_grey_and_progressive_jpegs_decode_as_read_image(tmp_path):
    face = synthetic_faces(1, 1, seed=4)[0].image
    Image.fromarray(face).convert("L").save(tmp_path / "grey.jpg", quality=90)
    Image.fromarray(face).save(tmp_path / "prog.jpg", quality=90, progressive=True)
    for name in ("grey.jpg", "prog.jpg"):
        data = (tmp_path / name).read_bytes()
        assert batch_align._device_decodable(data)
        (got,) = batch_align._decode_on(torch.device("cpu"), [data])
        np.testing.assert_array_equal(got.numpy(), read_image(tmp_path / name))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_on_cuda_pyramid_up_is_exact_and_chips_match_the_cpu_path(photo_folder):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (2, 250, 250, 3), dtype=np.uint8)
    up = pyramid_up_tensor(torch.from_numpy(imgs).cuda()).cpu()
    for k in range(2):
        np.testing.assert_array_equal(up[k].numpy(), pyramid_up(imgs[k]))
    paths = [photo_folder / n for n in ("a.jpg", "b.png", "c.jpg", "small.jpg", "notes.jpg", "wall.jpg")]
    out = BatchAligner("cuda", "dlib150").align_files(paths)
    assert out.chips.is_cuda
    for i, p in enumerate(paths):
        chip, _, status = _cpu_path(p)
        assert out.status[i] == status, p.name
        if chip is not None:  # nvJPEG decodes the JPEGs: a grey level or two apart is expected, not more
            diff = np.abs(out.chips[i].cpu().numpy().astype(int) - chip)
            assert diff.mean() < 2, (p.name, diff.mean(), diff.max())


def test_chip_cache_aligns_on_a_device_as_its_workers_do(tmp_path, monkeypatch):
    """ChipCache(align_device=…) with the CNN detector: the batches give the per-photo path's chips, statuses and
    skips; a photo with its own landmark file still goes the per-photo way; dlib's HOG declines the device."""
    import json

    from pdsn_cli.data.chip_cache import ChipCache
    from pdsn_cli.data.faces import list_identity_folder

    root = tmp_path / "people"
    faces = synthetic_faces(2, 2, seed=7)
    for k, f in enumerate(faces):
        write_jpeg(root / f.identity / f"{f.identity}_{k:04d}.jpg", f.image)
    (root / faces[0].identity / "broken.jpg").write_bytes(b"not a jpeg")
    side = root / faces[0].identity / f"{faces[0].identity}_0000.jpg.json"
    side.write_text(json.dumps({"points": faces[0].landmarks.tolist()}))
    items, _ = list_identity_folder(root)
    monkeypatch.setenv(aligner_mod.FACE_DETECTOR_ENV, "cnn")
    per_photo = ChipCache(root, "dlib150", tmp_path / "c1")
    on_device = ChipCache(root, "dlib150", tmp_path / "c2", align_device=torch.device("cpu"))
    r1, r2 = per_photo.ensure(items), on_device.ensure(items)
    assert (r1.aligned_now, r1.fallbacks, r1.from_landmark_files, len(r1.skipped)) == \
           (r2.aligned_now, r2.fallbacks, r2.from_landmark_files, len(r2.skipped)) == (4, 0, 1, 1)
    good = [it.path for it in items if not it.path.endswith("broken.jpg")]
    a, b = per_photo.load(good), on_device.load(good)
    np.testing.assert_array_equal(a.aligned_by, b.aligned_by)
    for x, y in zip(a.image, b.image):
        _assert_close(torch.from_numpy(y), x)
    monkeypatch.setenv(aligner_mod.FACE_DETECTOR_ENV, "dlib-hog")
    if aligner_mod.dlib_installed():
        rep = ChipCache(root, "dlib150", tmp_path / "c3", align_device=torch.device("cpu")).ensure(items[:1])
        assert any("--face-detector cnn" in w for w in rep.warnings)
