"""Safe file-system primitives shared by every writer in zosol: atomic writes, advisory locks and
one-line messages for file-system errors.  The checks that keep writes safe live here, in one place.

* :func:`atomic_save` / :func:`atomic_save_path` / :func:`atomic_write_bytes` /
  :func:`atomic_write_text` write a file whole or not at all: the data go to a temporary file with
  a unique, unpredictable name created exclusively (``O_EXCL``, mode 0600 before the final
  ``chmod``) in the target's directory, are flushed to disk, and are renamed over the target.  A
  symlink planted at the target (or at any temporary name) is never followed: ``rename`` replaces
  the link itself, and a name that already exists is never opened for writing.  On any failure the
  temporary file is removed and the target is left as it was.
* :class:`FileLock` is an advisory ``flock`` lock on ``<path>.lock``; a second holder is refused
  at once with :class:`LockedError` naming the pid, host and command of the holder.
* :func:`prepare_directory` creates a run (or ``compare --out``) directory or refuses it with a
  one-line ``ValueError`` naming the problem (empty name, a file in the way, a name too long, not
  writable); :func:`refuse_file_in_the_way` is the one check that a file is not where a directory
  belongs.
* :func:`os_error_message` turns an ``OSError`` into ``"<path>: <reason>"`` for one-line messages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import LockedError, UsageError

__all__ = [
    "atomic_save",
    "atomic_save_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "FileLock",
    "LockedError",
    "os_error_message",
    "prepare_directory",
    "refuse_file_in_the_way",
    "real_subdirectory",
]


def _new_temp(path: Path) -> tuple[int, Path]:
    """Exclusively create an empty temporary file beside ``path``: (fd, its path)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


def _finish(tmp: Path, path: Path, mode: int) -> None:
    os.chmod(tmp, mode)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "is a directory, cannot replace it by a file", str(path))
    os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: Path, mode: int | None) -> Iterator[tuple[int, Path]]:
    """``(fd, tmp)`` of a new temporary file beside ``path`` (the block fills it, closes ``fd`` and
    flushes it to disk); when the block ends it replaces ``path`` (file mode ``mode``, default from
    the umask), when anything raises it is removed and ``path`` is left as it was."""
    fd, tmp = _new_temp(path)
    try:
        yield fd, tmp
        _finish(tmp, path, _default_mode() if mode is None else mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any], *, mode: int | None = None) -> Path:
    """Write ``path`` atomically: ``writer(f)`` fills ``f``, a binary file object open on a fresh,
    exclusively created temporary file in the same directory, which then replaces ``path``.

    Use it for ``torch.save(obj, f)``, ``np.savez(f, ...)``, ``fig.savefig(f, format=...)`` etc.
    Raises what ``writer`` or the file system raised; ``path`` is then unchanged.
    """
    path = Path(path)
    with _replacing(path, mode) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_save_path(path: str | os.PathLike, writer: Callable[[Path], Any], *, mode: int | None = None) -> Path:
    """Like :func:`atomic_save` for libraries that want a file name (``h5py.File(tmp, "w")``):
    ``writer(tmp)`` gets the path of an exclusively created, empty temporary file (unique name,
    same directory), which then replaces ``path``."""
    path = Path(path)
    with _replacing(path, mode) as (fd, tmp):
        os.close(fd)
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_save`)."""
    return atomic_save(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically (see :func:`atomic_save`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def os_error_message(e: OSError) -> str:
    """``"<path>: <reason>"`` (or ``"<reason>"``) for a one-line error message."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        where = os.fsdecode(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fsdecode(e.filename2)}"
        return f"{where}: {reason}"
    return reason


# ---------------------------------------------------------------------------------------------
# Checks that keep every write inside the user's output directory


def _not_a_private_file(st: os.stat_result) -> str:
    """Why a file opened for writing must not be written ("" when it may): not a regular file
    (a fifo, a device), or a hard link (``st_nlink > 1``: writing it changes a file elsewhere,
    which ``O_NOFOLLOW`` does not stop)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, socket or device)"
    if st.st_nlink > 1:
        return f"a hard link ({st.st_nlink} names share it: writing it would change a file elsewhere)"
    return ""


def real_subdirectory(root: str | os.PathLike, relative: str | os.PathLike, what: str = "--out") -> Path:
    """``root/relative`` created as real directories: no component below ``root`` may be a symbolic
    link (one planted inside the output directory would send checkpoints and data elsewhere); a
    ValueError names it.  ``root`` itself is the user's choice and may be a link."""
    root = Path(root)
    current = root
    for part in Path(relative).parts:
        current = current / part
        if not current.is_symlink() and not current.exists():
            try:
                current.mkdir()
            except FileExistsError:
                pass
        if current.is_symlink():
            raise UsageError(
                f"{current} is a symbolic link inside {what} {root}; zosol writes only inside {what} and "
                f"does not follow it: remove the link (or choose another {what})"
            )
        if not current.is_dir():
            raise UsageError(f"{current} is not a directory (a file is there); remove it or choose another {what}")
    return current


# Advisory locks


class FileLock:
    """An exclusive advisory lock on ``<path>.lock`` (``fcntl.flock``), held while in a ``with``.

    ``what`` names the locked thing in the refusal (e.g. "dataset /data/x.h5").  The lock file
    holds the holder's pid, host, start time and command line (JSON) and is removed on release.
    A second process is refused at once with :class:`LockedError`; a holder that died (even by
    ``kill -9``) releases the lock with its file descriptor.  The lock file is opened with
    ``O_NOFOLLOW``: a symlink planted there is refused, not followed.
    """

    def __init__(self, path: str | os.PathLike, what: str | None = None):
        self.path = Path(str(path) + ".lock")
        self.what = what or str(path)
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            with open(self.path, "rb") as f:
                info = json.loads(f.read(4096).decode("utf-8", "replace") or "{}")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"pid {int(info['pid'])} on host {info['host']} since {since} ({info['command'][:120]})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (holder unknown)"

    def acquire(self) -> FileLock:
        import fcntl

        while True:
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                fd = os.open(self.path, flags, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise LockedError(f"{self.path} is a symlink; refusing to follow it (remove it)") from None
                raise
            problem = _not_a_private_file(os.fstat(fd))
            if problem:
                os.close(fd)
                raise LockedError(f"{self.path} is {problem}; refusing to use it as a lock file (remove it)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(
                    f"{self.what} is in use by {self._holder()}; wait for it to finish or stop that process"
                ) from None
            # the file may have been removed by a releasing holder between our open and flock
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Directories to write in


def refuse_file_in_the_way(path: str | os.PathLike, what: str, fix: str) -> None:
    """ValueError ``"<what> <path> is not a directory (a file is there); <fix>"`` if a file (or
    anything but a directory) is at ``path``; nothing if it is a directory or missing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {p} is not a directory (a file is there); {fix}")


def prepare_directory(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as an existing, writable directory (created with its parents if missing).

    ``what`` names the option in messages.  Raises ValueError for an empty name, a file in the
    way, a name the file system refuses (too long, read-only parent) or a directory that is not
    writable."""
    if str(path) == "":
        raise UsageError(f"{what} must not be empty; name a directory")
    p = Path(path)
    refuse_file_in_the_way(p, what, f"choose another {what}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))
        where = p if len(str(p)) <= 120 else f"{str(p)[:60]}...{str(p)[-40:]}"
        raise UsageError(f"{what} {where}: cannot create the directory ({reason}); choose another {what}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {p} is not writable; fix its permissions or choose another {what}")
    return p
