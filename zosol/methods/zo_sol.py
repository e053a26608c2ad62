"""ZO-SOL: the solver is only queried through its black box; the gradient is DeepZero's
coordinate-wise estimate (``zosol.zo``), optionally sparse, evaluated for all perturbations as
one folded batch."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Literal

import torch

from .. import zo
from ..options import option
from ..rollout import window_loss
from ..training.errors import ZOUnderflowWarning
from ..training.sources import GradientSource
from ..training.sparsity import layer_ratios
from ..training.windows import WindowBatch
from .base import MemorySizes, Method, register
from .shared import ZO_HISTORY, FiniteDifferenceOptions, GradientCheckOptions, cost_model, zo_entry

__all__ = ["ZoSolOptions", "ZoSolSource", "METHOD"]

_FLOAT = 4  # bytes per float32


@dataclasses.dataclass
class ZoSolOptions:
    """ZO-SOL's sparse, chunked, feature-reusing estimate (config keys ``zo_sparsity``, ...)."""

    prefix: ClassVar[str] = "zo_"

    sparsity: float = option(0.0, "ZO-SOL gradient sparsity: share of coordinates not perturbed", ge=0, lt=1)
    #: where the layer-wise pruning ratios come from (zosol.training.sparsity)
    lpr: Literal["zo-grasp", "fo-grasp", "uniform"] = option(
        "zo-grasp", "ZO-SOL layer-wise pruning ratios of the sparse gradient"
    )
    mask_every: int = option(5, "ZO-SOL: epochs between redrawn sparsity masks", ge=1, cap=1_000_000)
    chunk: int | None = option(
        128, "ZO-SOL perturbations per batched evaluation, none: all at once", ge=1, cap=10_000_000
    )
    reuse: bool = option(True, "ZO-SOL feature reuse (unperturbed layers evaluated once)")


class ZoSolSource(GradientSource):
    """Coordinate-wise ZO estimate (structured, feature-reusing forward) through the black box;
    sparse when ``zo_sparsity > 0`` (layer ratios computed once, stored in history)."""

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


def folded_bytes(config: Any, sizes: MemorySizes) -> int:
    """The perturbed forward passes folded into one batch: ``zo_chunk`` perturbations x batch."""
    perturbations = (2 if config.zo_scheme == "central" else 1) * sizes.params + 1
    folded = min(config.zo_chunk or perturbations, perturbations)
    return folded * sizes.batch * sizes.cells * (sizes.in_channels + 3 * config.width) * _FLOAT


METHOD = register(
    Method(
        "zo-sol",
        "ZO-SOL",
        ZoSolSource,
        options=(FiniteDifferenceOptions, ZoSolOptions, GradientCheckOptions),
        history=ZO_HISTORY,
        memory=folded_bytes,
        memory_options=("zo_chunk",),
        entry=zo_entry,
    )
)
