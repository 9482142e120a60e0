"""One process, or one of WORLD_SIZE processes started by ``torchrun``: the data-parallel plumbing that
``train-trunk`` and ``train-block`` share (gloo on the CPU, NCCL on GPUs)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

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

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) in every process: DDP copies them at the start of each
        forward, so after the last step each process holds its own."""
        if self.distributed:
            for b in module.buffers():
                dist.broadcast(b, 0)

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
