"""Bad input files: truncated or foreign HDF5, dictionaries and checkpoints made for something else, pickles that
would run code, and protocol files naming paths outside the data root. Each is refused before any work with exit
code 2 and one ``error:`` line, and nothing is written (no output, no ``.partial``).

The engine-level refusals are tested next to each engine (test_make_pairs.py, test_embed.py, test_pdsn.py,
test_fdm.py, test_detector.py, test_trunks.py, test_lfw.py); here the files reach every command that reads them.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdsn_cli.cli.app import app


# ---- fixtures: broken and foreign files made from real outputs --------------------------------------------------
def cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def detector_file(path: Path, grid: int = 5, template: str = "arc112x96") -> Path:
    """An (untrained, but well-formed) occlusion detector checkpoint."""
    from pdsn_cli.pdsn.detector import DetectorNet, OcclusionDetector

    torch.manual_seed(0)
    OcclusionDetector(DetectorNet(grid, (80, 80), 4), template=template,
                      chip_size=(112, 96) if template == "arc112x96" else (150, 150)).save(path)
    return path


def with_attrs(src: Path, dst: Path, drop: tuple[str, ...] = (), **attrs) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for name in drop:
            del f[name]
        for k, v in attrs.items():
            f.attrs[k] = v
    return dst


def dict_of_grid(src: Path, dst: Path, grid: int) -> Path:
    """The dictionary ``src`` cut down to a grid×grid dictionary (as build-dict writes for another --grid)."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for name in ("fdm", "mean_mask", "trained"):
            data = f[name][: grid * grid]
            del f[name]
            f[name] = data
        f.attrs["grid"] = grid
    return dst


def dict_with_channels(src: Path, dst: Path, channels: int) -> Path:
    """A dictionary that claims the right trunk but has masks of another feature shape."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for name in ("fdm", "mean_mask"):
            data = f[name][:, :channels]
            del f[name]
            f[name] = data
    return dst


class MakesAFolder:
    """Unpickling this creates ``path``: the marker that code from a checkpoint ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def files(tmp_path_factory, block_pairs, tiny_weights, trained_blocks, fdm_dict):
    d = tmp_path_factory.mktemp("bad-files")
    marker = d / "code-ran"
    plain = d / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    evil = {"torch": d / "evil-torch.pt", "pickle": d / "evil-pickle.pt"}
    payload = {"kind": "pdsn-blocks", "format": "pdsn-occlusion-detector", "state_dict": {"w": torch.zeros(1)},
               "x": MakesAFolder(marker)}
    torch.save(payload, evil["torch"])
    with open(evil["pickle"], "wb") as fh:
        pickle.dump(payload, fh, protocol=2)
    torch.load(evil["torch"], weights_only=False)  # both really run code when loaded unsafely
    assert marker.is_dir()
    marker.rmdir()
    with open(evil["pickle"], "rb") as fh:
        pickle.load(fh)
    assert marker.is_dir()
    marker.rmdir()
    chips = d / "chips.h5"
    from pdsn_cli.data.chip_cache import DataSpec, export_chips

    export_chips(DataSpec(None, 1, 2), "arc112x96", chips)
    block_ckpt = torch.load(trained_blocks[0], weights_only=True)
    crafted = {}
    for name, change in {"masks-shape": dict(mean_masks=block_ckpt["mean_masks"][:, :64]),
                         "blocks-off-grid": dict(blocks=[j + 5 for j in block_ckpt["blocks"]]),
                         "grid-too-small": dict(grid=4),
                         "no-trunk": dict(trunk=None)}.items():
        st = {**block_ckpt, **change}
        if st["trunk"] is None:
            del st["trunk"]
        crafted[name] = d / f"blocks-{name}.pt"
        torch.save(st, crafted[name])
    return {
        "marker": marker, "plain": plain, "chips": chips, "evil": evil, "weights": tiny_weights,
        "pairs": block_pairs, "blocks": trained_blocks[0], "dict": fdm_dict, "crafted_blocks": crafted,
        "half_pairs": cut_in_half(block_pairs, d / "half-pairs.h5"),
        "half_dict": cut_in_half(fdm_dict, d / "half-dict.h5"),
        "half_blocks": cut_in_half(trained_blocks[0], d / "half-blocks.pt"),
        "half_weights": cut_in_half(Path(tiny_weights), d / "half-weights.pt"),
        "detector": detector_file(d / "detector.pt"),
        "detector_g4": detector_file(d / "detector-g4.pt", grid=4),
        "detector_dlib": detector_file(d / "detector-dlib150.pt", template="dlib150"),
        "half_detector": cut_in_half(detector_file(d / "det2.pt"), d / "half-detector.pt"),
        "pairs_schema99": with_attrs(block_pairs, d / "pairs-schema99.h5", pdsn_schema=99),
        "pairs_no_target": with_attrs(block_pairs, d / "pairs-no-target.h5", drop=("target", "blocks")),
        "dict_no_fdm": with_attrs(fdm_dict, d / "dict-no-fdm.h5", drop=("fdm",)),
        "dict_other_trunk": with_attrs(fdm_dict, d / "dict-dlib.h5", trunk="dlib-resnet", mask_point="level3"),
        "dict_g4": dict_of_grid(fdm_dict, d / "dict-g4.h5", 4),
        "dict_64ch": dict_with_channels(fdm_dict, d / "dict-64ch.h5", 64),
    }


@pytest.fixture
def out(tmp_path, monkeypatch) -> Path:
    """An empty folder for the outputs, which must stay empty."""
    o = tmp_path / "out"
    o.mkdir()
    monkeypatch.setenv("PDSN_WORK", str(o / "work"))
    return o


def refused(args: list, message: str, out: Path) -> None:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert list(out.iterdir()) == [], "a refused command wrote something"


TINY = ["--trunk", "tiny", "--weights", "{weights}"]
BENCH = ["benchmark", "--dataset", "synthetic", *TINY, "--quiet"]
EMBED = ["embed", "--input", "{pairs}", *TINY, "--out", "{out}/e.h5", "--quiet"]
ORACLE = ["--occlusion", "oracle"]

CASES = [
    # truncated HDF5 (a real file cut in half), to every reader
    ("truncated pairs → train-block", ["train-block", "--pairs", "{half_pairs}", *TINY, "--out", "{out}/b.pt"],
     "not a readable HDF5 file"),
    ("truncated pairs → train-detector", ["train-detector", "--pairs", "{half_pairs}", "--out", "{out}/d.pt"],
     "not a readable HDF5 file"),
    ("truncated pairs → train-trunk", ["train-trunk", "--data", "{half_pairs}", "--out", "{out}/run"],
     "not a readable HDF5 file"),
    ("truncated pairs → embed", ["embed", "--input", "{half_pairs}", *TINY, "--out", "{out}/e.h5"],
     "not a readable HDF5 file"),
    ("truncated pairs → make-pairs --append", ["make-pairs", "--append", "--occluder", "scarf", "--template",
                                               "arc112x96", "--out", "{half_pairs}"], "not a readable HDF5 file"),
    ("truncated dict → benchmark", [*BENCH, "--dict", "{half_dict}"], "not a readable HDF5 file"),
    ("truncated dict → embed", [*EMBED, "--dict", "{half_dict}", *ORACLE], "not a readable HDF5 file"),
    ("truncated blocks → build-dict", ["build-dict", "--blocks", "{half_blocks}", "--out", "{out}/d.h5"],
     "not a loadable train-block checkpoint"),
    ("truncated weights → embed", [*EMBED[:-5], "--weights", "{half_weights}", "--out", "{out}/e.h5"],
     "not a readable torch checkpoint"),
    ("truncated detector → embed", [*EMBED, "--dict", "{dict}", "--detector", "{half_detector}"],
     "not a readable torch checkpoint"),
    # foreign HDF5: no pdsn kind, another kind, another schema version, datasets missing
    ("plain HDF5 → train-block", ["train-block", "--pairs", "{plain}", *TINY, "--out", "{out}/b.pt"],
     "not a pdsn pairs file (pdsn_kind=None)"),
    ("dictionary → train-block", ["train-block", "--pairs", "{dict}", *TINY, "--out", "{out}/b.pt"],
     "not a pdsn pairs file (pdsn_kind='fdm-dict')"),
    ("chips → train-detector", ["train-detector", "--pairs", "{chips}", "--out", "{out}/d.pt"],
     "not a pdsn pairs file (pdsn_kind='chips')"),
    ("pairs → benchmark --dict", [*BENCH, "--dict", "{pairs}"], "not a pdsn fdm-dict file (pdsn_kind='pairs')"),
    ("dictionary → embed --input", ["embed", "--input", "{dict}", *TINY, "--out", "{out}/e.h5"],
     "not a pdsn chips or pairs file"),
    ("plain HDF5 → train-trunk", ["train-trunk", "--data", "{plain}", "--out", "{out}/run"],
     "neither a pdsn chips nor a pairs file"),
    ("pairs schema 99 → train-block", ["train-block", "--pairs", "{pairs_schema99}", *TINY, "--out", "{out}/b.pt"],
     "schema 99"),
    ("pairs schema 99 → embed", ["embed", "--input", "{pairs_schema99}", *TINY, "--out", "{out}/e.h5"],
     "schema 99"),
    ("pairs without datasets → train-block", ["train-block", "--pairs", "{pairs_no_target}", *TINY, "--out",
                                               "{out}/b.pt"], "lacks datasets blocks, target"),
    ("pairs without datasets → train-detector", ["train-detector", "--pairs", "{pairs_no_target}", "--out",
                                                  "{out}/d.pt"], "lacks datasets blocks, target"),
    ("dict without fdm → benchmark", [*BENCH, "--dict", "{dict_no_fdm}"], "lacks datasets fdm"),
    # a dictionary made for another trunk, grid or feature shape
    ("other trunk's dict → embed", [*EMBED, "--dict", "{dict_other_trunk}", *ORACLE], "built for trunk dlib-resnet"),
    ("4×4 dict, 5×5 pairs → embed", [*EMBED, "--dict", "{dict_g4}", *ORACLE], "4×4"),
    ("4×4 dict, 5×5 detector → embed", [*EMBED, "--dict", "{dict_g4}", "--detector", "{detector}"], "4×4"),
    ("4×4 detector, 5×5 dict → benchmark", [*BENCH, "--dict", "{dict}", "--occlusion", "detector", "--detector",
                                             "{detector_g4}"], "4×4"),
    ("dlib150 detector → benchmark", [*BENCH, "--dict", "{dict}", "--occlusion", "detector", "--detector",
                                      "{detector_dlib}"], "dlib150"),
    ("64-channel dict → embed", [*EMBED, "--dict", "{dict_64ch}", *ORACLE], "(64, 7, 6)"),
    ("64-channel dict → benchmark", [*BENCH, "--dict", "{dict_64ch}"], "(64, 7, 6)"),
    # train-block outputs that do not hold together
    *[(f"blocks {k} → build-dict", ["build-dict", "--blocks", f"{{blocks_{k}}}", "--out", "{out}/d.h5"], m)
      for k, m in {"masks-shape": "mean_masks", "blocks-off-grid": "block", "grid-too-small": "block",
                   "no-trunk": "trunk"}.items()],
    # paths outside the data root
    ("embed list with ../", ["embed", "--input", "{list_up}", *TINY, "--out", "{out}/e.h5"],
     "outside the data root"),
    ("embed list with an absolute path", ["embed", "--input", "{list_abs}", *TINY, "--out", "{out}/e.h5"],
     "is absolute"),
    ("embed list through a symlink out", ["embed", "--input", "{list_link}", *TINY, "--out", "{out}/e.h5"],
     "outside the data root"),
    ("pairs.txt with ../", [*BENCH[:2], "lfw", "--data-dir", "{lfw}", "--pairs-file", "{pairs_txt_up}",
                            *BENCH[3:]], "is not a valid identity name"),
    ("pairs.txt through a symlink out", [*BENCH[:2], "lfw", "--data-dir", "{lfw}", "--pairs-file",
                                         "{pairs_txt_link}", *BENCH[3:]], "resolves outside the data root"),
]


@pytest.fixture(scope="module")
def outside_root(tmp_path_factory, files) -> dict:
    """A data root with a list file and pairs.txt files that try to leave it (a photo waits outside)."""
    from conftest import write_jpeg

    base = tmp_path_factory.mktemp("escape")
    secret = write_jpeg(base / "secret" / "secret_0001.jpg", np.zeros((64, 64, 3), np.uint8))
    root = base / "lfw"
    (root / "someone").mkdir(parents=True)
    os.symlink(secret.parent, root / "elsewhere")
    (root / "up.txt").write_text("someone/x.jpg\n../secret/secret_0001.jpg\n")
    (root / "abs.txt").write_text(f"{secret}\n")
    (root / "link.txt").write_text("elsewhere/secret_0001.jpg\n")
    (root / "pairs-up.txt").write_text("1\t1\n..\t1\t2\nsomeone\t1\tsomeone\t2\n")
    (root / "pairs-link.txt").write_text("1\t1\nelsewhere\t1\t1\nelsewhere\t1\tsomeone\t1\n")
    return {"list_up": root / "up.txt", "list_abs": root / "abs.txt", "list_link": root / "link.txt",
            "lfw": root, "pairs_txt_up": root / "pairs-up.txt", "pairs_txt_link": root / "pairs-link.txt"}


@pytest.mark.parametrize("what, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_file_refused_before_any_work(what, args, message, files, outside_root, out):
    values = {**{k: v for k, v in files.items() if not isinstance(v, dict)}, **outside_root, "out": out,
              **{f"blocks_{k}": v for k, v in files["crafted_blocks"].items()}}
    filled = []
    for a in args:
        for k, v in values.items():
            a = a.replace("{" + k + "}", str(v))
        filled.append(a)
    refused(filled, message, out)


# ---- pickles that would run code, at every option that loads a checkpoint --------------------------------------
LOADERS = {
    "train-block --weights": ["train-block", "--pairs", "{pairs}", "--trunk", "tiny", "--weights", "{evil}",
                              "--out", "{out}/b.pt"],
    "embed --weights": ["embed", "--input", "{pairs}", "--trunk", "tiny", "--weights", "{evil}", "--out",
                        "{out}/e.h5"],
    "benchmark --weights": ["benchmark", "--dataset", "synthetic", "--trunk", "tiny", "--weights", "{evil}"],
    "train-trunk --init-weights": ["train-trunk", "--data", "{pairs}", "--init-weights", "{evil}", "--out",
                                   "{out}/run"],
    "build-dict --blocks": ["build-dict", "--blocks", "{evil}", "--out", "{out}/d.h5"],
    "embed --detector": ["embed", "--input", "{pairs}", *TINY, "--dict", "{dict}", "--detector", "{evil}",
                         "--out", "{out}/e.h5"],
    "benchmark --detector": [*BENCH, "--dict", "{dict}", "--occlusion", "detector", "--detector", "{evil}"],
    "train-block --resume": ["train-block", "--pairs", "{pairs}", *TINY, "--resume", "--out", "{out}/b.pt"],
    "train-trunk --resume": ["train-trunk", "--data", "{pairs}", "--resume", "--out", "{out}/run"],
}


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("where", LOADERS)
def test_code_running_pickle_is_refused_and_never_runs(where, writer, files, out, tmp_path):
    evil = files["evil"][writer]
    args = [a.replace("{evil}", str(evil)).replace("{out}", str(out)).replace("{pairs}", str(files["pairs"]))
            .replace("{weights}", str(files["weights"])).replace("{dict}", str(files["dict"]))
            for a in LOADERS[where]]
    resumed = None
    if where == "train-block --resume":  # the epoch checkpoint it resumes from
        resumed = out / "b.pt.ckpt"
    elif where == "train-trunk --resume":
        resumed = out / "run" / "checkpoint.pt"
    if resumed is not None:
        resumed.parent.mkdir(exist_ok=True)
        shutil.copyfile(evil, resumed)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not files["marker"].exists(), f"{where} ran code from a checkpoint"
    left = {p.relative_to(out) for p in out.rglob("*")}
    assert left == ({resumed.relative_to(out), *resumed.relative_to(out).parents} - {Path(".")}
                    if resumed is not None else set()), left


def test_refusing_a_pickle_does_not_advise_loading_it_unsafely(files, out):
    r = CliRunner().invoke(app, ["build-dict", "--blocks", str(files["evil"]["torch"]), "--out", str(out / "d.h5")])
    assert r.exit_code == 2
    assert "weights_only" not in r.stderr
