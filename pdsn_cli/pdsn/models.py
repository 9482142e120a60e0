"""PDSN models: an FDM dictionary with its fine-tuned head and an occlusion detector, in one folder with a
``model.json`` that says what they are. The package ships one (``pdsn_cli/pretrained/``); ``export_model`` makes
one from the outputs of ``finetune`` and ``train-detector``; ``--pdsn`` / ``--model NAME|DIR`` select one wherever
``--dict`` and ``--detector`` are taken.

A model folder holds
- ``dict.h5``      the fdm-dict file; the head and the mean masks in float16 when the PDSN embeddings of the
                   reference chips stay within cosine ``FP16_MIN_COSINE`` of float32 (checked on export, recorded)
- ``detector.pt``  the occlusion detector checkpoint (``torch.load(weights_only=True)``)
- ``model.json``   what it is: trunk, mask point, grid, τ, template, the files' sha256 and sizes, the training data
                   (counts), the commands that made it, the tool version, the verification threshold and how it was
                   calibrated, measured figures, and the embeddings of generated reference chips
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pdsn_cli import __version__
from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.data.chip_cache import DataSpec, load_chips
from pdsn_cli.data.fetch import file_digest
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.eval.scores import read_scores
from pdsn_cli.eval.verification import best_threshold
from pdsn_cli.occlusion.driver import occlude_chips, parse_occlusions
from pdsn_cli.pdsn import fdm as fdm_mod
from pdsn_cli.pdsn.detector import OcclusionDetector
from pdsn_cli.pdsn.embedder import Embedder
from pdsn_cli.trunks import PACKAGED_WEIGHTS

KIND = "pdsn-model"
SCHEMA = 1
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
#: what ``--pdsn`` selects
DEFAULT_MODEL = "dlib-resnet-lfw"
DICT_FILE, DETECTOR_FILE, WEIGHTS_FILE, META_FILE = "dict.h5", "detector.pt", "trunk.pt", "model.json"
FP16_MIN_COSINE = 0.999
#: the generated chips every model records its embeddings of: synthetic people (their own seed, no dataset), the
#: second image of each occluded by sunglasses so that the detector and the dictionary take part
REFERENCE = {"synthetic_seed": 4242, "identities": 3, "images": 2, "occluder": "sunglasses", "occlusion_seed": 7}


@dataclass
class PdsnModel:
    name: str
    folder: Path
    meta: dict
    builtin: bool

    @property
    def dict_path(self) -> Path:
        return self.folder / DICT_FILE

    @property
    def detector_path(self) -> Path:
        return self.folder / DETECTOR_FILE

    @property
    def weights_path(self) -> Path | None:
        """The trunk's weights, for a trunk whose weights do not come with the install."""
        w = self.meta.get("trunk_weights")
        return self.folder / w if w else None

    @property
    def threshold(self) -> float | None:
        """Cosine similarity above which two faces are called the same person (None: not calibrated)."""
        t = self.meta["threshold"]
        return float(t["value"]) if t else None

    def summary(self) -> dict:
        m = self.meta
        return {"name": self.name, "builtin": self.builtin, "path": str(self.folder), "trunk": m["trunk"],
                "mask_point": m["mask_point"], "grid": m["grid"], "tau": m["tau"],
                "threshold": self.threshold, "bytes": sum(f["bytes"] for f in m["files"].values()),
                "trained_on": m.get("training", {}).get("summary", ""), "figures": m.get("figures", {})}


def read_model(folder: str | os.PathLike, builtin: bool = False) -> PdsnModel:
    folder = Path(folder)
    meta_path = folder / META_FILE
    if folder.is_file():
        raise BadInputError(f"--model {folder} is a file; a PDSN model is a folder with {META_FILE} "
                            "(pdsn export-model), or a built-in name (pdsn models)")
    if not meta_path.is_file():
        raise BadInputError(f"{folder} holds no {META_FILE}: not a PDSN model folder (pdsn export-model)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise SchemaError(f"{meta_path} is not readable JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise SchemaError(f"{meta_path} is not a PDSN model description (kind={meta.get('kind') if isinstance(meta, dict) else None!r})")
    if meta.get("schema") != SCHEMA:
        raise SchemaError(f"{meta_path} is model schema {meta.get('schema')!r}; this version reads {SCHEMA}")
    for key in ("name", "trunk", "mask_point", "grid", "tau", "threshold", "files"):
        if key not in meta:
            raise SchemaError(f"{meta_path} lacks {key!r}: a damaged model description")
    for f in meta["files"]:
        if not (folder / f).is_file():
            raise SchemaError(f"model {meta['name']} lacks {folder / f}")
    return PdsnModel(str(meta["name"]), folder, meta, builtin)


def builtin_models() -> list[PdsnModel]:
    if not PRETRAINED_DIR.is_dir():
        return []
    return [read_model(d, builtin=True) for d in sorted(PRETRAINED_DIR.iterdir()) if (d / META_FILE).is_file()]


def user_models(root: Path, depth: int = 2) -> list[PdsnModel]:
    """Model folders (with a ``model.json``) at most ``depth`` levels under ``root`` (the work folder)."""
    found = []
    if not root.is_dir():
        return found
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if (d / META_FILE).is_file():
                try:
                    found.append(read_model(d))
                except BadInputError:
                    pass  # another tool's model.json: not ours to list
            try:
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                pass
        level = nxt
    return found


def resolve_model(spec: str | os.PathLike) -> PdsnModel:
    """``spec``: ``builtin`` (the default built-in model), a built-in name, or a model folder; its files checked
    against the sha256 in its ``model.json`` (a damaged install or an edited file is refused, not used)."""
    model = _find_model(str(spec))
    bad = check_files(model)
    if bad:
        raise SchemaError(f"model {model.name} ({model.folder}) is damaged: {'; '.join(bad)}")
    return model


def _find_model(spec: str) -> PdsnModel:
    if spec in ("builtin", "default"):
        spec = DEFAULT_MODEL
    for m in builtin_models():
        if m.name == spec:
            return m
    if Path(spec).exists():
        return read_model(spec)
    names = ", ".join(m.name for m in builtin_models()) or "none"
    raise BadInputError(f"no PDSN model {spec!r}: give a model folder (pdsn export-model) or a built-in name ({names})")


def apply_model(spec: str | None, dict_path, detector, occlusion_source: str | None, weights=None, trunk=None):
    """The dictionary, detector, occlusion source and trunk weights a command runs with: those of the model
    ``spec`` (which replaces ``--dict``/``--detector``), or the ones given. No occlusion source given: the detector
    when there is one, else the oracle."""
    if spec is not None:
        if dict_path is not None or detector is not None:
            raise BadInputError("--pdsn/--model brings its own dictionary and detector: drop --dict and --detector")
        model = resolve_model(spec)
        if trunk is not None and trunk != model.meta["trunk"]:
            raise SchemaError(f"model {model.name} is for trunk {model.meta['trunk']}, not {trunk} "
                              f"(--trunk {model.meta['trunk']})")
        if weights is not None and model.weights_path is not None:
            raise BadInputError(f"model {model.name} brings its trunk's weights: drop --weights")
        dict_path, detector, weights = model.dict_path, model.detector_path, model.weights_path or weights
    if occlusion_source is None:
        occlusion_source = "detector" if detector is not None else "oracle"
    return dict_path, detector, occlusion_source, weights


def check_files(model: PdsnModel) -> list[str]:
    """The model's files whose size or sha256 differ from ``model.json`` (empty: intact)."""
    bad = []
    for name, rec in model.meta["files"].items():
        p = model.folder / name
        if not p.is_file():
            bad.append(f"{name}: missing")
        elif p.stat().st_size != rec["bytes"] or file_digest(p, "sha256") != rec["sha256"]:
            bad.append(f"{name}: sha256 differs from {META_FILE}")
    return bad


# ---- reference embeddings ---------------------------------------------------------------------------------
def reference_chips(template: str, grid: int) -> np.ndarray:
    r = REFERENCE
    chips, _ = load_chips(DataSpec(None, r["identities"], r["images"], synthetic_seed=r["synthetic_seed"]), template)
    second = np.arange(1, len(chips), r["images"])
    occluded, _ = occlude_chips(chips, second, parse_occlusions([r["occluder"]], grid)[0], grid, r["occlusion_seed"])
    out = chips.image.copy()
    out[second] = occluded
    return out


def reference_embeddings(dict_path: Path, detector_path: Path, weights=None, device=None) -> tuple[np.ndarray, np.ndarray]:
    """PDSN embeddings (detector blocks, the dictionary's head) of the reference chips, and their blocks."""
    emb = Embedder.load(None, weights, dict_path, "detector", detector_path, device)
    chips = reference_chips(emb.trunk.template, emb.grid)
    e = emb.embed(chips)
    return e.embeddings, e.blocks


# ---- calibration -------------------------------------------------------------------------------------------
def calibrate(scores: np.ndarray, same: np.ndarray, occlusion: list[str]) -> dict:
    """One threshold for every condition: the one that maximises accuracy over all the pairs pooled; with the
    accuracy, false accept rate and true accept rate it gives in each condition."""
    scores, same, occlusion = np.asarray(scores, np.float64), np.asarray(same, bool), np.asarray(occlusion)
    t = best_threshold(scores, same)
    per = {}
    for name in dict.fromkeys(occlusion.tolist()):
        k = occlusion == name
        s, y = scores[k], same[k]
        per[name] = {"pairs": int(k.sum()), "accuracy": float(np.mean((s > t) == y)),
                     "far": float(np.mean(s[~y] > t)), "tar": float(np.mean(s[y] > t))}
    return {"value": float(t), "accuracy": float(np.mean((scores > t) == same)), "per_occlusion": per}


# ---- export ------------------------------------------------------------------------------------------------
def calibrate_from_scores(path: Path, dataset: str | None = None) -> dict:
    """The verification threshold from a ``pdsn benchmark --scores`` file: its PDSN rows, every occlusion but the
    single-block ones (25 variants of one kind would outweigh the rest), pooled. ``dataset``: what the pairs are
    (the benchmark's name for them), said in ``calibrated_on``."""
    cols = read_scores(path)
    keep = (cols["method"] == "pdsn") & ~np.char.startswith(cols["occlusion"].astype(str), "block:")
    if not keep.any():
        raise BadInputError(f"{path} has no PDSN rows: run the benchmark with the model's --dict and --detector")
    if cols["same"][keep].all() or not cols["same"][keep].any():
        raise BadInputError(f"{path} needs matched and mismatched pairs to calibrate a threshold")
    kinds = list(dict.fromkeys(cols["occlusion"][keep].tolist()))
    t = calibrate(cols["score"][keep], cols["same"][keep], cols["occlusion"][keep].tolist())
    n = int(len(set(cols["pair"][keep].tolist())))
    t["calibrated_on"] = (f"maximum accuracy over {n:,} pairs × {len(kinds)} conditions ({', '.join(kinds)}) of "
                          f"{dataset_label(dataset, n) if dataset else Path(path).name}")
    return t


def dataset_label(dataset: str, pairs: int) -> str:
    """A benchmark's dataset as people name it: ``lfw`` with its 6,000 pairs is LFW View 2."""
    name = str(dataset).split()[0]
    if name == "lfw":
        return "LFW View 2" if pairs == 6000 else f"LFW View 2 ({pairs:,} of its pairs)"
    return str(dataset)


def model_figures(bench: dict) -> dict:
    """``{dataset: {occlusion: {baseline, pdsn, recovery}}}`` (accuracy in %) from a benchmark's JSON."""
    rows = {}
    for r in bench.get("results", []):
        if r.get("block") is not None or r["method"] not in ("baseline", "pdsn"):
            continue
        rows.setdefault(r["occlusion"], {})[r["method"]] = round(100 * r["accuracy"], 2)
        if r["method"] == "pdsn" and r.get("recovery") is not None:
            rows[r["occlusion"]]["recovery"] = round(r["recovery"], 3)
    rows = {k: v for k, v in rows.items() if "pdsn" in v and "baseline" in v}
    name = str(bench.get("dataset", "lfw")).split()[0]
    return {name: rows, f"{name}_protocol": {"pairs": bench.get("pairs"), "occlusion_source": bench.get(
        "occlusion_source"), "seed_of_occlusions": 0}}


def training_summary(pipeline: dict) -> dict:
    """What a model was trained on, in counts, from ``pdsn pipeline --json``."""
    p, ft = pipeline.get("pairs", {}), pipeline.get("finetune") or {}
    summary = {"data": p.get("data"), "images": p.get("images"), "identities": p.get("identities"),
               "block_pairs": p.get("pairs_in_file"), "finetune_pairs": ft.get("pairs"),
               "finetune_held_out_identities": ft.get("held_out_identities"), "finetune_kept_epoch": ft.get("kept_epoch"),
               "train_block_epochs": (pipeline.get("train_block") or {}).get("epochs")}
    if summary.get("images") and summary.get("identities"):
        summary["summary"] = f"{summary['images']:,} images of {summary['identities']:,} people" + (
            " (synthetic)" if p.get("synthetic") else
            f" of {Path(str(p.get('data'))).name}, none in its pairs.txt (no View-2 person)")
    return {k: v for k, v in summary.items() if v is not None}


def export_model(dict_path: Path, detector_path: Path, out: Path, *, name: str, scores: Path | None = None,
                 weights=None, training: dict | None = None, figures: dict | None = None,
                 commands: list[str] | None = None, fp16: bool = True, dataset: str | None = None) -> dict:
    """Pack a fine-tuned dictionary and a detector into the model folder ``out`` (created; its files replaced
    atomically), with the verification threshold calibrated on ``scores`` (``pdsn benchmark --scores``; without
    them the model embeds and benchmarks but ``verify`` needs ``--threshold`` until :func:`calibrate_model`). A
    trunk whose weights do not come with the install brings them (``weights``, copied as ``trunk.pt``)."""
    threshold = calibrate_from_scores(scores, dataset) if scores is not None else None
    d = fdm_mod.load(dict_path)
    if not d.head:
        raise BadInputError(f"{dict_path} has no fine-tuned head (pdsn finetune): a model ships the head PDSN "
                            "embeddings go through")
    det = OcclusionDetector.load(detector_path)
    det.check_for(d.template, d.grid, detector_path)
    if weights is None and d.trunk not in PACKAGED_WEIGHTS:
        raise BadInputError(f"trunk {d.trunk} has no weights in the install: give its --weights (copied into the model)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in (DICT_FILE, DETECTOR_FILE, META_FILE):
        check_writable(out / f)
    ref, blocks = reference_embeddings(dict_path, detector_path, weights)
    files = [DICT_FILE, DETECTOR_FILE]
    with atomic_output(out / DETECTOR_FILE) as tmp:
        shutil.copyfile(detector_path, tmp)
    if weights is not None:
        files.append(WEIGHTS_FILE)
        with atomic_output(out / WEIGHTS_FILE) as tmp:
            shutil.copyfile(weights, tmp)
        weights = out / WEIGHTS_FILE
    cosine = None
    if fp16:
        _write_dict(dict_path, out / DICT_FILE, np.float16)
        ref16, _ = reference_embeddings(out / DICT_FILE, out / DETECTOR_FILE, weights)
        cosine = float((ref16 * ref).sum(1).min())
        fp16 = cosine >= FP16_MIN_COSINE  # else not worth the bytes it saves
        if fp16:
            ref = ref16
    if not fp16:
        _write_dict(dict_path, out / DICT_FILE, np.float32)
    meta = {
        "kind": KIND, "schema": SCHEMA, "name": name, "tool_version": __version__,
        "trunk": d.trunk, "trunk_weights": WEIGHTS_FILE if weights is not None else None, "mask_point": d.mask_point, "template": d.template, "grid": d.grid, "tau": d.tau,
        "detector_threshold": det.threshold, "head_dtype": "float16" if fp16 else "float32",
        "fp16_min_cosine_to_fp32": cosine, "threshold": threshold, "training": training or {},
        "figures": figures or {}, "commands": commands or [],
        "reference": {**REFERENCE, "embeddings": np.round(ref, 6).tolist(),
                      "blocks": [np.flatnonzero(b.reshape(-1)).tolist() for b in blocks]},
        "files": {f: {"bytes": (out / f).stat().st_size, "sha256": file_digest(out / f, "sha256")} for f in files},
    }
    with atomic_output(out / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return read_model(out).summary() | {"head_dtype": meta["head_dtype"], "fp16_min_cosine_to_fp32": cosine}


def calibrate_model(folder: Path, scores: Path, figures: dict | None = None, dataset: str | None = None) -> dict:
    """Set a model's verification threshold from ``scores`` (a benchmark of the model's own files) and its
    measured ``figures``; the files stay as they are."""
    m = read_model(folder)
    meta = m.meta | {"threshold": calibrate_from_scores(scores, dataset)}
    if figures is not None:
        meta["figures"] = figures
    with atomic_output(m.folder / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return read_model(folder).summary()


def _write_dict(src: Path, final: Path, dtype) -> None:
    """The fdm-dict file ``src`` again at ``final``, its float arrays (head, mean masks) stored as ``dtype``."""
    with atomic_output(final) as tmp, h5py.File(src, "r") as fi, h5py.File(tmp, "w") as fo:
        for k, v in fi.attrs.items():
            fo.attrs[k] = v

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = obj[()]
                if a.dtype.kind == "f":
                    a = a.astype(dtype)
                kw = {"compression": "gzip", "compression_opts": 9, "shuffle": True} if a.ndim else {}
                fo.create_dataset(name, data=a, **kw)
        fi.visititems(copy)
