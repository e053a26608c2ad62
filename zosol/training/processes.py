"""A run in several local processes (``train(..., workers=N)``): every process runs the same
loop on the same data; a shardable gradient source (ZO-SOL) splits its perturbation chunks over
the processes with torch.distributed (gloo on CPU / NCCL on GPU), so the result is identical to
one process.  Rank 0 writes the checkpoint; a failure is re-raised here with its own type."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .. import zo
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..solvers.base import SolverError
from .checkpoint import load_run
from .errors import CheckpointError, TrainingDiverged, TrainingError
from .loop import TrainingLoop
from .state import TrainResult

__all__ = ["train_in_processes"]

_ERRORS = {e.__name__: e for e in (TrainingError, TrainingDiverged, SolverError, CheckpointError)}


def _worker(rank: int, world_size: int, dataset: FidelityDataset, config: TrainConfig, run_dir: Path,
            kwargs: dict[str, Any]) -> None:
    """One process of a multi-process run; failures are written to ``run_dir/failure.json``."""
    try:
        loop = TrainingLoop.setup(dataset, config, run_dir, kwargs["resume"], kwargs["progress"], None)
        loop.run(kwargs["stop_after_steps"], kwargs["checkpoint_seconds"])
    except (TrainingError, SolverError, CheckpointError, ValueError) as e:
        if rank == 0:
            (run_dir / "failure.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise


def train_in_processes(dataset: FidelityDataset, config: TrainConfig, run_dir: str | os.PathLike | None,
                       workers: int, *, resume: bool, progress: bool, checkpoint_seconds: float,
                       stop_after_steps: int | None) -> TrainResult:
    """Run the training loop in ``workers`` processes and load rank 0's result (a temporary run
    directory if ``run_dir`` is None)."""
    kwargs = dict(resume=resume, progress=progress, checkpoint_seconds=checkpoint_seconds,
                  stop_after_steps=stop_after_steps)
    with tempfile.TemporaryDirectory(prefix="zosol-run-") as scratch:
        run = Path(run_dir) if run_dir is not None else Path(scratch)
        run.mkdir(parents=True, exist_ok=True)
        failure = run / "failure.json"
        failure.unlink(missing_ok=True)
        try:
            zo.spawn_local(_worker, workers, args=(dataset, config, run, kwargs))
        except Exception as e:  # a worker failed: re-raise what it reported, with its own type
            if failure.exists():
                info = json.loads(failure.read_text())
                failure.unlink()
                raise _ERRORS.get(info["type"], ValueError)(info["message"]) from None
            raise TrainingError(f"a training worker process failed: {e}") from e
        model, ckpt = load_run(run, dataset)
        stopped = stop_after_steps is not None and ckpt["epoch"] < config.epochs
        return TrainResult(model, config, ckpt["history"], Path(run_dir) if run_dir is not None else None,
                           {"stopped_early": True} if stopped else {})
