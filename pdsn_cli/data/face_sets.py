"""Face sets for the trainers that draw occlusions themselves (``finetune --faces``, ``train-detector --faces``):
chips files of ``pdsn align``, one per set, each set's people kept apart as ``<set>/<identity>`` (the set named by
its file), so that two sets never share a person by accident. The images stay in the files (``StoredImages``): a
trainer reads the faces of each batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdsn_cli.data.chips_h5 import StoredImages, read_chips
from pdsn_cli.errors import BadInputError, SchemaError


@dataclass
class FaceSets:
    """The face sets' chips (read when indexed), identity names kept apart per set, each row's 5 landmarks."""

    image: StoredImages
    landmarks: np.ndarray
    names: list[str]
    sources: list[str]
    sets: list[str]
    template: str

    def __len__(self) -> int:
        return len(self.names)


def read_face_sets(paths: list[Path], template: str | None, max_faces: int | None, seed: int) -> FaceSets:
    """Chips files of ``pdsn align`` (one per face set); ``template`` None: the first file's."""
    images, lms, names, sources, sets = [], [], [], [], []
    for k, path in enumerate(paths):
        if not Path(path).is_file():
            raise BadInputError(f"--faces {path} does not exist (make one with pdsn align)")
        chips = read_chips(path, lazy_images=True)
        template = template or chips.template
        if chips.template != template:
            raise SchemaError(f"{path} holds {chips.template} chips; the other inputs are {template}")
        sel = np.arange(len(chips))
        if max_faces is not None and len(sel) > max_faces:
            sel = np.sort(np.random.default_rng(seed).permutation(len(sel))[:max_faces])
        # the set's name keeps its people apart from another set's: the file name, numbered if two are alike
        tag = Path(path).stem if Path(path).stem not in sets else f"{Path(path).stem}-{k}"
        sets.append(tag)
        images.append(chips.image.subset(sel))
        lms.append(chips.landmarks[sel])
        names += [f"{tag}/{chips.identity[j]}" for j in chips.label[sel]]
        sources += [f"{tag}/{chips.source[j]}" for j in sel]
    if not names:
        raise BadInputError("the --faces files hold no faces")
    return FaceSets(StoredImages.concat(images), np.concatenate(lms), names, sources, sets, template)
