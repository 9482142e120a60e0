"""Shared fixtures: an isolated cache and work folder, one torch thread, and small generated datasets.

Everything here is generated (synthetic faces, a randomly initialised ``tiny`` trunk), so the suite runs on a
fresh machine; tests that can also check against LFW look for it at ``<repo>/../shared/data/lfw``.
Session fixtures are shared between test files and must be treated as read-only (copy before changing).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

#: LFW as laid out on the development machine (absent on a fresh checkout: tests skip or fall back)
LFW_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def have_dlib() -> bool:
    try:
        import dlib  # noqa: F401
    except ImportError:
        return False
    return True


needs_dlib = pytest.mark.skipif(not have_dlib(), reason="dlib (dlib-bin) is not installed")


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def hog_detectable_faces(identities: int, images: int, seed: int = 0) -> dict[str, list]:
    """``images`` synthetic photos for each of ``identities`` identities, keeping only photos dlib's HOG
    detector finds (when dlib is installed): a miss sends alignment to the CNN detector, ~2.5 s per image."""
    from pdsn_cli.data.synthetic import synthetic_faces

    detect = None
    if have_dlib():
        import dlib

        detect = dlib.get_frontal_face_detector()
    spare = images + 3
    faces = synthetic_faces(identities * 2, spare, seed=seed)
    out: dict[str, list] = {}
    for i in range(identities * 2):
        found = [f for f in (faces[i * spare + k] for k in range(spare))
                 if detect is None or len(detect(f.image, 1)) > 0][:images]
        if len(found) == images:
            out[found[0].identity] = found
        if len(out) == identities:
            return out
    raise AssertionError("too few synthetic faces found by dlib's HOG detector")


@pytest.fixture(scope="session", autouse=True)
def pdsn_isolated_env(tmp_path_factory):
    """Every test writes its caches and default outputs under pytest's temp folder, never ~/.cache or ./."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PDSN_CACHE", str(tmp_path_factory.mktemp("pdsn-cache")))
    mp.setenv("PDSN_WORK", str(tmp_path_factory.mktemp("pdsn-work")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares 2 cores with other work; 1 thread is also deterministic
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory) -> Path:
    """An LFW-style identity folder: 4 identities × 3 synthetic JPEG photos, ``<name>/<name>_000N.jpg``."""
    root = tmp_path_factory.mktemp("faces") / "people"
    for name, faces in hog_detectable_faces(4, 3).items():
        for k, f in enumerate(faces, 1):
            write_jpeg(root / name / f"{name}_{k:04d}.jpg", f.image)
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """Weights of a randomly initialised ``tiny`` trunk (seeded), so every build of it is the same network."""
    from pdsn_cli.trunks import build_trunk

    torch.manual_seed(1234)
    trunk = build_trunk("tiny")
    path = tmp_path_factory.mktemp("trunk") / "tiny-random.pt"
    torch.save(trunk.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def block_pairs(tmp_path_factory) -> Path:
    """``make-pairs --block all`` on 4 synthetic identities × 3 images, arc112x96 (the tiny trunk's): 300 pairs."""
    from pdsn_cli.data.chip_cache import DataSpec
    from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs

    out = tmp_path_factory.mktemp("pairs") / "blocks.h5"
    make_pairs(MakePairsConfig(out=out, data=DataSpec(None, 4, 3), block="all", template="arc112x96"))
    return out


@pytest.fixture(scope="session")
def trained_blocks(block_pairs, tiny_weights, tmp_path_factory):
    """``train-block --block all`` with the tiny trunk on ``block_pairs``: (checkpoint path, result dict)."""
    from pdsn_cli.train.blocks import TrainBlockConfig, train_blocks

    out = tmp_path_factory.mktemp("blocks") / "all.pt"
    res = train_blocks(TrainBlockConfig(pairs=block_pairs, out=out, trunk="tiny", weights=tiny_weights,
                                        epochs=2, batch_size=8))
    return out, res


@pytest.fixture(scope="session")
def fdm_dict(trained_blocks, tmp_path_factory) -> Path:
    """``build-dict`` over ``trained_blocks`` (τ = 0.25)."""
    from pdsn_cli.pdsn.fdm import build

    out = tmp_path_factory.mktemp("dict") / "dict.h5"
    build([trained_blocks[0]], out, tau=0.25)
    return out


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file as arrays (strings decoded), for whole-file equality checks."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        for name, ds in f.items():
            v = ds[()]
            if ds.dtype.kind == "O":
                v = np.array([s.decode() if isinstance(s, bytes) else s for s in v], dtype=object)
            out[name] = v
    return out


def assert_same_datasets(a: Path, b: Path) -> None:
    da, db = h5_datasets(a), h5_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].shape == db[name].shape, name
        assert np.array_equal(da[name], db[name]), f"dataset {name} differs between {a} and {b}"


def write_schema1(src, out) -> None:
    """The rows of ``src`` as an older version wrote them (schema 1: both chips on every row)."""
    import h5py

    from pdsn_cli.data import pairs_h5

    p = pairs_h5.read_pairs(src)
    with h5py.File(out, "w") as f:
        for k, v in p.attrs.items():
            f.attrs[k] = v
        f.attrs["pdsn_schema"] = 1
        del f.attrs["store_occluded"]
        for name in ("clean", "occluded", "blocks", "landmarks", "label", "target"):
            f[name] = getattr(p, name)
        f["mask"] = np.packbits(p.mask, axis=-1)
        for name in ("source", "kind"):
            f.create_dataset(name, data=getattr(p, name), dtype=pairs_h5.STR)
        f.create_dataset("identity", data=p.identity, dtype=pairs_h5.STR)
