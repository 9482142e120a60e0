"""``pdsn train-block``: PDSN's mask generators trained on (clean, occluded) pairs of a make-pairs file, or on the
same pairs drawn from face sets as they are read (``--faces``: ``pdsn_cli.data.drawn_pairs``).

The generators and their loss are the method's (``pdsn_cli.pdsn.mask_generator``); this module feeds them.
The classifier of the loss is frozen: its class weights are the normalised mean clean embeddings of the training
identities. Why that classifier: it exists for every trunk (dlib's has no identity head), needs no training of
its own, and its classes are exactly the identities of the pairs file, which are kept apart from the evaluation
identities — a head trained with the trunk would know other classes.

``--block all`` trains the K² generators as one module (a grouped convolution), on trunk features computed
once, so the trunk never runs inside the training loop (``pdsn_cli.train.loop``: resume, torchrun, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pdsn_cli.accel import autocast, check_precision, use_bf16
from pdsn_cli.atomic import atomic_output, check_resumable, check_writable
from pdsn_cli.data import pairs_h5
from pdsn_cli.data.chip_cache import default_cache_dir
from pdsn_cli.data.drawn_pairs import DrawnPairs, drawn_block_pairs
from pdsn_cli.data.make_pairs import check_grid, parse_blocks
from pdsn_cli.errors import BadInputError, SchemaError, check_training_options
from pdsn_cli.pdsn.mask_generator import CKPT_KIND, MaskGenerators, load_blocks_file, mean_block_masks, pdsn_loss
from pdsn_cli.train.loop import Checkpoints, Processes, Task, train
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.features import as_tensor, embed_features, extract_features
from pdsn_cli.trunks.checkpoint import save_checkpoint

CHECKPOINT_FORMAT = "pdsn-train-block"
# load_blocks_file, CKPT_KIND, MaskGenerators and mean_block_masks live in pdsn.mask_generator; named here too,
# where readers of train-block outputs have always found them
__all__ = ["TrainBlockConfig", "train_blocks", "PairFeatures", "pair_features", "cached_pair_features",
           "class_weights", "load_blocks_file", "CKPT_KIND", "MaskGenerators", "mean_block_masks"]


@dataclass
class TrainBlockConfig:
    pairs: Path | None  # a make-pairs --block file; None with ``faces``
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
    #: chips files of ``pdsn align``: the pairs make-pairs would write for them, drawn as they are read (with
    #: ``seed`` as make-pairs' seed, ``grid``, ``per_image``), instead of ``pairs``
    faces: list[Path] | None = None
    grid: int = 5
    per_image: int = 1


def open_training_pairs(cfg: TrainBlockConfig):
    """The pairs to train on: the pairs file, or the face sets' drawn pairs (``DrawnPairs``); a context manager."""
    if not cfg.faces:
        if cfg.pairs is None:
            raise BadInputError("give --pairs (a make-pairs --block file) or --faces (chips files of pdsn align)")
        return pairs_h5.PairsFile(cfg.pairs)
    if cfg.pairs is not None:
        raise BadInputError("give either --pairs or --faces, not both")
    if cfg.per_image < 1:
        raise BadInputError(f"--per-image must be ≥ 1, got {cfg.per_image}")
    blocks = parse_blocks(cfg.block, cfg.grid)
    pairs = drawn_block_pairs(cfg.faces, cfg.grid, blocks, cfg.seed, cfg.per_image)
    check_grid(cfg.grid, pairs.attrs["template"])
    return pairs


@dataclass
class PairFeatures:
    """Trunk features of a pairs file, clean images deduplicated by source."""

    clean: np.ndarray  # U×C×H×W
    occluded: np.ndarray  # N×C×H×W
    clean_index: np.ndarray  # N → row of ``clean``
    label: np.ndarray  # N, the pairs file's identity index (the same in every shard of a distributed run)
    target: np.ndarray  # N
    num_classes: int  # identities in the pairs file (not all need be among the rows read)


def pair_features(trunk, pairs_path, point: str, device, progress=None, rows=None,
                  precision: str = "bf16", alloc=None) -> PairFeatures:
    """Trunk features of the pairs in ``rows`` (all when None; sorted). Chips are read (clean ones once per chip)
    and occluded ones regenerated batch by batch, so memory holds one batch of chips and the features. On CUDA
    they stay in GPU memory when they fit (bf16 with ``precision="bf16"``), so training never copies features
    between host and device. ``alloc(what, shape)``: where the features of the ``"clean"`` and ``"occluded"`` chips
    go on the host (memory-mapped files; default new arrays). ``pairs_path``: a pairs file, or pairs already open
    (``open_training_pairs``)."""
    opened = isinstance(pairs_path, (str, Path))
    with pairs_h5.PairsFile(pairs_path) if opened else contextlib.nullcontext(pairs_path) as pf:
        if pf.attrs["template"] != trunk.template:
            raise SchemaError(f"{pf.path} was made for template {pf.attrs['template']}, trunk {trunk.name} needs "
                              f"{trunk.template} (make-pairs --template {trunk.template})")
        rows = np.arange(pf.n) if rows is None else np.sort(np.asarray(rows, np.int64))
        # clean chips once each, in the order the rows first name them
        chip_vals, first_pos, inv = np.unique(pf.chip_index[rows], return_index=True, return_inverse=True)
        order = np.argsort(first_pos, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        clean_index = rank[inv.reshape(-1)].astype(np.int64)
        total = len(chip_vals) + len(rows)
        dtype = torch.bfloat16 if use_bf16(device, precision) else torch.float32
        on_device = device.type == "cuda" and _fits_on_device(total * int(np.prod(trunk.feature_shape(point))) * dtype.itemsize, device)
        kw = dict(device=device, precision=precision, on_device=on_device, dtype=dtype, batch_size=256 if on_device else 64)
        cb = (lambda d, n: progress(d, total)) if progress else None
        shape = tuple(trunk.feature_shape(point))
        out = alloc("clean", (len(chip_vals), *shape)) if alloc is not None and not on_device else None
        fc = extract_features(trunk, pairs_h5.LazyRows(pf, chip_vals[order], "chips"), point, progress=cb, out=out,
                              **kw)
        cb2 = (lambda d, n: progress(len(chip_vals) + d, total)) if progress else None
        out = alloc("occluded", (len(rows), *shape)) if alloc is not None and not on_device else None
        fo = extract_features(trunk, pairs_h5.LazyRows(pf, rows, "occluded"), point, progress=cb2, out=out, **kw)
        return PairFeatures(fc, fo, clean_index, pf.label[rows].astype(np.int64), pf.target[rows].astype(np.int64),
                            len(pf.identity))


def _fits_on_device(nbytes: int, device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.6 * free  # the rest: trunk, generators, activations of a training step


def cached_pair_features(trunk, weights, pairs_path, point: str, device, rows, progress=None,
                         precision: str = "bf16") -> PairFeatures:
    """pair_features, memoised on disk in the cache folder by pairs file identity, trunk, weights and rows: the
    trunk runs once per pairs file however many times the generators are retrained (``finetune`` reuses them).
    The features (float32 C×H×W a chip, 32 KB at dlib-resnet's level2) of the occluded chips and of the clean ones
    are ``.npy`` files that are memory-mapped, not loaded: pages are read as training gathers its batches; the
    indices are a small ``.npz`` written last, whose presence marks the entry complete."""
    if (weights is None and trunk.name != "dlib-resnet") or device.type == "cuda":
        # a random init: nothing worth reusing; CUDA: features live in GPU memory, recomputing beats a disk round trip
        return pair_features(trunk, pairs_path, point, device, progress, rows, precision)
    wst = Path(weights).stat() if weights is not None else None
    if isinstance(pairs_path, DrawnPairs):
        what, stem = (pairs_path.cache_key(),), f"drawn-{pairs_path.files[0].stem}"
    else:
        st = Path(pairs_path).stat()
        what, stem = (str(Path(pairs_path).resolve()), st.st_size, st.st_mtime_ns), Path(pairs_path).stem
    key = hashlib.sha1(repr(("v3", *what, trunk.name, str(weights), wst and (wst.st_size, wst.st_mtime_ns), point,
                             np.asarray(rows).tobytes())).encode()).hexdigest()[:16]
    base = default_cache_dir() / "features" / f"{stem}-{trunk.name}-{point}-{key}"
    meta = Path(f"{base}.npz")
    big = {w: Path(f"{base}.{w}.npy") for w in ("clean", "occluded")}
    if meta.exists() and all(p.exists() for p in big.values()):
        try:
            z = np.load(meta)
            # copy-on-write: writable for torch, pages shared with the page cache (never written back)
            fc, fo = (np.load(big[w], mmap_mode="c") for w in ("clean", "occluded"))
            if len(fo) == len(z["target"]) and len(fc) == int(z["clean_index"].max(initial=-1)) + 1:
                return PairFeatures(fc, fo, z["clean_index"], z["label"], z["target"], int(z["num_classes"]))
        except Exception:  # a damaged cache entry is recomputed
            pass
    meta.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # a cache entry: concurrent runs may write it too, each to its temp names
        tmps = {w: stack.enter_context(atomic_output(p, shared=True)) for w, p in big.items()}
        maps = []

        def alloc(what, shape):
            maps.append(np.lib.format.open_memmap(tmps[what], mode="w+", dtype=np.float32, shape=shape))
            return maps[-1]
        feats = pair_features(trunk, pairs_path, point, device, progress, rows, alloc=alloc)
        for m in maps:
            m.flush()
        maps.clear()
        del feats.clean, feats.occluded  # unmapped: the finished files are mapped again below, copy-on-write
    with atomic_output(meta, shared=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, label=feats.label, target=feats.target, clean_index=feats.clean_index,
                     num_classes=feats.num_classes)
    feats.clean, feats.occluded = (np.load(big[w], mmap_mode="c") for w in ("clean", "occluded"))
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


class _BlocksTask(Task):
    """One step: a batch of pairs per block through the n generators; the PDSN loss against the frozen classes."""

    def __init__(self, cfg: TrainBlockConfig, gen: MaskGenerators, trunk, point: str, feats: PairFeatures,
                 blocks: list[int], weight: torch.Tensor, remap: torch.Tensor, procs: Processes, log):
        self.cfg, self.trunk, self.point, self.blocks, self.weight, self.log = cfg, trunk, point, blocks, weight, log
        self.model, self.modules, self.device = gen, {"generators": gen}, procs.device
        self.block_rows = [np.flatnonzero(feats.target == j) for j in blocks]
        self.epochs = cfg.epochs
        # every process takes the same number of steps: the longest block shard of any process sets it
        self.steps_per_epoch = procs.all_max(math.ceil(max(len(r) for r in self.block_rows) / cfg.batch_size))
        self.fc_all, self.fo_all = as_tensor(feats.clean, self.device), as_tensor(feats.occluded, self.device)
        self.lab_all = remap[torch.from_numpy(feats.label).to(self.device)]
        self.cidx_all = torch.from_numpy(feats.clean_index).to(self.device)
        self.history: list[dict] = []

    def optimizer(self):
        gen, cfg = self.model, self.cfg
        if cfg.optimizer == "adam":
            return torch.optim.Adam(gen.parameters(), lr=cfg.lr)
        return torch.optim.SGD(gen.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)

    def scheduler(self, opt, total):
        return torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.5), int(total * 0.75)], 0.1)

    def plan(self, epoch):
        """n × steps × B pair indices (short blocks cycle through their pairs), on the device for the whole epoch."""
        self.model.train()
        cfg, spe = self.cfg, self.steps_per_epoch
        perms = [np.random.default_rng([cfg.seed, epoch, j]).permutation(r) for j, r in zip(self.blocks, self.block_rows)]
        return torch.from_numpy(np.stack([np.resize(p, spe * cfg.batch_size) for p in perms])
                                .reshape(len(self.blocks), spe, cfg.batch_size)).to(self.device)

    def step(self, model, plan, i):
        cfg, n = self.cfg, len(self.blocks)
        it = plan[:, i]
        loss, ce, l1 = pdsn_loss(model, self.fc_all[self.cidx_all[it]], self.fo_all[it],
                                 lambda f: self.trunk.head(f, self.point), self.weight, self.lab_all[it].reshape(-1),
                                 s=cfg.s, m=cfg.m, lam=cfg.lam, autocast=lambda: autocast(self.device, cfg.precision))
        return loss, torch.stack([loss.detach() / n, ce.detach().mean(), l1.detach().mean()])

    def end_epoch(self, epoch, stats, world):
        sums = (stats / world).numpy().sum(0)
        spe = self.steps_per_epoch
        # plain floats: numpy scalars would make the checkpoint unloadable with weights_only=True
        self.history.append({"epoch": epoch + 1, "loss": float(sums[0] / spe), "ce": float(sums[1] / spe),
                             "l1": float(sums[2] / spe)})
        if self.log:
            self.log(self.history[-1])

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state["history"])


def train_blocks(cfg: TrainBlockConfig, progress=None, log=None) -> dict:
    """Train the mask generators of the requested blocks; writes one checkpoint with their weights and the
    mean (min-max scaled) mask of each block over its training pairs (what build-dict binarises).

    ``progress(stage, done, total)`` for the stages "features" and "train". Under ``torchrun`` each process takes
    the pairs of every WORLD_SIZE-th source image (so no clean image is embedded twice), the generators'
    gradients are averaged (DDP: an effective batch of WORLD_SIZE × batch per block), the mean masks are summed
    over all processes, and rank 0 alone writes checkpoints and output."""
    with Processes(cfg.gpu) as procs:
        return _train_blocks(cfg, procs, progress if procs.main else None, log if procs.main else None)


def _train_blocks(cfg: TrainBlockConfig, procs: Processes, progress, log) -> dict:
    device = procs.device
    check_writable(cfg.out)
    check_resumable(cfg.out, cfg.out.with_name(cfg.out.name + ".ckpt"), cfg.resume)
    check_training_options(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)
    if cfg.optimizer not in ("sgd", "adam"):
        raise BadInputError(f"--optimizer must be sgd or adam, got {cfg.optimizer!r}")
    training_pairs = open_training_pairs(cfg)
    with training_pairs as pf:
        grid, name = pf.grid, pf.path
        targets = pf.target
        sources = np.array(pf.source, dtype=object) if procs.distributed else None
    # drawn pairs are read from the object; a pairs file is opened again where it is read
    pairs_in = training_pairs if cfg.faces else cfg.pairs
    blocks = parse_blocks(cfg.block, grid)
    missing = [j for j in blocks if not (targets == j).any()]
    if missing:
        raise BadInputError(f"{name} has no pairs for block(s) {missing}; make them with "
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
            raise BadInputError(f"{name} has too few source images for {procs.world} processes: some "
                                f"process would get no pairs of a block")
    feats = cached_pair_features(trunk, cfg.weights, pairs_in, point, device, rows, _stage(progress, "features"),
                                 cfg.precision)
    t_feat = time.perf_counter() - t0
    weight, remap = class_weights(trunk, feats, point, device, procs)
    c, h, w = feats.clean.shape[1:]
    gen = MaskGenerators(len(blocks), c).to(device)
    task = _BlocksTask(cfg, gen, trunk, point, feats, blocks, weight, remap, procs, log)
    meta = dict(kind=CKPT_KIND, trunk=cfg.trunk, mask_point=point, grid=grid, template=trunk.template,
                blocks=blocks, feature_shape=[c, h, w], config={k: str(v) for k, v in asdict(cfg).items()})
    ckpt = cfg.out.with_name(cfg.out.name + ".ckpt")
    checkpoints = Checkpoints(ckpt, CHECKPOINT_FORMAT, resume=cfg.resume, extra=meta,
                              must_match={k: meta[k] for k in ("trunk", "mask_point", "grid", "blocks", "feature_shape")},
                              advice=", or check --weights (NaN features?)")
    run = train(task, procs, checkpoints, progress)
    procs.share_buffers(gen)  # the generators that are saved are the ones whose masks are averaged
    mean_masks, keep = mean_block_masks(gen, feats, blocks, device, procs=procs)
    if procs.main:
        payload = dict(meta, generators={k: v.cpu() for k, v in gen.state_dict().items()},
                       mean_masks=torch.from_numpy(mean_masks), history=task.history)
        save_checkpoint(cfg.out, **payload)
        ckpt.unlink(missing_ok=True)
    procs.barrier()
    pairs = int(procs.all_sum(torch.tensor([len(feats.target)], device=device)).item())
    identities = len(np.unique(feats.label))
    warnings = [] if identities > 1 else [
        f"{name} holds pairs of {identities} identity: the classification loss is 0 and the masks learn only "
        f"from the L1 term; make pairs of 2 or more identities"]
    return {
        "warnings": warnings,
        "out": str(cfg.out), "trunk": cfg.trunk, "mask_point": point, "feature_shape": [c, h, w],
        "blocks": blocks, "pairs": pairs, "classes": int(weight.shape[0]), "world_size": procs.world,
        "epochs": cfg.epochs, "steps": run.steps, "resumed_from": run.resumed_from, "history": task.history,
        "mean_mask_kept_at_0.5": [float(k) for k in keep],
        "feature_seconds": round(t_feat, 2), "train_seconds": round(run.seconds, 2),
    }


def _stage(progress, name):
    return (lambda d, n: progress(name, d, n)) if progress else None
