"""Training correctors: one loop for every method; the gradient source is what differs.

Modules (each small, no cycles; read in this order):

* :mod:`~zosol.training.windows`     ``Windows``: SOL-m training windows, seeded order, batches.
* :mod:`~zosol.training.sources`     ``GradientSource`` / ``AutogradSource`` (the base classes of
  the methods' gradient steps, :mod:`zosol.methods`); ``SolverViews`` (black box or differentiable,
  each a counted ``zosol.rollout.SolverCounter``).
* :mod:`~zosol.training.sparsity`    layer-wise pruning ratios of sparse ZO-SOL.
* :mod:`~zosol.training.state`       ``RunState`` (everything a checkpoint holds), ``TrainResult``.
* :mod:`~zosol.training.checkpoint`  atomic checkpoints, resume checks, ``load_run``.
* :mod:`~zosol.training.gradcheck`   gradient checks (vs the differentiable twin / finite differences):
  the loop's ``GradientCheck`` and the public ``check_gradient``.
* :mod:`~zosol.training.loop`        ``TrainingLoop``: sample -> source -> callbacks -> optimizer.
* :mod:`~zosol.training.processes`   the same loop in several local processes (``workers``).
* :mod:`~zosol.training.budget`      memory estimate of a config, refused up front above the machine's.
* :mod:`~zosol.training.api`         ``train()``, the public entry point.
"""

from .api import train
from .checkpoint import CHECKPOINT_VERSION, Checkpointer, load_run, read_checkpoint
from .errors import CheckpointError, TrainingDiverged, TrainingError, ZOUnderflowWarning
from .loop import TrainingLoop
from .sources import AutogradSource, GradientSource, SolverCounter, SolverViews, source_class
from .state import RunState, TrainResult, make_corrector
from .windows import WindowBatch, Windows

__all__ = [
    "train",
    "TrainResult",
    "load_run",
    "make_corrector",
    "TrainingError",
    "TrainingDiverged",
    "CheckpointError",
    "ZOUnderflowWarning",
    "CHECKPOINT_VERSION",
    "Checkpointer",
    "read_checkpoint",
    "RunState",
    "TrainingLoop",
    "GradientSource",
    "AutogradSource",
    "source_class",
    "SolverCounter",
    "SolverViews",
    "Windows",
    "WindowBatch",
]
