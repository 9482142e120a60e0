"""Load and save model weights without ever executing code from a file.

Released face models come as ``.pth`` / ``.pth.tar`` / ``.pt`` pickles (sometimes ``{"state_dict": ...}``
written through ``DataParallel``, hence ``module.`` prefixes) or as ``.safetensors``. Every pickle is read
with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain containers: a file
that would run code on load is refused with :class:`SchemaError` instead of being trusted.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from pdsn_cli.atomic import atomic_output
from pdsn_cli.errors import BadInputError, SchemaError

#: wrapper keys releases put around the weights, tried in this order
WRAPPER_KEYS = ("state_dict", "model", "backbone")
#: how many names each line of a mismatch message lists
SHOW = 5


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file into plain Python (tensors, dicts, lists, numbers, strings) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"no such weights file: {path}")
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler met a global it will not import: the file wants to run code or rebuild
        # arbitrary objects. Refusing is the point; name the global, not torch's advice to allow it.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise SchemaError(f"{path} is not a readable torch checkpoint (truncated or foreign?)") from None
        raise SchemaError(
            f"{path} is not a plain weights file: loading it would call {found.group(1)}, refused "
            "(only tensors and plain containers are loaded)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SchemaError(f"{path} is not a readable torch checkpoint (truncated or foreign?): {first}") from None
    if not isinstance(obj, Mapping):
        raise SchemaError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise BadInputError(
            f"{path} is a .safetensors file; install the optional 'safetensors' package to read it"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed header
        raise SchemaError(f"{path} is not a readable safetensors file: {e}") from None


def extract_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict" | "model" | "backbone": ...}`` and strip ``module.`` prefixes (DataParallel/DDP)."""
    for _ in range(3):  # wrappers can nest, e.g. {"model": {"state_dict": ...}}
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue  # epoch counters, arch names, ... saved beside the weights
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _first(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def load_state_dict_safely(
    model: nn.Module,
    path: str | os.PathLike,
    ignore_prefixes: tuple[str, ...] = (),
) -> nn.Module:
    """Load weights from ``path`` into ``model``; any mismatch raises one readable :class:`SchemaError`.

    ``ignore_prefixes`` names branches a release carries beside the trunk (e.g. the mask branch of a
    FROM checkpoint) that this model deliberately does not have.
    """
    state = extract_state_dict(load_checkpoint(path))
    if not state:
        raise SchemaError(f"{path} holds no tensors (looked inside {', '.join(WRAPPER_KEYS)} too)")
    if ignore_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    expected = model.state_dict()
    # Checkpoints from torch < 0.4.1 have no BatchNorm step counters; they carry no information for eval.
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v.clone()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [
        f"{k} file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        name = getattr(model, "name", "") or type(model).__name__
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if shapes:
            more = f" (+{len(shapes) - SHOW} more)" if len(shapes) > SHOW else ""
            parts.append(f"{len(shapes)} shape differences: {'; '.join(shapes[:SHOW])}{more}")
        raise SchemaError(f"{path} does not fit {name}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj, where: str) -> None:
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}] must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(obj).__name__}; only tensors, dicts, lists, str, int, float, "
        "bool and None load back with weights_only=True"
    )


def save_checkpoint(path: str | os.PathLike, **items) -> Path:
    """Write ``items`` to ``path`` atomically; refuses anything that ``weights_only`` loading could not read."""
    for k, v in items.items():
        _check_plain(v, k)
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(items, fh)  # through a Python file: a full disk then raises OSError(ENOSPC), not a bare RuntimeError
    return path
