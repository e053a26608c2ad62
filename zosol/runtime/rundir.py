"""Run and output directories: locked while in use, and the layout of a training run's files
owned by one object.

A directory is checked before any work by :func:`zosol.runtime.files.prepare_directory`.
:func:`directory_lock` holds an advisory ``flock`` on ``DIR/.zosol.lock``
(:class:`zosol.runtime.files.FileLock`) for as long as a process writes there; a second zosol
process is refused at once with :class:`~zosol.runtime.files.LockedError` naming the holder's pid.

:class:`RunDirectory` is a training run's directory: it knows every file of the run, is prepared
and locked once (by whoever starts the run: the CLI, ``compare`` or ``train()`` itself), and is
what ``train()`` writes, so every run directory looks the same, whoever made it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .files import FileLock, atomic_write_text, prepare_directory, refuse_file_in_the_way

__all__ = ["directory_lock", "RunDirectory"]


@contextmanager
def directory_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the advisory lock of directory ``path`` (which must exist) for the ``with`` block.

    Raises :class:`~zosol.runtime.files.LockedError` at once if another process (or another
    holder in this process) has it."""
    with FileLock(Path(path) / ".zosol", what=what):
        yield


class RunDirectory:
    """The directory of one training run and every file in it::

        config.json     the training config, written when the run starts
        checkpoint.pt   the latest checkpoint (:mod:`zosol.training.checkpoint` writes and reads it)
        history.json    the finished run's history
        run.json        {"dataset": absolute path of the dataset the run trains on}
        failure.json    what stopped a worker of a multi-process run (read and removed by the parent)
        .zosol.lock     held by the process that writes here, while it does

    ``writer=False`` (the other ranks of a torchrun launch, a run only read): nothing is written,
    nothing locked.  :meth:`open` (or ``with``) prepares the directory and takes its lock, once;
    a second process is refused with :class:`~zosol.runtime.files.LockedError`.  The worker
    processes of a multi-process run write into a directory their parent holds open.
    """

    def __init__(self, path: str | os.PathLike, *, writer: bool = True, what: str = "run directory"):
        """``what`` names the directory in the messages of :func:`prepare_directory` (e.g. "--out")."""
        self.path, self.writer, self.what = Path(path), writer, what
        self._lock: FileLock | None = None

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r}, writer={self.writer})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunDirectory:
        """A run directory to read (evaluate, load a trained model): refused if a file is there."""
        refuse_file_in_the_way(path, "run directory", "name a run directory")
        return cls(path, writer=False)

    # ------------------------------------------------------------------ the files
    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    @property
    def run_info(self) -> Path:
        return self.path / "run.json"

    @property
    def failure(self) -> Path:
        return self.path / "failure.json"

    def has_checkpoint(self) -> bool:
        """Whether something is at the checkpoint's name (read and checked by the checkpoint module,
        which refuses what is not a checkpoint)."""
        return self.checkpoint.exists()

    # ------------------------------------------------------------------ open / close
    @property
    def is_open(self) -> bool:
        """Whether this object holds the directory's lock."""
        return self._lock is not None

    def open(self) -> RunDirectory:
        """Create and check the directory (see :func:`prepare_directory`) and take its lock; a
        reader (``writer=False``) only names it.  Raises if this object holds it already."""
        if self.is_open:
            raise RuntimeError(f"{self.what} {self.path} is open already")
        if self.writer:
            self.path = prepare_directory(self.path, self.what)
            self._lock = FileLock(self.path / ".zosol", what=f"run directory {self.path}").acquire()
        return self

    def close(self) -> None:
        """Release the lock (if held)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDirectory:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ records (the writer only)
    def _write_json(self, path: Path, obj: Any, indent: int | None = None) -> None:
        if self.writer:
            atomic_write_text(path, json.dumps(obj, indent=indent))

    def record_config(self, config: dict[str, Any]) -> None:
        """``config.json``: the run's training config (plain data)."""
        self._write_json(self.config, config, indent=2)

    def record_history(self, history: dict[str, Any]) -> None:
        """``history.json``: the finished run's history."""
        self._write_json(self.history, history, indent=1)

    def record_dataset(self, dataset_path: str | os.PathLike) -> None:
        """``run.json``: the dataset the run trains on (absolute), for ``zosol evaluate RUN``."""
        self._write_json(self.run_info, {"dataset": str(Path(dataset_path).resolve())})

    def dataset(self) -> str:
        """The dataset this run was trained on, from its ``run.json`` (ValueError naming the fix
        if it is missing or unreadable)."""
        if not self.run_info.is_file():
            raise UsageError(f"{self.path}: no run.json naming its dataset; pass --data FILE")
        try:
            data = json.loads(self.run_info.read_text())["dataset"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, str):
            raise UsageError(f"{self.run_info}: unreadable (it should name the run's dataset); pass --data FILE")
        return data

    def record_failure(self, error: BaseException) -> None:
        """``failure.json``: the type and message of what stopped this (worker) process."""
        self._write_json(self.failure, {"type": type(error).__name__, "message": str(error)})

    def clear_failure(self) -> None:
        """Remove a failure record left by an earlier run."""
        if self.writer:
            self.failure.unlink(missing_ok=True)

    def take_failure(self) -> dict[str, str] | None:
        """The failure record (``{"type", "message"}``) a worker left, removed; None if none."""
        if not self.failure.exists():
            return None
        info = json.loads(self.failure.read_text())
        self.failure.unlink()
        return info
