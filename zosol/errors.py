"""zosol's errors: one base, four branches, each with the exit code the CLI gives it.

* :class:`UsageError` (exit 2): a bad option, config, argument or input shape — the user's to fix.
* :class:`DataError` (exit 2): a dataset, checkpoint or run directory that is missing, damaged,
  of another version or of another run.
* :class:`RunFailed` (exit 1): a run that started and could not finish: a solver that failed,
  returned NaN or timed out, training that diverged.  The run's checkpoint and data are kept.
* :class:`LockedError` (exit 2): a run or output directory in use by another process.

``UsageError`` and ``DataError`` are also ``ValueError``, ``RunFailed`` and ``LockedError`` also
``RuntimeError``, so code that caught those keeps working.  The CLI turns exactly these (and
file-system errors) into one line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ZosolError", "UsageError", "DataError", "RunFailed", "LockedError"]


class ZosolError(Exception):
    """Base of every error zosol raises on purpose (one line for the user)."""

    exit_code = 2


class UsageError(ZosolError, ValueError):
    """A bad option, config, argument or input: the message names it and what is accepted."""


class DataError(ZosolError, ValueError):
    """A dataset, checkpoint or run directory that cannot be used as it is."""


class RunFailed(ZosolError, RuntimeError):
    """A run that could not finish (solver failure, divergence); finished work is kept."""

    exit_code = 1


class LockedError(ZosolError, RuntimeError):
    """A run or output directory is in use by another process."""
