"""Finite-difference directional derivatives of a window loss, in float64: an independent check
of any gradient of the corrector's parameters that needs nothing but the solver's ``step``.

For unit directions ``v_1 .. v_k`` in parameter space (seeded Gaussian, normalised), the central
difference ``(L(theta + eps v) - L(theta - eps v)) / (2 eps)`` of the SOL window loss ``L`` is
computed with a float64 copy of the corrector and float64 states (a solver that works in float32
inside, e.g. a ``NumpySolver``, still returns float64 tensors); a gradient ``g`` is then compared by
its projections ``g . v_i``: the cosine between the two k-vectors and the largest relative error.
The high-level check of training methods is :func:`zosol.training.gradcheck.check_gradient`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .rollout import WindowBatch, window_loss

__all__ = ["random_directions", "fd_directional_derivatives", "compare_projections"]

Step = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def random_directions(model: torch.nn.Module, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` seeded unit vectors (k, D) in the flat parameter space of ``model`` (float64)."""
    d = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


@torch.no_grad()
def fd_directional_derivatives(
    model: torch.nn.Module,
    step: Step,
    batch: WindowBatch,
    directions: torch.Tensor,
    eps: float = 1e-3,
    loss: str = "mse",
) -> torch.Tensor:
    """Central-difference derivatives (k,) of the mean window loss along ``directions`` (k, D).

    ``batch``: the windows (see :class:`zosol.rollout.WindowBatch`); ``step`` is called on float64
    states."""
    twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    theta = torch.nn.utils.parameters_to_vector(twin.parameters()).clone()
    as64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    batch = batch.map(as64)
    out = []
    for v in directions.to(torch.float64):
        values = []
        for sign in (1.0, -1.0):
            torch.nn.utils.vector_to_parameters(theta + sign * eps * v, twin.parameters())
            values.append(window_loss(step, twin, batch, 1, loss)[0])
        out.append((values[0] - values[1]) / (2 * eps))
    return torch.stack(out)


def compare_projections(gradient: torch.Tensor, directions: torch.Tensor, derivatives: torch.Tensor) -> dict:
    """``gradient`` (D,) projected on ``directions`` (k, D) vs ``derivatives`` (k,): cosine of the
    two k-vectors, largest relative error (scaled by the largest derivative), both projections."""
    proj = directions.to(torch.float64) @ gradient.detach().to("cpu", torch.float64)
    cos = float(torch.nn.functional.cosine_similarity(proj, derivatives, dim=0))
    rel = float((proj - derivatives).abs().max() / derivatives.abs().max().clamp_min(1e-300))
    return {"cosine": cos, "max_rel_err": rel, "projections": proj.tolist(), "fd": derivatives.tolist()}
