"""``train()``: the public entry point of training."""
from __future__ import annotations

import os

from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..solvers.base import BlackBox, Solver
from .loop import TrainingLoop
from .processes import train_in_processes
from .sources import source_class
from .state import TrainResult

__all__ = ["train"]


def train(dataset: FidelityDataset, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
          resume: bool = False, progress: bool = True, solver: Solver | BlackBox | None = None,
          checkpoint_seconds: float = 60.0, stop_after_steps: int | None = None, workers: int = 1) -> TrainResult:
    """Train a corrector on ``dataset`` as ``config`` says; returns the model and its history.

    ``solver``: the coarse solver to train with (default: the scenario's own; e.g. an external
    process).  ZO-SOL and NOG-SOL only ever call its black-box view.  ``run_dir``: where the
    checkpoint goes (None: no checkpoints).  ``resume``: continue from ``run_dir``'s checkpoint.
    ``stop_after_steps``: stop (with a checkpoint) after this many optimizer steps in this call,
    for tests of resumption.  ``workers``: ZO-SOL evaluates its perturbation chunks in this many
    local processes (torch.distributed, gloo on CPU / NCCL on GPU; one thread each); the result is
    identical to one process.
    """
    config.validate()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and source_class(config.method).shardable:
        if solver is not None:
            raise ValueError("workers > 1 runs the scenario's own solver in every process; "
                             "pass solver=None or workers=1")
        return train_in_processes(dataset, config, run_dir, workers, resume=resume, progress=progress,
                                  checkpoint_seconds=checkpoint_seconds, stop_after_steps=stop_after_steps)
    loop = TrainingLoop.setup(dataset, config, run_dir, resume, progress, solver)
    return loop.run(stop_after_steps, checkpoint_seconds)
