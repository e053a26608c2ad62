"""Hooks of the training loop that are not the gradient itself.

:class:`GradientCheck` compares a source's gradient with autograd through the differentiable
twin of the solver on the same window batch, at ``config.grad_checks`` steps spread evenly over
the run (sources with ``gradient_check = True``, e.g. ZO-SOL); the cosines go to
``history["grad_cosine_vs_fo"]``.  Without a differentiable twin (a black box of your own) it
compares instead with float64 finite-difference directional derivatives of the same window loss
through the black box along 4 random directions (:mod:`zosol.fdcheck`):
``history["grad_cosine_vs_fd"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..fdcheck import compare_projections, fd_directional_derivatives, random_directions
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

    #: random directions of the finite-difference check (no differentiable twin)
    fd_directions = 4

    def __init__(self, source: GradientSource, solvers: SolverViews, checks: int, total_steps: int):
        self.source, self.twin, self.blackbox = source, solvers.differentiable, solvers.blackbox
        self.use_fd = not solvers.twin_differentiable
        self.steps: set[int] = set()
        if source.gradient_check and checks:
            self.steps = {round(k * (total_steps - 1) / max(checks - 1, 1)) for k in range(checks)}

    def __call__(self, step_index: int, epoch: int, batch: WindowBatch, history: dict[str, Any]) -> None:
        if step_index not in self.steps:
            return
        if self.use_fd:
            self._fd_check(step_index, epoch, batch, history)
            return
        model, loss = self.source.model, self.source.config.loss
        params = list(model.parameters())
        estimated = [p.grad for p in params]
        model.zero_grad(set_to_none=True)
        window_loss(self.twin, model, batch, 1, loss).sum().backward()
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

    def _fd_check(self, step_index: int, epoch: int, batch: WindowBatch, history: dict[str, Any]) -> None:
        """The source's gradient projected on random directions (within the gradient mask) vs
        float64 central differences of the window loss through the black box."""
        model, cfg = self.source.model, self.source.config
        params = list(model.parameters())
        g = _flat([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        dirs = random_directions(model, self.fd_directions, cfg.seed + step_index)
        if self.source.masks is not None:
            dirs = dirs * _flat(list(self.source.masks.values())).to(dirs)
            dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        fd = fd_directional_derivatives(model, self.blackbox, batch, dirs, cfg.zo_mu, cfg.loss)
        r = compare_projections(g, dirs, fd)
        history.setdefault("grad_cosine_vs_fd", []).append(
            {"step": step_index, "epoch": epoch, "cosine": r["cosine"], "max_rel_err": r["max_rel_err"]}
        )
