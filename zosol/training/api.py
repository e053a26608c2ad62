"""``train()``: the public entry point of training."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..runtime.launch import is_lead
from ..runtime.rundir import directory_lock, prepare_directory
from ..runtime.workers import check_workers
from ..solvers.base import BlackBox, Solver
from .loop import TrainingLoop
from .processes import train_in_processes
from .sources import source_class
from .state import TrainResult

__all__ = ["train"]


def train(
    dataset: FidelityDataset,
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    solver: Solver | BlackBox | None = None,
    checkpoint_seconds: float = 60.0,
    stop_after_steps: int | None = None,
    workers: int = 1,
    twin: Solver | None = None,
) -> TrainResult:
    """Train a corrector on ``dataset`` as ``config`` says; returns the model and its history.

    ``solver``: the coarse solver to train with (default: the scenario's own; e.g. an external
    process).  ZO-SOL and NOG-SOL only ever call its black-box view.  ``run_dir``: where the
    checkpoint goes (None: no checkpoints).  ``resume``: continue from ``run_dir``'s checkpoint.
    ``stop_after_steps``: stop (with a checkpoint) after this many optimizer steps in this call,
    for tests of resumption.  ``workers``: ZO-SOL evaluates its perturbation chunks in this many
    local processes (torch.distributed, gloo on CPU / NCCL on GPU; one thread each); the result is
    identical to one process.  ``twin``: a differentiable twin of ``solver`` (FO-SOL trains
    through it; the gradient checks compare with it; default: ``solver`` if differentiable, else
    the scenario's coarse solver).  Without a differentiable twin the gradient checks compare
    with float64 finite differences through the black box (:mod:`zosol.fdcheck`).

    The run directory is created if missing and locked while training (a second process is
    refused with :class:`~zosol.runtime.files.LockedError`; in a torchrun launch rank 0 holds the lock).
    """
    config.validate()
    check_workers(workers, bound_by_cores=False)
    if workers > 1 and (solver is not None or twin is not None) and source_class(config.method).shardable:
        raise ValueError(
            "workers > 1 runs the scenario's own solver in every process; pass solver=None "
            "(and twin=None) or workers=1 (a solver without a batch axis can use several local "
            "processes itself: NumpySolver(..., processes=N))"
        )
    solvers = (solver, twin)
    if run_dir is None or not is_lead():  # only rank 0 of a torchrun launch writes (and locks)
        return _train(
            dataset,
            config,
            None if run_dir is None else Path(run_dir),
            resume,
            progress,
            solvers,
            checkpoint_seconds,
            stop_after_steps,
            workers,
        )
    run_dir = prepare_directory(run_dir, "run directory")
    with directory_lock(run_dir, f"run directory {run_dir}"):
        return _train(
            dataset, config, run_dir, resume, progress, solvers, checkpoint_seconds, stop_after_steps, workers
        )


def _train(
    dataset: FidelityDataset,
    config: TrainConfig,
    run_dir: Path | None,
    resume: bool,
    progress: bool,
    solvers: tuple[Solver | BlackBox | None, Solver | None],
    checkpoint_seconds: float,
    stop_after_steps: int | None,
    workers: int,
) -> TrainResult:
    """train() after its checks; ``solvers``: (solver, twin)."""
    if workers > 1 and source_class(config.method).shardable:
        return train_in_processes(
            dataset,
            config,
            run_dir,
            workers,
            resume=resume,
            progress=progress,
            checkpoint_seconds=checkpoint_seconds,
            stop_after_steps=stop_after_steps,
        )
    loop = TrainingLoop.setup(dataset, config, run_dir, resume, progress, *solvers)
    return loop.run(stop_after_steps, checkpoint_seconds)
