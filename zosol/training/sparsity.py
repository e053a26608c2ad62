"""Layer-wise pruning ratios (LPRs) of sparse ZO-SOL, scored once at the start of a run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import zo
from ..config import TrainConfig
from ..rollout import window_loss
from .windows import Windows

__all__ = ["layer_ratios", "stacked_params_loss"]


def stacked_params_loss(model: torch.nn.Module, loss_of_forward: Callable, batch_size: int) -> Callable:
    """``loss_of_forward(forward, P)`` as a loss of stacked parameter sets ``{name: (P, *shape)}``
    (torch.func.functional_call + vmap), the form ``zosol.zo``'s sparsity scores take."""

    def batched(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        p = next(iter(stacked.values())).shape[0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == batch_size:  # shared input
                y = torch.func.vmap(lambda w: torch.func.functional_call(model, w, (x,)))(stacked)
            else:
                xs = x.reshape(p, batch_size, *x.shape[1:])
                y = torch.func.vmap(lambda w, xi: torch.func.functional_call(model, w, (xi,)))(stacked, xs)
            return y.reshape(p * batch_size, *y.shape[2:])

        return loss_of_forward(forward, p)

    return batched


def layer_ratios(
    model: torch.nn.Module, windows: Windows, blackbox: Callable, fo_step: Callable, config: TrainConfig
) -> dict[str, float]:
    """LPRs for sparse ZO-SOL (``config.zo_lpr``), scored on one batch of m = 1 windows;
    ``fo_step`` (differentiable) serves "fo-grasp", ``blackbox`` "zo-grasp"."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    # The output layer starts at zero ("no correction"), so its GraSP scores are all zero and a
    # global threshold would prune it entirely, freezing the corrector at zero: keep it dense.
    output_layer = next(reversed(list(params))).rsplit(".", 1)[0] + "."
    prunable = lambda name, p: p.dim() > 1 and not name.startswith(output_layer)  # noqa: E731
    if config.zo_lpr == "uniform":
        return zo.uniform_lprs(params, config.zo_sparsity, prunable)
    g = torch.Generator().manual_seed(config.seed + 2)
    idx = torch.randperm(len(windows.starts), generator=g)[: config.batch_size]
    batch = windows.batch(idx).first_steps(1)
    step = fo_step if config.zo_lpr == "fo-grasp" else blackbox
    loss = stacked_params_loss(model, lambda f, p: window_loss(step, f, batch, p, config.loss), batch.size)
    if config.zo_lpr == "fo-grasp":
        return zo.fo_grasp_lprs(loss, params, config.zo_sparsity, prunable)
    return zo.zo_grasp_lprs(loss, params, config.zo_sparsity, prunable, generator=g)
