"""PDSN mask generators and train-block: shapes, independence of the K² generators, checkpoints, --resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pdsn_cli.errors import BadInputError, JobFailed, SchemaError
from pdsn_cli.pdsn.mask_generator import MaskGenerators, cosface_logits, mean_block_masks
from pdsn_cli.train.blocks import CKPT_KIND, TrainBlockConfig, load_blocks_file, train_blocks


def test_mask_generators_shapes_and_range():
    torch.manual_seed(0)
    gen = MaskGenerators(3, 4)
    diff = torch.rand(3, 2, 4, 5, 6)
    m = gen(diff)
    assert m.shape == diff.shape
    assert ((m > 0) & (m < 1)).all()
    assert gen.conv.weight.shape == (12, 4, 3, 3)  # grouped: each generator sees only its own C channels


def test_each_generator_is_trained_only_by_its_own_block():
    torch.manual_seed(0)
    n, c = 4, 3
    gen = MaskGenerators(n, c).train()
    diff = torch.rand(n, 5, c, 6, 6)
    k = 2
    gen(diff)[k].sum().backward()
    for name, p in gen.named_parameters():
        g = p.grad.reshape(n, c, -1)  # every parameter is laid out generator-major along its first axis
        assert g[k].abs().sum() > 0, name
        assert (g[[j for j in range(n) if j != k]] == 0).all(), f"{name}: block {k}'s loss reached another generator"
    # and block k's output does not depend on the other blocks' inputs
    with torch.no_grad():
        gen.eval()
        other = diff.clone()
        other[[0, 1, 3]] = torch.rand(3, 5, c, 6, 6)
        assert torch.equal(gen(diff)[k], gen(other)[k])


def test_cosface_logits_subtract_the_margin_from_the_true_class_only():
    emb = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    lab = torch.tensor([1, 0])
    got = cosface_logits(emb, w, lab, s=10.0, m=0.5)
    expected = 10.0 * (torch.tensor([[0.6, 0.8], [0.0, -1.0]]) - 0.5 * torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(got, expected)


def test_train_block_all_writes_generators_and_mean_masks(trained_blocks):
    out, res = trained_blocks
    assert res["blocks"] == list(range(25)) and res["feature_shape"] == [128, 7, 6]
    assert res["pairs"] == 300 and res["classes"] == 4 and res["mask_point"] == "stage3"
    assert res["steps"] == 2 * math.ceil(12 / 8)  # 12 pairs per block, batches of 8, 2 epochs
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert all(np.isfinite([h["loss"], h["ce"], h["l1"]]).all() for h in res["history"])
    st = load_blocks_file(out)
    assert st["kind"] == CKPT_KIND and st["trunk"] == "tiny" and st["template"] == "arc112x96"
    assert st["grid"] == 5 and st["blocks"] == list(range(25)) and st["feature_shape"] == [128, 7, 6]
    mm = st["mean_masks"]
    assert mm.shape == (25, 128, 7, 6) and mm.dtype == torch.float32
    assert 0 <= float(mm.min()) and float(mm.max()) <= 1
    gen = MaskGenerators(25, 128)
    gen.load_state_dict(st["generators"])  # the saved weights are exactly the module's
    assert not out.with_name(out.name + ".ckpt").exists()  # the epoch checkpoint is gone after success


def _same_checkpoint(a, b) -> None:
    sa, sb = load_blocks_file(a), load_blocks_file(b)
    for k in sa["generators"]:
        assert torch.equal(sa["generators"][k], sb["generators"][k]), k
    assert torch.equal(sa["mean_masks"], sb["mean_masks"])
    assert sa["history"] == sb["history"]


def test_resume_after_an_epoch_checkpoint_equals_a_straight_run(trained_blocks, block_pairs, tiny_weights, tmp_path):
    straight, _ = trained_blocks
    out = tmp_path / "resumed.pt"
    cfg = TrainBlockConfig(pairs=block_pairs, out=out, trunk="tiny", weights=tiny_weights, epochs=2, batch_size=8)

    def stop_in_epoch_2(stage, done, total):
        if stage == "train" and done > total // 2:  # epoch 1 is checkpointed, epoch 2 has begun
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_blocks(cfg, progress=stop_in_epoch_2)
    ckpt = out.with_name(out.name + ".ckpt")
    assert not out.exists() and ckpt.exists()
    assert load_blocks_file(ckpt)["epoch"] == 1
    cfg.resume = True
    res = train_blocks(cfg)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    _same_checkpoint(out, straight)  # bitwise on CPU

    # a checkpoint of another run is not resumed from
    other = tmp_path / "other.pt"
    torch.save(dict(load_blocks_file(straight), blocks=[3], epoch=1), other.with_name(other.name + ".ckpt"))
    with pytest.raises(SchemaError, match="cannot resume"):
        train_blocks(TrainBlockConfig(pairs=block_pairs, out=other, trunk="tiny", weights=tiny_weights, epochs=2,
                                      batch_size=8, resume=True))


def test_single_block_trains_only_that_block(block_pairs, tiny_weights, tmp_path):
    res = train_blocks(TrainBlockConfig(pairs=block_pairs, out=tmp_path / "b7.pt", trunk="tiny", weights=tiny_weights,
                                        block="7", epochs=1, batch_size=4, optimizer="adam", lr=1e-3))
    assert res["blocks"] == [7] and res["pairs"] == 12
    assert load_blocks_file(tmp_path / "b7.pt")["mean_masks"].shape == (1, 128, 7, 6)


@pytest.mark.parametrize("change, error, message", [
    (dict(epochs=0), BadInputError, "--epochs"),
    (dict(batch_size=0), BadInputError, "--batch-size"),
    (dict(lr=0.0), BadInputError, "--lr"),
    (dict(optimizer="rmsprop"), BadInputError, "--optimizer"),
    (dict(block="25"), BadInputError, "outside the 5×5 grid"),
    (dict(mask_point="stage9"), BadInputError, "no mask point"),
    (dict(trunk="dlib-resnet", weights=None), SchemaError, "template"),
])
def test_bad_train_block_arguments(change, error, message, block_pairs, tiny_weights, tmp_path):
    cfg = TrainBlockConfig(pairs=block_pairs, out=tmp_path / "x.pt", trunk="tiny", weights=tiny_weights, epochs=1)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(error, match=message):
        train_blocks(cfg)
    assert list(tmp_path.iterdir()) == []


def test_pairs_without_block_targets_are_refused(tiny_weights, tmp_path):
    from pdsn_cli.data.chip_cache import DataSpec
    from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs

    pairs = tmp_path / "sun.h5"
    make_pairs(MakePairsConfig(out=pairs, data=DataSpec(None, 1, 2), occluder="sunglasses", template="arc112x96"))
    with pytest.raises(BadInputError, match="no pairs for block"):
        train_blocks(TrainBlockConfig(pairs=pairs, out=tmp_path / "x.pt", trunk="tiny", weights=tiny_weights))


def test_diverging_training_fails_with_job_failed(block_pairs, tiny_weights, tmp_path):
    out = tmp_path / "nan.pt"
    with pytest.raises(JobFailed, match="lower --lr"):
        train_blocks(TrainBlockConfig(pairs=block_pairs, out=out, trunk="tiny", weights=tiny_weights, block="0",
                                      epochs=3, batch_size=4, lr=1e30, lam=1e30))
    assert not out.exists()


def test_load_blocks_file_refuses_other_files(tmp_path):
    with pytest.raises(SchemaError, match="no such file"):
        load_blocks_file(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SchemaError, match="not a loadable"):
        load_blocks_file(junk)
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(SchemaError, match="not a train-block checkpoint"):
        load_blocks_file(weights)
    code = tmp_path / "code.pt"
    torch.save({"kind": CKPT_KIND, "payload": np.random.default_rng(0)}, code)  # an arbitrary object
    with pytest.raises(SchemaError, match="not a loadable"):
        load_blocks_file(code)


def test_train_block_under_torchrun_two_processes(block_pairs, tiny_weights, tmp_path):
    """DDP on gloo: each process takes half of the 12 source images; the mean masks are summed over both."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pdsn_cli.trunks import build_trunk
    from pdsn_cli.train.blocks import pair_features

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PDSN_CACHE=str(tmp_path / "cache"))
    out, js = tmp_path / "ddp.pt", tmp_path / "ddp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pdsn_cli",
         "train-block", "--trunk", "tiny", "--weights", tiny_weights, "--pairs", str(block_pairs), "--epochs", "2",
         "--batch-size", "4", "--out", str(out), "--json", str(js), "-q"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train-block") == 1  # one table, from rank 0
    res = json.loads(js.read_text())
    assert res["world_size"] == 2 and res["pairs"] == 300 and res["classes"] == 4
    assert res["steps"] == 2 * 2  # 6 pairs per block per process, batches of 4, 2 epochs
    st = load_blocks_file(out)
    assert not out.with_name(out.name + ".ckpt").exists()
    gen = MaskGenerators(25, 128)
    gen.load_state_dict(st["generators"])
    trunk = build_trunk("tiny", tiny_weights)
    feats = pair_features(trunk, block_pairs, "stage3", torch.device("cpu"))
    mean, _ = mean_block_masks(gen, feats, list(range(25)), torch.device("cpu"))
    # the saved means (summed over the two shards) are the means over all pairs
    np.testing.assert_allclose(st["mean_masks"].numpy(), mean, atol=1e-5)


def test_train_block_on_faces_draws_the_pairs_file_rows(block_pairs, trained_blocks, tiny_weights, tmp_path):
    """train-block --faces on a chips file of the same faces draws make-pairs' rows (occluded chips bit for bit)
    and trains the same generators and mean masks as train-block --pairs on make-pairs' file; --pairs and
    --faces together are refused."""
    from pdsn_cli.data.chip_cache import DataSpec, export_chips
    from pdsn_cli.data.drawn_pairs import drawn_block_pairs
    from pdsn_cli.data.pairs_h5 import PairsFile

    faces = tmp_path / "faces.h5"
    export_chips(DataSpec(None, 4, 3), "arc112x96", faces)
    drawn = drawn_block_pairs([faces], 5, list(range(25)), seed=0)
    with PairsFile(block_pairs) as pf:
        assert drawn.n == pf.n and np.array_equal(drawn.target, pf.target)
        assert np.array_equal(drawn.chip_index, pf.chip_index) and np.array_equal(drawn.label, pf.label)
        rows = np.arange(pf.n)[::7][::-1]
        assert np.array_equal(drawn.occluded(rows)[0], pf.occluded(rows)[0])
        assert np.array_equal(drawn.clean(rows), pf.clean(rows))
    out = tmp_path / "all.pt"
    res = train_blocks(TrainBlockConfig(pairs=None, faces=[faces], out=out, trunk="tiny", weights=tiny_weights,
                                        epochs=2, batch_size=8))
    want, got = load_blocks_file(trained_blocks[0]), load_blocks_file(out)
    assert res["pairs"] == trained_blocks[1]["pairs"] and res["classes"] == trained_blocks[1]["classes"]
    assert torch.equal(got["mean_masks"], want["mean_masks"])
    assert all(torch.equal(got["generators"][k], v) for k, v in want["generators"].items())
    with pytest.raises(BadInputError, match="not both"):
        train_blocks(TrainBlockConfig(pairs=block_pairs, faces=[faces], out=tmp_path / "x.pt", trunk="tiny"))
