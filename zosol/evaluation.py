"""Evaluation of a corrector on a dataset's test simulations: the corrected coarse solver rolled
out from frame 0 of every test simulation and scored against the reference (:mod:`zosol.metrics`).

A corrected rollout that blows up (the solver raises ``FloatingPointError``, or a simulation's MAE
is non-finite or above ``EXPLODED_FACTOR`` x the reference's largest |value|) raises
:class:`EvaluationDiverged`, never a score.
"""

from __future__ import annotations

from typing import Any

import torch

from .datasets.hdf5 import FidelityDataset
from .metrics import (
    channel_sum_mae_per_simulation,
    mae_per_frame,
    mae_per_simulation,
    nrmse_per_simulation,
    relative_l1_per_simulation,
    summarize,
)
from .rollout import SolverCounter, corrected_rollout
from .solvers.base import BlackBox, Solver
from .training.errors import TrainingDiverged

__all__ = ["evaluate", "EvaluationDiverged", "EXPLODED_FACTOR"]

#: a corrected test rollout whose MAE exceeds this multiple of the reference's largest |value|
#: has left the solution: it is reported as diverged, never as a score
EXPLODED_FACTOR = 10.0


class EvaluationDiverged(TrainingDiverged):
    """A trained corrector's rollout on the test simulations blew up (non-finite, or far outside
    the reference's range)."""


def _rollout(step, model, traj, p_arg, feats) -> torch.Tensor:
    """The corrected rollout (N, T+1, C, *s); a solver blow-up under a corrector is a divergence."""
    try:
        return corrected_rollout(step, model, traj[:, 0], p_arg, feats, traj.shape[1] - 1)
    except FloatingPointError as e:
        if model is None:
            raise
        raise EvaluationDiverged(
            f"the trained corrector diverged on the test simulations: the coarse solver "
            f"blew up ({e}); retrain with a lower --lr"
        ) from e


def _check_exploded(mae: torch.Tensor, traj: torch.Tensor) -> None:
    """EvaluationDiverged if a simulation's MAE is non-finite or above EXPLODED_FACTOR x its max |reference|."""
    scale = traj.flatten(1).abs().max(1).values.clamp_min(1e-12).to(mae)
    bad = ~torch.isfinite(mae) | (mae > EXPLODED_FACTOR * scale)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise EvaluationDiverged(
            f"the trained corrector diverged on the test simulations: MAE {float(mae[i]):.4g} on "
            f"test simulation {i}, whose reference stays within |value| <= {float(scale[i]):.3g}; "
            f"retrain with a lower --lr"
        )


def evaluate(
    dataset: FidelityDataset,
    model: torch.nn.Module | None = None,
    solver: Solver | BlackBox | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Roll out the corrected coarse solver (``model=None``: bare coarse solver, SRC) from frame 0
    of every test simulation and score it against the reference.

    Returns ``mae_mean``, ``mae_std``, ``mae_per_sim`` (N,), ``nrmse_per_sim``, the Solver-in-the-Loop
    book's errors ``book_mae_per_sim`` (sum over channels of the channel MAE) and ``rel_l1_per_sim``,
    ``per_frame`` (N, T) MAE, ``solver_calls``, ``solver_samples`` and ``prediction`` (N, T+1, C, *s).
    Raises :class:`EvaluationDiverged` if a corrected rollout blows up (see EXPLODED_FACTOR)."""
    sc = dataset.scenario
    traj, params = dataset.stacked("test")
    traj, params = traj.to(device), params.to(device)
    solver = solver if solver is not None else sc.coarse_solver()
    step = SolverCounter(solver.blackbox().step)
    feats = sc.corrector_features(params)
    p_arg = params if solver.num_params else None
    if model is not None:
        model = model.to(device).eval()
    pred = _rollout(step, model, traj, p_arg, feats)
    mae = mae_per_simulation(pred, traj)
    if model is not None:
        _check_exploded(mae, traj)
    stats = summarize(mae)
    return {
        "mae_mean": stats["mean"],
        "mae_std": stats["std"],
        "mae_per_sim": mae.tolist(),
        "nrmse_per_sim": nrmse_per_simulation(pred, traj).tolist(),
        "book_mae_per_sim": channel_sum_mae_per_simulation(pred, traj).tolist(),
        "rel_l1_per_sim": relative_l1_per_simulation(pred, traj).tolist(),
        "per_frame": mae_per_frame(pred, traj).tolist(),
        "solver_calls": step.calls,
        "solver_samples": step.samples,
        "prediction": pred.cpu(),
    }
