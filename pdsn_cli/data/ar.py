"""The AR face database (Martínez & Benavente, CVC Technical Report #24, 1998) as users have it on disk, and
the two occlusion protocols of ``pdsn benchmark --dataset ar --protocol 1|2``.

The database is not redistributable: users bring their own copy. Two layouts are in circulation, and both are
found by file name anywhere under the data root (sub-folders, upper or lower case):

- the original release: one header-less ``.raw`` file per image, ``m-001-01.raw`` (men) / ``w-001-01.raw``
  (women), 768×576 pixels, 24-bit colour stored as three whole planes (all R, then all G, then all B, each 576
  rows of 768 bytes) = 1,327,104 bytes. Copies converted to ``.bmp`` / ``.png`` / ``.jpg`` / ``.ppm`` keep the
  names. The official page writes the names ``M-xx-yy.raw`` / ``F-xx-yy.raw``; ``f`` is read as ``w``.
- the cropped, aligned subset of Martínez & Kak (PCA versus LDA, PAMI 2001): 50 men and 50 women, 165×120
  pixels, ``M-001-01.bmp`` … ``W-050-26.bmp``.

Image numbers 1–13 are the first session, 14–26 the same conditions two weeks later (``CONDITIONS``): 1 neutral,
2 smile, 3 anger, 4 scream, 5 left light, 6 right light, 7 both lights, 8 sunglasses, 9 sunglasses + left light,
10 sunglasses + right light, 11 scarf, 12 scarf + left light, 13 scarf + right light.

Protocols (``PROTOCOLS``; identification, rank-1 per probe kind): both use every sunglasses image (8, 9, 10, 21,
22, 23) and every scarf image (11, 12, 13, 24, 25, 26) as probes. Protocol 1 enrols several unoccluded images per
subject (1–4 and 14–17: neutral and the three expressions under frontal light, both sessions); protocol 2 enrols
a single one (image 1, neutral, session 1).

Where this comes from: the numbering (1 = several gallery images per subject, 2 = one) and the shared
"all sunglasses" / "all scarf" probe sets follow the AR evaluation script of FROM (Qiu, Gong, Li et al., TPAMI
2021, github.com/haibo-qiu/FROM ``lib/core/ar_dataset.py``), by co-authors of PDSN: ``--protocol 1`` reads a
``gallery`` folder of several images per subject, ``--protocol 2`` a ``gallery_single`` one, and both read
``prob_glass_all`` / ``prob_scarf_all``. Which images its galleries held is not in that code; protocol 1's
gallery here is the unoccluded-expression set of Wright et al.'s SRC AR disguise experiment (PAMI 2009), whose
sunglasses / scarf results PDSN compares against. ``RAW`` layout: two independent public readers agree
(L. van der Maaten's ``readraw.m``, 2009, and a Python ``ar_img_read``: both reshape the file as 3×576×768).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdsn_cli.data.faces import (
    RAW_BYTES, RAW_HEIGHT, RAW_WIDTH, FaceItem, Skipped, printable, read_image, read_raw,
)
from pdsn_cli.errors import BadInputError

__all__ = [
    "ArImage", "ArScan", "ArProtocol", "ProtocolSpec", "PROTOCOLS", "CONDITIONS", "KINDS", "AR_EXTENSIONS",
    "RAW_WIDTH", "RAW_HEIGHT", "RAW_BYTES", "parse_name", "image_kind", "scan", "read_raw", "read_ar_image",
    "protocol", "ar_items",
]

#: what each image number means (1–13; 14–26 repeat them in the second session)
CONDITIONS = {
    1: "neutral", 2: "smile", 3: "anger", 4: "scream", 5: "left light", 6: "right light", 7: "both lights",
    8: "sunglasses", 9: "sunglasses + left light", 10: "sunglasses + right light",
    11: "scarf", 12: "scarf + left light", 13: "scarf + right light",
}
KINDS = ("neutral", "expression", "light", "sunglasses", "scarf")
OCCLUSION_KINDS = ("sunglasses", "scarf")

#: file name endings read as AR images; the first listed wins when one image is stored in several formats
AR_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".jpg", ".jpeg", ".raw")
_EXT_RANK = {e: i for i, e in enumerate(AR_EXTENSIONS)}

# sex, person, image: m-001-01 / W-050-26 / M-01-1 (some copies drop the zero padding); '-' or '_' between
_NAME = re.compile(r"^([mwf])[-_](\d{1,3})[-_](\d{1,2})(\.[a-z]+)$", re.IGNORECASE)
# the original CDs' compressed frames (Unix ``compress``): recognised, not decoded
_COMPRESSED = re.compile(r"^([mwf])[-_](\d{1,3})[-_](\d{1,2})\.raw\.z$", re.IGNORECASE)

EXPECTED_NAMING = ("files named like m-001-01.raw or W-050-26.bmp (m/w, person number, image 01-26; "
                   + " ".join(AR_EXTENSIONS) + ") in any sub-folder")


def image_kind(index: int) -> str:
    """``neutral`` / ``expression`` / ``light`` / ``sunglasses`` / ``scarf`` for image number 1–26."""
    if not 1 <= index <= 26:
        raise BadInputError(f"AR image numbers run from 1 to 26, got {index}")
    i = (index - 1) % 13 + 1
    if i == 1:
        return "neutral"
    if i <= 4:
        return "expression"
    if i <= 7:
        return "light"
    return "sunglasses" if i <= 10 else "scarf"


@dataclass(frozen=True)
class ArImage:
    path: str  # relative to the data root, '/'-separated, printable (as FaceItem.path)
    sex: str  # 'm' | 'w'
    person: int
    index: int  # 1..26
    session: int  # 1 | 2
    kind: str  # one of KINDS
    subject: str  # 'm-001'
    #: the relative path on disk when it differs from ``path`` (a non-UTF-8 folder name)
    file: str | None = None

    @property
    def condition(self) -> str:
        return CONDITIONS[(self.index - 1) % 13 + 1]

    @property
    def disk_path(self) -> str:
        return self.file or self.path


def parse_name(name: str) -> tuple[str, int, int] | None:
    """``(sex, person, index)`` of an AR file name (``M-001-08.bmp`` → ``('m', 1, 8)``), or None."""
    m = _NAME.match(name)
    if m is None or m.group(4).lower() not in _EXT_RANK:
        return None
    sex, person, index = m.group(1).lower(), int(m.group(2)), int(m.group(3))
    if person < 1 or not 1 <= index <= 26:
        return None
    return ("w" if sex == "f" else sex), person, index


@dataclass(frozen=True)
class Duplicate:
    kept: str
    dropped: str

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped}


class ArScan(list):
    """The AR images under a root (a ``list[ArImage]``, sorted by subject then image number), with what was
    left aside: files whose names are not AR names, and second copies of an image already found."""

    def __init__(self, root: Path, images=(), ignored: int = 0, ignored_examples=(), duplicates=(),
                 compressed=(), skipped=()):
        super().__init__(images)
        self.root = Path(root)
        self.ignored = ignored
        self.ignored_examples: list[str] = list(ignored_examples)
        self.duplicates: list[Duplicate] = list(duplicates)
        self.compressed: list[str] = list(compressed)
        #: AR-named entries that are not regular files (broken links, FIFOs) and folders that could not be read
        self.skipped: list[Skipped] = list(skipped)

    def subjects(self) -> list[str]:
        return sorted({im.subject for im in self})

    def summary(self) -> dict:
        kinds = {k: sum(im.kind == k for im in self) for k in KINDS}
        formats: dict[str, int] = {}
        for im in self:
            ext = os.path.splitext(im.path)[1].lower()
            formats[ext] = formats.get(ext, 0) + 1
        subjects = self.subjects()
        return {
            "root": str(self.root),
            "images": len(self),
            "subjects": len(subjects),
            "men": sum(s.startswith("m") for s in subjects),
            "women": sum(s.startswith("w") for s in subjects),
            "sessions": {1: sum(im.session == 1 for im in self), 2: sum(im.session == 2 for im in self)},
            "kinds": kinds,
            "formats": dict(sorted(formats.items())),
            "ignored_files": self.ignored,
            "ignored_examples": self.ignored_examples,
            "duplicates": [d.as_dict() for d in self.duplicates],
            "compressed_files": len(self.compressed),
            "skipped": [sk.as_dict() for sk in self.skipped],
        }


def _rel(parts: list[str], name: str) -> tuple[str, str | None]:
    disk = "/".join(parts + [name])
    shown = printable(disk)
    return shown, (None if shown == disk else disk)


def _preference(path: str) -> tuple:
    # lossless formats before JPEG before .raw, then the shallowest path, then plain string order
    return (_EXT_RANK[os.path.splitext(path)[1].lower()], path.count("/"), path)


def scan(root: str | os.PathLike) -> ArScan:
    """Every AR image under ``root`` (recursively; symlinked folders are not followed).

    Files whose names are not AR names are counted (``ignored``); an image stored twice (``m-001-01.bmp`` and
    ``m-001-01.png``, or in two folders) is kept once (lossless format first, then the shallowest path, then
    the path's sort order) and the other copies are reported in ``duplicates``. AR-named entries that are not
    regular files (broken links, FIFOs) and folders that cannot be listed are reported in ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"AR data folder not found: {root}")
    found: dict[tuple[str, int], list[ArImage]] = {}
    ignored, examples, compressed, skipped = 0, [], [], []

    def onerror(e: OSError) -> None:
        where = printable(os.path.relpath(e.filename, root)) if e.filename else str(root)
        skipped.append(Skipped(where + "/", f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        for name in sorted(filenames):
            shown, disk = _rel(parts, name)
            parsed = parse_name(name)
            if parsed is None:
                if _COMPRESSED.match(name):
                    compressed.append(shown)
                else:
                    ignored += 1
                    if len(examples) < 5:
                        examples.append(shown)
                continue
            if not os.path.isfile(os.path.join(dirpath, name)):  # follows links; a FIFO would block a reader
                skipped.append(Skipped(shown, "not a regular file (a broken link, FIFO or device)"))
                continue
            sex, person, index = parsed
            subject = f"{sex}-{person:03d}"
            im = ArImage(shown, sex, person, index, 1 if index <= 13 else 2, image_kind(index), subject, disk)
            found.setdefault((subject, index), []).append(im)
    images, duplicates = [], []
    for key in sorted(found):
        copies = sorted(found[key], key=lambda im: _preference(im.path))
        images.append(copies[0])
        duplicates += [Duplicate(copies[0].path, c.path) for c in copies[1:]]
    if not images:
        msg = f"no AR face database images under {root}: expected {EXPECTED_NAMING}"
        if ignored:
            msg += f"; found {ignored} other file{'s' if ignored != 1 else ''}" + (
                f" (e.g. {examples[0]})" if examples else "")
        if compressed:
            msg += (f"; {len(compressed)} compressed .raw.Z file{'s' if len(compressed) != 1 else ''}: "
                    "uncompress them first (gzip -d or uncompress)")
        if skipped:
            msg += f"; skipped {skipped[0].path} ({skipped[0].reason})"
        raise BadInputError(msg)
    return ArScan(root, images, ignored, examples, duplicates, compressed, skipped)


# ---- reading -------------------------------------------------------------------------------------------------
def read_ar_image(root: str | os.PathLike, rel: str | ArImage) -> np.ndarray:
    """RGB uint8 H×W×3 of an AR image (``rel``: a path from ``scan`` or the ArImage itself); BadImage if it
    cannot be decoded."""
    if isinstance(rel, ArImage):
        rel = rel.disk_path
    path = Path(root) / rel
    if path.suffix.lower() == ".raw":
        return read_raw(path)
    return read_image(path)


# ---- protocols -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProtocolSpec:
    number: int
    gallery: tuple[int, ...]  # image numbers enrolled per subject
    probes: dict  # kind → image numbers
    summary: str


_SUNGLASSES = (8, 9, 10, 21, 22, 23)
_SCARF = (11, 12, 13, 24, 25, 26)

PROTOCOLS: dict[int, ProtocolSpec] = {
    1: ProtocolSpec(1, (1, 2, 3, 4, 14, 15, 16, 17), {"sunglasses": _SUNGLASSES, "scarf": _SCARF},
                    "several gallery images per subject: the unoccluded frontal-light ones (neutral, smile, anger, "
                    "scream) of both sessions"),
    2: ProtocolSpec(2, (1,), {"sunglasses": _SUNGLASSES, "scarf": _SCARF},
                    "a single gallery image per subject: the neutral one of session 1"),
}


def _nums(xs) -> str:
    return ",".join(f"{x:02d}" for x in xs)


@dataclass
class ArProtocol:
    number: int
    gallery: list[ArImage]
    probes: dict[str, list[ArImage]]
    description: str
    #: subjects found in the scan with none of the protocol's gallery images (all their probes are dropped)
    dropped_subjects: list[str] = field(default_factory=list)
    #: probe images dropped because their subject is not in the gallery
    dropped_probes: list[str] = field(default_factory=list)
    #: subjects enrolled with only some of the protocol's gallery images → how many they have
    incomplete_gallery: dict[str, int] = field(default_factory=dict)

    def subjects(self) -> list[str]:
        return sorted({im.subject for im in self.gallery})

    def summary(self) -> dict:
        return {
            "protocol": self.number,
            "description": self.description,
            "subjects": len(self.subjects()),
            "gallery_images": len(self.gallery),
            "probes": {k: len(v) for k, v in self.probes.items()},
            "dropped_subjects": list(self.dropped_subjects),
            "dropped_probes": len(self.dropped_probes),
            "incomplete_gallery": dict(self.incomplete_gallery),
        }


def protocol(images: list[ArImage], n: int | str) -> ArProtocol:
    """Split scanned AR images into protocol ``n``'s gallery and probes (per occlusion kind).

    A subject with none of the gallery images is dropped (and counted); so are the probes of subjects not in
    the gallery. Images that are neither gallery nor probe in this protocol are not used.
    """
    try:
        spec = PROTOCOLS[int(n)]
    except (KeyError, ValueError, TypeError):
        choices = "; ".join(f"{k} ({s.summary})" for k, s in PROTOCOLS.items())
        raise BadInputError(f"unknown AR protocol {n!r}: choose {choices}") from None
    gallery_set = set(spec.gallery)
    gallery = [im for im in images if im.index in gallery_set]
    enrolled = {im.subject for im in gallery}
    every = sorted({im.subject for im in images})
    dropped_subjects = [s for s in every if s not in enrolled]
    if not gallery:
        raise BadInputError(
            f"AR protocol {spec.number} enrols image {_nums(spec.gallery)} of each subject, and none of the "
            f"{len(every)} subject(s) found has {'it' if len(spec.gallery) == 1 else 'any of them'}")
    have: dict[str, int] = {}
    for im in gallery:
        have[im.subject] = have.get(im.subject, 0) + 1
    incomplete = {s: k for s, k in sorted(have.items()) if k < len(spec.gallery)}
    probes: dict[str, list[ArImage]] = {}
    dropped_probes: list[str] = []
    for kind, nums in spec.probes.items():
        wanted = set(nums)
        probes[kind] = []
        for im in images:
            if im.index not in wanted:
                continue
            if im.subject in enrolled:
                probes[kind].append(im)
            else:
                dropped_probes.append(im.path)
    if not any(probes.values()):
        raise BadInputError(
            f"AR protocol {spec.number}: no probe image (sunglasses {_nums(spec.probes['sunglasses'])}, scarf "
            f"{_nums(spec.probes['scarf'])}) of an enrolled subject was found")
    probe_text = "; ".join(f"{k} {_nums(v)}" for k, v in spec.probes.items())
    description = (
        f"AR protocol {spec.number}: {spec.summary}. Gallery: image {_nums(spec.gallery)} of each subject "
        f"({len(enrolled)} subjects, {len(gallery)} images). Probes: {probe_text} "
        f"({', '.join(f'{len(v)} {k}' for k, v in probes.items())}). Rank-1 identification per probe kind."
    )
    return ArProtocol(spec.number, gallery, probes, description, dropped_subjects, dropped_probes, incomplete)


def ar_items(p: ArProtocol) -> list[FaceItem]:
    """The protocol's images (gallery first, then the probes of each kind) as FaceItems with identity = subject,
    ready for ``ChipCache(root, template).ensure_and_load``; ``Chips.source`` then holds each ``ArImage.path``."""
    out: list[FaceItem] = []
    seen: set[str] = set()
    for im in p.gallery + [im for kind in p.probes for im in p.probes[kind]]:
        if im.path not in seen:
            seen.add(im.path)
            out.append(FaceItem(im.path, im.subject, im.file))
    return out
