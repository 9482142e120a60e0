"""Trunk registry: ``build_trunk(name, weights)`` returns a frozen-ready :class:`Trunk` in eval mode."""

from __future__ import annotations

from collections.abc import Callable

from pdsn_cli.errors import BadInputError
from pdsn_cli.trunks import dlib_resnet, iresnet, lresnet, tiny
from pdsn_cli.trunks.base import Trunk
from pdsn_cli.trunks.weights import TrunkWeights

# name -> builder taking (weights: str | None, a weights file; None = packaged or random init)
_REGISTRY: dict[str, Callable[[str | None], Trunk]] = {
    "dlib-resnet": dlib_resnet.build,
    "lresnet50e-ir": lresnet.build,
    "iresnet50": iresnet.build_iresnet50,
    "iresnet100": iresnet.build_iresnet100,
    "tiny": tiny.build,
}
#: trunks whose pretrained weights come with the install (face-recognition-models); the others need a file
PACKAGED_WEIGHTS = frozenset({"dlib-resnet"})


def trunk_names() -> list[str]:
    return list(_REGISTRY)


def build_trunk(name: str, weights: str | None = None) -> Trunk:
    if name not in _REGISTRY:
        raise BadInputError(f"unknown trunk {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](weights).eval()


__all__ = ["PACKAGED_WEIGHTS", "Trunk", "TrunkWeights", "build_trunk", "trunk_names"]
