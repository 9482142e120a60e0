"""MegaFace Challenge 1 protocol: devkit files, the identification scoring, and both datasets end to end on
generated fixtures in their distributed layouts (FlickrFinal2 + facescrub_images + devkit/templatelists; an
LFW-style identity folder for megaface-lfw)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import hog_detectable_faces, write_jpeg
from pdsn_cli.cli.app import app
from pdsn_cli.data import megaface as mf
from pdsn_cli.errors import BadInputError
from pdsn_cli.eval.identification import IdentificationConfig, ProbeSide, Tally, run_identification, score_group
from pdsn_cli.eval.search import ArrayGallery
from pdsn_cli.pdsn.embedder import Embedder


# ---- devkit files ------------------------------------------------------------------------------------------
def test_devkit_bin_is_the_matio_layout(tmp_path):
    v = np.arange(5, dtype=np.float32) / 7
    p = tmp_path / "a" / "1.jpg_x.bin"
    mf.write_bin(p, v)
    b = p.read_bytes()
    assert struct.unpack("<4i", b[:16]) == (5, 1, 4, 5)  # rows, cols, row stride, CV_32F
    np.testing.assert_array_equal(mf.read_bin(p), v)
    p.write_bytes(b[:20])
    with pytest.raises(BadInputError, match="not a float32 devkit feature file"):
        mf.read_bin(p)


def test_template_lists_and_nesting(tmp_path):
    tl = tmp_path / "templatelists"
    mf.write_template_lists(tl, ["A", "A"], ["A/a1.png", "A/a2.png"], {2: ["x/1.jpg", "x/2.jpg"],
                                                                       3: ["x/2.jpg", "x/1.jpg", "y/3.jpg"]})
    assert mf.read_probe_list(tl / mf.PROBE_LIST) == (["A", "A"], ["A/a1.png", "A/a2.png"])
    lists = mf.read_distractor_lists(tl)
    assert list(lists) == [2, 3]
    assert mf.nested_order(lists) == ["x/1.jpg", "x/2.jpg", "y/3.jpg"]
    assert mf.nested_order({2: ["a", "b"], 3: ["a", "c", "d"]}) is None
    (tl / "megaface_features_list.json_4_1").write_text(json.dumps({"path": ["a"]}))
    with pytest.raises(BadInputError, match="its name says 4"):
        mf.read_distractor_lists(tl)
    (tl / mf.PROBE_LIST).write_text(json.dumps({"id": ["A"], "path": ["../../etc/passwd"]}))
    with pytest.raises(BadInputError, match="bad image path"):
        mf.read_probe_list(tl / mf.PROBE_LIST)


def test_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(BadInputError, match="no MegaFace distractor images folder"):
        mf.MegafaceLayout.resolve(tmp_path)
    (tmp_path / "FlickrFinal2").mkdir()
    (tmp_path / "facescrub_images").mkdir()
    (tmp_path / "devkit" / "templatelists").mkdir(parents=True)
    with pytest.raises(BadInputError, match="facescrub_features_list.json"):
        mf.MegafaceLayout.resolve(tmp_path)


# ---- the scoring ---------------------------------------------------------------------------------------------
def test_tally_counts_ranks_per_gallery_size():
    t = Tally([2, 4], ranks=3)
    t.hist = np.zeros((2, 8), np.int64)
    # one probe, distractor top-3 at sizes 2 and 4; genuine scores of two gallery images (b ≠ a)
    top = np.array([[[0.5, 0.2, -np.inf]], [[0.9, 0.5, 0.2]]], np.float32)
    g = np.array([[0.6, 0.3]], np.float32)
    t.add(top, g, np.ones((1, 2), bool))
    # size 2: 0.6 beats all (rank 1), 0.3 has one above (rank 2); size 4: 0.6 → rank 2, 0.3 → rank 3
    np.testing.assert_array_equal(t.hits, [[1, 2, 2], [0, 1, 2]])
    assert t.trials == 2


def test_lfw_split_probes_and_distractors(tmp_path):
    for name, n in (("A", 2), ("B", 1), ("C", 3)):
        for k in range(n):
            write_jpeg(tmp_path / name / f"{name}_{k:04d}.jpg", np.zeros((40, 40, 3), np.uint8))
    probes, dist, _ = mf.lfw_split(tmp_path)
    assert sorted({p.identity for p in probes}) == ["A", "C"] and len(probes) == 5
    assert [d.identity for d in dist] == ["B"]
    assert mf.gallery_sizes(12_345) == [10, 100, 1000, 10_000]


# ---- end to end on generated datasets ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faces():
    return hog_detectable_faces(8, 3, seed=11)


@pytest.fixture(scope="module")
def lfw_like(faces, tmp_path_factory) -> Path:
    """4 identities with 3 photos (probes) and 4 with one (real distractors)."""
    root = tmp_path_factory.mktemp("lfwlike")
    for i, (name, fs) in enumerate(faces.items()):
        for k, f in enumerate(fs if i < 4 else fs[:1], 1):
            write_jpeg(root / name / f"{name}_{k:04d}.jpg", f.image)
    return root


class _FlatTrunk:
    """The head of a trunk reduced to flattening: features are the embeddings (brute force is then plain numpy)."""

    def check_point(self, point):
        return point

    def head(self, f, point):
        return f.flatten(1)


def test_score_group_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), rng.integers(2, 6, 8))
    centres = rng.standard_normal((8, 16))
    probes = centres[labels] + 0.9 * rng.standard_normal((len(labels), 16))
    gallery = rng.standard_normal((3000, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)

    class _Chips:
        label = labels

    side = ProbeSide(_Chips(), probes[:, :, None, None].astype(np.float32),
                     [np.flatnonzero(labels == c) for c in range(8)])
    e = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    sizes = [10, 100, 1000, 3000]
    t = Tally(sizes, ranks=4)
    idx = np.arange(len(labels))
    flat = Embedder(_FlatTrunk(), "x", None, None, "oracle", torch.device("cpu"), masked_trunk=_FlatTrunk())
    score_group(t, side, idx, e.astype(np.float32), ArrayGallery(gallery), flat, None, chunk_rows=700)
    s_d = e @ gallery.T
    hits = np.zeros((len(sizes), 4), np.int64)
    trials = 0
    for a in idx:
        for b in np.flatnonzero(labels == labels[a]):
            if b == a:
                continue
            trials += 1
            g = e[a] @ e[b]
            for k, n in enumerate(sizes):
                above = int((s_d[a, :n] > g).sum())
                hits[k] += np.arange(4) >= above
    assert t.trials == trials
    np.testing.assert_array_equal(t.hits, hits)
    assert t.hist.sum(1).tolist() == [len(labels) * n for n in sizes]


def test_megaface_lfw_end_to_end(lfw_like, tiny_weights, fdm_dict, tmp_path):
    cfg = IdentificationConfig(dataset="megaface-lfw", data_dir=lfw_like, trunk="tiny", weights=tiny_weights,
                               dict_path=fdm_dict, occlusions=["none", "sunglasses"], synthetic_distractors=1500,
                               ranks=5, export_devkit=tmp_path / "devkit")
    res = run_identification(cfg)
    assert res["sizes"] == [10, 100, 1000] and res["real_distractors"] == 4 and res["probes"] == 12
    rows = {(r["method"], r["occlusion"]): r for r in res["results"]}
    assert set(rows) == {(m, o) for m in ("baseline", "pdsn") for o in ("none", "sunglasses")}
    for r in rows.values():
        assert r["trials"] == 4 * 3 * 2  # 4 identities × 3 probes × 2 other images
        rank1 = [r["rank1"][str(n)] for n in res["sizes"]]
        assert all(0 <= v <= 1 for v in rank1) and rank1 == sorted(rank1, reverse=True)
        assert r["cmc_at_largest"] == sorted(r["cmc_at_largest"]) and 0 <= r["tar_at_far_1e-6"] <= 1
    assert rows[("pdsn", "sunglasses")]["distinct_fdms"] >= 1
    # the devkit export: one .bin per image and template lists the official scorer can read
    ex = res["devkit_export"]
    assert ex["files"] == 4 + 2 * 12
    bins = sorted((tmp_path / "devkit" / "facescrub-none").rglob("*.bin"))
    assert len(bins) == 12 and mf.read_bin(bins[0]).shape == (128,)  # the tiny trunk embeds in 128-D
    ids, paths = mf.read_probe_list(tmp_path / "devkit" / "templatelists" / mf.PROBE_LIST)
    assert len(paths) == 12 and all((tmp_path / "devkit" / "facescrub-none" / (p + ex["suffix"])).is_file()
                                     for p in paths)


def test_uniform_synthetic_distractors_barely_compete(lfw_like, tiny_weights):
    base = dict(dataset="megaface-lfw", data_dir=lfw_like, trunk="tiny", weights=tiny_weights, ranks=1,
                synthetic_distractors=1500)
    g = run_identification(IdentificationConfig(**base))["results"][0]["rank1"]["1000"]
    u = run_identification(IdentificationConfig(**base, synthetic_model="uniform"))["results"][0]["rank1"]["1000"]
    assert u >= g


def _megaface_fixture(root: Path, faces) -> None:
    names = list(faces)
    probe_ids, probe_paths = [], []
    for name in names[:4]:
        for k, f in enumerate(faces[name], 1):
            rel = f"{name}/{name}_{k}.png"
            write_jpeg(root / "facescrub_images" / rel, f.image)
            probe_ids.append(name)
            probe_paths.append(rel)
    dist = []
    for i, name in enumerate(names[4:]):
        for k, f in enumerate(faces[name]):
            rel = f"{i:03d}/{i}@N0{k}/{k}.jpg"
            write_jpeg(root / "FlickrFinal2" / rel, f.image)
            dist.append(rel)
    mf.write_template_lists(root / "devkit" / "templatelists", probe_ids, probe_paths,
                            {10: dist[:10], 12: dist[:12]})


def test_megaface_layout_end_to_end(faces, tiny_weights, fdm_dict, tmp_path):
    _megaface_fixture(tmp_path, faces)
    res = run_identification(IdentificationConfig(dataset="megaface", data_dir=tmp_path, trunk="tiny",
                                                   weights=tiny_weights, dict_path=fdm_dict,
                                                   occlusions=["sunglasses"], ranks=3))
    assert res["sizes"] == [10, 12] and res["real_distractors"] == 12 and res["probes"] == 12
    assert {r["method"] for r in res["results"]} == {"baseline", "pdsn"}
    with pytest.raises(BadInputError, match="for megaface-lfw"):
        run_identification(IdentificationConfig(dataset="megaface", data_dir=tmp_path, trunk="tiny",
                                                 weights=tiny_weights, synthetic_distractors=10))


def test_cli_megaface_lfw_json_and_report(lfw_like, tiny_weights, fdm_dict, tmp_path):
    out, rep = tmp_path / "r.json", tmp_path / "report"
    r = CliRunner().invoke(app, ["benchmark", "--dataset", "megaface-lfw", "--data-dir", str(lfw_like), "--trunk",
                                 "tiny", "--weights", tiny_weights, "--dict", str(fdm_dict), "--occluder", "none",
                                 "--occluder", "square", "--synthetic-distractors", "200", "--json", str(out),
                                 "--report", str(rep), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["sizes"] == [10, 100] and len(res["results"]) == 4
    assert {p.name for p in rep.iterdir()} >= {"cmc.png", "dictionary.png", "probes.png", "index.md"}
    r = CliRunner().invoke(app, ["benchmark", "--dataset", "megaface-lfw", "--data-dir", str(lfw_like), "--trunk",
                                 "tiny", "--weights", tiny_weights, "--synthetic-model", "pareto"])
    assert r.exit_code == 2 and "--synthetic-model" in r.output


def test_megaface_with_a_tuned_trunk_keeps_the_baseline(faces, tiny_weights, fdm_dict, tmp_path):
    """A dictionary that tunes the trunk (finetune --faces): the distractor store holds both feature sets, the
    baseline rows are those of the untouched trunk, the PDSN rows those of the tuned one."""
    from pdsn_cli.data.chip_cache import DataSpec, export_chips
    from pdsn_cli.train.finetune_trunk import FinetuneTrunkConfig, finetune_trunk

    export_chips(DataSpec(None, 4, 3), "arc112x96", tmp_path / "faces.h5")
    tuned = tmp_path / "dict-ft.h5"
    finetune_trunk(FinetuneTrunkConfig(dict_path=fdm_dict, faces=[tmp_path / "faces.h5"], out=tuned,
                                       weights=tiny_weights, epochs=1, batch_size=8, lr=1e-3, holdout=0.3))
    _megaface_fixture(tmp_path / "mf", faces)
    runs = [run_identification(IdentificationConfig(
        dataset="megaface", data_dir=tmp_path / "mf", trunk="tiny", weights=tiny_weights, dict_path=d,
        occlusions=["sunglasses"], ranks=3, cache_dir=tmp_path / "cache")) for d in (fdm_dict, tuned)]
    rows = [{r["method"]: r["rank1"] for r in res["results"]} for res in runs]
    assert rows[0]["baseline"] == rows[1]["baseline"]
    assert runs[1]["finetuned_trunk"] and not runs[0]["finetuned_trunk"]
    stores = list((tmp_path / "cache" / "features").glob("distractors-*.h5"))
    assert len(stores) == 2  # the tuned trunk's features are cached apart
    import h5py

    assert sorted(sorted(h5py.File(s).keys()) for s in stores) == [["features"], ["features", "tuned"]]
