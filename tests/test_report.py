"""``write_report``: the benchmark's PNG report folder (ROC, CMC, per-block heatmaps, dictionary, probes, index.md)."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest

from pdsn_cli.errors import BadInputError
from pdsn_cli.pdsn.fdm import FdmDict
from pdsn_cli.report.markdown import check_report_dir, write_report
from pdsn_cli.report.tables import block_grids
from pdsn_cli.eval.verification import roc_curve

pytest.importorskip("matplotlib")

PNGS = ["roc.png", "cmc.png", "blocks.png", "dictionary.png", "probes.png"]


def fake_result(blocks: range | list = range(25), clean: bool = True) -> dict:
    """A benchmark result with the rows run_benchmark writes: clean, sunglasses, and one row per block."""
    rng = np.random.default_rng(0)
    rows = []
    occlusions = [(o, None) for o in (["none"] if clean else []) + ["sunglasses"]]
    occlusions += [(f"block:{j}", j) for j in blocks]
    for occ, block in occlusions:
        base = 0.99 if occ == "none" else float(rng.uniform(0.95, 0.985))
        for method, acc in (("baseline", base), ("pdsn", base if occ == "none" else base + rng.normal(0, 0.004))):
            rows.append({"method": method, "occlusion": occ, "block": block, "accuracy": acc, "std": 0.01,
                         "tar_at_far_1e-3": acc - 0.1, "auc": 0.999})
            if method == "pdsn" and occ == "sunglasses":
                rows[-1]["recovery"] = 0.25
    return {"dataset": "lfw", "trunk": "tiny", "mask_point": "stage3", "pairs": 600, "results": rows}


def fake_roc() -> dict:
    rng = np.random.default_rng(1)
    same = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    curves = {}
    for label, sep in (("baseline / none", 3.0), ("pdsn / none", 3.0), ("baseline / sunglasses", 1.5),
                       ("pdsn / sunglasses", 1.8)):
        fpr, tpr, _ = roc_curve(np.r_[rng.normal(sep, 1, 200), rng.normal(0, 1, 200)], same)
        curves[label] = (fpr, tpr)
    return curves


def fake_cmc() -> dict:
    sizes = [10, 100, 1000, 10_000]
    ranks = np.arange(1, 21)
    return {f"{m} / sunglasses": {"sizes": sizes, "rank1": [0.9 + d, 0.8 + d, 0.7 + d, 0.6 + d],
                                  "ranks": ranks.tolist(), "cmc_at_largest": (1 - 0.4 / np.sqrt(ranks) + d).tolist()}
            for m, d in (("baseline", 0.0), ("pdsn", 0.03))}


def fake_dict(grid: int = 5) -> FdmDict:
    rng = np.random.default_rng(2)
    mean = rng.random((grid * grid, 4, 3, 2)).astype(np.float32)
    trained = np.ones(grid * grid, bool)
    trained[-1] = False
    return FdmDict(fdm=mean > 0.25, mean_mask=mean, trained=trained, trunk="tiny", mask_point="stage3",
                   template="arc112x96", grid=grid, tau=0.25)


def fake_probes() -> dict:
    rng = np.random.default_rng(3)
    return {"sunglasses": rng.integers(0, 256, (10, 48, 40, 3), np.uint8),
            "block:12": rng.integers(0, 256, (3, 48, 40, 3), np.uint8)}


def decoded(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} does not decode"
    return img


def test_full_report_writes_every_plot_and_an_index(tmp_path):
    out = tmp_path / "report" / "run1"  # created, parents too
    written = write_report(out, fake_result(), roc=fake_roc(), cmc=fake_cmc(), dictionary=fake_dict(),
                           probes=fake_probes(), title="unit test")
    assert [p.name for p in written] == PNGS + ["index.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted(PNGS + ["index.md"])  # no temp files left
    sizes = {p.name: decoded(p).shape for p in written[:-1]}
    for name, (h, w, c) in sizes.items():
        assert c == 3 and (name == "probes.png" or 300 <= h <= 2000 and 300 <= w <= 2500), (name, h, w)
    assert sizes["roc.png"][:2] == (600, 720)
    assert sizes["cmc.png"][1] > sizes["cmc.png"][0]  # two panels side by side
    assert sizes["blocks.png"][1] > 2 * sizes["blocks.png"][0]  # baseline, PDSN, difference
    # probes: 2 rows of at most 8 chips, small chips enlarged ×2 (pixel for pixel otherwise)
    h, w, _ = sizes.pop("probes.png")
    assert 2 * 96 <= h < 2 * 96 + 100 and 8 * 80 <= w < 8 * 80 + 250

    index = (out / "index.md").read_text()
    assert index.startswith("# unit test\n")
    for name in PNGS:
        assert f"[`{name}`]({name})" in index
    assert "| pdsn | sunglasses |" in index and "+0.25" in index
    assert "| baseline | block:24 |" in index
    assert "dataset: lfw" in index and "pairs: 600" in index


def test_missing_inputs_skip_their_plots(tmp_path):
    written = write_report(tmp_path / "a", fake_result(blocks=[]), roc={}, cmc=None, probes={})
    assert [p.name for p in written] == ["index.md"]
    assert "## Results" in written[0].read_text() and ".png" not in written[0].read_text()

    # one method only, a partial grid (5×5 with gaps), and a CMC without the rank panel
    result = fake_result(blocks=[0, 12, 24])
    result["results"] = [r for r in result["results"] if r["method"] == "baseline"]
    written = write_report(tmp_path / "b", result, cmc={"baseline": {"sizes": [10, 100], "rank1": [0.9, 0.8]}})
    assert [p.name for p in written] == ["cmc.png", "blocks.png", "index.md"]
    for p in written[:2]:
        h, w, _ = decoded(p).shape
        assert w < 1.5 * h  # one panel each
    index = written[2].read_text()
    assert "blocks.png" in index and "cmc.png" in index and "roc.png" not in index


def identification_result(blocks=range(25)) -> dict:
    """Rows as ``benchmark --dataset megaface*`` writes them: rank-1 per gallery size, CMC at the largest."""
    rows = fake_result(blocks)["results"]
    for r in rows:
        acc = r.pop("accuracy")
        for k in ("std", "tar_at_far_1e-3", "auc"):
            r.pop(k)
        r.update({"rank1": {"10": acc, "1000": acc - 0.2, "1000000": acc - 0.4},
                  "cmc_at_largest": [acc - 0.4, acc - 0.3], "tar_at_far_1e-6": 0.3})
    return {"dataset": "megaface-synthetic", "trunk": "tiny", "probes": 40, "synthetic_distractors": 1000,
            "results": rows}


def test_identification_results(tmp_path):
    result = identification_result(blocks=range(9))
    written = write_report(tmp_path / "mf", result, cmc=fake_cmc(), grid=3)
    assert [p.name for p in written] == ["cmc.png", "blocks.png", "index.md"]
    for p in written[:2]:
        decoded(p)
    index = written[2].read_text()
    assert "| method | occlusion | rank-1 @ 10 | rank-1 @ 1,000 | rank-1 @ 1M | TAR@FAR=1e-6 | recovery |" in index
    assert "SYNTHETIC distractors: 1000" in index and "accuracy" not in index.lower().split("## results")[1]
    _, grids = block_grids(result["results"])
    row = next(r for r in result["results"] if r["method"] == "pdsn" and r["occlusion"] == "block:4")
    assert grids["pdsn"][1, 1] == row["rank1"]["1000000"]  # the headline: rank-1 at the largest gallery

    # AR: one gallery size, rank-1 a number; the CMC figure keeps only the rank panel
    ar = {"dataset": "ar protocol 1", "results": [
        {"method": m, "occlusion": o, "rank1": v, "cmc": [v, 1.0], "probes": 12}
        for m, o, v in (("baseline", "sunglasses", 0.5), ("pdsn", "sunglasses", 0.6))]}
    cmc = {f"{r['method']} / {r['occlusion']}": {"sizes": [100], "rank1": [r["rank1"]], "ranks": [1, 2],
                                                  "cmc_at_largest": r["cmc"]} for r in ar["results"]}
    written = write_report(tmp_path / "ar", ar, cmc=cmc)
    assert [p.name for p in written] == ["cmc.png", "index.md"]
    h, w, _ = decoded(written[0]).shape
    assert w < 1.5 * h
    assert "| pdsn | sunglasses | 60.00% |" in written[1].read_text()


def test_block_grid_inference():
    rows = fake_result(blocks=range(16))["results"]
    k, grids = block_grids(rows)
    assert k == 4 and set(grids) == {"baseline", "pdsn"} and np.isfinite(grids["pdsn"]).all()
    j = next(r for r in rows if r["method"] == "pdsn" and r["occlusion"] == "block:6")
    assert grids["pdsn"][1, 2] == j["accuracy"]  # row-major, like the occluders' blocks

    k, grids = block_grids(fake_result(blocks=[12])["results"])  # a partial grid: the benchmark's default 5×5
    assert k == 5 and np.isfinite(grids["baseline"]).sum() == 1 and np.isfinite(grids["baseline"][2, 2])
    assert block_grids(fake_result(blocks=[3])["results"], grid=3)[0] == 3
    assert block_grids(fake_result(blocks=[])["results"]) == (0, {})
    with pytest.raises(BadInputError, match="do not fit a 3×3 grid"):
        block_grids(fake_result(blocks=[12])["results"], grid=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(probes={"sunglasses": np.zeros((2, 8, 8, 3), np.float32)}), "uint8 N×H×W×3"),
    (dict(probes={"sunglasses": np.zeros((0, 8, 8, 3), np.uint8)}), "non-empty"),
    (dict(cmc={"pdsn": {"sizes": [10, 100], "rank1": [0.9]}}), "equal length"),
    (dict(cmc={"pdsn": {"ranks": [1, 2]}}), "equal length"),
    (dict(cmc={"pdsn": {}}), "neither"),
    (dict(dictionary=fake_dict(3)), "do not fit a 3×3 grid"),
    (dict(roc={"pdsn / none": ([0, 0.5, 1], [0, 1])}), "equal length"),
])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises(BadInputError, match=match):
        write_report(tmp_path / "r", fake_result(), **({"roc": fake_roc()} | kwargs))
    assert not (tmp_path / "r").exists()


def test_bad_result_and_bad_folder(tmp_path):
    with pytest.raises(BadInputError, match="benchmark result"):
        write_report(tmp_path / "r", {"results": [{"method": "pdsn"}]})
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="is a file"):
        write_report(tmp_path / "file", fake_result())
    with pytest.raises(BadInputError, match="cannot be created"):
        check_report_dir(tmp_path / "file" / "sub")
    assert check_report_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_without_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BadInputError, match=r"--report needs matplotlib: pip install 'pdsn-cli\[plots\]'"):
        write_report(tmp_path / "r", fake_result(), roc=fake_roc())
    assert not (tmp_path / "r").exists()


def test_one_table_model_for_the_terminal_and_index_md():
    from pdsn_cli.report.markdown import markdown_table
    from pdsn_cli.report.tables import block_grid_table, results_table

    result = fake_result(blocks=range(4))
    result["results"].append({"method": "baseline", "occlusion": "block:mean", "block": None, "accuracy": 0.9,
                              "std": 0.0, "tar_at_far_1e-3": 0.8, "auc": 0.99})
    table = results_table(result)
    assert table.title == "lfw — tiny @ stage3, 600 pairs"
    assert [c.header for c in table.columns] == ["method", "occlusion", "accuracy", "TAR@FAR=1e-3", "AUC",
                                                 "recovery"]
    row = next(r for r in table.rows if r[:2] == ["pdsn", "sunglasses"])
    assert row[-1] == "+0.25" and row[2].endswith(" ± 1.00")
    md = markdown_table(table)
    assert md[0] == "| method | occlusion | accuracy | TAR@FAR=1e-3 | AUC | recovery |"
    assert md[1] == "|---|---|---:|---:|---:|---:|" and len(md) == 2 + len(result["results"])
    # the K×K grid reads the rows' block field (block:mean has none): 2×2, "J: baseline → PDSN"
    grid = block_grid_table(result)
    assert len(grid.rows) == 2 and len(grid.rows[0]) == 2 and not grid.show_header
    b3 = next(r for r in result["results"] if r["method"] == "baseline" and r["block"] == 3)
    assert grid.rows[1][1].startswith(f"3: {100 * b3['accuracy']:.1f} → ")
    assert block_grid_table(fake_result(blocks=[])) is None
