"""Pick the torch device from ``--gpu`` and fail early, in one line, when it does not exist."""

from __future__ import annotations

import random

import numpy as np
import torch

from pdsn_cli.errors import BadInputError


def resolve_device(gpu: int | None) -> torch.device:
    if gpu is None:
        return torch.device("cpu")
    if gpu < 0:
        raise BadInputError(f"--gpu must be >= 0, got {gpu}")
    if not torch.cuda.is_available():
        raise BadInputError(f"--gpu {gpu} asked for, but CUDA is not available on this machine")
    n = torch.cuda.device_count()
    if gpu >= n:
        raise BadInputError(f"--gpu {gpu} asked for, but this machine has {n} GPU(s) (0..{n - 1})")
    return torch.device("cuda", gpu)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
