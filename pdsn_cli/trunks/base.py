"""The interface every trunk implements, so that PDSN, embed and benchmark never special-case a model.

Input convention: float tensor N×3×H×W, RGB, values in [0, 255] (an aligned uint8 chip cast to float); the
trunk's :class:`TrunkWeights` says how it is normalised. A trunk is a stem, a sequence of named stages and an
embedding layer; it is split at a *mask point* (a stage's output): ``features(x, point)`` runs the network up
to that point (the conv feature map PDSN masks), ``head(f, point)`` runs the rest and returns the
(unnormalised) embedding, so ``head(features(x))`` equals ``forward(x)``. Architectures only declare their
``stages`` and write ``forward_stem`` and ``forward_embedding``; the split is done here, once.
"""

from __future__ import annotations

import torch
from torch import nn

from pdsn_cli.errors import BadInputError
from pdsn_cli.trunks.weights import TrunkWeights


class Trunk(nn.Module):
    #: registry name, e.g. "dlib-resnet"
    name: str = ""
    #: what the weights expect: alignment template, input size, normalisation
    weights: TrunkWeights
    embedding_dim: int = 0
    #: names of the stage submodules, input to output
    stages: tuple[str, ...] = ()
    #: names accepted by ``features``/``head`` (stages whose output PDSN may mask), earliest first
    mask_points: tuple[str, ...] = ()
    #: the mask point used when none is given (PDSN's: the top conv feature map)
    default_mask_point: str = ""

    @property
    def template(self) -> str:
        """Alignment template the trunk expects (see pdsn_cli.align.templates.TEMPLATES)."""
        return self.weights.template

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the input chip."""
        return self.weights.input_size

    # -- what an architecture writes ----------------------------------------------------------------

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 255] RGB → the stem's input."""
        return self.weights.transforms(x)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input → the first stage's input."""
        raise NotImplementedError

    def forward_embedding(self, f: torch.Tensor) -> torch.Tensor:
        """The last stage's output → the (unnormalised) embedding."""
        raise NotImplementedError

    # -- the split at a mask point ----------------------------------------------------------------------

    def _run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for name in self.stages[start:stop]:
            x = getattr(self, name)(x)
        return x

    def features(self, x: torch.Tensor, point: str | None = None) -> torch.Tensor:
        point = self.check_point(point)
        return self._run_stages(self.forward_stem(self.preprocess(x)), 0, self.stages.index(point) + 1)

    def head(self, f: torch.Tensor, point: str | None = None) -> torch.Tensor:
        point = self.check_point(point)
        return self.forward_embedding(self._run_stages(f, self.stages.index(point) + 1, len(self.stages)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embedding(self._run_stages(self.forward_stem(self.preprocess(x)), 0, len(self.stages)))

    def tuning_stages(self) -> tuple[str, ...]:
        """Where fine-tuning may start: ``stem`` (the whole network) or a stage (it and everything after it)."""
        return ("stem",) + self.stages

    def parameters_from(self, stage: str) -> list[str]:
        """Names of the parameters the forward pass uses from ``stage`` on (``stem``: all of them). Found by a
        backward pass through the part before ``stage``, so that any architecture is answered the same way."""
        if stage not in self.tuning_stages():
            raise BadInputError(f"trunk {self.name} has no stage {stage!r}; choose one of "
                                f"{', '.join(self.tuning_stages())}")
        names = [n for n, _ in self.named_parameters()]
        if stage == "stem":
            return names
        return [n for n in names if n not in self._used(lambda x: self._run_stages(
            self.forward_stem(self.preprocess(x)), 0, self.stages.index(stage)))]

    def head_parameters(self, point: str | None = None) -> list[str]:
        """Names of the parameters ``head`` uses after the mask point ``point``."""
        point = self.check_point(point)
        return sorted(self._used(lambda x: self.head(self.features(x, point).detach() + 1.0, point)))

    def _used(self, fn) -> set[str]:
        params = dict(self.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        dev = next(iter(params.values())).device
        try:
            for p in params.values():
                p.grad = None
                p.requires_grad_(True)
            with torch.enable_grad():
                out = fn(torch.full((1, 3, *self.input_size), 127.0, device=dev))
                out.float().sum().backward()
            return {n for n, p in params.items() if p.grad is not None}
        finally:
            for n, p in params.items():
                p.grad = None
                p.requires_grad_(flags[n])

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
            raise BadInputError(
                f"trunk {self.name} has no mask point {point!r}; choose one of {', '.join(self.mask_points)}"
            )
        return point
