"""A public gradient check for black-box solvers: is the gradient a method estimates through
*your* solver right?

:func:`check_gradient` takes one batch of training windows and, for every black-box method that
estimates a gradient (ZO-SOL, and every other registered source with ``gradient_check = True``
that needs only the black box), compares the method's gradient of the window loss with

* independent float64 central finite differences of the same window loss along ``directions``
  random unit directions in parameter space (:mod:`zosol.fdcheck`; nothing but ``step`` is
  called), and
* autograd through the differentiable twin of the solver, when there is one (``twin=``, or the
  solver itself if it is differentiable).

A cosine near 1 (>= 0.999) says the estimate is right; a low one points at a noisy or
non-deterministic solver (finite differences need the same output for the same input), at
``zo_mu`` too small for the solver's precision, or at a state-dependent number of sub-steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import TrainConfig, train_config
from ..datasets.hdf5 import FidelityDataset
from ..fdcheck import compare_projections, fd_directional_derivatives, random_directions
from ..rollout import window_loss
from ..solvers.base import BlackBox, Solver
from .sources import SOURCES, SolverViews, source_class
from .state import make_corrector, new_history
from .windows import WindowBatch, Windows

__all__ = ["check_gradient", "blackbox_estimators"]


def blackbox_estimators() -> list[str]:
    """Registered methods whose gradient is an estimate through the black box (to be checked)."""
    return [name for name, s in SOURCES.items() if s.needs == "blackbox" and s.gradient_check]


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])


def _jittered(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """The corrector's last layer starts at zero (no correction), which makes every other layer's
    gradient zero; give it small seeded weights so that every coordinate is checked."""
    last = [p for p in model.parameters()][-2:]
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in last:
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _method_gradient(
    method: str, model: torch.nn.Module, config: TrainConfig, windows: Windows, views: SolverViews, batch: WindowBatch
) -> torch.Tensor:
    cfg = TrainConfig(**{**config.to_dict(), "method": method, "zo_sparsity": 0.0}).validate()
    source = source_class(method)(model, cfg, windows, views)
    source.prepare(new_history())
    source.start_epoch(0)
    model.zero_grad(set_to_none=True)
    source.step(batch, new_history())
    return _flat_grad(model).detach().clone()


def check_gradient(
    dataset: FidelityDataset,
    config: TrainConfig | None = None,
    *,
    solver: Solver | BlackBox | None = None,
    twin: Solver | None = None,
    methods: Sequence[str] | None = None,
    model: torch.nn.Module | None = None,
    directions: int = 4,
    eps: float = 1e-3,
    batch_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Check each black-box method's gradient on one window batch (see the module docstring).

    ``config``: window length, loss, corrector and ZO options (default: the ``tiny`` training
    preset); ``solver``: the black box (default: the scenario's coarse solver); ``twin``: a
    differentiable twin (default: the solver if differentiable, else the scenario's coarse solver
    if that is); ``model``: the corrector to check at (default: a fresh one whose last layer gets
    small seeded weights); ``directions``, ``eps``: the finite differences; ``batch_size``:
    windows in the batch (default: ``config.batch_size``).

    Returns ``{"methods": {method: {"cosine_vs_fd", "max_rel_err_vs_fd", "cosine_vs_twin" (or
    None), ...}}, "twin": {...} or None, "directions", "eps", "batch_size"}``."""
    config = (config or train_config("tiny")).validate()
    methods = list(methods) if methods is not None else blackbox_estimators()
    base = solver if solver is not None else dataset.scenario.coarse_solver()
    views = SolverViews.of(base, dataset.scenario, twin)
    windows = Windows(dataset, config.window, torch.device("cpu"))
    idx = windows.order(torch.Generator().manual_seed(seed))[: batch_size or config.batch_size]
    batch = windows.batch(idx)
    model = model if model is not None else _jittered(make_corrector(dataset, config), seed)
    dirs = random_directions(model, directions, seed)
    fd = fd_directional_derivatives(model, views.blackbox, batch, dirs, eps, config.loss)
    g_twin = None
    if views.twin_differentiable:
        model.zero_grad(set_to_none=True)
        window_loss(views.differentiable, model, batch, 1, config.loss).sum().backward()
        g_twin = _flat_grad(model).detach().clone()
    report: dict[str, Any] = {
        "methods": {},
        "directions": directions,
        "eps": eps,
        "batch_size": len(idx),
        "twin": None if g_twin is None else compare_projections(g_twin, dirs, fd),
    }
    for m in methods:
        g = _method_gradient(m, model, config, windows, views, batch)
        r = compare_projections(g, dirs, fd)
        report["methods"][m] = {
            "cosine_vs_fd": r["cosine"],
            "max_rel_err_vs_fd": r["max_rel_err"],
            "projections": r["projections"],
            "fd": r["fd"],
            "cosine_vs_twin": None
            if g_twin is None
            else float(torch.nn.functional.cosine_similarity(g, g_twin, dim=0)),
        }
    model.zero_grad(set_to_none=True)
    return report
