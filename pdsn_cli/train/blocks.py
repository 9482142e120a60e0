"""The Pairwise Differential Siamese Network: per-block mask generators trained on (clean, occluded) pairs.

For grid block j, a mask generator reads |f(clean) − f(occluded)| at the trunk's mask point and outputs a
sigmoid mask M over the features (the paper's Conv3×3 → PReLU → BN → Sigmoid). The frozen trunk head embeds
M⊙f(clean) and M⊙f(occluded); the loss is

    0.5·CE(M⊙f(clean)) + 0.5·CE(M⊙f(occluded)) + λ·L1(M⊙f(occluded), M⊙f(clean))

with CosFace logits (s, m) against a frozen classifier whose class weights are the normalised mean clean
embeddings of the training identities. Why that classifier: it exists for every trunk (dlib's has no identity
head), needs no training of its own, and its classes are exactly the identities of the pairs file, which are
kept apart from the evaluation identities — a head trained with the trunk would know other classes.

``--block all`` trains the K² generators as one module (a grouped convolution), on trunk features computed
once, so the trunk never runs inside the training loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdsn_cli.data import pairs_h5
from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.errors import BadInputError, JobFailed, SchemaError
from pdsn_cli.accel import autocast, check_precision, use_bf16
from pdsn_cli.trunks.features import as_tensor, embed_features, extract_features
from pdsn_cli.trunks import build_trunk
from pdsn_cli.train.processes import Processes

CKPT_KIND = "pdsn-blocks"


class MaskGenerators(nn.Module):
    """``n`` independent mask generators over C×H×W features, run as one grouped convolution."""

    def __init__(self, n: int, channels: int):
        super().__init__()
        self.n, self.c = n, channels
        self.conv = nn.Conv2d(n * channels, n * channels, 3, padding=1, bias=False, groups=n)
        self.prelu = nn.PReLU(n * channels)
        self.bn = nn.BatchNorm2d(n * channels)

    def forward(self, diff: torch.Tensor) -> torch.Tensor:
        """diff: n×B×C×H×W → masks n×B×C×H×W in (0, 1)."""
        n, b, c, h, w = diff.shape
        x = diff.permute(1, 0, 2, 3, 4).reshape(b, n * c, h, w)
        m = torch.sigmoid(self.bn(self.prelu(self.conv(x))))
        return m.reshape(b, n, c, h, w).permute(1, 0, 2, 3, 4)


def cosface_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, m: float):
    cos = F.normalize(emb, dim=1) @ weight.t()
    return s * (cos - m * F.one_hot(labels, weight.shape[0]).to(cos.dtype))


@dataclass
class TrainBlockConfig:
    pairs: Path
    out: Path
    trunk: str = "dlib-resnet"
    weights: str | None = None
    block: str = "all"
    mask_point: str | None = None
    epochs: int = 10
    batch_size: int = 32
    # Adam 1e-3: on LFW block pairs it reached a lower loss and better masks in the same epochs than the paper's
    # SGD (lr 0.01 / 0.1, momentum 0.9), which is kept as --optimizer sgd
    lr: float = 1e-3
    optimizer: str = "adam"
    lam: float = 10.0
    s: float = 30.0
    m: float = 0.35
    seed: int = 0
    gpu: int | None = None
    resume: bool = False
    precision: str = "bf16"  # CUDA only: bf16 autocast, features cached in GPU memory as bf16


@dataclass
class PairFeatures:
    """Trunk features of a pairs file, clean images deduplicated by source."""

    clean: np.ndarray  # U×C×H×W
    occluded: np.ndarray  # N×C×H×W
    clean_index: np.ndarray  # N → row of ``clean``
    label: np.ndarray  # N, the pairs file's identity index (the same in every shard of a distributed run)
    target: np.ndarray  # N
    num_classes: int  # identities in the pairs file (not all need be among the rows read)


def pair_features(trunk, pairs_path: Path, point: str, device, progress=None, rows=None,
                  precision: str = "bf16") -> PairFeatures:
    """Trunk features of the pairs in ``rows``. On CUDA they stay in GPU memory when they fit (bf16 with
    ``precision="bf16"``), so training never copies features between host and device."""
    p = pairs_h5.read_pairs(pairs_path, select=rows, masks=False)
    if p.attrs["template"] != trunk.template:
        raise SchemaError(f"{pairs_path} was made for template {p.attrs['template']}, trunk {trunk.name} needs "
                          f"{trunk.template} (make-pairs --template {trunk.template})")
    first: dict[str, int] = {}
    clean_index = np.empty(len(p), np.int64)
    for i, s in enumerate(p.source):
        clean_index[i] = first.setdefault(s, len(first))
    uniq = np.array(sorted(first.values()))
    rows_of_uniq = np.empty(len(first), np.int64)
    for i, s in enumerate(p.source):
        rows_of_uniq[first[s]] = i
    total = len(uniq) + len(p)
    dtype = torch.bfloat16 if use_bf16(device, precision) else torch.float32
    on_device = device.type == "cuda" and _fits_on_device(total * int(np.prod(trunk.feature_shape(point))) * dtype.itemsize, device)
    kw = dict(device=device, precision=precision, on_device=on_device, dtype=dtype, batch_size=256 if on_device else 64)
    cb = (lambda d, n: progress(d, total)) if progress else None
    fc = extract_features(trunk, p.clean[rows_of_uniq], point, progress=cb, **kw)
    cb2 = (lambda d, n: progress(len(uniq) + d, total)) if progress else None
    fo = extract_features(trunk, p.occluded, point, progress=cb2, **kw)
    return PairFeatures(fc, fo, clean_index, p.label.astype(np.int64), p.target.astype(np.int64), len(p.identity))


def _fits_on_device(nbytes: int, device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.6 * free  # the rest: trunk, generators, activations of a training step


def cached_pair_features(trunk, weights, pairs_path: Path, point: str, device, rows, progress=None,
                         precision: str = "bf16") -> PairFeatures:
    """pair_features, memoised on disk (npz in the cache folder) by pairs file identity, trunk, weights and rows:
    the trunk runs once per pairs file however many times the generators are retrained."""
    import hashlib

    from pdsn_cli.data.chip_cache import default_cache_dir

    if (weights is None and trunk.name != "dlib-resnet") or device.type == "cuda":
        # a random init: nothing worth reusing; CUDA: features live in GPU memory, recomputing beats a disk round trip
        return pair_features(trunk, pairs_path, point, device, progress, rows, precision)
    st = Path(pairs_path).stat()
    wst = Path(weights).stat() if weights is not None else None
    key = hashlib.sha1(repr(("v2", str(Path(pairs_path).resolve()), st.st_size, st.st_mtime_ns, trunk.name, str(weights),
                             wst and (wst.st_size, wst.st_mtime_ns), point, np.asarray(rows).tobytes())
                            ).encode()).hexdigest()[:16]
    path = default_cache_dir() / "features" / f"{Path(pairs_path).stem}-{trunk.name}-{point}-{key}.npz"
    if path.exists():
        try:
            z = np.load(path)
            return PairFeatures(z["clean"], z["occluded"], z["clean_index"], z["label"], z["target"],
                                int(z["num_classes"]))
        except Exception:  # a damaged cache entry is recomputed
            pass
    feats = pair_features(trunk, pairs_path, point, device, progress, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, clean=feats.clean, occluded=feats.occluded, clean_index=feats.clean_index,
                     label=feats.label, target=feats.target, num_classes=feats.num_classes)
    return feats


def class_weights(trunk, feats: PairFeatures, point: str, device, procs: Processes | None = None):
    """Frozen classifier: normalised mean clean embedding per identity, over the identities present (in any
    process of a distributed run). Returns the weights and the map file identity → class row (−1: absent)."""
    emb = embed_features(trunk, feats.clean, point, device=device)
    lab = np.zeros(len(feats.clean), np.int64)
    lab[feats.clean_index] = feats.label
    w = np.zeros((feats.num_classes, emb.shape[1]), np.float64)
    np.add.at(w, lab, emb)
    w = torch.from_numpy(w).to(device)
    count = torch.from_numpy(np.bincount(lab, minlength=feats.num_classes)).to(device)
    if procs is not None:
        w, count = procs.all_sum(w), procs.all_sum(count)
    present = count > 0
    remap = torch.cumsum(present.long(), 0) - 1
    remap[~present] = -1
    w = F.normalize(w[present], dim=1).float()
    return w, remap


def train_blocks(cfg: TrainBlockConfig, progress=None, log=None) -> dict:
    """Train the mask generators of the requested blocks; writes one checkpoint with their weights and the
    mean (min-max scaled) mask of each block over its training pairs (what build-dict binarises).

    Under ``torchrun`` each process takes the pairs of every WORLD_SIZE-th source image (so no clean image is
    embedded twice), the generators' gradients are averaged (DDP: an effective batch of WORLD_SIZE × batch per
    block), the mean masks are summed over all processes, and rank 0 alone writes checkpoints and output."""
    procs = Processes(cfg.gpu)
    try:
        return _train_blocks(cfg, procs, progress if procs.main else None, log if procs.main else None)
    finally:
        procs.close()


def _train_blocks(cfg: TrainBlockConfig, procs: Processes, progress, log) -> dict:
    device = procs.device
    check_writable(cfg.out)
    for name, v in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if v < 1:
            raise BadInputError(f"{name} must be ≥ 1, got {v}")
    if not cfg.lr > 0:
        raise BadInputError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.optimizer not in ("sgd", "adam"):
        raise BadInputError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")
    with pairs_h5.open_pairs(cfg.pairs) as f:
        grid = int(f.attrs["grid"])
        targets = f["target"][()]
        sources = f["source"][()] if procs.distributed else None
    from pdsn_cli.data.make_pairs import parse_blocks

    blocks = parse_blocks(cfg.block, grid)
    missing = [j for j in blocks if not (targets == j).any()]
    if missing:
        raise BadInputError(f"{cfg.pairs} has no pairs for block(s) {missing}; make them with "
                            f"`pdsn make-pairs --block all` (or --block J)")
    check_precision(cfg.precision)
    trunk = build_trunk(cfg.trunk, cfg.weights).to(device)
    for p in trunk.parameters():
        p.requires_grad_(False)
    point = trunk.check_point(cfg.mask_point)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    rows = np.flatnonzero(np.isin(targets, blocks))
    if procs.distributed:
        _, src = np.unique(sources[rows], return_inverse=True)
        rows = rows[src % procs.world == procs.rank]
        if not len(rows) or any(not (targets[rows] == j).any() for j in blocks):
            raise BadInputError(f"{cfg.pairs} has too few source images for {procs.world} processes: some "
                                f"process would get no pairs of a block")
    feats = cached_pair_features(trunk, cfg.weights, cfg.pairs, point, device, rows, _stage(progress, "features"),
                                 cfg.precision)
    t_feat = time.perf_counter() - t0
    weight, remap = class_weights(trunk, feats, point, device, procs)
    c, h, w = feats.clean.shape[1:]
    n = len(blocks)
    gen = MaskGenerators(n, c).to(device)
    model = gen
    if procs.distributed:
        model = nn.parallel.DistributedDataParallel(gen, device_ids=[device] if device.type == "cuda" else None)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(gen.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    else:
        raise BadInputError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")
    block_rows = [np.flatnonzero(feats.target == j) for j in blocks]
    # every process takes the same number of steps: the longest block shard of any process sets it
    steps_per_epoch = procs.all_max(math.ceil(max(len(r) for r in block_rows) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.5), int(total * 0.75)], 0.1)
    fc_all, fo_all = as_tensor(feats.clean, device), as_tensor(feats.occluded, device)
    lab_all = remap[torch.from_numpy(feats.label).to(device)]
    cidx_all = torch.from_numpy(feats.clean_index).to(device)
    meta = dict(kind=CKPT_KIND, trunk=cfg.trunk, mask_point=point, grid=grid, template=trunk.template,
                blocks=blocks, feature_shape=[c, h, w], config={k: str(v) for k, v in asdict(cfg).items()})
    start_epoch, history = 0, []
    if cfg.resume and cfg.out.with_name(cfg.out.name + ".ckpt").exists():
        start_epoch, history = _load_state(cfg.out.with_name(cfg.out.name + ".ckpt"), gen, opt, sched, meta)
    t1 = time.perf_counter()
    train_cb = _stage(progress, "train")
    for epoch in range(start_epoch, cfg.epochs):
        gen.train()
        perms = [np.random.default_rng([cfg.seed, epoch, j]).permutation(r) for j, r in zip(blocks, block_rows)]
        # n × steps × B pair indices (short blocks cycle through their pairs), on the device for the whole epoch
        order = torch.from_numpy(np.stack([np.resize(p, steps_per_epoch * cfg.batch_size) for p in perms])
                                 .reshape(n, steps_per_epoch, cfg.batch_size)).to(device)
        # per-step (loss, ce, l1) stay on the device: read once per epoch, so the step never waits for the host
        step_stats = torch.zeros(steps_per_epoch, 3, device=device)
        for step in range(steps_per_epoch):
            it = order[:, step]
            fo = fo_all[it]
            fc = fc_all[cidx_all[it]]
            lab = lab_all[it].reshape(-1)
            with autocast(device, cfg.precision):
                m = model((fc - fo).abs())
                mc, mo = (m * fc), (m * fo)
                ec = trunk.head(mc.reshape(-1, c, h, w), point)
                eo = trunk.head(mo.reshape(-1, c, h, w), point)
            # per-generator mean losses, summed: each generator's gradient does not depend on n
            ce = (F.cross_entropy(cosface_logits(ec.float(), weight, lab, cfg.s, cfg.m), lab, reduction="none")
                  + F.cross_entropy(cosface_logits(eo.float(), weight, lab, cfg.s, cfg.m), lab, reduction="none")) * 0.5
            ce = ce.reshape(n, -1).mean(1)
            l1 = (mo.float() - mc.float()).abs().reshape(n, cfg.batch_size, -1).mean(dim=(1, 2))
            loss = (ce + cfg.lam * l1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_stats[step] = torch.stack([loss.detach() / n, ce.detach().mean(), l1.detach().mean()])
            if train_cb:
                train_cb(epoch * steps_per_epoch + step + 1, total)
        stats = (procs.all_sum(step_stats) / procs.world).cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(stats[:, 0]))
        if len(bad):
            kept = (f"the last good checkpoint is kept ({cfg.out.name}.ckpt) — lower --lr and --resume"
                    if cfg.out.with_name(cfg.out.name + ".ckpt").exists() else
                    "no checkpoint was written yet — lower --lr, or check --weights (NaN features?)")
            raise JobFailed(f"loss became {stats[bad[0], 0]} at epoch {epoch + 1} step {bad[0] + 1}; {kept}")
        sums = stats.sum(0)
        # plain floats: numpy scalars would make the checkpoint unloadable with weights_only=True
        history.append({"epoch": epoch + 1, "loss": float(sums[0] / steps_per_epoch),
                        "ce": float(sums[1] / steps_per_epoch), "l1": float(sums[2] / steps_per_epoch)})
        if log:
            log(history[-1])
        if procs.main:
            _save_state(cfg.out.with_name(cfg.out.name + ".ckpt"), gen, opt, sched, epoch + 1, history, meta)
        procs.barrier()
    t_train = time.perf_counter() - t1
    procs.share_buffers(gen)  # the generators that are saved are the ones whose masks are averaged
    mean_masks, keep = mean_block_masks(gen, feats, blocks, device, procs=procs)
    if procs.main:
        payload = dict(meta, generators={k: v.cpu() for k, v in gen.state_dict().items()},
                       mean_masks=torch.from_numpy(mean_masks), history=history)
        _torch_save(payload, cfg.out)
        cfg.out.with_name(cfg.out.name + ".ckpt").unlink(missing_ok=True)
    procs.barrier()
    pairs = int(procs.all_sum(torch.tensor([len(feats.target)], device=device)).item())
    return {
        "out": str(cfg.out), "trunk": cfg.trunk, "mask_point": point, "feature_shape": [c, h, w],
        "blocks": blocks, "pairs": pairs, "classes": int(weight.shape[0]), "world_size": procs.world,
        "epochs": cfg.epochs, "steps": total, "history": history,
        "mean_mask_kept_at_0.5": [float(k) for k in keep],
        "feature_seconds": round(t_feat, 2), "train_seconds": round(t_train, 2),
    }


@torch.no_grad()
def mean_block_masks(gen: MaskGenerators, feats: PairFeatures, blocks: list[int], device, batch: int = 256,
                     procs: Processes | None = None):
    """Per block: the mean over its pairs (of every process) of the min-max scaled masks (n×C×H×W), and the
    fraction > 0.5.

    Every generator runs on its own block's pairs in the same step (the grouped convolution keeps them apart);
    blocks with fewer pairs cycle, and the repeats are left out of the mean."""
    gen.eval()
    c, h, w = feats.clean.shape[1:]
    rows = [np.flatnonzero(feats.target == j) for j in blocks]
    steps = math.ceil(max(len(r) for r in rows) / batch)
    fc_all, fo_all = as_tensor(feats.clean, device), as_tensor(feats.occluded, device)
    cidx = torch.from_numpy(feats.clean_index).to(device)
    out = torch.zeros(len(blocks), c * h * w, dtype=torch.float64, device=device)
    for s in range(steps):
        pos = np.arange(s * batch, (s + 1) * batch)
        it = torch.from_numpy(np.stack([r[pos % len(r)] for r in rows])).to(device)
        valid = torch.from_numpy(np.stack([pos < len(r) for r in rows])).to(device)
        fo = fo_all[it].float()
        m = gen((fc_all[cidx[it]].float() - fo).abs()).reshape(len(blocks), batch, -1)
        lo, hi = m.min(2, keepdim=True).values, m.max(2, keepdim=True).values
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
        out += (m * valid[..., None]).sum(1).double()
    count = torch.tensor([len(r) for r in rows], device=device, dtype=torch.float64)
    if procs is not None:
        out, count = procs.all_sum(out), procs.all_sum(count)
    out = (out / count[:, None]).cpu().numpy()
    out = out.reshape(len(blocks), c, h, w)
    return out.astype(np.float32), (out > 0.5).mean(axis=(1, 2, 3))


def _stage(progress, name):
    return (lambda d, n: progress(name, d, n)) if progress else None


def _torch_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)  # through a Python file: a full disk then raises OSError(ENOSPC), not a bare RuntimeError


def _save_state(path, gen, opt, sched, epoch, history, meta):
    _torch_save(dict(meta, generators=gen.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     epoch=epoch, history=history), path)


def _load_state(path, gen, opt, sched, meta):
    st = load_blocks_file(path)
    for k in ("trunk", "mask_point", "grid", "blocks", "feature_shape"):
        if st[k] != meta[k]:
            raise SchemaError(f"cannot resume from {path}: it has {k}={st[k]!r}, this run {meta[k]!r}")
    gen.load_state_dict(st["generators"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(st["epoch"]), list(st["history"])


def load_blocks_file(path: Path) -> dict:
    """A train-block output, loaded without executing code (weights_only)."""
    from pdsn_cli.trunks.checkpoint import load_checkpoint

    if not Path(path).is_file():
        raise SchemaError(f"no such file: {path}")
    try:
        st = load_checkpoint(path)
    except SchemaError as e:  # one message for every refused file, naming what it would run, never torch's advice
        raise SchemaError(f"not a loadable train-block checkpoint: {e}") from None
    if not isinstance(st, dict) or st.get("kind") != CKPT_KIND:
        raise SchemaError(f"{path} is not a train-block checkpoint")
    return st
