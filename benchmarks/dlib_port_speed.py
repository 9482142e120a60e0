"""Throughput of the PyTorch port of dlib's face descriptor against dlib itself, on the same chips.

    python benchmarks/dlib_port_speed.py [--n 128] [--batch 64] [--threads 2] [--repeats 3]

Chips are real LFW faces aligned with dlib (detector + 5-point landmarks + get_face_chip, 150 px,
padding 0.25) when ../shared/data/lfw exists beside the repo, else generated face-like chips.
Both sides start from the same uint8 HWC arrays; the port's time includes the conversion to a
float tensor. Each mode runs ``--repeats`` times, interleaved, and the best pass is reported (the
least disturbed by other processes), with the median alongside. dlib's figure is the faster of its
per-chip and batched calls, so ``speedup`` is conservative. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdsn_cli.trunks.dlib_resnet import build, packaged_weights_path  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared/data/lfw"


def lfw_chips(n: int) -> list[np.ndarray]:
    import dlib

    detector = dlib.get_frontal_face_detector()
    models = os.path.dirname(packaged_weights_path())
    sp = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
    chips = []
    # one image per person, people in name order: many identities, deterministic
    for person in sorted(p for p in LFW.iterdir() if p.is_dir()):
        path = min(person.glob("*.jpg"), default=None)
        if path is None:
            continue
        img = dlib.load_rgb_image(str(path))
        faces = detector(img, 1)
        if len(faces) == 1:
            chips.append(np.asarray(dlib.get_face_chip(img, sp(img, faces[0]), size=150, padding=0.25)))
        if len(chips) == n:
            break
    return chips


def generated_chips(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth backgrounds with a face-like ellipse, eyes and mouth, plus texture."""
    rng = np.random.default_rng(seed)
    chips = []
    for _ in range(n):
        low = rng.uniform(0, 255, (5, 5, 3)).astype(np.float32)
        img = cv2.resize(low, (150, 150), interpolation=cv2.INTER_CUBIC)
        cx, cy = int(75 + rng.normal(0, 3)), int(75 + rng.normal(0, 4))
        cv2.ellipse(img, (cx, cy), (45, 60), 0, 0, 360, rng.uniform([150, 100, 80], [235, 185, 155]).tolist(), -1)
        for side in (-1, 1):
            cv2.circle(img, (cx + 21 * side, cy - 13), 5, rng.uniform(10, 70, 3).tolist(), -1)
        cv2.ellipse(img, (cx, cy + 30), (15, 5), 0, 0, 360, (150, 50, 60), -1)
        img = cv2.GaussianBlur(img + rng.normal(0, 8, img.shape).astype(np.float32), (0, 0), 1.0)
        chips.append(np.clip(img, 0, 255).astype(np.uint8))
    return chips


def port_pass(model, chips: list[np.ndarray], batch: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(chips), batch):
            x = torch.from_numpy(np.stack(chips[i : i + batch])).permute(0, 3, 1, 2).float()
            out.append(model(x).numpy())
    return np.concatenate(out)


def timed(fn, n: int) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn()
    return n / (time.perf_counter() - t), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="number of chips")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the port")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import dlib

    chips = lfw_chips(args.n) if LFW.is_dir() else []
    source = "lfw" if len(chips) == args.n else "generated"
    if source == "generated":
        chips = generated_chips(args.n)

    model = build()
    rec = dlib.face_recognition_model_v1(packaged_weights_path())
    load_before = os.getloadavg()[0]

    # warm-up: oneDNN builds its kernels on first use of each shape
    torch.set_num_threads(args.threads)
    port_pass(model, chips[: args.batch], args.batch)
    rec.compute_face_descriptor(chips[:2])

    rates: dict[str, list[float]] = {"port": [], "port_1thread": [], "dlib_batched": [], "dlib_per_chip": []}
    port_out = dlib_out = None
    for _ in range(args.repeats):
        torch.set_num_threads(args.threads)
        r, port_out = timed(lambda: port_pass(model, chips, args.batch), len(chips))
        rates["port"].append(r)
        torch.set_num_threads(1)
        r, _ = timed(lambda: port_pass(model, chips, args.batch), len(chips))
        rates["port_1thread"].append(r)
        r, dlib_out = timed(lambda: rec.compute_face_descriptor(chips), len(chips))
        rates["dlib_batched"].append(r)
        r, _ = timed(lambda: [rec.compute_face_descriptor(c) for c in chips], len(chips))
        rates["dlib_per_chip"].append(r)
    torch.set_num_threads(args.threads)

    ref = np.array([np.array(d) for d in dlib_out])
    best = {k: max(v) for k, v in rates.items()}
    dlib_best = max(best["dlib_batched"], best["dlib_per_chip"])
    report = {
        "port_img_per_s": round(best["port"], 2),
        "dlib_img_per_s": round(dlib_best, 2),
        "speedup": round(best["port"] / dlib_best, 2),
        "max_abs_diff": float(np.abs(port_out - ref).max()),
        "threads": args.threads,
        "n": len(chips),
        "batch": args.batch,
        "chips": source,
        "port_1thread_img_per_s": round(best["port_1thread"], 2),
        "dlib_batched_img_per_s": round(best["dlib_batched"], 2),
        "dlib_per_chip_img_per_s": round(best["dlib_per_chip"], 2),
        "median_img_per_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "dlib": dlib.__version__,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
