"""End-to-end face ingestion speed: JPEG files → aligned chips → dlib-resnet embeddings, images/s.

    python benchmarks/gpu_ingest.py --device cuda --n 100000 --json ingest.json      # the GPU machine
    python benchmarks/gpu_ingest.py --device cpu --n 200                              # a quick check anywhere
    python benchmarks/gpu_ingest.py --device cpu --data-dir ../shared/data/lfw --n 200 --modes device,cpu-path

Inputs: ``--n`` LFW-sized (250×250) JPEGs generated in a temporary folder from ``--distinct`` synthetic faces
(``synthetic_faces``, re-encoded at qualities 80–95 so that no two files are alike), or the first ``--n`` JPEGs
of an identity folder (``--data-dir``). Generation time is printed apart and not counted.

Modes (``--modes``), each timed as align (files in, chips on the device) and embed (dlib-resnet on the chips,
built as ``pdsn embed`` builds it: ``build_trunk`` + ``accel.FastForward``, bf16 autocast on CUDA, eager):

- ``device``: ``BatchAligner.align_files`` — bytes read on the host, JPEG decoded on the device (nvJPEG);
- ``host-decode``: the same with the JPEGs decoded on the host (cv2, ``--io-workers`` threads) and uploaded,
  through ``BatchAligner.align_tensors``;
- ``cpu-path``: what ``pdsn align`` does today, one photo at a time on the CPU (``read_image``,
  ``FaceAligner(face_detector="cnn")``, ``align_with_points``), then the chips uploaded and embedded.

``--check K``: the first K photos also go through the CPU path, and the ``device`` mode's chips are compared with
it (same detection decision, mean and max grey-level difference): on a GPU that covers nvJPEG's decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdsn_cli.accel import FastForward  # noqa: E402
from pdsn_cli.align.aligner import FaceAligner  # noqa: E402
from pdsn_cli.align.batch_align import DETECTED, FALLBACK, BatchAligner  # noqa: E402
from pdsn_cli.align.templates import align_with_points  # noqa: E402
from pdsn_cli.data.faces import BadImage, read_image  # noqa: E402
from pdsn_cli.trunks import build_trunk  # noqa: E402

MODES = ("device", "host-decode", "cpu-path")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(folder: Path, n: int, distinct: int, workers: int) -> list[Path]:
    """``n`` JPEGs under ``folder/<identity>/``: ``distinct`` rendered faces, each written at several qualities."""
    from pdsn_cli.data.synthetic import synthetic_faces

    per_id = 10
    faces = synthetic_faces(max(1, -(-distinct // per_id)), per_id, seed=0)
    with ThreadPoolExecutor(workers) as pool:  # rendering is numpy/cv2 work that releases the GIL in part
        renders = list(pool.map(lambda i: faces[i], range(min(distinct, len(faces)))))

    def write(k: int) -> Path:
        f = renders[k % len(renders)]
        quality = 80 + (k // len(renders)) % 16
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        path = folder / f.identity / f"{f.identity}_{k:06d}.jpg"
        path.write_bytes(buf.tobytes())
        return path

    for f in renders:
        (folder / f.identity).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(write, range(n)))


def existing(root: Path, n: int) -> list[Path]:
    """``n`` JPEGs spread evenly over the folder's sorted list (the first ones would be a few people only)."""
    paths = sorted(p for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if n >= len(paths):
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


class Embed:
    """dlib-resnet as ``pdsn embed`` runs it on chips already on the device."""

    def __init__(self, device: torch.device, batch: int):
        self.trunk = FastForward(build_trunk("dlib-resnet"), device, precision="bf16", compile="off",
                                 batch_size=batch)
        self.batch = batch

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        out = [self.trunk(chips[i:i + self.batch]) for i in range(0, len(chips), self.batch)]
        return torch.nn.functional.normalize(torch.cat(out), dim=1) if out else chips.new_zeros((0, 128)).float()


def cpu_path(paths, aligner: FaceAligner, template: str):
    """(chips N×H×W×3 uint8 numpy, status, arc5 in chip pixels) the one-photo CPU way; unreadable rows are zeros."""
    chips, status, marks = [], [], []
    for p in paths:
        try:
            image = read_image(p)
        except BadImage:
            chips.append(None)
            status.append("unreadable")
            marks.append(np.full((5, 2), np.nan, np.float32))
            continue
        arc5, dlib5, dlib68, detected, _ = aligner.find_points(image)
        chip, lm = align_with_points(image, arc5, dlib5, template)
        chips.append(chip)
        marks.append(lm)
        status.append(DETECTED if detected else FALLBACK)
    shape = next((c.shape for c in chips if c is not None), (150, 150, 3))
    return np.stack([c if c is not None else np.zeros(shape, np.uint8) for c in chips]), status, np.stack(marks)


def host_decode(paths, workers: int) -> list[np.ndarray | None]:
    def one(p):
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)
        return None if im is None else cv2.cvtColor(im, cv2.COLOR_BGR2RGB)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, paths))


def run_mode(mode: str, paths, args, device, embed: Embed, template: str) -> dict:
    t_align = t_embed = 0.0
    counts = {"detected": 0, "fallback": 0, "unreadable": 0}
    aligner = BatchAligner(device, template, batch_size=args.det_batch, io_workers=args.io_workers) \
        if mode != "cpu-path" else FaceAligner(face_detector="cnn")
    warm = paths[: min(len(paths), 8)]  # model loading, cuDNN autotuning and first-call costs, not counted
    for chunk_paths in [warm] + [paths[i:i + args.chunk] for i in range(0, len(paths), args.chunk)]:
        sync(device)
        t0 = time.perf_counter()
        if mode == "device":
            out = aligner.align_files(chunk_paths)
            chips, status = out.chips, out.status
        elif mode == "host-decode":
            out = aligner.align_tensors(host_decode(chunk_paths, args.io_workers))
            chips, status = out.chips, out.status
        else:
            arr, status, _ = cpu_path(chunk_paths, aligner, template)
            chips = torch.from_numpy(arr).to(device)
        ok = torch.tensor([s != "unreadable" for s in status], device=device)
        sync(device)
        t1 = time.perf_counter()
        emb = embed(chips[ok])
        sync(device)
        t2 = time.perf_counter()
        if chunk_paths is warm:
            continue
        assert torch.isfinite(emb).all()
        t_align += t1 - t0
        t_embed += t2 - t1
        for s in status:
            counts[s] += 1
    n = len(paths)
    return {"mode": mode, "images": n, "align_s": round(t_align, 3), "embed_s": round(t_embed, 3),
            "align_img_s": round(n / t_align, 1), "end_to_end_img_s": round(n / (t_align + t_embed), 1), **counts}


def check(paths, args, device, template: str) -> dict:
    """The ``device`` mode against the CPU path on the same photos."""
    out = BatchAligner(device, template, batch_size=args.det_batch, io_workers=args.io_workers).align_files(paths)
    want, status, marks = cpu_path(paths, FaceAligner(face_detector="cnn"), template)
    same = [a == b for a, b in zip(out.status, status)]
    both = [i for i, s in enumerate(status) if s != "unreadable" and same[i]]
    diff = np.abs(out.chips[both].cpu().numpy().astype(np.int16) - want[both]) if both else np.zeros(1)
    per_image = diff.reshape(len(both), -1).mean(1) if both else np.zeros(1)
    return {"images": len(paths), "same_decision": int(sum(same)),
            "differing": [str(paths[i]) for i, s in enumerate(same) if not s][:20],
            "detected_cpu": status.count(DETECTED), "detected_batch": out.status.count(DETECTED),
            "chip_mean_abs_diff": float(diff.mean()), "chip_max_abs_diff": int(diff.max()),
            "worst_image_mean_abs_diff": float(per_image.max()),
            "landmark_max_abs_diff_px": float(np.abs(out.landmarks[both] - marks[both]).max()) if both else 0.0,
            "pixels_equal": float((diff == 0).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="images (default 100,000)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", type=Path, help="an identity folder of JPEGs to use instead of generated ones")
    ap.add_argument("--distinct", type=int, default=2000, help="distinct synthetic faces rendered (default 2000)")
    ap.add_argument("--workdir", type=Path, help="where to write the generated JPEGs (default: a temp folder)")
    ap.add_argument("--modes", default="device,host-decode", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--template", default="dlib150")
    ap.add_argument("--chunk", type=int, default=1024, help="photos per align call")
    ap.add_argument("--det-batch", type=int, default=None, help="photos per detector pass (64 CUDA, 8 CPU)")
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--io-workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--check", type=int, default=100, help="photos compared with the CPU path (0: none)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch_threads": torch.get_num_threads(), "template": args.template, "args": {
                        k: str(v) for k, v in vars(args).items()}}

    tmp = None
    t0 = time.perf_counter()
    if args.data_dir:
        paths = existing(args.data_dir, args.n)
    else:
        tmp = args.workdir or Path(tempfile.mkdtemp(prefix="pdsn-ingest-"))
        tmp.mkdir(parents=True, exist_ok=True)
        paths = generate(tmp, args.n, args.distinct, args.io_workers)
    result["inputs"] = {"images": len(paths), "generated": tmp is not None,
                        "prepare_s": round(time.perf_counter() - t0, 2),
                        "mean_file_kb": round(float(np.mean([p.stat().st_size for p in paths[:1000]])) / 1024, 1)}
    print(f"{len(paths)} images ready in {result['inputs']['prepare_s']} s (not counted)", flush=True)
    try:
        embed = Embed(device, args.embed_batch)
        result["modes"] = []
        for mode in modes:
            r = run_mode(mode, paths, args, device, embed, args.template)
            result["modes"].append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
        if args.check:
            result["check"] = check(paths[:args.check], args, device, args.template)
            print(json.dumps(result["check"]), flush=True)
        if device.type == "cuda":
            result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    finally:
        if tmp is not None and args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'mode':<12} {'images':>8} {'align s':>9} {'embed s':>9} {'align img/s':>12} {'e2e img/s':>10}")
    for r in result["modes"]:
        print(f"{r['mode']:<12} {r['images']:>8} {r['align_s']:>9} {r['embed_s']:>9} {r['align_img_s']:>12} "
              f"{r['end_to_end_img_s']:>10}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
