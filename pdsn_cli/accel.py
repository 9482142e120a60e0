"""GPU fast paths, decided in one place: bf16 autocast, channels_last, cuDNN autotuning, torch.compile.

On CUDA they are on by default (``precision="bf16"``); ``precision="fp32"`` is the plain float32 reference
(no autocast, no TF32). On the CPU every trunk runs plain float32 eager whatever is asked, so CPU results never
depend on these switches.

``FastForward`` is what every inference loop calls: it takes uint8 N×H×W×3 batches already on the device, so
the uint8 → float cast, the NHWC → channels_last view and the trunk's own input normalisation all happen on the
GPU in one pass (the permuted NHWC tensor *is* channels_last, no copy). Compiled runs pad the last batch to the
batch size, so one graph serves a whole job.
"""

from __future__ import annotations

import os

import torch

from pdsn_cli.errors import BadInputError

PRECISIONS = ("bf16", "fp32")
COMPILE_MODES = ("auto", "off", "on")
#: below this many images `compile="auto"` stays eager: the first call of a compiled LResNet50E-IR costs
#: tens of seconds, more than it saves on smaller jobs (see benchmarks/gpu_throughput.py)
COMPILE_MIN_IMAGES = int(os.environ.get("PDSN_COMPILE_MIN_IMAGES", 2_000_000))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    return precision


def use_bf16(device: torch.device, precision: str) -> bool:
    return device.type == "cuda" and check_precision(precision) == "bf16"


def prepare_module(module: torch.nn.Module, device: torch.device, precision: str = "bf16") -> torch.nn.Module:
    """Move to the device; on CUDA with bf16: channels_last weights and cuDNN autotuning for fixed shapes."""
    module = module.to(device)
    if use_bf16(device, precision):
        torch.backends.cudnn.benchmark = True
        module = module.to(memory_format=torch.channels_last)
    return module


def compile_wanted(device: torch.device, compile: str, images: int) -> bool:
    """Whether ``FastForward`` compiles: only on CUDA, for "on", or for "auto" with ≥ COMPILE_MIN_IMAGES images."""
    if compile not in COMPILE_MODES:
        raise BadInputError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    return device.type == "cuda" and (compile == "on" or (compile == "auto" and images >= COMPILE_MIN_IMAGES))


def autocast(device: torch.device, precision: str = "bf16"):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16(device, precision))


class FastForward:
    """``trunk.features`` or the whole trunk on uint8 NHWC batches, with the fast paths of the device.

    ``compile``: "on" compiles (inductor, weights frozen as constants so conv+BN fold), "off" stays eager,
    "auto" compiles only when ``images`` ≥ COMPILE_MIN_IMAGES. CPU: always plain eager float32.
    """

    def __init__(self, trunk, device: torch.device, precision: str = "bf16", compile: str = "auto",
                 images: int = 0, batch_size: int = 64, compile_mode: str | None = None):
        self.device = device
        self.bf16 = use_bf16(device, precision)
        self.compiled = compile_wanted(device, compile, images)
        self.trunk = prepare_module(trunk, device, precision) if self.bf16 else trunk.to(device)
        self.batch_size = batch_size
        self.compile_mode = compile_mode  # torch.compile's mode (None = default; "reduce-overhead" = CUDA graphs)
        self._fns: dict = {}

    def _fn(self, point):
        if point not in self._fns:
            trunk, bf16 = self.trunk, self.bf16

            def run(x_u8: torch.Tensor) -> torch.Tensor:
                x = x_u8.permute(0, 3, 1, 2).float()
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = trunk(x) if point is None else trunk.features(x, point)
                return out.float()

            if self.compiled:
                import torch._inductor.config as inductor_config

                # inference only: parameters become constants, so BN folds into the convolutions
                inductor_config.freezing = True
                run = torch.compile(run, dynamic=False, mode=self.compile_mode)
            self._fns[point] = run
        return self._fns[point]

    @torch.no_grad()
    def __call__(self, x_u8: torch.Tensor, point: str | None = None) -> torch.Tensor:
        """uint8 N×H×W×3 on the device → features at ``point`` (N×C×H×W float32), or embeddings if None."""
        fn = self._fn(point)
        n = len(x_u8)
        if self.compiled and n < self.batch_size:  # one static shape per job
            pad = x_u8.new_zeros((self.batch_size - n, *x_u8.shape[1:]))
            return fn(torch.cat([x_u8, pad]))[:n].clone()
        out = fn(x_u8)
        # CUDA-graph outputs live in the graph's pool and are overwritten by the next replay
        return out.clone() if self.compile_mode == "reduce-overhead" else out
