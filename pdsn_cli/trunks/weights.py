"""What a trunk's weights expect, described once per architecture (as torchvision's ``Weights``).

A :class:`TrunkWeights` says which aligned chip the weights were trained on (alignment template and input
size), how a chip is normalised before the first layer (``transforms``), and where released weights come
from (a file name, a package that ships them). Trunks take float RGB N×3×H×W in [0, 255] (an aligned uint8
chip cast to float, see features.to_input) and apply ``transforms`` themselves, so every caller feeds the
same input whatever the trunk.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from pdsn_cli.errors import BadInputError


@dataclass(frozen=True)
class TrunkWeights:
    #: alignment template the weights were trained on (see pdsn_cli.align.templates.TEMPLATES)
    template: str
    #: (H, W) of the input chip
    input_size: tuple[int, int]
    #: RGB mean subtracted from the [0, 255] input (one value for all channels, or one per channel)
    mean: float | tuple[float, float, float]
    #: divisor applied after subtracting the mean
    std: float
    #: file name of the released weights (None: trained by ``pdsn train-trunk`` only)
    file: str | None = None
    #: Python package that ships ``file`` (under ``package_dir``), found without importing the package
    package: str | None = None
    package_dir: str = ""
    #: state_dict prefixes the release carries beside the trunk (other branches of its model)
    ignore_prefixes: tuple[str, ...] = ()

    def transforms(self, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """[0, 255] RGB N×3×H×W → the first layer's input, ``(x − mean) / std``; ``mean`` overrides the
        default when the weights file carries its own (dlib's .dat)."""
        if mean is None:
            mean = self.mean if isinstance(self.mean, (int, float)) else torch.tensor(
                self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        # written x/std − mean/std: the releases' own pipelines compute (x/255 − 0.5)/0.5 as x/127.5 − 1, and
        # for std = 256 both forms round identically
        return x / self.std - mean / self.std

    def packaged_path(self) -> str:
        """Path of the weights file shipped in ``package``, located without importing the package (e.g.
        face_recognition_models' ``__init__`` imports pkg_resources, which current setuptools lacks)."""
        if self.package is None or self.file is None:
            raise BadInputError("these weights are not shipped in a package; pass --weights PATH")
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            ext = os.path.splitext(self.file)[1]
            raise BadInputError(f"the {self.package} package is not installed; install it or pass --weights PATH{ext}")
        return os.path.join(os.path.dirname(spec.origin), self.package_dir, self.file)
