"""Structured perturbed forward over a ``torch.fx`` graph (feature reuse for any traceable network).

A chunk of P coordinate perturbations is evaluated as one pass over the network's graph in which
every value is a :class:`State`: the activation ``base`` (B rows) shared by the perturbations that
have not reached their layer yet, and ``rows`` (n*B rows) of the n perturbations that have.  A
perturbation's rows are created ("activated") at the layer that owns its parameter, as that
layer's output on the shared input plus the cheap output change of one perturbed coordinate:

    Conv/Linear  W[o, c, k] += s   ->  output channel o += s * (input channel c, shifted by k)
                 b[o] += s         ->  output channel o += s
    Norm affine  gamma[c] += s     ->  channel c += s * normalised input;  beta[c] += s -> += s
    other        (any module with parameters) the module re-run per perturbation (vmap)

Everything before a perturbation's layer is computed once (at B rows, cached across chunks of one
estimate); everything after it runs batched over the perturbations (the feature-reuse tail).  Ops
act on each perturbation's B rows exactly as in the unperturbed network: per-sample ops run on the
flat (n*B) rows, everything else under ``vmap`` over the perturbation axis (so ``x.view(x.size(0),
-1)``, ``cat``, batch statistics, ... keep their meaning).  BatchNorm with batch statistics (train
mode) normalises each perturbation's B rows with their own statistics and never updates running
statistics.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

__all__ = ["State", "Pert", "GraphPlan", "trace_plan", "run_graph", "NORMS", "AFFINE"]

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORMS = BATCHNORMS + (nn.GroupNorm, nn.LayerNorm)
PER_SAMPLE_MODULES: tuple = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Identity,
    nn.PReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.GroupNorm,
    nn.LayerNorm,
) + AFFINE
# functions / methods that act on each sample independently and broadcast like elementwise ops
PER_SAMPLE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.sin,
    torch.cos,
    F.relu,
    F.gelu,
    F.silu,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.tanh,
    F.sigmoid,
    F.mish,
    F.hardtanh,
}
PER_SAMPLE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "relu",
    "tanh",
    "sigmoid",
    "exp",
    "neg",
    "contiguous",
    "sin",
    "cos",
    "abs",
    "pow",
    "clamp",
}
META_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}
INPLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


@dataclass
class State:
    """Value of one graph node under a chunk of perturbations.

    ``base``: (B, ...) activation of the perturbations not in ``ids`` (None when all are in ``ids``);
    ``rows``: (n*B, ...) activations of perturbations ``ids`` (n,), block i of B rows for ``ids[i]``.
    """

    base: torch.Tensor | None
    rows: torch.Tensor | None
    ids: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    def rep(self, B: int) -> torch.Tensor:
        """One unperturbed-sized representative (B, ...) for shape queries."""
        return self.base if self.base is not None else self.rows[:B]

    def blocks(self, B: int) -> torch.Tensor:
        """Rows as (n, B, ...)."""
        return self.rows.reshape((self.n, B) + self.rows.shape[1:])


@dataclass
class Pert:
    """Perturbations of one parameter tensor inside a chunk: chunk-local ids (n,), multi-index, step (n,)."""

    ids: torch.Tensor
    idx: tuple
    step: torch.Tensor


@dataclass
class GraphPlan:
    """A traced model: its graph, its modules and the call_module node that owns each parameter."""

    gm: fx.GraphModule
    modules: dict  # target -> module
    owner: dict  # id(parameter) -> (module target, attribute name)
    frees: dict  # node -> nodes whose value is not needed after it


def _concrete_args(model: nn.Module) -> dict:
    """Arguments of ``forward`` after the first that have defaults: traced as constants."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def trace_plan(model: nn.Module, params: dict) -> tuple[GraphPlan | None, str]:
    """Trace ``model`` with torch.fx; ``(plan, "")`` or ``(None, reason)`` if the structured path cannot apply."""
    try:
        gm = fx.symbolic_trace(model, concrete_args=_concrete_args(model) or None)
    except Exception as e:  # noqa: BLE001 -- any tracing failure means: use the vmap path
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    places = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]  # args: a traced-in default
    if len(places) != 1:
        return None, f"forward takes {len(places)} tensor inputs after tracing; the structured path needs one"
    modules = dict(model.named_modules())
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr" and any(p is _fetch(model, node.target) for p in params.values()):
            return None, f"parameter {node.target!r} is used outside a leaf module (get_attr in the traced graph)"
    owner = {}
    for target, count in calls.items():
        for kind, p in modules[target].named_parameters(recurse=False):
            if p.requires_grad and count > 1:
                return None, f"module {target!r} is called {count} times (shared weights)"
            owner[id(p)] = (target, kind)
    for node in gm.graph.nodes:
        if (
            node.op == "call_module"
            and node.target in {t for t, _ in owner.values()}
            and (len(node.args) != 1 or node.kwargs)
        ):
            return (
                None,
                f"module {node.target!r} with parameters takes {len(node.args)} inputs; the structured path needs one",
            )
    return GraphPlan(gm, {t: modules[t] for t in calls}, owner, _last_uses(gm.graph)), ""


def _last_uses(graph: fx.Graph) -> dict:
    """node -> the nodes whose last user it is (their values can be dropped after it runs)."""
    seen: set = set()
    frees: dict = {}
    for node in reversed(list(graph.nodes)):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                frees.setdefault(node, []).append(inp)
    return frees


def _fetch(model: nn.Module, target: str) -> Any:
    obj = model
    for a in target.split("."):
        obj = getattr(obj, a)
    return obj


# ----------------------------------------------------------------------------- norms
def _batch_stats(m: nn.Module) -> bool:
    return isinstance(m, BATCHNORMS) and (m.training or m.running_mean is None)


def _batch_norm_blocks(m: nn.Module, x: torch.Tensor, n: int, affine: bool) -> torch.Tensor:
    """Train-mode BatchNorm of each of the n blocks of B rows of ``x`` with the block's own batch
    statistics (PyTorch's kernel per block; running statistics are neither read nor written)."""
    B = x.shape[0] // n
    w, b = (m.weight, m.bias) if affine else (None, None)
    if n == 1:
        return F.batch_norm(x, None, None, w, b, True, 0.0, m.eps)
    out = torch.empty_like(x)
    for i in range(n):
        out[i * B : (i + 1) * B] = F.batch_norm(x[i * B : (i + 1) * B], None, None, w, b, True, 0.0, m.eps)
    return out


def _normalise(m: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """Normalised input without the affine part; ``x`` is (n*B, C, ...) (BatchNorm: n batches of B)."""
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, m.num_groups, None, None, m.eps)
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    if not _batch_stats(m):
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    return _batch_norm_blocks(m, x, n, affine=False)


def module_forward(m: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """``m`` on (n*B, ...) rows of n perturbations, per-perturbation semantics, no state updates."""
    if _batch_stats(m):
        return _batch_norm_blocks(m, x, n, affine=True)
    if isinstance(m, PER_SAMPLE_MODULES) or isinstance(m, NORMS):
        if getattr(m, "inplace", False):
            x = x.clone()
        return m(x)
    if isinstance(m, nn.Flatten) and m.start_dim != 0 or isinstance(m, nn.Unflatten) and m.dim != 0:
        return m(x)
    if isinstance(m, nn.Dropout) and (not m.training or m.p == 0):
        return x
    state = {k: v for k, v in m.named_parameters()}
    state.update(dict(m.named_buffers()))
    blocks = x.reshape((n, x.shape[0] // n) + x.shape[1:])
    y = vmap(lambda xb: functional_call(m, state, (xb,)))(blocks)
    return y.reshape((-1,) + y.shape[2:])


# ----------------------------------------------------------------------------- deltas
def _conv_input(
    m: nn.Module, X: torch.Tensor, blk: torch.Tensor, o: torch.Tensor, c: torch.Tensor, ks: tuple, out_sp: tuple
) -> torch.Tensor:
    """Input channel seen by weight ``[o, c, *ks]``, shifted/strided to the output grid: (J, B, *out_sp)."""
    cin = (o // (m.out_channels // m.groups)) * (m.in_channels // m.groups) + c
    xs = X[blk, :, cin]  # (J, B, *sp_in)
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        xs = F.pad(xs, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    J, nsp = xs.shape[0], len(out_sp)
    for dim in range(nsp):
        L = out_sp[dim]
        pos = (ks[dim] * m.dilation[dim])[:, None] + torch.arange(L, device=xs.device)[None, :] * m.stride[dim]
        view = [J, 1] + [1] * nsp
        view[2 + dim] = L
        expand = list(xs.shape)
        expand[2 + dim] = L
        xs = xs.gather(2 + dim, pos.view(view).expand(expand))
    return xs


def _add_delta(
    m: nn.Module,
    kind: str,
    Y: torch.Tensor,
    pj: torch.Tensor,
    X: torch.Tensor,
    blk: torch.Tensor,
    idx: tuple,
    s: torch.Tensor,
) -> None:
    """Y (N, B, *out) += output change of perturbations at rows ``pj``.

    ``X`` (nX, B, ...) holds the layer input (Conv/Linear) or the normalised input (norms); row
    ``blk[j]`` of ``X`` is what perturbation ``j`` sees.  ``idx``: multi-index into the parameter.
    """
    if isinstance(m, (nn.Linear, nn.LayerNorm)):
        F_ = Y.shape[-1] if isinstance(m, nn.Linear) else int(torch.Size(m.normalized_shape).numel())
        Y4 = Y.view(Y.shape[0], Y.shape[1], -1, F_)
        if isinstance(m, nn.LayerNorm):
            f = torch.zeros_like(idx[0])
            for i, size in zip(idx, m.normalized_shape):
                f = f * size + i
            o, xin = f, f
        else:
            o, xin = idx[0], (idx[1] if kind == "weight" else None)
        if kind == "bias":
            Y4[pj, :, :, o] += s[:, None, None]
        else:
            X4 = X.reshape(X.shape[0], X.shape[1], -1, X.shape[-1] if isinstance(m, nn.Linear) else F_)
            Y4[pj, :, :, o] += s[:, None, None] * X4[blk, :, :, xin]
        return
    shp = (-1, 1) + (1,) * (Y.dim() - 3)
    if kind == "bias":
        Y[pj, :, idx[0]] += s.view(shp)
    elif isinstance(m, NORMS):
        Y[pj, :, idx[0]] += s.view(shp) * X[blk, :, idx[0]]
    else:
        Y[pj, :, idx[0]] += s.view(shp) * _conv_input(m, X, blk, idx[0], idx[1], idx[2:], tuple(Y.shape[3:]))


def _generic_rows(
    m: nn.Module,
    kind: str,
    Y: torch.Tensor,
    pj: torch.Tensor,
    X: torch.Tensor,
    blk: torch.Tensor,
    idx: tuple,
    s: torch.Tensor,
) -> None:
    """Y[pj] = ``m`` re-run with its own perturbed parameter on X[blk] (any module with parameters)."""
    p = getattr(m, kind)
    J = pj.numel()
    pw = p.detach().unsqueeze(0).repeat((J,) + (1,) * p.dim())
    pw[(torch.arange(J, device=pw.device),) + tuple(idx)] += s.to(pw.dtype)
    state = {k: v for k, v in m.named_parameters()}
    state.update(dict(m.named_buffers()))

    def one(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(m, {**state, kind: w}, (x,))

    Y[pj] = vmap(one)(pw, X[blk]).to(Y.dtype)


# ----------------------------------------------------------------------------- graph execution
def _states(args: Any) -> list:
    out: list = []
    fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, State) else a)
    return out


def _substitute(args: Any, fn: Callable[[State], Any]) -> Any:
    return fx.node.map_aggregate(args, lambda a: fn(a) if isinstance(a, State) else a)


def _target(node: fx.Node, modules: dict) -> Callable:
    """The callable of a call_* node; in-place variants replaced by their out-of-place forms."""
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function":
        return INPLACE_FUNCTIONS.get(node.target, node.target)
    name = node.target
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return lambda self, *a, **k: getattr(self, name)(*a, **k)


def _flat_ok(node: fx.Node, args: tuple, kwargs: dict, states: list) -> bool:
    """True if the op can run on flat (n*B, ...) rows: per-sample and constants broadcast per sample."""
    t = node.target
    if node.op == "call_function":
        if t in (torch.cat, torch.concat):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            ok = dim != 0 and -dim != states[0].rep(1).dim()
        elif t is operator.getitem:
            ix = args[1]
            ok = (
                isinstance(ix, tuple)
                and len(ix) > 0
                and ix[0] == slice(None)
                and all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in ix)
            )
        elif t is F.pad:
            ok = len(args[1]) < 2 * states[0].rep(1).dim()
        elif t in (
            F.avg_pool1d,
            F.avg_pool2d,
            F.max_pool1d,
            F.max_pool2d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
        ):
            ok = True
        elif t is torch.flatten:
            ok = kwargs.get("start_dim", args[1] if len(args) > 1 else 0) not in (0, -states[0].rep(1).dim())
        else:
            ok = t in PER_SAMPLE_FUNCTIONS or t in INPLACE_FUNCTIONS
    elif node.op == "call_method":
        name = t[:-1] if t.endswith("_") and not t.startswith("_") else t
        ok = name in PER_SAMPLE_METHODS or (name == "flatten" and len(args) > 1 and args[1] not in (0,))
    else:
        ok = False
    if not ok:
        return False
    nd = min(s.rep(1).dim() for s in states)
    consts: list = []
    fx.node.map_aggregate((args, kwargs), lambda a: consts.append(a) if isinstance(a, torch.Tensor) else a)
    return all(c.dim() < nd for c in consts)


class Runner:
    """Runs the traced graph for one chunk of P perturbations (``groups``: module target -> kind -> Pert).

    ``cache`` (node -> value of the unperturbed pass at B rows) is reused for every node whose inputs
    carry no perturbed rows, and for the ``base`` part of every State.
    """

    def __init__(self, plan: GraphPlan, groups: dict, P: int, B: int, cache: dict | None):
        self.plan, self.groups, self.P, self.B, self.cache = plan, groups, P, B, cache

    def run(self, x: State) -> Any:
        env: dict = {}
        for node in self.plan.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = node.args[0] if node.args else x
            elif node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a])
            else:
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                env[node] = self.eval(node, args, kwargs)
                for dead in self.plan.frees.get(node, ()):
                    del env[dead]
        raise RuntimeError("traced graph has no output node")

    def eval(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        states = _states((args, kwargs))
        if node.op == "get_attr":
            return _fetch(self.plan.gm, node.target)
        if not states:
            return _target(node, self.plan.modules)(*args, **kwargs)
        cached = self.cache.get(node) if self.cache is not None else None
        if cached is not None and node.target not in self.groups and all(s.n == 0 for s in states):
            return cached
        if (node.op == "call_method" and node.target in META_METHODS) or (
            node.op == "call_function" and node.target is getattr
        ):
            return _target(node, self.plan.modules)(*_substitute(args, lambda s: s.rep(self.B)), **kwargs)
        if node.op == "call_module" and len(args) == 1 and not kwargs:
            return self.module(node, args[0], cached)
        return self.op(node, args, kwargs, states, cached)

    def _base(self, fn: Callable, args: tuple, kwargs: dict, states: list, cached: Any) -> Any:
        if cached is not None:
            return _substitute(cached, lambda s: s.base) if not isinstance(cached, State) else cached.base
        if any(s.base is None for s in states):
            return None
        return fn(*_substitute(args, lambda s: s.base), **_substitute(kwargs, lambda s: s.base))

    def op(self, node: fx.Node, args: tuple, kwargs: dict, states: list, cached: Any) -> Any:
        """A function / method / multi-input module on States: flat rows if per-sample, else vmap."""
        fn = _target(node, self.plan.modules)
        base = self._base(fn, args, kwargs, states, cached)
        U = self._union(states)
        if U.numel() == 0:
            return _wrap(base, None, U)
        B = self.B
        if _flat_ok(node, args, kwargs, states):
            rows = fn(
                *_substitute(args, lambda s: self._align(s, U)), **_substitute(kwargs, lambda s: self._align(s, U))
            )
            return _wrap(base, rows, U)
        blocks = [self._align(s, U).reshape((U.numel(), B) + s.rep(B).shape[1:]) for s in states]

        def one(*ts: torch.Tensor) -> Any:
            it = iter(ts)
            a = _substitute((args, kwargs), lambda s: next(it))
            return fn(*a[0], **a[1])

        out = vmap(one)(*blocks)
        rows = fx.node.map_aggregate(
            out, lambda t: t.reshape((-1,) + t.shape[2:]) if isinstance(t, torch.Tensor) else t
        )
        return _wrap(base, rows, U)

    def _union(self, states: list) -> torch.Tensor:
        main = max(states, key=lambda s: s.n)
        others = [s.ids for s in states if s is not main and s.n]
        if not others:
            return main.ids
        pos = torch.full((self.P,), -1, dtype=torch.long, device=main.ids.device)
        pos[main.ids] = torch.arange(main.n, device=pos.device)
        extra = torch.cat(others)
        extra = torch.unique(extra[pos[extra] < 0])
        return torch.cat([main.ids, extra]) if extra.numel() else main.ids

    def _align(self, s: State, U: torch.Tensor) -> torch.Tensor:
        """Rows of ``s`` for the perturbations ``U`` (shared base where ``s`` has none): (|U|*B, ...)."""
        if s.n == U.numel() and (s.ids is U or torch.equal(s.ids, U)):
            return s.rows
        pos = torch.full((self.P,), -1, dtype=torch.long, device=U.device)
        if s.n:
            pos[s.ids] = torch.arange(s.n, device=U.device)
        p = pos[U]
        if s.n == 0:
            return tile(s.base, U.numel())
        src = torch.cat([s.blocks(self.B), s.base.unsqueeze(0)])
        return src[torch.where(p >= 0, p, s.n)].reshape((-1,) + s.base.shape[1:])

    def module(self, node: fx.Node, x: State, cached: State | None) -> State:
        """A single-input leaf module; the perturbations it owns are activated here."""
        m = self.plan.modules[node.target]
        if cached is not None:
            base = cached.base
        else:
            base = module_forward(m, x.base, 1) if x.base is not None else None
        rows = module_forward(m, x.rows, x.n) if x.n else None
        groups = self.groups.get(node.target)
        if not groups:
            return State(base, rows, x.ids)
        return self._activate(m, x, groups, base, rows)

    def _activate(
        self, m: nn.Module, x: State, groups: dict, base: torch.Tensor | None, rows: torch.Tensor | None
    ) -> State:
        B, n, dev = self.B, x.n, x.ids.device
        pos_old = torch.full((self.P,), -1, dtype=torch.long, device=dev)
        pos_old[x.ids] = torch.arange(n, device=dev)
        all_ids = torch.cat([g.ids for g in groups.values()])
        new_ids = all_ids[pos_old[all_ids] < 0]
        k = new_ids.numel()
        if k == 0:
            Y = rows
        else:  # perturbations activated here start from the shared output
            Y = tile(base, n + k)
            if n:
                Y[: n * B] = rows
        Y = Y.reshape((n + k, B) + Y.shape[1:])
        ids = torch.cat([x.ids, new_ids]) if k else x.ids
        pos_new = pos_old.clone()
        pos_new[new_ids] = torch.arange(n, n + k, device=dev)
        inputs = _DeltaInputs(m, x, B)
        for kind, g in groups.items():
            act = pos_old[g.ids] >= 0
            for sel, from_rows in ((act, True), (~act, False)):
                if not bool(sel.any()):
                    continue
                blk = pos_old[g.ids[sel]] if from_rows else torch.zeros(int(sel.sum()), dtype=torch.long, device=dev)
                fn = _add_delta if isinstance(m, AFFINE + NORMS) else _generic_rows
                fn(
                    m,
                    kind,
                    Y,
                    pos_new[g.ids[sel]],
                    inputs.get(from_rows),
                    blk,
                    tuple(t[sel] for t in g.idx),
                    g.step[sel].to(Y.dtype),
                )
        return State(base, Y.reshape((-1,) + Y.shape[2:]), ids)


class _DeltaInputs:
    """What a perturbed layer's delta multiplies, (nX, B, ...): its input, or the normalised input of a norm."""

    def __init__(self, m: nn.Module, x: State, B: int):
        self.m, self.x, self.B, self.memo = m, x, B, {}

    def get(self, from_rows: bool) -> torch.Tensor:
        if from_rows not in self.memo:
            t, n = (self.x.rows, self.x.n) if from_rows else (self.x.base, 1)
            if isinstance(self.m, NORMS):
                t = _normalise(self.m, t, n)
            self.memo[from_rows] = t.reshape((n, self.B) + t.shape[1:])
        return self.memo[from_rows]


def tile(base: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (k*B, ...): k copies of ``base`` in its memory format (channels_last stays so)."""
    out = torch.empty(
        (k * base.shape[0],) + base.shape[1:], dtype=base.dtype, device=base.device, memory_format=_format(base)
    )
    out.view((k,) + base.shape).copy_(base.unsqueeze(0).expand((k,) + base.shape))
    return out


def _format(t: torch.Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _wrap(base: Any, rows: Any, ids: torch.Tensor) -> Any:
    """States from an op's base and rows outputs (tuples of outputs give tuples of States)."""
    if isinstance(rows, (tuple, list)) or isinstance(base, (tuple, list)):
        n = len(rows) if rows is not None else len(base)
        bs = base if base is not None else [None] * n
        rs = rows if rows is not None else [None] * n
        return type(rs if rows is not None else bs)(State(b, r, ids) for b, r in zip(bs, rs))
    return State(base, rows, ids)


def run_graph(plan: GraphPlan, x: State, groups: dict, P: int, B: int, cache: dict | None = None) -> Any:
    """Output of the traced graph for input State ``x`` under the chunk's perturbations ``groups``."""
    return Runner(plan, groups, P, B, cache).run(x)


def base_pass(plan: GraphPlan, x: torch.Tensor, device: torch.device) -> dict:
    """Values of every node on the unperturbed input ``x`` (B, ...): the cache of :class:`Runner`."""
    runner = Runner(plan, {}, 1, x.shape[0], None)
    env: dict = {}
    empty = torch.empty(0, dtype=torch.long, device=device)
    for node in plan.gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = node.args[0] if node.args else State(x, None, empty)
        elif node.op != "output":
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = runner.eval(node, args, kwargs)
    return {k: v for k, v in env.items() if _states(v)}
