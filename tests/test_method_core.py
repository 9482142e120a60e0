"""The method's core, pinned against references worked out here, independently of the code under test.

Each test names the part of PDSN it pins:
- the dictionary: entry j is the binarised mean mask of grid block j (row-major), applied as the AND of the
  occluded blocks' entries, and the flipped view's mask is the AND of the *mirrored* blocks' entries;
- test-time embedding (``embed_features``, the ``Embedder``): row i's masked embedding is
  head(features_i ⊙ fdm[blocks of row i]);
- the benchmark's PDSN score: cos(head(f₁⊙M), head(f₂⊙M)) with M from the occluded (second) image, which differs
  from the one-sided, the unmasked and the transposed-block-map scores;
- the flipped view (``--flip``): masked by the mirrored blocks' entries, its embedding summed with the image's;
- train-block: the first step's loss is 0.5·CE(M⊙f_clean) + 0.5·CE(M⊙f_occluded) + λ·L1, worked out by hand,
  and under torchrun a step follows the mean of the two shards' gradients from the single-process start;
- the mean masks build-dict binarises: the mean over a block's pairs of the min-max scaled masks;
- the effect: with a trained dictionary, PDSN recovers part of what a scarf costs the baseline (seeded).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

# The interfaces under test, in one place so that they are easy to repoint when modules move.
from pdsn_cli.data import pairs_h5
from pdsn_cli.data.verification_sets import synthetic_set
from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark
from pdsn_cli.eval.verification import summarize
from pdsn_cli.occlusion.driver import OcclusionVariant, occlude_chips
from pdsn_cli.pdsn import fdm
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.pdsn.mask_generator import MaskGenerators, mean_block_masks, pdsn_loss
from pdsn_cli.train.blocks import CKPT_KIND, PairFeatures, TrainBlockConfig, train_blocks
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.checkpoint import load_checkpoint
from pdsn_cli.trunks.features import embed_features, extract_features

from conftest import write_schema1

GRID = 5
TAU = 0.5
POINT = "stage3"  # the tiny trunk's mask point: 128×7×6 features
SHAPE = (128, 7, 6)
#: a block off the diagonal and off the middle column: its transpose (3, 1) and its mirror (1, 1) are other blocks
BLOCK_RC = (1, 3)
BLOCK = BLOCK_RC[0] * GRID + BLOCK_RC[1]  # 8
TRANSPOSED = BLOCK_RC[1] * GRID + BLOCK_RC[0]  # 16


def mirror(j: int) -> int:
    """The block that grid block j becomes in the image flipped left-right: (r, c) → (r, K−1−c)."""
    return j // GRID * GRID + GRID - 1 - j % GRID


MIRRORED = mirror(BLOCK)  # 6


def occluded_second_images(vs, block: int) -> np.ndarray:
    """The occluded copies of every pair's second image that ``run_benchmark`` draws for ``block:J`` (seed 0)."""
    return occlude_chips(vs.chips, vs.i2, OcclusionVariant("block", block), GRID, 0)[0]


# ---- references ---------------------------------------------------------------------------------------------
def keep_reference(mean_mask: np.ndarray, tau: float) -> np.ndarray:
    """1 = keep: every element except the floor(τ·size) smallest (the test's masks have no ties)."""
    flat = mean_mask.reshape(-1)
    cut = np.sort(flat)[int(np.floor(tau * flat.size)) - 1]
    return (flat > cut).reshape(mean_mask.shape)


def head(trunk, f: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return trunk.head(torch.from_numpy(np.ascontiguousarray(f, np.float32)), POINT).numpy().astype(np.float64)


def unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def metrics(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> dict:
    r = summarize(scores, same, fold)
    return {k: r[k] for k in ("accuracy", "tar_at_far_1e-3", "auc")}


def write_block_file(path, mean_masks: np.ndarray):
    """A train-block output of the tiny trunk for every block of the 5×5 grid (what build-dict reads)."""
    torch.save(dict(kind=CKPT_KIND, trunk="tiny", mask_point=POINT, grid=GRID, template="arc112x96",
                    blocks=list(range(GRID * GRID)), feature_shape=list(SHAPE), config={}, generators={},
                    mean_masks=torch.from_numpy(mean_masks.astype(np.float32)), history=[]), path)
    return path


@pytest.fixture(scope="module")
def hand_dict(tmp_path_factory):
    """A dictionary built from hand-made mean masks (distinct random values: every entry discards a different
    half), and the keep-masks worked out here from those means: (path, keep K²×C×H×W)."""
    rng = np.random.default_rng(7)
    means = rng.random((GRID * GRID, *SHAPE)).astype(np.float32)
    folder = tmp_path_factory.mktemp("hand-dict")
    out = folder / "dict.h5"
    fdm.build([write_block_file(folder / "blocks.pt", means)], out, tau=TAU)
    keep = np.stack([keep_reference(m, TAU) for m in means])
    assert (keep.reshape(len(keep), -1).mean(1) == TAU).all()
    return out, keep


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return build_trunk("tiny", tiny_weights)


# ---- the dictionary ------------------------------------------------------------------------------------------
def test_entry_j_is_the_binarised_mean_mask_of_block_j(hand_dict):
    path, keep = hand_dict
    d = fdm.load(path)
    assert d.grid == GRID and d.fdm.shape == (GRID * GRID, *SHAPE) and d.trained.all()
    np.testing.assert_array_equal(d.fdm, keep)
    np.testing.assert_array_equal(fdm.binarize(d.mean_mask[BLOCK], TAU), keep[BLOCK])


def test_masks_for_is_the_and_of_the_occluded_blocks_entries_row_major_and_mirrored_for_flip(hand_dict):
    path, keep = hand_dict
    d = fdm.load(path)
    # row-major (r, c) → r·K + c; sets chosen so that neither their transpose nor their mirror is the same set
    occupied = [[BLOCK_RC], [(0, 1), (1, 3)], [(4, 0), (2, 4), (3, 3)], []]
    occ = np.zeros((len(occupied), GRID, GRID), bool)
    for i, cells in enumerate(occupied):
        for r, c in cells:
            occ[i, r, c] = True

    def and_of(cells, col=lambda c: c):
        m = np.ones(SHAPE, bool)
        for r, c in cells:
            m &= keep[r * GRID + col(c)]
        return m.astype(np.float32)

    want = np.stack([and_of(cells) for cells in occupied])
    want_mirror = np.stack([and_of(cells, lambda c: GRID - 1 - c) for cells in occupied])
    masks, empty = d.masks_for(occ)
    assert empty == 0 and masks.shape == (len(occ), *SHAPE)
    np.testing.assert_array_equal(masks, want)
    assert not np.array_equal(masks[0], keep[TRANSPOSED])
    both, _ = d.masks_for(occ, flip=True)  # --flip: (image, mirrored image) views
    assert both.shape == (len(occ), 2, *SHAPE)
    np.testing.assert_array_equal(both[:, 0], want)
    np.testing.assert_array_equal(both[:, 1], want_mirror)
    np.testing.assert_array_equal(both[0, 1], keep[MIRRORED])
    assert not np.array_equal(both[:, 1], both[:, 0])
    # the mirrored occupancy is the image flipped left-right, column c ↔ K−1−c
    np.testing.assert_array_equal(fdm.mirror_blocks(occ), occ[:, :, ::-1])


def test_row_i_masked_embedding_is_the_head_of_its_features_times_its_blocks_entry(hand_dict, tiny):
    path, keep = hand_dict
    d = fdm.load(path)
    rng = np.random.default_rng(3)
    blocks = [BLOCK, TRANSPOSED, MIRRORED, 0, 24, 13]
    feats = np.maximum(rng.normal(size=(len(blocks), 2, *SHAPE)), 0).astype(np.float32)  # (image, mirror) views
    occ = np.zeros((len(blocks), GRID * GRID), bool)
    occ[np.arange(len(blocks)), blocks] = True
    masks, _ = d.masks_for(occ.reshape(-1, GRID, GRID))
    got = embed_features(tiny, feats[:, 0], POINT, masks, batch_size=4, normalize=False)
    want = np.concatenate([head(tiny, feats[i, :1] * keep[j]) for i, j in enumerate(blocks)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # flip: the views' embeddings are summed, the mirrored view masked by the mirrored block's entry
    masks2, _ = d.masks_for(occ.reshape(-1, GRID, GRID), flip=True)
    got2 = embed_features(tiny, feats, POINT, masks2, batch_size=4, normalize=False)
    want2 = np.concatenate([head(tiny, feats[i, :1] * keep[j]) + head(tiny, feats[i, 1:] * keep[mirror(j)])
                            for i, j in enumerate(blocks)])
    np.testing.assert_allclose(got2, want2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
def test_embedder_masks_each_chip_by_the_entry_of_its_occluded_block(hand_dict, tiny_weights, tiny, flip):
    """The one test-time path (``pdsn embed`` and every benchmark): oracle occupancy ≥ the block threshold marks a
    block occluded; row i's embedding is unit(head(features_i ⊙ fdm[block_i])) (+ the mirrored view's, with flip)."""
    path, keep = hand_dict
    blocks = [BLOCK, TRANSPOSED, MIRRORED, 0, 24]
    chips = np.random.default_rng(4).integers(0, 256, (len(blocks), 112, 96, 3), dtype=np.uint8)
    occupancy = np.zeros((len(blocks), GRID * GRID), np.float32)
    occupancy[np.arange(len(blocks)), blocks] = 0.6
    occupancy[:, 12] = 0.2  # under the 0.25 threshold: not occluded
    embedder = Embedder.load("tiny", tiny_weights, path, "oracle", flip=flip)
    got = embedder.embed(chips, occupancy.reshape(-1, GRID, GRID))
    want_blocks = np.zeros((len(blocks), GRID * GRID), bool)
    want_blocks[np.arange(len(blocks)), blocks] = True
    np.testing.assert_array_equal(np.asarray(got.blocks).reshape(len(blocks), -1), want_blocks)
    f = extract_features(tiny, chips, POINT, flip=flip)
    if flip:
        want = np.concatenate([head(tiny, f[i:i + 1, 0] * keep[j]) + head(tiny, f[i:i + 1, 1] * keep[mirror(j)])
                               for i, j in enumerate(blocks)])
    else:
        want = np.concatenate([head(tiny, f[i:i + 1] * keep[j]) for i, j in enumerate(blocks)])
    np.testing.assert_allclose(got.embeddings, unit(want), atol=1e-5)


# ---- the benchmark's PDSN score ------------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_benchmark_pdsn_applies_the_occluded_images_fdm_to_both_images(hand_dict, tiny_weights, tiny, flip):
    path, keep = hand_dict
    variant = f"block:{BLOCK}"
    res = run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="tiny", weights=tiny_weights, dict_path=path,
                                        occlusions=[variant], flip=flip))
    rows = {r["method"]: r for r in res["results"]}
    assert rows["pdsn"]["blocks_marked"] == pytest.approx(1 / GRID**2)

    vs = synthetic_set("arc112x96")
    occluded = occluded_second_images(vs, BLOCK)
    # the occluder of block:8 changed pixels of grid row 1, column 3 only (112×96 chip: 22.4 × 19.2 px blocks)
    changed = np.argwhere((occluded != vs.chips.image[vs.i2]).any(-1))[:, 1:]
    h, w = occluded.shape[1:3]
    r, c = BLOCK_RC
    assert len(changed) and changed[:, 0].min() >= r * h / GRID - 1 and changed[:, 0].max() <= (r + 1) * h / GRID
    assert changed[:, 1].min() >= c * w / GRID - 1 and changed[:, 1].max() <= (c + 1) * w / GRID

    f1 = extract_features(tiny, vs.chips.image[vs.i1], POINT, flip=flip)
    f2 = extract_features(tiny, occluded, POINT, flip=flip)

    def embed(f, mask=None, mirror_mask=None):
        if not flip:
            return unit(head(tiny, f if mask is None else f * mask))
        views = [(f[:, 0], mask), (f[:, 1], mirror_mask)]
        return unit(sum(head(tiny, v if m is None else v * m) for v, m in views))

    def score(m1, m2, mirror1=None, mirror2=None):
        return (embed(f1, m1, mirror1) * embed(f2, m2, mirror2)).sum(1)

    m, mm = keep[BLOCK], keep[MIRRORED]
    pdsn = metrics(score(m, m, mm, mm), vs.same, vs.fold)
    one_sided = metrics(score(None, m, None, mm), vs.same, vs.fold)
    unmasked = metrics(score(None, None), vs.same, vs.fold)
    transposed = metrics(score(keep[TRANSPOSED], keep[TRANSPOSED], keep[mirror(TRANSPOSED)], keep[mirror(TRANSPOSED)]),
                         vs.same, vs.fold)
    unmirrored = metrics(score(m, m, m, m), vs.same, vs.fold)
    for k, v in pdsn.items():
        assert rows["pdsn"][k] == pytest.approx(v, abs=1e-9), k
        assert rows["baseline"][k] == pytest.approx(unmasked[k], abs=1e-9), k
    # the reference tells the protocol apart from its likely mistakes
    assert pdsn["auc"] != pytest.approx(one_sided["auc"], abs=1e-4)
    assert pdsn["auc"] != pytest.approx(unmasked["auc"], abs=1e-4)
    assert pdsn["auc"] != pytest.approx(transposed["auc"], abs=1e-4)
    if flip:
        assert pdsn["auc"] != pytest.approx(unmirrored["auc"], abs=1e-4)


# ---- train-block ---------------------------------------------------------------------------------------------
LAM, S, MARGIN = 100.0, 30.0, 0.35  # λ large enough that λ·L1 is a good part of the loss


@pytest.fixture(scope="module")
def block_rows(block_pairs, tiny):
    """The 12 pairs of grid block BLOCK in ``block_pairs``, with what a train-block step reads of them: trunk
    features, class rows, and the frozen classifier (normalised sum of the unit clean embeddings per identity)."""
    p = pairs_h5.read_pairs(block_pairs, masks=False)
    rows = np.flatnonzero(p.target == BLOCK)
    assert len(rows) == 12 and len({p.source[i] for i in rows}) == 12
    fc = extract_features(tiny, p.clean[rows], POINT)
    fo = extract_features(tiny, p.occluded[rows], POINT)
    classes, target = np.unique(p.label[rows], return_inverse=True)
    clean_emb = unit(head(tiny, fc))
    weight = unit(np.stack([clean_emb[target == k].sum(0) for k in range(len(classes))]))
    return dict(source=np.array([p.source[i] for i in rows]), fc=fc, fo=fo, target=target, weight=weight)


def reference_block_loss(gen, trunk, fc, fo, target, weight):
    """0.5·CE(M⊙f_clean) + 0.5·CE(M⊙f_occluded) + λ·mean|M⊙f_occluded − M⊙f_clean|, with
    M = gen(|f_clean − f_occluded|) and CosFace logits s·(cos − m·[true class]); the generator in training mode,
    as a step runs it. In float64 (``gen`` is converted, the trunk copied). Returns (loss, ce, l1)."""
    fc, fo = torch.from_numpy(fc).double(), torch.from_numpy(fo).double()
    trunk = copy.deepcopy(trunk).double()
    gen.double().train()
    mask = gen(torch.abs(fc - fo)[None])[0]
    w = torch.from_numpy(weight)
    onehot = torch.from_numpy(np.eye(len(weight))[target])

    def ce(f):
        e = trunk.head(mask * f, POINT)
        logits = S * (e / e.norm(dim=1, keepdim=True) @ w.T - MARGIN * onehot)
        return (torch.logsumexp(logits, 1) - (logits * onehot).sum(1)).mean()

    ce_both = 0.5 * ce(fc) + 0.5 * ce(fo)
    l1 = (mask * fo - mask * fc).abs().mean()
    return ce_both + LAM * l1, ce_both, l1


def generator_of(path) -> MaskGenerators:
    gen = MaskGenerators(1, SHAPE[0])
    gen.load_state_dict(torch.load(path, weights_only=False)["generators"])
    return gen


@pytest.fixture(scope="module")
def one_step(block_pairs, tiny_weights, tmp_path_factory):
    """train-block on BLOCK's 12 pairs, one step, with a learning rate too small to move the weights: the saved
    generator is the one the step ran (and the initial one of any run with the same seed)."""
    out = tmp_path_factory.mktemp("one-step") / "b.pt"
    res = train_blocks(TrainBlockConfig(pairs=block_pairs, out=out, trunk="tiny", weights=tiny_weights,
                                        block=str(BLOCK), epochs=1, batch_size=12, lr=1e-12, lam=LAM, s=S, m=MARGIN))
    assert res["steps"] == 1
    return out, res


def test_pdsn_loss_on_tiny_tensors_is_half_ce_plus_half_ce_plus_lambda_l1_per_block_summed():
    """2 blocks × 3 pairs of 2×2×2 features, a fixed mask function and a linear head: worked out in numpy."""
    rng = np.random.default_rng(5)
    n, b, shape = 2, 3, (2, 2, 2)
    clean = rng.normal(size=(n, b, *shape))
    occluded = clean + rng.normal(size=(n, b, *shape))
    head_w = rng.normal(size=(3, 8))
    weight = unit(rng.normal(size=(4, 3)))  # 4 classes of 3-D embeddings
    labels = np.array([0, 1, 2, 3, 1, 0])
    lam, s, m = 10.0, 8.0, 0.35

    class SigmoidOfDiff(torch.nn.Module):
        def forward(self, diff):
            return torch.sigmoid(2 * diff - 1)

    loss, ce, l1 = pdsn_loss(SigmoidOfDiff(), torch.from_numpy(clean).float(), torch.from_numpy(occluded).float(),
                             lambda f: f.flatten(1) @ torch.from_numpy(head_w).float().T,
                             torch.from_numpy(weight).float(), torch.from_numpy(labels), s=s, m=m, lam=lam)

    mask = 1 / (1 + np.exp(-(2 * np.abs(clean - occluded) - 1)))
    y = labels.reshape(n, b)

    def cross_entropy(f, k):  # block k: CosFace logits of its b embeddings, CE averaged over the pairs
        cos = unit(f.reshape(b, -1) @ head_w.T) @ weight.T
        logits = s * (cos - m * np.eye(len(weight))[y[k]])
        return np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(b), y[k]])

    ce_want = np.array([0.5 * cross_entropy(mask[k] * clean[k], k) + 0.5 * cross_entropy(mask[k] * occluded[k], k)
                        for k in range(n)])
    l1_want = np.array([np.abs(mask[k] * occluded[k] - mask[k] * clean[k]).mean() for k in range(n)])
    np.testing.assert_allclose(ce.detach().numpy(), ce_want, rtol=1e-4)
    np.testing.assert_allclose(l1.detach().numpy(), l1_want, rtol=1e-4)
    assert (lam * l1_want > 0.1 * ce_want).all()
    assert float(loss) == pytest.approx(float((ce_want + lam * l1_want).sum()), rel=1e-4)


def test_train_block_first_step_loss_is_half_ce_plus_half_ce_plus_lambda_l1(one_step, block_rows, tiny):
    out, res = one_step
    b = block_rows
    with torch.no_grad():
        loss, ce, l1 = reference_block_loss(generator_of(out), tiny, b["fc"], b["fo"], b["target"], b["weight"])
    hist = res["history"][0]
    assert hist["ce"] == pytest.approx(float(ce), rel=1e-4)
    assert hist["l1"] == pytest.approx(float(l1), rel=1e-4)
    assert LAM * float(l1) > 0.1 * float(ce)
    assert hist["loss"] == pytest.approx(float(loss), rel=1e-4)


#: run by torchrun: train_blocks with the JSON config in argv[1]; rank 0 writes the result to argv[2]
DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from {module} import TrainBlockConfig, train_blocks
cfg = json.loads(sys.argv[1])
res = train_blocks(TrainBlockConfig(**dict(cfg, pairs=Path(cfg["pairs"]), out=Path(cfg["out"]))))
if os.environ["RANK"] == "0":
    Path(sys.argv[2]).write_text(json.dumps(res))
"""


def test_train_block_under_torchrun_steps_on_the_mean_of_the_shards_gradients(one_step, block_rows, tiny,
                                                                              block_pairs, tiny_weights, tmp_path):
    """Two processes (gloo), each on the pairs of every other source image (6 of the block's 12), one SGD step:
    the update is −lr·(mean of the two shards' gradients + weight decay), each shard's batch-norm statistics its
    own, from the same initial generator as a single-process run; the logged loss is the shards' mean."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script, out, js = tmp_path / "ddp.py", tmp_path / "ddp.pt", tmp_path / "ddp.json"
    script.write_text(DDP_SCRIPT.format(module=train_blocks.__module__))
    cfg = dict(pairs=str(block_pairs), out=str(out), trunk="tiny", weights=tiny_weights, block=str(BLOCK), epochs=1,
               batch_size=6, optimizer="sgd", lr=1.0, lam=LAM, s=S, m=MARGIN)
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PDSN_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(cfg), str(js)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["world_size"] == 2 and res["pairs"] == 12 and res["steps"] == 1

    b = block_rows
    _, src = np.unique(b["source"], return_inverse=True)
    start = generator_of(one_step[0])
    params0 = [p.detach().clone() for p in start.parameters()]

    def gradient(rows):
        gen = generator_of(one_step[0])
        loss, _, _ = reference_block_loss(gen, tiny, b["fc"][rows], b["fo"][rows], b["target"][rows], b["weight"])
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in gen.parameters()])

    shards = [gradient(np.flatnonzero(src % 2 == r)) for r in (0, 1)]
    weight_decay = 5e-4 * torch.cat([p.flatten() for p in params0]).double()
    want = (shards[0][1] + shards[1][1]) / 2 + weight_decay
    got = torch.cat([(p0 - p.detach()).flatten() for p0, p in zip(params0, generator_of(out).parameters())]).double()
    assert got.abs().max() > 1e-3  # the step moved the weights well beyond float32 rounding

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    assert cos(got, want) > 0.9999
    # what a mistake would give instead: one shard's gradient, or one batch of all 12 pairs
    assert cos(shards[0][1] + weight_decay, want) < 0.999
    assert cos(gradient(np.arange(12))[1] + weight_decay, want) < 0.999
    assert res["history"][0]["loss"] == pytest.approx((shards[0][0] + shards[1][0]) / 2, rel=1e-4)


def test_train_block_on_a_schema_1_file_trains_the_same_generators(trained_blocks, block_pairs, tiny_weights,
                                                                     tmp_path):
    """The occluded chips regenerated from a schema-2 file are the ones an older version stored: the same
    training, bit for bit; and the features are memory-mapped from the cache, not loaded."""
    old = tmp_path / "old.h5"
    write_schema1(block_pairs, old)
    out = tmp_path / "all.pt"
    res = train_blocks(TrainBlockConfig(pairs=old, out=out, trunk="tiny", weights=tiny_weights, epochs=2,
                                        batch_size=8))
    a, b = load_checkpoint(trained_blocks[0]), load_checkpoint(out)
    assert res["history"] == trained_blocks[1]["history"]
    assert torch.equal(a["mean_masks"], b["mean_masks"])
    assert all(torch.equal(a["generators"][k], b["generators"][k]) for k in a["generators"])
    from pdsn_cli.data.chip_cache import default_cache_dir
    from pdsn_cli.train.blocks import cached_pair_features
    feats = cached_pair_features(build_trunk("tiny", tiny_weights), tiny_weights, old, POINT, torch.device("cpu"),
                                 np.arange(300))
    assert isinstance(feats.occluded, np.memmap) and isinstance(feats.clean, np.memmap)
    assert feats.occluded.shape[0] == 300 and feats.clean.shape[0] == 12
    assert any(p.name.endswith(".occluded.npy") for p in (default_cache_dir() / "features").iterdir())


def test_mean_block_masks_are_the_mean_of_min_max_scaled_masks():
    torch.manual_seed(0)
    c, h, w = 3, 4, 5
    blocks = [2, 5]
    gen = MaskGenerators(len(blocks), c)
    with torch.no_grad():  # non-trivial batch-norm statistics, so masks span only part of (0, 1)
        gen.bn.running_mean.uniform_(-0.5, 0.5)
        gen.bn.running_var.uniform_(2.0, 4.0)
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(4, c, h, w)).astype(np.float32)
    clean_index = np.array([0, 1, 2, 3, 0, 1, 2])
    occluded = (clean[clean_index] + rng.normal(size=(7, c, h, w))).astype(np.float32)
    target = np.array([2, 5, 2, 2, 5, 2, 2])  # 5 pairs of block 2, 2 of block 5 (cycled in batches of 2)
    feats = PairFeatures(clean, occluded, clean_index, np.zeros(7, np.int64), target, 1)
    got, kept = mean_block_masks(gen, feats, blocks, torch.device("cpu"), batch=2)

    gen.eval()
    want = np.zeros((len(blocks), c, h, w))
    for k, j in enumerate(blocks):
        rows = np.flatnonzero(target == j)
        for i in rows:
            x = torch.zeros(len(blocks), 1, c, h, w)
            x[k, 0] = torch.from_numpy(np.abs(clean[clean_index[i]] - occluded[i]))
            with torch.no_grad():
                m = gen(x)[k, 0].numpy().astype(np.float64)
            assert m.max() - m.min() < 0.9  # the scaling matters
            want[k] += (m - m.min()) / (m.max() - m.min())
        want[k] /= len(rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept, (want > 0.5).mean(axis=(1, 2, 3)))


# ---- the effect ----------------------------------------------------------------------------------------------
def test_pdsn_recovers_part_of_what_a_scarf_costs(fdm_dict, tiny_weights):
    """Seeded: the dictionary trained on the tiny trunk's synthetic block pairs, oracle occlusion."""
    res = run_benchmark(BenchmarkConfig(dataset="synthetic", trunk="tiny", weights=tiny_weights, dict_path=fdm_dict,
                                        occlusions=["none", "scarf"]))
    rows = {(r["method"], r["occlusion"]): r for r in res["results"]}
    assert rows["baseline", "scarf"]["accuracy"] < rows["baseline", "none"]["accuracy"]
    assert rows["pdsn", "scarf"]["recovery"] > 0
    assert rows["pdsn", "scarf"]["auc"] > rows["baseline", "scarf"]["auc"]
