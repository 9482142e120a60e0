"""Batched face ingestion that keeps the pixels on one device: files → photos → faces → landmarks → chips.

``FaceAligner`` + ``templates.align_with_points`` align one photo at a time on the CPU; this module runs the same
steps on a batch of photos on any torch device, so that on a GPU the chips go straight into the trunk without
a trip through host memory. On the CPU it gives the CPU path's chips (same faces, same landmarks; a chip pixel
may differ by one grey level where the warp's float rounding falls differently) and is mostly a way to test it.

Stages (``BatchAligner.align_files``):

1. **Read** (host): each file's bytes, and a look at its header with Pillow (no pixel decoded) to decide whether
   the device may decode it: a baseline-decodable JPEG (RGB or grey, EXIF orientation absent or 1, ending with
   the EOI marker, within ``read_image``'s size limits). Everything else (PNG and other formats, EXIF-rotated
   or CMYK JPEGs, truncated, empty or non-image files) goes to ``faces.read_image`` on the host, which decodes
   it exactly as the CPU path does or gives the reason it is unreadable. ``decode_jpeg`` can apply EXIF
   orientation only on the CPU, hence the rotated ones go the host way on every device.
2. **Decode** (device): ``torchvision.io.decode_jpeg`` on the list of byte tensors, batched (nvJPEG on CUDA).
   On the CPU it is libjpeg-turbo with Pillow's settings: the pixels equal ``read_image``'s. nvJPEG is another
   decoder whose pixels may differ slightly (not measured yet: ``benchmarks/gpu_ingest.py --check`` does), so on
   a GPU a borderline face may be found differently.
   A batch with a bad JPEG fails as a whole: it is retried one file at a time, and a file the device cannot
   decode goes to ``read_image``.
3. **Detect** (device): dlib's CNN detector as ``FaceAligner(face_detector="cnn")`` runs it: photos whose
   longer side is above ``CNN_MAX_SIDE`` are searched on a copy downscaled by ``aligner.downscaled`` (on the
   host: cv2's INTER_AREA has no exact torch twin; rare in face datasets), and the same-size photos go through
   ``MMODFaceDetector.detect_tensor`` together, which upsamples them once on the device with
   ``mmod_detector.pyramid_up_tensor`` (bit for bit the numpy ``pyramid_up``, which costs ~25 ms a photo on a
   host core, more than the network on a GPU; on the CPU device the numpy one runs, being twice as fast as the
   port there). The face is picked by ``aligner.choose_face``, ``FaceAligner.detect``'s rule (nearest the
   centre or largest, ``max_centre_offset``); without a face the photo gets ``aligner.centred_points``.
4. **Landmarks** (device): dlib's 68-point cascade (``TorchShapePredictor.parts_on``) reads the photos where
   they lie; the arc5 points come from the 68 (``arc5_from_68``) and the 5-point model runs only when the
   template is fitted on it. Landmarks are dlib's integer parts, as the aligner's.
5. **Warp** (device): ``templates.chip_transform`` gives each face's 2×3 matrix (host, tiny);
   ``affine_grid``/``grid_sample`` (bilinear, zeros outside, pixel centres at integer coordinates) reproduce
   ``cv2.warpAffine`` (OpenCV 5 samples at float coordinates too), rounded to the nearest level, or floored
   as ``templates.warp(truncate=True)`` for dlib templates.

Photos of different sizes are **grouped by size** (never padded): padding would move the detector's image
pyramid and the "nearest the centre" rule, so a padded photo would no longer give the CPU path's faces.
Chips come out as one **N×H×W×3 uint8** tensor on the device (channels last: what ``accel.FastForward`` takes),
one row per input in input order; an unreadable input's row is zeros and its landmarks NaN.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pdsn_cli.align.aligner import CNN_MAX_SIDE, arc5_from_68, centred_points, check_pick, choose_face, downscaled
from pdsn_cli.align.mmod_detector import MMODFaceDetector
from pdsn_cli.align.shape_predictor import TorchShapePredictor, shipped_predictor_file
from pdsn_cli.align.templates import chip_transform, get_template, transform_points
from pdsn_cli.data.faces import MAX_PIXELS, MIN_SIDE, BadImage, decode_bytes, max_decode_bytes, read_image
from pdsn_cli.errors import BadInputError

DETECTED, FALLBACK, UNREADABLE = "detected", "fallback", "unreadable"


@dataclass
class AlignedBatch:
    """One row per input, in input order."""

    chips: torch.Tensor  # N×H×W×3 uint8 on the aligner's device (zeros where unreadable)
    landmarks: np.ndarray  # N×5×2 float32: arc5 (eyes, nose tip, mouth corners) in chip pixels; NaN if unreadable
    status: list[str]  # DETECTED / FALLBACK / UNREADABLE
    reasons: list[str | None] = field(default_factory=list)  # why an input is unreadable (read_image's words)
    faces: list[int] = field(default_factory=list)  # faces the detector saw (0 for a fallback)

    @property
    def ok(self) -> np.ndarray:
        """Rows holding a chip (detected or fallback)."""
        return np.array([s != UNREADABLE for s in self.status], bool)


# -- stage 1-2: bytes and decoding ----------------------------------------------------------------------------


def _device_decodable(data: bytes) -> bool:
    """Whether ``decode_jpeg`` decodes it as ``read_image`` would (else the host decodes it, or says why not)."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return False  # not a JPEG, or truncated: read_image's strict decoder names the problem
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):  # CMYK/YCCK: Pillow converts them its way
                    return False
                if w * h > MAX_PIXELS or min(w, h) < MIN_SIDE or decode_bytes(im.mode, w, h) > max_decode_bytes():
                    return False
                try:
                    orientation = im.getexif().get(0x0112, 1)
                except Exception:  # a damaged EXIF block: read_image ignores it too, but let it decide
                    return False
                return orientation not in (2, 3, 4, 5, 6, 7, 8)
    except Exception:
        return False


def _read(path) -> tuple[bytes | None, bool]:
    """(bytes, device-decodable); bytes None when the file cannot even be read (read_image will say why)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None, False
    return data, _device_decodable(data)


def _decode_on(device: torch.device, blobs: list[bytes]) -> list[torch.Tensor | None]:
    """H×W×3 uint8 tensors on ``device``; None where the device's decoder refused a file."""
    if not blobs:
        return []
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for its decoders
        try:
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            out = []
            for t in tensors:  # one bad file fails the whole batch: find it
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
    return [None if o is None else o.permute(1, 2, 0) for o in out]


# -- stage 3: detection -------------------------------------------------------------------------------------


# -- stage 5: the warp --------------------------------------------------------------------------------------


def _grid_theta(m: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """``affine_grid``'s θ (align_corners=True) for the image→chip affine ``m``: chip pixel → image pixel, with
    both ends in grid_sample's normalised coordinates (−1 and 1 are the centres of the first and last pixels)."""
    (sh, sw), (dh, dw) = src_hw, dst_hw
    inv = np.vstack([cv2.invertAffineTransform(m), [0, 0, 1]])  # chip → image, as warpAffine inverts it
    from_norm = np.array([[(dw - 1) / 2, 0, (dw - 1) / 2], [0, (dh - 1) / 2, (dh - 1) / 2], [0, 0, 1]])
    to_norm = np.array([[2 / max(sw - 1, 1), 0, -1], [0, 2 / max(sh - 1, 1), -1], [0, 0, 1]])
    return (to_norm @ inv @ from_norm)[:2]


def warp_batch(images: torch.Tensor, matrices: np.ndarray, size: tuple[int, int], truncate: bool) -> torch.Tensor:
    """``templates.warp`` for N same-size N×H×W×3 uint8 images and N image→chip 2×3 matrices: N×h×w×3 uint8."""
    n, h, w, _ = images.shape
    theta = np.stack([_grid_theta(m, (h, w), size) for m in matrices])
    # the grid is formed in float64 and rounded once to grid_sample's float32 (~1e-5 px on a 250 px photo)
    theta_t = torch.from_numpy(theta).to(images.device)
    grid = F.affine_grid(theta_t, [n, 3, *size], align_corners=True)
    x = images.permute(0, 3, 1, 2).float()
    out = F.grid_sample(x, grid.float(), mode="bilinear", padding_mode="zeros", align_corners=True)
    # dlib's chips are cast, not rounded (templates.warp(truncate=True)); cv2's uint8 path rounds
    out = torch.floor(out + 1e-3) if truncate else torch.round(out)
    return out.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# -- the aligner ----------------------------------------------------------------------------------------------


class BatchAligner:
    """``FaceAligner(face_detector="cnn")`` + ``align_with_points`` for batches of photos, on ``device``.

    ``template``, ``landmarks`` (5: dlib templates fitted on the 5-point model; 68: on the 68-point one, as
    ``ChipCache(landmarks=68)``), ``max_centre_offset`` and ``pick`` mean what they mean for the chip cache and
    ``FaceAligner``. ``batch_size``: photos per detector forward pass. ``io_workers``: threads reading files.
    Memory grows with the number of photos in one call: call it on chunks (a few hundred photos).
    """

    def __init__(self, device: str | torch.device = "cpu", template: str = "dlib150", landmarks: int = 5,
                 max_centre_offset: float | None = None, pick: str = "centre", batch_size: int | None = None,
                 io_workers: int = 4):
        if landmarks not in (5, 68):
            raise BadInputError(f"landmarks must be 5 or 68, got {landmarks}")
        self.device = torch.device(device)
        self.template = get_template(template)
        self.landmarks = landmarks
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 8)
        self.io_workers = io_workers
        self.max_centre_offset, self.pick = max_centre_offset, check_pick(pick)
        self.detector = MMODFaceDetector.from_file(None, self.device)
        self.sp68 = TorchShapePredictor.from_file(shipped_predictor_file(68), self.device)
        # the 5-point model matters only for a dlib template fitted on it
        self.fit68 = landmarks == 68 and self.template.dst68 is not None
        self.sp5 = (TorchShapePredictor.from_file(shipped_predictor_file(5), self.device)
                    if self.template.points == "dlib5" and not self.fit68 else None)

    # -- public API -------------------------------------------------------------------------------------

    def align_files(self, paths: Sequence[str | os.PathLike]) -> AlignedBatch:
        """Chips of the photos in ``paths`` (see the module docstring for what runs where)."""
        paths = [Path(os.fsdecode(p)) for p in paths]
        with ThreadPoolExecutor(max(1, self.io_workers)) as pool:
            read = list(pool.map(_read, paths))
        images: list[torch.Tensor | None] = [None] * len(paths)
        reasons: list[str | None] = [None] * len(paths)
        on_device = [i for i, (_, ok) in enumerate(read) if ok]
        for i, img in zip(on_device, _decode_on(self.device, [read[i][0] for i in on_device])):
            images[i] = img
        for i in range(len(paths)):
            if images[i] is None:
                try:
                    images[i] = _on(self.device, read_image(paths[i]))
                except BadImage as e:
                    reasons[i] = str(e)
        out = self.align_tensors(images)
        out.reasons = reasons
        return out

    def align_tensors(self, images: Sequence[torch.Tensor | np.ndarray | None]) -> AlignedBatch:
        """Chips of decoded RGB photos (H×W×3 uint8, tensors on any device or arrays; None: unreadable)."""
        n = len(images)
        imgs = [None if im is None else _on(self.device, im) for im in images]
        h, w = self.template.size
        chips = torch.zeros((n, h, w, 3), dtype=torch.uint8, device=self.device)
        landmarks = np.full((n, 5, 2), np.nan, np.float32)
        status, faces = [UNREADABLE] * n, [0] * n
        rects = self._detect(imgs)
        points = self._points(imgs, rects)
        for group in _by_size(imgs).values():
            mats = []
            for i in group:
                (arc5, dlib5, dlib68), found = points[i], rects[i]
                m = chip_transform(arc5, dlib5, self.template.name, dlib68 if self.landmarks == 68 else None)
                mats.append(m)
                landmarks[i] = transform_points(m, arc5)
                status[i] = DETECTED if found[0] is not None else FALLBACK
                faces[i] = found[1]
            batch = torch.stack([imgs[i] for i in group])
            chips[group] = warp_batch(batch, np.stack(mats), self.template.size, self.template.dlib_geometry)
        return AlignedBatch(chips, landmarks, status, [None] * n, faces)

    # -- the stages -------------------------------------------------------------------------------------

    def _detect(self, imgs: list) -> list[tuple[tuple | None, int]]:
        """Per photo: (the chosen rectangle or None, faces seen), as ``FaceAligner.detect`` with the CNN."""
        searched, scale = {}, {}
        for i, im in enumerate(imgs):
            if im is None:
                continue
            if max(im.shape[:2]) > CNN_MAX_SIDE:
                small, s = downscaled(im.cpu().numpy(), CNN_MAX_SIDE)
                searched[i], scale[i] = torch.from_numpy(small).to(self.device), s
            else:
                searched[i], scale[i] = im, 1.0
        found: dict[int, list] = {}
        for group in _by_size(searched).values():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                boxes = self.detector.detect_tensor(torch.stack([searched[i] for i in chunk]), upsample=1)
                for i, b in zip(chunk, boxes):
                    r = [d[:4] for d in b]
                    # mapped back as FaceAligner._on_copy does
                    found[i] = r if scale[i] == 1.0 else [tuple(round(v / scale[i]) for v in d) for d in r]
        out: list[tuple[tuple | None, int]] = [(None, 0)] * len(imgs)
        for i, r in found.items():
            rect, seen = choose_face(r, *imgs[i].shape[:2], self.max_centre_offset, self.pick)
            if rect is not None:  # a fallback counts no faces, as FaceAligner.detect has it
                out[i] = rect, seen
        return out

    def _points(self, imgs: list, rects: list) -> list:
        """Per photo: (arc5, dlib5 or None, dlib68 or None) in image pixels; the centred fallback without a face."""
        out: list = [None] * len(imgs)
        for i, im in enumerate(imgs):
            if im is not None and rects[i][0] is None:
                out[i] = (*centred_points(*im.shape[:2]), None)
        detected = {i: im for i, im in enumerate(imgs) if im is not None and rects[i][0] is not None}
        for group in _by_size(detected).values():
            batch = torch.stack([imgs[i] for i in group])
            index = np.arange(len(group))
            boxes = np.array([rects[i][0] for i in group], np.int64)
            # float64, as FaceAligner.landmarks gives dlib's integer parts
            p68 = self.sp68.parts_on(batch, index, boxes).astype(np.float64)
            p5 = (self.sp5.parts_on(batch, index, boxes).astype(np.float64) if self.sp5 is not None
                  else [None] * len(group))
            for k, i in enumerate(group):
                out[i] = (arc5_from_68(p68[k]), p5[k], p68[k])
        return out


def _on(device: torch.device, image) -> torch.Tensor:
    """An H×W×3 uint8 image as a tensor on ``device`` (read_image's arrays are read-only: torch wants a copy)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image if image.flags.writeable else image.copy())
    return image.to(device)


def _by_size(images) -> dict[tuple[int, int], list[int]]:
    """Indices of the photos of each size (a list with None holes, or a dict index → image)."""
    items = images.items() if isinstance(images, dict) else enumerate(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in items:
        if im is not None:
            groups.setdefault(tuple(im.shape[:2]), []).append(i)
    return groups


__all__ = ["DETECTED", "FALLBACK", "UNREADABLE", "AlignedBatch", "BatchAligner", "warp_batch"]
