"""The test-time Embedder (checks, FDM AND + fine-tuned head) and the occlusion driver's one seeding rule."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from pdsn_cli.data import pairs_h5
from pdsn_cli.data.chip_cache import DataSpec, load_chips
from pdsn_cli.data.h5util import open_for_writing, stamp
from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.occlusion.driver import OcclusionVariant, draw, occlude_chips, occluder_rng, parse_occlusions
from pdsn_cli.pdsn import fdm as fdm_mod
from pdsn_cli.pdsn.detector import DetectorNet, OcclusionDetector
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.features import extract_features

GRID = 5
TEMPLATE = "arc112x96"  # the tiny trunk's


def write_dict(path, fdm: np.ndarray, trunk="tiny", point="stage3", template=TEMPLATE, head=None):
    """An fdm-dict file holding a hand-made dictionary (and optionally a fine-tuned head)."""
    with open_for_writing(path) as f:
        stamp(f, fdm_mod.KIND, fdm_mod.SCHEMA, trunk=trunk, mask_point=point, template=template, grid=GRID,
              tau=0.25, sources="[]")
        f.create_dataset("fdm", data=fdm)
        f.create_dataset("mean_mask", data=fdm.astype(np.float32))
        f.create_dataset("trained", data=np.ones(len(fdm), bool))
        if head:
            for k, v in head.items():
                f.create_dataset(f"head/{k}", data=v)
    return path


@pytest.fixture(scope="module")
def hand_dict(tiny_weights, tmp_path_factory):
    """Random FDM entries (30% discarded each) and a fine-tuned head that differs from the trunk's."""
    trunk = build_trunk("tiny", tiny_weights)
    shape = trunk.feature_shape("stage3")
    rng = np.random.default_rng(0)
    fdm = rng.random((GRID * GRID, *shape)) > 0.3
    own = trunk.state_dict()
    head = {k: (own[k].numpy() * 1.5 + 0.01).astype(np.float32) for k in ("fc.2.weight", "fc.2.bias")}
    return write_dict(tmp_path_factory.mktemp("hand-dict") / "dict.h5", fdm, head=head), fdm, head


@pytest.fixture(scope="module")
def chips():
    ch, _ = load_chips(DataSpec(None, 3, 2), TEMPLATE)
    return ch


def test_embed_with_oracle_applies_the_and_of_the_occluded_blocks_entries_and_the_finetuned_head(
        tiny_weights, hand_dict, chips):
    path, fdm, head = hand_dict
    emb = Embedder.load("tiny", tiny_weights, path)
    assert emb.header() == {"trunk": "tiny", "mask_point": "stage3", "dictionary": str(path),
                            "finetuned_head": True, "finetuned_trunk": False, "occlusion_source": "oracle"}
    n = len(chips)
    occ = np.zeros((n, GRID, GRID), np.float32)
    occ.reshape(n, -1)[0, [3, 17]] = 0.6  # two blocks
    occ.reshape(n, -1)[1, 12] = 0.3
    occ.reshape(n, -1)[2, 8] = 0.2  # under the 0.25 threshold: not occluded
    out = emb.embed(chips.image, occ)
    np.testing.assert_array_equal(out.blocks, occ >= 0.25)

    # the independent reference: features ⊙ AND(fdm[j] for occluded j) → the fine-tuned head → L2
    trunk = build_trunk("tiny", tiny_weights).eval()
    feats = extract_features(trunk, chips.image, "stage3")
    masks = np.ones((n, *fdm.shape[1:]), bool)
    for i in range(n):
        for j in np.flatnonzero(occ[i].reshape(-1) >= 0.25):
            masks[i] &= fdm[j]
    tuned = build_trunk("tiny", tiny_weights).eval()
    with torch.no_grad():
        for k, v in head.items():
            tuned.state_dict()[k].copy_(torch.from_numpy(v))
        ref = tuned.head(torch.from_numpy(feats * masks), "stage3").numpy()
        own_head = trunk.head(torch.from_numpy(feats * masks), "stage3").numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    own_head /= np.linalg.norm(own_head, axis=1, keepdims=True)
    np.testing.assert_allclose(out.embeddings, ref, atol=1e-5)
    np.testing.assert_allclose(out.kept, masks.reshape(n, -1).mean(1), atol=1e-6)
    assert out.fallbacks == 0
    assert not np.allclose(out.embeddings, own_head, atol=1e-3)  # the fine-tuned head, not the trunk's
    plain = emb.plain(feats)
    assert not np.allclose(out.embeddings[:2], plain[:2], atol=1e-3)  # the FDM was applied
    # an image with no occluded block: every element kept, through the fine-tuned head
    np.testing.assert_allclose(out.embeddings[3], ref[3], atol=1e-5)
    assert out.kept[3] == 1.0
    # the lower-level steps give the same numbers
    m, _ = emb.masks(emb.occluded_blocks(chips.image, occ))
    np.testing.assert_allclose(emb.masked(feats, m), out.embeddings, atol=1e-6)


def test_flip_masks_the_mirrored_view_with_the_mirrored_blocks(tiny_weights, hand_dict, chips):
    path, fdm, _ = hand_dict
    emb = Embedder.load("tiny", tiny_weights, path, flip=True)
    blocks = np.zeros((1, GRID, GRID), bool)
    blocks[0, 1, 0] = True  # block 5 ↔ mirrored block 9
    masks, _ = emb.masks(blocks)
    assert masks.shape == (1, 2, *fdm.shape[1:])
    np.testing.assert_array_equal(masks[0, 0], fdm[5])
    np.testing.assert_array_equal(masks[0, 1], fdm[9])


def test_without_a_dictionary_embed_is_the_plain_trunk(tiny_weights, chips):
    emb = Embedder.load("tiny", tiny_weights)
    out = emb.embed(chips.image)
    assert out.blocks is None and out.fallbacks == 0 and (out.kept == 1).all()
    assert emb.header()["dictionary"] is None and emb.header()["occlusion_source"] is None
    np.testing.assert_allclose(out.embeddings, emb.plain(emb.features([chips.image])), atol=1e-6)


def test_oracle_without_occupancy_is_refused(tiny_weights, hand_dict, chips):
    emb = Embedder.load("tiny", tiny_weights, hand_dict[0])
    with pytest.raises(BadInputError, match="oracle"):
        emb.embed(chips.image[:2])


def test_mismatching_dictionary_trunk_and_detector_are_refused(tiny_weights, hand_dict, tmp_path):
    path, fdm, _ = hand_dict
    other = shutil.copy(path, tmp_path / "other-trunk.h5")
    with h5py.File(other, "r+") as f:
        f.attrs["trunk"] = "iresnet50"
    with pytest.raises(SchemaError, match="was built for trunk iresnet50"):
        Embedder.load("tiny", tiny_weights, other)
    small = write_dict(tmp_path / "small.h5", fdm[:, :, :3, :3])
    with pytest.raises(SchemaError, match="holds masks of shape"):
        Embedder.load("tiny", tiny_weights, small)
    with pytest.raises(BadInputError, match="needs --detector"):
        Embedder.load("tiny", tiny_weights, path, occlusion_source="detector")
    wrong_template = OcclusionDetector(DetectorNet(grid=GRID), template="dlib150", chip_size=(150, 150))
    wrong_template.save(tmp_path / "det150.pt")
    with pytest.raises(SchemaError, match="trained on dlib150 chips"):
        Embedder.load("tiny", tiny_weights, path, "detector", tmp_path / "det150.pt")
    wrong_grid = OcclusionDetector(DetectorNet(grid=4), template=TEMPLATE, chip_size=(112, 96))
    wrong_grid.save(tmp_path / "det4.pt")
    with pytest.raises(SchemaError, match="predicts a 4×4 grid"):
        Embedder.load("tiny", tiny_weights, path, "detector", tmp_path / "det4.pt")
    ok = OcclusionDetector(DetectorNet(grid=GRID), template=TEMPLATE, chip_size=(112, 96))
    ok.save(tmp_path / "det5.pt")
    assert Embedder.load("tiny", tiny_weights, path, "detector", tmp_path / "det5.pt").detector is not None
    for kw, msg in ((dict(occlusion_source="guess"), "--occlusion"), (dict(block_threshold=0.0), "--block-threshold"),
                    (dict(jitter=2, flip=True), "drop --flip"), (dict(landmarks="7"), "--landmarks")):
        with pytest.raises(BadInputError, match=msg):
            Embedder.load("tiny", tiny_weights, **kw)


# ---- the occlusion driver ----------------------------------------------------------------------------------
def test_variants_are_typed_and_named_as_results_spell_them():
    v = parse_occlusions(["none", "sunglasses", "block:12"], GRID)
    assert [(x.kind, x.block, x.name) for x in v] == [("none", None, "none"), ("sunglasses", None, "sunglasses"),
                                                      ("block", 12, "block:12")]
    assert OcclusionVariant("block", 12) == v[2] and hash(OcclusionVariant("block", 12)) == hash(v[2])


def test_one_seeding_rule_in_make_pairs_and_the_benchmarks(tmp_path):
    """Same (seed, variant, index) → the same occluder in a pairs file and in a benchmark's occluded images."""
    for kw, variant in ((dict(block="3"), OcclusionVariant("block", 3)),
                        (dict(occluder="sunglasses", per_image=2), OcclusionVariant("sunglasses"))):
        out = tmp_path / f"{variant.kind}.h5"
        make_pairs(MakePairsConfig(out=out, data=DataSpec(None, 3, 2), template=TEMPLATE, seed=7, **kw))
        p = pairs_h5.read_pairs(out)
        per = kw.get("per_image", 1)
        images = p.clean[::per]
        chips = SimpleNamespace(image=images, landmarks=p.landmarks[::per])
        for rep in range(per):
            # the benchmark's rule: the n-th occluded image of index draws with index n
            index = np.arange(len(images))
            if rep == 0 and per == 1:
                bench, occ = occlude_chips(chips, index, variant, GRID, seed=7)
                np.testing.assert_array_equal(bench, p.occluded)
                np.testing.assert_array_equal(occ, p.blocks)
            for i in index:  # make-pairs: row (image i, repeat k) is the (i · per_image + k)-th
                o = draw(images[i], chips.landmarks[i], variant, 7, i * per + rep, GRID)
                np.testing.assert_array_equal(o.image, p.occluded[i * per + rep])
    a = occluder_rng(0, OcclusionVariant("scarf"), 4).random()
    assert a == occluder_rng(0, OcclusionVariant("scarf"), 4).random()
    assert a != occluder_rng(0, OcclusionVariant("scarf"), 5).random()
    assert a != occluder_rng(0, OcclusionVariant("hand"), 4).random()


@pytest.mark.parametrize("flip", [False, True])
def test_one_mask_row_masks_every_row_across_head_batches(hand_dict, tiny_weights, chips, flip):
    """Identification masks a whole group of images with the FDM of one block combination (a row axis of 1): the
    same as that mask repeated per row, also past the head's first batch and with the flipped view's own FDM."""
    path, fdm, _ = hand_dict
    emb = Embedder.load("tiny", tiny_weights, path, flip=flip, head_batch_size=2)
    feats = emb.features([chips.image])  # 6 rows: three head batches
    combo = np.zeros((1, GRID, GRID), bool)
    combo[0, 1, 3] = combo[0, 2, 0] = True
    one, _ = emb.masks(combo)
    assert len(one) == 1
    np.testing.assert_array_equal(emb.masked(feats, one), emb.masked(feats, np.repeat(one, len(feats), axis=0)))


def test_a_short_last_batch_never_leaves_a_process_without_rows():
    from pdsn_cli.train.loop import steps_per_epoch

    assert steps_per_epoch(10, 4, 1) == 3  # one process: the last batch of 2 is kept, as always
    assert steps_per_epoch(9, 4, 2) == 2  # a last batch of 1 row cannot feed 2 processes: dropped
    assert steps_per_epoch(10, 4, 2) == 3 and steps_per_epoch(8, 4, 2) == 2
