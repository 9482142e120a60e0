"""One process, or one of WORLD_SIZE processes started by ``torchrun``: the data-parallel plumbing of the training
loop (gloo on the CPU, NCCL on GPUs), shared by every trainer."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pdsn_cli.device import resolve_device


class Processes:
    """Single process, or one of WORLD_SIZE processes started by torchrun."""

    def __init__(self, gpu: int | None):
        env = os.environ
        self.distributed = "RANK" in env and "WORLD_SIZE" in env
        self.owns_group = False
        if not self.distributed:
            self.rank, self.world = 0, 1
            self.device = resolve_device(gpu)
            return
        self.rank, self.world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if gpu is not None:
            # under torchrun each process drives the GPU of its local rank; --gpu only says "use CUDA"
            self.device = resolve_device(int(env.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=self.rank, world_size=self.world)
            self.owns_group = True

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t)
        return t

    def all_max(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DDP under torchrun (gradients averaged over the processes), as it is otherwise."""
        if not self.distributed:
            return module
        return DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) in every process: DDP copies them at the start of each
        forward, so after the last step each process holds its own."""
        if self.distributed:
            for b in module.buffers():
                dist.broadcast(b, 0)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` in every process."""
        if self.distributed:
            moved = t.to(self.device)
            dist.broadcast(moved, 0)
            return moved.to(t.device)
        return t

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
