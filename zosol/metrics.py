"""Error metrics against the high-fidelity reference on the coarse grid.

MAE of one test simulation = mean |corrected - reference| over all frames after the initial one,
all cells and channels; a method's score = mean +- std over the test simulations (as DeepZero and
Solver-in-the-Loop report it).
"""

from __future__ import annotations

import math

import torch

from .errors import UsageError

__all__ = [
    "mae_per_simulation",
    "mae_per_frame",
    "nrmse_per_simulation",
    "channel_sum_mae_per_simulation",
    "relative_l1_per_simulation",
    "summarize",
]


def mae_per_frame(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N, T+1, C, *s) trajectories -> (N, T) MAE of frames 1..T."""
    if pred.shape != ref.shape:
        raise UsageError(f"prediction shape {tuple(pred.shape)} != reference shape {tuple(ref.shape)}")
    return (pred[:, 1:] - ref[:, 1:]).abs().flatten(2).mean(2)


def mae_per_simulation(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N, T+1, C, *s) trajectories -> (N,) MAE over frames 1..T, cells and channels."""
    return mae_per_frame(pred, ref).mean(1)


def nrmse_per_simulation(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,) RMSE over frames 1..T divided by the RMS of the reference frames 1..T."""
    err = (pred[:, 1:] - ref[:, 1:]).pow(2).flatten(1).mean(1).sqrt()
    return err / ref[:, 1:].pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12)


def channel_sum_mae_per_simulation(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,) the Solver-in-the-Loop book's karman2d error: per frame, the sum over channels of each
    channel's mean |difference| (``mean|dvx| + mean|dvy|``), averaged over frames 1..T.  With equally
    sized channels this is exactly C times :func:`mae_per_simulation`."""
    err = (pred[:, 1:] - ref[:, 1:]).abs()
    return err.flatten(3).mean(3).sum(2).mean(1)


def relative_l1_per_simulation(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,) the book's newer relative error: per frame sum |difference| / sum |reference| (all cells and
    channels), averaged over frames 1..T."""
    err = (pred[:, 1:] - ref[:, 1:]).abs().flatten(2).sum(2)
    return (err / ref[:, 1:].abs().flatten(2).sum(2).clamp_min(1e-12)).mean(1)


def summarize(values: torch.Tensor | list[float]) -> dict[str, float]:
    """Mean and (population) std of per-simulation values; NaN-safe (a NaN mean is reported)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.numel() == 0:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False))}
