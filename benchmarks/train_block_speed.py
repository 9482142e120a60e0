"""`train-block --block all` against 25 separate `--block J` runs, same pairs and epochs, printed as JSON, with the
overlap of the two dictionaries (per block IoU of the discarded sets at τ).

    python benchmarks/train_block_speed.py --pairs pdsn-work/pairs-blocks.h5 --epochs 3 [--trunk dlib-resnet]

Both sides start with an empty feature cache, so each includes its own trunk feature extraction.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pdsn_cli.pdsn.fdm import binarize
from pdsn_cli.train.blocks import TrainBlockConfig, load_blocks_file, train_blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--trunk", default="dlib-resnet")
    ap.add_argument("--weights")
    ap.add_argument("--mask-point")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tau", type=float, default=0.25)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["PDSN_CACHE"] = str(tmp / "cache-all")
        common = dict(pairs=a.pairs, trunk=a.trunk, weights=a.weights, mask_point=a.mask_point, epochs=a.epochs)
        t = time.perf_counter()
        res_all = train_blocks(TrainBlockConfig(out=tmp / "all.pt", block="all", **common))
        t_all = time.perf_counter() - t
        os.environ["PDSN_CACHE"] = str(tmp / "cache-each")
        t = time.perf_counter()
        for j in res_all["blocks"]:
            train_blocks(TrainBlockConfig(out=tmp / f"b{j:02d}.pt", block=str(j), **common))
        t_each = time.perf_counter() - t
        m_all = load_blocks_file(tmp / "all.pt")["mean_masks"].numpy()
        iou = []
        for k, j in enumerate(res_all["blocks"]):
            m_j = load_blocks_file(tmp / f"b{j:02d}.pt")["mean_masks"].numpy()[0]
            d1, d2 = ~binarize(m_all[k], a.tau), ~binarize(m_j, a.tau)
            iou.append(float((d1 & d2).sum() / max((d1 | d2).sum(), 1)))
    print(json.dumps({"pairs": res_all["pairs"], "trunk": a.trunk, "mask_point": res_all["mask_point"],
                      "epochs": a.epochs, "block_all_seconds": round(t_all, 1),
                      "separate_25_seconds": round(t_each, 1), "speedup": round(t_each / t_all, 2),
                      "dictionary_overlap_iou_mean": round(float(np.mean(iou)), 3),
                      "dictionary_overlap_iou_min": round(float(np.min(iou)), 3), "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
