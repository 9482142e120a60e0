"""LFW View 2 (``pairs.txt``): the 10-fold verification protocol's pair list.

Format (http://vis-www.cs.umass.edu/lfw/README.txt): a header ``<folds> <n>``, then for every fold
``n`` matched lines ``name i j`` followed by ``n`` mismatched lines ``name1 i name2 j``. Fields are
separated by tabs (any whitespace is accepted); image numbers are 1-based and map to
``<name>/<name>_%04d.jpg``. A header with a single number (``pairsDevTest.txt``) is one fold.

``pairs.txt`` is treated as untrusted input: a name that could address a file outside the data root
(``..``, an absolute path, a symlink leading out) is refused instead of being followed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.errors import BadInputError, SchemaError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: LFW's 250×250 images are centred on the labelled person by construction, so a detected face farther than
#: this fraction of the side (50 px) from the centre is a bystander (``FaceAligner.max_centre_offset``). The
#: View-2 offsets of the faces taken have a gap there: all within 34 px but two bystanders at 99 and 108 px.
CENTRED_FACE = 0.2


@dataclass(frozen=True)
class Pair:
    """One verification pair; paths are relative to the data root, with ``/`` separators."""

    path1: str
    path2: str
    same: bool
    fold: int


def image_path(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def _check_name(name: str, where: str) -> str:
    # Person names are single folder names; anything that could be read as a path is refused here,
    # the resolved-path check below then catches symlinks.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise SchemaError(f"{where}: {name!r} is not a valid identity name")
    return name


def _check_number(field: str, where: str) -> int:
    try:
        number = int(field)
    except ValueError:
        raise SchemaError(f"{where}: image number {field!r} is not an integer") from None
    if number < 1 or number > 9999:
        raise SchemaError(f"{where}: image number {number} is outside 1..9999")
    return number


def _parse_header(line: str, where: str) -> tuple[int, int]:
    fields = line.split()
    try:
        values = [int(f) for f in fields]
    except ValueError:
        values = []
    if len(values) == 2 and all(v > 0 for v in values):
        return values[0], values[1]
    if len(values) == 1 and values[0] > 0:
        return 1, values[0]
    raise SchemaError(f"{where}: expected the header '<folds> <pairs per half-fold>', got {line.strip()!r}")


def _inside(root: Path, rel: str, where: str) -> None:
    # resolve() follows symlinks, so a person folder linking elsewhere is caught too
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise SchemaError(f"{where}: {rel} resolves outside the data root {root}")


def read_pairs(
    pairs_file: str | os.PathLike, data_root: str | os.PathLike, *, require_images: bool = True
) -> list[Pair]:
    """Parse ``pairs_file`` into pairs whose images live under ``data_root``.

    Malformed lines raise :class:`SchemaError` naming the line number. With ``require_images``
    (the default) every referenced image must exist, so a wrong ``data_root`` fails here, in one line,
    rather than halfway through an evaluation.
    """
    pairs_file = Path(pairs_file)
    root = Path(data_root)
    if not pairs_file.is_file():
        raise BadInputError(f"pairs file not found: {pairs_file}")
    if not root.is_dir():
        raise BadInputError(f"data root is not a folder: {root}")
    root = root.resolve()
    try:
        lines = pairs_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SchemaError(f"{pairs_file}: not a text file") from None
    # trailing blank lines are common in hand-edited copies; blank lines inside are errors
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SchemaError(f"{pairs_file}: empty file")

    n_folds, n = _parse_header(lines[0], f"{pairs_file}:1")
    expected = 1 + 2 * n * n_folds
    if len(lines) != expected:
        raise SchemaError(
            f"{pairs_file}: header says {n_folds} folds of 2x{n} pairs ({expected} lines), "
            f"the file has {len(lines)} lines"
        )

    pairs: list[Pair] = []
    for index, line in enumerate(lines[1:], start=2):
        where = f"{pairs_file}:{index}"
        position = index - 2
        fold, within = divmod(position, 2 * n)
        same = within < n
        fields = line.split()
        if same:
            if len(fields) != 3:
                raise SchemaError(f"{where}: a matched pair needs 'name i j', got {line.strip()!r}")
            name = _check_name(fields[0], where)
            p1 = image_path(name, _check_number(fields[1], where))
            p2 = image_path(name, _check_number(fields[2], where))
        else:
            if len(fields) != 4:
                raise SchemaError(f"{where}: a mismatched pair needs 'name1 i name2 j', got {line.strip()!r}")
            p1 = image_path(_check_name(fields[0], where), _check_number(fields[1], where))
            p2 = image_path(_check_name(fields[2], where), _check_number(fields[3], where))
        for rel in (p1, p2):
            _inside(root, rel, where)
            if require_images and not (root / rel).is_file():
                raise SchemaError(f"{where}: image {rel} is missing under {root}")
        pairs.append(Pair(p1, p2, same, fold))
    return pairs


def limit_pairs(pairs: list[Pair], n: int) -> list[Pair]:
    """A balanced subset of about ``n`` pairs that keeps the fold structure.

    Every fold contributes the same number of pairs, half matched and half mismatched, taken in file
    order, so ten-fold accuracy on the subset stays meaningful. ``n`` is rounded down to a multiple
    of ``2 * folds`` (20 for View 2); ``n`` at or above the list size returns all pairs.
    """
    folds = sorted({p.fold for p in pairs})
    step = 2 * len(folds)
    if n < step:
        raise BadInputError(f"--limit-pairs must be at least {step} ({len(folds)} folds x 1 matched + 1 mismatched "
                            f"pair), got {n}")
    if n >= len(pairs):
        return list(pairs)
    per_class = n // step
    for fold in folds:
        for same in (True, False):
            have = sum(1 for p in pairs if p.fold == fold and p.same == same)
            if have < per_class:
                kind = "matched" if same else "mismatched"
                raise BadInputError(f"fold {fold} has only {have} {kind} pairs, {per_class} needed for --limit {n}")
    taken: dict[tuple[int, bool], int] = {}
    subset = []
    for p in pairs:
        key = (p.fold, p.same)
        if taken.get(key, 0) < per_class:
            taken[key] = taken.get(key, 0) + 1
            subset.append(p)
    return subset


def pair_identities(pairs: list[Pair]) -> set[str]:
    """Names of every identity that appears in at least one pair."""
    return {path.split("/", 1)[0] for p in pairs for path in (p.path1, p.path2)}


def identities_outside_pairs(data_root: str | os.PathLike, pairs: list[Pair]) -> dict[str, list[str]]:
    """Identity folders under ``data_root`` that no pair mentions, with their images.

    These people are disjoint from the whole View 2 test protocol, so they can train models that are
    then evaluated on ``pairs.txt`` without identity leakage. Returns ``{name: [relative image paths]}``
    sorted by name and path; identities without images are left out.
    """
    root = Path(data_root)
    if not root.is_dir():
        raise BadInputError(f"data root is not a folder: {root}")
    root = root.resolve()
    used = pair_identities(pairs)
    outside: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name in used or not entry.is_dir():
            continue
        if not Path(entry.path).resolve().is_relative_to(root):
            continue  # a symlinked folder leading out of the data root is not part of the data set
        images = sorted(
            f"{entry.name}/{f.name}"
            for f in os.scandir(entry.path)
            if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)
        )
        if images:
            outside[entry.name] = images
    return outside


def write_training_identities(data_root: str | os.PathLike, out: str | os.PathLike) -> dict[str, list[str]]:
    """Write the identities that appear in no pair of ``DATA_ROOT/pairs.txt`` (PDSN's training identities), one
    per line, to ``out``; return them with their images."""
    check_writable(out)
    ids = identities_outside_pairs(data_root, read_pairs(Path(data_root) / "pairs.txt", data_root))
    with atomic_output(out) as tmp:
        tmp.write_text("".join(f"{n}\n" for n in sorted(ids)), encoding="utf-8")
    return ids
