"""Solvers without a batch axis: split a batch into the calls a solver accepts, and spread them
over local processes.

zosol hands a solver whole batches (``(B, C, *spatial)``; ZO-SOL folds all perturbations into
one batch, so B reaches thousands).  A solver that steps one state at a time (py-pde, most legacy
codes) or a bounded number of states declares it (``NumpySolver(batched=False)`` or
``max_batch=k``; an external program by ``"max_batch": k`` in its hello reply) and zosol makes
the calls for it.  :class:`StatePool` runs those calls in N local processes: this one and N - 1
worker processes that are started once (at the first batch) and live as long as the solver; on
POSIX they are forked, so the step function need not be picklable (a closure over a compiled
solver is fine), and each worker keeps whatever the function compiles or caches on its first call.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import weakref
from collections.abc import Callable

import numpy as np

from ..errors import UsageError
from .base import SolverError

__all__ = ["StatePool", "run_rows", "split_rows"]

StepFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def split_rows(n: int, pieces: int) -> list[slice]:
    """``pieces`` (or fewer) contiguous slices of ``range(n)`` of near-equal length."""
    pieces = max(1, min(pieces, n))
    bounds = np.linspace(0, n, pieces + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def run_rows(fn: StepFn, batched: bool, max_batch: int | None, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    """Apply ``fn`` to the rows of ``x`` (B, C, *s) with params ``p`` (B, K) or None.

    ``batched=False``: ``fn(x[i] (C, *s), p[i] (K,) | None) -> (C, *s)`` once per state;
    else ``fn`` gets blocks of at most ``max_batch`` rows (None: all of them in one call).
    Every call gets its own copy of the input, so ``fn`` may modify it in place."""
    rows = lambda sl: (x[sl].copy(), None if p is None else p[sl].copy())  # noqa: E731
    if not batched:
        outs = [np.asarray(fn(x[i].copy(), None if p is None else p[i].copy())) for i in range(x.shape[0])]
        shapes = {o.shape for o in outs}
        if shapes != {x.shape[1:]}:
            raise UsageError(
                f"a one-state step must return shape {list(x.shape[1:])} (channels, *spatial), "
                f"got {sorted(map(list, shapes))}"
            )
        return np.stack(outs)
    if max_batch is None or x.shape[0] <= max_batch:
        return fn(*rows(slice(None)))
    return np.concatenate([np.asarray(fn(*rows(slice(i, i + max_batch)))) for i in range(0, x.shape[0], max_batch)])


def _serve(conn, fn: StepFn, batched: bool, max_batch: int | None, inherited: tuple = ()) -> None:
    """A worker process: step the blocks that come down ``conn`` until None (or the pipe closes).
    Ctrl-C is the parent's to handle (it stops the workers), so the worker ignores SIGINT.  The
    parent's pipe ends a forked worker inherited (``inherited``) are closed first: the pipe then
    closes when the parent dies (even by ``kill -9``), and the worker leaves."""
    for end in inherited:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            answer = (True, run_rows(fn, batched, max_batch, *job))
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            answer = (False, e)
        try:
            conn.send(answer)
        except OSError:  # the parent has closed the pipe: nobody waits for this answer
            return
        except Exception:  # noqa: BLE001 - the exception does not pickle: send its text
            conn.send((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))


def _stop(workers: list) -> None:
    for proc, conn in workers:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        conn.close()
    for proc, _ in workers:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()


class StatePool:
    """Apply one step function to a batch of states in ``processes`` local processes: this one
    and ``processes - 1`` workers.

    The workers start at the first :meth:`map` and stay until :meth:`close` (or garbage
    collection / interpreter exit).  Each call of :meth:`map` splits the batch into ``processes``
    contiguous blocks; this process sends the workers theirs (one pipe each, no helper threads),
    steps the first block itself, and joins the blocks in order, so the output equals the
    one-process result exactly (samples are independent)."""

    def __init__(self, fn: StepFn, processes: int, *, batched: bool = True, max_batch: int | None = None):
        if int(processes) != processes or processes < 2:
            raise UsageError(f"processes must be an integer >= 2 (1: no pool), got {processes!r}")
        self.fn, self.processes, self.batched, self.max_batch = fn, int(processes), batched, max_batch
        self.starts = 0  # how many times the worker processes were started (once per pool)
        self._workers: list = []  # (process, pipe end)
        self._finalizer = None

    def _ensure(self) -> list:
        if not self._workers:
            ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            forked = ctx.get_start_method() == "fork"
            for _ in range(self.processes - 1):
                conn, child = ctx.Pipe()
                inherited = (conn, *(c for _, c in self._workers)) if forked else ()
                args = (child, self.fn, self.batched, self.max_batch, inherited)
                proc = ctx.Process(target=_serve, args=args, daemon=True)
                proc.start()
                child.close()
                self._workers.append((proc, conn))
            self._finalizer = weakref.finalize(self, _stop, list(self._workers))
            self.starts += 1
        return self._workers

    def map(self, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
        """The step of every row of ``x`` (B, C, *s): the first block here, the others in the workers."""
        blocks = split_rows(x.shape[0], self.processes)
        rows = lambda sl: (x[sl], None if p is None else p[sl])  # noqa: E731
        if len(blocks) == 1:  # one state: no process round trip
            return run_rows(self.fn, self.batched, self.max_batch, *rows(blocks[0]))
        workers = self._ensure()[: len(blocks) - 1]
        own_error = None
        try:
            for (_, conn), sl in zip(workers, blocks[1:]):
                conn.send(rows(sl))
            try:
                first = run_rows(self.fn, self.batched, self.max_batch, *rows(blocks[0]))
            except Exception as e:  # noqa: BLE001 - raised below, once the workers have answered
                own_error = e
            answers = [conn.recv() for _, conn in workers]  # the pipes stay in step for the next batch
        except (EOFError, OSError) as e:
            codes = [proc.exitcode for proc, _ in self._workers]
            self.close()
            raise SolverError(
                f"a worker process of the state pool stopped (exit codes {codes}); the next batch starts new ones"
            ) from e
        except BaseException:  # e.g. KeyboardInterrupt half-way: no stale answer may reach the next batch
            self.close()
            raise
        if own_error is not None:
            raise own_error
        for ok, value in answers:
            if not ok:
                raise value
        return np.concatenate([first, *(value for _, value in answers)])

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`map` starts new ones)."""
        if self._workers:
            self._finalizer.detach()
            _stop(self._workers)
            self._workers = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_workers": [], "_finalizer": None}
