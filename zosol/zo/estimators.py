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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from .parallel import evaluate_chunked, resolve_device

__all__ = [
    "NonFiniteLossError",
    "ZOEstimate",
    "cge",
    "rge",
    "batched_loss_from_module",
    "write_grads",
    "check_masks",
    "selected_coordinates",
    "perturbation_plan",
    "assemble_cge",
    "check_loss_values",
]

SCHEMES = ("forward", "central")


class NonFiniteLossError(ValueError):
    """A queried loss was NaN or infinite (the model or the solver diverged)."""
BatchedLoss = Callable[[dict], torch.Tensor]


@dataclass
class ZOEstimate(Mapping):
    """Result of a ZO gradient estimate; behaves like ``dict[str, Tensor]`` of gradients.

    Attributes:
        grads: name -> gradient tensor with the parameter's shape (and device/dtype).
        queries: number of loss evaluations (perturbed parameter vectors evaluated).
        loss: loss at the unperturbed parameters when it was evaluated (forward
            scheme, RGE), else None.
        info: extra diagnostics (number of coordinates, chunks, ...).
    """

    grads: dict
    queries: int
    loss: Optional[float] = None
    info: dict = field(default_factory=dict)

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.grads[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)

    def flat(self) -> torch.Tensor:
        """All gradients concatenated, shape ``(d,)``."""
        return torch.cat([g.reshape(-1) for g in self.grads.values()])


# ----------------------------------------------------------------------------- helpers
def _check_mu(mu: float) -> float:
    mu = float(mu)
    if not mu > 0 or mu != mu or mu == float("inf"):
        raise ValueError(f"mu must be a finite float > 0 (finite-difference step), got {mu!r}")
    return mu


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")
    return scheme


def _check_params(params: Mapping) -> dict:
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError("params must be a non-empty dict name -> tensor, e.g. dict(model.named_parameters())")
    for k, v in params.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"params[{k!r}] is {type(v).__name__}, expected a torch.Tensor")
        if not v.is_floating_point():
            raise ValueError(f"params[{k!r}] has dtype {v.dtype}; ZO estimation needs floating-point parameters")
    return dict(params)


def check_masks(params: Mapping, masks: Optional[Mapping]) -> Optional[dict]:
    """Validate ``masks`` (name -> bool/0-1 tensor of the parameter's shape) and return bool masks.

    Missing names mean "dense"; unknown names or shape mismatches raise ValueError.
    """
    if masks is None:
        return None
    unknown = set(masks) - set(params)
    if unknown:
        raise ValueError(f"masks contain names that are not parameters: {sorted(unknown)}; keys must match params")
    out = {}
    for k, p in params.items():
        if k not in masks:
            out[k] = torch.ones(p.shape, dtype=torch.bool)
            continue
        m = torch.as_tensor(masks[k])
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(
                f"mask shape mismatch for {k!r}: mask {tuple(m.shape)} vs parameter {tuple(p.shape)}; "
                "build masks with the parameters' shapes (e.g. zosol.zo.random_masks)"
            )
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"mask {k!r} must be boolean or contain only 0/1 values")
            m = m != 0
        out[k] = m.detach().cpu()
    return out


def selected_coordinates(params: Mapping, masks: Optional[Mapping]) -> tuple[torch.Tensor, list]:
    """Global flat indices (sorted, CPU int64) of the perturbed coordinates, and the layout.

    The layout is a list of ``(name, shape, offset, numel)`` in ``params`` order.
    """
    layout, off = [], 0
    for k, p in params.items():
        layout.append((k, tuple(p.shape), off, p.numel()))
        off += p.numel()
    bm = check_masks(params, masks)
    if bm is None:
        return torch.arange(off, dtype=torch.long), layout
    flat = torch.cat([bm[k].reshape(-1) for k in params])
    return torch.nonzero(flat, as_tuple=False).reshape(-1), layout


def perturbation_plan(coords: torch.Tensor, scheme: str, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbation list for CGE: ``(coordinate index (N,), signed step (N,))``.

    forward: one ``+mu`` per coordinate; central: ``+mu, -mu`` interleaved per coordinate.
    """
    if scheme == "forward":
        return coords, torch.full((coords.numel(),), mu, dtype=torch.float64)
    idx = coords.repeat_interleave(2)
    step = torch.tensor([mu, -mu], dtype=torch.float64).repeat(coords.numel())
    return idx, step


def check_loss_values(v: torch.Tensor, P: int, what: str = "batched_loss") -> torch.Tensor:
    """Check that a batched loss returned a finite tensor of shape ``(P,)``."""
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{what} must return a torch.Tensor of shape ({P},), got {type(v).__name__}")
    if v.dim() == 2 and v.shape[1] == 1 and v.shape[0] == P:
        v = v.reshape(P)
    if tuple(v.shape) != (P,):
        raise ValueError(
            f"{what} must return one loss per perturbation, shape ({P},), got {tuple(v.shape)}; "
            "reduce over the batch inside the loss but keep the leading perturbation axis"
        )
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteLossError(f"{what} returned non-finite values (nan/inf); check the loss or reduce mu")
    return v


def assemble_cge(
    values: torch.Tensor, base: Optional[torch.Tensor], idx: torch.Tensor, step: torch.Tensor,
    scheme: str, mu: float, params: Mapping, layout: list,
) -> dict:
    """Turn perturbed loss values into a gradient dict (float64 arithmetic, then cast)."""
    d = layout[-1][2] + layout[-1][3]
    g = torch.zeros(d, dtype=torch.float64)
    values = values.detach().to("cpu", torch.float64)
    if scheme == "forward":
        g[idx] = (values - float(base)) / mu
    else:
        g[idx[0::2]] = (values[0::2] - values[1::2]) / (2.0 * mu)
    return {k: g[o:o + n].reshape(shp).to(device=params[k].device, dtype=params[k].dtype)
            for k, shp, o, n in layout}


# ----------------------------------------------------------------------------- CGE
@torch.no_grad()
def cge(
    batched_loss: BatchedLoss,
    params: Mapping,
    mu: float = 5e-3,
    scheme: str = "forward",
    masks: Optional[Mapping] = None,
    chunk_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    distributed: bool = False,
    group=None,
    progress: bool = False,
) -> ZOEstimate:
    """Coordinate-wise gradient estimate of ``batched_loss`` at ``params``.

    Args:
        batched_loss: ``dict[name, Tensor (P, *shape)] -> Tensor (P,)``.
        params: name -> tensor (e.g. ``dict(model.named_parameters())``); not modified.
        mu: finite-difference step (> 0).
        scheme: ``"forward"`` (d+1 queries) or ``"central"`` (2d queries).
        masks: optional name -> bool/0-1 tensor; only coordinates with mask 1 are perturbed,
            the others get exact zeros.
        chunk_size: perturbations per ``batched_loss`` call (None: all at once).
        device: where perturbed parameters are built and the loss runs (default: params' device).
        distributed: shard the chunks over the ranks of the initialised process group
            (every rank gets the full, identical estimate).
    Returns:
        :class:`ZOEstimate` with ``grads`` shaped like ``params`` and ``queries``.
    """
    mu, scheme = _check_mu(mu), _check_scheme(scheme)
    params = _check_params(params)
    dev = resolve_device(device, next(iter(params.values())).device)
    coords, layout = selected_coordinates(params, masks)
    idx, step = perturbation_plan(coords, scheme, mu)
    theta = torch.cat([p.detach().reshape(-1).to(dev) for p in params.values()])

    def to_dict(flat: torch.Tensor) -> dict:  # flat (P, d) -> dict of (P, *shape) views
        return {k: flat[:, o:o + n].reshape((flat.shape[0],) + shp) for k, shp, o, n in layout}

    def eval_chunk(s: int, e: int) -> torch.Tensor:
        P = e - s
        flat = theta.unsqueeze(0).repeat(P, 1)
        rows = torch.arange(P, device=dev)
        flat[rows, idx[s:e].to(dev)] += step[s:e].to(device=dev, dtype=flat.dtype)
        return check_loss_values(batched_loss(to_dict(flat)), P)

    base = None
    queries = idx.numel()
    if scheme == "forward":
        base = check_loss_values(batched_loss(to_dict(theta.unsqueeze(0))), 1)[0].detach().double().cpu()
        queries += 1
    values = evaluate_chunked(eval_chunk, idx.numel(), chunk_size, distributed, group,
                              dtype=torch.float64, device=dev if distributed else None, progress=progress)
    grads = assemble_cge(values, base, idx, step, scheme, mu, params, layout)
    return ZOEstimate(grads, queries, None if base is None else float(base),
                      {"coordinates": int(coords.numel()), "d": int(theta.numel()), "scheme": scheme})


# ----------------------------------------------------------------------------- RGE
@torch.no_grad()
def rge(
    batched_loss: BatchedLoss,
    params: Mapping,
    q: int = 192,
    mu: float = 5e-3,
    distribution: str = "gaussian",
    generator: Optional[torch.Generator] = None,
    masks: Optional[Mapping] = None,
    chunk_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    distributed: bool = False,
    group=None,
    directions: Optional[torch.Tensor] = None,
) -> ZOEstimate:
    """Randomised (forward-difference) gradient estimate with ``q`` directions (q+1 queries).

        g = phi / q * sum_i (f(theta + mu u_i) - f(theta)) / mu * u_i

    ``distribution="gaussian"``: u ~ N(0, I), phi = 1; ``"sphere"``: u uniform on the unit
    sphere, phi = d (number of unmasked coordinates).  Directions are drawn on the CPU from
    ``generator`` (default: a fresh generator seeded 0) so results do not depend on the device
    or chunking; with ``masks`` they live on the unmasked coordinates only.  ``directions``
    (shape (q, d)) overrides the sampling (used for common random numbers in ZO-GraSP).
    """
    mu = _check_mu(mu)
    if distribution not in ("gaussian", "sphere"):
        raise ValueError(f"unknown distribution {distribution!r}; use 'gaussian' or 'sphere'")
    if int(q) < 1:
        raise ValueError(f"q (number of random directions) must be >= 1, got {q!r}")
    q = int(q)
    params = _check_params(params)
    dev = resolve_device(device, next(iter(params.values())).device)
    coords, layout = selected_coordinates(params, masks)
    theta = torch.cat([p.detach().reshape(-1).to(dev) for p in params.values()])
    d, de = theta.numel(), coords.numel()
    if directions is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        u = torch.randn(q, de, generator=gen, dtype=torch.float64)
        if distribution == "sphere":
            u = u / u.norm(dim=1, keepdim=True)
        U = torch.zeros(q, d, dtype=torch.float64)
        U[:, coords] = u
    else:
        U = directions.detach().to("cpu", torch.float64)
        if tuple(U.shape) != (q, d):
            raise ValueError(f"directions must have shape (q, d) = ({q}, {d}), got {tuple(U.shape)}")
    phi = float(de) if distribution == "sphere" else 1.0
    Ud = U.to(device=dev, dtype=theta.dtype)

    def to_dict(flat):
        return {k: flat[:, o:o + n].reshape((flat.shape[0],) + shp) for k, shp, o, n in layout}

    def eval_chunk(s, e):
        return check_loss_values(batched_loss(to_dict(theta.unsqueeze(0) + mu * Ud[s:e])), e - s)

    base = check_loss_values(batched_loss(to_dict(theta.unsqueeze(0))), 1)[0].detach().double().cpu()
    values = evaluate_chunked(eval_chunk, q, chunk_size, distributed, group, dtype=torch.float64,
                              device=dev if distributed else None)
    coef = (values.cpu() - base) / mu * (phi / q)
    g = coef @ U
    grads = {k: g[o:o + n].reshape(shp).to(device=params[k].device, dtype=params[k].dtype)
             for k, shp, o, n in layout}
    return ZOEstimate(grads, q + 1, float(base), {"q": q, "d": d, "distribution": distribution})


# ----------------------------------------------------------------------------- module helpers
def batched_loss_from_module(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *inputs: torch.Tensor,
    chunk_size: Optional[int] = None,
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
