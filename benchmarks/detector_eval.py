"""How well the occlusion detector finds occluded blocks, and how fast it screens chips.

    python benchmarks/detector_eval.py [--template dlib150] [--epochs 12] [--threads 2] [--work DIR]
                                       [--lfw /work/shared/data/lfw] [--train-on synthetic|lfw|mixed]

Data (all made by the make-pairs engine): ``random`` occluders (``--per-image`` per image) plus one-block
occluders on every grid block for ``--block-images`` of the images.

- ``synthetic`` train set: the built-in synthetic faces (``--identities`` × ``--images``);
  ``test_synthetic``: *new* synthetic identities (another synthetic seed).
- with ``--lfw``: LFW people are split by a hash of their name, 90% train / 10% test, so no person is on
  both sides; ``lfw`` train set: ``--lfw-train-images`` images of train people; ``test_lfw``:
  ``--lfw-test-images`` images of test people. (LFW is aligned through the chip cache, warm after one run.)

``--train-on`` picks the training set(s) (``mixed`` = both); ``train_detector`` also holds out
``--val-fraction`` of the training source images (``val``). Then every test set is scored, and ``predict``
is timed on ``--speed-chips`` chips of the template's size (resize + network, ``--threads`` torch threads,
best of ``--repeats`` passes: the least disturbed by other processes). A block counts as occluded when its
occupancy is ≥ ``--threshold`` (truth and prediction alike). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdsn_cli.data import pairs_h5  # noqa: E402
from pdsn_cli.data.chip_cache import DataSpec  # noqa: E402
from pdsn_cli.pdsn.detector import OcclusionDetector  # noqa: E402
from pdsn_cli.train.detector import TrainDetectorConfig, block_metrics, train_detector  # noqa: E402
from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs  # noqa: E402

def rounded(obj, nd=4):
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, dict):
        return {k: rounded(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, nd) for v in obj]
    return obj


def summary(m: dict) -> dict:
    """The figures worth reading: overall, per kind (P/R/F1 and chips), clean false alarms."""
    keep = ("precision", "recall", "f1", "clean_fpr", "clean_chip_fpr", "occupancy_mae", "occluded_chips",
            "clean_chips")
    return rounded({
        **{k: m[k] for k in keep if k in m},
        "per_kind": {k: {x: v[x] for x in ("chips", "precision", "recall", "f1")} for k, v in m["per_kind"].items()},
    })


def make_sets(work: Path, tag: str, data: DataSpec, args, images: int | None, block_images: int, seed: int,
              identities: Path | None = None) -> list[Path]:
    """A ``random`` set of ``images`` images (None: all) and a one-block set of ``block_images`` images."""
    common = dict(data=data, template=args.template, identities=identities, workers=args.workers)
    rnd = work / f"{tag}_random.h5"
    make_pairs(MakePairsConfig(out=rnd, occluder="random", per_image=args.per_image, limit=images, seed=seed,
                               **common))
    paths = [rnd]
    if block_images:
        blk = work / f"{tag}_block.h5"
        make_pairs(MakePairsConfig(out=blk, block="all", limit=block_images, seed=seed + 1, **common))
        paths.append(blk)
    return paths


def split_lfw_people(root: Path, work: Path) -> tuple[Path, Path]:
    """Identity-list files (train, test): 10% of the people by a stable hash of their name."""
    people = sorted(d.name for d in root.iterdir() if d.is_dir())
    test = [p for p in people if zlib.crc32(p.encode()) % 10 == 0]
    train = [p for p in people if zlib.crc32(p.encode()) % 10 != 0]
    paths = work / "lfw_train_people.txt", work / "lfw_test_people.txt"
    for path, names in zip(paths, (train, test)):
        path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return paths


def evaluate(det: OcclusionDetector, paths: list[Path], threshold: float) -> dict:
    """Every pair's occluded chip, and each source image's clean chip once."""
    preds, truth, clean, kinds = [], [], [], []
    seen: set[str] = set()
    for p in paths:
        pr = pairs_h5.read_pairs(p)
        first = np.array([i for i, s in enumerate(pr.source) if not (s in seen or seen.add(s))], np.int64)
        preds += [det.predict(pr.occluded, template=pr.attrs["template"]), det.predict(pr.clean[first])]
        truth += [pr.blocks, np.zeros((len(first), *pr.blocks.shape[1:]), np.float32)]
        clean += [np.zeros(len(pr), bool), np.ones(len(first), bool)]
        kinds += pr.kind + ["clean"] * len(first)
    return block_metrics(np.concatenate(preds), np.concatenate(truth), np.concatenate(clean), kinds, threshold)


def speed(det: OcclusionDetector, chips: np.ndarray, n: int, repeats: int) -> dict:
    x = np.resize(chips, (n, *chips.shape[1:]))  # tiles real chips up to n
    det.predict(x[:256])  # warm-up: allocator, oneDNN kernels
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        det.predict(x)
        walls.append(time.perf_counter() - t)
    return {"chips": n, "chip_size": list(chips.shape[1:3]), "chips_per_s_best": round(n / min(walls), 1),
            "chips_per_s_median": round(n / statistics.median(walls), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--template", default="dlib150")
    ap.add_argument("--train-on", choices=("synthetic", "lfw", "mixed"), default="synthetic")
    ap.add_argument("--identities", type=int, default=60, help="synthetic training identities")
    ap.add_argument("--images", type=int, default=10, help="synthetic images per identity")
    ap.add_argument("--test-identities", type=int, default=20, help="new synthetic identities for the test set")
    ap.add_argument("--per-image", type=int, default=2, help="random occluders per image")
    ap.add_argument("--block-images", type=int, default=120, help="images that get every one-block occluder")
    ap.add_argument("--lfw", type=Path, default=None, help="LFW folder: real-face train / test sets")
    ap.add_argument("--lfw-train-images", type=int, default=1000)
    ap.add_argument("--lfw-test-images", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--input-size", type=int, nargs=2, default=(80, 80))
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="make-pairs processes")
    ap.add_argument("--gpu", type=int, default=None, help="train (and time) on this CUDA device")
    ap.add_argument("--speed-chips", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="keep the pairs files and detector here")
    args = ap.parse_args(argv)
    if args.train_on != "synthetic" and args.lfw is None:
        ap.error(f"--train-on {args.train_on} needs --lfw")

    torch.set_num_threads(args.threads)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="detector_eval_")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_test_block = min(args.block_images, args.test_identities * 2)
    synth_train = DataSpec(synthetic_identities=args.identities, synthetic_images=args.images, synthetic_seed=0)
    synth_test = DataSpec(synthetic_identities=args.test_identities, synthetic_images=args.images, synthetic_seed=1)
    train_sets: list[Path] = []
    if args.train_on in ("synthetic", "mixed"):
        train_sets += make_sets(work, "synthetic_train", synth_train, args, None, args.block_images, args.seed)
    test_sets = {"test_synthetic": make_sets(work, "synthetic_test", synth_test, args, None, n_test_block,
                                             args.seed + 100)}
    if args.lfw is not None:
        train_people, test_people = split_lfw_people(args.lfw, work)
        lfw = DataSpec(root=args.lfw)
        if args.train_on in ("lfw", "mixed"):
            train_sets += make_sets(work, "lfw_train", lfw, args, args.lfw_train_images, args.block_images,
                                    args.seed + 200, train_people)
        test_sets["test_lfw"] = make_sets(work, "lfw_test", lfw, args, args.lfw_test_images,
                                          min(args.block_images, args.lfw_test_images // 3), args.seed + 300,
                                          test_people)
    t_pairs = time.perf_counter() - t0

    res = train_detector(TrainDetectorConfig(
        pairs=train_sets, out=work / "detector.pt", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, val_fraction=args.val_fraction, threshold=args.threshold,
        input_size=tuple(args.input_size), width=args.width, gpu=args.gpu,
    ))
    det = OcclusionDetector.load(work / "detector.pt", gpu=args.gpu)
    out = {
        "benchmark": "detector_eval",
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "device": res["device"], "load_avg_1m": round(os.getloadavg()[0], 2),
                    "gpu_name": torch.cuda.get_device_name(args.gpu) if args.gpu is not None else None},
        "template": args.template,
        "train_on": args.train_on,
        "data": {p.name: pairs_h5.num_pairs(p) for p in train_sets + sum(test_sets.values(), [])},
        "train": rounded({k: res[k] for k in ("train_chips", "val_chips", "train_images", "val_images",
                                              "epochs", "parameters", "input_size", "train_seconds",
                                              "loss_history", "val_loss_history")}),
        "val": summary(res),
        **{name: summary(evaluate(det, paths, args.threshold)) for name, paths in test_sets.items()},
        "pairs_seconds": round(t_pairs, 1),
    }
    first = test_sets["test_synthetic"][0]
    pr = pairs_h5.read_pairs(first, select=np.arange(min(256, pairs_h5.num_pairs(first))))
    out["speed"] = speed(det, pr.occluded, args.speed_chips, args.repeats)
    print(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
