"""An occluder drawn on a whole photo (``pdsn occlude``): the face is found and aligned, the occluder drawn on the
aligned chip exactly as the benchmarks draw it, and the occluded pixels warped back into the photo. What the
tool's occluders look like on one's own pictures, and test photos for ``pdsn verify``."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pathlib import Path

from pdsn_cli.align.aligner import FaceAligner
from pdsn_cli.align.templates import chip_transform, get_template, transform_points, warp
from pdsn_cli.data.faces import read_photo
from pdsn_cli.errors import BadInputError
from pdsn_cli.occlusion.driver import draw, parse_occlusions

#: chips drawn on: dlib's template at twice its size would be finer, but the occluders are placed and sized for
#: the trunks' chips; upsampling the chip's pixels back to the photo keeps them as the benchmarks draw them
TEMPLATE = "dlib150"


@dataclass
class OccludedPhoto:
    image: np.ndarray  # uint8 H×W×3 RGB: the photo with the occluder
    kind: str  # the occluder drawn (random picks one)
    pixels: int  # photo pixels replaced
    faces: int  # faces the detector saw


def occlude_photo(image: np.ndarray, occluder: str, seed: int = 0, face: str = "centre",
                  aligner: FaceAligner | None = None) -> OccludedPhoto:
    variants = parse_occlusions([occluder], 5)
    if len(variants) != 1:
        raise BadInputError(f"--occluder {occluder} stands for {len(variants)} occlusions; give one (block:J for a block)")
    variant = variants[0]
    if variant.is_clean:
        raise BadInputError("--occluder none draws nothing; choose an occluder (pdsn occluders --preview shows them)")
    aligner = aligner or FaceAligner(pick=face)
    arc5, dlib5, _, detected, faces = aligner.find_points(image)
    if not detected:
        raise BadInputError("no face found in the photo")
    t = get_template(TEMPLATE)
    m = chip_transform(arc5, dlib5, TEMPLATE)
    chip = warp(image, m, t.size, truncate=t.dlib_geometry)
    o = draw(chip, transform_points(m, arc5), variant, seed, 0, 5)
    h, w = image.shape[:2]
    back = cv2.invertAffineTransform(m)
    drawn = cv2.warpAffine(o.image, back, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # the mask warped with the same interpolation: a soft edge instead of the chip's pixel stairs
    alpha = cv2.warpAffine(o.mask.astype(np.float32), back, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    out = np.clip(image * (1 - alpha) + drawn * alpha + 0.5, 0, 255).astype(np.uint8)
    return OccludedPhoto(out, o.kind, int((alpha[..., 0] > 0.5).sum()), faces)


def occlude_photo_file(photo: Path, occluder: str, seed: int = 0, face: str = "centre") -> OccludedPhoto:
    """``occlude_photo`` of the photo in the file ``photo`` (the caller writes ``.image``: pdsn occlude)."""
    return occlude_photo(read_photo(photo), occluder, seed=seed, face=face)
