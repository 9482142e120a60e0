"""PDSN at test time: chips → trunk features → FDM of the occluded blocks → head → embedding.

The ``Embedder`` holds everything an embedding depends on, loaded once and checked against each other: the
trunk and its mask point, the FDM dictionary, where the occluded blocks come from (the occlusion detector, or the
known occupancy: ``oracle``), the head masked features go through (the dictionary's fine-tuned head when it has
one, else the trunk's own), and the views of each image (its mirror with ``flip``, dlib's jittered copies with
``jitter``, its 5- and/or 68-landmark chips).

The FDM of an image is the AND of the dictionary entries of its occluded blocks; its mirrored view's is the AND of
the mirrored blocks' entries. Callers that compare several embeddings of the same features compute them once
(``features``) and embed them plainly (``plain``) or masked (``masked(features, masks(blocks))``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdsn_cli.align.templates import get_template
from pdsn_cli.errors import BadInputError
from pdsn_cli.pdsn import fdm as fdm_mod
from pdsn_cli.pdsn.detector import OcclusionDetector
from pdsn_cli.pdsn.fdm import FdmDict
from pdsn_cli.pdsn.jitter import embed_jittered
from pdsn_cli.trunks import build_trunk
from pdsn_cli.trunks.base import Trunk
from pdsn_cli.trunks.features import embed_features, extract_features

#: --landmarks → the landmark models whose chips are embedded (their embeddings summed, like --flip's views)
LANDMARK_SETS = {"5": [5], "68": [68], "5+68": [5, 68]}


@dataclass
class Embedded:
    """What ``Embedder.embed`` computed for a batch of chips."""

    embeddings: np.ndarray  # float32 N×D, L2-normalised
    blocks: np.ndarray | None  # bool N×K×K: the blocks judged occluded (None without a dictionary)
    kept: np.ndarray  # float32 N: fraction of feature elements the FDM keeps (1 without a dictionary)
    fallbacks: int  # images whose FDM discarded everything, embedded unmasked
    features: np.ndarray | torch.Tensor  # the unmasked features the embeddings were computed from


class TwinFeatures:
    """The features of the same images from the untouched trunk (``base``: the baseline's) and from the
    dictionary's fine-tuned trunk (``tuned``: PDSN's), indexed together. ``Embedder.features`` returns these when
    the dictionary tunes the trunk below its mask point (``pdsn finetune --faces``); ``plain`` reads ``base``,
    ``masked`` reads ``tuned``, so callers index and pass them on as they do a plain array."""

    def __init__(self, base, tuned):
        self.base, self.tuned = base, tuned

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx) -> TwinFeatures:
        return TwinFeatures(self.base[idx], self.tuned[idx])

    @property
    def shape(self):
        return self.base.shape

    @property
    def ndim(self) -> int:
        return self.base.ndim


def all_finite(features) -> bool:
    """No NaN/inf in features (both sets of twin features)."""
    parts = (features.base, features.tuned) if isinstance(features, TwinFeatures) else (features,)
    return all(bool(torch.isfinite(p).all()) if isinstance(p, torch.Tensor) else bool(np.isfinite(p).all())
               for p in parts)


@dataclass
class Embedder:
    trunk: Trunk
    point: str
    dictionary: FdmDict | None
    detector: OcclusionDetector | None  # ``--occlusion detector``
    source: str  # oracle | detector
    device: torch.device
    dict_path: Path | None = None
    #: the trunk PDSN-masked features are embedded with (the dictionary's fine-tuned head, if it has one)
    masked_trunk: Trunk | None = None
    block_threshold: float = 0.25
    flip: bool = False
    jitter: int = 0  # dlib's num_jitters: mean raw embedding over N jittered views (baseline only)
    seed: int = 0  # of the jitter
    landmarks: str = "5"
    batch_size: int = 64  # chips per trunk forward pass
    head_batch_size: int = 256  # features per head pass
    precision: str = "bf16"  # CUDA only (pdsn_cli.accel)
    compile: str = "auto"
    #: the dictionary tunes the trunk below the mask point: PDSN features come from ``masked_trunk`` (TwinFeatures)
    tuned_features: bool = False

    @classmethod
    def load(cls, trunk_name: str | None, weights=None, dict_path: Path | None = None, occlusion_source: str = "oracle",
             detector_path: Path | None = None, device: torch.device | None = None, block_threshold: float = 0.25,
             flip: bool = False, jitter: int = 0, seed: int = 0, landmarks: str = "5", batch_size: int = 64,
             head_batch_size: int = 256, precision: str = "bf16", compile: str = "auto") -> Embedder:
        """The trunk, the FDM dictionary and the occlusion detector, checked against each other and against the
        views before any work."""
        if jitter < 0:
            raise BadInputError(f"--jitter must be ≥ 0, got {jitter}")
        if jitter and flip:
            raise BadInputError("--jitter already mirrors half of its views; drop --flip")
        if jitter and dict_path is not None:
            raise BadInputError("--jitter applies to the whole trunk; PDSN masks the features of the chip itself "
                                "(drop --dict, or --jitter)")
        if landmarks not in LANDMARK_SETS:
            raise BadInputError(f"--landmarks must be one of {', '.join(LANDMARK_SETS)}, got {landmarks!r}")
        if jitter and landmarks == "5+68":
            raise BadInputError("--jitter does not combine with --landmarks 5+68; choose one")
        if occlusion_source not in ("oracle", "detector"):
            raise BadInputError(f"--occlusion must be oracle or detector, got {occlusion_source!r}")
        if not 0 < block_threshold <= 1:
            raise BadInputError(f"--block-threshold must be in (0, 1], got {block_threshold}")
        device = device or torch.device("cpu")
        dictionary = fdm_mod.load(dict_path) if dict_path is not None else None
        # no trunk named: the one the dictionary was built for
        trunk = build_trunk(trunk_name or dictionary.trunk, weights).to(device)
        point = trunk.default_mask_point
        if dictionary is not None:
            dictionary.check_for(trunk.name, dictionary.mask_point, dict_path)
            point = trunk.check_point(dictionary.mask_point)
            dictionary.check_features(trunk.feature_shape(point), dict_path)
        detector = None
        if occlusion_source == "detector":
            if detector_path is None:
                raise BadInputError("--occlusion detector needs --detector FILE (pdsn train-detector)")
            detector = OcclusionDetector.load(detector_path)
            detector.check_for(trunk.template, dictionary.grid if dictionary else None, detector_path)
        masked = dictionary.masked_trunk(trunk).to(device) if dictionary is not None else trunk
        if landmarks != "5" and get_template(trunk.template).dst68 is None:
            raise BadInputError(f"--landmarks {landmarks} needs a dlib template; trunk {trunk.name} uses "
                                f"{trunk.template}")
        tuned = bool(dictionary is not None and dictionary.head
                     and set(dictionary.head) - set(trunk.head_parameters(point)))
        return cls(trunk, point, dictionary, detector, occlusion_source, device, dict_path, masked, block_threshold,
                   flip, jitter, seed, landmarks, batch_size, head_batch_size, precision, compile, tuned)

    def header(self) -> dict:
        """The result keys every benchmark starts with: what was measured, with which trunk and dictionary."""
        return {"trunk": self.trunk.name, "mask_point": self.point,
                "dictionary": str(self.dict_path) if self.dict_path else None,
                "finetuned_head": bool(self.dictionary is not None and self.dictionary.head),
                "finetuned_trunk": self.tuned_features,
                "occlusion_source": self.source if self.dictionary is not None else None}

    @property
    def grid(self) -> int:
        return self.dictionary.grid if self.dictionary is not None else 5

    @property
    def landmark_sets(self) -> list[int]:
        """The landmark models whose chips of each image are embedded (one chip set each)."""
        return LANDMARK_SETS[self.landmarks]

    # ---- the steps ----------------------------------------------------------------------------------------
    def features(self, chip_sets: list, progress=None, on_device: bool = False):
        """Trunk features at the mask point of every chip set (with ``flip``, each also mirrored), stacked as views
        N×V×C×H×W; one set without flip gives N×C×H×W. ``on_device`` (one set only): a tensor left on the device."""
        if self.tuned_features:
            return TwinFeatures(self._features(self.trunk, chip_sets, progress, on_device),
                                self._features(self.masked_trunk, chip_sets, progress, on_device))
        return self._features(self.trunk, chip_sets, progress, on_device)

    def _features(self, trunk: Trunk, chip_sets: list, progress, on_device: bool):
        fs = [extract_features(trunk, c, self.point, self.batch_size, self.device, flip=self.flip,
                               progress=progress, precision=self.precision, compile=self.compile,
                               on_device=on_device) for c in chip_sets]
        if len(fs) == 1:
            return fs[0]
        return np.concatenate([f if f.ndim == 5 else f[:, None] for f in fs], axis=1)

    def occluded_blocks(self, chips: np.ndarray, occupancy: np.ndarray | None = None) -> np.ndarray:
        """bool N×K×K: the blocks PDSN treats as occluded, from the detector or the known occupancy (oracle)."""
        if self.detector is not None:
            return self.detector.predict(chips, template=self.trunk.template) >= self.block_threshold
        if occupancy is None:
            raise BadInputError("--occlusion oracle needs the occlusion masks of the images (a pairs file)")
        return occupancy >= self.block_threshold

    def masks(self, blocks: np.ndarray) -> tuple[np.ndarray, int]:
        """The FDMs of images whose ``blocks`` (bool N×K×K or N×K²) are occluded: float32 N×C×H×W, or
        N×V×C×H×W with flip (the mirrored view's FDM from the mirrored blocks, for every chip set); and how many
        images lost every element (those keep every element instead)."""
        masks, empty = self.dictionary.masks_for(blocks, flip=self.flip)
        if self.flip and len(self.landmark_sets) > 1:  # one (chip, mirror) mask pair per chip set
            masks = np.concatenate([masks] * len(self.landmark_sets), axis=1)
        return masks, empty

    def plain(self, features, normalize: bool = True) -> np.ndarray:
        """Embeddings of unmasked features by the trunk's own head (the baseline)."""
        if isinstance(features, TwinFeatures):
            features = features.base
        return self._head(self.trunk, features, None, normalize)

    def masked(self, features, masks: np.ndarray, normalize: bool = True) -> np.ndarray:
        """PDSN embeddings: features ⊙ FDM through the fine-tuned head when the dictionary has one. ``masks``: one
        per row, or one for every row with a row axis of 1 (what :meth:`masks` gives for one block combination)."""
        masks = np.asarray(masks)
        if isinstance(features, TwinFeatures):
            features = features.tuned
        if len(masks) == 1 and len(features) != 1:  # a view: the head reads it batch by batch
            masks = np.broadcast_to(masks, (len(features), *masks.shape[1:]))
        return self._head(self.masked_trunk, features, masks, normalize)

    def jittered(self, chips: np.ndarray, sources: list[str], normalize: bool = True, progress=None) -> np.ndarray:
        """dlib's ``num_jitters``: the mean raw embedding over ``jitter`` jittered views of each chip."""
        return embed_jittered(self.trunk, chips, sources, self.jitter, self.seed, self.batch_size, self.device,
                              normalize=normalize, progress=progress)

    def _head(self, trunk: Trunk, features, masks, normalize: bool) -> np.ndarray:
        e = embed_features(trunk, features, self.point, masks, batch_size=self.head_batch_size, device=self.device,
                           normalize=normalize)
        if not normalize and features.ndim == 5:  # the views' raw embeddings are summed: keep their mean
            e = e / features.shape[1]
        return e

    # ---- all of it ----------------------------------------------------------------------------------------
    def embed(self, chips: np.ndarray, occupancy: np.ndarray | None = None) -> Embedded:
        """L2-normalised embeddings of uint8 N×H×W×3 chips; with a dictionary, PDSN-masked by the FDM of the blocks
        judged occluded (by the detector, or from ``occupancy``, float N×K×K, with the oracle)."""
        return self.from_features(self.features([chips]), chips, occupancy)

    def from_features(self, feats, chips: np.ndarray, occupancy: np.ndarray | None = None) -> Embedded:
        """``embed`` for chips whose features (``features([chips])``) are computed already."""
        if self.dictionary is None:
            return Embedded(self.plain(feats), None, np.ones(len(chips), np.float32), 0, feats)
        blocks = self.occluded_blocks(chips, occupancy)
        masks, empty = self.masks(blocks)
        kept = masks.reshape(len(masks), -1).mean(1).astype(np.float32)
        return Embedded(self.masked(feats, masks), blocks, kept, empty, feats)
