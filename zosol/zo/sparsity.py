"""Gradient sparsity for CGE (DeepZero): ZO-GraSP -> layer-wise pruning ratios -> random masks.

1. Score every coordinate at initialisation with GraSP, ``S = -theta * (H g)``
   (Wang et al. 2020): FO-GraSP uses autograd; ZO-GraSP uses only function values:
   ``g`` is an RGE estimate (q directions, step mu) and ``H g`` a finite difference of two
   RGE estimates with common random directions,
   ``H g ~ (g_rge(theta + delta g) - g_rge(theta)) / delta``.
2. A global threshold prunes the ``sparsity`` fraction of prunable coordinates with the
   highest scores; the fraction pruned in each layer is its layer-wise pruning ratio (LPR).
3. Training uses *random* per-layer masks with those ratios (gradient sparsity: only
   unmasked coordinates are perturbed by CGE, the weights stay dense), redrawn every
   ``k`` epochs (DeepZero: k = 5) by :class:`MaskScheduler`.

Masks are dicts name -> bool tensor (True = estimate this coordinate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import grad, jvp

from .checks import check_params, check_sparsity
from .estimators import rge

__all__ = [
    "default_prunable",
    "zo_grasp_scores",
    "fo_grasp_scores",
    "layerwise_pruning_ratios",
    "uniform_lprs",
    "zo_grasp_lprs",
    "fo_grasp_lprs",
    "random_masks",
    "mask_sparsity",
    "MaskScheduler",
    "score_correlation",
]

Prunable = Callable[[str, torch.Tensor], bool]


def default_prunable(name: str, p: torch.Tensor) -> bool:
    """Weights (tensors with >= 2 dims) are prunable; biases stay dense."""
    return p.dim() > 1


def zo_grasp_scores(
    batched_loss: Callable[[dict], torch.Tensor],
    params: Mapping,
    q: int = 192,
    mu: float = 5e-3,
    hvp_step: float = 1e-2,
    generator: torch.Generator | None = None,
    chunk_size: int | str | None = "auto",
) -> dict:
    """ZO-GraSP scores ``-theta * Hg`` from function values only (2 (q+1) queries).

    Args:
        batched_loss: ``dict[name, (P, *shape)] -> (P,)`` (see :func:`zosol.zo.cge`).
        q, mu: RGE directions and step (DeepZero: q = 192, mu = 5e-3).
        hvp_step: norm of the step ``delta * g`` for the Hessian-gradient finite difference.
        generator: for the Gaussian directions (default seed 0).
    Returns:
        name -> score tensor (parameter shape, float64 on CPU).
    """
    params = check_params(params)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    d = sum(p.numel() for p in params.values())
    U = torch.randn(int(q), d, generator=gen, dtype=torch.float64)
    g0 = rge(batched_loss, params, q=q, mu=mu, directions=U, chunk_size=chunk_size)
    gflat = g0.flat().double().cpu()
    gn = float(gflat.norm())
    if gn == 0.0:
        raise ValueError("ZO gradient estimate is exactly zero; cannot score (check the loss)")
    delta = hvp_step / gn
    shifted = {k: (p.detach() + delta * g0[k].to(p)) for k, p in params.items()}
    g1 = rge(batched_loss, shifted, q=q, mu=mu, directions=U, chunk_size=chunk_size)
    hg = (g1.flat().double().cpu() - gflat) / delta
    theta = torch.cat([p.detach().reshape(-1).double().cpu() for p in params.values()])
    s = -theta * hg
    out, o = {}, 0
    for k, p in params.items():
        out[k] = s[o : o + p.numel()].reshape(p.shape)
        o += p.numel()
    return out


def fo_grasp_scores(batched_loss: Callable[[dict], torch.Tensor], params: Mapping) -> dict:
    """First-order (autograd) GraSP scores ``-theta * Hg``; ``batched_loss`` must be differentiable."""
    params = check_params(params)
    theta = {k: p.detach() for k, p in params.items()}

    def f(pd):
        return batched_loss({k: v.unsqueeze(0) for k, v in pd.items()})[0]

    g = grad(f)(theta)
    _, hg = jvp(grad(f), (theta,), (g,))
    return {k: (-theta[k] * hg[k]).detach().double().cpu() for k in theta}


def layerwise_pruning_ratios(
    scores: Mapping,
    sparsity: float,
    prunable: Prunable | None = None,
    params: Mapping | None = None,
) -> dict:
    """Global threshold on ``scores``: prune the ``sparsity`` fraction of prunable coordinates with the
    highest scores (GraSP) and return name -> fraction pruned in that tensor (LPR).

    Non-prunable tensors get LPR 0.  The size-weighted mean LPR over prunable tensors equals
    ``round(sparsity * n) / n``.
    """
    sparsity = check_sparsity(sparsity)
    prunable = prunable or default_prunable
    ref = params if params is not None else scores
    names = [k for k in scores if prunable(k, ref[k])]
    if not names:
        raise ValueError("no prunable parameters (default: tensors with dim > 1); pass prunable=")
    flat = torch.cat([scores[k].reshape(-1).double() for k in names])
    n_prune = int(round(sparsity * flat.numel()))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    if n_prune:
        # stable tie-breaking: sort descending by score, then by index
        order = torch.argsort(-flat, stable=True)
        pruned[order[:n_prune]] = True
    out, o = {}, 0
    name_set = set(names)
    for k in scores:
        if k in name_set:
            n = scores[k].numel()
            out[k] = float(pruned[o : o + n].sum()) / n
            o += n
        else:
            out[k] = 0.0
    return out


def uniform_lprs(params: Mapping, sparsity: float, prunable: Prunable | None = None) -> dict:
    """Same pruning ratio ``sparsity`` for every prunable tensor, 0 for the others."""
    sparsity = check_sparsity(sparsity)
    prunable = prunable or default_prunable
    return {k: (sparsity if prunable(k, p) else 0.0) for k, p in params.items()}


def zo_grasp_lprs(batched_loss, params: Mapping, sparsity: float, prunable: Prunable | None = None, **kw) -> dict:
    """LPRs from :func:`zo_grasp_scores` (keyword arguments are passed on)."""
    return layerwise_pruning_ratios(zo_grasp_scores(batched_loss, params, **kw), sparsity, prunable, params)


def fo_grasp_lprs(batched_loss, params: Mapping, sparsity: float, prunable: Prunable | None = None) -> dict:
    """LPRs from :func:`fo_grasp_scores`."""
    return layerwise_pruning_ratios(fo_grasp_scores(batched_loss, params), sparsity, prunable, params)


def random_masks(params: Mapping, lprs: Mapping, generator: torch.Generator | None = None) -> dict:
    """Random per-tensor masks with exactly ``round(lpr * numel)`` zeros (bool, CPU, parameter shapes).

    Tensors missing from ``lprs`` are dense.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    unknown = set(lprs) - set(params)
    if unknown:
        raise ValueError(f"lprs contain names that are not parameters: {sorted(unknown)}")
    out = {}
    for k, p in params.items():
        r = float(lprs.get(k, 0.0))
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"pruning ratio for {k!r} must be in [0, 1], got {r}")
        n = p.numel()
        m = torch.ones(n, dtype=torch.bool)
        nz = int(round(r * n))
        if nz:
            m[torch.randperm(n, generator=gen)[:nz]] = False
        out[k] = m.reshape(p.shape)
    return out


def mask_sparsity(masks: Mapping) -> float:
    """Fraction of zeros over all masks."""
    tot = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(torch.as_tensor(m).bool().sum()) for m in masks.values()) / max(tot, 1)


class MaskScheduler:
    """Random masks following ``lprs``, redrawn every ``every`` epochs (deterministic in ``seed``).

    ``masks(epoch)`` returns the masks for that epoch; epochs ``[j*every, (j+1)*every)`` share one draw.
    """

    def __init__(self, params: Mapping, lprs: Mapping, every: int = 5, seed: int = 0):
        if int(every) < 1:
            raise ValueError(f"every must be >= 1 epoch, got {every}")
        self.shapes = {k: torch.empty(p.shape, device="meta") for k, p in params.items()}
        self.lprs, self.every, self.seed = dict(lprs), int(every), int(seed)
        self._cache: tuple[int, dict] | None = None

    def masks(self, epoch: int) -> dict:
        j = int(epoch) // self.every
        if self._cache is None or self._cache[0] != j:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
            self._cache = (j, random_masks(self.shapes, self.lprs, gen))
        return self._cache[1]


def score_correlation(a: Mapping, b: Mapping, names: list | None = None) -> dict:
    """Pearson and Spearman correlation of two score dicts over ``names`` (default: all)."""
    names = names or list(a)
    x = torch.cat([a[k].reshape(-1).double() for k in names])
    y = torch.cat([b[k].reshape(-1).double() for k in names])

    def pearson(u, v):
        u, v = u - u.mean(), v - v.mean()
        return float((u @ v) / (u.norm() * v.norm() + 1e-300))

    def ranks(u):
        r = torch.empty_like(u)
        r[torch.argsort(u)] = torch.arange(u.numel(), dtype=u.dtype)
        return r

    return {"pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y))}
