"""``pdsn finetune --faces``: the trunk in the loop, on occluded faces drawn fresh every step.

``pdsn finetune --pairs`` adapts only the head after the mask point, on the occlusions a pairs file froze; the
trunk below it never learns to see an occluder. This trainer adapts the trunk too, from ``from_stage`` on (FROM's
half of the method, arXiv 2108.09468): every step takes a batch of aligned faces from one or more face sets (chips
files of ``pdsn align``), draws an occluder on each (every kind of the toolkit, placed at random; a share left
clean), mirrors half of them, jitters their exposure and degrades some (greyscale, low resolution), applies the FDM
of the drawn occluder's blocks at the mask point and pulls

    h'(M⊙f'(occluded)),  h'(M⊙f'(clean)),  h'(f'(clean))

to the frozen trunk's embedding of the clean, undegraded face (cosine distillation: the baseline's embedding space
stays the target, so tuned and untouched embeddings remain comparable), plus, optionally, ``identity_weight`` × a CosFace term
that classifies the two masked embeddings among the training identities (classes: their mean frozen embedding).

Identities are named ``<set>/<identity>``, so two sets never share a person by accident; a share of them is held
out (never trained on) and the epoch kept is the one whose held-out faces, occluded by fixed draws, embed closest
to their clean selves. The output is the dictionary again with every tuned parameter in its ``head`` group: PDSN
embeddings then run the tuned trunk, the baseline the untouched one (``Embedder``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.atomic import check_distinct_paths
from pdsn_cli.data.face_sets import FaceSets, read_face_sets
from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.occluders import DRAWN, occlude
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.pdsn.fdm import mirror_blocks
from pdsn_cli.pdsn.mask_generator import cosface_logits
from pdsn_cli.train import augment
from pdsn_cli.train.finetune import TunedEpochs, check_common, identity_classes, train_and_write
from pdsn_cli.train.loop import Processes, steps_per_epoch
from pdsn_cli.train.splits import holdout_identities

CHECKPOINT_FORMAT = "pdsn-finetune-trunk"
HELD_OUT_FACES = 512  # held-out faces scored after every epoch (fixed draws)


@dataclass
class FinetuneTrunkConfig:
    dict_path: Path
    faces: list[Path]  # chips files (pdsn align), one per face set
    out: Path
    weights: str | None = None
    #: first stage tuned (``stem``: the whole trunk); the stages after it and the embedding layer are tuned too
    from_stage: str = "stem"
    epochs: int = 4
    lr: float = 3e-5
    batch_size: int = 64
    block_threshold: float = 0.25
    #: 0: distillation only (measured better on held-out identities and no worse on AR than 0.5: docs/experiments.md)
    identity_weight: float = 0.0
    #: weight of the squared difference between the student's and the teacher's cosines of different faces
    relation_weight: float = 0.0
    clean_share: float = 0.15  # faces of a batch left unoccluded
    degrade: float = 0.3  # probability of a greyscale and of a low-resolution face
    occluders: list[str] = field(default_factory=lambda: list(DRAWN))
    holdout: float = 0.1
    max_faces: int | None = None  # per face set, a seeded sample
    seed: int = 0
    gpu: int | None = None
    resume: bool = False


class Student(nn.Module):
    """The trunk being tuned, run on occluded and clean chips in one forward (one DDP forward per step): the
    stages before ``from_stage`` without gradients, the FDM applied at the mask point."""

    def __init__(self, trunk, point: str, from_stage: str):
        super().__init__()
        self.trunk, self.point = trunk, point
        self.frozen = 0 if from_stage == "stem" else trunk.stages.index(from_stage)
        self.tune_stem = from_stage == "stem"

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
        t, n = self.trunk, len(masks)
        with torch.set_grad_enabled(self.tune_stem and torch.is_grad_enabled()):
            f = t.forward_stem(t.preprocess(x))
        for k, name in enumerate(t.stages[:t.stages.index(self.point) + 1]):
            with torch.set_grad_enabled(k >= self.frozen and torch.is_grad_enabled()):
                f = getattr(t, name)(f)
        fo, fc = f[:n], f[n:]
        return [t.head(z, self.point) for z in (fo * masks, fc * masks, fc)]


class _TrunkTask(TunedEpochs):
    def __init__(self, cfg: FinetuneTrunkConfig, embedder: Embedder, student: Student, trained: dict,
                 faces: FaceSets, teacher: torch.Tensor, label: torch.Tensor, centres: torch.Tensor,
                 tr: np.ndarray, ho: np.ndarray, procs: Processes, log):
        self.cfg, self.embedder, self.student, self.trained = cfg, embedder, student, trained
        self.faces, self.T, self.label, self.centres, self.tr, self.ho = faces, teacher, label, centres, tr, ho
        self.procs, self.log, self.device = procs, log, procs.device
        self.model, self.modules, self.tuned_module = student, {"student": student.trunk}, student.trunk
        self.epochs, self.steps_per_epoch = cfg.epochs, steps_per_epoch(len(tr), cfg.batch_size, procs.world)
        self.use_id = cfg.identity_weight > 0
        self.history: list[dict] = []
        self.best = None  # (held-out score, epoch, tuned state)
        self.held = ho[np.random.default_rng([cfg.seed, 2]).permutation(len(ho))[:HELD_OUT_FACES]] if len(ho) else ho

    def draw(self, idx: np.ndarray, rng: np.random.Generator):
        """Occluded and clean chips (float N×3×H×W each, augmented alike), the FDMs of the drawn occluders' blocks,
        the teacher's embeddings (of the mirrored face where the chip was mirrored)."""
        cfg, faces, grid = self.cfg, self.faces, self.embedder.grid
        clean = faces.image[idx]
        occ, blocks = clean.copy(), np.zeros((len(idx), grid, grid), bool)
        for n, i in enumerate(idx):
            if rng.random() < cfg.clean_share:
                continue
            kind = cfg.occluders[rng.integers(len(cfg.occluders))]
            o = occlude(clean[n], faces.landmarks[i], kind, rng, grid=grid)
            occ[n], blocks[n] = o.image, o.blocks >= cfg.block_threshold
        flip = rng.random(len(idx)) < 0.5
        occ[flip], clean[flip] = occ[flip, :, ::-1], clean[flip, :, ::-1]
        blocks[flip] = mirror_blocks(blocks[flip])
        x = torch.from_numpy(np.concatenate([occ, clean])).to(self.device).permute(0, 3, 1, 2).float()
        # the same exposure and degradation on a face's occluded and clean chip, as on a probe and its gallery photo
        n = len(idx)
        gain = torch.from_numpy(rng.uniform(0.8, 1.2, n).astype(np.float32)).repeat(2).view(-1, 1, 1, 1)
        bias = torch.from_numpy(rng.uniform(-20, 20, n).astype(np.float32)).repeat(2).view(-1, 1, 1, 1)
        x = augment.expose(x, gain, bias)
        if cfg.degrade > 0:
            grey = torch.from_numpy(rng.random(n) < cfg.degrade).repeat(2)
            low = torch.from_numpy(rng.random(n) < cfg.degrade).repeat(2)
            x = augment.degrade(x, grey, low, int(rng.integers(16, 41)))
        masks, _ = self.embedder.dictionary.combine(blocks.reshape(n, -1))
        teacher = self.T[torch.as_tensor(idx, device=self.device), torch.as_tensor(flip.astype(np.int64), device=self.device)]
        return x.contiguous(memory_format=torch.channels_last), torch.from_numpy(masks).to(self.device), teacher

    def distances(self, model, idx: np.ndarray, rng: np.random.Generator, train: bool) -> torch.Tensor:
        """The three distances to the teacher; in training also the identity term and the relation term (each
        when its weight is > 0)."""
        x, masks, t = self.draw(idx, rng)
        outs = [F.normalize(e.float(), dim=1) for e in model(x, masks)]
        d = [(1 - (o * t).sum(1)).mean() for o in outs]
        if train and self.use_id:
            y = self.label[torch.as_tensor(idx, device=self.device)]
            d.append(sum(F.cross_entropy(cosface_logits(o, self.centres, y, 30.0, 0.35), y) for o in outs[:2]) / 2)
        if train and self.cfg.relation_weight > 0:
            # the cosines between different faces kept as the teacher has them: distillation alone only pulls each
            # face to its own clean embedding, and impostor pairs drift closer (TAR at low FAR falls)
            off = ~torch.eye(len(t), dtype=torch.bool, device=t.device)
            pairs = max(int(off.sum()), 1)  # a batch of one face has no pair: the term is 0
            d.append(sum(((o @ outs[1].T - t @ t.T)[off] ** 2).sum() / pairs for o in outs[:2]) / 2)
        return torch.stack(d)

    @torch.no_grad()
    def held_out(self) -> list[float]:
        if len(self.held) == 0:
            return []
        total = torch.zeros(3)
        for a in range(0, len(self.held), 64):
            part = self.held[a:a + 64]
            # fixed draws: every epoch scores the same occluded faces
            total += self.distances(self.student, part, np.random.default_rng([self.cfg.seed, 3, a]), False).cpu() * len(part)
        return [round(float(v), 5) for v in total / len(self.held)]

    def step(self, model, plan, i):
        b, procs = self.cfg.batch_size, self.procs
        idx = plan[i * b:(i + 1) * b][procs.rank::procs.world].numpy()
        epoch = len(self.history)
        rng = np.random.default_rng([self.cfg.seed, 1, epoch, i, procs.rank])
        d = self.distances(model, idx, rng, True)
        weights = [1.0, 1.0, 1.0] + [self.cfg.identity_weight] * self.use_id + [self.cfg.relation_weight] * (
            self.cfg.relation_weight > 0)
        loss = (d * torch.tensor(weights, device=d.device)).sum()
        return loss, torch.cat([loss.detach().view(1), d.detach()])


def validate(cfg: FinetuneTrunkConfig) -> None:
    check_common(cfg)
    if not cfg.faces:
        raise BadInputError("give at least one --faces file (pdsn align) to fine-tune on")
    for name, v in (("--clean-share", cfg.clean_share), ("--degrade", cfg.degrade)):
        if not 0.0 <= v <= 1.0:
            raise BadInputError(f"{name} is a probability in [0, 1], got {v}")
    bad = [k for k in cfg.occluders if k not in DRAWN]
    if bad or not cfg.occluders:
        raise BadInputError(f"--occluder must be among {', '.join(DRAWN)}; got {', '.join(bad) or 'none'}")
    check_distinct_paths({"--dict": cfg.dict_path, "--faces": cfg.faces, "--weights": cfg.weights}, {"--out": cfg.out})


@torch.no_grad()
def teacher_embeddings(trunk, images: np.ndarray, device: torch.device, progress=None, batch: int = 64) -> torch.Tensor:
    """N×2×D: the frozen trunk's normalised embedding of each clean chip and of its mirror."""
    out = torch.empty(len(images), 2, trunk.embedding_dim, device=device)
    for a in range(0, len(images), batch):
        x = torch.from_numpy(images[a:a + batch]).to(device).permute(0, 3, 1, 2).float()
        for v, xv in enumerate((x, x.flip(3))):
            out[a:a + len(x), v] = F.normalize(trunk(xv.contiguous(memory_format=torch.channels_last)).float(), dim=1)
        if progress:
            progress("teacher", min(a + batch, len(images)), len(images))
    return out


def finetune_trunk(cfg: FinetuneTrunkConfig, progress=None, log=None) -> dict:
    """Tune the trunk from ``cfg.from_stage`` on; ``progress(stage, done, total)`` for "teacher" and "fine-tune"."""
    with Processes(cfg.gpu) as procs:
        return _finetune_trunk(cfg, procs, progress if procs.main else None, log if procs.main else None)


def _finetune_trunk(cfg: FinetuneTrunkConfig, procs: Processes, progress, log) -> dict:
    t0 = time.perf_counter()
    validate(cfg)
    device = procs.device
    embedder = Embedder.load(None, cfg.weights, cfg.dict_path, device=device, block_threshold=cfg.block_threshold)
    trunk, point = embedder.trunk, embedder.point
    tuned = trunk.parameters_from(cfg.from_stage)
    if not cfg.relation_weight >= 0:
        raise BadInputError(f"--relation-weight must be ≥ 0, got {cfg.relation_weight}")
    if not set(tuned) - set(trunk.head_parameters(point)):
        raise BadInputError(f"--from-stage {cfg.from_stage} lies after the mask point {point}: that is the head alone "
                            "(pdsn finetune --pairs)")
    torch.manual_seed(cfg.seed)
    faces = read_face_sets(cfg.faces, trunk.template, cfg.max_faces, cfg.seed)
    teacher = teacher_embeddings(trunk, faces.image, device, progress)
    student = Student(copy.deepcopy(trunk).eval().requires_grad_(False), point, cfg.from_stage)
    params = dict(student.trunk.named_parameters())
    trained = {n: params[n].requires_grad_(True) for n in tuned}
    held = holdout_identities(faces.names, cfg.holdout, cfg.seed)
    tr, ho = np.flatnonzero(~held), np.flatnonzero(held)
    if len(tr) == 0:
        raise BadInputError("no faces left to train on after the hold-out")
    label, centres = identity_classes(faces.names, tr, teacher[:, 0])
    task = _TrunkTask(cfg, embedder, student, trained, faces, teacher, label, centres, tr, ho, procs, log)
    before = task.held_out()
    run, best_epoch, state = train_and_write(
        task, cfg, procs, progress, CHECKPOINT_FORMAT, faces=str([str(p) for p in cfg.faces]),
        from_stage=cfg.from_stage, objective="cosine distillation to the frozen clean embedding, occlusions drawn fresh"
        + (" + CosFace among the training identities" if task.use_id else ""))
    return {
        "out": str(cfg.out), "dictionary": str(cfg.dict_path), "trunk": trunk.name, "mask_point": point,
        "from_stage": cfg.from_stage, "face_sets": faces.sets, "faces": len(faces.names),
        "identities": len(set(faces.names)), "held_out_faces": int(len(ho)),
        "held_out_identities": len({faces.names[i] for i in ho}),
        "tuned_parameters": len(state), "tuned_parameter_count": int(sum(v.size for v in state.values())),
        "epochs": cfg.epochs, "held_out_before": before, "history": task.history, "kept_epoch": best_epoch,
        "distance_names": ["masked occluded", "masked clean", "unmasked clean"],
        "train_loss_names": ["masked occluded", "masked clean", "unmasked clean"] + (["identity"] if task.use_id else [])
        + (["relation"] if cfg.relation_weight > 0 else []),
        "identity_weight": cfg.identity_weight, "resumed_from": run.resumed_from,
        "seconds": round(time.perf_counter() - t0, 1),
    }
