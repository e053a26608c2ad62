"""ZO-JAC-SOL: the window through the black box, autograd through the corrector, and every solver
call's backward replaced by the transpose of a finite-difference Jacobian of the black box at that
call's input (``zosol.zo.jacobian``): its cost is the Jacobian's probes (2 x colours for a local
stencil, 2n dense, ~C (2r+1)^nd for the reference-subtracted estimate of a globally coupled solver,
``zosol.zo.refjac``), not the network's size.  The estimate is chosen by a cost model
(:mod:`zosol.methods.jacobians`).

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
from .jacobians import JacobianSetup
from .shared import ZO_HISTORY, FiniteDifferenceOptions, GradientCheckOptions, zo_entry

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
    #: which estimate (zosol.methods.jacobians): the cost model's choice, or forced
    mode: Literal["auto", "sparse", "dense", "reference"] = option(
        "auto",
        "ZO-JAC-SOL Jacobian estimate: auto (sparse when the pattern colours, else reference-subtracted), "
        "sparse, dense or reference (dense references + the coloured difference within jac_reach)",
    )
    scheme: Literal["auto", "forward", "central"] = option(
        "auto", "ZO-JAC-SOL differences: auto (forward for reference-subtracted, else zo_scheme), forward, central"
    )
    reach: int | None = option(
        None,
        "ZO-JAC-SOL reference-subtracted: reach (cells) of the live, coloured difference (default: 1 with "
        "jac_references=global+frames, else 2)",
        ge=0,
        cap=64,
    )
    shape: Literal["box", "diamond"] = option(
        "box", "ZO-JAC-SOL reference-subtracted: the difference's pattern, box or diamond (L1, 2-D)"
    )
    max_reach: int = option(3, "ZO-JAC-SOL: the error check widens the reach up to this", ge=0, cap=64)
    references: Literal["global+frames", "global", "simulation", "frame"] = option(
        "global+frames",
        "ZO-JAC-SOL reference Jacobians: global+frames (one dense at the mean training state + its difference "
        "at every jac_ref_stride-th frame within jac_frame_reach, the nearest frame of the window per call), "
        "global (the dense one alone), simulation (dense, mean of each), frame (dense, every jac_ref_stride-th frame)",
    )
    ref_stride: int | None = option(
        None,
        "ZO-JAC-SOL jac_references=frame / global+frames: frames between references (default 10 / 5)",
        ge=1,
        cap=1_000_000,
    )
    frame_reach: int = option(
        5, "ZO-JAC-SOL jac_references=global+frames: reach (cells) of each frame's stored difference", ge=0, cap=64
    )
    check_every: int = option(
        10, "ZO-JAC-SOL reference-subtracted: steps between run-time error checks, 0: none", ge=0, cap=1_000_000
    )
    tol: float = option(0.05, "ZO-JAC-SOL reference-subtracted: relative J v error that refreshes / widens", gt=0)


class ZoJacSolSource(AutogradSource):
    """Autograd through the corrector, finite-difference Jacobians of the black box for the solver
    calls (:func:`zosol.zo.fd_step`).  The estimate is chosen once by the cost model
    (``config.jac_mode``, :class:`~zosol.methods.jacobians.JacobianSetup`): a sparse coloured
    pattern, a dense Jacobian, or reference-subtracted (dense references cached in the run
    directory + the coloured difference, with a run-time error check every ``jac_check_every``
    steps whose records go to ``history["jac_error"]``).  The choice is kept in
    ``history["jacobian"]`` (a resumed run reuses it; patterns widened by the leak check, reaches
    widened and references refreshed by the error check are stored again); probe evaluations count
    in ``history["zo_queries"]`` and in the black box's solver counts.  A reference-subtracted
    estimate that stays poor stops the run (the last checkpoint is kept) with a one-line
    :class:`zosol.zo.JacobianError`."""

    needs = "blackbox"
    gradient_check = True
    shardable = True  # the probe batches (of jac_batch states) are shared out over the ranks

    def prepare(self, history: dict[str, Any]) -> None:
        self.setup = JacobianSetup(self, history)
        self.jac = self.setup.jac
        self.fd_step = zo.fd_step(self.jac)
        self.setup.record(history)

    def cost(self) -> str | None:
        return self.setup.cost()

    def _step_fn(self, batch: WindowBatch) -> Step:
        return self.fd_step

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        events, spent = len(self.jac.events), self.jac.evaluations
        self.setup.before(batch, history)
        loss = super().step(batch, history)
        history["zo_queries"] += self.jac.evaluations - spent
        self.setup.after(history, changed=len(self.jac.events) != events)
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
        history={**ZO_HISTORY, "jac_error": []},
        entry=jacobian_entry,
    )
)
