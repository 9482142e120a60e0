"""Download LFW (images + View 2 ``pairs.txt``) from the official UMass site, resumably and safely.

Layout produced under ``dest``::

    dest/lfw/<Person>/<Person>_0001.jpg ...
    dest/lfw/pairs.txt
    dest/lfw/.pdsn-fetch.json     marker: written last, makes a second run a no-op

Downloads go to ``<file>.part`` and continue with an HTTP Range request after an interruption. A file
is only renamed to its final name once its md5 matches. The archive is extracted into a temporary
folder, every member checked first (no absolute paths, no ``..``, no links leading out, no devices),
and the finished tree is renamed into place in one step, so ``dest/lfw`` exists only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pdsn_cli.errors import BadInputError, JobFailed

# URLs and md5 sums of the original LFW files, as listed by torchvision.datasets.LFW
DEFAULT_URLS = {
    "pairs.txt": "http://vis-www.cs.umass.edu/lfw/pairs.txt",
    "lfw.tgz": "http://vis-www.cs.umass.edu/lfw/lfw.tgz",
}
DEFAULT_CHECKSUMS = {
    "pairs.txt": "9f1ba174e4e1c508ff7cdf10ac338a7d",
    "lfw.tgz": "a17d05bd522c52d84eca14327a23d494",
}

MARKER = ".pdsn-fetch.json"
CHUNK = 1 << 20
TIMEOUT_S = 60

Progress = Callable[[int, "int | None"], None]


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """The hex digest of a file's bytes, read in chunks (downloads: md5; shipped models: sha256)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def md5sum(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")


def _network_error(url: str, error: BaseException) -> JobFailed:
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        reason = str(error.reason)
    else:
        reason = str(error) or type(error).__name__
    return JobFailed(f"download of {url} failed: {reason} (run again to resume)")


def _content_range_start(header: str | None) -> int | None:
    # "bytes <start>-<end>/<total>"
    if not header or not header.startswith("bytes "):
        return None
    try:
        return int(header[6:].split("-", 1)[0])
    except ValueError:
        return None


def _content_range_total(header: str | None) -> int | None:
    try:
        total = header.rsplit("/", 1)[1]
        return None if total == "*" else int(total)
    except (AttributeError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def _open_part(part: Path, mode: str):
    try:
        out = open(part, mode)
    except OSError as e:
        raise JobFailed(f"could not write {part}: {e.strerror or e}") from e
    with out:
        yield out


def download(url: str, final: Path, md5: str, progress: Progress | None = None) -> Path:
    """Fetch ``url`` to ``final`` via ``final.part``, resuming a previous part, and verify its md5.

    A checksum mismatch deletes the part file (its bytes cannot be trusted for another resume) and
    raises :class:`JobFailed`. Network errors keep the part file, so running again continues.
    """
    if final.is_file():
        if md5sum(final) == md5:
            return final
        final.unlink()  # a stale or corrupt earlier download: fetch it again
    part = final.with_name(final.name + ".part")
    have = part.stat().st_size if part.is_file() else 0

    request = urllib.request.Request(url, headers={"User-Agent": "pdsn-cli"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    complete = False
    try:
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:
                raise
            # 416: nothing left past our offset, the part file is already whole; the md5 decides
            e.close()
            complete = True
        if not complete:
            with response:
                content_range = response.headers.get("Content-Range")
                if response.status == 206 and _content_range_start(content_range) == have:
                    mode, done = "ab", have
                    total = _content_range_total(content_range)
                else:
                    # the server ignored the Range (plain 200): start the file over
                    mode, done = "wb", 0
                    total = None
                length = response.headers.get("Content-Length")
                expected_end = done + int(length) if length and length.isdigit() else None
                total = total or expected_end
                with _open_part(part, mode) as out:
                    while block := response.read(CHUNK):
                        try:
                            out.write(block)
                        except OSError as e:
                            raise JobFailed(f"could not write {part}: {e.strerror or e}") from e
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
                if expected_end is not None and done < expected_end:
                    raise JobFailed(
                        f"download of {url} stopped after {done} of {expected_end} bytes (run again to resume)"
                    )
    except (OSError, http.client.HTTPException) as e:
        # URLError, timeouts, resets and TLS errors are all OSErrors raised by the connection;
        # local file errors were turned into JobFailed where they happen
        raise _network_error(url, e) from e

    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise JobFailed(
            f"checksum mismatch for {final.name}: md5 {got}, expected {md5}; the download was deleted, run again"
        )
    os.replace(part, final)
    return final


def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise JobFailed(f"refusing archive: member {member.name!r} would be written outside the destination")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise JobFailed(f"refusing archive: member {member.name!r} is a device or special file")
    if member.issym() or member.islnk():
        # symlink targets are relative to the link's folder, hard link targets to the archive root
        base = root / name.parent if member.issym() else root
        target = PurePosixPath(member.linkname)
        resolved = Path(os.path.normpath(base / target))
        if target.is_absolute() or not resolved.is_relative_to(root):
            raise JobFailed(f"refusing archive: link {member.name!r} points outside the destination")


def safe_extract(archive: Path, into: Path) -> None:
    """Extract ``archive`` under ``into``, refusing members that could escape it."""
    into = into.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check_member(member, into)
                if hasattr(tarfile, "data_filter"):
                    # the stdlib "data" filter re-checks everything, including links made by earlier members
                    tar.extract(member, into, filter="data")
                else:
                    tar.extract(member, into)
    except getattr(tarfile, "FilterError", ()) as e:
        raise JobFailed(f"refusing archive {archive.name}: {e}") from e
    except (tarfile.TarError, EOFError) as e:
        raise JobFailed(f"{archive.name} is not a readable tar archive: {e}") from e


def _read_marker(folder: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / MARKER).read_text())
    return None


def fetch_lfw(
    dest_dir: str | os.PathLike,
    progress: Progress | None = None,
    urls: dict[str, str] = DEFAULT_URLS,
    checksums: dict[str, str] = DEFAULT_CHECKSUMS,
) -> Path:
    """Download and unpack LFW under ``dest_dir``; return ``dest_dir/lfw``.

    Idempotent: a completed earlier run is detected by its marker and nothing is downloaded.
    ``progress(done_bytes, total_bytes)`` is called per downloaded block, ``pairs.txt`` first and
    then ``lfw.tgz``; ``total_bytes`` is None when the server does not say.
    """
    for key in ("pairs.txt", "lfw.tgz"):
        if key not in urls or key not in checksums:
            raise BadInputError(f"fetch_lfw needs a URL and an md5 for {key}")
        if not urls[key].startswith(("http://", "https://")):
            raise BadInputError(f"not an http(s) URL: {urls[key]}")
    expected = {key: checksums[key] for key in ("pairs.txt", "lfw.tgz")}

    dest = Path(dest_dir)
    if dest.exists() and not dest.is_dir():
        raise BadInputError(f"--dest is not a folder: {dest}")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create {dest}: {e.strerror or e}") from e
    if not os.access(dest, os.W_OK | os.X_OK):
        raise BadInputError(f"--dest is not writable: {dest}")

    target = dest / "lfw"
    if target.exists():
        marker = _read_marker(target)
        if marker == expected:
            return target
        if marker is None:
            raise BadInputError(f"{target} exists but is not a finished download; remove it or pick another --dest")
        raise BadInputError(f"{target} holds a different download (other checksums); remove it or pick another --dest")

    pairs = download(urls["pairs.txt"], dest / "pairs.txt", expected["pairs.txt"], progress)
    archive = download(urls["lfw.tgz"], dest / "lfw.tgz", expected["lfw.tgz"], progress)

    staging = dest / ".lfw.extract.partial"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an extraction that was cut short
    staging.mkdir()
    try:
        safe_extract(archive, staging)
        tree = staging / "lfw"
        if not tree.is_dir() or tree.is_symlink():
            raise JobFailed(f"{archive.name} has no top-level lfw/ folder")
        shutil.copyfile(pairs, tree / "pairs.txt")
        (tree / MARKER).write_text(json.dumps(expected, indent=1) + "\n")
        os.replace(tree, target)
    except OSError as e:
        raise JobFailed(f"extracting {archive.name} into {dest} failed: {e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # the verified originals are no longer needed once the tree is in place
    archive.unlink()
    pairs.unlink()
    return target
