"""LResNet50E-IR, the trunk of the PDSN paper (and of FROM, CosFace_pytorch's ArcFace variant).

112×96 RGB input, a stride-1 3×3 stem, four stages of "improved residual" (IR) blocks [3, 4, 14, 3] with
64-64-128-256-512 filters, each stage halving the resolution, to a 512×7×6 map; the embedding head is
BN1d(21504) → Dropout(0.4) → Linear(21504 → 512) → BN1d(512). Module names follow the PDSN/FROM release
(``conv1 bn1 prelu1 layer1..4 fc.0..3``; blocks ``bn1 conv1 bn2 prelu1 conv2 bn3 downsample.0/1``) so that
their ``state_dict`` loads as is. PDSN masks the ``layer4`` map.
"""

from __future__ import annotations

import torch
from torch import nn

from pdsn_cli.trunks.base import Trunk
from pdsn_cli.trunks.checkpoint import load_state_dict_safely
from pdsn_cli.trunks.weights import TrunkWeights

#: branches the PDSN-Siamese / FROM releases keep beside the trunk; not part of the recognition model
RELEASE_EXTRA_BRANCHES = ("sia.", "fpn.", "mask.", "reduces.", "regress.")
#: the PDSN/FROM release: (x/255 - 0.5) / 0.5, its ToTensor + Normalize(0.5, 0.5)
WEIGHTS = TrunkWeights(template="arc112x96", input_size=(112, 96), mean=127.5, std=127.5,
                       ignore_prefixes=RELEASE_EXTRA_BRANCHES)


class BlockIR(nn.Module):
    """BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus the (projected) shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int, dim_match: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu1 = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        if dim_match:
            self.downsample = None
        else:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu1(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class LResNet(Trunk):
    name = "lresnet50e-ir"
    weights = WEIGHTS
    embedding_dim = 512
    stages = ("layer1", "layer2", "layer3", "layer4")
    mask_points = ("layer3", "layer4")
    default_mask_point = "layer4"

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 14, 3),
        filters: tuple[int, ...] = (64, 64, 128, 256, 512),
        embedding_dim: int = 512,
        dropout: float = 0.4,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.conv1 = nn.Conv2d(3, filters[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.prelu1 = nn.PReLU(filters[0])
        for i, n in enumerate(layers):
            blocks = [BlockIR(filters[i], filters[i + 1], 2, False)]
            blocks += [BlockIR(filters[i + 1], filters[i + 1], 1, True) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        # four stride-2 stages: 112×96 → 7×6
        top = filters[-1] * (self.input_size[0] // 16) * (self.input_size[1] // 16)
        self.fc = nn.Sequential(
            nn.BatchNorm1d(top),
            nn.Dropout(p=dropout),
            nn.Linear(top, embedding_dim),
            nn.BatchNorm1d(embedding_dim),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu1(self.bn1(self.conv1(x)))

    def forward_embedding(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(f, 1))


def build(weights: str | None = None) -> LResNet:
    """LResNet50E-IR; ``weights`` is a PDSN/FROM-style checkpoint, or None for a random init (training)."""
    model = LResNet()
    if weights is not None:
        load_state_dict_safely(model, weights, ignore_prefixes=WEIGHTS.ignore_prefixes)
    return model
