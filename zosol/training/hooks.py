"""Hooks of the training loop that are not the gradient itself.

:class:`GradientCheck` compares a source's gradient with autograd through the differentiable
twin of the solver on the same window batch, at ``config.grad_checks`` steps spread evenly over
the run (sources with ``gradient_check = True``, e.g. ZO-SOL); the cosines go to
``history["grad_cosine_vs_fo"]``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..rollout import window_loss
from .sources import GradientSource, SolverViews
from .windows import WindowBatch

__all__ = ["GradientCheck"]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class GradientCheck:
    """After the source wrote its gradient: at the chosen steps, the cosine between it and the
    autograd gradient through ``solvers.differentiable`` (masked coordinates only, for sparse
    sources); ``.grad`` is left as the source wrote it."""

    def __init__(self, source: GradientSource, solvers: SolverViews, checks: int, total_steps: int):
        self.source, self.twin = source, solvers.differentiable
        self.steps: set[int] = set()
        if source.gradient_check and checks and solvers.twin_differentiable:
            self.steps = {round(k * (total_steps - 1) / max(checks - 1, 1)) for k in range(checks)}

    def __call__(self, step_index: int, epoch: int, batch: WindowBatch, history: dict[str, Any]) -> None:
        if step_index not in self.steps:
            return
        model, loss = self.source.model, self.source.config.loss
        params = list(model.parameters())
        estimated = [p.grad for p in params]
        model.zero_grad(set_to_none=True)
        window_loss(self.twin, model, batch.start, batch.targets, batch.params, batch.features, 1,
                    loss).sum().backward()
        g_fo = _flat([p.grad.detach() for p in params])
        g_est = _flat([torch.zeros_like(p) if g is None else g for p, g in zip(params, estimated)])
        for p, g in zip(params, estimated):
            p.grad = g
        masks = self.source.masks
        if masks is not None:
            sel = _flat(list(masks.values())).bool().to(g_fo.device)
            g_fo, g_est = g_fo[sel], g_est[sel]
        cos = float(torch.nn.functional.cosine_similarity(g_fo, g_est, dim=0))
        history["grad_cosine_vs_fo"].append({"step": step_index, "epoch": epoch, "cosine": cos})
