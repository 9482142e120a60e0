"""Write outputs so that nothing partial ever appears under the final name.

A job writes to ``<final>.partial``; on success the file is fsynced and renamed over the final name
(``os.replace`` is atomic on POSIX). On failure the partial file is removed, except when the job asks
to keep it for ``--resume`` (interruption).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path

from pdsn_cli.errors import BadInputError, JobFailed


def partial_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".partial")


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
def atomic_output(final: str | os.PathLike, keep_partial_on_interrupt: bool = False):
    """Yield a temp path to write; commit it to ``final`` when the block succeeds.

    On KeyboardInterrupt the partial file is kept (if asked) so that ``--resume`` can continue;
    on any other error it is removed and the previous ``final`` stays untouched.
    """
    final = Path(final)
    tmp = partial_path(final)
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
