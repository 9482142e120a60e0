"""`pdsn finetune`: the head fine-tuned on FDM-masked features, carried by the dictionary, used for PDSN rows only."""

import h5py
import numpy as np
import pytest
import torch

from pdsn_cli.pdsn import fdm
from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.train.finetune import FinetuneConfig, finetune, head_parameters
from pdsn_cli.trunks import build_trunk


@pytest.fixture(scope="module")
def tuned(fdm_dict, block_pairs, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "dict-ft.h5"
    res = finetune(FinetuneConfig(dict_path=fdm_dict, pairs=[block_pairs], out=out, weights=tiny_weights,
                                  epochs=4, lr=1e-3, batch_size=16, holdout=0.2))
    return out, res


def test_head_parameters_are_those_after_the_mask_point(tiny_weights):
    trunk = build_trunk("tiny", tiny_weights)
    point = trunk.default_mask_point
    trunk.requires_grad_(False)
    names = set(head_parameters(trunk, point))
    # the lookup leaves the trunk as it found it (frozen here)
    assert names and not any(p.requires_grad for p in trunk.parameters())
    # changing a non-head parameter does not change the head's output
    f = torch.randn(2, *trunk.feature_shape(point))
    before = trunk.head(f, point)
    with torch.no_grad():
        for n, p in trunk.named_parameters():
            if n not in names:
                p.add_(1.0)
    assert torch.equal(before, trunk.head(f, point))


def test_finetune_brings_masked_embeddings_to_the_clean_ones(tuned, fdm_dict):
    out, res = tuned
    d0, d1 = res["held_out_before"], res["history"][-1]["held_out"]
    assert res["held_out_pairs"] > 0 and len(res["history"]) == 4
    assert d1[0] < d0[0] and d1[1] < d0[1]  # masked occluded / masked clean closer to the clean embedding
    scores = [sum(h["held_out"][:2]) for h in res["history"]]
    assert res["kept_epoch"] == 1 + int(np.argmin(scores))  # the head of the best held-out epoch is kept
    with h5py.File(out) as f:
        assert f["head"].attrs["kept_epoch"] == res["kept_epoch"]
    d = fdm.load(out)
    plain = fdm.load(fdm_dict)
    assert plain.head is None and set(d.head) == set(res["head_parameters"])
    np.testing.assert_array_equal(d.fdm, plain.fdm)  # the masks themselves are unchanged


def test_benchmark_uses_the_tuned_head_for_pdsn_rows_only(tuned, fdm_dict, tiny_weights):
    common = dict(dataset="synthetic", trunk="tiny", weights=tiny_weights, occlusions=["none", "sunglasses"])
    a = run_benchmark(BenchmarkConfig(dict_path=fdm_dict, **common))
    b = run_benchmark(BenchmarkConfig(dict_path=tuned[0], **common))
    assert b["finetuned_head"] and not a["finetuned_head"]
    rows = lambda r, m: [(x["occlusion"], x["auc"]) for x in r["results"] if x["method"] == m]  # noqa: E731
    assert rows(a, "baseline") == rows(b, "baseline")
    assert rows(a, "pdsn") != rows(b, "pdsn")


def test_finetune_refuses_bad_arguments(fdm_dict, block_pairs, tiny_weights, tmp_path):
    base = dict(dict_path=fdm_dict, pairs=[block_pairs], weights=tiny_weights)
    with pytest.raises(BadInputError, match="new file"):
        finetune(FinetuneConfig(out=fdm_dict, **base))
    with pytest.raises(BadInputError, match="--pairs"):
        finetune(FinetuneConfig(out=tmp_path / "x.h5", **{**base, "pairs": []}))
    with pytest.raises(BadInputError, match="--lr"):
        finetune(FinetuneConfig(out=tmp_path / "x.h5", lr=0, **base))
    assert not (tmp_path / "x.h5").exists()


def test_a_head_that_does_not_fit_the_trunk_is_refused(tuned, tmp_path, tiny_weights):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(tuned[0].read_bytes())
    with h5py.File(bad, "r+") as f:
        name = next(iter(f["head"]))
        del f["head"][name]
        f["head"].create_dataset(name, data=np.zeros((3, 3), np.float32))
    with pytest.raises(SchemaError, match="does not fit trunk tiny"):
        fdm.load(bad).masked_trunk(build_trunk("tiny", tiny_weights))


def test_holdout_is_by_identity():
    from pdsn_cli.train.splits import holdout_identities

    names = [f"id{k % 7}" for k in range(70)]
    held = holdout_identities(names, 0.3, seed=0)
    out = {n for n, h in zip(names, held) if h}
    assert len(out) == 2 and not out & {n for n, h in zip(names, held) if not h}  # round(0.3 × 7) identities, whole
    assert (held == holdout_identities(list(reversed(names)), 0.3, seed=0)[::-1]).all()  # order does not matter
    assert holdout_identities(["a", "b"], 0.01, 0).sum() == 1 and holdout_identities(["a"], 0.5, 0).sum() == 0


def test_identity_term_is_trained_and_reported(fdm_dict, block_pairs, tiny_weights, tmp_path):
    res = finetune(FinetuneConfig(dict_path=fdm_dict, pairs=[block_pairs], out=tmp_path / "ft.h5", weights=tiny_weights,
                                  epochs=2, lr=1e-3, batch_size=16, holdout=0.25, identity_weight=0.5))
    assert res["train_loss_names"][-1] == "identity" and all(len(h["train"]) == 4 for h in res["history"])
    assert res["history"][-1]["train"][3] < res["history"][0]["train"][3]
    with h5py.File(tmp_path / "ft.h5") as f:
        assert f["head"].attrs["identity_weight"] == 0.5
    with pytest.raises(BadInputError, match="identity-weight"):
        finetune(FinetuneConfig(dict_path=fdm_dict, pairs=[block_pairs], out=tmp_path / "x.h5", weights=tiny_weights,
                                identity_weight=-1))


def test_finetune_command_reports_the_kept_epoch(fdm_dict, block_pairs, tiny_weights, tmp_path):
    import json

    from typer.testing import CliRunner

    from pdsn_cli.cli.app import app

    r = CliRunner().invoke(app, ["finetune", "--dict", str(fdm_dict), "--pairs", str(block_pairs), "--weights",
                                 tiny_weights, "--epochs", "2", "--lr", "1e-3", "--out", str(tmp_path / "ft.h5"),
                                 "--json", str(tmp_path / "ft.json"), "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ft.json").read_text())
    assert f"epoch {res['kept_epoch']} of 2" in r.output


def test_fdm_on_occluded_masks_only_the_occluded_image(tuned, fdm_dict, tiny_weights):
    common = dict(dataset="synthetic", trunk="tiny", weights=tiny_weights, occlusions=["none", "sunglasses"])
    both = run_benchmark(BenchmarkConfig(dict_path=tuned[0], **common))
    one = run_benchmark(BenchmarkConfig(dict_path=tuned[0], fdm_on="occluded", **common))
    assert both["fdm_on"] == "both" and one["fdm_on"] == "occluded"
    row = lambda r, m, o: next(x for x in r["results"] if x["method"] == m and x["occlusion"] == o)  # noqa: E731
    # no occluded block (oracle, clean pairs): the plain embeddings on both sides, i.e. the baseline itself
    assert row(one, "pdsn", "none")["auc"] == row(one, "baseline", "none")["auc"]
    assert row(both, "pdsn", "none")["auc"] != row(both, "baseline", "none")["auc"]
    assert row(one, "pdsn", "sunglasses")["auc"] != row(both, "pdsn", "sunglasses")["auc"]
    assert row(one, "baseline", "sunglasses") == row(both, "baseline", "sunglasses")
    with pytest.raises(BadInputError, match="fine-tuned head"):
        run_benchmark(BenchmarkConfig(dict_path=fdm_dict, fdm_on="occluded", **common))
    with pytest.raises(BadInputError, match="--fdm-on"):
        run_benchmark(BenchmarkConfig(dict_path=tuned[0], fdm_on="left", **common))


def test_interrupted_and_resumed_run_is_bitwise_identical(fdm_dict, block_pairs, tiny_weights, tmp_path):
    import os
    import signal

    def cfg(out, **kw):
        return FinetuneConfig(dict_path=fdm_dict, pairs=[block_pairs], out=out, weights=tiny_weights, epochs=3,
                              lr=1e-3, batch_size=16, holdout=0.2, **kw)

    straight = finetune(cfg(tmp_path / "a.h5"))

    def ctrl_c_in_epoch_2(stage, step, total):
        if stage == "fine-tune" and step == total // 3 + 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled at the next step boundary

    out = tmp_path / "b.h5"
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(out), progress=ctrl_c_in_epoch_2)
    ckpt = tmp_path / "b.h5.ckpt"
    assert not out.exists() and torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = finetune(cfg(out, resume=True))
    for k in ("history", "kept_epoch", "held_out_before"):
        assert resumed[k] == straight[k], k
    with h5py.File(out) as fa, h5py.File(tmp_path / "a.h5") as fb:
        for k in fb["head"]:
            assert np.array_equal(fa["head"][k][()], fb["head"][k][()]), k
    assert not ckpt.exists()


def test_finetune_reads_schema_1_files_to_the_same_head(tuned, fdm_dict, block_pairs, tiny_weights, tmp_path):
    """An older version's pairs file (schema 1: chips stored) fine-tunes the head the regenerated chips did."""
    from conftest import write_schema1

    old = tmp_path / "old.h5"
    write_schema1(block_pairs, old)
    res = finetune(FinetuneConfig(dict_path=fdm_dict, pairs=[old], out=tmp_path / "ft.h5", weights=tiny_weights,
                                  epochs=4, lr=1e-3, batch_size=16, holdout=0.2))
    assert res["history"] == tuned[1]["history"] and res["held_out_before"] == tuned[1]["held_out_before"]
    with h5py.File(tmp_path / "ft.h5") as fa, h5py.File(tuned[0]) as fb:
        for k in fb["head"]:
            assert np.array_equal(fa["head"][k][()], fb["head"][k][()]), k


def test_finetune_under_torchrun_two_processes(fdm_dict, block_pairs, tiny_weights, tmp_path):
    """DDP on gloo: each process takes every 2nd pair of the global batch; rank 0 alone writes and prints."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out, js = tmp_path / "ft.h5", tmp_path / "ft.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pdsn_cli",
         "finetune", "--dict", str(fdm_dict), "--pairs", str(block_pairs), "--weights", tiny_weights, "--epochs", "2",
         "--lr", "1e-3", "--out", str(out), "--json", str(js), "-q"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finetune") == 1
    res = json.loads(js.read_text())
    assert len(res["history"]) == 2 and res["history"][-1]["held_out"][0] < res["held_out_before"][0]
    assert set(fdm.load(out).head) == set(res["head_parameters"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.h5", "ft.json"]
