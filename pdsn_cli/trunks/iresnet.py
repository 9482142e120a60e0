"""iResNet-50 / iResNet-100 as in insightface's ``arcface_torch/backbones/iresnet.py``.

112×112 RGB input, stride-1 3×3 stem, IBasicBlock stages [3, 4, 14, 3] (r50) or [3, 13, 30, 3] (r100) with
64-128-256-512 filters, a 512×7×7 top map, then bn2 → flatten → dropout → fc(25088 → 512) → features (BN1d
with its scale frozen at 1). Parameter names are arcface_torch's, so its ``backbone.pth`` loads as is.

One wrinkle: arcface_torch calls the final BatchNorm1d ``features``, which is also the name of the
:class:`Trunk` method. The module is registered under that name (so ``state_dict`` keys stay
``features.weight`` ...) and reached through :attr:`IResNet.embedding_bn`; ``self.features`` stays the method.
"""

from __future__ import annotations

import torch
from torch import nn

from pdsn_cli.trunks.base import Trunk
from pdsn_cli.trunks.checkpoint import load_state_dict_safely
from pdsn_cli.trunks.weights import TrunkWeights

#: arcface_torch's ``backbone.pth``; its data pipeline normalises ((x / 255) - 0.5) / 0.5
WEIGHTS = TrunkWeights(template="arc112x112", input_size=(112, 112), mean=127.5, std=127.5, file="backbone.pth")


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(Trunk):
    weights = WEIGHTS
    embedding_dim = 512
    stages = ("layer1", "layer2", "layer3", "layer4")
    mask_points = ("layer3", "layer4")
    default_mask_point = "layer4"

    def __init__(self, name: str, layers: tuple[int, int, int, int], dropout: float = 0.0, num_features: int = 512):
        super().__init__()
        self.name = name
        self.embedding_dim = num_features
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
            blocks = [IBasicBlock(inplanes, planes, 2, down)] + [IBasicBlock(planes, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        # not in-place (arcface_torch's is): the input may be a masked map the caller still holds
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        # add_module refuses a name that shadows a method, so register it directly (see module docstring)
        self._modules["features"] = nn.BatchNorm1d(num_features, eps=1e-05)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.embedding_bn.weight)
        # arcface_torch trains with the embedding BN's scale fixed at 1
        self.embedding_bn.weight.requires_grad = False

    @property
    def embedding_bn(self) -> nn.BatchNorm1d:
        return self._modules["features"]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn1(self.conv1(x)))

    def forward_embedding(self, f: torch.Tensor) -> torch.Tensor:
        f = self.dropout(torch.flatten(self.bn2(f), 1))
        return self.embedding_bn(self.fc(f))


def build_iresnet50(weights: str | None = None) -> IResNet:
    model = IResNet("iresnet50", (3, 4, 14, 3))
    if weights is not None:
        load_state_dict_safely(model, weights)
    return model


def build_iresnet100(weights: str | None = None) -> IResNet:
    model = IResNet("iresnet100", (3, 13, 30, 3))
    if weights is not None:
        load_state_dict_safely(model, weights)
    return model
