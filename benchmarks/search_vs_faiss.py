"""Exact top-k search: ``pdsn_cli.eval.search.topk`` on CPU against faiss ``IndexFlatIP``, same data, same threads,
printed as JSON.

    python benchmarks/search_vs_faiss.py [--gallery 1000000] [--probes 3500] [--dims 128 512] [--threads 2]
                                         [--repeats 1]

For each D it writes a seeded gallery of L2-normalised, face-like vectors (a mixture around 20,000 identity
centres) to an HDF5 file laid out as ``pdsn embed`` writes ``embedding`` (64-row chunks, uncompressed) and to
a .npy, plus probes (half are new views of a gallery row, half new views of an identity), then times, each in
its own subprocess:

- ``faiss``: IndexFlatIP as shipped (faiss-cpu picks its SIMD scan below ``distance_compute_blas_threshold``
  queries, which is 128,000 in 1.15, so 3,500 probes never reach BLAS),
- ``faiss_blas``: the same with the threshold set to 20 (faiss's older default): sgemm blocks + heaps,
- ``ours_memory``: ``topk`` over the gallery array in memory,
- ``ours_h5``: ``topk`` streaming from the HDF5 file (warm OS page cache: the file was just written).

Peak memory: each subprocess first loads what its method takes as input (probes, plus the gallery array for
faiss / ours_memory; ours_h5 loads only the probes), then resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` at that point: the extra memory the method needed,
not its inputs. For faiss that includes the index's own copy of the gallery made by ``add`` (reported
separately as ``peak_extra_mb_add``, then the mark is reset again for the search). Times are wall clock;
the machine may be shared, so ``--repeats`` interleaves the methods and the minimum is the headline.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("faiss", "faiss_blas", "ours_memory", "ours_h5")
IDENTITIES = 20_000


# --- data -------------------------------------------------------------------------------------------------


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(work: Path, n: int, n_probes: int, dim: int, seed: int) -> None:
    """Gallery row i is a view of identity i % IDENTITIES: centre + noise (same-identity cosine ~0.5,
    others ~0 ± 1/sqrt(D)); probes are noisier views of gallery rows or of identities."""
    import h5py

    from pdsn_cli.data.h5util import append_rows, make_growable, open_for_writing

    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((IDENTITIES, dim), dtype=np.float32))
    noise = 1.0 / np.sqrt(dim)  # per coordinate: the noise vector has norm ~1, like the centre
    npy = np.lib.format.open_memmap(work / "gallery.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    with open_for_writing(work / "gallery.h5") as f:
        ds = make_growable(f, "embedding", (dim,), np.float32, compress=False)
        step = 1 << 16
        for a in range(0, n, step):
            b = min(n, a + step)
            rows = centres[np.arange(a, b) % IDENTITIES] + noise * rng.standard_normal((b - a, dim), dtype=np.float32)
            rows = unit(rows).astype(np.float32)
            npy[a:b] = rows
            append_rows(ds, rows)
    npy.flush()
    half = n_probes // 2
    near = rng.choice(n, half, replace=False)
    probes = np.concatenate([
        np.asarray(npy[np.sort(near)]) + 0.7 * noise * rng.standard_normal((half, dim), dtype=np.float32),
        centres[rng.choice(IDENTITIES, n_probes - half)]
        + noise * rng.standard_normal((n_probes - half, dim), dtype=np.float32),
    ])
    np.save(work / "probes.npy", unit(probes).astype(np.float32))
    del npy
    with h5py.File(work / "gallery.h5", "r") as f:
        assert f["embedding"].shape == (n, dim)


# --- one method in a subprocess -------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(method: str, work: Path, k: int, threads: int) -> dict:
    probes = np.load(work / "probes.npy")
    gallery = None if method == "ours_h5" else np.load(work / "gallery.npy")
    if method.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(threads)
        if method == "faiss_blas":
            faiss.cvar.distance_compute_blas_threshold = 20
    else:
        import torch

        from pdsn_cli.eval.search import H5Gallery, topk

        torch.set_num_threads(threads)
    base = _status_kb("VmRSS")
    reset = _reset_peak()
    hwm0 = _status_kb("VmHWM")
    out = {"method": method, "peak_mark_reset": reset, "input_rss_mb": round(base / 1024, 1)}
    if method.startswith("faiss"):
        t = time.perf_counter()
        index = faiss.IndexFlatIP(probes.shape[1])
        index.add(gallery)
        out["add_s"] = round(time.perf_counter() - t, 3)
        hwm_add = _status_kb("VmHWM")
        after_add = _status_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        scores, index_ = index.search(probes, k)
        out["search_s"] = round(time.perf_counter() - t, 3)
        hwm_search = _status_kb("VmHWM")
        out["total_s"] = round(out["add_s"] + out["search_s"], 3)
        out["peak_extra_mb"] = round((max(hwm_add, hwm_search) - base) / 1024, 1)
        out["peak_extra_mb_add"] = round((hwm_add - base) / 1024, 1)  # the index's copy of the gallery
        out["peak_extra_mb_search"] = round((hwm_search - after_add) / 1024, 1)  # beyond the index
    else:
        t = time.perf_counter()
        if method == "ours_h5":
            with H5Gallery(work / "gallery.h5") as g:
                res = topk(probes, g, k)
        else:
            res = topk(probes, gallery, k)
        out["total_s"] = round(time.perf_counter() - t, 3)
        out["search_s"] = out["total_s"]
        scores, index_ = res.scores[0], res.index[0]
        out["peak_extra_mb"] = round((_status_kb("VmHWM") - base) / 1024, 1)
    if not reset:
        out["peak_extra_mb_note"] = "clear_refs refused: VmHWM includes loading the inputs"
        out["input_peak_mb"] = round(hwm0 / 1024, 1)
    np.save(work / f"{method}_index.npy", np.asarray(index_, dtype=np.int64))
    np.save(work / f"{method}_scores.npy", np.asarray(scores, dtype=np.float32))
    return out


def run_child(method: str, work: Path, k: int, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, __file__, "--child", method, "--work", str(work), "--k", str(k),
           "--threads", str(threads)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- comparison -----------------------------------------------------------------------------------------


def agreement(work: Path, ours: str, theirs: str) -> dict:
    """Top-1 and top-k agreement; where top-1 differs, the gap between the two rows' exact (float64)
    cosines: a float near-tie shows as a gap of ~1e-7."""
    a, b = np.load(work / f"{ours}_index.npy"), np.load(work / f"{theirs}_index.npy")
    differ = np.flatnonzero(a[:, 0] != b[:, 0])
    out = {"top1_agreement": float(1 - differ.size / len(a)), "top1_disagreements": int(differ.size),
           f"top{a.shape[1]}_index_agreement": float((a == b).mean())}
    if differ.size:
        probes = np.load(work / "probes.npy").astype(np.float64)
        g = np.load(work / "gallery.npy", mmap_mode="r")
        gaps = [abs(float(probes[i] @ g[a[i, 0]]) - float(probes[i] @ g[b[i, 0]])) for i in differ]
        out["top1_score_gap_max"] = max(gaps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--probes", type=int, default=3500)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, help="where to write the data (default: the system temp dir)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.work, a.k, a.threads)))
        return

    import faiss
    import torch

    results = {}
    for dim in a.dims:
        with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
            work = Path(tmp)
            t = time.perf_counter()
            make_data(work, a.gallery, a.probes, dim, a.seed)
            gen_s = time.perf_counter() - t
            runs = {m: [] for m in a.methods}
            for _ in range(a.repeats):
                for m in a.methods:  # interleaved, so that a burst of load on a shared machine hits all
                    runs[m].append(run_child(m, work, a.k, a.threads))
            best = {m: min(r, key=lambda x: x["total_s"]) for m, r in runs.items()}
            row = {"generate_s": round(gen_s, 1)}
            for m, r in runs.items():
                row[m] = {**best[m], "total_s_all": [x["total_s"] for x in r]}
                row[m].pop("method")
            faiss_methods = [m for m in ("faiss", "faiss_blas") if m in best]
            ours_methods = [m for m in ("ours_memory", "ours_h5") if m in best]
            if faiss_methods and ours_methods:
                fastest = min(faiss_methods, key=lambda m: best[m]["total_s"])
                row["fastest_faiss"] = fastest
                for m in ours_methods:
                    row[f"ratio_{m}_over_fastest_faiss_total"] = round(best[m]["total_s"] / best[fastest]["total_s"], 3)
                    row[f"ratio_{m}_over_fastest_faiss_search"] = round(
                        best[m]["total_s"] / best[fastest]["search_s"], 3)
                    for f in faiss_methods:
                        row[f"agreement_{m}_vs_{f}"] = agreement(work, m, f)
            if len(ours_methods) == 2:
                row["agreement_ours_h5_vs_ours_memory"] = agreement(work, "ours_h5", "ours_memory")
            results[f"D{dim}"] = row
    print(json.dumps({
        "gallery": a.gallery, "probes": a.probes, "k": a.k, "threads": a.threads, "repeats": a.repeats,
        "faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "loadavg_at_end": os.getloadavg(), **results}, indent=2))


if __name__ == "__main__":
    main()
