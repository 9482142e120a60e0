"""A small trunk that trains in a minute or two on a laptop CPU, for demos, tests and the synthetic dataset.

Same geometry as LResNet50E-IR (112×96 input, stride 16, a C×7×6 top map that the 5×5 PDSN grid masks, the
same BN1d → Linear → BN1d head), at about 1% of its cost: a stride-2 stem and three stages of
conv3×3-BN-PReLU pairs, each stage starting with a stride-2 conv, to a 128×7×6 map and a 128-D embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from pdsn_cli.trunks.base import Trunk
from pdsn_cli.trunks.checkpoint import load_state_dict_safely
from pdsn_cli.trunks.weights import TrunkWeights

#: trained by ``pdsn train-trunk`` on arc112x96 chips, normalised as LResNet50E-IR's
WEIGHTS = TrunkWeights(template="arc112x96", input_size=(112, 96), mean=127.5, std=127.5)


def conv_bn_prelu(inplanes: int, planes: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(planes),
        nn.PReLU(planes),
    )


class TinyTrunk(Trunk):
    name = "tiny"
    weights = WEIGHTS
    embedding_dim = 128
    stages = ("stage1", "stage2", "stage3")
    mask_points = ("stage2", "stage3")
    default_mask_point = "stage3"

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), embedding_dim: int = 128):
        super().__init__()
        self.embedding_dim = embedding_dim
        # Stride-2 stem: a full-resolution conv with more than 3 input channels would cost more than the
        # rest of the network on a CPU. Each stage halves the map: 56×48 → 28×24 → 14×12 → 7×6.
        self.stem = conv_bn_prelu(3, widths[0], stride=2)
        for i in (1, 2, 3):
            setattr(
                self,
                f"stage{i}",
                nn.Sequential(conv_bn_prelu(widths[i - 1], widths[i], 2), conv_bn_prelu(widths[i], widths[i])),
            )
        top = widths[-1] * (self.input_size[0] // 16) * (self.input_size[1] // 16)
        self.fc = nn.Sequential(
            nn.BatchNorm1d(top),
            nn.Dropout(p=0.2),
            nn.Linear(top, embedding_dim),
            nn.BatchNorm1d(embedding_dim),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="leaky_relu", a=0.25)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_embedding(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(f, 1))


def build(weights: str | None = None) -> TinyTrunk:
    model = TinyTrunk()
    if weights is not None:
        load_state_dict_safely(model, weights)
    return model
