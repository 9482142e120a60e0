"""The occlusion detector: learns block occupancy, keeps sources apart, saves/loads safely, is reproducible."""

import pickle
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from pdsn_cli.data import pairs_h5
from pdsn_cli.pdsn.detector import CHECKPOINT_FORMAT, DetectorNet, OcclusionDetector, resize_chips
from pdsn_cli.train.detector import TrainDetectorConfig, block_metrics, read_detector_data, train_detector

from conftest import write_schema1
from pdsn_cli.train.splits import split_by_source
from pdsn_cli.errors import BadInputError, SchemaError

SIZE = 40  # chip side: 8 px grid blocks
GRID = 5
TEMPLATE = "test40"


def _face(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random background with a skin-coloured ellipse and two dark eyes."""
    img = cv2.resize(rng.uniform(40, 220, (4, 4, 3)).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
    skin = tuple(int(v) for v in rng.uniform([150, 110, 80], [235, 190, 160]))
    c = size // 2
    cv2.ellipse(img, (c, c), (int(size * 0.32), int(size * 0.42)), 0, 0, 360, skin, -1)
    for dx in (-1, 1):
        cv2.circle(img, (c + dx * size // 6, int(size * 0.4)), max(1, size // 20), (30, 25, 20), -1)
    return img


def _occluder(rng: np.random.Generator, kind: str, size: int, grid: int) -> np.ndarray:
    """Pixel mask on whole blocks: ``rect`` 1–2 × 1–2 blocks, ``bar`` one full block row."""
    bs = size // grid
    mask = np.zeros((size, size), bool)
    if kind == "rect":
        hr, wc = rng.integers(1, 3, 2)
        r0, c0 = rng.integers(0, grid - hr + 1), rng.integers(0, grid - wc + 1)
        mask[r0 * bs : (r0 + hr) * bs, c0 * bs : (c0 + wc) * bs] = True
    else:
        r = rng.integers(0, grid)
        mask[r * bs : (r + 1) * bs, :] = True
    return mask


def write_easy_pairs(path: Path, n_images: int = 200, size: int = SIZE, grid: int = GRID, seed: int = 0,
                     template: str = TEMPLATE) -> Path:
    """Each image twice (a ``rect`` and a ``bar`` occluder) in saturated colours: an easy, exact set."""
    rng = np.random.default_rng(seed)
    clean, occ, masks, kinds, sources = [], [], [], [], []
    for i in range(n_images):
        face = _face(rng, size)
        for kind in ("rect", "bar"):
            m = _occluder(rng, kind, size, grid)
            colour = rng.permutation([rng.integers(0, 50), rng.integers(200, 256), rng.integers(0, 256)])
            patch = np.clip(colour + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
            clean.append(face)
            occ.append(np.where(m[..., None], patch, face))
            masks.append(m)
            kinds.append(kind)
            sources.append(f"easy://img{i:04d}")
    masks = np.stack(masks)
    bs = size // grid
    blocks = masks.reshape(-1, grid, bs, grid, bs).mean(axis=(2, 4))
    with h5py.File(path, "w") as f:
        pairs_h5.create(f, grid=grid, template=template, size=(size, size), occluder="random", seed=seed,
                        per_image=2, synthetic=True, data_root="test")
        pairs_h5.append(f, clean=np.stack(clean), occluded=np.stack(occ), mask=masks, blocks=blocks,
                        landmarks=np.zeros((len(clean), 5, 2)), identities=[s[-4:] for s in sources],
                        sources=sources, kinds=kinds, targets=np.full(len(clean), -1))
        f.attrs["complete"] = True
    return path


def small_cfg(pairs, out, **kw) -> TrainDetectorConfig:
    base = dict(epochs=8, batch_size=32, lr=5e-3, input_size=(SIZE, SIZE), width=8, val_fraction=0.2)
    base.update(kw)
    return TrainDetectorConfig(pairs=[Path(p) for p in pairs], out=Path(out), **base)


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> Path:
    return write_easy_pairs(tmp_path_factory.mktemp("easy") / "easy.h5")


@pytest.fixture(scope="module")
def trained(easy, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("det") / "det.pt"
    calls = []
    res = train_detector(small_cfg([easy], out), progress=lambda s, d, t: calls.append((d, t)) if s == "train" else None)
    return res, out, calls


# ----------------------------------------------------------------------------------------------- training


def test_training_learns_easy_blocks(trained):
    res, out, calls = trained
    assert out.is_file() and not Path(str(out) + ".partial").exists()
    hist = res["loss_history"]
    assert len(hist) == 8 and hist[-1] < 0.5 * hist[0]
    assert res["val_loss_history"][-1] < res["val_loss_history"][0]
    assert res["precision"] >= 0.85 and res["recall"] >= 0.85 and res["f1"] >= 0.85
    assert set(res["per_kind"]) == {"rect", "bar"}
    for k in ("rect", "bar"):
        assert res["per_kind"][k]["recall"] >= 0.8, res["per_kind"]
    assert res["clean_fpr"] <= 0.03
    # each image's clean chip is used once, however many pairs it is in
    assert res["train_chips"]["clean"] + res["val_chips"]["clean"] == 200
    assert res["train_chips"]["occluded"] + res["val_chips"]["occluded"] == 400
    assert res["val_images"] == 40 and res["train_images"] == 160
    assert calls[-1][0] == calls[-1][1] and len(calls) == calls[-1][1]


def test_split_keeps_each_source_on_one_side():
    sources = [f"s{i // 3}" for i in range(300)]  # 100 images, 3 rows each
    val = split_by_source(sources, 0.25, seed=3)
    held = {s for s, v in zip(sources, val) if v}
    kept = {s for s, v in zip(sources, val) if not v}
    assert not held & kept and len(held) == 25
    assert np.array_equal(val, split_by_source(sources, 0.25, seed=3))
    assert not np.array_equal(val, split_by_source(sources, 0.25, seed=4))
    assert not split_by_source(sources, 0.0, seed=3).any()
    assert split_by_source(["a", "b"], 0.01, seed=0).sum() == 1  # a split asked for holds ≥ 1 image


def test_same_seed_same_weights_other_seed_other_weights(easy, tmp_path):
    torch.set_num_threads(1)
    states = []
    for i, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"d{i}.pt"
        train_detector(small_cfg([easy], out, epochs=1, seed=seed))
        states.append(torch.load(out, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_without_validation_split_all_images_train(easy, tmp_path):
    torch.set_num_threads(1)
    res = train_detector(small_cfg([easy], tmp_path / "d.pt", epochs=1, val_fraction=0.0, batch_size=599))
    assert res["val_images"] == 0 and res["train_chips"] == {"occluded": 400, "clean": 200}
    assert res["f1"] is None and res["per_kind"] == {} and len(res["loss_history"]) == 1
    assert OcclusionDetector.load(tmp_path / "d.pt").predict(np.zeros((1, SIZE, SIZE, 3), np.uint8)).shape == (1, 5, 5)


def test_block_metrics_counts():
    truth = np.zeros((3, 2, 2), np.float32)
    pred = np.zeros((3, 2, 2), np.float32)
    truth[0, 0, 0] = 1.0  # TP
    pred[0, 0, 0] = 0.9
    truth[0, 1, 1] = 0.6  # FN (predicted 0.4)
    pred[0, 1, 1] = 0.4
    truth[1, 0, 1] = 0.4  # below threshold: not occluded; predicted 0.5 → FP
    pred[1, 0, 1] = 0.5
    pred[2, 1, 0] = 0.7  # clean chip: FP
    m = block_metrics(pred, truth, np.array([False, False, True]), ["a", "b", "clean"], 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert m["per_kind"]["a"]["recall"] == 0.5 and m["per_kind"]["b"]["recall"] is None
    assert m["per_kind"]["b"]["precision"] == 0.0
    assert m["clean_fpr"] == 0.25 and m["clean_chip_fpr"] == 1.0


def test_config_refused_before_work(easy, tmp_path):
    out = tmp_path / "d.pt"
    with pytest.raises(BadInputError, match="threshold"):
        train_detector(small_cfg([easy], out, threshold=1.0))
    with pytest.raises(BadInputError, match="val-fraction"):
        train_detector(small_cfg([easy], out, val_fraction=1.0))
    with pytest.raises(BadInputError, match="--degrade is a probability"):
        train_detector(small_cfg([easy], out, degrade=1.5))
    with pytest.raises(BadInputError, match="no such pairs file"):
        train_detector(small_cfg([tmp_path / "nope.h5"], out))
    with pytest.raises(BadInputError, match="too small"):
        train_detector(small_cfg([easy], out, input_size=(12, 12)))
    with pytest.raises(BadInputError, match="does not exist"):
        train_detector(small_cfg([easy], tmp_path / "no" / "d.pt"))
    other = write_easy_pairs(tmp_path / "g4.h5", n_images=4, grid=4)
    with pytest.raises(SchemaError, match="one layout"):
        train_detector(small_cfg([easy, other], out))
    # an interrupted make-pairs file is refused by the pairs reader
    with h5py.File(other, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(SchemaError, match="incomplete"):
        train_detector(small_cfg([other], out))
    assert not out.exists()


def test_read_data_resizes_and_dedups(easy):
    d = read_detector_data([easy], (24, 24))
    assert d.images.shape == (600, 24, 24, 3) and d.images.dtype == np.uint8
    assert d.clean.sum() == 200 and d.blocks[d.clean].max() == 0
    assert d.kind.count("clean") == 200 and (d.grid, d.template, d.chip_size) == (GRID, TEMPLATE, (SIZE, SIZE))


# ------------------------------------------------------------------------------------------- inference


def test_checkpoint_round_trip_identical(trained, easy, tmp_path):
    _, out, _ = trained
    det = OcclusionDetector.load(out)
    chips = pairs_h5.read_pairs(easy, select=np.arange(64)).occluded
    p1 = det.predict(chips)
    assert p1.shape == (64, GRID, GRID) and p1.dtype == np.float32
    again = tmp_path / "again.pt"
    det.save(again)
    p2 = OcclusionDetector.load(again).predict(chips)
    assert np.array_equal(p1, p2)
    # the BN-folded inference copy computes what the trained network computes
    with torch.inference_mode():
        x = torch.from_numpy(chips).permute(0, 3, 1, 2).float()
        ref = torch.sigmoid(det.net(x)).numpy()
    np.testing.assert_allclose(p1, ref, atol=1e-5)
    ck = torch.load(out, weights_only=True)
    assert ck["format"] == CHECKPOINT_FORMAT
    assert ck["config"]["template"] == TEMPLATE and ck["config"]["grid"] == GRID
    assert ck["metrics"]["f1"] >= 0.85


def test_predictions_match_the_truth(trained, easy):
    _, out, _ = trained
    det = OcclusionDetector.load(out)
    p = pairs_h5.read_pairs(easy, select=np.arange(0, 400, 5))
    flagged = det.occluded_blocks(p.occluded, template=TEMPLATE)
    assert flagged.dtype == bool and flagged.shape == (80, GRID, GRID)
    assert (flagged == (p.blocks >= 0.5)).mean() > 0.95
    assert det.occluded_blocks(p.clean).mean() < 0.03
    # a higher threshold never flags more blocks
    assert det.occluded_blocks(p.occluded, threshold=0.9).sum() <= flagged.sum()
    # chips of the same layout at another resolution are resized, not refused
    big = np.stack([cv2.resize(c, (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_LINEAR) for c in p.occluded])
    assert (det.occluded_blocks(big) == flagged).mean() > 0.95


def test_predict_refuses_other_layouts(trained):
    _, out, _ = trained
    det = OcclusionDetector.load(out)
    chips = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(SchemaError, match="test40"):
        det.predict(chips, template="arc112x96")
    with pytest.raises(SchemaError, match="aspect"):
        det.predict(np.zeros((2, 112, 96, 3), np.uint8))
    with pytest.raises(BadInputError, match="uint8"):
        det.predict(chips.astype(np.float32))
    with pytest.raises(BadInputError, match="N×H×W×3"):
        det.predict(chips[0])
    with pytest.raises(BadInputError, match="threshold"):
        det.occluded_blocks(chips, threshold=0)
    assert det.predict(chips[:0]).shape == (0, GRID, GRID)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_checkpoints_refused(trained, tmp_path):
    _, out, _ = trained
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SchemaError):
        OcclusionDetector.load(junk)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": CHECKPOINT_FORMAT, "x": _Evil()}, f, protocol=2)
    with pytest.raises(SchemaError, match="refused"):
        OcclusionDetector.load(evil)
    trunk_like = tmp_path / "trunk.pt"
    torch.save({"state_dict": DetectorNet(GRID, (SIZE, SIZE), 8).state_dict()}, trunk_like)
    with pytest.raises(SchemaError, match="not an occlusion detector"):
        OcclusionDetector.load(trunk_like)
    ck = torch.load(out, weights_only=True)
    ck["state_dict"].pop("head.bias")
    damaged = tmp_path / "damaged.pt"
    torch.save(ck, damaged)
    with pytest.raises(SchemaError, match="damaged"):
        OcclusionDetector.load(damaged)
    ck = torch.load(out, weights_only=True)
    ck["version"] = 99
    torch.save(ck, damaged)
    with pytest.raises(SchemaError, match="version"):
        OcclusionDetector.load(damaged)
    with pytest.raises(BadInputError, match="no such"):
        OcclusionDetector.load(tmp_path / "missing.pt")


def test_resize_chips_is_antialiased_and_exact_when_same_size():
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (3, 30, 30, 3), dtype=np.uint8)
    assert resize_chips(chips, (30, 30)) is not None and np.array_equal(resize_chips(chips, (30, 30)), chips)
    # a fine checkerboard shrinks to its mean grey, not to aliased stripes
    board = (np.indices((60, 60)).sum(0) % 2 * 255).astype(np.uint8)
    small = resize_chips(np.repeat(board[None, ..., None], 3, -1), (21, 21))
    assert small.shape == (1, 21, 21, 3) and abs(small[0, 3:-3, 3:-3].astype(float) - 127.5).max() < 40


# --------------------------------------------------------------------------------- real make-pairs data


def test_trains_on_make_pairs_output(tmp_path):
    """End to end on the lead's make-pairs output (synthetic faces, random occluders)."""
    from pdsn_cli.data.chip_cache import DataSpec
    from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs

    torch.set_num_threads(1)
    pairs = tmp_path / "pairs.h5"
    made = make_pairs(MakePairsConfig(out=pairs, occluder="random", per_image=2, template="arc112x96",
                                      data=DataSpec(synthetic_identities=6, synthetic_images=5)))
    out = tmp_path / "det.pt"
    res = train_detector(TrainDetectorConfig(pairs=[pairs], out=out, epochs=2, batch_size=32, width=8,
                                             input_size=(40, 40), val_fraction=0.2))
    assert set(res["per_kind"]) <= set(made["kinds"]) and res["val_images"] == 6
    assert res["template"] == "arc112x96" and res["chip_size"] == [112, 96]
    det = OcclusionDetector.load(out)
    p = pairs_h5.read_pairs(pairs, select=np.arange(8))
    assert det.predict(p.occluded, template="arc112x96").shape == (8, 5, 5)
    # the chips it reads are regenerated from the file's draw keys: those an older version (schema 1) stored
    old = tmp_path / "old.h5"
    write_schema1(pairs, old)
    a, b = read_detector_data([pairs], (40, 40)), read_detector_data([old], (40, 40))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.blocks, b.blocks)
    assert a.kind == b.kind and a.source == b.source and np.array_equal(a.clean, b.clean)


def test_interrupted_and_resumed_run_is_bitwise_identical(easy, tmp_path):
    import os
    import signal

    torch.set_num_threads(1)
    straight = train_detector(small_cfg([easy], tmp_path / "a.pt", epochs=2))

    def ctrl_c_mid_epoch_2(stage, step, total):
        if stage == "train" and step == total // 2 + 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled at the next step boundary

    out = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        train_detector(small_cfg([easy], out, epochs=2), progress=ctrl_c_mid_epoch_2)
    ckpt = Path(f"{out}.ckpt")
    # 480 training chips, batches of 32: 15 steps an epoch; Ctrl-C after step 18 checkpoints at 18
    assert not out.exists() and torch.load(ckpt, weights_only=True)["step"] == 18
    with pytest.raises(BadInputError, match="different settings: lr"):
        train_detector(small_cfg([easy], out, epochs=2, lr=1e-3, resume=True))
    resumed = train_detector(small_cfg([easy], out, epochs=2, resume=True))
    for k in ("loss_history", "val_loss_history", "precision", "recall", "f1", "per_kind"):
        assert resumed[k] == straight[k], k
    a, b = torch.load(out, weights_only=True), torch.load(tmp_path / "a.pt", weights_only=True)
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    assert not ckpt.exists()


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun: each process takes every 2nd chip of the global batch; rank 0 alone writes and prints."""
    import json
    import os
    import subprocess
    import sys

    pairs = write_easy_pairs(tmp_path / "easy.h5", n_images=24)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out, js = tmp_path / "det.pt", tmp_path / "det.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pdsn_cli",
         "train-detector", "--pairs", str(pairs), "--epochs", "2", "--batch-size", "16", "--out", str(out),
         "--json", str(js), "-q"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train-detector") == 1
    res = json.loads(js.read_text())
    assert len(res["loss_history"]) == 2 and np.isfinite(res["loss_history"]).all()
    assert OcclusionDetector.load(out).predict(np.zeros((1, SIZE, SIZE, 3), np.uint8)).shape == (1, GRID, GRID)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.json", "det.pt", "easy.h5"]


def test_degrade_makes_grey_low_resolution_chips_and_keeps_the_targets():
    from pdsn_cli.train.detector import _augment

    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 40, 40) * 255
    y = torch.rand(8, 5, 5)
    xd, yd = _augment(x.clone(), y.clone(), g, degrade=1.0)
    assert torch.allclose(xd[:, 0], xd[:, 1]) and torch.allclose(xd[:, 1], xd[:, 2])  # grey
    assert xd.diff(dim=3).abs().mean() < 0.5 * x.diff(dim=3).abs().mean()  # smoothed: fewer fine details
    flipped = ~torch.isclose(yd, y).all(dim=(1, 2))
    assert torch.equal(yd[flipped], y[flipped].flip(2))  # only the flip touches the targets


def test_detector_trains_on_face_sets_without_pairs_files(tmp_path):
    """--faces: occluders drawn on the faces themselves (seeded: the same draws on a rerun), each face once clean;
    with pairs files too, both are learnt."""
    from pdsn_cli.data.chip_cache import DataSpec, export_chips
    from pdsn_cli.data.face_sets import read_face_sets
    from pdsn_cli.train.detector import draw_detector_data

    faces = tmp_path / "faces.h5"
    export_chips(DataSpec(None, 4, 3), "dlib150", faces)
    fs = read_face_sets([faces], None, None, 0)
    a = draw_detector_data(fs, 5, (80, 80), 2, seed=3)
    b = draw_detector_data(fs, 5, (80, 80), 2, seed=3)
    assert len(a.images) == 36 and int(a.clean.sum()) == 12 and np.array_equal(a.images, b.images)
    assert a.blocks[a.clean].sum() == 0 and (a.blocks[~a.clean].reshape(24, -1).max(1) > 0).all()
    assert a.source[0] == a.source[2] and a.source[0].startswith("faces/")
    res = train_detector(TrainDetectorConfig(pairs=[], faces=[faces], per_face=2, out=tmp_path / "d.pt", epochs=1,
                                             batch_size=8))
    assert res["template"] == "dlib150" and res["train_chips"]["clean"] + res["val_chips"]["clean"] == 12
    with pytest.raises(BadInputError, match="--faces"):
        train_detector(TrainDetectorConfig(pairs=[], out=tmp_path / "e.pt"))
