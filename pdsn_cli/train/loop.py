"""The one training loop that ``train-trunk``, ``train-block``, ``train-detector`` and ``finetune`` plug into.

A trainer builds its data and model, describes one step as a :class:`Task` and calls :func:`train`. The loop owns
what every trainer needs the same way:

- data parallel under ``torchrun`` (:class:`Processes`: gloo on CPU, NCCL on CUDA; the task's model wrapped in
  DDP; each step's statistics summed over the processes);
- checkpoints (atomic, rank 0 writing) every ``Checkpoints.every`` steps or at each epoch's end, holding the
  weights, optimizer, schedule, step, every process's random streams and the epoch's batch order, so that a run
  resumed with ``--resume`` ends with weights bitwise equal to an uninterrupted one (on CPU);
- SIGINT: stop at the next step boundary, write a checkpoint there, raise KeyboardInterrupt (the CLI exits 130);
- a non-finite loss or weights: :class:`JobFailed` (exit 4) naming the step, the last good checkpoint kept;
- ``progress(stage, done, total)`` after every step, with the stage ``"train"``.

The batches of an epoch are ``task.plan(epoch)``; a step reads batch ``i`` of that plan. On CUDA the host reads
the step statistics every ``SYNC_EVERY`` steps (and at every checkpoint and epoch end), so the GPU never waits.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pdsn_cli.errors import BadInputError, JobFailed, SchemaError
from pdsn_cli.train.processes import Processes
from pdsn_cli.trunks.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Task", "Checkpoints", "Outcome", "StepLR", "train", "Processes", "steps_per_epoch"]

#: on CUDA the host reads the step statistics this often (and at every checkpoint and epoch end)
SYNC_EVERY = 25
CHECKPOINT_VERSION = 2


class Task:
    """One trainer's part: what a step computes, on which batches, with what optimizer. Subclasses set
    ``epochs``, ``steps_per_epoch``, ``model`` (what a step calls; DDP-wrapped under torchrun) and ``modules``
    (the modules a checkpoint holds, by name), and may name ``generators`` (random streams the steps draw from)."""

    epochs: int
    steps_per_epoch: int
    model: nn.Module
    modules: dict[str, nn.Module]
    generators: dict[str, torch.Generator] = {}

    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def scheduler(self, opt: torch.optim.Optimizer, total: int):
        """An LR scheduler stepped after every optimizer step, or None."""
        return None

    def plan(self, epoch: int) -> torch.Tensor:
        """The epoch's batch order (a tensor; saved with a mid-epoch checkpoint)."""
        raise NotImplementedError

    def step(self, model: nn.Module, plan: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` of ``plan`` → (loss to minimise, a row of statistics whose first entry is the reported
        loss). The statistics are summed over processes and handed to :meth:`end_epoch`."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, stats: torch.Tensor, world: int) -> None:
        """The epoch's steps × statistics (float32, summed over the ``world`` processes): record the epoch, run
        the held-out evaluation."""

    def where(self, step: int, total: int) -> str:
        """Step ``step`` (1-based) in the words of the trainer's messages."""
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        return f"epoch {epoch + 1} step {i + 1}"

    def state_dict(self) -> dict:
        """Plain values a checkpoint also holds at its top level (history, best epoch so far)."""
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Take back what :meth:`state_dict` gave from the ``checkpoint``."""


def steps_per_epoch(rows: int, batch_size: int, world: int) -> int:
    """Steps of an epoch whose global batches of ``batch_size`` rows are dealt out over ``world`` processes (every
    ``world``-th row each): a last batch too short to give every process a row is dropped, since a process
    without rows would average an empty batch (NaN)."""
    steps = math.ceil(rows / batch_size)
    return steps - 1 if steps > 1 and 0 < rows % batch_size < world else steps


@dataclass
class Checkpoints:
    """Where and how often the loop checkpoints, and what a resumed run must share with the checkpoint."""

    path: Path
    format: str
    #: steps between checkpoints; None: at the end of every epoch (the last step always writes one)
    every: int | None = None
    resume: bool = False
    #: settings that must be equal for a resumed run to continue the same trajectory
    must_match: dict = field(default_factory=dict)
    #: plain values written into every checkpoint (what the trainer's readers look for)
    extra: dict = field(default_factory=dict)
    #: what else to suggest when the loss diverges, after "lower --lr"
    advice: str = ""

    def load(self, world: int) -> dict | None:
        if not (self.resume and self.path.exists()):
            return None
        ckpt = load_checkpoint(self.path)
        if ckpt.get("format") != self.format or ckpt.get("version") != CHECKPOINT_VERSION:
            raise SchemaError(f"cannot resume {self.path}: it is not a {self.format} checkpoint of this version")
        saved = ckpt.get("settings", {})
        diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.must_match.items() if saved.get(k) != v]
        if diff:
            raise BadInputError(f"cannot resume {self.path} with different settings: {'; '.join(diff)}")
        if ckpt["world_size"] != world:
            raise BadInputError(f"{self.path} was written by a {ckpt['world_size']}-process run; resume it with "
                                f"the same number of processes (now {world})")
        return ckpt

    def kept(self, step: int | None) -> str:
        if step is None:
            return "no checkpoint was written yet — lower --lr" + self.advice
        return f"the last good checkpoint {self.path} (step {step}) is kept — lower --lr{self.advice}, then --resume"


@dataclass
class Outcome:
    steps: int
    resumed_from: int | None
    seconds: float


class StepLR(torch.optim.lr_scheduler.LRScheduler):
    """lr = ``lr_at(step)`` before each step: a schedule written as a function of the step."""

    def __init__(self, opt: torch.optim.Optimizer, lr_at: Callable[[int], float]):
        self.lr_at = lr_at
        super().__init__(opt)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_at")}


class StopFlag:
    """SIGINT asks the loop to stop at the next step boundary (checkpoint, then KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(task: Task, procs: Processes, checkpoints: Checkpoints,
          progress: Callable[[str, int, int], None] | None = None, stage: str = "train") -> Outcome:
    """Run ``task`` from its first step (or its checkpoint) to ``task.epochs`` epochs; ``progress(stage, step,
    total)`` after every step."""
    device, cuda, spe = procs.device, procs.device.type == "cuda", task.steps_per_epoch
    total = task.epochs * spe
    model = procs.wrap(task.model)
    opt = task.optimizer()
    sched = task.scheduler(opt, total)

    start, plan, epoch_rows = 0, None, []
    ckpt = checkpoints.load(procs.world)
    if ckpt is not None:
        for name, module in task.modules.items():
            module.load_state_dict(ckpt[name])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        task.load_state_dict(ckpt)
        start = int(ckpt["step"])
        epoch_rows = list(ckpt["epoch_rows"])
        mine = ckpt["rng"][procs.rank]
        torch.set_rng_state(mine["torch"])
        if cuda and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], device)
        for name, g in task.generators.items():
            g.set_state(mine[name])
        if mine["plan"] is not None:
            plan = mine["plan"].to(device) if ckpt["plan_on_device"] else mine["plan"]
    written = start if ckpt is not None else None

    def save(step: int) -> None:
        nonlocal written
        mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None,
                "plan": plan.cpu() if plan is not None and step % spe else None,
                **{name: g.get_state() for name, g in task.generators.items()}}
        states = procs.gather(mine)
        if not all(torch.isfinite(p).all() for module in task.modules.values() for p in module.parameters()):
            # a checkpoint is never written from broken weights; before the last step the next step's loss
            # names the divergence (the message users know), after it nothing else would
            if step < total:
                return
            raise JobFailed(f"training diverged: weights became non-finite by step {step}; "
                            f"{checkpoints.kept(written)}")
        if procs.main:
            checkpoints.path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                checkpoints.path, format=checkpoints.format, version=CHECKPOINT_VERSION, **checkpoints.extra,
                settings=checkpoints.must_match, world_size=procs.world, step=step, epoch=step // spe,
                total_steps=total, steps_per_epoch=spe,
                **{name: module.state_dict() for name, module in task.modules.items()},
                optimizer=opt.state_dict(), scheduler=sched.state_dict() if sched is not None else None,
                **task.state_dict(), epoch_rows=epoch_rows, rng=states,
                plan_on_device=plan is not None and plan.device.type != "cpu",
            )
        written = step

    # rows of the steps since the host last looked; read (summed over processes, NaN-checked, with the stop
    # vote) every step on the CPU, every SYNC_EVERY steps on CUDA
    pending: list[torch.Tensor] = []
    stop_all = False

    def sync(step: int) -> None:
        nonlocal pending, stop_all
        vote = torch.tensor([float(stop.requested)], device=device)
        if pending:
            rows = torch.stack([r.float() for r in pending])
            flat = procs.all_sum(torch.cat([rows.flatten(), vote]))
            rows, votes = flat[:-1].reshape(rows.shape).cpu(), flat[-1:]
        else:
            rows, votes = torch.zeros(0), procs.all_sum(vote)
        stop_all = procs.distributed and float(votes) > 0
        for k, v in enumerate((rows[:, 0] / procs.world).tolist() if len(rows) else []):
            if not math.isfinite(v):
                bad = step - len(rows) + k + 1
                raise JobFailed(f"training diverged: loss became {v} at {task.where(bad, total)}; "
                                f"{checkpoints.kept(written)}")
        epoch_rows.extend(rows)
        pending = []

    t0 = time.perf_counter()
    with StopFlag() as stop:
        for step in range(start, total):
            if stop_all or (not procs.distributed and stop.requested):
                sync(step)
                save(step)
                procs.barrier()
                raise KeyboardInterrupt
            epoch, i = divmod(step, spe)
            if i == 0 or plan is None:
                plan = task.plan(epoch)
            loss, row = task.step(model, plan, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            pending.append(row.detach())
            end_of_epoch = i == spe - 1
            every = checkpoints.every
            checkpoint_now = (step + 1) % every == 0 if every else end_of_epoch
            checkpoint_now = checkpoint_now or step + 1 == total
            if not cuda or checkpoint_now or end_of_epoch or (step + 1) % SYNC_EVERY == 0:
                sync(step + 1)
            if end_of_epoch:
                task.end_epoch(epoch, torch.stack(epoch_rows), procs.world)
                epoch_rows = []
            if checkpoint_now:
                save(step + 1)
            if progress is not None and procs.main:
                progress(stage, step + 1, total)
    if cuda:
        torch.cuda.synchronize(device)
    return Outcome(steps=total, resumed_from=start if ckpt is not None else None,
                   seconds=time.perf_counter() - t0)
