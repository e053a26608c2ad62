"""The errors a training run raises; each leaves the last good checkpoint intact."""

from __future__ import annotations

from ..errors import DataError, RunFailed

__all__ = ["TrainingError", "TrainingDiverged", "CheckpointError", "ZOUnderflowWarning", "show_warning"]


class TrainingError(RunFailed):
    """Training stopped (solver failure, divergence); the last good checkpoint is intact."""


class TrainingDiverged(TrainingError):
    """The loss, the gradient or the parameters became non-finite."""


class CheckpointError(DataError):
    """A checkpoint is missing, corrupt, or belongs to another config or dataset."""


class ZOUnderflowWarning(UserWarning):
    """ZO-SOL's gradient estimate is exactly zero: the perturbation ``zo_mu`` is too small to
    change the loss in floating point, so training would silently not move."""


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning`` that prints one ``zosol: warning: ...`` line to stderr, above any
    progress bar (the CLI and the ``--workers`` processes use it)."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(f"zosol: warning: {message}", file=sys.stderr)
