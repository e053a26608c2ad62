"""Gradient checks, one module: the check the training loop runs at ``config.grad_checks`` steps
(:class:`GradientCheck`, a loop callback) and the public :func:`check_gradient` ("is the gradient
a method estimates through *your* solver right?") compare a method's gradient of the SOL window
loss, on one window batch, with

* autograd through the differentiable twin of the solver, when there is one
  (:func:`twin_gradient`; the twin is chosen by :meth:`SolverViews.of`), and
* independent float64 central finite differences of the same window loss through the black box
  along ``k`` seeded random unit directions ``v_i`` in parameter space
  (:func:`fd_directional_derivatives`: ``(L(theta + eps v) - L(theta - eps v)) / (2 eps)``,
  computed with a float64 copy of the corrector and float64 states; nothing but ``step`` is
  called).  A gradient ``g`` is compared by its projections ``g . v_i``
  (:func:`compare_projections`): the cosine of the two k-vectors and the largest relative error.

A cosine near 1 (>= 0.999) says the estimate is right; a low one points at a noisy or
non-deterministic solver (finite differences need the same output for the same input), at
``zo_mu`` too small for the solver's precision, or at a state-dependent number of sub-steps.
In the loop the cosines go to ``history["grad_cosine_vs_fo"]`` (twin) or, without a
differentiable twin, ``history["grad_cosine_vs_fd"]``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import methods
from ..config import TrainConfig, train_config
from ..datasets.hdf5 import FidelityDataset
from ..errors import UsageError
from ..rollout import window_loss
from ..solvers.base import BlackBox, Solver
from ..zo.checks import cosine, relative_error
from .callbacks import Callback, LoopView
from .sources import GradientSource, SolverViews, source_class
from .state import make_corrector, new_history
from .windows import WindowBatch, Windows

__all__ = [
    "check_gradient",
    "window_gradients",
    "WindowGradients",
    "blackbox_estimators",
    "GradientCheck",
    "random_directions",
    "fd_directional_derivatives",
    "compare_projections",
    "twin_gradient",
]

Step = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _loss(step: Step, model: torch.nn.Module, batch: WindowBatch, loss: str) -> torch.Tensor:
    """The mean SOL window loss (1,) of ``model`` on ``batch`` through ``step``."""
    return window_loss(step, model, batch, 1, loss)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s ``.grad`` as one flat vector (D,); zeros where a parameter has none."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])


def random_directions(model: torch.nn.Module, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` seeded unit vectors (k, D) in the flat parameter space of ``model`` (float64)."""
    d = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


@torch.no_grad()
def fd_directional_derivatives(
    model: torch.nn.Module,
    step: Step,
    batch: WindowBatch,
    directions: torch.Tensor,
    eps: float = 1e-3,
    loss: str = "mse",
) -> torch.Tensor:
    """Central-difference derivatives (k,) of the mean window loss along ``directions`` (k, D).

    ``batch``: the windows (see :class:`zosol.rollout.WindowBatch`); ``step`` is called on float64
    states."""
    twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    theta = torch.nn.utils.parameters_to_vector(twin.parameters()).clone()
    batch64 = batch.map(lambda t: t.detach().to("cpu", torch.float64))
    out = []
    for v in directions.to(torch.float64):
        values = []
        for sign in (1.0, -1.0):
            torch.nn.utils.vector_to_parameters(theta + sign * eps * v, twin.parameters())
            values.append(_loss(step, twin, batch64, loss)[0])
        out.append((values[0] - values[1]) / (2 * eps))
    return torch.stack(out)


def compare_projections(gradient: torch.Tensor, directions: torch.Tensor, derivatives: torch.Tensor) -> dict:
    """``gradient`` (D,) projected on ``directions`` (k, D) vs ``derivatives`` (k,): cosine of the
    two k-vectors, largest relative error (scaled by the largest derivative), both projections."""
    proj = directions.to(torch.float64) @ gradient.detach().to("cpu", torch.float64)
    cos = cosine(proj, derivatives)
    rel = float((proj - derivatives).abs().max() / derivatives.abs().max().clamp_min(1e-300))
    return {"cosine": cos, "max_rel_err": rel, "projections": proj.tolist(), "fd": derivatives.tolist()}


def twin_gradient(twin: Step, model: torch.nn.Module, batch: WindowBatch, loss: str) -> torch.Tensor:
    """The autograd gradient (D,) of the window loss through the differentiable ``twin``; leaves
    it in ``model``'s ``.grad`` (which it overwrites)."""
    model.zero_grad(set_to_none=True)
    _loss(twin, model, batch, loss).sum().backward()
    return _flat_grad(model).detach().clone()


class GradientCheck(Callback):
    """Loop callback: after the source wrote its gradient, at ``checks`` steps spread evenly over
    the run (sources with ``gradient_check = True``), the cosine between it and the autograd
    gradient through ``solvers.differentiable`` (masked coordinates only, for sparse sources), or
    without a differentiable twin, its projections vs float64 finite differences through the
    black box along :attr:`fd_directions` random directions; ``.grad`` is left as the source wrote it."""

    #: random directions of the finite-difference check (no differentiable twin)
    fd_directions = 4

    def __init__(self, source: GradientSource, solvers: SolverViews, checks: int, total_steps: int):
        self.source, self.twin, self.blackbox = source, solvers.differentiable, solvers.blackbox
        self.use_fd = not solvers.twin_differentiable
        self.steps: set[int] = set()
        if source.gradient_check and checks:
            self.steps = {round(k * (total_steps - 1) / max(checks - 1, 1)) for k in range(checks)}

    def on_gradient(self, loop: LoopView, batch: WindowBatch) -> None:
        s = loop.state
        self(s.epoch * loop.steps_per_epoch + s.position, s.epoch, batch, s.history)

    def __call__(self, step_index: int, epoch: int, batch: WindowBatch, history: dict[str, Any]) -> None:
        """Check at ``step_index`` (counted over the whole run) if it is one of the chosen steps."""
        if step_index not in self.steps:
            return
        if self.use_fd:
            self._fd_check(step_index, epoch, batch, history)
            return
        model = self.source.model
        estimated = [p.grad for p in model.parameters()]
        g_est = _flat_grad(model)
        g_fo = twin_gradient(self.twin, model, batch, self.source.config.loss)
        for p, g in zip(model.parameters(), estimated):
            p.grad = g
        masks = self.source.masks
        if masks is not None:
            sel = _flat_masks(masks).bool().to(g_fo.device)
            g_fo, g_est = g_fo[sel], g_est[sel]
        cos = cosine(g_fo, g_est)
        history["grad_cosine_vs_fo"].append({"step": step_index, "epoch": epoch, "cosine": cos})

    def _fd_check(self, step_index: int, epoch: int, batch: WindowBatch, history: dict[str, Any]) -> None:
        """The source's gradient projected on random directions (within the gradient mask) vs
        float64 central differences of the window loss through the black box."""
        model, cfg = self.source.model, self.source.config
        g = _flat_grad(model)
        dirs = random_directions(model, self.fd_directions, cfg.seed + step_index)
        if self.source.masks is not None:
            dirs = dirs * _flat_masks(self.source.masks).to(dirs)
            dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        fd = fd_directional_derivatives(model, self.blackbox, batch, dirs, cfg.zo_mu, cfg.loss)
        r = compare_projections(g, dirs, fd)
        history.setdefault("grad_cosine_vs_fd", []).append(
            {"step": step_index, "epoch": epoch, "cosine": r["cosine"], "max_rel_err": r["max_rel_err"]}
        )


def _flat_masks(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.reshape(-1) for m in masks.values()])


def blackbox_estimators() -> list[str]:
    """Registered methods whose gradient is an estimate through the black box (to be checked)."""
    return [m.name for m in methods.registered_methods() if m.needs == "blackbox" and m.source.gradient_check]


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
    # dense ZO-SOL; no run-time Jacobian error check (this function measures the gradient itself)
    cfg = config.replace(method=method, zo_sparsity=0.0, jac_check_every=0).validate()
    source = source_class(method)(model, cfg, windows, views)
    source.prepare(new_history(method))
    source.start_epoch(0)
    model.zero_grad(set_to_none=True)
    source.step(batch, new_history(method))
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
    g_twin = twin_gradient(views.differentiable, model, batch, config.loss) if views.twin_differentiable else None
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
            "cosine_vs_twin": None if g_twin is None else cosine(g, g_twin),
        }
    model.zero_grad(set_to_none=True)
    return report


@dataclasses.dataclass
class WindowGradients:
    """A method's gradient of the SOL window loss on one window batch and a reference gradient of
    the same loss (see :func:`window_gradients`). Flat vectors follow ``model.parameters()``;
    :meth:`unflatten` gives them per parameter name."""

    method: str
    gradient: torch.Tensor  #: (D,) the method's gradient (sparse ZO-SOL: dense here)
    reference: torch.Tensor  #: (D,) float64 reference gradient
    reference_kind: str  #: "twin" (autograd through the differentiable twin) or "fd" (float64 central differences)
    cosine: float  #: cosine of gradient and reference, float64, in [-1, 1]
    relative_error: float  #: |gradient - reference| / |reference|
    loss: float  #: the window loss at ``model`` on ``batch``
    batch: WindowBatch  #: the windows: start (B, C, *s), targets (B, m, C, *s), params, features
    model: torch.nn.Module  #: the corrector the gradients are taken at
    names: list[tuple[str, tuple[int, ...]]]  #: (parameter name, shape) in the order of the flat vectors

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat (D,) vector as ``{parameter name: tensor of its shape}``."""
        out, i = {}, 0
        for name, shape in self.names:
            n = int(torch.Size(shape).numel())
            out[name] = flat[i : i + n].reshape(shape)
            i += n
        return out


def _fd_gradient(model: torch.nn.Module, step: Step, batch: WindowBatch, eps: float, loss: str) -> torch.Tensor:
    """Float64 central differences (D,) of the window loss along every coordinate (2 D rollouts)."""
    d = sum(p.numel() for p in model.parameters())
    return fd_directional_derivatives(model, step, batch, torch.eye(d, dtype=torch.float64), eps, loss)


def _run_model(run: str | os.PathLike, dataset: FidelityDataset) -> tuple[torch.nn.Module, TrainConfig]:
    from .checkpoint import load_run

    model, ckpt = load_run(run, dataset, other_data=True)
    return model, TrainConfig(**ckpt["config"])


def window_gradients(
    dataset: FidelityDataset,
    method: str = "zo-sol",
    config: TrainConfig | None = None,
    *,
    run: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    reference: str = "auto",
    solver: Solver | BlackBox | None = None,
    twin: Solver | None = None,
    eps: float = 1e-3,
    batch_size: int | None = None,
    seed: int = 0,
) -> WindowGradients:
    """``method``'s gradient of the window loss on one batch of training windows, next to a
    reference gradient, with their cosine and relative error: the vectors to hold against your own
    adjoint (``result.batch`` holds the windows, ``result.model`` the corrector).

    ``run``: a run directory: its trained corrector and config (default: a fresh corrector of
    ``config``, default the ``tiny`` preset, whose last layer gets small seeded weights);
    ``model``: a corrector of your own instead. ``reference``: "twin" (autograd through the
    differentiable twin), "fd" (float64 central differences of every coordinate through the black
    box, 2 D window rollouts) or "auto" (the twin if there is one). ``solver`` / ``twin``: as in
    :func:`check_gradient`; ``batch_size`` windows drawn with ``seed`` (default ``config.batch_size``).
    """
    if reference not in ("auto", "twin", "fd"):
        raise UsageError(f"reference must be 'auto', 'twin' or 'fd', got {reference!r}")
    if run is not None:
        if model is not None:
            raise UsageError("pass run= (a trained corrector) or model=, not both")
        model, run_config = _run_model(run, dataset)
        config = config or run_config
    config = (config or train_config("tiny")).validate()
    source_class(method)  # an unknown method is named before any work
    views = SolverViews.of(solver if solver is not None else dataset.scenario.coarse_solver(), dataset.scenario, twin)
    if reference == "twin" and not views.twin_differentiable:
        raise UsageError("reference='twin' needs a differentiable twin (pass twin=...); or use reference='fd'")
    kind = "twin" if reference == "twin" or (reference == "auto" and views.twin_differentiable) else "fd"
    windows = Windows(dataset, config.window, torch.device("cpu"))
    batch = windows.batch(windows.order(torch.Generator().manual_seed(seed))[: batch_size or config.batch_size])
    model = model if model is not None else _jittered(make_corrector(dataset, config), seed)
    with torch.no_grad():
        value = float(_loss(views.blackbox, model, batch, config.loss)[0])
    if kind == "twin":
        ref = twin_gradient(views.differentiable, model, batch, config.loss).double()
    else:
        ref = _fd_gradient(model, views.blackbox, batch, eps, config.loss)
    g = _method_gradient(method, model, config, windows, views, batch)
    model.zero_grad(set_to_none=True)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return WindowGradients(method, g, ref, kind, cosine(g, ref), relative_error(g, ref), value, batch, model, names)
