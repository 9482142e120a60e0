"""Face alignment throughput on the CPU: dlib-bin's HOG + 5-point path against the ported aligner.

Each path finds the face and its landmarks in the same images, one process, one thread (images/s per core):

- ``dlib-bin hog+5``: ``dlib.get_frontal_face_detector()(img, 1)`` then ``dlib.shape_predictor`` (5 points):
  the cheapest dlib path (what the issue measures against);
- ``pdsn dlib-hog``: ``FaceAligner(face_detector="dlib-hog")``: dlib's HOG (then the ported CNN for misses), the
  ported 5- and 68-point predictors;
- ``pdsn cnn``: ``FaceAligner(face_detector="cnn")``: the ported CNN detector and predictors, no dlib.

    python benchmarks/align_speed.py --data-dir ../shared/data/lfw --limit 300 --json align_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pdsn_cli.align.aligner import FaceAligner
from pdsn_cli.align.model_files import models_dir
from pdsn_cli.data.faces import read_image


def _images(root: Path, limit: int, seed: int) -> list[np.ndarray]:
    files = sorted(root.glob("*/*.jpg"))
    pick = np.sort(np.random.default_rng(seed).choice(len(files), size=min(limit, len(files)), replace=False))
    return [read_image(files[i]) for i in pick]


def _time(fn, images) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process (robust to other jobs sharing the cores), faces found."""
    fn(images[0])  # load models, warm caches
    t, c = time.perf_counter(), time.process_time()
    found = sum(bool(fn(img)) for img in images)
    return time.perf_counter() - t, time.process_time() - c, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = _images(a.data_dir, a.limit, a.seed)
    paths = {}
    try:
        import dlib

        hog = dlib.get_frontal_face_detector()
        sp5 = dlib.shape_predictor(os.path.join(models_dir(), "shape_predictor_5_face_landmarks.dat"))

        def dlib_path(img):
            rects = hog(img, 1)
            return [sp5(img, r) for r in rects[:1]]
        paths["dlib-bin hog+5"] = dlib_path
        paths["pdsn dlib-hog"] = lambda img, al=FaceAligner(face_detector="dlib-hog"): al.find_points(img)[3]
    except ImportError:
        print("dlib is not installed: only the ported path is measured")
    paths["pdsn cnn"] = lambda img, al=FaceAligner(face_detector="cnn"): al.find_points(img)[3]
    rows = {}
    for name, fn in paths.items():
        secs, cpu, found = _time(fn, images)
        rows[name] = {"images": len(images), "faces_found": found, "seconds": round(secs, 2),
                      "cpu_seconds": round(cpu, 2), "images_per_s": round(len(images) / secs, 2),
                      "images_per_cpu_s": round(len(images) / cpu, 2)}
        print(f"{name:16s} {len(images)} images, {found} with a face, {secs:7.1f} s wall "
              f"({len(images) / secs:6.1f} images/s), {cpu:7.1f} s CPU ({len(images) / cpu:6.1f} images/CPU-s)")
    if "dlib-bin hog+5" in rows:
        base = rows["dlib-bin hog+5"]["images_per_cpu_s"]
        for r in rows.values():
            r["vs_dlib_hog5"] = round(r["images_per_cpu_s"] / base, 3)
    if a.json:
        a.json.write_text(json.dumps({"data_dir": str(a.data_dir), "threads": 1, "paths": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
