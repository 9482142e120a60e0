"""The CUDA fast paths (pdsn_cli.accel): bf16 + channels_last + compile agree with the fp32 reference.

The bf16/fp32 agreement of the tiny trunk runs everywhere (CPU autocast); the rest needs a GPU and is skipped
without one (12 of them passed on an NVIDIA H200 on 2026-11-28; see the README's GPU section).
"""

import numpy as np
import pytest
import torch

from pdsn_cli.accel import FastForward
from pdsn_cli.trunks.features import embed_features, extract_features
from pdsn_cli.trunks import build_trunk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # float64: a random-init deep trunk gives activations whose squares overflow float32
    a, b = a.astype(np.float64), b.astype(np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _chips(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth random images (noise would make every trunk's output meaningless)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (size[1], size[0]), interpolation=cv2.INTER_CUBIC) for s in small])


def test_bf16_autocast_agrees_with_fp32_on_the_tiny_trunk(tiny_weights):
    trunk = build_trunk("tiny", tiny_weights)
    x = torch.from_numpy(_chips(32, trunk.input_size)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref = trunk(x).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = trunk(x).float().numpy()
    assert _cos(ref, low).min() >= 0.999


def test_cpu_ignores_bf16_and_compile(tiny_weights):
    trunk = build_trunk("tiny", tiny_weights)
    ff = FastForward(trunk, torch.device("cpu"), precision="bf16", compile="on")
    assert not ff.bf16 and not ff.compiled
    x = _chips(4, trunk.input_size)
    with torch.no_grad():
        ref = trunk(torch.from_numpy(x).permute(0, 3, 1, 2).float()).numpy()
    np.testing.assert_array_equal(ff(torch.from_numpy(x)).numpy(), ref)


@cuda
@pytest.mark.parametrize("name", ["tiny", "lresnet50e-ir", "iresnet50", "dlib-resnet"])
def test_cuda_bf16_features_and_embeddings_agree_with_fp32(name, tiny_weights):
    torch.manual_seed(0)
    trunk = build_trunk(name, tiny_weights if name == "tiny" else None)
    chips = _chips(64, trunk.input_size)
    dev = torch.device("cuda", 0)
    # unnormalised: a random-init iresnet50 reaches 1e26, whose square overflows the float32 normalisation
    ref = embed_features(trunk, extract_features(trunk, chips, device=dev, precision="fp32", compile="off"),
                         device=dev, normalize=False)
    cpu = embed_features(trunk.cpu(), extract_features(trunk.cpu(), chips), device=torch.device("cpu"),
                         normalize=False)
    low = embed_features(trunk, extract_features(trunk, chips, device=dev, precision="bf16", compile="off"),
                         device=dev, normalize=False)
    assert _cos(ref, cpu).min() >= 0.9999  # the GPU's fp32 is the CPU's
    assert _cos(ref, low).min() >= 0.999


@cuda
def test_cuda_compiled_equals_eager(tiny_weights):
    trunk = build_trunk("tiny", tiny_weights)
    chips = _chips(50, trunk.input_size)  # not a multiple of the batch: the compiled path pads the last one
    dev = torch.device("cuda", 0)
    eager = FastForward(trunk, dev, "bf16", "off", batch_size=16)
    comp = FastForward(trunk, dev, "bf16", "on", batch_size=16)
    x = torch.from_numpy(chips).to(dev)
    e = torch.cat([eager(x[a:a + 16]) for a in range(0, 50, 16)]).cpu().numpy()
    c = torch.cat([comp(x[a:a + 16]) for a in range(0, 50, 16)]).cpu().numpy()
    assert c.shape == e.shape == (50, trunk.embedding_dim)
    assert _cos(e, c).min() >= 0.999


@cuda
def test_cuda_train_block_bf16_matches_cpu_masks(block_pairs, tiny_weights, tmp_path):
    from pdsn_cli.pdsn.fdm import binarize
    from pdsn_cli.train.blocks import TrainBlockConfig, load_blocks_file, train_blocks

    common = dict(pairs=block_pairs, trunk="tiny", weights=tiny_weights, epochs=2, batch_size=8)
    train_blocks(TrainBlockConfig(out=tmp_path / "cpu.pt", **common))
    gpu = train_blocks(TrainBlockConfig(out=tmp_path / "gpu.pt", gpu=0, **common))
    assert np.isfinite([h["loss"] for h in gpu["history"]]).all()
    a = load_blocks_file(tmp_path / "cpu.pt")["mean_masks"].numpy()
    b = load_blocks_file(tmp_path / "gpu.pt")["mean_masks"].numpy()
    # same seeds and data: the discarded quarter of each block's mean mask mostly coincides
    iou = [((~binarize(x, 0.25)) & (~binarize(y, 0.25))).sum() / max(((~binarize(x, 0.25)) | (~binarize(y, 0.25))).sum(), 1)
           for x, y in zip(a, b)]
    assert np.mean(iou) >= 0.5


@cuda
def test_cuda_embed_matches_cpu(block_pairs, tiny_weights, tmp_path):
    import h5py

    from pdsn_cli.embed import EmbedConfig, embed

    embed(EmbedConfig(input=block_pairs, out=tmp_path / "cpu.h5", trunk="tiny", weights=tiny_weights))
    res = embed(EmbedConfig(input=block_pairs, out=tmp_path / "gpu.h5", trunk="tiny", weights=tiny_weights, gpu=0))
    assert res["precision"] == "bf16" and res["device"] == "cuda:0"
    with h5py.File(tmp_path / "cpu.h5") as f, h5py.File(tmp_path / "gpu.h5") as g:
        assert _cos(f["embedding"][()], g["embedding"][()]).min() >= 0.999


@cuda
def test_cuda_train_trunk_bf16(tmp_path):
    from pdsn_cli.data.chip_cache import DataSpec
    from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs
    from pdsn_cli.train.trunk import TrainTrunkConfig, train_trunk

    data = tmp_path / "pairs.h5"
    make_pairs(MakePairsConfig(out=data, data=DataSpec(None, 12, 6), occluder="sunglasses", template="arc112x96"))
    res = train_trunk(TrainTrunkConfig(data=str(data), out=str(tmp_path / "t"), trunk="tiny", epochs=3,
                                       batch_size=16, gpu=0, amp=True))
    assert res["device"] == "cuda:0" and np.isfinite(res["epoch_losses"]).all()
    assert res["epoch_losses"][-1] < res["epoch_losses"][0]


@cuda
def test_cuda_finetune(fdm_dict, block_pairs, tiny_weights, tmp_path):
    from pdsn_cli.train.finetune import FinetuneConfig, finetune

    res = finetune(FinetuneConfig(dict_path=fdm_dict, pairs=[block_pairs], out=tmp_path / "ft.h5", weights=tiny_weights,
                                  epochs=2, lr=1e-3, batch_size=16, holdout=0.2, gpu=0))
    assert res["history"][-1]["held_out"][0] < res["held_out_before"][0]
