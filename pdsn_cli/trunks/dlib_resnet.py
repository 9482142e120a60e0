"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1``), ported to PyTorch.

The network is the one of dlib's ``dnn_face_recognition_ex.cpp`` (29 conv layers, 128-D output,
99.38% on LFW as published). Weights are read straight from dlib's ``.dat`` file by
:mod:`pdsn_cli.trunks.dlib_format`, so dlib itself is not needed at run time.

Layout (150×150 RGB chip as aligned by ``dlib.get_face_chip(..., size=150, padding=0.25)``)::

    (x - mean_rgb) / 256
    stem    con 32 7×7 s2 -> affine -> relu -> max_pool 3×3 s2      32×35×35
    level4  3× ares<32>                                             32×35×35
    level3  ares_down<64>  + 3× ares<64>                            64×17×17
    level2  ares_down<128> + 2× ares<128>                          128×8×8
    level1  ares_down<256> + 2× ares<256>                          256×4×4
    level0  ares_down<256>                                         256×2×2
    mean over H×W -> fc_no_bias 128

``ares`` is relu(x + affine(con 3×3(relu(affine(con 3×3(x)))))); ``ares_down`` has a stride-2
first conv and adds avg_pool 2×2 s2 of the input instead of the input. dlib conventions that
matter for exactness: convolutions and pools with stride != 1 use no padding (stride 1 pads k//2),
and ``add_prev`` of two tensors of different shapes zero-pads the smaller one at the bottom/right
and in the extra channels (in level1 the 3×3 conv branch meets a 4×4 shortcut; in level0 1×1
meets 2×2). Every affine (batch norm folded by dlib at save time) is folded into the conv before
it, so inference is plain conv+bias.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.base import Trunk
from pdsn_cli.trunks.dlib_format import DlibNet, read_net_file
from pdsn_cli.trunks.weights import TrunkWeights

WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
#: dlib's input_rgb_image_sized defaults, also stored in the .dat
DEFAULT_MEAN_RGB = (122.782, 117.001, 104.298)
#: dlib's released descriptor, as shipped by the face_recognition_models package; (x - mean_rgb) / 256 with the
#: mean read from the .dat (DEFAULT_MEAN_RGB when absent)
WEIGHTS = TrunkWeights(template="dlib150", input_size=(150, 150), mean=DEFAULT_MEAN_RGB, std=256.0,
                       file=WEIGHTS_FILE, package="face_recognition_models", package_dir="models")

# (stage name, channels, number of ares blocks after the optional ares_down, has ares_down)
_STAGES = (
    ("level4", 32, 3, False),
    ("level3", 64, 3, True),
    ("level2", 128, 2, True),
    ("level1", 256, 2, True),
    ("level0", 256, 0, True),
)


def packaged_weights_path() -> str:
    """The .dat shipped in the face_recognition_models package (see TrunkWeights.packaged_path)."""
    return WEIGHTS.packaged_path()


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger shape, each operand zero-padded at the end of the
    channel, row and column axes (in level1 a 256×3×3 conv branch meets a 128×4×4 shortcut)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class AResBlock(nn.Module):
    """dlib's ``ares`` (stride 1, identity shortcut) or ``ares_down`` (stride 2, avg-pool shortcut),
    with each affine folded into its conv."""

    def __init__(self, in_channels: int, channels: int, down: bool):
        super().__init__()
        self.down = down
        stride, pad = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=pad)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x), inplace=True))
        if self.down:
            return F.relu(_add_padded(y, F.avg_pool2d(x, 2, 2)), inplace=True)
        return F.relu(y.add_(x), inplace=True)


class DlibResNet(Trunk):
    name = "dlib-resnet"
    weights = WEIGHTS
    embedding_dim = 128
    stages = tuple(name for name, *_ in _STAGES)
    mask_points = ("level3", "level2", "level1", "level0")
    # PDSN masks level2 (128×8×8) by default: on a frozen dlib trunk, masking the 256×4×4 / 256×2×2 maps cost
    # accuracy on occluded LFW in every setting we tried, while the 8×8 map (closest to the paper's 7×6) helped
    # (pilot on 400 training images; figures in the project's closing notes and README).
    default_mask_point = "level2"

    def __init__(self, mean_rgb: tuple[float, float, float] = DEFAULT_MEAN_RGB):
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        cin = 32
        for name, ch, n_ares, down in _STAGES:
            blocks = [AResBlock(cin, ch, down=True)] if down else []
            blocks += [AResBlock(ch, ch, down=False) for _ in range(n_ares)]
            self.add_module(name, nn.Sequential(*blocks))
            cin = ch
        self.fc = nn.Linear(256, 128, bias=False)
        # weights in the same NHWC layout as the activations (see stem), so no per-call reorder
        self.to(memory_format=torch.channels_last)

    # -- Trunk interface ----------------------------------------------------------------------

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        # the mean is the loaded .dat's (a buffer, so it follows the module to its device)
        return self.weights.transforms(x, mean=self.mean_rgb)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC end to end: oneDNN's CPU convolutions run this net ~1.4x faster than on NCHW
        # (batch 64), and a conv keeps the layout of its input, so converting once is enough.
        x = x.contiguous(memory_format=torch.channels_last)
        return F.max_pool2d(F.relu(self.conv1(x), inplace=True), 3, 2)

    def forward_embedding(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)))

    # -- dlib weights ---------------------------------------------------------------------------

    def convs(self) -> list[nn.Conv2d]:
        """Every conv in dlib's order (input to output)."""
        out = [self.conv1]
        for name in self.stages:
            for block in getattr(self, name):
                out += [block.conv1, block.conv2]
        return out

    @torch.no_grad()
    def load_dlib(self, net: DlibNet, source: str = "<dlib net>") -> DlibResNet:
        """Copy the weights of a parsed dlib net, after checking it is this architecture."""
        expected = expected_layer_kinds()
        got = net.kinds()
        if got != expected:
            mismatches = (i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            first = next(mismatches, min(len(got), len(expected)))
            raise SchemaError(
                f"{source}: not dlib's face recognition ResNet (layer {first}: "
                f"found {got[first] if first < len(got) else 'end'}, expected "
                f"{expected[first] if first < len(expected) else 'end'})"
            )
        if net.input.kind != "input_rgb_image_sized" or tuple(net.input.attrs["size"]) != self.input_size:
            raise SchemaError(f"{source}: expected a 150x150 RGB input layer, found {net.input}")
        layers = net.layers
        convs = [(i, layer) for i, layer in enumerate(layers) if layer.kind == "con"]
        targets = self.convs()
        for (i, con), conv in zip(convs, targets, strict=True):
            affine = layers[i + 1]
            w, b = con.arrays["weight"], con.arrays.get("bias")
            if w.shape != tuple(conv.weight.shape):
                raise SchemaError(f"{source}: conv weight {w.shape} where {tuple(conv.weight.shape)} is expected")
            if tuple(con.attrs["stride"]) != conv.stride or tuple(con.attrs["padding"]) != conv.padding:
                raise SchemaError(f"{source}: conv stride/padding {con.attrs} do not match {conv}")
            g, beta = affine.arrays["gamma"], affine.arrays["beta"]
            if g.shape != (w.shape[0],) or affine.attrs["mode"] != "conv":
                raise SchemaError(f"{source}: affine of {g.shape} values after a {w.shape[0]}-filter conv")
            b = np.zeros(w.shape[0], np.float32) if b is None else b
            # affine(conv(x)) = g*(W*x + b) + beta = (g*W)*x + (g*b + beta)
            conv.weight.copy_(torch.from_numpy(w * g[:, None, None, None]))
            conv.bias.copy_(torch.from_numpy(g * b + beta))
        pools = [layer for layer in layers if layer.kind in ("max_pool", "avg_pool")]
        # max_pool 3x3 s2, one avg_pool 2x2 s2 per ares_down, then avg_pool_everything (window 0)
        want = [((3, 3), (2, 2))] + [((2, 2), (2, 2))] * 4 + [((0, 0), (1, 1))]
        for layer, (kernel, stride) in zip(pools, want, strict=True):
            got = (tuple(layer.attrs["kernel"]), tuple(layer.attrs["stride"]), tuple(layer.attrs["padding"]))
            if got != (kernel, stride, (0, 0)):
                raise SchemaError(f"{source}: unexpected pooling {layer}")
        fc = layers[-1]
        if fc.arrays["weight"].shape != (256, 128) or "bias" in fc.arrays:
            raise SchemaError(f"{source}: expected a 256->128 fc_no_bias, found {fc}")
        self.fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(fc.arrays["weight"].T)))
        self.mean_rgb.copy_(torch.tensor(net.input.attrs["mean_rgb"], dtype=torch.float32).view(1, 3, 1, 1))
        return self


def expected_layer_kinds() -> list[str]:
    """The layer sequence dlib writes for this network, input first (see dlib_format.DlibNet)."""
    tag = "tag_or_skip"
    ares = [tag, "con", "affine", "relu", "con", "affine", "add_prev", "relu"]
    # add_prev2<avg_pool<skip1<tag2<block<tag1<x>>>>>>, then relu
    ares_down = [tag, "con", "affine", "relu", "con", "affine", tag, tag, "avg_pool", "add_prev", "relu"]
    kinds = ["con", "affine", "relu", "max_pool"]
    for _, _, n_ares, down in _STAGES:
        kinds += (ares_down if down else []) + ares * n_ares
    return kinds + ["avg_pool", "fc"]


def build(weights: str | None = None) -> DlibResNet:
    """dlib's face descriptor with its trained weights (``weights``: a dlib .dat; None = packaged)."""
    path = packaged_weights_path() if weights is None else os.fspath(weights)
    if not os.path.exists(path):
        raise BadInputError(f"weights file not found: {path}")
    net = read_net_file(path)
    model = DlibResNet(tuple(net.input.attrs.get("mean_rgb", DEFAULT_MEAN_RGB)))
    model.load_dlib(net, source=path)
    return model.eval()


__all__ = ["WEIGHTS", "DlibResNet", "build", "expected_layer_kinds", "packaged_weights_path"]
