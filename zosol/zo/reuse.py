"""Structured perturbed forward with feature reuse for layered networks.

A coordinate perturbation ``W[o, c, k] += s`` of a Conv1d/Conv2d/Linear layer changes
that layer's output only in output channel ``o``, by ``s`` times one (shifted, strided)
input channel; a bias perturbation ``b[o] += s`` adds the constant ``s``.  So a chunk of
P coordinate perturbations is evaluated as ONE shared-weight batch over all P*B samples,
with only a cheap per-perturbation delta at the perturbed layer, and (for inputs shared
by all perturbations) the activations of every sample are kept *unexpanded* (B rows)
until the layer that a perturbation touches: the rows of perturbation p are created
("activated") at its layer as ``base_output + delta_p``.  The loss values equal those of
evaluating a perturbed copy of the parameters, up to float round-off.

Supported models: ``nn.Sequential`` (nested) of ``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d`` (any padding_mode, stride, dilation, groups), parameter-free per-sample
modules (activations, Flatten, pooling, Identity, ...) and :class:`Residual` blocks
(``x + body(x)``).  Anything else raises :class:`UnsupportedModuleError`; pass
``engine="vmap"`` (or ``"auto"``) to :func:`cge_structured` to use the generic
``functional_call``/``vmap`` path with the same ``forward`` interface.

``loss_of_forward(forward, P) -> Tensor (P,)`` protocol: ``forward(x)`` with ``x`` of
shape ``(B, ...)`` (identical input for every perturbation) or ``(P*B, ...)`` (rows
``p*B:(p+1)*B`` belong to perturbation p) returns ``(P*B, ...)``.  If the two cases
are ambiguous (``B`` divisible by ``P`` before B is known), pass
``forward(x, per_perturbation=True/False)`` or ``cge_structured(..., batch_size=B)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .checks import UnsupportedModuleError
from .plan import CGEPlan, ZOEstimate, flatten_params, unflatten

__all__ = ["Residual", "UnsupportedModuleError", "POINTWISE_MODULES", "check_structured_support",
           "cge_structured", "LossOfForward"]

LossOfForward = Callable[[Callable[..., torch.Tensor], int], torch.Tensor]


class Residual(nn.Sequential):
    """Residual block: ``forward(x) = x + body(x)`` where body is this Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + super().forward(x)


POINTWISE_MODULES: tuple = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.CELU, nn.SELU,
    nn.LeakyReLU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink,
    nn.Softsign, nn.LogSigmoid, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_pointwise(m: nn.Module, extra: tuple) -> bool:
    if isinstance(m, nn.Flatten):
        return m.start_dim != 0
    if isinstance(m, nn.Unflatten):
        return m.dim != 0
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return m.dim is not None and m.dim != 0
    if type(m) in POINTWISE_MODULES or (extra and isinstance(m, extra)):
        return len(list(m.parameters(recurse=False))) == 0
    return False


def check_structured_support(model: nn.Module, extra_pointwise: tuple = ()) -> None:
    """Raise :class:`UnsupportedModuleError` naming the first unsupported submodule."""

    def walk(m: nn.Module, path: str) -> None:
        if isinstance(m, Residual) or type(m) is nn.Sequential:
            for name, c in m.named_children():
                walk(c, f"{path}.{name}" if path else name)
        elif type(m) in AFFINE or _is_pointwise(m, extra_pointwise):
            return
        else:
            raise UnsupportedModuleError(
                f"module {path or '<root>'} of type {type(m).__name__} is not supported by the structured "
                "perturbed forward (supported: nested nn.Sequential / zosol.zo.Residual of Linear, Conv1d, "
                "Conv2d and per-sample parameter-free modules); use engine='vmap' or engine='auto'"
            )

    walk(model, "")


# ----------------------------------------------------------------------------- state
@dataclass
class _Pert:
    """Perturbations of one parameter inside a chunk."""
    ids: torch.Tensor       # (n,) chunk-local perturbation indices
    idx: tuple              # multi-index into the parameter, each (n,)
    step: torch.Tensor      # (n,) signed step, activation dtype


@dataclass
class _State:
    """Activations of P perturbations x B samples.

    ``base``: (B, ...) activation shared by all not-yet-activated perturbations (or None);
    ``rows``: (n*B, ...) activations of the activated perturbations ``ids`` (n,), in that order.
    """
    base: Optional[torch.Tensor]
    rows: Optional[torch.Tensor]
    ids: torch.Tensor


class _StructuredRunner:
    def __init__(self, plan: dict, P: int, B: int, extra: tuple):
        self.plan, self.P, self.B, self.extra = plan, P, B, extra

    def run(self, m: nn.Module, st: _State) -> _State:
        if isinstance(m, Residual):
            out = st
            for c in m:
                out = self.run(c, out)
            return self._add(st, out)
        if type(m) is nn.Sequential:
            for c in m:
                st = self.run(c, st)
            return st
        if type(m) in AFFINE:
            return self._affine(m, st)
        if _is_pointwise(m, self.extra):
            return _State(None if st.base is None else m(st.base),
                          None if st.rows is None else m(st.rows), st.ids)
        raise UnsupportedModuleError(f"unsupported module {type(m).__name__}; use engine='vmap'")

    def _add(self, x: _State, b: _State) -> _State:
        nx, nb = x.ids.numel(), b.ids.numel()
        base = None if b.base is None else x.base + b.base
        if nb == 0:
            return _State(base, None, b.ids)
        o = b.rows.reshape((nb, self.B) + b.rows.shape[1:])
        res = o.clone()
        if nx:
            res[:nx] += x.rows.reshape((nx, self.B) + x.rows.shape[1:])
        if nb > nx:
            res[nx:] += x.base.unsqueeze(0)
        return _State(base, res.reshape(b.rows.shape), b.ids)

    def _affine(self, m: nn.Module, st: _State) -> _State:
        groups = self.plan.get(m)
        y_base = None if st.base is None else m(st.base)
        y_rows = None if st.rows is None else m(st.rows)
        if not groups:
            return _State(y_base, y_rows, st.ids)
        B, n = self.B, st.ids.numel()
        dev = (y_base if y_base is not None else y_rows).device
        pos_old = torch.full((self.P,), -1, dtype=torch.long, device=dev)
        if n:
            pos_old[st.ids] = torch.arange(n, device=dev)
        all_ids = torch.cat([g.ids for g in groups.values()])
        new_ids = all_ids[pos_old[all_ids] < 0]
        k = new_ids.numel()
        parts = []
        if n:
            parts.append(y_rows.reshape((n, B) + y_rows.shape[1:]))
        if k:
            if y_base is None:
                raise RuntimeError("internal error: perturbation activated without a shared base")
            parts.append(y_base.unsqueeze(0).expand((k,) + y_base.shape))
        Y = parts[0] if len(parts) == 1 and k == 0 else torch.cat(parts, 0)
        ids = torch.cat([st.ids, new_ids]) if k else st.ids
        pos_new = pos_old.clone()
        if k:
            pos_new[new_ids] = torch.arange(n, n + k, device=dev)
        X_rows = None if st.rows is None else st.rows.reshape((n, B) + st.rows.shape[1:])
        X_base = None if st.base is None else st.base.unsqueeze(0)
        for kind, g in groups.items():
            act = pos_old[g.ids] >= 0
            for sel, X in ((act, X_rows), (~act, X_base)):
                if not bool(sel.any()):
                    continue
                blk = pos_old[g.ids[sel]] if X is X_rows else torch.zeros(int(sel.sum()), dtype=torch.long, device=dev)
                self._add_delta(m, kind, Y, pos_new[g.ids[sel]], X, blk,
                                tuple(t[sel] for t in g.idx), g.step[sel].to(Y.dtype))
        return _State(y_base, Y.reshape((-1,) + Y.shape[2:]), ids)

    @staticmethod
    def _add_delta(m, kind, Y, pj, X, blk, idx, s) -> None:
        """Y (N, B, *out) += delta of perturbations at rows pj; X (nX, B, *in) inputs, blk rows of X."""
        if type(m) is nn.Linear:
            out_f = Y.shape[-1]
            Y4 = Y.view(Y.shape[0], Y.shape[1], -1, out_f)
            if kind == "bias":
                Y4[pj, :, :, idx[0]] += s[:, None, None]
            else:
                X4 = X.reshape(X.shape[0], X.shape[1], -1, X.shape[-1])
                Y4[pj, :, :, idx[0]] += s[:, None, None] * X4[blk, :, :, idx[1]]
            return
        nsp = Y.dim() - 3
        shp = (-1, 1) + (1,) * nsp
        if kind == "bias":
            Y[pj, :, idx[0]] += s.view(shp)
            return
        o, c = idx[0], idx[1]
        cout_g = m.out_channels // m.groups
        cin_g = m.in_channels // m.groups
        cin = (o // cout_g) * cin_g + c
        xs = X[blk, :, cin]                      # (J, B, *sp_in)
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            xs = F.pad(xs, pad, mode=mode)
        J = xs.shape[0]
        out_sp = Y.shape[3:]
        for dim in range(nsp):
            L = out_sp[dim]
            k = idx[2 + dim]
            start = k * m.dilation[dim]
            pos = start[:, None] + torch.arange(L, device=Y.device)[None, :] * m.stride[dim]  # (J, L)
            view = [J, 1] + [1] * nsp
            view[2 + dim] = L
            expand = list(xs.shape)
            expand[2 + dim] = L
            xs = xs.gather(2 + dim, pos.view(view).expand(expand))
        Y[pj, :, o] += s.view(shp) * xs


# ----------------------------------------------------------------------------- forward callables
class _ForwardBase:
    """Callable ``forward(x, per_perturbation=None) -> (P*B, ...)`` for one chunk of P perturbations."""

    def __init__(self, P: int, hint: dict):
        self.P = P
        self.hint = hint  # shared across chunks: {"B": int or None}

    def _split(self, x: torch.Tensor, per_perturbation: Optional[bool]) -> tuple[bool, int]:
        P, N = self.P, x.shape[0]
        B = self.hint.get("B")
        if per_perturbation is None:
            if P == 1:
                per_perturbation = False
            elif N % P != 0:
                per_perturbation = False
            elif B is not None and N == P * B:
                per_perturbation = True
            elif B is not None and N == B:
                per_perturbation = False
            else:
                raise ValueError(
                    f"cannot tell whether input of leading size {N} is shared (B={N}) or per-perturbation "
                    f"(P={P} x B={N // P}); call forward(x, per_perturbation=...) or pass batch_size= to cge_structured"
                )
        if per_perturbation:
            if N % P != 0:
                raise ValueError(f"per-perturbation input must have leading size P*B with P={P}, got {N}")
            B_ = N // P
        else:
            B_ = N
        if B is None:
            self.hint["B"] = B_
        return per_perturbation, B_


class _StructuredForward(_ForwardBase):
    def __init__(self, model, plan, P, hint, reuse, extra):
        super().__init__(P, hint)
        self.model, self.plan, self.reuse, self.extra = model, plan, reuse, extra

    def __call__(self, x: torch.Tensor, per_perturbation: Optional[bool] = None) -> torch.Tensor:
        per, B = self._split(x, per_perturbation)
        P, dev = self.P, x.device
        if per:
            st = _State(None, x, torch.arange(P, device=dev))
        elif self.reuse:
            st = _State(x, None, torch.empty(0, dtype=torch.long, device=dev))
        else:
            st = _State(None, x.repeat((P,) + (1,) * (x.dim() - 1)), torch.arange(P, device=dev))
        runner = _StructuredRunner(self.plan, P, B, self.extra)
        st = runner.run(self.model, st)
        n = st.ids.numel()
        if n == P and bool((st.ids == torch.arange(P, device=dev)).all()):
            return st.rows
        if n == 0:
            return st.base.repeat((P,) + (1,) * (st.base.dim() - 1))
        rest = st.rows.shape[1:]
        out = st.base.unsqueeze(0).repeat((P, 1) + (1,) * len(rest)) if n < P else \
            torch.empty((P, B) + rest, dtype=st.rows.dtype, device=dev)
        out[st.ids] = st.rows.reshape((n, B) + rest)
        return out.reshape((P * B,) + rest)


class _VmapForward(_ForwardBase):
    def __init__(self, model, pdict, P, hint):
        super().__init__(P, hint)
        self.model, self.pdict = model, pdict

    def __call__(self, x: torch.Tensor, per_perturbation: Optional[bool] = None) -> torch.Tensor:
        per, B = self._split(x, per_perturbation)
        model = self.model
        if per:
            xb = x.reshape((self.P, B) + x.shape[1:])
            y = vmap(lambda p, xi: functional_call(model, p, (xi,)))(self.pdict, xb)
        else:
            y = vmap(lambda p: functional_call(model, p, (x,)))(self.pdict)
        return y.reshape((self.P * y.shape[1],) + y.shape[2:])


# ----------------------------------------------------------------------------- estimator
def _param_owner(model: nn.Module) -> dict:
    owner = {}
    for m in model.modules():
        if type(m) in AFFINE:
            for kind in ("weight", "bias"):
                p = getattr(m, kind, None)
                if p is not None and id(p) not in owner:
                    owner[id(p)] = (m, kind)
    return owner


def _structured_factory(model: nn.Module, plan: CGEPlan, hint: dict, reuse: bool, extra: tuple):
    """``make_forward(s, e)`` of the structured engine: per-layer perturbation lists -> forward."""
    owner = _param_owner(model)
    for k, p in plan.params.items():
        if id(p) not in owner:
            raise UnsupportedModuleError(f"parameter {k!r} does not belong to a Linear/Conv1d/Conv2d; use engine='vmap'")
    entries = [(owner[id(plan.params[k])], shp, o, n) for k, shp, o, n in plan.layout]
    p0 = next(iter(plan.params.values()))
    dev, dtype = p0.device, p0.dtype

    def make_forward(s: int, e: int):
        ic, sc = plan.idx[s:e], plan.step[s:e]
        groups: dict = {}
        for (m, kind), shp, o, n in entries:
            sel = (ic >= o) & (ic < o + n)
            if not bool(sel.any()):
                continue
            mi = torch.unravel_index(ic[sel] - o, shp)
            groups.setdefault(m, {})[kind] = _Pert(
                torch.nonzero(sel).reshape(-1).to(dev), tuple(t.to(dev) for t in mi), sc[sel].to(dev, dtype))
        return _StructuredForward(model, groups, e - s, hint, reuse, extra)

    return make_forward


def _vmap_factory(model: nn.Module, plan: CGEPlan, hint: dict):
    """``make_forward(s, e)`` of the generic engine: perturbed parameter copies + functional_call/vmap."""
    fixed = dict(model.named_parameters())
    fixed.update(dict(model.named_buffers()))
    dev = next(iter(plan.params.values())).device
    theta = flatten_params(plan.params, dev)

    def make_forward(s: int, e: int):
        P = e - s
        flat = theta.unsqueeze(0).repeat(P, 1)
        flat[torch.arange(P, device=dev), plan.idx[s:e].to(dev)] += plan.step[s:e].to(dev, flat.dtype)
        pd = {k: fixed[k].detach().unsqueeze(0).expand((P,) + tuple(fixed[k].shape)) for k in fixed}
        pd.update(unflatten(flat, plan.layout))
        return _VmapForward(model, pd, P, hint)

    return make_forward


def _pick_engine(model: nn.Module, engine: str, extra: tuple) -> str:
    if engine not in ("structured", "vmap", "auto"):
        raise ValueError(f"unknown engine {engine!r}; use 'structured', 'vmap' or 'auto'")
    if engine == "vmap":
        return engine
    try:
        check_structured_support(model, extra)
        return "structured"
    except UnsupportedModuleError:
        if engine == "structured":
            raise
        return "vmap"


@torch.no_grad()
def cge_structured(
    model: nn.Module,
    loss_of_forward: LossOfForward,
    mu: float = 5e-3,
    scheme: str = "forward",
    masks: Optional[dict] = None,
    chunk_size: Optional[int] = 256,
    reuse: bool = True,
    engine: str = "structured",
    batch_size: Optional[int] = None,
    extra_pointwise: tuple = (),
    distributed: bool = False,
    group=None,
    progress: bool = False,
) -> ZOEstimate:
    """CGE of ``loss_of_forward`` w.r.t. the trainable parameters of ``model`` via a perturbed forward.

    Args:
        model: network (see module docstring for the structured engine's support); its
            parameters are never modified; the model's device is used.
        loss_of_forward: ``(forward, P) -> Tensor (P,)``; ``forward(x)`` evaluates the model under
            the chunk's P perturbations (x: ``(B, ...)`` shared or ``(P*B, ...)``, out ``(P*B, ...)``).
        mu, scheme, masks: as in :func:`zosol.zo.cge` (masks keyed by ``named_parameters`` names).
        chunk_size: perturbations per ``loss_of_forward`` call (None: all at once).
        reuse: keep shared activations unexpanded until each perturbation's layer (feature reuse);
            False expands a shared input to P*B rows at the first layer (still shared weights + delta).
        engine: ``"structured"`` (error on unsupported modules), ``"vmap"`` (generic functional_call
            over perturbed parameter copies) or ``"auto"`` (structured if supported, else vmap).
        batch_size: B, to disambiguate shared vs per-perturbation inputs when P divides B.
        extra_pointwise: extra module classes to treat as parameter-free per-sample operations.
        distributed: shard chunks over the ranks of the initialised process group.
    Returns:
        :class:`ZOEstimate` over the parameters with ``requires_grad=True``.
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    plan = CGEPlan.build(params, masks, scheme, mu)
    engine = _pick_engine(model, engine, extra_pointwise)
    hint = {"B": batch_size}
    make_forward = (_structured_factory(model, plan, hint, reuse, extra_pointwise) if engine == "structured"
                    else _vmap_factory(model, plan, hint))
    return plan.run(lambda s, e: loss_of_forward(make_forward(s, e), e - s),
                    lambda: loss_of_forward(_PlainForward(model, hint), 1), chunk_size, distributed, group,
                    next(iter(params.values())).device, progress, {"engine": engine, "reuse": reuse},
                    "loss_of_forward")


class _PlainForward(_ForwardBase):
    """Unperturbed forward (P = 1)."""

    def __init__(self, model, hint):
        super().__init__(1, hint)
        self.model = model

    def __call__(self, x: torch.Tensor, per_perturbation: Optional[bool] = None) -> torch.Tensor:
        self._split(x, per_perturbation)
        return self.model(x)
