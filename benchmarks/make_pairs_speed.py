"""make-pairs throughput (pairs/s), alignment included and excluded (cached chips), printed as JSON.

    python benchmarks/make_pairs_speed.py [--data-dir ../shared/data/lfw] [--images 400] [--workers 2]

Without --data-dir it uses the built-in synthetic faces (alignment = warping known landmarks).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from pdsn_cli.data.chip_cache import DataSpec
from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--occluder", default="random")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PDSN_CACHE"] = str(Path(tmp) / "cache")
        runs = {}
        for name in ("alignment_included", "alignment_cached"):
            cfg = MakePairsConfig(out=Path(tmp) / f"{name}.h5", data=DataSpec(a.data_dir), occluder=a.occluder,
                                  per_image=a.per_image, limit=a.images, workers=a.workers,
                                  cache_dir=Path(tmp) / "cache")
            t = time.perf_counter()
            r = make_pairs(cfg)
            total = time.perf_counter() - t
            runs[name] = {"pairs": r["pairs_written"], "seconds_total": round(total, 2),
                          "pairs_per_s_total": round(r["pairs_written"] / total, 1),
                          "align_seconds": r["align_seconds"], "pairs_per_s_synthesis": r["pairs_per_second"]}
    print(json.dumps({"data": str(a.data_dir or "synthetic"), "images": a.images, "per_image": a.per_image,
                      "occluder": a.occluder, "workers": a.workers, "cpus": os.cpu_count(),
                      "machine": platform.processor() or platform.machine(), **runs}, indent=2))


if __name__ == "__main__":
    main()
