"""`pdsn finetune --faces`: the trunk tuned on occluders drawn fresh; PDSN embeddings run the tuned trunk, the
baseline the untouched one."""

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdsn_cli.cli import app
from pdsn_cli.data.chip_cache import DataSpec, export_chips
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark
from pdsn_cli.pdsn import fdm
from pdsn_cli.pdsn.embedder import Embedder, TwinFeatures
from pdsn_cli.data.face_sets import read_face_sets
from pdsn_cli.train.finetune_trunk import FinetuneTrunkConfig, Student, finetune_trunk
from pdsn_cli.trunks import build_trunk


@pytest.fixture(scope="module")
def face_sets(tmp_path_factory):
    """Two face sets (synthetic, arc112x96: the tiny trunk's): the second reuses the first's identity names."""
    d = tmp_path_factory.mktemp("faces")
    a, b = d / "a.h5", d / "b.h5"
    export_chips(DataSpec(None, 4, 3, synthetic_seed=0), "arc112x96", a)
    export_chips(DataSpec(None, 3, 3, synthetic_seed=5), "arc112x96", b)
    return a, b


@pytest.fixture(scope="module")
def tuned(fdm_dict, face_sets, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ftt") / "dict-ft.h5"
    res = finetune_trunk(FinetuneTrunkConfig(dict_path=fdm_dict, faces=list(face_sets), out=out, weights=tiny_weights,
                                             epochs=2, lr=1e-3, batch_size=8, holdout=0.3, seed=0))
    return out, res


def test_identities_are_kept_apart_per_face_set(face_sets):
    fs = read_face_sets(list(face_sets), "arc112x96", None, 0)
    assert fs.sets == ["a", "b"] and len(fs.names) == 21
    assert len(set(fs.names)) == 7  # "synthetic_0000" of set a is not the one of set b
    assert {n.split("/")[0] for n in fs.names} == {"a", "b"}
    with pytest.raises(SchemaError, match="arc112x96"):
        read_face_sets(list(face_sets), "dlib150", None, 0)


def test_the_tuned_trunk_is_carried_and_used_for_pdsn_only(tuned, fdm_dict, tiny_weights):
    out, res = tuned
    trunk = build_trunk("tiny", tiny_weights)
    d = fdm.load(out)
    # from the stem on: every parameter of the trunk, more than the head after the mask point
    assert set(d.head) == {n for n, _ in trunk.named_parameters()}
    assert set(d.head) > set(trunk.head_parameters(d.mask_point))
    np.testing.assert_array_equal(d.fdm, fdm.load(fdm_dict).fdm)
    assert res["kept_epoch"] in (1, 2) and len(res["history"]) == 2 and res["held_out_faces"] > 0
    with h5py.File(out) as f:
        assert f["head"].attrs["from_stage"] == "stem" and f["head"].attrs["kept_epoch"] == res["kept_epoch"]
    emb = Embedder.load("tiny", tiny_weights, out)
    chips = np.random.default_rng(0).integers(0, 255, (3, 112, 96, 3), dtype=np.uint8)
    feats = emb.features([chips])
    assert emb.tuned_features and isinstance(feats, TwinFeatures) and len(feats[1:]) == 2
    assert not np.allclose(feats.base, feats.tuned)
    plain = Embedder.load("tiny", tiny_weights, fdm_dict)
    np.testing.assert_allclose(emb.plain(feats), plain.plain(plain.features([chips])), atol=1e-6)
    # the PDSN embedding of a chip with no occluded block is the tuned trunk's own embedding
    with torch.no_grad():
        own = torch.nn.functional.normalize(emb.masked_trunk(torch.from_numpy(chips).permute(0, 3, 1, 2).float()), dim=1)
    np.testing.assert_allclose(emb.masked(feats, emb.masks(np.zeros((3, 25), bool))[0]), own.numpy(), atol=1e-4)


def test_benchmark_baseline_rows_stay_those_of_the_untouched_trunk(tuned, fdm_dict, tiny_weights):
    common = dict(dataset="synthetic", trunk="tiny", weights=tiny_weights, occlusions=["none", "scarf"])
    a = run_benchmark(BenchmarkConfig(dict_path=fdm_dict, **common))
    b = run_benchmark(BenchmarkConfig(dict_path=tuned[0], **common))
    assert b["finetuned_trunk"] and not a["finetuned_trunk"]
    rows = lambda r, m: [(x["occlusion"], x["auc"]) for x in r["results"] if x["method"] == m]  # noqa: E731
    assert rows(a, "baseline") == rows(b, "baseline")
    assert rows(a, "pdsn") != rows(b, "pdsn")


def test_a_later_stage_tunes_only_from_there(fdm_dict, face_sets, tiny_weights, tmp_path):
    trunk = build_trunk("tiny", tiny_weights)
    stage = trunk.stages[trunk.stages.index(trunk.default_mask_point)]  # the mask point's own stage
    out = tmp_path / "ft.h5"
    res = finetune_trunk(FinetuneTrunkConfig(dict_path=fdm_dict, faces=[face_sets[0]], out=out, weights=tiny_weights,
                                             from_stage=stage, epochs=1, batch_size=8, holdout=0.3))
    tuned = set(fdm.load(out).head)
    assert tuned == set(trunk.parameters_from(stage)) and res["from_stage"] == stage
    assert tuned < {n for n, _ in trunk.named_parameters()}
    # the frozen part computes without gradients: its parameters get none
    s = Student(trunk, trunk.default_mask_point, stage)
    trunk.requires_grad_(True)
    x = torch.rand(2, 3, 112, 96) * 255
    sum(e.sum() for e in s(torch.cat([x, x]), torch.ones(2, *trunk.feature_shape()))).backward()
    assert {n for n, p in trunk.named_parameters() if p.grad is not None} == tuned


def test_a_run_resumed_ends_where_an_uninterrupted_one_does(fdm_dict, face_sets, tiny_weights, tmp_path):
    base = dict(dict_path=fdm_dict, faces=[face_sets[0]], weights=tiny_weights, epochs=2, batch_size=4, holdout=0.3,
                lr=1e-3)
    whole = finetune_trunk(FinetuneTrunkConfig(out=tmp_path / "whole.h5", **base))
    part = tmp_path / "resumed.h5"

    def stop_after_first_epoch(stage, done, total):
        if stage == "fine-tune" and done == total // 2:  # the epoch's checkpoint is written by then
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_trunk(FinetuneTrunkConfig(out=part, **base), progress=stop_after_first_epoch)
    assert (tmp_path / "resumed.h5.ckpt").exists() and not part.exists()
    res = finetune_trunk(FinetuneTrunkConfig(out=part, resume=True, **base))
    assert res["resumed_from"] is not None and res["history"] == whole["history"]
    a, b = fdm.load(tmp_path / "whole.h5").head, fdm.load(part).head
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_arguments_exit_2_and_write_nothing(fdm_dict, face_sets, block_pairs, tiny_weights, tmp_path):
    base = dict(dict_path=fdm_dict, faces=[face_sets[0]], weights=tiny_weights)
    # a stage after the mask point is the head alone (pdsn finetune --pairs): dlib-resnet's level1 after level2
    dlib = build_trunk("dlib-resnet")
    assert set(dlib.parameters_from("level1")) == set(dlib.head_parameters("level2"))
    assert set(dlib.parameters_from("level2")) > set(dlib.head_parameters("level2"))
    with pytest.raises(BadInputError, match="no stage"):
        finetune_trunk(FinetuneTrunkConfig(out=tmp_path / "x.h5", from_stage="nope", **base))
    with pytest.raises(BadInputError, match="--occluder"):
        finetune_trunk(FinetuneTrunkConfig(out=tmp_path / "x.h5", occluders=["random"], **base))
    with pytest.raises(BadInputError, match="does not exist"):
        finetune_trunk(FinetuneTrunkConfig(out=tmp_path / "x.h5", **{**base, "faces": [tmp_path / "none.h5"]}))
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "--dict", str(fdm_dict), "--pairs", str(block_pairs), "--faces",
                            str(face_sets[0]), "--out", str(tmp_path / "y.h5")])
    assert r.exit_code == 2 and "one of the two" in r.output
    assert not list(tmp_path.glob("*.h5"))


def test_cli_runs_the_trunk_mode(fdm_dict, face_sets, tiny_weights, tmp_path):
    out, js = tmp_path / "ft.h5", tmp_path / "ft.json"
    r = CliRunner().invoke(app, ["finetune", "--dict", str(fdm_dict), "--faces", str(face_sets[0]), "--faces",
                                 str(face_sets[1]), "--weights", tiny_weights, "--epochs", "1", "--batch-size", "8",
                                 "--occluder", "scarf", "--occluder", "block", "--out", str(out), "--json", str(js),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["face_sets"] == ["a", "b"] and res["faces"] == 21 and out.exists()
    assert "from stem" in r.output


def test_the_relation_term_is_trained_and_reported(fdm_dict, face_sets, tiny_weights, tmp_path):
    res = finetune_trunk(FinetuneTrunkConfig(dict_path=fdm_dict, faces=[face_sets[0]], out=tmp_path / "r.h5",
                                             weights=tiny_weights, epochs=1, batch_size=8, holdout=0.3,
                                             relation_weight=10.0))
    assert res["train_loss_names"][-1] == "relation" and len(res["history"][0]["train"]) == 4
    assert len(res["history"][0]["held_out"]) == 3  # the held-out score stays the three distances
    with pytest.raises(BadInputError, match="relation"):
        finetune_trunk(FinetuneTrunkConfig(dict_path=fdm_dict, faces=[face_sets[0]], out=tmp_path / "s.h5",
                                           weights=tiny_weights, relation_weight=-1.0))
