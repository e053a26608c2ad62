"""Local worker processes (``--workers N``): how many a run may start, and how a worker leaves.

The processes themselves are started by :func:`zosol.zo.parallel.spawn_local`; each dies with its parent
and stops on a forwarded SIGTERM (:mod:`zosol.runtime.stop`)."""

from __future__ import annotations

import os
import sys

from ..errors import UsageError

__all__ = ["check_workers", "exit_now", "lost_a_peer", "MAX_WORKERS"]

#: at most this many worker processes, however many cores there are
MAX_WORKERS = 64


def check_workers(n: int, bound_by_cores: bool = True) -> None:
    """ValueError unless 1 <= ``n`` <= MAX_WORKERS and (``bound_by_cores``) the CPU cores this
    process may use: each worker is a single-threaded process, more than the cores only adds
    memory and slows all of them down."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {n!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    top = min(cores, MAX_WORKERS) if bound_by_cores else MAX_WORKERS
    if n > top:
        raise UsageError(f"--workers {n} is more than the {cores} CPU cores this process may use; use at most {top}")


def exit_now(code: int = 0) -> None:
    """Leave this worker at once (the interpreter's and gloo's teardown take seconds on a busy
    machine), after multiprocessing's exit finalizers (they release the worker's semaphores)."""
    from multiprocessing import util

    getattr(util, "_run_finalizers", lambda: None)()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the group vanished
    (gloo raises a plain RuntimeError naming the reset connection)."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "gloo", "NCCL")
    )
