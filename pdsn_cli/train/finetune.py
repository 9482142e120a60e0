"""``pdsn finetune``: the paper's last stage — the trunk head fine-tuned on FDM-masked features.

The frozen head never saw features with a quarter or more of their elements zeroed, so it maps them off the
embedding manifold. Fine-tuning teaches it to embed masked features where the unmasked clean image lands.
The paper fine-tunes with the identity classification loss; our default trunk (dlib-resnet) has no identity
head and the training identities outside LFW's pairs mostly have one image, so the target is the frozen
trunk's own clean embedding instead (cosine distillation): for every (clean, occluded) pair with FDM M,

    (1 − cos(h'(M⊙f_occ), e_clean)) + (1 − cos(h'(M⊙f_clean), e_clean)) + (1 − cos(h'(f_clean), e_clean))

where h' is the head being trained and e_clean = h(f_clean) of the frozen head. The last term keeps unmasked
features where they were. Only the head (the layers after the mask point) changes; the dictionary's masks do
not. The output is the dictionary file again, plus the head's weights (group ``head``); ``embed``,
``benchmark`` use that head for every PDSN-masked embedding, and the original head for the baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.atomic import atomic_output, check_distinct_paths, check_resumable, check_writable
from pdsn_cli.data import pairs_h5
from pdsn_cli.errors import BadInputError, SchemaError, check_training_options
from pdsn_cli.pdsn import fdm as fdm_mod
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.pdsn.mask_generator import cosface_logits
from pdsn_cli.train.loop import Checkpoints, Processes, Task, steps_per_epoch, train
from pdsn_cli.train.blocks import cached_pair_features
from pdsn_cli.train.splits import holdout_identities
from pdsn_cli.trunks.features import as_tensor

CHECKPOINT_FORMAT = "pdsn-finetune"


@dataclass
class FinetuneConfig:
    dict_path: Path
    pairs: list[Path]
    out: Path
    weights: str | None = None
    epochs: int = 8  # held-out distances still fell from 3 to 8 epochs on LFW training pairs
    lr: float = 1e-4
    batch_size: int = 64
    block_threshold: float = 0.25
    max_pairs: int | None = None  # per pairs file, a seeded sample
    # weight of a CosFace term (s = 30, m = 0.35) that classifies the masked embeddings among the training
    # identities, the classes being their frozen clean embeddings: distillation alone only pulls each masked
    # embedding to its own clean one; this also pushes it away from the nearest other identities
    identity_weight: float = 0.0
    holdout: float = 0.1  # share of identities held out for the reported distances
    seed: int = 0
    gpu: int | None = None
    #: continue from the checkpoint ``<out>.ckpt`` of an interrupted run
    resume: bool = False


def head_parameters(trunk, point: str) -> dict[str, torch.nn.Parameter]:
    """The parameters ``trunk.head`` uses after ``point``."""
    params = dict(trunk.named_parameters())
    return {n: params[n] for n in trunk.head_parameters(point)}


def _pairs_features(embedder: Embedder, cfg, progress=None):
    """Per row of every pairs file (``max_pairs`` seeded samples): the occluded chips' features (one host array or
    memory-mapped file per pairs file: train-block's feature cache, which a pipeline has already filled for the block
    pairs), each source's clean features once with the row → clean row index, the FDM of the row's occluded blocks
    as a row → mask index into a table of the distinct masks, and the identity names. Chips are streamed (occluded
    ones regenerated), never all held in memory."""
    trunk, point = embedder.trunk, embedder.point
    fos, fcs, cidx, occluded, names = [], [], [], [], []
    offset = 0
    for path in cfg.pairs:
        with pairs_h5.PairsFile(path) as pf:
            if pf.attrs["template"] != trunk.template:
                raise SchemaError(f"{path} holds {pf.attrs['template']} chips, trunk {trunk.name} needs {trunk.template}")
            if pf.grid != embedder.grid:
                raise SchemaError(f"{path} marks occlusions on a {pf.grid}-grid, the dictionary has {embedder.grid}")
            sel = np.arange(pf.n)
            if cfg.max_pairs is not None and pf.n > cfg.max_pairs:
                sel = np.sort(np.random.default_rng(cfg.seed).permutation(pf.n)[:cfg.max_pairs])
            occupancy = pf.blocks(sel)
            names += [pf.identity[k] for k in pf.label[sel]]
        cb = (lambda d, n, name=path.name: progress(f"features {name}", d, n)) if progress else None
        feats = cached_pair_features(trunk, cfg.weights, path, point, embedder.device, sel, cb, embedder.precision)
        fos.append(feats.occluded)
        fcs.append(feats.clean)
        cidx.append(feats.clean_index + offset)
        offset += len(feats.clean)
        # finetune's embedder has no detector: the blocks PDSN treats as occluded are the known ones (oracle)
        occluded.append(embedder.occluded_blocks(None, occupancy).reshape(len(sel), -1))
    patterns, mask_index = np.unique(np.concatenate(occluded), axis=0, return_inverse=True)
    mask_table, _ = embedder.masks(patterns)
    fc = np.concatenate([f.cpu().float().numpy() if isinstance(f, torch.Tensor) else f for f in fcs])
    return fc, np.concatenate(cidx), fos, mask_table, mask_index.reshape(-1), names


class _RowStack:
    """The rows of several feature arrays (memory-mapped files, host arrays or device tensors) indexed as one, so
    that the pairs files' features are never concatenated into one copy in memory."""

    def __init__(self, parts, device):
        self.parts = [as_tensor(p, device) for p in parts]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.device = device

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, device=self.device)
        if len(self.parts) == 1:
            return self.parts[0][idx].float()
        p0 = self.parts[0]
        out = torch.empty((len(idx), *p0.shape[1:]), dtype=torch.float32, device=self.device)
        for p, a, b in zip(self.parts, self.starts[:-1], self.starts[1:]):
            at = ((idx >= int(a)) & (idx < int(b))).nonzero().squeeze(1)
            if len(at):
                out[at] = p[idx[at] - int(a)].float()
        return out


class _StudentHead(nn.Module):
    """The student's head on several feature batches in one forward (one DDP forward per step)."""

    def __init__(self, student, point: str):
        super().__init__()
        self.student, self.point = student, point

    def forward(self, *features: torch.Tensor) -> list[torch.Tensor]:
        return [self.student.head(x, self.point) for x in features]


class TunedEpochs(Task):
    """What both fine-tunes (head: this module; trunk: finetune_trunk) do the same way: Adam over the tuned
    parameters, a seeded permutation of the training rows per epoch, and per epoch the training and held-out
    distances, keeping the tuned state of the epoch whose held-out masked embeddings lie closest to their clean
    ones. Subclasses set ``cfg``, ``trained`` (name → parameter), ``tuned_module`` (whose state dict holds them),
    ``tr``, ``history`` = [], ``best`` = None, and write ``held_out``."""

    def held_out(self) -> list[float]:
        raise NotImplementedError

    def optimizer(self):
        return torch.optim.Adam(self.trained.values(), lr=self.cfg.lr)

    def plan(self, epoch):
        return torch.from_numpy(np.random.default_rng([self.cfg.seed, epoch]).permutation(self.tr))

    def end_epoch(self, epoch, stats, world):
        total = torch.zeros(stats.shape[1] - 1, dtype=stats.dtype)
        for row in stats:  # in step order, as a running sum
            total += row[1:]
        train_d = (total / world / self.steps_per_epoch).tolist()
        self.history.append({"epoch": epoch + 1, "train": [round(x, 5) for x in train_d], "held_out": self.held_out()})
        if self.log:
            self.log(self.history[-1])
        # the state kept is that of the epoch whose held-out identities' masked embeddings lie closest to their
        # clean ones: on LFW's training identities the head over-fits after 2-3 epochs (held-out distance rises)
        score = sum(self.history[-1]["held_out"][:2]) if self.history[-1]["held_out"] else -epoch
        if self.best is None or score < self.best[0]:
            sd = self.tuned_module.state_dict()
            self.best = (score, epoch + 1, {k: sd[k].detach().float().cpu().numpy().copy() for k in self.trained})

    def state_dict(self):
        best = None if self.best is None else [self.best[0], self.best[1],
                                               {k: torch.from_numpy(v) for k, v in self.best[2].items()}]
        return {"history": self.history, "best": best}

    def load_state_dict(self, state):
        self.history = list(state["history"])
        b = state["best"]
        self.best = None if b is None else (b[0], b[1], {k: v.numpy() for k, v in b[2].items()})


def check_common(cfg) -> None:
    """The checks both fine-tunes make before any work."""
    check_writable(cfg.out)
    check_resumable(cfg.out, str(cfg.out) + ".ckpt", cfg.resume)
    check_training_options(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, holdout=cfg.holdout)
    if not cfg.identity_weight >= 0:
        raise BadInputError(f"--identity-weight must be ≥ 0, got {cfg.identity_weight}")


def identity_classes(names: list[str], tr: np.ndarray, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes of the identity term: each row's label among the training identities (−1 for held-out ones) and
    each class's normalised mean frozen clean embedding (``clean``: one per row)."""
    ids = {nm: k for k, nm in enumerate(sorted({names[i] for i in tr}))}
    label = torch.tensor([ids.get(nm, -1) for nm in names], device=clean.device)
    trl = torch.as_tensor(tr, device=clean.device)
    centres = torch.zeros(len(ids), clean.shape[1], device=clean.device).index_add_(0, label[trl], clean[trl].float())
    return label, F.normalize(centres, dim=1)


def train_and_write(task: TunedEpochs, cfg, procs: Processes, progress, fmt: str, **attrs):
    """Run a fine-tune's ``task`` (checkpoints at ``<out>.ckpt``, resumable with the same settings), then write the
    dictionary with the best epoch's tuned parameters (rank 0) and drop the checkpoint; returns (outcome, the
    kept epoch, its state)."""
    ckpt = Path(str(cfg.out) + ".ckpt")
    settings = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "gpu", "resume")}
    run = train(task, procs, Checkpoints(ckpt, fmt, resume=cfg.resume, must_match=settings), progress,
                stage="fine-tune")
    _, best_epoch, state = task.best
    if procs.main:
        write_tuned(cfg.dict_path, cfg.out, state, epochs=cfg.epochs, kept_epoch=best_epoch, lr=cfg.lr,
                    batch_size=cfg.batch_size, seed=cfg.seed, trunk_weights=str(cfg.weights or ""),
                    identity_weight=cfg.identity_weight, **attrs)
        ckpt.unlink(missing_ok=True)
    procs.barrier()
    return run, best_epoch, state


def write_tuned(dict_path: Path, out: Path, state: dict, **attrs) -> None:
    """The dictionary ``dict_path`` again at ``out`` (atomically), its ``head`` group holding the tuned ``state``."""
    with atomic_output(out) as tmp:
        shutil.copyfile(dict_path, tmp)
        with h5py.File(tmp, "r+") as f:
            if "head" in f:
                del f["head"]
            g = f.create_group("head")
            for k, v in state.items():
                g.create_dataset(k, data=v)
            g.attrs.update(attrs)
    fdm_mod.load(out)  # refuse to leave behind a file that does not load


class _FinetuneTask(TunedEpochs):
    """One step: a batch of pairs, the three distillation distances (+ the identity term); the head kept is that
    of the epoch whose held-out distances are lowest. Under torchrun each process takes every WORLD_SIZE-th pair
    of the global batch."""

    def __init__(self, cfg: FinetuneConfig, student, point: str, trained: dict, tensors, label, centres,
                 tr: np.ndarray, ho: np.ndarray, procs: Processes, log):
        self.cfg, self.student, self.point, self.trained, self.procs, self.log = cfg, student, point, trained, procs, log
        # clean features once per source (FC, indexed by CI), occluded ones per row (FO), the distinct FDMs (M,
        # indexed by MI), the teacher's clean embedding of each source (T, indexed by CI as FC is)
        self.FC, self.CI, self.FO, self.M, self.MI, self.T = tensors
        self.label, self.centres, self.tr, self.ho = label, centres, tr, ho
        self.model, self.modules, self.tuned_module = _StudentHead(student, point), {"student": student}, student
        self.epochs, self.steps_per_epoch = cfg.epochs, steps_per_epoch(len(tr), cfg.batch_size, procs.world)
        self.use_id = cfg.identity_weight > 0
        self.history: list[dict] = []
        self.best = None  # (held-out score, epoch, head state)

    def distances(self, idx, with_identity: bool = False, model=None) -> torch.Tensor:
        """1 − cos to the clean embedding of: masked occluded, masked clean, unmasked clean (each a mean); with
        ``with_identity`` also the CosFace loss of the two masked embeddings among the training identities."""
        idx = torch.as_tensor(idx, device=self.T.device)
        ci = self.CI[idx]
        m, t, fc = self.M[self.MI[idx]], self.T[ci], self.FC[ci]
        model = model or self.model
        outs = [F.normalize(e, dim=1) for e in model(self.FO[idx] * m, fc * m, fc)]
        d = [(1 - (o * t).sum(1)).mean() for o in outs]
        if with_identity:
            y = self.label[idx]
            d.append(sum(F.cross_entropy(cosface_logits(o, self.centres, y, 30.0, 0.35), y) for o in outs[:2]) / 2)
        return torch.stack(d)

    @torch.no_grad()
    def held_out(self) -> list[float]:
        ho = self.ho
        if len(ho) == 0:
            return []
        d = sum(self.distances(ho[a:a + 256]) * len(ho[a:a + 256]) for a in range(0, len(ho), 256)) / len(ho)
        return [round(float(x), 5) for x in d]

    def step(self, model, plan, i):
        b, procs = self.cfg.batch_size, self.procs
        d = self.distances(plan[i * b:(i + 1) * b][procs.rank::procs.world], self.use_id, model)
        loss = d[:3].sum() + (self.cfg.identity_weight * d[3] if self.use_id else 0)
        return loss, torch.cat([loss.detach().view(1), d.detach()])


def finetune(cfg: FinetuneConfig, progress=None, log=None) -> dict:
    """Fine-tune the head; ``progress(stage, done, total)`` for the stages "features <file>" and "fine-tune"."""
    with Processes(cfg.gpu) as procs:
        return _finetune(cfg, procs, progress if procs.main else None, log if procs.main else None)


def _finetune(cfg: FinetuneConfig, procs: Processes, progress, log) -> dict:
    t0 = time.perf_counter()
    device = procs.device
    check_common(cfg)
    if not cfg.pairs:
        raise BadInputError("give at least one --pairs file (pdsn make-pairs) to fine-tune on")
    check_distinct_paths({"--dict": cfg.dict_path, "--pairs": cfg.pairs, "--weights": cfg.weights}, {"--out": cfg.out})
    # the student starts from the trunk's own head (embedder.trunk), not from a head the dictionary may carry
    embedder = Embedder.load(None, cfg.weights, cfg.dict_path, device=device,
                             block_threshold=cfg.block_threshold)
    trunk, point = embedder.trunk, embedder.point
    torch.manual_seed(cfg.seed)
    fc, clean_index, fos, mask_table, mask_index, names = _pairs_features(embedder, cfg, progress)
    # the teacher embeds each clean chip once; every row of its source shares it
    teacher = F.normalize(torch.from_numpy(embedder.plain(fc, normalize=False)), dim=1)
    # eval mode: batch-norm statistics stay those of the trunk (masked batches would skew them), dropout off;
    # the BN affine parameters are still trained
    student = copy.deepcopy(trunk).eval()
    student.requires_grad_(False)
    trained = head_parameters(student, point)
    for p in trained.values():
        p.requires_grad_(True)
    FC, CI, M, MI, T = (as_tensor(a, device) for a in (fc, clean_index, mask_table, mask_index, teacher))
    FO = _RowStack(fos, device)
    n = len(FO)
    held = holdout_identities(names, cfg.holdout, cfg.seed)
    tr, ho = np.flatnonzero(~held), np.flatnonzero(held)
    if len(tr) == 0:
        raise BadInputError("no pairs left to train on after the hold-out")

    label, centres = identity_classes(names, tr, T[CI])

    task = _FinetuneTask(cfg, student, point, trained, (FC, CI, FO, M, MI, T), label, centres, tr, ho, procs, log)
    before = task.held_out()
    use_id = task.use_id
    run, best_epoch, state = train_and_write(
        task, cfg, procs, progress, CHECKPOINT_FORMAT, pairs=str([str(p) for p in cfg.pairs]),
        objective="cosine distillation to the frozen clean embedding"
        + (" + CosFace among the training identities" if use_id else ""))
    return {
        "out": str(cfg.out), "dictionary": str(cfg.dict_path), "trunk": trunk.name, "mask_point": point,
        "pairs": int(n), "held_out_pairs": int(len(ho)), "held_out_identities": len({names[i] for i in ho}),
        "head_parameters": sorted(state),
        "head_parameter_count": int(sum(v.size for v in state.values())), "epochs": cfg.epochs,
        "held_out_before": before, "history": task.history, "kept_epoch": best_epoch,
        "distance_names": ["masked occluded", "masked clean", "unmasked clean"],
        "train_loss_names": ["masked occluded", "masked clean", "unmasked clean"] + (["identity"] if use_id else []),
        "identity_weight": cfg.identity_weight, "resumed_from": run.resumed_from,
        "seconds": round(time.perf_counter() - t0, 1),
    }
