"""Write outputs so that nothing partial ever appears under the final name, and no two runs write one output.

A job writes to ``<final>.partial``; on success the file is fsynced and renamed over the final name
(``os.replace`` is atomic on POSIX). On failure the partial file is removed, except when the job asks
to keep it for ``--resume`` (interruption). While it writes, the job holds ``<final>.lock`` (an ``flock`` on a
file holding its PID): a second run writing the same output is refused in one line, and a lock left by a dead
process is taken over, because the kernel drops an ``flock`` when its holder dies. Cache entries, which several
runs may compute at once with the same content, are written with ``shared=True`` instead: a temp name unique to
the writer, no lock, the last complete rename wins.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from pdsn_cli.errors import BadInputError, JobFailed


def partial_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".partial")


def unique_partial_path(final: str | os.PathLike) -> Path:
    """A temp name for ``final`` that no other writer uses (the PID is in it, for ``pdsn cache clear``)."""
    final = Path(final)
    return final.with_name(f"{final.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def lock_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".lock")


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<final>.lock`` for the block, or raise BadInputError naming the PID that is writing ``final``.

    The lock is an ``flock`` on that file, so a lock file whose holder died (kill -9, power cut) is stale by
    construction and is taken over. A lock file appears only already locked and holding its PID (written under
    a temp name, locked, then linked into place), so a refused writer can always name the holder. Only the
    holder of the flock on the file at ``<final>.lock`` ever replaces or removes it.
    """
    path = lock_path(final)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        while True:
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            if _take_over_if_stale(path, tmp, final):
                break
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # the flock goes with the last descriptor, after the unlink


def _take_over_if_stale(path: Path, ours: Path, final) -> bool:
    """Put ``ours`` in place of a lock file nobody holds; False if ``path`` vanished meanwhile (try again)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            who = f"PID {holder}" if holder else "another process"
            raise BadInputError(f"{final} is already being written by {who} (lock {path}); "
                                "wait for it to finish or choose another output") from None
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(path)):
                return False  # its holder released it between our open and flock
        except FileNotFoundError:
            return False
        os.replace(ours, path)  # safe: only the flock holder of the file at `path` changes `path`, and that is us
        return True
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_distinct_paths(inputs: Mapping[str, object], outputs: Mapping[str, object],
                         output_folders: Mapping[str, object] | None = None) -> None:
    """Refuse (BadInputError, before anything is written) an output that is an input or another output.

    ``inputs`` / ``outputs`` map an option name (``"--out"``) to a path, a list of paths, or None (not given);
    ``"-"`` (stdout) is no file. Two paths are the same file when they resolve to the same real path (symlinks,
    ``..``, relative vs absolute) or, for files that exist, name the same inode (hard links).
    ``output_folders`` are outputs the run writes files into (``--report``, ``--work``): besides the rule above,
    no input may lie inside one, since the run could write over it there. (An output folder inside an input
    folder is fine: nothing of the input is replaced.)
    """
    def entries(options: Mapping[str, object]):
        for option, value in options.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if v is not None and str(v) != "-":
                    yield option, v, _file_identity(v)

    folders = output_folders or {}
    seen = [("an input", *e) for e in entries(inputs)]
    for option, value, ident in [*entries(outputs), *entries(folders)]:
        for what, other, other_value, other_ident in seen:
            if ident & other_ident:
                raise BadInputError(f"{option} {value} is the same file as {other} {other_value}; "
                                    f"an output must not overwrite {what}: write to a new file")
        seen.append(("another output", option, value, ident))
    for option, folder, _ in entries(folders):
        inside = os.path.realpath(os.fsdecode(folder))
        for other, value, _ in entries(inputs):
            if os.path.commonpath([inside, os.path.realpath(os.fsdecode(value))]) == inside:
                raise BadInputError(f"{other} {value} is inside {option} {folder}, which this run writes into; "
                                    f"an output must not overwrite an input: choose another folder")


def _file_identity(path) -> set:
    """Keys two paths share iff they are one file: the real path, and (dev, inode) when it exists."""
    real = os.path.realpath(os.fsdecode(path))
    keys = {("path", real)}
    with contextlib.suppress(OSError):
        st = os.stat(real)
        keys.add(("inode", st.st_dev, st.st_ino))
    return keys


def check_writable(final: str | os.PathLike) -> Path:
    """Refuse an output path whose folder is missing or read-only, before any work starts."""
    final = Path(final)
    folder = final.parent if str(final.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder is not writable: {folder}")
    if final.is_dir():
        raise BadInputError(f"output path is a folder: {final}")
    return final


def check_resumable(final: str | os.PathLike, partial: str | os.PathLike, resume: bool) -> None:
    """``--resume`` with nothing to resume (no ``partial``: the run's ``.partial`` or checkpoint) while the
    finished ``final`` exists: refused, as the finished file may come from other settings (another seed) and
    starting over would silently replace it."""
    if resume and not Path(partial).exists() and Path(final).exists():
        raise BadInputError(f"--resume: {final} is already finished and there is no {Path(partial).name} to "
                            f"resume; remove it or choose another --out")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the folder so the rename survives a crash."""
    fsync_file(tmp)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        fd = os.open(Path(final).parent or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike, keep_partial_on_interrupt: bool = False, shared: bool = False):
    """Yield a temp path to write; commit it to ``final`` when the block succeeds.

    On KeyboardInterrupt the partial file is kept (if asked) so that ``--resume`` can continue;
    on any other error it is removed and the previous ``final`` stays untouched. The output is locked for the
    block (see ``output_lock``) unless ``shared``: a cache entry that concurrent runs may all write, each to its
    own temp name.
    """
    final = Path(final)
    if shared:
        keep_partial_on_interrupt = False
    tmp = unique_partial_path(final) if shared else partial_path(final)
    with contextlib.ExitStack() as held:
        if not shared:  # locked before the cleanup below: a refused writer must not remove the holder's partial
            try:
                held.enter_context(output_lock(final))
            except OSError as e:  # no room even for the lock file
                if _disk_full(e):
                    raise JobFailed(f"disk full while writing {final} ({final} left as it was)") from e
                raise
        try:
            yield tmp
            commit(tmp, final)
        except KeyboardInterrupt:
            if not keep_partial_on_interrupt:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            raise
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if _disk_full(e):
                raise JobFailed(f"disk full while writing {final} ({final} left as it was)") from e
            raise


def _disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain: writers such as torch.save wrap the OSError in their own error."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def interrupt_between_steps():
    """Yield ``check()``, which raises KeyboardInterrupt if Ctrl-C came since the block began.

    Python raises KeyboardInterrupt in whatever bytecode runs next after SIGINT; in an h5py write loop that is
    nearly always a weakref callback of h5py's object registry, where the exception is reported as "ignored"
    and dropped, so the job would carry on. Inside this block SIGINT only sets a flag, and the job stops at a
    step boundary it chooses. A SIGINT that is ignored or handled by someone else is left alone.
    """
    hit: list[int] = []

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield check
        return
    old = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, old)
