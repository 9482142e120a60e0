"""Parity and speed of the numpy port of dlib's shape predictors against dlib, on real faces.

    python benchmarks/landmark_parity.py [--data-dir ../shared/data/lfw] [--limit 1500] [--json out.json]

A deterministic sample of ``--limit`` images (every JPEG under ``--data-dir``, sorted, shuffled with
``--seed``) goes through dlib's HOG detector (upsampled once); on every face found, dlib's and the port's
5- and 68-point predictors run on the same rectangle. Errors compare the integer points (dlib's
``part(i)`` and the port's ``parts``): per face the mean and max Euclidean distance over its points.
The issue's bar: mean ≤ 0.5 px and max ≤ 2 px on ≥ 99 % of faces.

Throughput counts the predictors only (detection and image loading excluded), single process: dlib one
face per call; the port one image per call (its faces together), and ``predict_many`` over batches of
``--batch`` faces from different images. Each is timed over all faces, best of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdsn_cli.align.shape_predictor import shipped_predictor_file  # noqa: E402
from pdsn_cli.align.shape_predictor import ShapePredictor, load_shape_model  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def sample(data_dir: Path, limit: int, seed: int) -> list[Path]:
    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order[:limit]]


def load_rgb(path: Path) -> np.ndarray | None:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def compare(dlib, ref, port: ShapePredictor, items) -> dict:
    means, maxes, equal, points = [], [], 0, 0
    for img, rects in items:
        mine = port.parts(img, rects)
        for r, m in zip(rects, mine):
            d = ref(img, dlib.rectangle(*map(int, r)))
            theirs = np.array([[d.part(i).x, d.part(i).y] for i in range(d.num_parts)])
            dist = np.hypot(*(theirs - m).T)
            means.append(dist.mean())
            maxes.append(dist.max())
            equal += int((dist == 0).sum())
            points += dist.size
    means, maxes = np.array(means), np.array(maxes)
    ok = (means <= 0.5) & (maxes <= 2)
    return {
        "faces": int(means.size),
        "mean_px_error": float(means.mean()) if means.size else 0.0,
        "max_px_error": float(maxes.max()) if maxes.size else 0.0,
        "share_faces_within_bar": float(ok.mean()) if ok.size else 1.0,
        "share_faces_exact": float((maxes == 0).mean()) if maxes.size else 1.0,
        "share_points_exact": equal / points if points else 1.0,
        "faces_off": int((maxes > 0).sum()),
    }


def throughput(dlib, ref, port: ShapePredictor, items, batch: int, repeats: int) -> dict:
    faces = sum(len(r) for _, r in items)
    dl_rects = [(img, [dlib.rectangle(*map(int, r)) for r in rects]) for img, rects in items]
    flat = [(img, r) for img, rects in items for r in rects]

    def run_dlib():
        for img, rects in dl_rects:
            for r in rects:
                ref(img, r)

    def run_port():
        for img, rects in items:
            port(img, rects)

    def run_many():
        for i in range(0, len(flat), batch):
            chunk = flat[i : i + batch]
            port.predict_many([c[0] for c in chunk], np.array([c[1] for c in chunk]))

    out = {}
    for name, fn in (("dlib", run_dlib), ("port_per_image", run_port), (f"port_batch{batch}", run_many)):
        out[name + "_faces_per_s"] = round(faces / best_time(fn, repeats), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=LFW, help="folder of face photos (LFW layout or any)")
    ap.add_argument("--limit", type=int, default=1500, help="number of images")
    ap.add_argument("--seed", type=int, default=0, help="shuffle of the sorted file list")
    ap.add_argument("--batch", type=int, default=64, help="faces per predict_many call")
    ap.add_argument("--repeats", type=int, default=2, help="timing passes (best kept)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    try:
        import dlib
    except ImportError:
        sys.exit("this benchmark compares with dlib: pip install dlib-bin")
    if not args.data_dir.is_dir():
        sys.exit(f"no such folder: {args.data_dir}")

    paths = sample(args.data_dir, args.limit, args.seed)
    detector = dlib.get_frontal_face_detector()
    items, t_det = [], time.perf_counter()
    for p in paths:
        img = load_rgb(p)
        if img is None:
            continue
        rects = np.array([(r.left(), r.top(), r.right(), r.bottom()) for r in detector(img, 1)], np.int64)
        if len(rects):
            items.append((img, rects.reshape(-1, 4)))
    t_det = time.perf_counter() - t_det

    report = {"data_dir": str(args.data_dir), "images": len(paths), "images_with_faces": len(items),
              "detect_s": round(t_det, 1), "models": {}}
    for points in (5, 68):
        path = shipped_predictor_file(points)
        t = time.perf_counter()
        ref = dlib.shape_predictor(path)
        t_dlib = time.perf_counter() - t
        t = time.perf_counter()
        port = ShapePredictor(load_shape_model(path))
        t_port = time.perf_counter() - t
        row = compare(dlib, ref, port, items)
        row.update(throughput(dlib, ref, port, items, args.batch, args.repeats))
        row.update(load_s_dlib=round(t_dlib, 2), load_s_port=round(t_port, 2))
        report["models"][f"{points}pt"] = row

    for name, row in report["models"].items():
        print(f"{name}: {row['faces']} faces  mean err {row['mean_px_error']:.4f} px  max err "
              f"{row['max_px_error']:.2f} px  within bar {100 * row['share_faces_within_bar']:.2f}%  "
              f"exact faces {100 * row['share_faces_exact']:.2f}%  exact points {100 * row['share_points_exact']:.3f}%")
        speeds = "  ".join(f"{k[:-12]} {v:.0f}" for k, v in row.items() if k.endswith("_faces_per_s"))
        print(f"    faces/s: {speeds}   load s: dlib {row['load_s_dlib']}  port {row['load_s_port']}")
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
