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
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from pdsn_cli.pdsn import fdm as fdm_mod
from pdsn_cli.data import pairs_h5
from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.device import resolve_device
from pdsn_cli.errors import BadInputError, JobFailed, SchemaError, check_training_options
from pdsn_cli.trunks.features import as_tensor, embed_features, extract_features
from pdsn_cli.trunks import build_trunk
from pdsn_cli.train.blocks import cosface_logits


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


def head_parameters(trunk, point: str) -> dict[str, torch.nn.Parameter]:
    """The parameters ``trunk.head`` uses after ``point`` (found by a backward pass, so any trunk works)."""
    f = torch.zeros(1, *trunk.feature_shape(point), device=next(trunk.parameters()).device, requires_grad=False)
    params = dict(trunk.named_parameters())
    for p in params.values():
        p.grad = None
        p.requires_grad_(True)
    trunk.head(f + 1.0, point).sum().backward()
    used = {n: p for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return used


def holdout_identities(names: list[str], share: float, seed: int) -> np.ndarray:
    """Which of ``names`` are held out: the identities whose seeded name hashes are lowest (round(share × U) of the
    U identities, at least one when share > 0, never all), so every pair of an identity — and every pair of one
    source image — lands on the same side, whatever pairs file it comes from."""
    uniq = sorted(set(names))
    k = min(max(round(share * len(uniq)), 1 if share > 0 else 0), len(uniq) - 1)
    key = seed.to_bytes(8, "little", signed=True)
    held = set(sorted(uniq, key=lambda n: zlib.crc32(key + n.encode()))[:k])
    return np.array([n in held for n in names], bool)


def _pairs_features(trunk, point, dictionary, cfg, device, progress=None):
    fc, fo, masks, names = [], [], [], []
    for path in cfg.pairs:
        p = pairs_h5.read_pairs(path, masks=False)
        if p.attrs["template"] != trunk.template:
            raise SchemaError(f"{path} holds {p.attrs['template']} chips, trunk {trunk.name} needs {trunk.template}")
        if int(p.attrs["grid"]) != dictionary.grid:
            raise SchemaError(f"{path} marks occlusions on a {p.attrs['grid']}-grid, the dictionary has {dictionary.grid}")
        sel = np.arange(len(p))
        if cfg.max_pairs is not None and len(p) > cfg.max_pairs:
            sel = np.sort(np.random.default_rng(cfg.seed).permutation(len(p))[:cfg.max_pairs])
        cb = (lambda d, n, name=path.name: progress(f"features {name}", d, 2 * n)) if progress else None
        fo.append(extract_features(trunk, p.occluded[sel], point, 64, device, progress=cb))
        cb2 = (lambda d, n, name=path.name: progress(f"features {name}", n + d, 2 * n)) if progress else None
        fc.append(extract_features(trunk, p.clean[sel], point, 64, device, progress=cb2))
        m, _ = dictionary.combine(p.blocks[sel] >= cfg.block_threshold)
        masks.append(m)
        names += [p.identity[k] for k in p.label[sel]]
    return np.concatenate(fc), np.concatenate(fo), np.concatenate(masks), names


def finetune(cfg: FinetuneConfig, progress=None, log=None) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.gpu)
    check_writable(cfg.out)
    if not cfg.pairs:
        raise BadInputError("give at least one --pairs file (pdsn make-pairs) to fine-tune on")
    check_training_options(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, holdout=cfg.holdout)
    if not cfg.identity_weight >= 0:
        raise BadInputError(f"--identity-weight must be ≥ 0, got {cfg.identity_weight}")
    if Path(cfg.out).resolve() == Path(cfg.dict_path).resolve():
        raise BadInputError("--out must be a new file: the input dictionary is kept as it is")
    dictionary = fdm_mod.load(cfg.dict_path)
    trunk = build_trunk(dictionary.trunk, cfg.weights).to(device)
    point = trunk.check_point(dictionary.mask_point)
    dictionary.check_features(trunk.feature_shape(point), cfg.dict_path)
    torch.manual_seed(cfg.seed)
    fc, fo, masks, names = _pairs_features(trunk, point, dictionary, cfg, device, progress)
    teacher = F.normalize(torch.from_numpy(embed_features(trunk, fc, point, device=device, normalize=False)), dim=1)
    # eval mode: batch-norm statistics stay those of the trunk (masked batches would skew them), dropout off;
    # the BN affine parameters are still trained
    student = copy.deepcopy(trunk).eval()
    trained = head_parameters(student, point)
    for p in trained.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained.values(), lr=cfg.lr)
    FC, FO, M, T = (as_tensor(a, device) for a in (fc, fo, masks, teacher))
    n = len(FC)
    held = holdout_identities(names, cfg.holdout, cfg.seed)
    tr, ho = np.flatnonzero(~held), np.flatnonzero(held)
    if len(tr) == 0:
        raise BadInputError("no pairs left to train on after the hold-out")

    # classes of the identity term: the training identities, each its normalised mean clean embedding
    ids = {nm: k for k, nm in enumerate(sorted({names[i] for i in tr}))}
    label = torch.tensor([ids.get(nm, -1) for nm in names], device=device)
    centres = torch.zeros(len(ids), T.shape[1], device=device).index_add_(0, label[tr], T[tr].float())
    centres = F.normalize(centres, dim=1)

    def distances(idx, with_identity: bool = False) -> torch.Tensor:
        """1 − cos to the clean embedding of: masked occluded, masked clean, unmasked clean (each a mean); with
        ``with_identity`` also the CosFace loss of the two masked embeddings among the training identities."""
        m, t = M[idx], T[idx]
        outs = [F.normalize(student.head(x, point), dim=1) for x in (FO[idx] * m, FC[idx] * m, FC[idx])]
        d = [(1 - (o * t).sum(1)).mean() for o in outs]
        if with_identity:
            y = label[idx]
            d.append(sum(F.cross_entropy(cosface_logits(o, centres, y, 30.0, 0.35), y) for o in outs[:2]) / 2)
        return torch.stack(d)

    @torch.no_grad()
    def held_out() -> list[float]:
        if len(ho) == 0:
            return []
        d = sum(distances(ho[a:a + 256]) * len(ho[a:a + 256]) for a in range(0, len(ho), 256)) / len(ho)
        return [round(float(x), 5) for x in d]

    before = held_out()
    use_id = cfg.identity_weight > 0
    best = None  # (held-out score, epoch, head state)
    history = []
    steps = int(np.ceil(len(tr) / cfg.batch_size))
    for epoch in range(cfg.epochs):
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(tr)
        total = torch.zeros(4 if use_id else 3, device=device)
        for s in range(steps):
            d = distances(perm[s * cfg.batch_size:(s + 1) * cfg.batch_size], use_id)
            opt.zero_grad(set_to_none=True)
            (d[:3].sum() + (cfg.identity_weight * d[3] if use_id else 0)).backward()
            opt.step()
            total += d.detach()
            if progress:
                progress("fine-tune", epoch * steps + s + 1, cfg.epochs * steps)
        train_d = (total / steps).tolist()
        if not np.isfinite(train_d).all():
            raise JobFailed(f"the fine-tuning loss became non-finite in epoch {epoch + 1}; lower --lr")
        history.append({"epoch": epoch + 1, "train": [round(x, 5) for x in train_d], "held_out": held_out()})
        if log:
            log(history[-1])
        # the head kept is that of the epoch whose held-out identities' masked embeddings lie closest to their
        # clean ones: on LFW's training identities it over-fits after 2-3 epochs (held-out distance rises again)
        score = sum(history[-1]["held_out"][:2]) if history[-1]["held_out"] else -epoch
        if best is None or score < best[0]:
            best = (score, epoch + 1, {k: v.detach().float().cpu().numpy().copy()
                                       for k, v in student.state_dict().items() if k in trained})
    _, best_epoch, state = best
    with atomic_output(cfg.out) as tmp:
        shutil.copyfile(cfg.dict_path, tmp)
        with h5py.File(tmp, "r+") as f:
            if "head" in f:
                del f["head"]
            g = f.create_group("head")
            for k, v in state.items():
                g.create_dataset(k, data=v)
            g.attrs.update(pairs=str([str(p) for p in cfg.pairs]), epochs=cfg.epochs, kept_epoch=best_epoch, lr=cfg.lr,
                           batch_size=cfg.batch_size, seed=cfg.seed, trunk_weights=str(cfg.weights or ""),
                           identity_weight=cfg.identity_weight,
                           objective="cosine distillation to the frozen clean embedding"
                           + (" + CosFace among the training identities" if use_id else ""))
    fdm_mod.load(cfg.out)  # refuse to leave behind a file that does not load
    return {
        "out": str(cfg.out), "dictionary": str(cfg.dict_path), "trunk": trunk.name, "mask_point": point,
        "pairs": int(n), "held_out_pairs": int(len(ho)), "held_out_identities": len({names[i] for i in ho}), "head_parameters": sorted(state),
        "head_parameter_count": int(sum(v.size for v in state.values())), "epochs": cfg.epochs,
        "held_out_before": before, "history": history, "kept_epoch": best_epoch,
        "distance_names": ["masked occluded", "masked clean", "unmasked clean"],
        "train_loss_names": ["masked occluded", "masked clean", "unmasked clean"] + (["identity"] if use_id else []),
        "identity_weight": cfg.identity_weight,
        "seconds": round(time.perf_counter() - t0, 1),
    }
