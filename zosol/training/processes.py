"""A run in several local processes (``train(..., workers=N)``): every process runs the same
loop on the same data; a shardable gradient source (ZO-SOL) splits its perturbation chunks over
the processes with torch.distributed (gloo on CPU / NCCL on GPU), so the result is identical to
one process.  Rank 0 writes the checkpoint; a failure is re-raised here with its own type.

Process hygiene: every worker dies with its parent (``PR_SET_PDEATHSIG``: ``kill -9`` of the
parent leaves no worker training on); SIGTERM to the parent is forwarded to the workers, which
stop at the same step, checkpoint and exit, and the parent raises
:class:`~zosol.runtime.stop.Terminated` (a worker that does not stop within
``stop.GRACE_SECONDS`` is killed).  The number of workers is bounded by the CPU cores
(:func:`zosol.runtime.workers.check_workers`)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .. import zo
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..runtime import stop
from ..runtime.files import atomic_write_text
from ..runtime.workers import exit_now
from ..solvers.base import SolverError
from .checkpoint import load_run
from .errors import CheckpointError, TrainingDiverged, TrainingError, show_warning
from .loop import TrainingLoop
from .state import TrainResult

__all__ = ["train_in_processes"]

_ERRORS = {e.__name__: e for e in (TrainingError, TrainingDiverged, SolverError, CheckpointError, stop.Terminated)}


def _worker(
    rank: int, world_size: int, dataset: FidelityDataset, config: TrainConfig, run_dir: Path, kwargs: dict[str, Any]
) -> None:
    """One process of a multi-process run; failures (and a SIGTERM stop) are written to
    ``run_dir/failure.json`` by rank 0."""
    stop.die_with_parent(kwargs["parent"])
    stop.install_sigterm_handler()
    warnings.showwarning = show_warning  # one line, as in the parent
    try:
        loop = TrainingLoop.setup(dataset, config, run_dir, kwargs["resume"], kwargs["progress"], None)
        loop.run(kwargs["stop_after_steps"], kwargs["checkpoint_seconds"])
    except (TrainingError, SolverError, CheckpointError, ValueError, stop.Terminated) as e:
        if rank == 0:
            info = json.dumps({"type": type(e).__name__, "message": str(e)})
            atomic_write_text(run_dir / "failure.json", info)
        if isinstance(e, stop.Terminated):  # a clean stop (every rank at the same step): the parent raises it;
            exit_now()
        raise


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def _reraise_failure(failure: Path) -> None:
    """Raise what a worker reported in ``failure`` (with its own type), if anything."""
    if failure.exists():
        info = json.loads(failure.read_text())
        failure.unlink()
        raise _ERRORS.get(info["type"], ValueError)(info["message"]) from None


def train_in_processes(
    dataset: FidelityDataset,
    config: TrainConfig,
    run_dir: str | os.PathLike | None,
    workers: int,
    *,
    resume: bool,
    progress: bool,
    checkpoint_seconds: float,
    stop_after_steps: int | None,
) -> TrainResult:
    """Run the training loop in ``workers`` processes and load rank 0's result (a temporary run
    directory if ``run_dir`` is None)."""
    kwargs = dict(
        resume=resume,
        progress=progress,
        checkpoint_seconds=checkpoint_seconds,
        stop_after_steps=stop_after_steps,
        parent=os.getpid(),
    )
    with tempfile.TemporaryDirectory(prefix="zosol-run-") as scratch:
        run = Path(run_dir) if run_dir is not None else Path(scratch)
        run.mkdir(parents=True, exist_ok=True)
        failure = run / "failure.json"
        failure.unlink(missing_ok=True)
        with stop.deferred():  # SIGTERM is forwarded to the workers, which stop cleanly
            try:
                zo.spawn_local(_worker, workers, args=(dataset, config, run, kwargs))
            except Exception as e:  # a worker failed: re-raise what it reported, with its own type
                _reraise_failure(failure)
                if stop.requested():
                    raise stop.Terminated(
                        f"stopped by SIGTERM (workers killed); the last checkpoint is in {run}, rerun with --resume"
                    ) from None
                raise TrainingError(f"a training worker process failed: {_first_line(e)}") from e
        _reraise_failure(failure)
        model, ckpt = load_run(run, dataset)
        stopped = stop_after_steps is not None and ckpt["epoch"] < config.epochs
        return TrainResult(
            model,
            config,
            ckpt["history"],
            Path(run_dir) if run_dir is not None else None,
            {"stopped_early": True} if stopped else {},
        )
