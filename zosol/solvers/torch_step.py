"""A torch step function as a differentiable :class:`~zosol.solvers.Solver`: :class:`TorchSolver`.

A *differentiable twin* of a black box is the same numerics written in torch, so that autograd
flows through it (FO-SOL trains through it; gradient checks compare with it)::

    def step(u, params):            # u (B, C, *grid) tensor, params (B, K) tensor or None
        return u + dt * rhs(u)      # torch operations only

    twin = TorchSolver(step, dt=0.05, channels=("u",), spatial_shape=(32,))
    compare(scenario, twin=twin)    # or: zosol compare ... --twin my_module:twin

No subclass is needed (a subclass of ``Solver`` implements ``_step`` instead).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import UsageError
from .base import Solver

__all__ = ["TorchSolver"]


class TorchSolver(Solver):
    """``fn(state (B, C, *spatial), params (B, K) | None) -> (B, C, *spatial)`` written in torch, as a
    differentiable Solver.

    Args:
        fn: the step (batched: every state of the batch advances by ``dt``; autograd must flow).
        dt, channels, spatial_shape, num_params: the solver's metadata (as the black box's).
        coords: name -> 1-D coordinates (default: cell-centre indices ``x`` (, ``y``, ``z``)).
        name: shown in messages (default: ``fn.__name__``).
        stencil_reach: optional half-width per spatial axis of one step's stencil (``Solver``).
    """

    differentiable = True

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        *,
        dt: float,
        channels: Sequence[str],
        spatial_shape: Sequence[int],
        num_params: int = 0,
        coords: Mapping[str, Any] | None = None,
        name: str | None = None,
        stencil_reach: Sequence[int] | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"TorchSolver needs a callable fn(state, params) -> state, got {type(fn).__name__}")
        if not dt > 0:
            raise UsageError(f"TorchSolver: dt must be positive, got {dt}")
        self.fn, self.dt = fn, float(dt)
        self.name = name or getattr(fn, "__name__", "fn")
        self.channels = tuple(channels)
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.num_params = int(num_params)
        self.stencil_reach = None if stencil_reach is None else tuple(int(r) for r in stencil_reach)
        names = ("x", "y", "z")
        self.coords = (
            {k: torch.as_tensor(v, dtype=torch.float32) for k, v in coords.items()}
            if coords is not None
            else {names[i]: torch.arange(n, dtype=torch.float32) + 0.5 for i, n in enumerate(self.spatial_shape[:3])}
        )

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        out = self.fn(state, params if self.num_params else None)
        if not isinstance(out, torch.Tensor) or out.shape != state.shape:
            got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {list(out.shape)}"
            raise UsageError(
                f"TorchSolver({self.name}): fn returned {got}, expected a tensor of shape {list(state.shape)}"
            )
        return out

    def __repr__(self) -> str:
        return f"TorchSolver({self.name!r}, dt={self.dt}, spatial_shape={self.spatial_shape})"
