"""Trunk registry: ``build_trunk(name, weights)`` returns a frozen-ready :class:`Trunk` in eval mode."""

from __future__ import annotations

import importlib

from pdsn_cli.errors import BadInputError
from pdsn_cli.trunks.base import Trunk

# name -> "module:builder"; builders take (weights: str | None) and return a Trunk.
# Imported lazily so that `pdsn --help` does not pay for every architecture.
_REGISTRY: dict[str, str] = {
    "dlib-resnet": "pdsn_cli.trunks.dlib_resnet:build",
    "lresnet50e-ir": "pdsn_cli.trunks.lresnet:build",
    "iresnet50": "pdsn_cli.trunks.iresnet:build_iresnet50",
    "iresnet100": "pdsn_cli.trunks.iresnet:build_iresnet100",
    "tiny": "pdsn_cli.trunks.tiny:build",
}


def trunk_names() -> list[str]:
    return list(_REGISTRY)


def build_trunk(name: str, weights: str | None = None) -> Trunk:
    if name not in _REGISTRY:
        raise BadInputError(f"unknown trunk {name!r}; choose one of {', '.join(_REGISTRY)}")
    module, fn = _REGISTRY[name].split(":")
    trunk = getattr(importlib.import_module(module), fn)(weights)
    return trunk.eval()


__all__ = ["Trunk", "build_trunk", "trunk_names"]
