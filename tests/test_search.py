import h5py
import numpy as np
import pytest
import torch

from pdsn_cli.eval import search
from pdsn_cli.errors import BadInputError
from pdsn_cli.eval.search import (
    ArrayGallery,
    GeneratedGallery,
    H5Gallery,
    SearchResult,
    threshold_at_far,
    topk,
)

# --- brute-force reference: the whole score matrix in float64, a stable sort per row ----------------------


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_topk(probes, gallery, k, n):
    scores = unit(probes) @ unit(gallery[:n]).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # equal scores: lower index first
    top = np.take_along_axis(scores, order, axis=1)
    if n < k:
        pad = k - n
        order = np.concatenate([order, np.full((len(probes), pad), -1)], axis=1)
        top = np.concatenate([top, np.full((len(probes), pad), -np.inf)], axis=1)
    return top, order


def random_data(p=40, n=3000, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((p, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32))


def tied_data(p=40, n=3000, d=64, seed=1):
    """Rows of 16 entries ±1 (norm 4): every cosine is a multiple of 1/16 whatever the summation order, so
    there are many exact ties and the expected order among them is fully determined."""
    rng = np.random.default_rng(seed)
    out = []
    for m in (p, n):
        a = np.zeros((m, d), dtype=np.float32)
        for row in a:
            row[rng.choice(d, 16, replace=False)] = rng.choice([-1.0, 1.0], 16)
        out.append(a)
    return out


def check_exact(res, probes, gallery, k, sizes):
    assert res.scores.shape == res.index.shape == (len(sizes), len(probes), k)
    assert res.scores.dtype == np.float32 and res.index.dtype == np.int64
    for s, n in enumerate(sizes):
        top, order = brute_topk(probes, gallery, k, n)
        np.testing.assert_array_equal(res.index[s], order, err_msg=f"size {n}")
        np.testing.assert_allclose(res.scores[s], top, atol=1e-5)


# --- exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 37, 256, 1000, 1024, 2999, 5000])
def test_exact_against_brute_force_with_ties(chunk_rows):
    # ties decide the order here; chunk sizes cover the ragged path, the strided-group path (multiples of
    # 64), chunks that do not divide N and one chunk larger than N
    probes, gallery = tied_data()
    sizes = [3, 10, 700, 2048, 2999, 3000]
    res = topk(probes, gallery, 12, sizes=sizes, chunk_rows=chunk_rows)
    check_exact(res, probes, gallery, 12, sizes)


@pytest.mark.parametrize("chunk_rows", [64 * 4, 64 * 7, 1000])
def test_exact_against_brute_force_random(chunk_rows, monkeypatch):
    monkeypatch.setattr(search, "_GATHER", 50)  # candidates gathered in many small steps
    probes, gallery = random_data(seed=chunk_rows)
    res = topk(probes, gallery, 5, sizes=[1, 640, 3000], chunk_rows=chunk_rows)
    check_exact(res, probes, gallery, 5, [1, 640, 3000])


def test_k_larger_than_prefix_pads():
    probes, gallery = random_data(p=3, n=50)
    res = topk(probes, gallery, 8, sizes=[2, 50], chunk_rows=16)
    assert (res.index[0, :, 2:] == -1).all() and np.isneginf(res.scores[0, :, 2:]).all()
    assert (res.index[0, :, :2] >= 0).all()
    check_exact(res, probes, gallery, 8, [2, 50])


def test_all_equal_scores_keep_lowest_indices():
    gallery = np.ones((500, 4), dtype=np.float32)
    res = topk(np.ones((2, 4), dtype=np.float32), gallery, 5, chunk_rows=128)
    assert res.index[0].tolist() == [[0, 1, 2, 3, 4]] * 2


def test_default_size_and_near_duplicates_found():
    probes, gallery = random_data(p=20, n=2000)
    gallery[[5, 1500, 1999]] = probes[[0, 1, 2]] * 3.0  # scale does not matter to a cosine
    res = topk(probes, gallery, 1)
    assert isinstance(res, SearchResult) and res.sizes == [2000]
    assert res.index[0, :3, 0].tolist() == [5, 1500, 1999]
    np.testing.assert_allclose(res.scores[0, :3, 0], 1.0, atol=1e-6)


def test_torch_inputs_and_normalize_false():
    probes, gallery = random_data(p=5, n=300)
    gu, pu = unit(gallery).astype(np.float32), unit(probes).astype(np.float32)
    a = topk(torch.from_numpy(pu), torch.from_numpy(gu), 4, normalize=False)
    b = topk(pu, gu, 4)
    np.testing.assert_array_equal(a.index, b.index)
    # without normalising, scores are plain inner products
    raw = topk(probes, gallery, 1, normalize=False)
    ip = probes.astype(np.float64) @ gallery.T
    np.testing.assert_allclose(raw.scores[0, :, 0], ip.max(axis=1), rtol=1e-5)


# --- gallery sources ------------------------------------------------------------------------------------


def test_h5_streaming_equals_in_memory(tmp_path):
    probes, gallery = random_data(p=30, n=2500)
    path = tmp_path / "gallery.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("embedding", data=gallery, chunks=(64, gallery.shape[1]))
        f.create_dataset("half", data=gallery.astype(np.float16))
    want = topk(probes, gallery, 7, sizes=[100, 2500], chunk_rows=300)
    with H5Gallery(path) as g:
        assert len(g) == 2500 and g.dim == 24
        got = topk(probes, g, 7, sizes=[100, 2500], chunk_rows=300)
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_array_equal(got.scores, want.scores)
    with h5py.File(path, "r") as f:  # an open dataset, another dtype
        half = topk(probes, H5Gallery(f["half"]), 7, chunk_rows=512)
    check_exact(half, probes, gallery.astype(np.float16).astype(np.float32), 7, [2500])


def test_h5_gallery_refuses_bad_files(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        H5Gallery(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(BadInputError, match="not a readable HDF5"):
        H5Gallery(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["label"] = np.arange(3)
    with pytest.raises(BadInputError, match="no dataset 'embedding'"):
        H5Gallery(tmp_path / "other.h5")
    with pytest.raises(BadInputError, match="2-D floating point"):
        H5Gallery(tmp_path / "other.h5", dataset="label")


def test_generated_gallery_and_memmap(tmp_path):
    probes, gallery = random_data(p=10, n=1200)
    calls = []

    def make(start, stop):
        calls.append((start, stop))
        return gallery[start:stop]

    got = topk(probes, GeneratedGallery(1200, 24, make), 3, sizes=[500, 1200], chunk_rows=256)
    check_exact(got, probes, gallery, 3, [500, 1200])
    assert calls[0] == (0, 256) and (256, 500) in calls and (500, 756) in calls  # cut at the size 500
    np.save(tmp_path / "g.npy", gallery)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    for normalize in (True, False):
        a = topk(probes, ArrayGallery(mm), 3, chunk_rows=256, normalize=normalize)
        b = topk(probes, gallery, 3, chunk_rows=256, normalize=normalize)
        np.testing.assert_array_equal(a.index, b.index)


def test_memory_bounded_reads_and_progress():
    probes, gallery = random_data(p=8, n=5000)

    class Recording(ArrayGallery):
        largest = 0
        rows_read = 0

        def read(self, start, stop):
            Recording.largest = max(Recording.largest, stop - start)
            Recording.rows_read += stop - start
            return super().read(start, stop)

    seen = []
    topk(probes, Recording(gallery), 4, sizes=[1000, 4000], chunk_rows=640,
         progress=lambda done, total: seen.append((done, total)))
    assert Recording.largest <= 640
    assert Recording.rows_read == 4000  # each row once, nothing past the largest size
    assert seen[-1] == (4000, 4000) and all(t == 4000 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# --- histogram ------------------------------------------------------------------------------------------


def test_histogram_counts_every_score_per_size():
    probes, gallery = random_data(p=25, n=2000)
    sizes = [10, 999, 2000]
    res = topk(probes, gallery, 2, sizes=sizes, histogram_bins=200, chunk_rows=256)
    assert res.hist.shape == (3, 200) and res.hist.dtype == np.int64
    scores = unit(probes) @ unit(gallery).T
    for s, n in enumerate(sizes):
        assert res.hist[s].sum() == 25 * n
        want, _ = np.histogram(scores[:, :n], bins=200, range=(-1, 1))
        assert np.abs(res.hist[s] - want).sum() <= 2  # only float32-vs-float64 rounding at bin edges


def test_histogram_end_bins_take_out_of_range_scores():
    g = np.ones((4, 2), dtype=np.float32)
    res = topk(np.ones((1, 2), dtype=np.float32), g, 1, histogram_bins=10)  # cosine 1: closed last bin
    assert res.hist[0].tolist() == [0] * 9 + [4]
    res = topk(np.full((1, 2), 3, np.float32), g, 1, histogram_bins=10, normalize=False)  # raw products 6
    assert res.hist[0, -1] == 4


def test_threshold_at_far():
    rng = np.random.default_rng(3)
    scores = np.clip(rng.normal(0, 0.2, 1_000_000), -1, 1)
    hist, _ = np.histogram(scores, bins=2000, range=(-1, 1))
    for far in (1e-1, 1e-3, 1e-5):
        t = threshold_at_far(hist, far)
        exact = np.quantile(scores, 1 - far)
        assert exact - 1e-9 <= t <= exact + 2 / 2000 + 1e-9  # conservative, within one bin width
        assert (scores > t).mean() <= far
    assert threshold_at_far(hist, 1.0) == -1.0
    assert threshold_at_far(hist, 0.0) == pytest.approx(-1 + 2 * (np.flatnonzero(hist)[-1] + 1) / 2000)
    np.testing.assert_allclose(threshold_at_far(np.stack([hist, hist]), 1e-3), [threshold_at_far(hist, 1e-3)] * 2)
    with pytest.raises(BadInputError):
        threshold_at_far(np.zeros(10, np.int64), 1e-3)
    with pytest.raises(BadInputError):
        threshold_at_far(hist, 2.0)


# --- precision, devices ---------------------------------------------------------------------------------


def test_bf16_cpu_agrees_on_top1_for_separated_data():
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((3000, 64)).astype(np.float32)
    pick = rng.choice(3000, 50, replace=False)
    probes = gallery[pick] + 0.1 * rng.standard_normal((50, 64)).astype(np.float32)
    res = topk(probes, gallery, 3, dtype="bf16", chunk_rows=1024)
    assert (res.index[0, :, 0] == pick).all()
    assert np.abs(res.scores[0, :, 0] - (unit(probes) * unit(gallery[pick])).sum(1)).max() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_top1():
    probes, gallery = random_data(p=50, n=20000, d=128)
    pick = np.arange(50) * 300
    gallery[pick] = probes + 0.05 * gallery[pick]
    for dtype in ("float16", "bfloat16", "float32"):
        res = topk(probes, gallery, 5, device="cuda", dtype=dtype, chunk_rows=4096, histogram_bins=100)
        assert (res.index[0, :, 0] == pick).all()
        assert res.hist[0].sum() == 50 * 20000


def test_matches_faiss_index_flat_ip():
    faiss = pytest.importorskip("faiss")
    probes, gallery = random_data(p=60, n=4000, d=32)
    pu, gu = unit(probes).astype(np.float32), unit(gallery).astype(np.float32)
    index = faiss.IndexFlatIP(32)
    index.add(gu)
    want_s, want_i = index.search(pu, 10)
    res = topk(pu, gu, 10, normalize=False)
    np.testing.assert_allclose(res.scores[0], want_s, atol=1e-5)
    differ = res.index[0] != want_i
    # only float near-ties may be ordered differently
    assert np.abs(res.scores[0][differ] - want_s[differ]).max(initial=0) < 1e-5


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line():
    probes, gallery = random_data(p=4, n=100)
    bad_probes = probes.copy()
    bad_probes[2, 3] = np.nan
    bad_gallery = gallery.copy()
    bad_gallery[77, 0] = np.inf
    zero_gallery = gallery.copy()
    zero_gallery[5] = 0
    cases = [
        (lambda: topk(probes[:, :10], gallery, 3), "dimension 10, the gallery has 24"),
        (lambda: topk(probes[:0], gallery, 3), "no probes"),
        (lambda: topk(probes, gallery[:0], 3), "gallery is empty"),
        (lambda: topk(probes[0], gallery, 3), "2-D"),
        (lambda: topk(probes, gallery[0], 3), "2-D"),
        (lambda: topk(bad_probes, gallery, 3), "probe 2 has NaN"),
        (lambda: topk(probes, bad_gallery, 3, chunk_rows=32), "gallery row 77 has NaN or infinite"),
        (lambda: topk(probes, zero_gallery, 3), "gallery row 5 is all zeros"),
        (lambda: topk(probes, gallery, 0), "k must be a positive integer"),
        (lambda: topk(probes, gallery, 2.5), "k must be a positive integer"),
        (lambda: topk(probes, gallery, 3, sizes=[50, 10]), "strictly ascending"),
        (lambda: topk(probes, gallery, 3, sizes=[10, 10]), "strictly ascending"),
        (lambda: topk(probes, gallery, 3, sizes=[10, 101]), r"1\.\.100"),
        (lambda: topk(probes, gallery, 3, sizes=[0, 10]), r"1\.\.100"),
        (lambda: topk(probes, gallery, 3, sizes=[]), "sizes is empty"),
        (lambda: topk(probes, gallery, 3, chunk_rows=0), "chunk_rows"),
        (lambda: topk(probes, gallery, 3, histogram_bins=0), "histogram_bins"),
        (lambda: topk(probes, gallery, 3, dtype="int8"), "dtype"),
        (lambda: topk(probes, gallery, 3, dtype=torch.float16), "float16 search is for CUDA"),
        (lambda: topk(probes, gallery, 3, device="nonsense"), "not a torch device"),
        (lambda: topk(probes, object(), 3), "cannot search a gallery"),
        (lambda: topk(probes, GeneratedGallery(100, 24, lambda a, b: np.zeros((b - a, 23))), 3),
         "expected"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: topk(probes, gallery, 3, device="cuda"), "CUDA is not available"))
    for call, message in cases:
        with pytest.raises(BadInputError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
