"""embed: pairs / chips / identity-folder / list inputs → unit-norm embeddings with the right labels and sources,
--features, PDSN-masked rows, and --resume after a partial file."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import assert_same_datasets, needs_dlib
from pdsn_cli import embed as embed_mod
from pdsn_cli.data import pairs_h5
from pdsn_cli.atomic import partial_path
from pdsn_cli.data.chip_cache import DataSpec, export_chips
from pdsn_cli.data.chips_h5 import read_chips
from pdsn_cli.embed import EmbedConfig, embed
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.features import embed_features, extract_features
from pdsn_cli.data.h5util import read_strings
from pdsn_cli.trunks import build_trunk


def _read(path):
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in f if k not in ("identity", "source")}
        out["identity"] = read_strings(f["identity"])
        out["source"] = read_strings(f["source"])
        out["attrs"] = dict(f.attrs)
    return out


def _unit_norm(e):
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_embed_pairs_file_with_features(block_pairs, tiny_weights, tmp_path):
    out = tmp_path / "clean.h5"
    res = embed(EmbedConfig(input=block_pairs, out=out, trunk="tiny", weights=tiny_weights, features=True))
    assert res["images"] == 300 and res["embedding_dim"] == 128 and res["mask_point"] == "stage3"
    e = _read(out)
    p = pairs_h5.read_pairs(block_pairs)
    assert e["embedding"].shape == (300, 128) and e["embedding"].dtype == np.float32
    _unit_norm(e["embedding"])
    assert [e["identity"][i] for i in e["label"]] == [p.identity[i] for i in p.label]
    assert e["source"] == p.source
    assert e["attrs"]["pdsn_kind"] == "embeddings" and e["attrs"]["trunk"] == "tiny" and e["attrs"]["complete"]
    assert (e["fdm_kept"] == 1).all()
    # the stored features are the trunk's, and the embedding is their head, normalised
    trunk = build_trunk("tiny", tiny_weights)
    feats = extract_features(trunk, p.clean[:10], "stage3")
    assert e["features"].shape == (300, 128, 7, 6)
    np.testing.assert_allclose(e["features"][:10], feats, atol=1e-5)
    np.testing.assert_allclose(e["embedding"][:10], embed_features(trunk, feats, "stage3"), atol=1e-5)
    # every clean row of one source is the same image
    first = p.source.index(p.source[0])
    same = [i for i, s in enumerate(p.source) if s == p.source[first]]
    assert np.allclose(e["embedding"][same], e["embedding"][first], atol=1e-6)


def test_occluded_rows_and_oracle_pdsn(block_pairs, tiny_weights, fdm_dict, tmp_path):
    clean = tmp_path / "c.h5"
    embed(EmbedConfig(input=block_pairs, out=clean, trunk="tiny", weights=tiny_weights))
    occ = tmp_path / "o.h5"
    embed(EmbedConfig(input=block_pairs, out=occ, trunk="tiny", weights=tiny_weights, which="occluded"))
    masked = tmp_path / "m.h5"
    res = embed(EmbedConfig(input=block_pairs, out=masked, trunk="tiny", weights=tiny_weights, which="occluded",
                            dict_path=fdm_dict, occlusion_source="oracle"))
    c, o, m = _read(clean)["embedding"], _read(occ)["embedding"], _read(masked)
    assert not np.allclose(c, o, atol=1e-3)
    _unit_norm(m["embedding"])
    # each occluded pair has exactly one block fully covered: its FDM entry drops floor(τ·n) of n elements
    np.testing.assert_allclose(m["fdm_kept"], 1 - np.floor(0.25 * 128 * 42) / (128 * 42), atol=1e-6)
    assert not np.allclose(m["embedding"], o, atol=1e-3)
    assert res["dictionary"] == str(fdm_dict) and m["attrs"]["occlusion_source"] == "oracle"


def test_embed_chips_file(tiny_weights, tmp_path):
    chips = tmp_path / "chips.h5"
    export_chips(DataSpec(None, 3, 2), "arc112x96", chips)
    out = tmp_path / "e.h5"
    embed(EmbedConfig(input=chips, out=out, trunk="tiny", weights=tiny_weights))
    e, ch = _read(out), read_chips(chips)
    assert e["embedding"].shape == (6, 128)
    _unit_norm(e["embedding"])
    assert e["identity"] == ch.identity and np.array_equal(e["label"], ch.label) and e["source"] == ch.source


@needs_dlib
def test_embed_identity_folder_and_list_file(face_folder, tiny_weights, tmp_path):
    out = tmp_path / "e.h5"
    res = embed(EmbedConfig(input=face_folder, out=out, trunk="tiny", weights=tiny_weights))
    e = _read(out)
    files = sorted(str(p.relative_to(face_folder)) for p in face_folder.glob("*/*.jpg"))
    assert res["images"] == len(files) == 12 and res["align"]["skipped"] == 0
    assert e["source"] == files
    assert [e["identity"][i] for i in e["label"]] == [f.split("/")[0] for f in files]
    _unit_norm(e["embedding"])

    listed = tmp_path / "list.txt"
    listed.write_text("# three photos\n" + "\n".join(files[::4]) + "\n")
    out2 = tmp_path / "e2.h5"
    embed(EmbedConfig(input=listed, out=out2, trunk="tiny", weights=tiny_weights, data_dir=face_folder))
    e2 = _read(out2)
    assert e2["source"] == files[::4]
    np.testing.assert_allclose(e2["embedding"], e["embedding"][::4], atol=1e-5)  # same chips from the cache

    listed.write_text("../outside.jpg\n")
    with pytest.raises(SchemaError, match="outside the data root"):
        embed(EmbedConfig(input=listed, out=tmp_path / "e3.h5", trunk="tiny", weights=tiny_weights,
                          data_dir=face_folder))


def test_resume_after_a_partial_equals_a_straight_run(block_pairs, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(embed_mod, "CHUNK", 64)  # 300 rows: 5 chunks
    straight = tmp_path / "straight.h5"
    embed(EmbedConfig(input=block_pairs, out=straight, trunk="tiny", weights=tiny_weights, features=True))

    out = tmp_path / "resumed.h5"
    cfg = EmbedConfig(input=block_pairs, out=out, trunk="tiny", weights=tiny_weights, features=True)

    def stop_after_two_chunks(stage, done, total):
        if stage == "embed" and done >= 128:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed(cfg, progress=stop_after_two_chunks)
    assert not out.exists() and partial_path(out).exists()
    cfg.resume = True
    res = embed(cfg)
    assert res["resumed_from"] == 128
    assert_same_datasets(out, straight)
    assert not partial_path(out).exists()

    # a partial file from another trunk is not continued
    with h5py.File(partial_path(out), "w") as f:
        f.attrs["pdsn_kind"], f.attrs["trunk"], f.attrs["mask_point"] = "embeddings", "dlib-resnet", "level3"
    with pytest.raises(SchemaError, match="another embed run"):
        embed(cfg)


def test_bad_inputs(block_pairs, tiny_weights, fdm_dict, tmp_path):
    def run(**kw):
        kw.setdefault("input", block_pairs)
        return embed(EmbedConfig(out=tmp_path / "e.h5", trunk="tiny", weights=tiny_weights, **kw))

    with pytest.raises(BadInputError, match="input not found"):
        run(input=tmp_path / "none.h5")
    with pytest.raises(BadInputError, match="--which"):
        run(which="both")
    with pytest.raises(BadInputError, match="needs --detector"):
        run(dict_path=fdm_dict)
    with pytest.raises(BadInputError, match="--occlusion"):
        run(dict_path=fdm_dict, occlusion_source="psychic")
    chips = tmp_path / "chips.h5"
    export_chips(DataSpec(None, 1, 1), "arc112x96", chips)
    with pytest.raises(BadInputError, match="oracle needs a pairs file"):
        run(input=chips, dict_path=fdm_dict, occlusion_source="oracle")
    other = tmp_path / "dlib-chips.h5"
    export_chips(DataSpec(None, 1, 1), "dlib150", other)
    with pytest.raises(SchemaError, match="trunk needs arc112x96"):
        run(input=other)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(2)
    with pytest.raises(SchemaError, match="not a pdsn chips or pairs"):
        run(input=plain)
    assert not (tmp_path / "e.h5").exists() and not partial_path(tmp_path / "e.h5").exists()


class _Rank:
    """One process of a torchrun group, run in this process (its peers' gather answers are its own)."""

    def __init__(self, rank: int, world: int):
        import torch

        self.rank, self.world, self.distributed, self.device = rank, world, True, torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        return [obj] * self.world


def _torchrun_embed(args: list[str], tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PDSN_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "pdsn_cli", "embed", *args, "-q"], env=env, capture_output=True, text=True, timeout=300)


def test_embed_under_torchrun_merges_shards_in_input_order_and_resumes_missing_ones(face_folder, tiny_weights, tmp_path):
    """2 gloo processes on an identity folder: each aligns and embeds half; rank 0 merges into what one process
    writes (rows, labels, identities, sources). Then a run whose rank 1 had finished keeps that shard."""
    one = tmp_path / "one.h5"
    embed(EmbedConfig(input=face_folder, out=one, trunk="tiny", weights=tiny_weights, cache_dir=tmp_path / "cache"))
    two = tmp_path / "two.h5"
    proc = _torchrun_embed(["--input", str(face_folder), "--trunk", "tiny", "--weights", tiny_weights,
                            "--out", str(two), "--json", str(tmp_path / "two.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("embed") >= 1 and "processes" in proc.stdout  # one table, from rank 0
    assert not list(tmp_path.glob("two.h5.shard-*"))
    with h5py.File(one) as a, h5py.File(two) as b:
        np.testing.assert_allclose(a["embedding"][()], b["embedding"][()], atol=1e-5)
        for name in ("label", "source", "identity", "fdm_kept"):
            assert a[name][()].tolist() == b[name][()].tolist(), name
        assert b.attrs["complete"] and b.attrs["trunk"] == "tiny"

    # an interrupted run whose rank 1 finished its shard: --resume recomputes only rank 0's
    three = tmp_path / "three.h5"
    cfg = EmbedConfig(input=face_folder, out=three, trunk="tiny", weights=tiny_weights, cache_dir=tmp_path / "cache")
    assert embed_mod._embed(cfg, _Rank(1, 2), None) is None
    shard1 = embed_mod.shard_path(three, 1, 2)
    assert shard1.is_file() and not three.exists()
    proc = _torchrun_embed(["--input", str(face_folder), "--trunk", "tiny", "--weights", tiny_weights,
                            "--out", str(three), "--resume", "--json", str(tmp_path / "three.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "three.json").read_text())
    assert res["world_size"] == 2 and res["resumed_from"] == 1 and res["images"] == 12
    with h5py.File(one) as a, h5py.File(three) as b:
        np.testing.assert_allclose(a["embedding"][()], b["embedding"][()], atol=1e-5)
        assert a["source"][()].tolist() == b["source"][()].tolist()
