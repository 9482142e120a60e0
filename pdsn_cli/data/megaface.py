"""MegaFace Challenge 1 as distributed, and its LFW stand-in.

Layouts read (the devkit's documented files; MegaFace itself is no longer distributed, users bring it):

- distractors: ``<megaface images>/<a>/<b>/<file>.jpg`` (``FlickrFinal2``), listed by the devkit's
  ``templatelists/megaface_features_list.json_<N>_<set>`` files: ``{"path": [relative paths]}``;
- probes: ``<facescrub images>/<Name>/<file>`` listed by ``templatelists/facescrub_features_list.json``:
  ``{"id": [identity per image], "path": [relative paths]}``;
- feature files for the official scorer: ``<features>/<relative path><suffix>`` (e.g. ``…/1.jpg_pdsn.bin``) in the
  devkit's ``matio`` layout: int32 rows, cols, row stride in bytes, OpenCV type (5 = CV_32F), then float32 data;
  one column vector per image.

``megaface-lfw``: the same protocol on LFW — probes are the people with at least two images, distractors the people
with exactly one, so the two sets share no identity.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdsn_cli.errors import BadInputError
from pdsn_cli.data.faces import FaceItem, list_identity_folder

PROBE_LIST = "facescrub_features_list.json"
DISTRACTOR_LIST = re.compile(r"^megaface_features_list\.json_(\d+)_(\d+)$")
CV_32F = 5


@dataclass
class MegafaceLayout:
    distractor_root: Path
    probe_root: Path
    templatelists: Path

    @classmethod
    def resolve(cls, data_dir: Path | None, distractors: Path | None = None, probes: Path | None = None,
                devkit: Path | None = None) -> MegafaceLayout:
        """Find the three folders: explicit options win, else the usual names under ``--data-dir``."""
        def pick(given, names, what, option):
            if given is not None:
                if not Path(given).is_dir():
                    raise BadInputError(f"{option} is not a folder: {given}")
                return Path(given)
            if data_dir is None:
                raise BadInputError(f"--dataset megaface needs --data-dir (or {option})")
            for n in names:
                if (Path(data_dir) / n).is_dir():
                    return Path(data_dir) / n
            raise BadInputError(f"no {what} folder under {data_dir} (looked for {', '.join(names)}; or pass {option})")

        dist = pick(distractors, ["FlickrFinal2", "megaface_images", "MegaFace/FlickrFinal2", "megaface"],
                    "MegaFace distractor images", "--megaface-images")
        prob = pick(probes, ["facescrub_images", "FaceScrub", "facescrub"], "FaceScrub images", "--facescrub-images")
        dk = pick(devkit, ["devkit", "devkit/templatelists", "templatelists"], "devkit", "--devkit")
        tl = dk / "templatelists" if (dk / "templatelists").is_dir() else dk
        if not (tl / PROBE_LIST).is_file():
            raise BadInputError(f"{tl} has no {PROBE_LIST} (the devkit's templatelists folder)")
        return cls(dist, prob, tl)

    def probe_items(self) -> list[FaceItem]:
        ids, paths = read_probe_list(self.templatelists / PROBE_LIST)
        return [FaceItem(p, i) for i, p in zip(ids, paths)]

    def distractor_lists(self, set_index: int = 1) -> dict[int, list[str]]:
        return read_distractor_lists(self.templatelists, set_index)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("path"), list):
        raise BadInputError(f"{path} is not a devkit template list (a JSON object with a 'path' list)")
    return d


def _check_rel(p, path: Path) -> str:
    if not isinstance(p, str) or not p or p.startswith(("/", "\\")) or ".." in Path(p).parts:
        raise BadInputError(f"{path}: bad image path {p!r} (must be relative, inside the image folder)")
    return p


def read_probe_list(path: Path) -> tuple[list[str], list[str]]:
    d = _read_json(path)
    ids = d.get("id")
    if not isinstance(ids, list) or len(ids) != len(d["path"]):
        raise BadInputError(f"{path}: 'id' must list one identity per 'path' entry")
    paths = [_check_rel(p, path) for p in d["path"]]
    if len(set(paths)) != len(paths):
        raise BadInputError(f"{path}: an image is listed twice")
    return [str(i) for i in ids], paths


def read_distractor_lists(templatelists: Path, set_index: int = 1) -> dict[int, list[str]]:
    """``{N: paths}`` for every ``megaface_features_list.json_N_<set_index>`` (sizes ascending)."""
    out = {}
    for f in sorted(Path(templatelists).iterdir()):
        m = DISTRACTOR_LIST.match(f.name)
        if m and int(m.group(2)) == set_index:
            paths = [_check_rel(p, f) for p in _read_json(f)["path"]]
            if len(paths) != int(m.group(1)):
                raise BadInputError(f"{f} lists {len(paths)} images, its name says {m.group(1)}")
            out[int(m.group(1))] = paths
    if not out:
        raise BadInputError(f"no megaface_features_list.json_<N>_{set_index} files in {templatelists}")
    return dict(sorted(out.items()))


def nested_order(lists: dict[int, list[str]]) -> list[str] | None:
    """One order of the distractors in which every size's list is a prefix (one search pass serves all
    sizes), or None when the lists are not nested subsets of each other."""
    order: list[str] = []
    seen: set[str] = set()
    for _, paths in sorted(lists.items()):
        if not seen <= set(paths):
            return None
        new = [p for p in paths if p not in seen]
        order += new
        seen.update(new)
    return order


# ---- devkit feature files (matio) ---------------------------------------------------------------------------
def write_bin(path: Path, vector: np.ndarray) -> None:
    v = np.ascontiguousarray(vector, np.float32).ravel()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<4i", v.size, 1, 4, CV_32F))
        f.write(v.tobytes())


def read_bin(path: Path) -> np.ndarray:
    b = Path(path).read_bytes()
    if len(b) < 16:
        raise BadInputError(f"{path}: not a devkit feature file (too short)")
    rows, cols, _, typ = struct.unpack("<4i", b[:16])
    if typ != CV_32F or len(b) != 16 + 4 * rows * cols:
        raise BadInputError(f"{path}: not a float32 devkit feature file")
    return np.frombuffer(b[16:], np.float32).reshape(rows, cols).ravel().copy()


def export_features(out_dir: Path, rel_paths: list[str], embeddings: np.ndarray, suffix: str) -> int:
    """One ``<out_dir>/<path><suffix>`` file per image, for the devkit's ``run_experiment.py``."""
    if not suffix.endswith(".bin"):
        raise BadInputError(f"devkit feature suffix must end in .bin, got {suffix!r}")
    for p, e in zip(rel_paths, embeddings):
        write_bin(Path(out_dir) / (p + suffix), e)
    return len(rel_paths)


def write_template_lists(out_dir: Path, probe_ids: list[str], probe_paths: list[str],
                         distractor_lists: dict[int, list[str]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROBE_LIST).write_text(json.dumps({"id": probe_ids, "path": probe_paths}))
    for n, paths in distractor_lists.items():
        (out_dir / f"megaface_features_list.json_{n}_1").write_text(json.dumps({"path": paths}))


# ---- LFW as a MegaFace-style set -------------------------------------------------------------------------
def lfw_split(root: Path) -> tuple[list[FaceItem], list[FaceItem], list]:
    """(probes: people with ≥ 2 images, distractors: people with exactly 1, skipped files)."""
    items, skipped = list_identity_folder(root)
    by_id: dict[str, list[FaceItem]] = {}
    for it in items:
        by_id.setdefault(it.identity, []).append(it)
    probes = [it for its in by_id.values() if len(its) >= 2 for it in its]
    distractors = [its[0] for its in by_id.values() if len(its) == 1]
    if not probes:
        raise BadInputError(f"no identity under {root} has two images: nothing to probe with")
    return probes, distractors, skipped


def gallery_sizes(total: int, largest: int | None = None) -> list[int]:
    """10, 100, … up to the number of distractors (capped at ``largest``)."""
    top = min(total, largest) if largest else total
    sizes = [10**k for k in range(1, 8) if 10**k <= top]
    return sizes or [top]


def devkit_suffix(trunk: str) -> str:
    return f"_pdsn_{re.sub(r'[^A-Za-z0-9]+', '', trunk)}.bin"

