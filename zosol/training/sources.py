"""Gradient sources: what differs between the training methods.

A :class:`GradientSource` turns one batch of training windows into a loss and writes the
gradient of that loss w.r.t. the corrector's parameters into ``param.grad``; it declares which
view of the coarse solver it needs (``needs``): its black box (``step`` without autograd, e.g. an
external process) or a differentiable solver (autograd through ``step``).  The training loop
(``zosol.training.loop``) is the same for every source.

* ``non``     NON: m = 1 on pre-computed (coarse step of a reference frame, next reference frame)
              pairs; the corrector never sees its own corrections.
* ``nog-sol`` NOG-SOL: the unrolled m-step window with the gradient cut at every solver call
              (black-box solver, autograd through the network only; List et al. 2024).
* ``fo-sol``  FO-SOL: autograd through the differentiable coarse solver over the window.
* ``zo-sol``  ZO-SOL: the solver is only queried through its black-box view; the gradient is
              DeepZero's coordinate-wise estimate (``zosol.zo``), optionally sparse, evaluated
              for all perturbations as one folded batch.
* ``zo-jac-sol`` ZO-JAC-SOL: the window through the black box, autograd through the corrector,
              and every solver call's backward replaced by the transpose of a finite-difference
              Jacobian of the black box at that call's input (``zosol.zo.jacobian``): its cost is
              the Jacobian's probes (2 x colours for a local stencil, 2n dense), not the network's size.

Adding a method: subclass :class:`GradientSource`, decorate it with :func:`register_source`
and name it in ``zosol.config.Method`` (the registry refuses names the config does not accept,
and importing this module fails if a configured method has no source).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .. import zo
from ..config import METHODS, TrainConfig
from ..rollout import window_loss
from ..solvers.base import BlackBox, Solver, default_twin, is_differentiable
from .errors import ZOUnderflowWarning
from .sparsity import layer_ratios
from .windows import WindowBatch, Windows

__all__ = [
    "SolverCounter",
    "SolverViews",
    "GradientSource",
    "SOURCES",
    "register_source",
    "source_class",
    "NonSource",
    "NogSolSource",
    "FoSolSource",
    "ZoSolSource",
    "ZoJacSolSource",
    "cost_model",
]

Step = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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

    Class attributes: ``name`` (the config's ``method``), ``needs`` ("blackbox" or
    "differentiable": the solver view :meth:`step` calls), ``gradient_check`` (compare its
    gradients with autograd through the differentiable twin at ``config.grad_checks`` steps),
    ``shardable`` (``train(workers=N)`` may split its evaluations over N processes).
    """

    name: ClassVar[str]
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


SOURCES: dict[str, type[GradientSource]] = {}


def register_source(cls: type[GradientSource]) -> type[GradientSource]:
    """Class decorator: make ``cls`` the gradient source of ``config.method == cls.name``."""
    if cls.name not in METHODS:
        raise ValueError(
            f"gradient source '{cls.name}' is not a training method of zosol.config.METHODS "
            f"{list(METHODS)}; add it there"
        )
    if cls.needs not in ("blackbox", "differentiable"):
        raise ValueError(
            f"gradient source '{cls.name}': needs must be 'blackbox' or 'differentiable', got {cls.needs!r}"
        )
    SOURCES[cls.name] = cls
    return cls


def source_class(method: str) -> type[GradientSource]:
    """The registered source of ``method``."""
    if method not in SOURCES:
        raise ValueError(f"unknown method '{method}'; choose one of {list(SOURCES)}")
    return SOURCES[method]


class _AutogradSource(GradientSource):
    """Loss of the window rolled out with :meth:`_step_fn`; autograd gives the gradient."""

    def _step_fn(self, batch: WindowBatch) -> Step:
        return self.solver_step

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        loss = window_loss(self._step_fn(batch), self.model, batch, 1, self.config.loss)[0]
        if torch.isfinite(loss):
            loss.backward()
        return loss


@register_source
class NonSource(_AutogradSource):
    """NON: the coarse step of every reference frame is computed once (black box); m = 1."""

    name = "non"
    needs = "blackbox"

    def prepare(self, history: dict[str, Any]) -> None:
        w = self.windows
        with torch.no_grad():
            traj = w.traj
            flat = traj[:, :-1].reshape(-1, *traj.shape[2:])
            p = w.params.repeat_interleave(traj.shape[1] - 1, 0) if w.num_params else None
            self.coarse_next = self.solver_step(flat, p).view(traj.shape[0], traj.shape[1] - 1, *traj.shape[2:])

    def _step_fn(self, batch: WindowBatch) -> Step:
        cached = self.coarse_next[batch.sim, batch.frame]
        return lambda s, p: cached


@register_source
class NogSolSource(_AutogradSource):
    """NOG-SOL: the black-box solver in the window, autograd through the corrector only."""

    name = "nog-sol"
    needs = "blackbox"


@register_source
class FoSolSource(_AutogradSource):
    """FO-SOL: autograd through the differentiable solver over the whole window."""

    name = "fo-sol"
    needs = "differentiable"


@register_source
class ZoSolSource(GradientSource):
    """ZO-SOL: coordinate-wise ZO estimate (structured, feature-reusing forward) through the
    black box; sparse when ``zo_sparsity > 0`` (layer ratios computed once, stored in history)."""

    name = "zo-sol"
    needs = "blackbox"
    gradient_check = True
    shardable = True

    def prepare(self, history: dict[str, Any]) -> None:
        self.schedule = None
        if self.config.zo_sparsity > 0:
            if history["lprs"] is None:
                history["lprs"] = layer_ratios(
                    self.model, self.windows, self.solvers.blackbox, self.solvers.differentiable, self.config
                )
            self.schedule = zo.MaskScheduler(
                dict(self.model.named_parameters()), history["lprs"], self.config.zo_mask_every, self.config.seed
            )

    def start_epoch(self, epoch: int) -> None:
        self.masks = self.schedule.masks(epoch) if self.schedule is not None else None

    def checkpoint_masks(self, epoch: int) -> dict[str, torch.Tensor] | None:
        return None if self.schedule is None else self.schedule.masks(min(epoch, self.config.epochs - 1))

    def cost(self) -> str | None:
        d = sum(p.numel() for p in self.model.parameters())
        unmasked = max(1, round((1 - self.config.zo_sparsity) * d))
        jac = zo.FDJacobian.for_step(
            self.solvers.blackbox,
            self.windows.traj.shape[2:],
            pattern="stencil" if self.solvers.stencil_reach else "dense",
            stencil_reach=self.solvers.stencil_reach,
            scheme=self.config.zo_scheme,
        )
        note = "declared stencil" if self.solvers.stencil_reach else "dense bound: no declared stencil"
        return cost_model(d, unmasked, self.config.zo_scheme, jac.probes_per_sample, note)

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        c, blackbox = self.config, self.solver_step
        est = zo.cge_structured(
            self.model,
            lambda forward, p: window_loss(blackbox, forward, batch, p, c.loss),
            mu=c.zo_mu,
            scheme=c.zo_scheme,
            masks=self.masks,
            chunk_size=c.zo_chunk,
            reuse=c.zo_reuse,
            batch_size=batch.size,
            distributed=self.distributed,
        )
        history["zo_queries"] += est.queries
        with torch.no_grad():
            loss = window_loss(blackbox, self.model, batch, 1, c.loss)[0]
        self._warn_if_underflow(est.flat(), float(loss))
        zo.write_grads(self.model, est.grads)
        return loss

    def _warn_if_underflow(self, grad: torch.Tensor, loss: float) -> None:
        """Warn once (rank 0) when the estimate is all zeros for a non-zero loss: zo_mu underflows."""
        if getattr(self, "_warned", False) or loss == 0 or bool(grad.any()):
            return
        self._warned = True
        if self.distributed and torch.distributed.get_rank() != 0:
            return
        warnings.warn(
            f"the ZO gradient estimate is exactly zero for a loss of {loss:.3g}: the perturbation "
            f"--zo-mu {self.config.zo_mu:g} underflows (theta +- mu gives the same loss in float32), so "
            f"training does not move; use a larger --zo-mu such as 1e-3",
            ZOUnderflowWarning,
            stacklevel=2,
        )


def cost_model(d: int, unmasked: int, scheme: str, jac_probes: int, jac_note: str) -> str:
    """The cost line printed at the start of ZO training: black-box evaluations per sample-step
    (one window step of one sample) of ZO-SOL (one perturbed window per estimated coordinate:
    2 x unmasked coordinates, central; unmasked + 1, forward) and of ZO-JAC-SOL (the step itself
    plus the Jacobian's probes, for every step after a window's first)."""
    zo_sol = 2 * unmasked if scheme == "central" else unmasked + 1
    which = "ZO-JAC-SOL" if 1 + jac_probes < zo_sol else "ZO-SOL"
    masked = "" if unmasked == d else f", {unmasked} unmasked"
    return (
        f"cost model, black-box evaluations per sample-step: ZO-SOL {zo_sol} ({scheme}, d = {d} parameters"
        f"{masked}); ZO-JAC-SOL {1 + jac_probes} (1 + {jac_probes} Jacobian probes, {jac_note}); "
        f"{which} is cheaper"
    )


@register_source
class ZoJacSolSource(_AutogradSource):
    """ZO-JAC-SOL: autograd through the corrector, finite-difference Jacobians of the black box
    for the solver calls (:func:`zosol.zo.fd_step`).  The Jacobian's structure is chosen once
    (``config.jac_pattern``) and kept in ``history["jacobian"]`` (a resumed run reuses it, and
    patterns widened by the leak check are stored again); probe evaluations count in
    ``history["zo_queries"]`` and in the black box's solver counts."""

    name = "zo-jac-sol"
    needs = "blackbox"
    gradient_check = True
    shardable = True  # the probe batches (of jac_batch states) are shared out over the ranks

    def prepare(self, history: dict[str, Any]) -> None:
        c, w = self.config, self.windows
        kw = dict(mu=c.zo_mu, scheme=c.zo_scheme, max_batch=c.jac_batch, distributed=self.distributed)
        saved = history.get("jacobian")
        if saved is not None:
            self.jac = zo.FDJacobian.from_pattern_state(self.solver_step, saved["pattern"], **kw)
            self.jac.events = list(saved["events"])
        else:
            frames = w.traj.flatten(0, 1)
            pick = torch.linspace(0, frames.shape[0] - 1, c.jac_probe_states).round().long()
            params = w.params.repeat_interleave(w.traj.shape[1], 0)[pick] if w.num_params else None
            self.jac = zo.FDJacobian.for_step(
                self.solver_step,
                w.traj.shape[2:],
                pattern=c.jac_pattern,
                states=frames[pick],
                params=params,
                margin=c.jac_margin,
                stencil_reach=self.solvers.stencil_reach,
                **kw,
            )
            history["zo_queries"] += self.jac.evaluations
        self.fd_step = zo.fd_step(self.jac)
        self._record(history)

    def _record(self, history: dict[str, Any]) -> None:
        history["jacobian"] = {
            "pattern": self.jac.pattern_state(),
            "describe": self.jac.describe(),
            "probes_per_sample": self.jac.probes_per_sample,
            "events": list(self.jac.events),
        }

    def cost(self) -> str | None:
        d = sum(p.numel() for p in self.model.parameters())
        return f"{self.jac.describe()}\n" + cost_model(
            d, d, self.config.zo_scheme, self.jac.probes_per_sample, "dense" if self.jac.is_dense else "sparse"
        )

    def _step_fn(self, batch: WindowBatch) -> Step:
        return self.fd_step

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        events, spent = len(self.jac.events), self.jac.evaluations
        loss = super().step(batch, history)
        history["zo_queries"] += self.jac.evaluations - spent
        if len(self.jac.events) != events:
            self._record(history)
        return loss


_missing = [m for m in METHODS if m not in SOURCES]
if _missing:
    raise ImportError(f"training method(s) {_missing} of zosol.config.METHODS have no registered gradient source")
