"""The FDM dictionary: binarisation, merging train-block files, refusing mismatched ones, combining entries."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from pdsn_cli.pdsn import fdm
from pdsn_cli.report.plots import plot_dict
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.train.blocks import CKPT_KIND, load_blocks_file

SHAPE = (4, 3, 2)


def write_block_file(path, blocks, mean_masks, trunk="tiny", grid=5, mask_point="stage3", template="arc112x96"):
    """A train-block output with the same keys train_blocks writes (generators left out: build-dict ignores them)."""
    mean_masks = np.asarray(mean_masks, np.float32)
    torch.save(dict(kind=CKPT_KIND, trunk=trunk, mask_point=mask_point, grid=grid, template=template,
                    blocks=list(blocks), feature_shape=list(mean_masks.shape[1:]), config={}, generators={},
                    mean_masks=torch.from_numpy(mean_masks), history=[]), path)
    return path


@pytest.mark.parametrize("tau", [0.01, 0.25, 0.5, 0.333, 0.99])
def test_binarize_zeroes_exactly_floor_tau_n_lowest(tau):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 4, (5, 7, 3)).astype(np.float32)  # heavy ties
    keep = fdm.binarize(m, tau)
    assert keep.shape == m.shape and keep.dtype == bool
    assert (~keep).sum() == math.floor(tau * m.size)
    if (~keep).any():
        assert m[~keep].max() <= m[keep].min()  # the discarded ones are the lowest


def test_build_from_train_block_all(trained_blocks, fdm_dict, tmp_path):
    ckpt, _ = trained_blocks
    d = fdm.load(fdm_dict)
    n = 128 * 7 * 6
    assert d.fdm.shape == (25, 128, 7, 6) and d.fdm.dtype == bool
    assert (d.trunk, d.mask_point, d.template, d.grid, d.tau) == ("tiny", "stage3", "arc112x96", 5, 0.25)
    assert d.trained.all()
    assert ((~d.fdm).reshape(25, -1).sum(1) == math.floor(0.25 * n)).all()
    assert np.array_equal(d.mean_mask, load_blocks_file(ckpt)["mean_masks"].numpy())
    for j in range(25):
        assert np.array_equal(d.fdm[j], fdm.binarize(d.mean_mask[j], 0.25))
    with h5py.File(fdm_dict, "r") as f:
        assert f.attrs["pdsn_kind"] == "fdm-dict"

    res = fdm.build([ckpt], tmp_path / "d.h5", tau=0.5)
    plot_dict(fdm.load(tmp_path / "d.h5"), tmp_path / "d.png")
    assert res["blocks_trained"] == 25 and res["missing_blocks"] == []
    assert res["discarded_per_block"] == [n // 2] * 25
    assert 0 <= res["mean_pairwise_discard_iou"] <= 1
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.25, 1.5, float("nan")])
def test_tau_outside_open_unit_interval_refused(tau, tmp_path):
    f = write_block_file(tmp_path / "b.pt", [0], np.ones((1, *SHAPE)))
    with pytest.raises(BadInputError, match="--tau"):
        fdm.build([f], tmp_path / "d.h5", tau=tau)
    assert not (tmp_path / "d.h5").exists()


@pytest.mark.parametrize("other, what", [(dict(trunk="dlib-resnet"), "trunk"), (dict(grid=4), "grid"),
                                         (dict(mask_point="stage2"), "mask_point"),
                                         (dict(template="dlib150"), "template")])
def test_block_files_that_do_not_match_are_refused(other, what, tmp_path):
    a = write_block_file(tmp_path / "a.pt", [0], np.ones((1, *SHAPE)))
    b = write_block_file(tmp_path / "b.pt", [1], np.ones((1, *SHAPE)), **other)
    with pytest.raises(SchemaError, match=what):
        fdm.build([a, b], tmp_path / "d.h5")
    assert not (tmp_path / "d.h5").exists()


def test_feature_shape_mismatch_refused(tmp_path):
    a = write_block_file(tmp_path / "a.pt", [0], np.ones((1, *SHAPE)))
    b = write_block_file(tmp_path / "b.pt", [1], np.ones((1, 4, 3, 3)))
    with pytest.raises(SchemaError, match="feature_shape"):
        fdm.build([a, b], tmp_path / "d.h5")


def test_missing_blocks_keep_everything(block_pairs, tiny_weights, tmp_path):
    from pdsn_cli.train.blocks import TrainBlockConfig, train_blocks

    ckpt = tmp_path / "blocks" / "block07.pt"
    ckpt.parent.mkdir()
    train_blocks(TrainBlockConfig(pairs=block_pairs, out=ckpt, trunk="tiny", weights=tiny_weights, block="7",
                                  epochs=1, batch_size=6))
    res = fdm.build([ckpt.parent], tmp_path / "d.h5", tau=0.3)  # a folder of block files
    d = fdm.load(tmp_path / "d.h5")
    assert res["blocks_trained"] == 1 and res["missing_blocks"] == [j for j in range(25) if j != 7]
    assert list(np.flatnonzero(d.trained)) == [7]
    assert d.fdm[[j for j in range(25) if j != 7]].all()
    assert (~d.fdm[7]).sum() == math.floor(0.3 * d.fdm[7].size)
    assert res["mean_pairwise_discard_iou"] is None


def test_later_block_files_override_earlier_ones_and_merge(tmp_path):
    rng = np.random.default_rng(0)
    m1, m2, m3 = rng.random((3, 1, *SHAPE))
    a = write_block_file(tmp_path / "a.pt", [3], m1)
    b = write_block_file(tmp_path / "b.pt", [5, 3], np.concatenate([m2, m3]))
    fdm.build([a, b], tmp_path / "d.h5")
    d = fdm.load(tmp_path / "d.h5")
    assert list(np.flatnonzero(d.trained)) == [3, 5]
    np.testing.assert_array_equal(d.mean_mask[5], m2[0].astype(np.float32))
    np.testing.assert_array_equal(d.mean_mask[3], m3[0].astype(np.float32))


def test_inputs_refused(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        fdm.build([tmp_path / "nothing.pt"], tmp_path / "d.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no train-block outputs"):
        fdm.build([tmp_path / "empty"], tmp_path / "d.h5")
    with pytest.raises(SchemaError, match="not a pdsn fdm-dict"):
        plain = tmp_path / "plain.h5"
        with h5py.File(plain, "w") as f:
            f["fdm"] = np.ones(3)
        fdm.load(plain)


def _dictionary(entries: np.ndarray, grid: int = 2) -> fdm.FdmDict:
    return fdm.FdmDict(fdm=entries, mean_mask=entries.astype(np.float32), trained=np.ones(len(entries), bool),
                       trunk="tiny", mask_point="stage3", template="arc112x96", grid=grid, tau=0.25)


def test_combine_is_the_and_of_occluded_entries():
    rng = np.random.default_rng(1)
    entries = rng.random((4, *SHAPE)) > 0.3
    entries[3] = False  # block 3 discards every element
    d = _dictionary(entries)
    occluded = np.array([
        [0, 0, 0, 0],  # nothing occluded: keep everything
        [1, 0, 0, 0],
        [1, 1, 0, 1],  # includes the all-discarding block: nothing left, falls back to keeping all
        [0, 1, 1, 0],
    ], bool)
    masks, fallbacks = d.combine(occluded)
    assert masks.shape == (4, *SHAPE) and masks.dtype == np.float32
    assert (masks[0] == 1).all()
    assert np.array_equal(masks[1], entries[0].astype(np.float32))
    assert (masks[2] == 1).all() and fallbacks == 1
    assert np.array_equal(masks[3], (entries[1] & entries[2]).astype(np.float32))
    # K×K occupancy works as well as K² flags
    again, _ = d.combine(occluded.reshape(4, 2, 2))
    assert np.array_equal(again, masks)
    with pytest.raises(BadInputError, match="blocks"):
        d.combine(np.zeros((1, 9), bool))


def test_check_for_names_the_trunk():
    d = _dictionary(np.ones((4, *SHAPE), bool))
    d.check_for("tiny", "stage3")
    with pytest.raises(SchemaError, match="built for trunk tiny"):
        d.check_for("dlib-resnet", "level3")
