"""``train()``: the public entry point of training."""

from __future__ import annotations

import os

from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..errors import UsageError
from ..runtime.launch import is_lead
from ..runtime.options import Resume, RunOptions
from ..runtime.rundir import RunDirectory
from ..solvers.base import BlackBox, Solver
from .loop import TrainingLoop
from .processes import train_in_processes
from .sources import source_class
from .state import TrainResult

__all__ = ["train"]


def train(
    dataset: FidelityDataset,
    config: TrainConfig,
    run_dir: str | os.PathLike | RunDirectory | None = None,
    *,
    solver: Solver | BlackBox | None = None,
    twin: Solver | None = None,
    options: RunOptions | None = None,
    resume: Resume | None = None,
    progress: bool | None = None,
    checkpoint_seconds: float | None = None,
    stop_after_steps: int | None = None,
    workers: int | None = None,
) -> TrainResult:
    """Train a corrector on ``dataset`` as ``config`` says; returns the model and its history.

    ``solver``: the coarse solver to train with (default: the scenario's own; e.g. an external
    process).  ZO-SOL and NOG-SOL only ever call its black-box view.  ``twin``: a differentiable
    twin of ``solver`` (FO-SOL trains through it; the gradient checks compare with it; default:
    ``solver`` if differentiable, else the scenario's coarse solver).  Without a differentiable
    twin the gradient checks compare with float64 finite differences through the black box
    (:mod:`zosol.training.gradcheck`).

    ``run_dir``: where the run's files go (None: nothing is written).  A path is created if
    missing and locked while training (a second process is refused with
    :class:`~zosol.runtime.files.LockedError`; in a torchrun launch rank 0 holds the lock); a
    :class:`~zosol.runtime.rundir.RunDirectory` its caller opened is used as it is.  Every run
    directory holds ``config.json``, ``checkpoint.pt``, ``history.json`` and ``run.json`` (the
    dataset, for ``zosol evaluate RUN``).

    Run controls (:class:`~zosol.runtime.options.RunOptions`): ``options``, or the keywords, which
    override it: ``resume`` (continue from ``run_dir``'s checkpoint; "auto": if there is one),
    ``progress``, ``checkpoint_seconds``, ``stop_after_steps`` (stop, checkpointed, after this many
    optimizer steps in this call; for tests of resumption), ``workers`` (ZO-SOL evaluates its
    perturbation chunks in this many local processes, torch.distributed, gloo on CPU / NCCL on
    GPU, one thread each; the result is identical to one process).
    """
    config.validate()
    options = RunOptions.of(
        options,
        resume=resume,
        progress=progress,
        checkpoint_seconds=checkpoint_seconds,
        stop_after_steps=stop_after_steps,
        workers=workers,
    )
    if options.workers > 1 and (solver is not None or twin is not None) and source_class(config.method).shardable:
        raise UsageError(
            "workers > 1 runs the scenario's own solver in every process; pass solver=None "
            "(and twin=None) or workers=1 (a solver without a batch axis can use several local "
            "processes itself: NumpySolver(..., processes=N))"
        )
    if run_dir is None:
        return _train(dataset, config, None, options, solver, twin)
    directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir, writer=is_lead())
    if directory.is_open or not directory.writer:  # opened by the caller; or another rank's (rank 0 writes)
        return _train(dataset, config, directory, options, solver, twin)
    with directory:
        return _train(dataset, config, directory, options, solver, twin)


def _train(
    dataset: FidelityDataset,
    config: TrainConfig,
    run_dir: RunDirectory | None,
    options: RunOptions,
    solver: Solver | BlackBox | None,
    twin: Solver | None,
) -> TrainResult:
    """train() in its (open) run directory, which names the dataset first."""
    if run_dir is not None:
        run_dir.record_dataset(dataset.path)
    if options.workers > 1 and source_class(config.method).shardable:
        return train_in_processes(dataset, config, run_dir, options)
    return TrainingLoop.setup(dataset, config, run_dir, options, solver, twin).run()
