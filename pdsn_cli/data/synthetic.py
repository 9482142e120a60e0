"""Procedural synthetic face identities: the toolkit's default dataset, so every command runs with no data.

Each identity is a fixed set of drawing parameters (face shape, skin tone, hair, eyes, brows, nose, mouth,
facial hair, moles); each image of it varies pose, expression, lighting, background and camera noise, and
comes out as an unaligned 250×250 "photo" with the face in the middle, like LFW. The faces are cartoonish on
purpose and every name says so (``synthetic_0000``, ``synthetic://synthetic_0000/3``).

The face is drawn in *canonical units* (1 unit = the nominal inter-ocular distance, origin at the midpoint
between the eyes, y pointing down) and mapped to pixels by one similarity transform per image. Head yaw moves
each feature by its depth on a rounded face (x·cos φ + z·sin φ), so the nose shifts more than the eyes and
the landmarks stay exact. Everything is drawn with anti-aliased ``cv2.fillPoly`` at sub-pixel precision.

Every image is reproducible on its own: identity ``i`` draws from ``default_rng([seed, i, 0])`` and its image
``k`` from ``default_rng([seed, i, 1, k])``, so random access gives the same pixels as iteration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pdsn_cli.data.synthetic_render import Identity, render_face
from pdsn_cli.errors import BadInputError

__all__ = ["SyntheticFace", "SyntheticFaces", "synthetic_faces", "identity_name"]


def identity_name(i: int) -> str:
    return f"synthetic_{i:04d}"


@dataclass
class SyntheticFace:
    """One synthetic photo. ``landmarks``: left eye centre, right eye centre, nose tip, left and right mouth
    corners (image-left first). ``dlib5``: dlib's 5-point order, i.e. image-right eye outer and inner
    corners, image-left eye outer and inner corners, nose base."""

    image: np.ndarray
    landmarks: np.ndarray
    dlib5: np.ndarray
    identity: str
    source: str


# --------------------------------------------------------------------------------------------------------
# identities (the per-image parameters are drawn in synthetic_render.render_face)

_SKIN = np.array(  # RGB anchors from light to dark; identities interpolate between neighbours
    [[247, 214, 190], [236, 192, 160], [224, 172, 135], [198, 140, 100], [160, 105, 70], [115, 72, 48], [82, 52, 36]],
    np.float32,
)
_HAIR = np.array(
    [[20, 16, 14], [45, 30, 22], [85, 55, 35], [130, 90, 55], [190, 150, 90], [225, 195, 140], [150, 60, 30],
     [160, 160, 160], [220, 220, 215]],
    np.float32,
)
_HAIR_P = np.array([0.22, 0.2, 0.16, 0.1, 0.08, 0.05, 0.07, 0.08, 0.04])
_IRIS = np.array(
    [[70, 45, 25], [110, 70, 35], [60, 110, 160], [90, 130, 90], [120, 125, 130], [35, 25, 20]], np.float32
)

HAIR_STYLES = ("short", "long", "bald", "curly", "side", "bob", "buzz")

def sample_identity(rng: np.random.Generator) -> Identity:
    t = rng.uniform(0, len(_SKIN) - 1)
    lo = int(t)
    skin = _SKIN[lo] * (1 - (t - lo)) + _SKIN[min(lo + 1, len(_SKIN) - 1)] * (t - lo)
    skin = np.clip(skin * rng.uniform(0.94, 1.06, 3), 0, 255)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * rng.uniform(0.85, 1.15, 3)
    hair = np.clip(hair, 0, 255)
    style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    male = rng.random() < 0.5
    beard = int(rng.choice(3, p=[0.6, 0.2, 0.2])) if male else 0
    nose_len = rng.uniform(0.52, 0.72)
    mouth_gap = rng.uniform(0.38, 0.52)
    n_moles = rng.choice(3, p=[0.55, 0.3, 0.15])
    moles = np.stack(
        [rng.uniform(-0.75, 0.75, n_moles), rng.uniform(-0.3, 1.4, n_moles), rng.uniform(0.025, 0.05, n_moles)], 1
    ).astype(np.float32)
    brow = hair * 0.7 if hair.mean() < 140 else hair * 0.55
    return Identity(
        skin=skin,
        face_a=rng.uniform(0.92, 1.12),
        face_top=rng.uniform(1.25, 1.5),
        face_bot=rng.uniform(1.35, 1.6),
        face_cy=rng.uniform(0.22, 0.34),
        jaw=rng.uniform(0.15, 0.45),
        hair=hair,
        hair_style=style,
        hairline=rng.uniform(-0.95, -0.6),
        hair_volume=rng.uniform(0.08, 0.3),
        hair_part=rng.uniform(-0.5, 0.5),
        eye_sep=rng.uniform(0.9, 1.1),
        eye_w=rng.uniform(0.2, 0.26),
        eye_h=rng.uniform(0.075, 0.11),
        eye_tilt=rng.uniform(-0.03, 0.04),
        iris=np.clip(_IRIS[rng.integers(len(_IRIS))] * rng.uniform(0.8, 1.2, 3), 0, 255),
        brow_y=rng.uniform(-0.36, -0.26),
        brow_thick=rng.uniform(0.035, 0.08),
        brow_arch=rng.uniform(0.0, 0.09),
        brow_len=rng.uniform(0.26, 0.36),
        brow_color=np.clip(brow, 0, 255),
        nose_len=nose_len,
        nose_w=rng.uniform(0.14, 0.24),
        mouth_y=nose_len + mouth_gap,
        mouth_w=rng.uniform(0.7, 0.92),
        lip_upper=rng.uniform(0.03, 0.06),
        lip_lower=rng.uniform(0.045, 0.085),
        lip_color=np.clip(skin * np.array([0.85, 0.55, 0.55]) + np.array([25, 0, 5]) * rng.uniform(0.5, 1.5), 0, 255),
        beard=beard,
        moustache=bool(male and rng.random() < 0.25),
        moles=moles,
        ear_size=rng.uniform(0.85, 1.15),
        cheek=rng.uniform(0.0, 0.35),
    )


# --------------------------------------------------------------------------------------------------------
# the dataset


class SyntheticFaces:
    """``identities × images_per_identity`` synthetic photos, deterministic by ``seed``; indexable and iterable.

    Image ``i`` is image ``i % images_per_identity`` of identity ``i // images_per_identity``.
    """

    def __init__(self, identities: int = 40, images_per_identity: int = 10, seed: int = 0, size: int = 250):
        if identities < 1 or images_per_identity < 1:
            raise BadInputError(
                f"synthetic data needs at least 1 identity and 1 image each, got {identities}×{images_per_identity}"
            )
        if size < 32:
            raise BadInputError(f"synthetic image size must be at least 32 px, got {size}")
        self.identities = int(identities)
        self.images_per_identity = int(images_per_identity)
        self.seed = int(seed)
        self.size = int(size)
        self._ids: dict[int, Identity] = {}

    def __len__(self) -> int:
        return self.identities * self.images_per_identity

    def identity_names(self) -> list[str]:
        return [identity_name(i) for i in range(self.identities)]

    def _identity(self, i: int) -> Identity:
        idn = self._ids.get(i)
        if idn is None:
            idn = sample_identity(np.random.default_rng([self.seed, i, 0]))
            self._ids[i] = idn
        return idn

    def __getitem__(self, index: int) -> SyntheticFace:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        i, k = divmod(index, self.images_per_identity)
        img, lm, d5 = render_face(self._identity(i), np.random.default_rng([self.seed, i, 1, k]), self.size)
        name = identity_name(i)
        return SyntheticFace(image=img, landmarks=lm, dlib5=d5, identity=name, source=f"synthetic://{name}/{k}")

    def __iter__(self) -> Iterator[SyntheticFace]:
        for index in range(len(self)):
            yield self[index]


def synthetic_faces(
    identities: int = 40, images_per_identity: int = 10, seed: int = 0, size: int = 250
) -> SyntheticFaces:
    """The built-in synthetic dataset (see :class:`SyntheticFaces`)."""
    return SyntheticFaces(identities, images_per_identity, seed, size)
