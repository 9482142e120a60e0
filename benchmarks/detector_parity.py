"""The PyTorch port of dlib's CNN face detector against dlib itself, on real photos.

    python benchmarks/detector_parity.py [--data-dir /work/shared/data/lfw] [--limit 300] [--offset 0]
                                         [--upsample 1] [--threads 1] [--seed 0] [--json out.json]
                                         [--records parity.jsonl]

Takes a deterministic sample of ``--limit`` images (every ``*.jpg``/``*.png`` under ``--data-dir``, sorted, then
shuffled with ``--seed``; ``--offset`` skips the first ones, so runs can cover disjoint samples) and runs ``dlib.cnn_face_detection_model_v1(image, upsample)`` and
``MMODFaceDetector(image, upsample)`` on each, one image at a time, in this one process (dlib-bin runs on one
core; the port on ``--threads`` torch threads). An image *matches* when every dlib box has a ported box with
IoU ≥ 0.95 and every ported box has such a dlib box; it is *identical* when both give the same integer boxes in
the same order. Reported: images, images whose number of detections
differs, share of images that match, images where either finds nothing (misses), the mean and max |confidence
difference| over matched boxes, and seconds per image for each (the first image, a warm-up, is not timed).
Prints one JSON object; ``--json`` also writes it, with the images that do not match.

``--records FILE`` makes a long run resumable (all 13,233 LFW photos take hours of dlib here): every image's
boxes and times are appended to FILE as one JSON line as soon as it is done, images already in FILE are not run
again, and the figures are computed over every record in FILE that belongs to the sample (so a run stopped and
started again reports the same as one uninterrupted run; its timings over whatever machine load each part saw).
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

from pdsn_cli.align.model_files import models_dir  # noqa: E402
from pdsn_cli.align.mmod_detector import MODEL_FILE, MMODFaceDetector  # noqa: E402

IOU = 0.95


def sample(data_dir: Path, limit: int, seed: int, offset: int = 0) -> list[Path]:
    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images under {data_dir}")
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order[offset:offset + limit]]


def iou(a, b) -> float:
    """Intersection over union of two inclusive (left, top, right, bottom) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def best_matches(src, dst) -> list[tuple[float, float]]:
    """For each box of ``src``: (best IoU with a box of ``dst``, |confidence difference| with it)."""
    out = []
    for s in src:
        scored = [(iou(s, d), abs(s[4] - d[4])) for d in dst]
        out.append(max(scored) if scored else (0.0, float("nan")))
    return out


def read_records(path: Path, upsample: int) -> dict[str, dict]:
    """The images a previous run finished (a line cut short by a kill is dropped and run again)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("upsample") == upsample:
                done[rec["image"]] = rec
    return done


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/lfw"))
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--offset", type=int, default=0, help="skip this many images of the shuffled list")
    ap.add_argument("--upsample", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the port")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--records", type=Path, help="JSON lines of every image's result: a rerun skips those in it")
    args = ap.parse_args(argv)

    try:
        import dlib
    except ImportError:
        raise SystemExit("this benchmark compares with dlib: pip install dlib-bin") from None
    torch.set_num_threads(args.threads)
    path = os.path.join(models_dir(), MODEL_FILE)
    reference = dlib.cnn_face_detection_model_v1(path)
    port = MMODFaceDetector.from_file(path)

    files = sample(args.data_dir, args.limit, args.seed, args.offset)
    names = [str(f.relative_to(args.data_dir)) for f in files]
    done = read_records(args.records, args.upsample) if args.records else {}
    out = open(args.records, "a") if args.records else None
    try:
        for n, (f, name) in enumerate(zip(files, names)):
            if name in done:
                continue
            image = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
            t0 = time.perf_counter()
            ref = [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
                   for d in reference(image, args.upsample)]
            t1 = time.perf_counter()
            got = [tuple(int(v) for v in g[:4]) + (float(g[4]),) for g in port(image, args.upsample)]
            t2 = time.perf_counter()
            # the first call of each pays one-time set-up: not timed
            rec = {"image": name, "upsample": args.upsample, "dlib": ref, "port": got,
                   "t_dlib": t1 - t0 if n > 0 else None, "t_port": t2 - t1 if n > 0 else None}
            done[name] = rec
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
    finally:
        if out:
            out.close()

    t_dlib, t_port, conf_diffs, mismatches = [], [], [], []
    count_differs = matched = identical = dlib_misses = port_misses = 0
    for name in names:
        rec = done[name]
        ref, got = [tuple(r) for r in rec["dlib"]], [tuple(g) for g in rec["port"]]
        if rec["t_dlib"] is not None:
            t_dlib.append(rec["t_dlib"])
            t_port.append(rec["t_port"])
        fwd, back = best_matches(ref, got), best_matches(got, ref)
        count_differs += len(ref) != len(got)
        dlib_misses += not ref
        port_misses += not got
        ok = all(m >= IOU for m, _ in fwd + back)
        matched += ok
        identical += [r[:4] for r in ref] == [g[:4] for g in got]
        conf_diffs += [d for m, d in fwd if m >= IOU]
        if not ok or len(ref) != len(got):
            mismatches.append({"image": name, "dlib": ref, "port": got})

    images = len(files)
    result = {
        "images": images,
        "sample": {"seed": args.seed, "offset": args.offset},
        "upsample": args.upsample,
        "count_differs": count_differs,
        "matched_share": round(matched / images, 5),
        "identical_share": round(identical / images, 5),
        "dlib_misses": dlib_misses,
        "port_misses": port_misses,
        "miss_rate_diff": round((port_misses - dlib_misses) / images, 5),
        "boxes_dlib_matched": len(conf_diffs),
        "conf_abs_diff_mean": float(np.mean(conf_diffs)) if conf_diffs else None,
        "conf_abs_diff_max": float(np.max(conf_diffs)) if conf_diffs else None,
        "s_per_image_dlib": round(statistics.mean(t_dlib), 4) if t_dlib else None,
        "s_per_image_port": round(statistics.mean(t_port), 4) if t_port else None,
        "port_torch_threads": torch.get_num_threads(),
        "dlib": f"dlib {dlib.__version__} (one core, AVX={dlib.USE_AVX_INSTRUCTIONS}, BLAS={dlib.DLIB_USE_BLAS})",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "mismatched_images": len(mismatches),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**result, "mismatches": mismatches}, indent=1))
    return result


if __name__ == "__main__":
    main()
