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

import contextlib
import dataclasses
import os
import pickle
import tempfile
import warnings
from pathlib import Path

from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..runtime import stop
from ..runtime.options import RunOptions
from ..runtime.rundir import RunDirectory
from ..runtime.workers import exit_now, lost_a_peer
from ..solvers.base import SolverError
from ..zo.parallel import spawn_local
from .checkpoint import load_run
from .errors import CheckpointError, TrainingDiverged, TrainingError, show_warning
from .loop import TrainingLoop
from .state import TrainResult

__all__ = ["train_in_processes"]

_ERRORS = {e.__name__: e for e in (TrainingError, TrainingDiverged, SolverError, CheckpointError, stop.Terminated)}


def _worker(
    rank: int,
    world_size: int,
    dataset: FidelityDataset,
    config: TrainConfig,
    run_dir: Path,
    options: RunOptions,
    parent: int,
) -> None:
    """One process of a multi-process run, in ``run_dir`` (held open by the parent); rank 0
    writes the checkpoint and records what stopped the run (also a SIGTERM stop)."""
    stop.die_with_parent(parent)
    stop.install_sigterm_handler()
    warnings.showwarning = show_warning  # one line, as in the parent
    directory = RunDirectory(run_dir, writer=rank == 0)
    try:
        if isinstance(dataset, DatasetByName):
            dataset = dataset.open()
        TrainingLoop.setup(dataset, config, directory, options).run()
    except (TrainingError, SolverError, CheckpointError, ValueError, stop.Terminated) as e:
        directory.record_failure(e)
        if isinstance(e, stop.Terminated):  # a clean stop (every rank at the same step): the parent raises it;
            exit_now()
        raise
    except RuntimeError as e:  # another worker vanished mid-collective: the parent names the lost worker
        if not lost_a_peer(e):
            raise
        exit_now(1)  # quietly: no traceback of this rank's broken connection


@dataclasses.dataclass(frozen=True)
class DatasetByName:
    """What a worker needs to open the dataset itself when its scenario does not pickle (a
    ``make_scenario`` plugin: closures): the file, the scenario's name and the plugin modules
    this process imported, which the worker imports by name before opening the file."""

    path: str
    scenario: str
    plugins: tuple[str, ...]

    def open(self) -> FidelityDataset:
        from ..datasets.hdf5 import load_dataset
        from ..solvers.plugins import load_plugin

        for module in self.plugins:
            load_plugin(module)
        return load_dataset(self.path, self.scenario)


def _for_workers(dataset: FidelityDataset) -> FidelityDataset | DatasetByName:
    """``dataset`` itself when its scenario pickles, else the plugin modules and file to rebuild it."""
    from ..solvers.plugins import loaded_plugins

    try:
        pickle.dumps(dataset.scenario)
        return dataset
    except Exception:  # noqa: BLE001 - closures, lambdas, local classes: rebuilt by name in the worker
        return DatasetByName(str(Path(dataset.path).resolve()), dataset.scenario.name, loaded_plugins())


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def _reraise_failure(run_dir: RunDirectory) -> None:
    """Raise what a worker recorded in ``run_dir`` (with its own type), if anything."""
    info = run_dir.take_failure()
    if info is not None:
        raise _ERRORS.get(info["type"], ValueError)(info["message"]) from None


def train_in_processes(
    dataset: FidelityDataset, config: TrainConfig, run_dir: RunDirectory | None, options: RunOptions
) -> TrainResult:
    """Run the training loop in ``options.workers`` processes and load rank 0's result (in a
    temporary run directory if ``run_dir`` is None)."""
    scratch = tempfile.TemporaryDirectory(prefix="zosol-run-") if run_dir is None else contextlib.nullcontext()
    with scratch as tmp:  # a temporary run directory only when none is given (removed on every exit)
        run = run_dir if run_dir is not None else RunDirectory(tmp)
        run.clear_failure()
        with stop.deferred():  # SIGTERM is forwarded to the workers, which stop cleanly
            try:
                spawn_local(
                    _worker, options.workers, args=(_for_workers(dataset), config, run.path, options, os.getpid())
                )
            except Exception as e:  # a worker failed: re-raise what it reported, with its own type
                _reraise_failure(run)
                if stop.requested():
                    raise stop.Terminated(
                        f"stopped by SIGTERM (workers killed); the last checkpoint is in {run.path}, "
                        f"rerun with --resume"
                    ) from None
                raise TrainingError(f"a training worker process failed: {_first_line(e)}") from e
        _reraise_failure(run)
        model, ckpt = load_run(run.path, dataset)
        stopped = options.stop_after_steps is not None and ckpt["epoch"] < config.epochs
        return TrainResult(
            model,
            config,
            ckpt["history"],
            run_dir.path if run_dir is not None else None,
            {"stopped_early": True} if stopped else {},
        )
