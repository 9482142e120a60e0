"""How well the occlusion detector finds occluded blocks, and how fast it screens chips.

    python benchmarks/detector_eval.py [--template dlib150] [--epochs 12] [--threads 2] [--work DIR]
                                       [--lfw /work/shared/data/lfw --lfw-images 300]

1. make-pairs on the built-in synthetic faces: ``random`` occluders (``--per-image`` per image) plus
   one-block occluders on every grid block for ``--block-images`` of the images; ``pdsn train-detector``'s
   engine trains on both, holding out ``--val-fraction`` of the source images (its figures: ``val``).
2. A test set of *new synthetic identities* (another synthetic seed), random + block occluders: the
   detector never saw these faces (``test``).
3. With ``--lfw``: the same on real LFW faces (aligned with dlib, occluders composited), which measures the
   synthetic→real gap (``lfw``).
4. Inference speed: ``predict`` on ``--speed-chips`` chips at the template's size (resize + network),
   ``--threads`` torch threads, best of ``--repeats`` passes (the least disturbed by other processes).

A block counts as occluded when its occupancy is ≥ ``--threshold`` (truth and prediction alike). Prints one
JSON object.
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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdsn_cli import pairs_h5  # noqa: E402
from pdsn_cli.chips import DataSpec  # noqa: E402
from pdsn_cli.detector import OcclusionDetector, TrainDetectorConfig, block_metrics, train_detector  # noqa: E402
from pdsn_cli.make_pairs import MakePairsConfig, make_pairs  # noqa: E402

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


def make_sets(work: Path, data: DataSpec, args, tag: str, block_images: int, seed: int) -> list[Path]:
    paths = []
    rnd = work / f"{tag}_random.h5"
    make_pairs(MakePairsConfig(out=rnd, data=data, occluder="random", per_image=args.per_image,
                               template=args.template, seed=seed, limit=args.limit, workers=args.workers))
    paths.append(rnd)
    if block_images:
        blk = work / f"{tag}_block.h5"
        make_pairs(MakePairsConfig(out=blk, data=data, block="all", template=args.template, seed=seed + 1,
                                   limit=block_images, workers=args.workers))
        paths.append(blk)
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
    ap.add_argument("--identities", type=int, default=60)
    ap.add_argument("--images", type=int, default=10, help="synthetic images per identity")
    ap.add_argument("--per-image", type=int, default=2, help="random occluders per image")
    ap.add_argument("--block-images", type=int, default=120, help="images that get every one-block occluder")
    ap.add_argument("--limit", type=int, default=None, help="use only this many synthetic images")
    ap.add_argument("--test-identities", type=int, default=20)
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
    ap.add_argument("--lfw", type=Path, default=None, help="LFW folder for a real-face test set")
    ap.add_argument("--lfw-images", type=int, default=300)
    ap.add_argument("--work", type=Path, default=None, help="keep the pairs files and detector here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="detector_eval_")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_data = DataSpec(synthetic_identities=args.identities, synthetic_images=args.images, synthetic_seed=0)
    train_sets = make_sets(work, train_data, args, "train", args.block_images, args.seed)
    test_data = DataSpec(synthetic_identities=args.test_identities, synthetic_images=args.images, synthetic_seed=1)
    test_sets = make_sets(work, test_data, args, "test", min(args.block_images, args.test_identities * 2),
                          args.seed + 100)
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
        "data": {"train": {p.name: pairs_h5.num_pairs(p) for p in train_sets},
                 "test": {p.name: pairs_h5.num_pairs(p) for p in test_sets}},
        "train": rounded({k: res[k] for k in ("train_chips", "val_chips", "train_images", "val_images",
                                              "epochs", "parameters", "input_size", "train_seconds",
                                              "loss_history", "val_loss_history")}),
        "val": summary(res),
        "test_new_identities": summary(evaluate(det, test_sets, args.threshold)),
        "pairs_seconds": round(t_pairs, 1),
    }

    lfw = args.lfw
    if lfw is not None:
        t = time.perf_counter()
        lfw_sets = make_sets(work, DataSpec(root=lfw), argparse.Namespace(**{**vars(args), "limit": args.lfw_images}),
                             "lfw", min(args.block_images, args.lfw_images // 3), args.seed + 200)
        out["lfw"] = {**summary(evaluate(det, lfw_sets, args.threshold)),
                      "pairs": {p.name: pairs_h5.num_pairs(p) for p in lfw_sets},
                      "seconds": round(time.perf_counter() - t, 1)}

    pr = pairs_h5.read_pairs(test_sets[0], select=np.arange(min(256, pairs_h5.num_pairs(test_sets[0]))))
    out["speed"] = speed(det, pr.occluded, args.speed_chips, args.repeats)
    print(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
