"""Alignment templates and the warp: 5 landmarks → one similarity warp to a trunk's template.

Templates
- ``dlib150``: dlib's own ``get_face_chip_details`` geometry for the 5-point model (eye corners + nose base),
  150×150, padding 0.25 — what dlib's ResNet descriptor was trained on.
- ``arc112x112`` / ``arc112x96``: the standard ArcFace / SphereFace-CosFace 5-point templates (eye centres, nose
  tip, mouth corners).

Every chip stores its 5 "arc" landmarks (eye centres, nose tip, mouth corners) in chip pixels, which the
occluders are placed from. Landmarks come from aligner.FaceAligner (real photos) or are known (synthetic faces).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pdsn_cli.errors import BadInputError

# dlib's 5-point template on the unit square (dlib/image_transforms/interpolation.h, get_face_chip_details),
# in the 5-point predictor's part order: image-right eye outer/inner corner, image-left eye outer/inner, nose base.
_DLIB5_UNIT = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# dlib's mean face for the 68-point model's landmarks 17..67 on the unit square (get_face_chip_details, the
# alignment dlib's ResNet descriptor was published with); dlib fits the chip on the nose, eyes and outer/upper lip
# only (points 27..54 and 60..64: no eyebrows, no lower lip), as below.
_DLIB68_UNIT = np.array([
    [0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
     0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
     0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
     0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
     0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
     0.42689],
    [0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915, 0.106454,
     0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326, 0.216423,
     0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077,
     0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805, 0.902192,
     0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182, 0.831803,
     0.824182],
]).T
#: the 68-point indices dlib's chip is fitted on
DLIB68_FIT = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])

# insightface's 112×112 ArcFace template: left eye, right eye, nose tip, left / right mouth corner.
_ARC112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


@dataclass(frozen=True)
class Template:
    name: str
    size: tuple[int, int]  # (H, W)
    points: str  # which landmark set the warp is fitted on: "dlib5" or "arc5"
    dst: np.ndarray  # 5×2 destination points in chip pixels
    #: reproduce dlib's extract_image_chip exactly (its rectangle convention and truncating interpolation)
    dlib_geometry: bool = False
    #: destination of the DLIB68_FIT landmarks, for a dlib template aligned with the 68-point model
    dst68: np.ndarray | None = None
    #: a dlib template's fit for faces whose only landmarks are the 5 arc points (a dataset's own landmark
    #: file): where those points sit on average in the template's chips
    dst_arc5: np.ndarray | None = None


def _dlib_template(size: int, padding: float, unit: np.ndarray = _DLIB5_UNIT) -> np.ndarray:
    return (padding + unit) / (2 * padding + 1) * size


TEMPLATES: dict[str, Template] = {
    "dlib150": Template("dlib150", (150, 150), "dlib5", _dlib_template(150, 0.25), dlib_geometry=True,
                        dst68=_dlib_template(150, 0.25, _DLIB68_UNIT[DLIB68_FIT - 17]),
                        # mean arc5 of the 7,701 LFW View-2 dlib150 chips aligned by dlib's detector (2026-11-29)
                        dst_arc5=np.array([[47.04, 46.20], [100.07, 46.20], [73.57, 75.23], [49.50, 104.38],
                                           [97.77, 104.46]])),
    "arc112x112": Template("arc112x112", (112, 112), "arc5", _ARC112),
    # the 112×96 SphereFace/CosFace crop is the 112×112 one with 8 px taken off each side
    "arc112x96": Template("arc112x96", (112, 96), "arc5", _ARC112 - [8.0, 0.0]),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise BadInputError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src→dst (Umeyama 1991); 2×3."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    var_s = (s**2).sum() / len(src)
    scale = (sig * np.diag(e)).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def dlib_chip_transform(src: np.ndarray, dst: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image→chip affine that dlib's ``get_face_chip`` applies, for landmarks ``src`` and template ``dst``.

    dlib fits the similarity chip→image (not image→chip: with noisy landmarks the two least-squares fits
    differ), turns it into a rectangle of side N·s (s = image pixels per chip pixel) centred on the image of
    the chip centre, and maps chip pixels 0..N−1 onto that rectangle's corners, which are N·s − 1 apart.
    """
    h, w = size
    t = similarity_transform(dst, src)  # chip -> image
    s = np.hypot(t[0, 0], t[1, 0])
    rot = t[:, :2] / s
    centre = t[:, :2] @ np.array([w / 2, h / 2]) + t[:, 2]
    k = np.array([(w * s - 1) / (w - 1), (h * s - 1) / (h - 1)])
    lin = rot * k[None, :]  # chip -> image, column j scaled by its own axis' k
    off = centre - lin @ np.array([(w - 1) / 2, (h - 1) / 2])
    return cv2.invertAffineTransform(np.hstack([lin, off[:, None]]))


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def warp(image: np.ndarray, m: np.ndarray, size: tuple[int, int], truncate: bool = False) -> np.ndarray:
    """Bilinear warp, black outside the image. ``truncate`` floors like dlib (which casts, not rounds)."""
    h, w = size
    if truncate:
        out = cv2.warpAffine(image.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return np.clip(np.floor(out + 1e-3), 0, 255).astype(np.uint8)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_with_points(image: np.ndarray, arc5: np.ndarray, dlib5: np.ndarray | None, template: str,
                      dlib68: np.ndarray | None = None):
    """Warp ``image`` to ``template`` from known landmarks; returns (chip, arc5 in chip pixels).

    ``dlib68`` (all 68 points of dlib's 68-point model): a dlib template is fitted on them, as dlib's
    ``get_face_chip`` does for that model, instead of on the 5-point model's ``dlib5``."""
    t = get_template(template)
    m = chip_transform(arc5, dlib5, template, dlib68)
    return warp(image, m, t.size, truncate=t.dlib_geometry), transform_points(m, arc5)


def chip_transform(arc5: np.ndarray, dlib5: np.ndarray | None, template: str,
                   dlib68: np.ndarray | None = None) -> np.ndarray:
    """The 2×3 image→chip affine ``align_with_points`` warps with."""
    t = get_template(template)
    src, dst = (dlib5, t.dst) if t.points == "dlib5" else (arc5, t.dst)
    if dlib68 is not None and t.dst68 is not None:
        src, dst = np.asarray(dlib68, np.float64)[DLIB68_FIT], t.dst68
    if src is None and t.dst_arc5 is not None:
        src, dst = arc5, t.dst_arc5
    if src is None:
        raise BadInputError(f"template {template} needs dlib's 5-point landmarks")
    return dlib_chip_transform(src, dst, t.size) if t.dlib_geometry else similarity_transform(src, dst)
