"""The interface every trunk implements, so that PDSN, embed and benchmark never special-case a model.

Input convention: float tensor N×3×H×W, RGB, values in [0, 255] (an aligned uint8 chip cast to float).
Each trunk normalises its own input. A trunk is split at a *mask point*: ``features(x, point)`` runs the
network up to that point (the conv feature map PDSN masks), ``head(f, point)`` runs the rest and returns the
(unnormalised) embedding, so ``head(features(x))`` equals ``forward(x)``.
"""

from __future__ import annotations

import torch
from torch import nn


class Trunk(nn.Module):
    #: registry name, e.g. "dlib-resnet"
    name: str = ""
    #: alignment template the trunk expects (see pdsn_cli.align.aligner.TEMPLATES)
    template: str = ""
    #: (H, W) of the input chip
    input_size: tuple[int, int] = (0, 0)
    embedding_dim: int = 0
    #: names accepted by ``features``/``head``, earliest first
    mask_points: tuple[str, ...] = ()
    #: the mask point used when none is given (PDSN's: the top conv feature map)
    default_mask_point: str = ""

    def features(self, x: torch.Tensor, point: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def head(self, f: torch.Tensor, point: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def feature_shape(self, point: str | None = None) -> tuple[int, int, int]:
        """C, H, W of the feature map at ``point`` (computed with a dummy forward on the trunk's device)."""
        p = next(self.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        with torch.no_grad():
            f = self.features(torch.zeros(1, 3, *self.input_size, device=dev), point)
        return tuple(f.shape[1:])

    def check_point(self, point: str | None) -> str:
        point = point or self.default_mask_point
        if point not in self.mask_points:
            from pdsn_cli.errors import BadInputError

            raise BadInputError(
                f"trunk {self.name} has no mask point {point!r}; choose one of {', '.join(self.mask_points)}"
            )
        return point
