"""dlib's ResNet face descriptor in PyTorch: file format, shapes, and parity with dlib itself."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import LFW_DIR
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.dlib_format import DlibReader, _read_details, read_net, read_net_file
from pdsn_cli.trunks.dlib_resnet import DlibResNet, build, expected_layer_kinds, packaged_weights_path

POINT_SHAPES = {"level3": (64, 17, 17), "level2": (128, 8, 8), "level1": (256, 4, 4), "level0": (256, 2, 2)}


def face_like_chip(rng: np.random.Generator, size: int = 150) -> np.ndarray:
    """A 150×150 RGB chip with a smooth background, a skin-toned face ellipse, eyes, brows, nose
    and mouth, plus fine texture: enough structure to drive every layer away from degenerate
    activations (the port is compared numerically, not semantically)."""
    low = rng.uniform(0, 255, (5, 5, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    c = size / 2
    cx, cy = int(c + rng.normal(0, 3)), int(c + rng.normal(0, 4))
    skin = rng.uniform([150, 100, 80], [235, 185, 155]).tolist()
    cv2.ellipse(img, (cx, cy), (int(rng.uniform(40, 50)), int(rng.uniform(55, 65))), 0, 0, 360, skin, -1)
    dark = rng.uniform(10, 70, 3).tolist()
    for side in (-1, 1):
        ex, ey = cx + side * int(rng.uniform(18, 24)), cy - int(rng.uniform(10, 16))
        cv2.ellipse(img, (ex, ey), (9, 5), 0, 0, 360, (235, 235, 235), -1)
        cv2.circle(img, (ex, ey), 4, dark, -1)
        cv2.line(img, (ex - 10, ey - 10), (ex + 10, ey - 12), dark, 3)
    cv2.line(img, (cx, cy - 5), (cx - 3, cy + 15), [0.7 * s for s in skin], 3)
    cv2.ellipse(img, (cx, cy + 30), (int(rng.uniform(12, 18)), 5), 0, 0, 360, (150, 50, 60), -1)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_batch(chips: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The suite shares 2 cores with other work; OpenMP's 2-thread barriers stall badly when the
    # other core is busy (a batch-2 forward goes from ~20 ms to ~1 s), one thread does not.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> DlibResNet:
    return build()


@pytest.fixture(scope="module")
def chips() -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    return [face_like_chip(rng) for _ in range(8)]


# -- file format ------------------------------------------------------------------------------


def test_primitives_follow_dlib_serialization():
    # bytes as dlib writes them: int 1, string "ab", int -300, float 0.04 (mantissa 0xa3d70a,
    # exponent -28), bool true, tensor v2 of shape 1x1x1x2, alias_tensor 1x2x1x1
    data = (
        bytes([0x01, 0x01, 0x01, 0x02]) + b"ab" + bytes([0x82, 0x2C, 0x01])
        + bytes([0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C]) + b"1"
        + bytes([0x01, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x02])
        + np.array([1.5, -2.0], "<f4").tobytes()
        + bytes([0x01, 0x01, 0x01, 0x01, 0x01, 0x02, 0x01, 0x01, 0x01, 0x01])
    )
    r = DlibReader(data)
    assert r.int() == 1
    assert r.string() == "ab"
    assert r.int() == -300
    assert r.float() == pytest.approx(0.04, abs=1e-9)
    assert r.bool() is True
    np.testing.assert_array_equal(r.tensor(), np.array([1.5, -2.0], np.float32).reshape(1, 1, 1, 2))
    assert r.alias_tensor() == (1, 2, 1, 1)
    assert r.pos == len(data)


def _dlib_int(v: int) -> bytes:
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little")
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def _dlib_float(v: float) -> bytes:
    m, e = np.frexp(np.float64(v))
    return _dlib_int(int(m * 2**53)) + _dlib_int(int(e) - 53)


def _dlib_tensor(a: np.ndarray) -> bytes:
    dims = a.shape + (1,) * (4 - a.ndim)
    return _dlib_int(2) + b"".join(_dlib_int(d) for d in dims) + a.astype("<f4").tobytes()


def test_batch_norm_layer_is_read_as_folded_affine():
    # dlib's affine_ also loads a training-time bn_con2 by folding its running statistics
    g, b = np.array([2.0, 0.5], np.float32), np.array([0.1, -0.2], np.float32)
    mean, var, eps = np.array([1.0, -1.0], np.float32), np.array([4.0, 0.25], np.float32), 1e-4
    alias = _dlib_int(1) + b"".join(_dlib_int(d) for d in (1, 2, 1, 1))
    blob = (
        _dlib_int(7) + b"bn_con2" + _dlib_tensor(np.concatenate([g, b])) + alias + alias
        + _dlib_tensor(np.zeros(0, np.float32)) + _dlib_tensor(np.zeros(0, np.float32))
        + _dlib_tensor(mean) + _dlib_tensor(var) + _dlib_int(100) + _dlib_int(100)
        + b"".join(_dlib_float(x) for x in (1, 0, 1, 1, eps))
    )
    layer = _read_details(DlibReader(blob))
    scale = g / np.sqrt(var + eps)
    assert layer.kind == "affine" and layer.attrs["mode"] == "conv"
    np.testing.assert_allclose(layer.arrays["gamma"], scale, rtol=1e-6)
    np.testing.assert_allclose(layer.arrays["beta"], b - scale * mean, rtol=1e-6)


def test_packaged_file_parses_to_the_expected_network():
    net = read_net_file(packaged_weights_path())
    assert net.kinds() == expected_layer_kinds()
    assert net.input.attrs["size"] == (150, 150)
    np.testing.assert_allclose(net.input.attrs["mean_rgb"], (122.782, 117.001, 104.298), atol=1e-4)
    assert net.loss is not None and net.loss.kind == "loss_metric"
    convs = [layer for layer in net.layers if layer.kind == "con"]
    assert len(convs) == 29  # the "29 conv layers" of dlib's model description


def test_bad_files_raise_schema_error(tmp_path):
    dat = Path(packaged_weights_path())
    other = dat.with_name("shape_predictor_5_face_landmarks.dat")  # a dlib file, but not a DNN
    if other.exists():
        with pytest.raises(SchemaError):
            build(str(other))
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(dat.read_bytes()[: 5_000_000])
    with pytest.raises(SchemaError, match="ends early"):
        build(str(truncated))
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SchemaError):
        build(str(garbage))
    with pytest.raises(SchemaError):
        build(str(tmp_path))
    with pytest.raises(BadInputError):
        build(str(tmp_path / "missing.dat"))


def test_other_architecture_is_refused():
    net = read_net_file(packaged_weights_path())
    del net.layers[10:18]  # one residual block fewer
    with pytest.raises(SchemaError, match="not dlib's face recognition ResNet"):
        DlibResNet().load_dlib(net)
    with pytest.raises(SchemaError):
        read_net(b"\x01\x01" + b"\x01\x05hello")


# -- module -----------------------------------------------------------------------------------


def test_shapes_and_split_at_every_mask_point(model, chips):
    assert build_trunk("dlib-resnet").name == "dlib-resnet"
    x = to_batch(chips[:2])
    with torch.inference_mode():
        full = model(x)
        assert full.shape == (2, 128)
        for point, shape in POINT_SHAPES.items():
            f = model.features(x, point)
            assert tuple(f.shape) == (2, *shape)
            torch.testing.assert_close(model.head(f, point), full, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.head(model.features(x)), full, rtol=0, atol=1e-5)
    assert model.feature_shape() == POINT_SHAPES["level2"]
    assert model.default_mask_point == "level2"
    with pytest.raises(BadInputError):
        model.features(x, "level4")


def test_gradient_reaches_a_feature_mask(model, chips):
    # PDSN learns masks on frozen features: the head must be differentiable w.r.t. its input
    with torch.no_grad():
        f = model.features(to_batch(chips[:1]), "level1")
    mask = torch.ones(f.shape[1:], requires_grad=True)
    model.head(f * mask, "level1").pow(2).sum().backward()
    assert mask.grad is not None and torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0


def test_untrained_module_has_the_same_shapes():
    m = DlibResNet().eval()
    with torch.inference_mode():
        x = torch.rand(1, 3, 150, 150) * 255
        f = m.features(x, "level2")
        assert tuple(f.shape) == (1, *POINT_SHAPES["level2"])
        assert m.head(f, "level2").shape == (1, 128)


# -- parity with dlib ---------------------------------------------------------------------------


def _dlib_descriptors(chips: list[np.ndarray]) -> np.ndarray:
    dlib = pytest.importorskip("dlib")
    rec = dlib.face_recognition_model_v1(packaged_weights_path())
    one = np.array(rec.compute_face_descriptor(chips[0]))  # the single aligned-chip overload
    batch = np.array([np.array(d) for d in rec.compute_face_descriptor(chips)])  # the batch overload
    np.testing.assert_allclose(one, batch[0], atol=1e-6)
    return batch


def test_matches_dlib_on_generated_chips(model, chips):
    ref = _dlib_descriptors(chips)
    with torch.inference_mode():
        out = model(to_batch(chips)).numpy()
    assert np.abs(out - ref).max() <= 1e-4
    # the chips are not degenerate: descriptors differ from each other as much as faces do
    assert np.linalg.norm(ref[:, None] - ref[None], axis=-1)[np.triu_indices(len(ref), 1)].min() > 0.05


LFW_PEOPLE = ("George_W_Bush", "Colin_Powell", "Tony_Blair", "Serena_Williams")


def _lfw_chips() -> tuple[list[np.ndarray], list[int]]:
    dlib = pytest.importorskip("dlib")
    models = os.path.dirname(packaged_weights_path())
    detector = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
    chips, labels = [], []
    for label, person in enumerate(LFW_PEOPLE):
        got = 0
        for path in sorted((LFW_DIR / person).glob("*.jpg")):
            img = dlib.load_rgb_image(str(path))
            faces = detector(img, 1)
            if len(faces) != 1:
                continue
            chips.append(np.asarray(dlib.get_face_chip(img, sp(img, faces[0]), size=150, padding=0.25)))
            labels.append(label)
            got += 1
            if got == 2:
                break
    return chips, labels


@pytest.mark.skipif(not LFW_DIR.is_dir(), reason="LFW not present beside the repo")
def test_matches_dlib_on_lfw_and_recognises_people(model):
    chips, labels = _lfw_chips()
    assert len(chips) == 2 * len(LFW_PEOPLE)
    ref = _dlib_descriptors(chips)
    with torch.inference_mode():
        out = model(to_batch(chips)).numpy()
    assert np.abs(out - ref).max() <= 1e-4
    d = np.linalg.norm(out[:, None] - out[None], axis=-1)
    labels = np.array(labels)
    same = labels[:, None] == labels[None]
    for i in range(len(labels)):
        j = next(k for k in range(len(labels)) if k != i and same[i, k])
        # each image is closer to the other image of its person than to anyone else's
        assert d[i, j] < d[i][~same[i]].min()
    assert d[same & ~np.eye(len(labels), dtype=bool)].max() < 0.6  # dlib's own match threshold
