"""Solvers without a batch axis: split a batch into the calls a solver accepts, and spread them
over local processes.

zosol hands a solver whole batches (``(B, C, *spatial)``; ZO-SOL folds all perturbations into
one batch, so B reaches thousands).  A solver that steps one state at a time (py-pde, most legacy
codes) or a bounded number of states declares it (``NumpySolver(batched=False)`` or
``max_batch=k``; an external program by ``"max_batch": k`` in its hello reply) and zosol makes
the calls for it.  :class:`StatePool` runs those calls in N local worker processes that are
started once (at the first batch) and live as long as the solver; on POSIX they are forked, so
the step function need not be picklable (a closure over a compiled solver is fine), and each
worker keeps whatever the function compiles or caches on its first call.
"""
from __future__ import annotations

import multiprocessing
import os
import weakref
from typing import Callable

import numpy as np

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
            raise ValueError(f"a one-state step must return shape {list(x.shape[1:])} (channels, *spatial), "
                             f"got {sorted(map(list, shapes))}")
        return np.stack(outs)
    if max_batch is None or x.shape[0] <= max_batch:
        return fn(*rows(slice(None)))
    return np.concatenate([np.asarray(fn(*rows(slice(i, i + max_batch))))
                           for i in range(0, x.shape[0], max_batch)])


_WORKER: dict = {}


def _init_worker(fn: StepFn, batched: bool, max_batch: int | None) -> None:
    _WORKER.update(fn=fn, batched=batched, max_batch=max_batch)


def _work(args: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
    return run_rows(_WORKER["fn"], _WORKER["batched"], _WORKER["max_batch"], *args)


class StatePool:
    """``processes`` worker processes that apply one step function to blocks of states.

    The processes start at the first :meth:`map` and stay until :meth:`close` (or garbage
    collection / interpreter exit).  Each call of :meth:`map` splits the batch into
    ``processes * blocks_per_process`` contiguous blocks; results come back in order, so the
    output equals the one-process result exactly (samples are independent)."""

    def __init__(self, fn: StepFn, processes: int, *, batched: bool = True, max_batch: int | None = None,
                 blocks_per_process: int = 2):
        if int(processes) != processes or processes < 1:
            raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
        self.fn, self.processes, self.batched, self.max_batch = fn, int(processes), batched, max_batch
        self.blocks_per_process = blocks_per_process
        self.starts = 0  # how many times the worker processes were started (once per pool)
        self._pool = None
        self._finalizer = None

    def _ensure(self):
        if self._pool is None:
            method = "fork" if os.name == "posix" else "spawn"
            ctx = multiprocessing.get_context(method)
            self._pool = ctx.Pool(self.processes, initializer=_init_worker,
                                  initargs=(self.fn, self.batched, self.max_batch))
            self._finalizer = weakref.finalize(self, self._pool.terminate)
            self.starts += 1
        return self._pool

    def map(self, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
        """The step of every row of ``x`` (B, C, *s), computed in the worker processes."""
        blocks = split_rows(x.shape[0], self.processes * self.blocks_per_process)
        if len(blocks) == 1:  # one state: no process round trip
            return run_rows(self.fn, self.batched, self.max_batch, x, p)
        jobs = [(x[sl], None if p is None else p[sl]) for sl in blocks]
        return np.concatenate(self._ensure().map(_work, jobs, chunksize=1))

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`map` starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._finalizer.detach()
            self._pool = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_finalizer": None}
