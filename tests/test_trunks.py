"""Trunks load their releases' state_dicts by name, split cleanly at mask points, and load weights safely."""

from __future__ import annotations

import pickle

import pytest
import torch

from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.checkpoint import extract_state_dict, load_state_dict_safely, save_checkpoint
from pdsn_cli.trunks.iresnet import build_iresnet50, build_iresnet100
from pdsn_cli.trunks.lresnet import build as build_lresnet
from pdsn_cli.trunks.tiny import build as build_tiny

torch.set_num_threads(1)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and PReLU slopes, so that a round trip that dropped any buffer shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                # fan-in scaling keeps 100 layers finite (arcface_torch's N(0, 0.1) init overflows in eval)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model.eval()


def _image(trunk, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *trunk.input_size, generator=g) * 255


# Known names and shapes of the releases: PDSN/FROM's LResNet50E-IR and insightface arcface_torch's iResNet.
RELEASE_KEYS = {
    "lresnet50e-ir": {
        "conv1.weight": (64, 3, 3, 3),
        "prelu1.weight": (64,),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer3.13.prelu1.weight": (256,),
        "layer4.2.bn3.running_var": (512,),
        "fc.0.running_mean": (512 * 7 * 6,),
        "fc.2.weight": (512, 512 * 7 * 6),
        "fc.3.running_var": (512,),
    },
    "iresnet50": {
        "prelu.weight": (64,),
        "layer2.3.prelu.weight": (128,),
        "layer3.13.bn3.running_var": (256,),
        "layer4.0.downsample.1.running_mean": (512,),
        "bn2.running_var": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "features.weight": (512,),
        "features.running_var": (512,),
    },
    "iresnet100": {
        "layer2.12.conv2.weight": (128, 128, 3, 3),
        "layer3.29.bn3.running_var": (256,),
        "features.bias": (512,),
    },
}
# key counts of the reference implementations' state_dicts (incl. num_batches_tracked)
RELEASE_KEY_COUNT = {"iresnet50": 475, "iresnet100": 925}


@pytest.mark.parametrize(
    "name, builder",
    [("lresnet50e-ir", build_lresnet), ("iresnet50", build_iresnet50), ("iresnet100", build_iresnet100)],
)
def test_release_names_and_round_trip(tmp_path, name, builder):
    torch.manual_seed(0)
    model = _perturb(builder(None))
    sd = model.state_dict()
    for key, shape in RELEASE_KEYS[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    if name in RELEASE_KEY_COUNT:
        assert len(sd) == RELEASE_KEY_COUNT[name]
    # releases wrap weights as {"state_dict": ...} saved through DataParallel
    release = {"module." + k: v for k, v in sd.items()}
    if name == "lresnet50e-ir":
        # FROM / PDSN-Siamese checkpoints carry their mask branch beside the trunk
        release["module.fpn.P5_1.weight"] = torch.zeros(256, 512, 1, 1)
        release["module.regress.2.weight"] = torch.zeros(101, 21504)
    path = tmp_path / f"{name}.pth.tar"
    save_checkpoint(path, state_dict=release, epoch=3, arch=name)
    loaded = builder(str(path)).eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert loaded.name == name
    if name != "iresnet100":  # equal weights already imply it; its forward alone costs seconds on a CPU
        x = _image(model)
        with torch.no_grad():
            out = model(x)
            assert torch.isfinite(out).all()
            assert torch.equal(loaded(x), out)


def test_lresnet_geometry_and_split():
    torch.manual_seed(0)
    m = _perturb(build_lresnet(None))
    assert (m.template, m.input_size, m.embedding_dim) == ("arc112x96", (112, 96), 512)
    assert m.default_mask_point == "layer4"
    x = _image(m, 1)
    with torch.no_grad():
        f4 = m.features(x)
        assert tuple(f4.shape) == (1, 512, 7, 6)
        out = m(x)
        assert out.shape == (1, 512)
        assert torch.equal(m.head(f4), out)
        f3 = m.features(x, "layer3")
        assert tuple(f3.shape) == (1, 256, 14, 12)
        assert torch.equal(m.head(f3, "layer3"), out)
    with pytest.raises(BadInputError, match="no mask point"):
        m.features(x, "layer9")


def test_iresnet_geometry_and_frozen_embedding_scale():
    m = build_iresnet50(None).eval()
    assert (m.template, m.input_size, m.embedding_dim) == ("arc112x112", (112, 112), 512)
    assert m.feature_shape() == (512, 7, 7)
    assert m.feature_shape("layer3") == (256, 14, 14)
    # the method stays a method even though a submodule is registered under the same name
    assert callable(m.features) and isinstance(m.embedding_bn, torch.nn.BatchNorm1d)
    assert not m.embedding_bn.weight.requires_grad


def test_tiny_geometry_split_and_round_trip(tmp_path):
    torch.manual_seed(0)
    m = _perturb(build_tiny(None))
    assert (m.template, m.input_size, m.embedding_dim) == ("arc112x96", (112, 96), 128)
    assert m.feature_shape() == (128, 7, 6)
    x = _image(m, 3)
    with torch.no_grad():
        for point in m.mask_points:
            assert torch.equal(m.head(m.features(x, point), point), m(x))
    save_checkpoint(tmp_path / "tiny.pt", state_dict=m.state_dict())
    loaded = build_trunk("tiny", str(tmp_path / "tiny.pt"))
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_mismatch_names_missing_unexpected_and_shapes(tmp_path):
    tiny = build_tiny(None)
    save_checkpoint(tmp_path / "tiny.pt", model=tiny.state_dict())
    with pytest.raises(SchemaError) as e:
        build_lresnet(str(tmp_path / "tiny.pt"))
    msg = str(e.value)
    assert "does not fit lresnet50e-ir" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "\n" not in msg

    sd = dict(tiny.state_dict())
    sd["fc.2.weight"] = torch.zeros(64, 128 * 7 * 6)
    sd.pop("stem.0.weight")
    save_checkpoint(tmp_path / "bad.pt", state_dict=sd)
    with pytest.raises(SchemaError) as e:
        build_tiny(str(tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "1 missing keys: stem.0.weight" in msg
    assert "fc.2.weight file (64, 5376) vs model (128, 5376)" in msg


def test_old_checkpoints_without_bn_counters_load(tmp_path):
    m = _perturb(build_tiny(None))
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    loaded = build_tiny(str(tmp_path / "old.pth"))
    x = _image(m)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), m(x))


class _Evil:
    """Unpickling this creates a file: stands for any payload a hostile checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_executing_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(SchemaError, match="refused"):
        load_state_dict_safely(build_tiny(None), path)
    assert not marker.exists()


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(SchemaError):
        build_tiny(str(tmp_path / "junk.pth"))
    with pytest.raises(BadInputError, match="no such weights file"):
        build_tiny(str(tmp_path / "absent.pth"))
    save_checkpoint(tmp_path / "empty.pt", epoch=1)
    with pytest.raises(SchemaError, match="holds no tensors"):
        build_tiny(str(tmp_path / "empty.pt"))


def test_extract_state_dict_unwraps_nested_and_prefixed():
    t = torch.ones(2)
    sd = extract_state_dict({"model": {"state_dict": {"module.module.a.weight": t, "step": 3}}})
    assert list(sd) == ["a.weight"] and sd["a.weight"] is t
    assert list(extract_state_dict({"backbone": {"b": t}})) == ["b"]


def test_save_checkpoint_is_atomic_and_plain(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, a=torch.zeros(2), meta={"k": [1, 2.0, "x", None, True]})
    assert path.exists() and not (tmp_path / "c.pt.partial").exists()
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "d.pt", obj=object())
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "d.pt.partial").exists()
    # a refused write leaves the previous file as it was
    with pytest.raises(TypeError):
        save_checkpoint(path, obj={1, 2})
    assert torch.load(path, weights_only=True)["meta"]["k"][2] == "x"


def test_safetensors_when_available(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = _perturb(build_tiny(None))
    st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = build_tiny(str(tmp_path / "w.safetensors")).eval()
    x = _image(m)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
