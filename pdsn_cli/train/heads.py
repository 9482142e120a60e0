"""Margin softmax heads used to train face trunks: CosFace (LMCL) and ArcFace (additive angular margin).

Both keep one weight row per training class, normalise rows and embeddings, and return ``s·cos θ`` logits
with a margin applied to the true class during training: CosFace ``s·(cos θ − m)``, ArcFace ``s·cos(θ + m)``.
The logits go to a plain cross-entropy. The head is thrown away after training; only the trunk is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.errors import BadInputError


class MarginHead(nn.Module):
    #: registry name and default (s, m), set by subclasses
    name = ""
    default_s = 30.0
    default_m = 0.0

    def __init__(self, dim: int, classes: int, s: float | None = None, m: float | None = None):
        super().__init__()
        if classes < 2:
            raise BadInputError(f"a margin head needs at least 2 classes, got {classes}")
        self.dim, self.classes = dim, classes
        self.s = float(self.default_s if s is None else s)
        self.m = float(self.default_m if m is None else m)
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        # float32 whatever the autocast dtype: cos θ near ±1 and the s-scaled softmax need the precision
        return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """``s·cos θ`` for every class, without margin (accuracy, evaluation)."""
        return self.s * self.cosine(emb)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin logits for cross-entropy: the true class's cosine is replaced by its margin version."""
        cos = self.cosine(emb)
        idx = labels.view(-1, 1)
        cos_t = cos.gather(1, idx)
        return self.s * cos.scatter(1, idx, self.target_logit(cos_t))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, classes={self.classes}, s={self.s}, m={self.m}"


class CosFace(MarginHead):
    """Large margin cosine loss (Wang et al., CVPR 2018): the paper's PDSN trunk was trained with it."""

    name = "cosface"
    default_s = 30.0
    default_m = 0.35

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m


class ArcFace(MarginHead):
    """Additive angular margin (Deng et al., CVPR 2019)."""

    name = "arcface"
    default_s = 64.0
    default_m = 0.5

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        cos_t = cos_t.clamp(-1.0, 1.0)
        # clamp keeps the sqrt's gradient finite at cos θ = ±1
        sin_t = (1.0 - cos_t * cos_t).clamp_min(1e-9).sqrt()
        phi = cos_t * math.cos(self.m) - sin_t * math.sin(self.m)
        # Past θ + m = π, cos(θ + m) would rise again and reward a wrong angle; insightface switches to a
        # CosFace-like linear penalty there so the target logit keeps falling with θ.
        return torch.where(cos_t > math.cos(math.pi - self.m), phi, cos_t - math.sin(math.pi - self.m) * self.m)


HEADS: dict[str, type[MarginHead]] = {"cosface": CosFace, "arcface": ArcFace}


def head_names() -> list[str]:
    return list(HEADS)


def build_head(name: str, dim: int, classes: int, s: float | None = None, m: float | None = None) -> MarginHead:
    """A margin head; ``s``/``m`` left as None take the head's published defaults."""
    if name not in HEADS:
        raise BadInputError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name](dim, classes, s, m)
