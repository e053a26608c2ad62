"""ZO-JAC-SOL: the window through the black box, autograd through the corrector, and every solver
call's backward replaced by the transpose of a finite-difference Jacobian of the black box at that
call's input (``zosol.zo.jacobian``): its cost is the Jacobian's probes (2 x colours for a local
stencil, 2n dense), not the network's size.

Its own options are :class:`JacobianOptions` (config keys ``jac_*``, flags ``--jac-*``): add a
field there for a new Jacobian setting; the finite differences themselves are the shared
``zo_mu`` / ``zo_scheme`` (:mod:`zosol.methods.shared`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from .. import zo
from ..options import option
from ..training.sources import AutogradSource, Step
from ..training.windows import WindowBatch
from .base import Method, register
from .shared import ZO_HISTORY, FiniteDifferenceOptions, GradientCheckOptions, cost_model, zo_entry

__all__ = ["JacobianOptions", "ZoJacSolSource", "METHOD"]


@dataclasses.dataclass
class JacobianOptions:
    """How ZO-JAC-SOL finds and probes the solver Jacobian (config keys ``jac_pattern``, ...)."""

    prefix: ClassVar[str] = "jac_"

    #: how the sparsity pattern of the solver Jacobian is found (zosol.zo.jacobian)
    pattern: Literal["auto", "probe", "stencil", "dense"] = option(
        "auto",
        "ZO-JAC-SOL Jacobian pattern: auto (probe jac_probe_states training "
        "frames), probe, stencil (the solver's stencil_reach) or dense",
    )
    margin: int = option(0, "ZO-JAC-SOL: cells added around the Jacobian pattern", ge=0, cap=1000)
    probe_states: int = option(4, "ZO-JAC-SOL: training frames probed for the pattern", ge=1, cap=10_000)
    batch: int | None = option(
        256, "ZO-JAC-SOL probe states per black-box call, none: all at once", ge=1, cap=10_000_000
    )


class ZoJacSolSource(AutogradSource):
    """Autograd through the corrector, finite-difference Jacobians of the black box
    for the solver calls (:func:`zosol.zo.fd_step`).  The Jacobian's structure is chosen once
    (``config.jac_pattern``) and kept in ``history["jacobian"]`` (a resumed run reuses it, and
    patterns widened by the leak check are stored again); probe evaluations count in
    ``history["zo_queries"]`` and in the black box's solver counts."""

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


def jacobian_entry(h: dict[str, Any]) -> dict[str, Any]:
    """The ZO entry plus the Jacobian's description and its pattern events."""
    return {**zo_entry(h), "jacobian": h["jacobian"]["describe"], "jacobian_events": h["jacobian"]["events"]}


METHOD = register(
    Method(
        "zo-jac-sol",
        "ZO-JAC-SOL",
        ZoJacSolSource,
        options=(FiniteDifferenceOptions, GradientCheckOptions, JacobianOptions),
        history=ZO_HISTORY,
        entry=jacobian_entry,
    )
)
