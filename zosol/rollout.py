"""Corrected rollouts and SOL window losses.

A corrected step is ``s_{t+1} = P(s_t) + C(P(s_t))``: the coarse solver ``P`` first, then the
corrector ``C`` sees the coarse result (with the scenario's feature channels appended) and adds
its correction.  A SOL-m *window* starts from a reference frame, takes m corrected steps and
compares each with the reference.

For zeroth-order training the perturbation axis is folded into the solver batch: the window loss
is written against a ``forward`` callable that evaluates the corrector under P parameter
perturbations at once (``zosol.zo.cge_structured``).  ``forward`` takes ``(B, ...)`` (the same
input for every perturbation) or ``(P*B, ...)`` (block p of B rows for perturbation p) and returns
``(P*B, ...)``; a plain ``nn.Module`` is such a callable with P = 1.  The first step's solver call
and corrector input are shared by all perturbations; after that one solver call advances all
``P*B`` perturbed rollouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import LOSSES as LOSS_NAMES
from .errors import UsageError
from .models import corrector_input

__all__ = ["WindowBatch", "SolverCounter", "Step", "corrected_rollout", "window_loss", "LOSSES"]

Step = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Forward = Callable[[torch.Tensor], torch.Tensor]


class SolverCounter:
    """Wraps a solver's ``step`` and counts calls and sample-steps (batch entries advanced)."""

    def __init__(self, step: Step):
        self._step = step
        self.calls = 0
        self.samples = 0

    def __call__(self, state: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.samples += state.shape[0]
        return self._step(state, params)


_POINTWISE = {
    "mse": lambda err: err.pow(2),
    "l1": lambda err: err.abs(),
}
#: pointwise losses by ``TrainConfig.loss`` name (the names are declared in zosol.config)
LOSSES = {name: _POINTWISE[name] for name in LOSS_NAMES}


@dataclass(frozen=True)
class WindowBatch:
    """A batch of B SOL windows: where they start and the reference frames they are compared with.

    ``sim`` / ``frame`` say which training simulation and frame each window starts at (None for a
    batch not drawn from a dataset's windows, e.g. in a test)."""

    start: torch.Tensor  #: (B, C, *s) the reference frame the window starts from
    targets: torch.Tensor  #: (B, m, C, *s) the reference frames after 1..m steps
    params: torch.Tensor | None = None  #: (B, K) per-simulation parameters, None if the solver has none
    features: torch.Tensor | None = None  #: (B, F, *s) corrector feature channels, or None
    sim: torch.Tensor | None = None  #: (B,) training simulation of each window
    frame: torch.Tensor | None = None  #: (B,) frame the window starts at

    @property
    def size(self) -> int:
        """B, the number of windows."""
        return self.start.shape[0]

    def first_steps(self, k: int) -> WindowBatch:
        """The same windows cut to their first ``k`` steps."""
        return dataclasses.replace(self, targets=self.targets[:, :k])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WindowBatch:
        """``fn`` applied to every tensor that enters the loss (start, targets, params, features)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return dataclasses.replace(
            self, start=fn(self.start), targets=fn(self.targets), params=opt(self.params), features=opt(self.features)
        )


def _repeat(t: torch.Tensor | None, p: int) -> torch.Tensor | None:
    """(B, ...) -> (p*B, ...): block i of B rows is a copy of ``t`` for perturbation i."""
    return t if t is None or p == 1 else t.repeat(p, *([1] * (t.dim() - 1)))


def window_loss(
    step: Step,
    forward: Forward,
    batch: WindowBatch,
    perturbations: int = 1,
    loss: str = "mse",
) -> torch.Tensor:
    """Mean loss of each perturbation over an m-step corrected window.

    Args:
        step: solver step ``(N, C, *s), (N, K) | None -> (N, C, *s)`` (a black box for ZO-SOL).
        forward: corrector under ``perturbations`` parameter sets (see module docstring).
        batch: the B windows (start (B, C, *s), targets (B, m, C, *s), params (B, K) or None,
            features (B, F, *s) or None).
        perturbations: P, the parameter sets ``forward`` evaluates at once.
        loss: the pointwise loss's name (:data:`LOSSES`).
    Returns:
        (P,) mean over windows, steps, channels and cells of ``loss`` per perturbation.
    """
    if loss not in LOSSES:
        raise UsageError(f"unknown loss '{loss}'; choose one of {sorted(LOSSES)}")
    start, targets, params, features = batch.start, batch.targets, batch.params, batch.features
    p, b, m = perturbations, start.shape[0], targets.shape[1]
    pointwise = LOSSES[loss]
    coarse = step(start, params)
    state = _repeat(coarse, p) + forward(corrector_input(coarse, features))
    params_p, features_p = _repeat(params, p), _repeat(features, p)
    total = pointwise(state.view(p, b, *state.shape[1:]) - targets[:, 0]).flatten(1).mean(1)
    for k in range(1, m):
        coarse = step(state, params_p)
        state = coarse + forward(corrector_input(coarse, features_p))
        total = total + pointwise(state.view(p, b, *state.shape[1:]) - targets[:, k]).flatten(1).mean(1)
    return total / m


@torch.no_grad()
def corrected_rollout(
    step: Step,
    corrector: Forward | None,
    start: torch.Tensor,
    params: torch.Tensor | None,
    features: torch.Tensor | None,
    steps: int,
) -> torch.Tensor:
    """Roll out ``steps`` corrected steps from ``start`` (B, C, *s): returns (B, steps + 1, C, *s).

    ``corrector=None`` gives the bare coarse solver (SRC)."""
    frames = [start]
    state = start
    for _ in range(steps):
        state = step(state, params)
        if corrector is not None:
            state = state + corrector(corrector_input(state, features))
        frames.append(state)
    return torch.stack(frames, 1)
