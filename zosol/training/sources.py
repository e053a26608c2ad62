"""Gradient sources: the gradient step of a training method (:mod:`zosol.methods`).

A :class:`GradientSource` turns one batch of training windows into a loss and writes the
gradient of that loss w.r.t. the corrector's parameters into ``param.grad``; it declares which
view of the coarse solver it needs (``needs``): its black box (``step`` without autograd, e.g. an
external process) or a differentiable solver (autograd through ``step``).  The training loop
(``zosol.training.loop``) is the same for every source.  :class:`AutogradSource` is the source
whose gradient is autograd through the window (the solver calls as :meth:`AutogradSource._step_fn`
gives them).  Each method module of :mod:`zosol.methods` defines its source and registers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .. import methods
from ..config import TrainConfig
from ..rollout import SolverCounter, Step, window_loss
from ..solvers.base import BlackBox, Solver, default_twin, is_differentiable
from .windows import WindowBatch, Windows

__all__ = [
    "SolverCounter",
    "SolverViews",
    "GradientSource",
    "AutogradSource",
    "source_class",
    "Step",
]


@dataclass
class SolverViews:
    """The two views of the coarse solver a run may call, each counted.

    ``blackbox``: the training solver's black-box ``step``.  ``differentiable``: autograd through
    the training solver if it is differentiable, else through the scenario's in-process coarse
    solver (its differentiable twin, used for gradient checks).  ``twin_differentiable`` says
    whether that twin really is differentiable.
    """

    blackbox: SolverCounter
    differentiable: SolverCounter
    twin_differentiable: bool
    #: the training solver's declared stencil half-width per spatial axis (None: not declared)
    stencil_reach: tuple[int, ...] | None = None

    @classmethod
    def of(cls, solver: Solver | BlackBox, scenario: Any, twin: Solver | None = None) -> SolverViews:
        """``twin``: the differentiable twin (default: ``solver`` if differentiable, else the
        scenario's coarse solver)."""
        twin = default_twin(solver, scenario, twin)
        return cls(
            SolverCounter(solver.blackbox().step),
            SolverCounter(twin.step),
            is_differentiable(twin),
            getattr(solver, "stencil_reach", None),
        )

    def sync(self, history: dict[str, Any]) -> None:
        """Write the call and sample-step counts of both views into ``history``."""
        history["solver_calls"] = self.blackbox.calls + self.differentiable.calls
        history["solver_samples"] = self.blackbox.samples + self.differentiable.samples

    def restore(self, history: dict[str, Any]) -> None:
        """Continue counting from a resumed run's ``history``."""
        self.blackbox.calls, self.blackbox.samples = history["solver_calls"], history["solver_samples"]


class GradientSource:
    """Turns a window batch into ``(loss, gradient in .grad)`` for one training method.

    Class attributes: ``needs`` ("blackbox" or "differentiable": the solver view :meth:`step`
    calls), ``gradient_check`` (compare its
    gradients with autograd through the differentiable twin at ``config.grad_checks`` steps),
    ``shardable`` (``train(workers=N)`` may split its evaluations over N processes).
    """

    needs: ClassVar[Literal["blackbox", "differentiable"]]
    gradient_check: ClassVar[bool] = False
    shardable: ClassVar[bool] = False

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        windows: Windows,
        solvers: SolverViews,
        distributed: bool = False,
    ):
        self.model, self.config, self.windows, self.solvers = model, config, windows, solvers
        self.distributed = distributed
        self.masks: dict[str, torch.Tensor] | None = None  # gradient masks of the current epoch (None: dense)
        self.run_dir: Path | None = None  # the run directory (set by the loop before prepare; None: none)

    @property
    def solver_step(self) -> SolverCounter:
        """The solver view this source declared it needs."""
        return self.solvers.differentiable if self.needs == "differentiable" else self.solvers.blackbox

    def prepare(self, history: dict[str, Any]) -> None:
        """Called once before the first step, after a resumed run restored ``history``."""

    def start_epoch(self, epoch: int) -> None:
        """Called at the start (or resumption) of every epoch."""

    def checkpoint_masks(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """The gradient masks to store in a checkpoint written at ``epoch`` (None: dense)."""
        return None

    def cost(self) -> str | None:
        """A line for the start of training: what one gradient costs (None: nothing to say)."""
        return None

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        """The loss of ``batch`` (a scalar tensor); its gradient is left in ``param.grad``
        (which the loop has set to None before)."""
        raise NotImplementedError


def source_class(method: str) -> type[GradientSource]:
    """The gradient source of the registered method ``method`` (ValueError naming the registered ones)."""
    return methods.get(method).source


class AutogradSource(GradientSource):
    """Loss of the window rolled out with :meth:`_step_fn`; autograd gives the gradient."""

    def _step_fn(self, batch: WindowBatch) -> Step:
        return self.solver_step

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        loss = window_loss(self._step_fn(batch), self.model, batch, 1, self.config.loss)[0]
        if torch.isfinite(loss):
            loss.backward()
        return loss
