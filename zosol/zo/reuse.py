"""``cge_structured``: CGE through a perturbed forward, with feature reuse for any traceable network.

``loss_of_forward(forward, P) -> Tensor (P,)`` protocol: ``forward(x)`` with ``x`` of shape
``(B, ...)`` (identical input for every perturbation) or ``(P*B, ...)`` (rows ``p*B:(p+1)*B``
belong to perturbation p) returns ``(P*B, ...)``: the model's output under each of the chunk's P
coordinate perturbations.  If the two cases are ambiguous (``B`` divisible by ``P`` before B is
known), pass ``forward(x, per_perturbation=True/False)`` or ``cge_structured(..., batch_size=B)``.

Two engines evaluate ``forward``:

* ``structured`` (:mod:`.structured`): the model is traced with ``torch.fx`` (custom ``forward``,
  skip connections, ``cat``, reshapes, Linear/Conv, norms, pooling, ...); each perturbation runs only
  the part of the network after the layer it perturbs, batched with the chunk's others, and the
  perturbed layer adds its cheap output change.  Loss values equal those of perturbed parameter
  copies up to round-off.
* ``vmap``: ``functional_call`` + ``vmap`` over perturbed parameter copies (any model torch.func
  can run; BatchNorm in train mode gets per-perturbation copies of its running statistics).

``engine="auto"`` (default) takes ``structured`` when the model traces and every trainable
parameter belongs to a leaf module called once, else ``vmap``; ``info["engine"]`` and
``info["engine_reason"]`` of the estimate say which one ran and why.  Neither engine changes the
model: parameters, buffers (BatchNorm running statistics) and the training mode are left as they were.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from .checks import UnsupportedModuleError
from .parallel import AutoChunk, chunk_size_from_budget, memory_budget
from .plan import CGEPlan, ZOEstimate, flatten_params, unflatten
from .structured import GraphPlan, Pert, State, base_pass, run_graph, trace_plan

__all__ = [
    "Residual",
    "UnsupportedModuleError",
    "check_structured_support",
    "cge_structured",
    "LossOfForward",
    "ENGINES",
]

LossOfForward = Callable[[Callable[..., torch.Tensor], int], torch.Tensor]
ENGINES = ("auto", "structured", "vmap")
# live activations per perturbation, in units of the largest per-perturbation activation
_LIVE_FACTOR = 5


class Residual(nn.Sequential):
    """Residual block: ``forward(x) = x + body(x)`` where body is this Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + super().forward(x)


def check_structured_support(model: nn.Module) -> GraphPlan:
    """The traced plan of ``model``, or :class:`UnsupportedModuleError` saying why the structured path cannot run."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    plan, reason = trace_plan(model, params)
    if plan is None:
        raise UnsupportedModuleError(
            f"structured perturbed forward not applicable: {reason}; use engine='vmap' or engine='auto'"
        )
    return plan


# ----------------------------------------------------------------------------- forward callables
class _ForwardBase:
    """Callable ``forward(x, per_perturbation=None) -> (P*B, ...)`` for one chunk of P perturbations."""

    def __init__(self, P: int, hint: dict):
        self.P = P
        self.hint = hint  # shared across the chunks of one estimate: {"B": int or None, ...}

    def _split(self, x: torch.Tensor, per_perturbation: bool | None) -> tuple[bool, int]:
        P, N = self.P, x.shape[0]
        B = self.hint.get("B")
        if per_perturbation is None:
            if P == 1 or N % P != 0:
                per_perturbation = False
            elif B is not None and N in (B, P * B):
                per_perturbation = N == P * B and N != B
            else:
                raise ValueError(
                    f"cannot tell whether input of leading size {N} is shared (B={N}) or per-perturbation "
                    f"(P={P} x B={N // P}); call forward(x, per_perturbation=...) or pass batch_size= to cge_structured"
                )
        if per_perturbation and N % P != 0:
            raise ValueError(f"per-perturbation input must have leading size P*B with P={P}, got {N}")
        B_ = N // P if per_perturbation else N
        if B is None:
            self.hint["B"] = B_
        return per_perturbation, B_

    def _record(self, per_perturbation_bytes: int) -> None:
        self.hint["bytes"] = max(self.hint.get("bytes", 0), int(per_perturbation_bytes))


class _StructuredForward(_ForwardBase):
    def __init__(self, plan: GraphPlan, groups: dict, P: int, hint: dict, reuse: bool):
        super().__init__(P, hint)
        self.plan, self.groups, self.reuse = plan, groups, reuse

    def _cache(self, x: torch.Tensor) -> dict:
        """Unperturbed node values for the shared input ``x`` (computed once per estimate and input)."""
        hit = self.hint.get("cache")
        if hit is not None and hit[0].shape == x.shape and hit[0].dtype == x.dtype and torch.equal(hit[0], x):
            return hit[1]
        cache = base_pass(self.plan, x, x.device)
        self.hint["cache"] = (x, cache)
        self._record(
            max(
                (
                    s.base.numel() * s.base.element_size()
                    for v in cache.values()
                    for s in _flat_states(v)
                    if s.base is not None
                ),
                default=0,
            )
        )
        return cache

    def __call__(self, x: torch.Tensor, per_perturbation: bool | None = None) -> torch.Tensor:
        per, B = self._split(x, per_perturbation)
        P, dev = self.P, x.device
        if x.dim() == 4:  # convolutions over many rows run faster channels-last on CPUs (oneDNN)
            x = x.contiguous(memory_format=torch.channels_last)
        cache = None
        if per:
            st = State(None, x, torch.arange(P, device=dev))
            self._record(x.numel() * x.element_size() // P)
        elif self.reuse:
            st, cache = State(x, None, torch.empty(0, dtype=torch.long, device=dev)), self._cache(x)
        else:
            st = State(None, x.repeat((P,) + (1,) * (x.dim() - 1)), torch.arange(P, device=dev))
        out = run_graph(self.plan, st, self.groups, P, B, cache)
        if not isinstance(out, State):
            raise UnsupportedModuleError(
                "the model's forward must return one tensor for the structured path; use engine='vmap'"
            )
        return _assemble(out, P, B)


def _flat_states(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _assemble(st: State, P: int, B: int) -> torch.Tensor:
    """Output State -> (P*B, ...), perturbation p in rows p*B:(p+1)*B."""
    n, dev = st.n, st.ids.device
    if n == P and bool((st.ids == torch.arange(P, device=dev)).all()):
        return st.rows
    if n == 0:
        return st.base.repeat((P,) + (1,) * (st.base.dim() - 1))
    rest = st.rows.shape[1:]
    out = (
        st.base.unsqueeze(0).repeat((P, 1) + (1,) * len(rest))
        if n < P
        else torch.empty((P, B) + rest, dtype=st.rows.dtype, device=dev)
    )
    out[st.ids] = st.rows.reshape((n, B) + rest)
    return out.reshape((P * B,) + rest)


class _VmapForward(_ForwardBase):
    """Generic engine: ``functional_call`` + ``vmap`` over perturbed parameter copies ``pdict`` (P, ...)."""

    def __init__(self, model: nn.Module, pdict: dict, P: int, hint: dict):
        super().__init__(P, hint)
        self.model, self.pdict = model, pdict

    def __call__(self, x: torch.Tensor, per_perturbation: bool | None = None) -> torch.Tensor:
        per, B = self._split(x, per_perturbation)
        model, P = self.model, self.P
        # per-perturbation copies of the buffers: train-mode BatchNorm updates those, never the model's
        state = dict(self.pdict)
        state.update({k: b.unsqueeze(0).repeat((P,) + (1,) * b.dim()) for k, b in model.named_buffers()})
        if per:
            y = vmap(lambda p, xi: functional_call(model, p, (xi,)))(state, x.reshape((P, B) + x.shape[1:]))
        else:
            y = vmap(lambda p: functional_call(model, p, (x,)))(state)
        self._record(
            y[0].numel() * y.element_size() + sum(t[0].numel() * t.element_size() for t in self.pdict.values())
        )
        return y.reshape((P * y.shape[1],) + y.shape[2:])


# ----------------------------------------------------------------------------- engines
def _structured_factory(model: nn.Module, gplan: GraphPlan, plan: CGEPlan, hint: dict, reuse: bool):
    """``make_forward(s, e)`` of the structured engine: the chunk's perturbations grouped per module."""
    entries = [(gplan.owner.get(id(plan.params[k])), shp, o, n) for k, shp, o, n in plan.layout]
    p0 = next(iter(plan.params.values()))
    dev, dtype = p0.device, p0.dtype

    def make_forward(s: int, e: int) -> _StructuredForward:
        ic, sc = plan.idx[s:e], plan.step[s:e]
        groups: dict = {}
        for own, shp, o, n in entries:
            if own is None:  # a parameter the traced forward never uses: its perturbations change nothing
                continue
            sel = (ic >= o) & (ic < o + n)
            if not bool(sel.any()):
                continue
            mi = torch.unravel_index(ic[sel] - o, shp)
            groups.setdefault(own[0], {})[own[1]] = Pert(
                torch.nonzero(sel).reshape(-1).to(dev), tuple(t.to(dev) for t in mi), sc[sel].to(dev, dtype)
            )
        return _StructuredForward(gplan, groups, e - s, hint, reuse)

    return make_forward


def _vmap_factory(model: nn.Module, plan: CGEPlan, hint: dict):
    """``make_forward(s, e)`` of the generic engine: perturbed parameter copies + functional_call/vmap."""
    fixed = {k: p.detach() for k, p in model.named_parameters()}
    dev = next(iter(plan.params.values())).device
    theta = flatten_params(plan.params, dev)

    def make_forward(s: int, e: int) -> _VmapForward:
        P = e - s
        flat = theta.unsqueeze(0).repeat(P, 1)
        flat[torch.arange(P, device=dev), plan.idx[s:e].to(dev)] += plan.step[s:e].to(dev, flat.dtype)
        pd = {k: v.unsqueeze(0).expand((P,) + tuple(v.shape)) for k, v in fixed.items()}
        pd.update(unflatten(flat, plan.layout))
        return _VmapForward(model, pd, P, hint)

    return make_forward


def _pick_engine(model: nn.Module, engine: str, params: dict) -> tuple[str, GraphPlan | None, str]:
    """``(engine, traced plan or None, reason)``; ``engine="structured"`` raises if it cannot apply."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    if engine == "vmap":
        return "vmap", None, "engine='vmap' requested"
    gplan, reason = trace_plan(model, params)
    if gplan is not None:
        return "structured", gplan, "model traced by torch.fx; every parameter in a leaf module called once"
    if engine == "structured":
        raise UnsupportedModuleError(
            f"structured perturbed forward not applicable: {reason}; use engine='vmap' or engine='auto'"
        )
    warnings.warn(f"cge_structured: using the slower vmap engine because {reason}", stacklevel=3)
    return "vmap", None, reason


def _forwards(model: nn.Module, engine: str, gplan: GraphPlan | None, plan: CGEPlan, hint: dict, reuse: bool):
    """``(make_forward(s, e), plain)`` of ``engine``: the forward under perturbations s..e of the plan
    and the unperturbed forward (one copy of the parameters)."""
    if engine == "structured":
        return _structured_factory(model, gplan, plan, hint, reuse), _StructuredForward(gplan, {}, 1, hint, True)
    make_forward = _vmap_factory(model, plan, hint)
    return make_forward, _VmapForward(model, {k: p.detach().unsqueeze(0) for k, p in model.named_parameters()}, 1, hint)


def _chunking(chunk_size, memory_budget_bytes: int | None, hint: dict, device: torch.device):
    """``"auto"`` -> :class:`AutoChunk` sized from the bytes per perturbation the probe chunk recorded."""
    if chunk_size != "auto":
        return chunk_size
    budget = memory_budget(device, memory_budget_bytes)
    return AutoChunk(
        lambda: chunk_size_from_budget(max(1, _LIVE_FACTOR * hint.get("bytes", 1)), budget, max_chunk=4096)
    )


@torch.no_grad()
def cge_structured(
    model: nn.Module,
    loss_of_forward: LossOfForward,
    mu: float = 5e-3,
    scheme: str = "forward",
    masks: dict | None = None,
    chunk_size: int | str | None = "auto",
    reuse: bool = True,
    engine: str = "auto",
    batch_size: int | None = None,
    memory_budget: int | None = None,
    distributed: bool = False,
    group=None,
    progress: bool = False,
) -> ZOEstimate:
    """CGE of ``loss_of_forward`` w.r.t. the trainable parameters of ``model`` via a perturbed forward.

    Args:
        model: the network (any ``nn.Module``; see the module docstring for the engines); left
            unchanged; the model's device is used.
        loss_of_forward: ``(forward, P) -> Tensor (P,)``; ``forward(x)`` evaluates the model under
            the chunk's P perturbations (x: ``(B, ...)`` shared or ``(P*B, ...)``, out ``(P*B, ...)``).
        mu, scheme, masks: as in :func:`zosol.zo.cge` (masks keyed by ``named_parameters`` names).
        chunk_size: perturbations per ``loss_of_forward`` call; ``"auto"``: from ``memory_budget``
            after a probe chunk of 8; None: all at once.
        reuse: keep shared activations unexpanded until each perturbation's layer (feature reuse);
            False expands a shared input to P*B rows at the input (still shared weights + delta).
        engine: ``"auto"``, ``"structured"`` (error if it cannot apply) or ``"vmap"``.
        batch_size: B, to disambiguate shared vs per-perturbation inputs when P divides B.
        memory_budget: bytes for one chunk (default: :func:`zosol.zo.parallel.memory_budget`).
        distributed: shard chunks over the ranks of the initialised process group.
    Returns:
        :class:`ZOEstimate` over the parameters with ``requires_grad=True``; ``info`` has
        ``engine``, ``engine_reason`` and ``chunk_size``.
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    plan = CGEPlan.build(params, masks, scheme, mu)
    engine, gplan, reason = _pick_engine(model, engine, params)
    hint = {"B": batch_size}
    make_forward, plain = _forwards(model, engine, gplan, plan, hint, reuse)
    dev = next(iter(params.values())).device
    chunks = _chunking(chunk_size, memory_budget, hint, dev)
    est = plan.run(
        lambda s, e: loss_of_forward(make_forward(s, e), e - s),
        lambda: loss_of_forward(plain, 1),
        chunks,
        distributed,
        group,
        dev,
        progress,
        {"engine": engine, "engine_reason": reason, "reuse": reuse},
        "loss_of_forward",
    )
    est.info["chunk_size"] = chunks.chosen if isinstance(chunks, AutoChunk) else chunk_size
    return est
