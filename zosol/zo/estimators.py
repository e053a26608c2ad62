"""Zeroth-order gradient estimators: coordinate-wise (CGE) and randomised (RGE).

Both estimators only query a *batched loss*:

    batched_loss(params: dict[str, Tensor (P, *shape)]) -> Tensor (P,)

i.e. a dict with the same names as ``params`` whose tensors carry one extra
leading perturbation axis ``P``; entry ``p`` of the result is the loss of the
model with parameters ``{k: v[p]}``.  :func:`batched_loss_from_module` builds one
from an ``nn.Module`` with ``torch.func.functional_call`` + ``vmap``.

CGE (DeepZero, Chen et al. 2024):
    forward:  g_i = (f(theta + mu e_i) - f(theta)) / mu            (d + 1 queries)
    central:  g_i = (f(theta + mu e_i) - f(theta - mu e_i)) / 2 mu  (2 d queries)
Only unmasked coordinates are perturbed; masked ones get exact zeros.

Choice of ``mu``: the truncation error is O(mu) (forward) / O(mu^2) (central) and
the round-off error is O(eps * |f| / mu).  In float64, central with mu ~ 1e-4..1e-3
is accurate to ~1e-8 relative; in float32 forward with mu ~ 1e-3 gives cosine
> 0.99 on smooth losses of order one (DeepZero default mu = 5e-3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from .checks import NonFiniteLossError, check_loss_values, check_mu, check_params
from .parallel import chunk_size_from_budget, evaluate_chunked, memory_budget, resolve_device
from .plan import CGEPlan, ZOEstimate, flatten_params, selected_coordinates, split_flat, unflatten

__all__ = ["NonFiniteLossError", "ZOEstimate", "cge", "rge", "batched_loss_from_module", "write_grads"]

BatchedLoss = Callable[[dict], torch.Tensor]


# ----------------------------------------------------------------------------- CGE
@torch.no_grad()
def cge(
    batched_loss: BatchedLoss,
    params: Mapping,
    mu: float = 5e-3,
    scheme: str = "forward",
    masks: Mapping | None = None,
    chunk_size: int | str | None = "auto",
    device: torch.device | str | None = None,
    distributed: bool = False,
    group=None,
    progress: bool = False,
    memory_budget: int | None = None,
) -> ZOEstimate:
    """Coordinate-wise gradient estimate of ``batched_loss`` at ``params``.

    Args:
        batched_loss: ``dict[name, Tensor (P, *shape)] -> Tensor (P,)``.
        params: name -> tensor (e.g. ``dict(model.named_parameters())``); not modified.
        mu: finite-difference step (> 0).
        scheme: ``"forward"`` (d+1 queries) or ``"central"`` (2d queries).
        masks: optional name -> bool/0-1 tensor; only coordinates with mask 1 are perturbed,
            the others get exact zeros.
        chunk_size: perturbations per ``batched_loss`` call; ``"auto"``: as many perturbed parameter
            copies (3 d values each: the copy and what the loss builds from it) as fit in
            ``memory_budget``; None: all at once (a P x d matrix: only for small models).
        device: where perturbed parameters are built and the loss runs (default: params' device).
        distributed: shard the chunks over the ranks of the initialised process group
            (every rank gets the full, identical estimate).
        memory_budget: bytes for one chunk (default: :func:`zosol.zo.parallel.memory_budget`).
    Returns:
        :class:`ZOEstimate` with ``grads`` shaped like ``params`` and ``queries``.
    """
    plan = CGEPlan.build(check_params(params), masks, scheme, mu)
    dev = resolve_device(device, next(iter(plan.params.values())).device)
    theta = flatten_params(plan.params, dev)
    chunk_size = _param_copy_chunk(chunk_size, theta, dev, memory_budget)

    def eval_chunk(s: int, e: int) -> torch.Tensor:
        P = e - s
        flat = theta.unsqueeze(0).repeat(P, 1)
        flat[torch.arange(P, device=dev), plan.idx[s:e].to(dev)] += plan.step[s:e].to(device=dev, dtype=flat.dtype)
        return batched_loss(unflatten(flat, plan.layout))

    return plan.run(
        eval_chunk,
        lambda: batched_loss(unflatten(theta.unsqueeze(0), plan.layout)),
        chunk_size,
        distributed,
        group,
        dev,
        progress,
    )


def _param_copy_chunk(chunk_size, theta: torch.Tensor, device: torch.device, budget: int | None):
    """``"auto"`` -> perturbations whose parameter copies (3 d values each) fit the memory budget."""
    if chunk_size != "auto":
        return chunk_size
    return chunk_size_from_budget(3 * theta.numel() * theta.element_size(), memory_budget(device, budget))


# ----------------------------------------------------------------------------- RGE
@torch.no_grad()
def rge(
    batched_loss: BatchedLoss,
    params: Mapping,
    q: int = 192,
    mu: float = 5e-3,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
    masks: Mapping | None = None,
    chunk_size: int | str | None = "auto",
    device: torch.device | str | None = None,
    distributed: bool = False,
    group=None,
    directions: torch.Tensor | None = None,
    memory_budget: int | None = None,
) -> ZOEstimate:
    """Randomised (forward-difference) gradient estimate with ``q`` directions (q+1 queries).

        g = phi / q * sum_i (f(theta + mu u_i) - f(theta)) / mu * u_i

    ``distribution="gaussian"``: u ~ N(0, I), phi = 1; ``"sphere"``: u uniform on the unit
    sphere, phi = d (number of unmasked coordinates).  Directions are drawn on the CPU from
    ``generator`` (default: a fresh generator seeded 0) so results do not depend on the device
    or chunking; with ``masks`` they live on the unmasked coordinates only.  ``directions``
    (shape (q, d)) overrides the sampling (used for common random numbers in ZO-GraSP).
    ``chunk_size`` / ``memory_budget``: as in :func:`cge` (the q x d directions themselves are kept).
    """
    mu = check_mu(mu)
    if distribution not in ("gaussian", "sphere"):
        raise ValueError(f"unknown distribution {distribution!r}; use 'gaussian' or 'sphere'")
    if int(q) < 1:
        raise ValueError(f"q (number of random directions) must be >= 1, got {q!r}")
    q = int(q)
    params = check_params(params)
    dev = resolve_device(device, next(iter(params.values())).device)
    coords, layout = selected_coordinates(params, masks)
    theta = flatten_params(params, dev)
    d, de = theta.numel(), coords.numel()
    U = _rge_directions(q, d, coords, distribution, generator, directions)
    phi = float(de) if distribution == "sphere" else 1.0
    Ud = U.to(device=dev, dtype=theta.dtype)
    chunk_size = _param_copy_chunk(chunk_size, theta, dev, memory_budget)

    def eval_chunk(s, e):
        return check_loss_values(batched_loss(unflatten(theta.unsqueeze(0) + mu * Ud[s:e], layout)), e - s)

    base = check_loss_values(batched_loss(unflatten(theta.unsqueeze(0), layout)), 1)[0].detach().double().cpu()
    values = evaluate_chunked(
        eval_chunk, q, chunk_size, distributed, group, dtype=torch.float64, device=dev if distributed else None
    )
    coef = (values.cpu() - base) / mu * (phi / q)
    grads = split_flat(coef @ U, params, layout)
    return ZOEstimate(grads, q + 1, float(base), {"q": q, "d": d, "distribution": distribution})


def _rge_directions(
    q: int,
    d: int,
    coords: torch.Tensor,
    distribution: str,
    generator: torch.Generator | None,
    directions: torch.Tensor | None,
) -> torch.Tensor:
    """RGE directions ``(q, d)`` float64 on the CPU, zero outside ``coords``."""
    if directions is not None:
        U = directions.detach().to("cpu", torch.float64)
        if tuple(U.shape) != (q, d):
            raise ValueError(f"directions must have shape (q, d) = ({q}, {d}), got {tuple(U.shape)}")
        return U
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    u = torch.randn(q, coords.numel(), generator=gen, dtype=torch.float64)
    if distribution == "sphere":
        u = u / u.norm(dim=1, keepdim=True)
    U = torch.zeros(q, d, dtype=torch.float64)
    U[:, coords] = u
    return U


# ----------------------------------------------------------------------------- module helpers
def batched_loss_from_module(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *inputs: torch.Tensor,
    chunk_size: int | None = None,
) -> BatchedLoss:
    """Batched loss of ``model`` on fixed ``inputs`` via ``functional_call`` + ``vmap``.

    Args:
        model: the network; parameters missing from the queried dict and buffers are taken
            from the model (unbatched).
        loss_fn: ``model(*inputs) -> scalar`` loss (close over targets), must be vmap-compatible.
        inputs: model inputs, identical for every perturbation.
        chunk_size: passed to ``torch.func.vmap`` to bound memory inside one call.
    Returns:
        ``batched_loss(dict[name, Tensor (P, *shape)]) -> Tensor (P,)``.
    """
    fixed = {k: v.detach() for k, v in model.named_parameters()}
    fixed.update({k: v for k, v in model.named_buffers()})

    def single(pd: dict) -> torch.Tensor:
        full = dict(fixed)
        full.update(pd)
        out = loss_fn(functional_call(model, full, inputs))
        return out.reshape(())

    def batched_loss(pdict: dict) -> torch.Tensor:
        return vmap(single, chunk_size=chunk_size)(pdict)

    return batched_loss


def write_grads(model: nn.Module, grads: Mapping) -> None:
    """Write estimated gradients into ``param.grad`` (replacing) so any ``torch.optim`` can step.

    Raises ValueError for unknown names or shape mismatches.
    """
    named = dict(model.named_parameters())
    for k, g in grads.items():
        if k not in named:
            raise ValueError(f"gradient for unknown parameter {k!r}; keys must come from model.named_parameters()")
        p = named[k]
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match parameter {k!r} {tuple(p.shape)}")
        p.grad = g.detach().to(device=p.device, dtype=p.dtype).clone()
