"""Output directories of runs and comparisons: checked before any work, and locked while in use.

:func:`prepare_directory` creates a run (or ``compare --out``) directory or refuses it with a
one-line ``ValueError`` naming the problem (empty name, a file in the way, a name too long, not
writable).  :func:`directory_lock` holds an advisory ``flock`` on ``DIR/.zosol.lock``
(:class:`zosol.runtime.files.FileLock`) for as long as a run writes there; a second zosol process is
refused at once with :class:`~zosol.runtime.files.LockedError` naming the holder's pid.  The lock is
re-entrant within one process (the CLI holds it around ``train()``, which takes it again).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .files import FileLock

__all__ = ["prepare_directory", "directory_lock"]

_held: dict[str, int] = {}  # directories this process has locked -> nesting depth


def prepare_directory(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as an existing, writable directory (created with its parents if missing).

    ``what`` names the option in messages.  Raises ValueError for an empty name, a file in the
    way, a name the file system refuses (too long, read-only parent) or a directory that is not
    writable."""
    if str(path) == "":
        raise ValueError(f"{what} must not be empty; name a directory")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is not a directory (a file is there); choose another {what}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))
        where = p if len(str(p)) <= 120 else f"{str(p)[:60]}...{str(p)[-40:]}"
        raise ValueError(f"{what} {where}: cannot create the directory ({reason}); choose another {what}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p} is not writable; fix its permissions or choose another {what}")
    return p


@contextmanager
def directory_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the advisory lock of directory ``path`` (which must exist) for the ``with`` block.

    Raises :class:`~zosol.runtime.files.LockedError` at once if another process holds it."""
    key = os.path.realpath(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    with FileLock(Path(path) / ".zosol", what=what):
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
