"""Does ``pdsn verify`` give ``pdsn benchmark``'s score for the same LFW pair? (issue: shipped model + verify)

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --pdsn --scores scores.csv
    python benchmarks/verify_vs_benchmark.py --scores scores.csv --data-dir ../shared/data/lfw --pairs 1000

Takes the first N pairs of the clean (``none``) PDSN rows, verifies them from the photos with the same model, and
reports how many scores agree (|Δ| ≤ 1e-4) and why the others do not: the benchmark's LFW alignment takes the
face within 20 % of the image centre and falls back to a centred crop when it finds none; verify takes the face
nearest the centre wherever it is and skips a photo without a face.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pdsn_cli.eval.scores import read_scores
from pdsn_cli.verify import VerifyConfig, verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scores", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cols = read_scores(a.scores)
    keep = np.flatnonzero((cols["occlusion"] == "none") & (cols["method"] == "pdsn"))[: a.pairs]
    pairs = [(a.data_dir / cols["image1"][i], a.data_dir / cols["image2"][i]) for i in keep]
    t0 = time.perf_counter()
    res = verify(VerifyConfig(pairs, model=a.model))
    secs = time.perf_counter() - t0
    got = {(r["image1"], r["image2"]): r["score"] for r in res["pairs"]}
    diffs = []
    for i, (p1, p2) in zip(keep, pairs):
        s = got.get((str(p1), str(p2)))
        if s is not None:
            diffs.append(abs(s - cols["score"][i]))
    diffs = np.array(diffs)
    out = {"pairs": len(pairs), "verified": len(res["pairs"]), "skipped": len(res["skipped"]),
           "agree_1e-4": int((diffs <= 1e-4).sum()), "max_abs_diff": float(diffs.max()) if len(diffs) else None,
           "median_abs_diff": float(np.median(diffs)) if len(diffs) else None,
           "decisions_agree": int(sum((got[(str(p1), str(p2))] > res["threshold"]) == (cols["score"][i] > res["threshold"])
                                      for i, (p1, p2) in zip(keep, pairs) if (str(p1), str(p2)) in got)),
           "seconds": round(secs, 1)}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
