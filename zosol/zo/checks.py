"""Validators and error types of the ZO engine (one home for every check and exception).

Every estimator validates its arguments here, so each user error gets one message that names the
problem and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "SCHEMES",
    "NonFiniteLossError",
    "UnsupportedModuleError",
    "check_mu",
    "check_scheme",
    "check_sparsity",
    "check_params",
    "check_masks",
    "check_loss_values",
    "cosine",
    "relative_error",
]

SCHEMES = ("forward", "central")


class NonFiniteLossError(ValueError):
    """A queried loss was NaN or infinite (the model or the solver diverged)."""


class UnsupportedModuleError(ValueError):
    """A module or operation the structured perturbed forward cannot handle."""


def check_mu(mu: float) -> float:
    """``mu`` as a finite float > 0 (the finite-difference step)."""
    mu = float(mu)
    if not mu > 0 or mu != mu or mu == float("inf"):
        raise ValueError(f"mu must be a finite float > 0 (finite-difference step), got {mu!r}")
    return mu


def check_scheme(scheme: str) -> str:
    """``scheme`` if it is one of :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")
    return scheme


def check_sparsity(s: float) -> float:
    """A gradient sparsity (fraction of coordinates not estimated) in ``[0, 1)``."""
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")
    return s


def check_params(params: Mapping) -> dict:
    """A non-empty dict name -> floating-point tensor."""
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError("params must be a non-empty dict name -> tensor, e.g. dict(model.named_parameters())")
    for k, v in params.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"params[{k!r}] is {type(v).__name__}, expected a torch.Tensor")
        if not v.is_floating_point():
            raise ValueError(f"params[{k!r}] has dtype {v.dtype}; ZO estimation needs floating-point parameters")
    return dict(params)


def check_masks(params: Mapping, masks: Mapping | None) -> dict | None:
    """Validate ``masks`` (name -> bool/0-1 tensor of the parameter's shape) and return bool CPU masks.

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


def check_loss_values(v: torch.Tensor, P: int, what: str = "batched_loss") -> torch.Tensor:
    """Check that a batched loss returned a finite tensor of shape ``(P,)`` (``(P, 1)`` is accepted)."""
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


def _flat64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between ``a`` and ``b`` (same number of entries, any shape): computed in
    float64 and clamped to [-1, 1] (float32 rounding prints 1.0000001192092896); 0.0 when either is zero."""
    x, y = _flat64(a), _flat64(b)
    if x.numel() != y.numel():
        raise ValueError(f"cosine of vectors with {x.numel()} and {y.numel()} entries; compare equal sizes")
    den = x.norm() * y.norm()
    return 0.0 if den == 0 else float((x @ y / den).clamp(-1.0, 1.0))


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """``|estimate - reference| / |reference|`` (Euclidean norms, float64); inf when the reference is
    zero and the estimate is not, 0.0 when both are."""
    x, y = _flat64(estimate), _flat64(reference)
    if x.numel() != y.numel():
        raise ValueError(f"relative error of vectors with {x.numel()} and {y.numel()} entries; compare equal sizes")
    num, den = float((x - y).norm()), float(y.norm())
    return num / den if den else (0.0 if num == 0 else float("inf"))
