"""Stopping cleanly on SIGTERM, and workers that die with their parent.

A scheduler stops a job with SIGTERM.  :func:`install_sigterm_handler` (the CLI calls it) makes
SIGTERM raise :class:`Terminated` at once, except while a training loop runs (:func:`deferred`):
then the signal only sets a flag that the loop reads after each optimizer step
(:func:`requested`); the loop checkpoints and raises :class:`Terminated` itself, so the run
resumes exactly.  The handler also forwards SIGTERM to this process's multiprocessing children
(the workers of ``--workers N``), which stop the same way, in step with each other.

:func:`die_with_parent` (called first thing in every worker) asks Linux to SIGKILL the worker
when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so ``kill -9`` of the parent leaves no
worker training on.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "Terminated",
    "EXIT_CODE",
    "install_sigterm_handler",
    "restore_sigterm_handler",
    "deferred",
    "requested",
    "requested_by_any",
    "die_with_parent",
    "kill_children_after",
]

#: the exit code of a run stopped by SIGTERM (128 + 15, the shell's convention)
EXIT_CODE = 128 + signal.SIGTERM

#: seconds a worker gets to checkpoint and stop after a forwarded SIGTERM before it is killed
GRACE_SECONDS = 30.0

_state = {"deferred": 0, "requested": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the run; its last checkpoint is on disk (the message says where)."""


def _signal_children(signum: int) -> bool:
    """Send ``signum`` to this process's live multiprocessing children; whether there were any."""
    children = multiprocessing.active_children()
    for child in children:
        try:
            os.kill(child.pid, signum)
        except (ProcessLookupError, TypeError):  # gone meanwhile, or not started (pid None)
            pass
    return bool(children)


def _forward_to_children() -> None:
    if _signal_children(signal.SIGTERM):
        kill_children_after(GRACE_SECONDS)


def _on_sigterm(signum: int, frame: object) -> None:
    _forward_to_children()
    if _state["deferred"]:
        _state["requested"] = True
        return
    raise Terminated("stopped by SIGTERM")


def install_sigterm_handler() -> Any:
    """Make SIGTERM stop this process cleanly (see the module docstring); returns the previous
    handler (for :func:`restore_sigterm_handler`).  Only in the main thread (else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def restore_sigterm_handler(previous: Any) -> None:
    """Put back the handler :func:`install_sigterm_handler` replaced."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block, SIGTERM only sets the :func:`requested` flag (if the handler is installed)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
        if not _state["deferred"]:
            _state["requested"] = False


def requested() -> bool:
    """Whether SIGTERM arrived inside :func:`deferred`."""
    return _state["requested"]


def requested_by_any(distributed: bool = False, device: Any = None) -> bool:
    """Whether SIGTERM arrived (:func:`requested`) in this process or, ``distributed``, in any
    process of the torch.distributed group: a MAX all-reduce on ``device``, so that every process
    gets the same answer at the same step and all stop together."""
    flag = requested()
    if distributed:
        import torch  # only a multi-process run pays for it here
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``); exit at once if the
    parent ``parent_pid`` is already gone.  A no-op where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def kill_children_after(seconds: float) -> threading.Timer:
    """SIGKILL this process's multiprocessing children that are still alive after ``seconds``
    (the backstop when a worker does not stop on SIGTERM); returns the started timer."""
    timer = threading.Timer(seconds, _signal_children, (signal.SIGKILL,))
    timer.daemon = True
    timer.start()
    return timer
