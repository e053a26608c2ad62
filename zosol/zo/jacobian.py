"""Finite-difference Jacobians of a black-box step, and backpropagation through it.

In Solver-in-the-Loop training only the coarse solver ``P`` is black; the corrector is ours.
:func:`fd_step` wraps a black-box ``step(state, params) -> state`` in a ``torch.autograd.Function``
whose forward calls the black box and whose backward applies the transpose of a finite-difference
Jacobian of the black box at that call's input.  Autograd handles everything else, so the cost of
a gradient is the number of Jacobian probes, independent of the network's size.

States are ``(B, C, *spatial)``; a state is flattened to ``n = C * prod(spatial)`` entries, and the
Jacobian of one sample is ``(n, n)`` (row: output entry, column: input entry).

Structure (:class:`FDJacobian`):

* **sparse**: the pattern is a *stencil*, a set of offsets ``(c_out, c_in, *d)`` applied at every
  cell (periodic wrap; a superset for non-periodic domains).  It comes from a solver's declared
  ``stencil_reach`` (:func:`stencil_offsets`) or from probing several states
  (:func:`probe_offsets`: full finite-difference Jacobians, a noise threshold, the union over
  states and over cells, an optional margin of cells).  Columns that share no row get one colour
  (greedy Curtis-Powell-Reid colouring, :func:`colour_columns`); one probe per colour (forward
  differences) or two (central) give every entry.  All probes of a batch go to the black box in a
  few fixed-size batched calls.
* **dense** fallback when colours would exceed ``dense_fraction * n`` (a global pressure solve):
  ``n`` (forward) or ``2n`` (central) probes in chunks; the vector-Jacobian product is accumulated
  chunk by chunk, the Jacobian is never stored.

Run-time checks (sparse): compressed entries whose colour has no pattern column in that row must
be zero.  A *leak* (one that is not) means the pattern is too narrow at this state: the leaking
colours are re-probed with a step ``8 mu``; if the difference quotients change (a jump within
reach of ``mu``) :class:`DiscontinuityError` names the cause, otherwise the Jacobian of the leaking
sample is probed in full, its offsets join the stencil, the columns are recoloured, the event is
recorded in ``events`` and reported with ``warnings.warn``, and the batch is re-estimated.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from .checks import NonFiniteLossError, check_mu, check_scheme
from .parallel import chunk_size_from_budget, dist_info, iter_chunks, shard_chunks

__all__ = [
    "JacobianError",
    "DiscontinuityError",
    "Stencil",
    "stencil_offsets",
    "probe_offsets",
    "stencil_pattern",
    "colour_columns",
    "lattice_colouring",
    "colouring_is_valid",
    "directional_differences",
    "dense_jacobian",
    "FDJacobian",
    "fd_step",
]

Step = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

#: default finite-difference step per dtype (central differences)
DEFAULT_MU = {torch.float32: 1e-3, torch.float64: 1e-6}


class JacobianError(RuntimeError):
    """A finite-difference Jacobian cannot be estimated reliably (non-finite probes, bad settings)."""


class DiscontinuityError(JacobianError):
    """The black box's output jumps under perturbations of size ``mu``."""


# --------------------------------------------------------------------------------------------
# Stencils and patterns


@dataclass(frozen=True)
class Stencil:
    """Offsets ``(c_out, c_in, *d)``: output entry (c_out, x) depends on input entry (c_in, x + d)
    (periodic).  ``offsets``: int64 array (S, 2 + ndim); ``state_shape``: (C, *spatial)."""

    state_shape: tuple[int, ...]
    offsets: np.ndarray
    source: str = "probed"

    def union(self, other: Stencil) -> Stencil:
        both = np.unique(np.concatenate([self.offsets, other.offsets]), axis=0)
        return Stencil(self.state_shape, both, f"{self.source}+{other.source}")

    def dilate(self, margin: int) -> Stencil:
        """Every offset widened by ``margin`` cells along each spatial axis."""
        if margin <= 0:
            return self
        nd = len(self.state_shape) - 1
        box = np.array(list(itertools.product(range(-margin, margin + 1), repeat=nd)), dtype=np.int64)
        grown = (self.offsets[:, None, :] + np.pad(box, ((0, 0), (2, 0)))[None]).reshape(-1, self.offsets.shape[1])
        return Stencil(self.state_shape, _canonical(grown, self.state_shape), f"{self.source}+margin{margin}")

    @property
    def per_row(self) -> int:
        """Largest number of pattern entries in one row."""
        return int(np.bincount(self.offsets[:, 0], minlength=self.state_shape[0]).max())


def _canonical(offsets: np.ndarray, state_shape: Sequence[int]) -> np.ndarray:
    """Offsets reduced to (-N/2, N/2] per spatial axis, deduplicated."""
    sizes = np.asarray(state_shape[1:], dtype=np.int64)
    d = np.mod(offsets[:, 2:] + sizes // 2, sizes) - sizes // 2
    d = np.where(d < -((sizes - 1) // 2), d + sizes, d)
    return np.unique(np.concatenate([offsets[:, :2], d], 1), axis=0)


def stencil_offsets(state_shape: Sequence[int], reach: Sequence[int] | int) -> Stencil:
    """The structural stencil of a declared reach: every channel depends on every channel within
    ``reach[k]`` cells along spatial axis k (a box)."""
    state_shape = tuple(int(s) for s in state_shape)
    nd = len(state_shape) - 1
    reach = [int(reach)] * nd if isinstance(reach, int) else [int(r) for r in reach]
    if len(reach) != nd or min(reach) < 0:
        raise ValueError(
            f"stencil reach {reach} does not fit a state of shape {state_shape} "
            f"(one non-negative half-width per spatial axis)"
        )
    rows = [range(state_shape[0]), range(state_shape[0])] + [range(-r, r + 1) for r in reach]
    offs = np.array(list(itertools.product(*rows)), dtype=np.int64)
    return Stencil(state_shape, _canonical(offs, state_shape), f"stencil reach {tuple(reach)}")


def stencil_pattern(stencil: Stencil) -> sp.csr_matrix:
    """The (n, n) boolean sparsity pattern of a stencil applied at every cell (periodic)."""
    shape = stencil.state_shape
    c, spatial = shape[0], shape[1:]
    cells = np.indices(spatial).reshape(len(spatial), -1).T  # (cells, nd)
    ncell = cells.shape[0]
    rows, cols = [], []
    for off in stencil.offsets:
        src = np.mod(cells + off[2:], spatial)
        rows.append(off[0] * ncell + np.arange(ncell))
        cols.append(off[1] * ncell + np.ravel_multi_index(tuple(src.T), spatial))
    n = c * ncell
    r, k = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(r.size, dtype=bool), (r, k)), shape=(n, n))


def _offsets_of(mask: np.ndarray, state_shape: Sequence[int]) -> np.ndarray:
    """Offsets (S, 2 + nd) of the nonzeros of a boolean (n, n) Jacobian mask."""
    r, k = np.nonzero(mask)
    ro = np.array(np.unravel_index(r, state_shape)).T
    co = np.array(np.unravel_index(k, state_shape)).T
    return _canonical(np.concatenate([ro[:, :1], co[:, :1], co[:, 1:] - ro[:, 1:]], 1), state_shape)


# --------------------------------------------------------------------------------------------
# Colouring


def _greedy(conflict: sp.csr_matrix, order: Iterable[int]) -> np.ndarray:
    """Colour vertices in ``order`` with the smallest colour unused by coloured neighbours."""
    colours = np.full(conflict.shape[0], -1, dtype=np.int64)
    for j in order:
        used = colours[conflict.indices[conflict.indptr[j] : conflict.indptr[j + 1]]]
        free = np.ones(int(used.max(initial=-1)) + 2, dtype=bool)
        free[used[used >= 0]] = False
        colours[j] = int(np.argmax(free))
    return colours


def _dsatur(conflict: sp.csr_matrix) -> np.ndarray:
    """DSATUR (Brelaz): colour next the vertex whose neighbours already use the most colours."""
    n = conflict.shape[0]
    degree = np.diff(conflict.indptr).astype(np.float64)
    seen = np.zeros((n, 8), dtype=bool)  # seen[v, c]: a neighbour of v has colour c
    sat = np.zeros(n)
    colours = np.full(n, -1, dtype=np.int64)
    for _ in range(n):
        v = int(np.argmax(np.where(colours < 0, sat * (n + 1) + degree, -1)))
        c = int(np.argmin(seen[v])) if not seen[v].all() else seen.shape[1]
        if c >= seen.shape[1]:
            seen = np.concatenate([seen, np.zeros_like(seen)], 1)
        colours[v] = c
        nb = conflict.indices[conflict.indptr[v] : conflict.indptr[v + 1]]
        new = nb[~seen[nb, c]]
        seen[new, c] = True
        sat[new] += 1
    return colours


def lattice_colouring(pattern: sp.spmatrix, state_shape: Sequence[int], min_colours: int = 0) -> np.ndarray | None:
    """The fewest-colour valid *lattice* colouring ``colour = (c, x_1 mod p_1, ...)`` with each
    period ``p_k`` a divisor of the axis size (exact for translation-invariant periodic stencils
    whose size divides the grid, where greedy orders can miss the optimum), or None."""
    c, spatial = state_shape[0], tuple(state_shape[1:])
    cells = np.indices(spatial).reshape(len(spatial), -1)  # (nd, cells)
    divisors = [[d for d in range(1, s + 1) if s % d == 0] for s in spatial]
    best = None
    for periods in sorted(itertools.product(*divisors), key=math.prod):
        if c * math.prod(periods) < min_colours:
            continue
        if best is not None and c * math.prod(periods) >= int(best.max()) + 1:
            break
        label = np.ravel_multi_index(tuple(np.mod(cells, np.array(periods)[:, None])), periods)
        colours = (np.arange(c)[:, None] * math.prod(periods) + label[None]).reshape(-1)
        if colouring_is_valid(pattern, colours):
            best = colours
    return best


def colour_columns(pattern: sp.spmatrix, state_shape: Sequence[int] | None = None, min_colours: int = 0) -> np.ndarray:
    """Column colouring (Curtis-Powell-Reid): columns sharing a row get different colours.

    ``pattern``: (n_out, n) boolean.  Tries greedy in natural and largest-first order, DSATUR and
    (given ``state_shape``) lattice colourings; keeps the fewest colours that are at least
    ``min_colours`` (a spare colour keeps the leak check seeing every row), or the most when none
    is.  Returns (n,) int64 in 0..K-1.
    """
    p = sp.csr_matrix(pattern, dtype=np.float32)
    p.data[:] = 1
    conflict = (p.T @ p).tocsr()
    conflict.setdiag(0)
    conflict.eliminate_zeros()
    degree = np.diff(conflict.indptr)
    candidates = [_greedy(conflict, range(p.shape[1])), _greedy(conflict, np.argsort(-degree, kind="stable"))]
    if p.shape[1] <= 20000:
        candidates.append(_dsatur(conflict))
    if state_shape is not None:
        lattice = lattice_colouring(p, state_shape, min_colours)
        candidates += [] if lattice is None else [lattice]
    count = [int(c.max(initial=-1)) + 1 for c in candidates]
    ok = [i for i in range(len(candidates)) if count[i] >= min_colours]
    return candidates[min(ok, key=count.__getitem__)] if ok else candidates[int(np.argmax(count))]


def colouring_is_valid(pattern: sp.spmatrix, colours: np.ndarray) -> bool:
    """True when no row of ``pattern`` has two columns of the same colour."""
    p = sp.csr_matrix(pattern, dtype=np.float32)
    p.data[:] = 1
    onehot = sp.csr_matrix((np.ones(colours.size), (np.arange(colours.size), colours)))
    counts = p @ onehot
    return counts.nnz == 0 or counts.max() <= 1


# --------------------------------------------------------------------------------------------
# Probing the black box


def _eval_batched(
    step: Step, states: torch.Tensor, params: torch.Tensor | None, max_batch: int | None, distributed: bool = False
) -> torch.Tensor:
    """``step`` on (N, C, *s) in chunks of exactly ``max_batch`` (the last one padded with copies,
    so a solver that retraces per batch size sees one size); returns (N, C, *s).  ``distributed``:
    the chunks are shared out over the ranks of the process group (round robin, as
    :func:`~zosol.zo.parallel.evaluate_chunked` does) and summed back, so every rank gets the same
    result as one process (the chunks, and so the solver's calls, are the same)."""
    n = states.shape[0]
    rank, world = dist_info(distributed)
    chunks = iter_chunks(n, max_batch if max_batch is not None else n)
    if world == 1 and len(chunks) == 1:
        return step(states, params)
    pad_to = max_batch if len(chunks) > 1 else None
    out = torch.zeros_like(states) if world > 1 else None
    outs = []
    for s, e in shard_chunks(chunks, rank, world):
        y = _call_padded(step, states[s:e], None if params is None else params[s:e], pad_to)
        if out is None:
            outs.append(y)
        else:
            out[s:e] = y
    if out is None:
        return torch.cat(outs)
    dist.all_reduce(out)  # every row is written by exactly one rank, the others add exact zeros
    return out


def _call_padded(step: Step, x: torch.Tensor, p: torch.Tensor | None, pad_to: int | None) -> torch.Tensor:
    """``step(x, p)`` with x (and p) padded by copies of the last row to ``pad_to`` rows."""
    k = x.shape[0]
    pad = 0 if pad_to is None else pad_to - k
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        p = None if p is None else torch.cat([p, p[-1:].expand(pad, *p.shape[1:])])
    return step(x, p)[:k]


def directional_differences(
    step: Step,
    x: torch.Tensor,
    params: torch.Tensor | None,
    dirs: torch.Tensor,
    mu: float,
    scheme: str = "central",
    f0: torch.Tensor | None = None,
    max_batch: int | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """Finite-difference directional derivatives ``J(x_b) d_k`` of ``step``.

    Args:
        x: (B, C, *s) states.  params: (B, K) or None.  dirs: (D, n) directions (flattened states)
        or (B, D, n) per-sample directions.  f0: ``step(x)`` (B, C, *s), needed for "forward"
        (computed when missing).  max_batch: states per black-box call.  distributed: share the
        calls out over the process group's ranks (same result on every rank).
    Returns:
        (B, D, n) difference quotients.
    """
    b, n = x.shape[0], x[0].numel()
    dirs = dirs.to(x.dtype).expand(b, -1, -1) if dirs.dim() == 2 else dirs.to(x.dtype)
    d = dirs.shape[1]
    base = x.reshape(b, 1, n)
    signs = (1.0, -1.0) if scheme == "central" else (1.0,)
    probes = torch.cat([(base + s * mu * dirs) for s in signs], 1).reshape(-1, *x.shape[1:])
    p = None if params is None else params.repeat_interleave(d * len(signs), 0)
    out = _eval_batched(step, probes, p, max_batch, distributed).reshape(b, len(signs) * d, n)
    if not torch.isfinite(out).all():
        raise NonFiniteLossError(
            "the black box returned non-finite values for states perturbed by "
            f"mu={mu:g}; the state is near a blow-up or mu is too large"
        )
    if scheme == "central":
        return (out[:, :d] - out[:, d:]) / (2 * mu)
    if f0 is None:
        f0 = _eval_batched(step, x, params, max_batch)
    return (out - f0.reshape(b, 1, n)) / mu


def dense_jacobian(
    step: Step,
    x: torch.Tensor,
    params: torch.Tensor | None,
    mu: float,
    scheme: str = "central",
    max_batch: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Full finite-difference Jacobians (B, n, n) (row: output, column: input), ``chunk`` columns
    per batch of probes."""
    b, n = x.shape[0], x[0].numel()
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    jac = torch.empty(b, n, n, dtype=x.dtype, device=x.device)
    for s, e in iter_chunks(n, chunk or n):
        jac[:, :, s:e] = directional_differences(step, x, params, eye[s:e], mu, scheme, None, max_batch).transpose(1, 2)
    return jac


def _noise_floor(f: torch.Tensor, mu: float, factor: float) -> torch.Tensor:
    """Rounding noise of a difference quotient of outputs like ``f`` (B, ...): (B,)."""
    return factor * torch.finfo(f.dtype).eps * f.flatten(1).abs().amax(1).clamp_min(1.0) / mu


def probe_offsets(
    step: Step,
    states: torch.Tensor,
    params: torch.Tensor | None,
    mu: float,
    rtol: float = 1e-6,
    noise_factor: float = 8.0,
    margin: int = 0,
    max_batch: int | None = None,
    max_per_row: int | None = None,
) -> Stencil | None:
    """Stencil of ``step`` from full forward-difference Jacobians at several ``states`` (S, C, *s);
    None as soon as a row has more than ``max_per_row`` entries (a dense Jacobian: its offsets are
    not worth listing, ``n^2`` of them).

    An entry counts when ``|J_ij| > max(rtol * max|J|, noise)`` (noise: ``noise_factor`` rounding
    errors of a difference quotient, which also absorbs the last-bit jitter of iterative solvers;
    raise it for loosely converged solvers); offsets are united over states and cells, then
    widened by ``margin`` cells.  Only non-zeroness matters here, so callers probe with a larger
    ``mu`` than the Jacobian estimate uses (a larger signal over the same rounding noise).
    """
    shape = tuple(states.shape[1:])
    offs = []
    for i in range(states.shape[0]):
        xi, pi = states[i : i + 1], None if params is None else params[i : i + 1]
        f0 = _eval_batched(step, xi, pi, max_batch)
        jac = torch.empty(xi[0].numel(), xi[0].numel(), dtype=xi.dtype, device=xi.device)
        eye = torch.eye(xi[0].numel(), dtype=xi.dtype, device=xi.device)
        for s, e in iter_chunks(xi[0].numel(), max_batch):
            jac[:, s:e] = directional_differences(step, xi, pi, eye[s:e], mu, "forward", f0, max_batch)[0].T
        tol = max(rtol * float(jac.abs().max()), float(_noise_floor(f0, mu, noise_factor)[0]))
        mask = jac.abs() > tol
        if max_per_row is not None and int(mask.sum(1).max()) > max_per_row:
            return None
        offs.append(_offsets_of(mask.cpu().numpy(), shape))
    st = Stencil(shape, np.unique(np.concatenate(offs), axis=0), f"probed at {states.shape[0]} state(s)")
    return st.dilate(margin)


# --------------------------------------------------------------------------------------------
# The estimator


def colouring_on(
    cache: dict,
    device: torch.device,
    dtype: torch.dtype,
    tensors: tuple[torch.Tensor, ...],
    colours: torch.Tensor,
    n_colours: int,
) -> tuple[torch.Tensor, ...]:
    """``tensors`` plus the colour directions (K, n) (1 where column j has colour k) on ``device``,
    cached in ``cache`` per device and dtype: the index tensors of a colouring where a probe runs."""
    key = (str(device), dtype)
    if key not in cache:
        dirs = torch.zeros(n_colours, colours.numel(), dtype=dtype)
        dirs[colours, torch.arange(colours.numel())] = 1
        cache[key] = tuple(t.to(device) for t in (*tensors, dirs))
    return cache[key]


@dataclass
class _Colouring:
    """A stencil's pattern, column colours and the CPR bookkeeping, as torch index tensors."""

    stencil: Stencil
    rows: torch.Tensor  # (nnz,) output index of each pattern entry
    cols: torch.Tensor  # (nnz,) input index
    entry_colour: torch.Tensor  # (nnz,) colour of the entry's column
    colours: torch.Tensor  # (n,) colour of every column
    zero_mask: torch.Tensor  # (n, K) True where compressed entry (row, colour) must be zero
    n_colours: int
    _on: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(rows, cols, entry_colour, zero_mask, directions (K, n)) on ``device`` (cached)."""
        fixed = (self.rows, self.cols, self.entry_colour, self.zero_mask)
        return colouring_on(self._on, device, dtype, fixed, self.colours, self.n_colours)

    @classmethod
    def of(cls, stencil: Stencil) -> _Colouring:
        pattern = stencil_pattern(stencil).tocoo()
        colours = colour_columns(pattern, stencil.state_shape, min_colours=stencil.per_row + 1)
        k = int(colours.max()) + 1
        rows, cols = torch.from_numpy(pattern.row.astype(np.int64)), torch.from_numpy(pattern.col.astype(np.int64))
        col_t = torch.from_numpy(colours)
        zero = torch.ones(pattern.shape[0], k, dtype=torch.bool)
        zero[rows, col_t[cols]] = False
        return cls(stencil, rows, cols, col_t[cols], col_t, zero, k)


@dataclass
class FDJacobian:
    """Finite-difference Jacobians of a black-box ``step`` and their transposed products.

    Build with :meth:`from_stencil`, :meth:`from_probes` or :meth:`dense`.  ``mu=None`` picks
    :data:`DEFAULT_MU` for the state's dtype; ``scheme`` is "central" (2 probes per colour) or
    "forward" (1, reusing the forward output); ``max_batch``: states per black-box call (fixed
    size, the last chunk padded); ``dense_fraction``: colours above this fraction of ``n`` switch
    to the dense estimate.  ``evaluations`` counts black-box sample-steps spent on probes and
    ``events`` the pattern changes made at run time.  ``budget_bytes`` (with ``max_batch=None``)
    sizes the probe batches to a memory budget (~8 copies of a state per probe).  ``distributed``:
    the probe batches of the products are shared out over the ranks of the process group (every
    rank must make the same calls; the pattern probes at set-up run on every rank).
    """

    step: Step
    state_shape: tuple[int, ...]
    colouring: _Colouring | None = None
    mu: float | None = None
    scheme: str = "central"
    max_batch: int | None = None
    dense_fraction: float = 0.5
    rtol: float = 1e-6
    noise_factor: float = 8.0
    probe_rel: float = 1e-2
    check: bool = True
    max_widenings: int = 4
    budget_bytes: int | None = None
    distributed: bool = False
    evaluations: int = 0
    events: list = field(default_factory=list)

    def __post_init__(self):
        check_scheme(self.scheme)
        self.mu = None if self.mu is None else check_mu(self.mu)
        if self.max_batch is None and self.budget_bytes is not None:
            self.max_batch = chunk_size_from_budget(8 * 8 * math.prod(self.state_shape), self.budget_bytes)
        self.state_shape = tuple(int(s) for s in self.state_shape)
        if self.colouring is not None and self.colouring.n_colours > self.dense_fraction * self.n:
            self._go_dense(f"{self.colouring.n_colours} colours > {self.dense_fraction:g} n")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_stencil(cls, step: Step, stencil: Stencil, **kw) -> FDJacobian:
        self = cls.dense(step, stencil.state_shape, **kw)
        self._set_stencil(stencil, None, warn_dense=True)
        return self

    @classmethod
    def for_step(
        cls,
        step: Step,
        state_shape: Sequence[int],
        *,
        pattern: str = "auto",
        states: torch.Tensor | None = None,
        params: torch.Tensor | None = None,
        stencil_reach: Sequence[int] | None = None,
        margin: int = 0,
        **kw,
    ) -> FDJacobian:
        """Choose the structure: ``pattern`` = "probe" (at ``states`` (S, C, *s)), "stencil" (the
        declared ``stencil_reach``, widened by ``margin``), "dense", or "auto" (probe when states are
        given, else the declared stencil, else dense)."""
        if pattern == "auto":
            pattern = "probe" if states is not None else "stencil" if stencil_reach is not None else "dense"
        if pattern == "probe":
            if states is None:
                raise ValueError("pattern='probe' needs states to probe (S, C, *spatial)")
            return cls.from_probes(step, states, params, margin=margin, **kw)
        if pattern == "stencil":
            if stencil_reach is None:
                raise ValueError(
                    "pattern='stencil' needs the solver's stencil_reach (the solver declares none); "
                    "use pattern='probe' or 'dense'"
                )
            return cls.from_stencil(step, stencil_offsets(state_shape, stencil_reach).dilate(margin), **kw)
        if pattern == "dense":
            return cls.dense(step, state_shape, **kw)
        raise ValueError(f"unknown Jacobian pattern {pattern!r}; choose 'auto', 'probe', 'stencil' or 'dense'")

    @classmethod
    def dense(cls, step: Step, state_shape: Sequence[int], **kw) -> FDJacobian:
        return cls(step, tuple(state_shape), None, **kw)

    @classmethod
    def from_probes(
        cls, step: Step, states: torch.Tensor, params: torch.Tensor | None = None, margin: int = 0, **kw
    ) -> FDJacobian:
        """Probe the pattern at up to S ``states`` (S, C, *s): stops early once two states in a row
        add no entry, or when the pattern is already too dense for colouring."""
        self = cls.dense(step, tuple(states.shape[1:]), **kw)
        stencil, quiet, used = None, 0, 0
        for i in range(states.shape[0]):
            found = self._probe(states[i : i + 1], None if params is None else params[i : i + 1])
            used += 1
            if found is None:  # a row alone needs more than dense_fraction * n colours
                return self
            grown = found if stencil is None else stencil.union(found)
            quiet = quiet + 1 if stencil is not None and len(grown.offsets) == len(stencil.offsets) else 0
            stencil = grown
            if quiet >= 2 or self._colouring_of(stencil.dilate(margin)) is None:
                break
        source = f"probed at {used} state(s)" + (f", margin {margin}" if margin else "")
        self._set_stencil(Stencil(stencil.state_shape, stencil.dilate(margin).offsets, source), None)
        return self

    def _probe(self, x: torch.Tensor, params: torch.Tensor | None) -> Stencil | None:
        """The stencil seen at one state x (1, C, *s): forward differences with step
        ``probe_rel * max|x|`` (at least 10 mu); None when it is too dense for colouring."""
        mu = max(self.probe_rel * float(x.abs().max()), 10 * self._mu(x.dtype))
        self.evaluations += self.n + 1
        dense = int(self.dense_fraction * self.n)
        return probe_offsets(self.step, x, params, mu, self.rtol, self.noise_factor, 0, self.max_batch, dense)

    def _colouring_of(self, stencil: Stencil) -> _Colouring | None:
        """The stencil's colouring, or None when it needs more than ``dense_fraction * n`` colours
        (known without colouring when a row alone has that many entries)."""
        if stencil.per_row > self.dense_fraction * self.n:
            return None
        col = _Colouring.of(stencil)
        return None if col.n_colours > self.dense_fraction * self.n else col

    def _set_stencil(self, stencil: Stencil, why: str | None, warn_dense: bool = False) -> None:
        col = self._colouring_of(stencil)
        if col is None:
            self.colouring = None
            if why or warn_dense:
                self._event(f"{why or stencil.source}; more than {self.dense_fraction:g} n colours: dense Jacobian")
            return
        self.colouring = col
        if why:
            self._event(f"{why}; now {stencil.per_row} entries per row, {col.n_colours} colours")

    def _go_dense(self, why: str) -> None:
        self.colouring = None
        self._event(f"{why}: dense Jacobian")

    def _event(self, msg: str) -> None:
        self.events.append(msg)
        warnings.warn(f"FDJacobian: {msg}", RuntimeWarning, stacklevel=3)

    def pattern_state(self) -> dict:
        """The structure as plain data (for checkpoints): restore with :meth:`from_pattern_state`."""
        if self.colouring is None:
            return {"kind": "dense", "state_shape": list(self.state_shape)}
        st = self.colouring.stencil
        return {
            "kind": "sparse",
            "state_shape": list(self.state_shape),
            "source": st.source,
            "offsets": st.offsets.tolist(),
        }

    @classmethod
    def from_pattern_state(cls, step: Step, state: dict, **kw) -> FDJacobian:
        """The estimator of a saved :meth:`pattern_state` (same pattern, same colouring)."""
        shape = tuple(state["state_shape"])
        if state["kind"] == "dense":
            return cls.dense(step, shape, **kw)
        offsets = np.asarray(state["offsets"], dtype=np.int64).reshape(-1, len(shape) + 1)
        return cls.from_stencil(step, Stencil(shape, offsets, state["source"]), **kw)

    # -- reporting ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return math.prod(self.state_shape)

    @property
    def is_dense(self) -> bool:
        return self.colouring is None

    @property
    def probes_per_sample(self) -> int:
        """Black-box evaluations per sample-step of one Jacobian (the forward output is reused)."""
        k = self.n if self.colouring is None else self.colouring.n_colours
        return 2 * k if self.scheme == "central" else k

    def describe(self) -> str:
        per = f"{self.probes_per_sample} black-box evaluations per sample-step ({self.scheme} differences)"
        if self.colouring is None:
            return f"dense Jacobian, n = {self.n}: {per}"
        c = self.colouring
        return (
            f"sparse Jacobian, n = {self.n}, {c.stencil.source}: {c.stencil.per_row} entries per row, "
            f"{c.n_colours} colours: {per}"
        )

    def _mu(self, dtype: torch.dtype) -> float:
        if self.mu is not None:
            return float(self.mu)
        return DEFAULT_MU.get(dtype, 1e-3)

    # -- products ----------------------------------------------------------------------------
    def vjp(
        self, x: torch.Tensor, params: torch.Tensor | None, grad_out: torch.Tensor, f0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``J(x_b)^T grad_out_b`` for every sample: x, grad_out, f0 (= step(x)): (B, C, *s) ->
        (B, C, *s).  ``f0`` is required for forward differences (it is the forward's output)."""
        if tuple(x.shape[1:]) != self.state_shape:
            raise ValueError(f"FDJacobian: state of shape {tuple(x.shape)}, expected (B, *{self.state_shape})")
        x, g = x.detach(), grad_out.detach().reshape(x.shape[0], -1).to(x.dtype)
        if self.colouring is not None:
            comp = self._compressed_checked(x, params, f0)
            if comp is not None:
                return self._sparse_vjp(comp, g).reshape(x.shape)
        return self._dense_vjp(x, params, g, f0).reshape(x.shape)

    def compressed(
        self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None = None, mu: float | None = None
    ) -> torch.Tensor:
        """CPR-compressed Jacobians (B, n, K): entry (i, c) = sum of row i over the columns of colour c."""
        dirs = self.colouring.on(x.device, x.dtype)[4]
        q = directional_differences(
            self.step, x, params, dirs, mu or self._mu(x.dtype), self.scheme, f0, self.max_batch, self.distributed
        )
        self.evaluations += x.shape[0] * dirs.shape[0] * (2 if self.scheme == "central" else 1)
        return q.transpose(1, 2)

    def jacobian(self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None = None) -> torch.Tensor:
        """The estimated Jacobians as dense (B, n, n) tensors (for tests and small problems)."""
        b, n = x.shape[0], self.n
        if self.colouring is None:
            self.evaluations += b * self.probes_per_sample
            return dense_jacobian(self.step, x, params, self._mu(x.dtype), self.scheme, self.max_batch, self.max_batch)
        comp = self._compressed_checked(x, params, f0)
        if comp is None:
            return self.jacobian(x, params, f0)
        rows, cols, colour = self.colouring.on(x.device, x.dtype)[:3]
        out = torch.zeros(b, n, n, dtype=x.dtype, device=x.device)
        out[:, rows, cols] = comp[:, rows, colour]
        return out

    def _sparse_vjp(self, comp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        rows, cols, colour = self.colouring.on(comp.device, comp.dtype)[:3]
        vals = comp[:, rows, colour]  # (B, nnz)
        return torch.zeros_like(g).index_add_(1, cols, vals * g[:, rows])

    def _dense_vjp(
        self, x: torch.Tensor, params: torch.Tensor | None, g: torch.Tensor, f0: torch.Tensor | None
    ) -> torch.Tensor:
        b, n = g.shape
        chunk = max(1, (self.max_batch or b * n) // b // (2 if self.scheme == "central" else 1))
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        out = torch.empty_like(g)
        for s, e in iter_chunks(n, chunk):
            q = directional_differences(
                self.step, x, params, eye[s:e], self._mu(x.dtype), self.scheme, f0, self.max_batch, self.distributed
            )
            out[:, s:e] = torch.einsum("bkn,bn->bk", q, g)
        self.evaluations += b * self.probes_per_sample
        return out

    # -- the leak check ----------------------------------------------------------------------
    def _compressed_checked(
        self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Compressed Jacobians that passed the leak check (widening the pattern as needed), or
        None when the pattern became dense."""
        for _ in range(self.max_widenings + 1):
            comp = self.compressed(x, params, f0)
            leaks = self._leaks(comp, x, params, f0) if self.check else None
            if leaks is None:
                return comp
            self._widen(x, params, f0, comp, leaks)
            if self.colouring is None:
                return None
        raise JacobianError(
            f"the Jacobian pattern still leaks after {self.max_widenings} widenings; the "
            "black box's stencil keeps changing: use FDJacobian.dense(...) or a larger margin"
        )

    def _leak_tol(self, comp: torch.Tensor, x: torch.Tensor, params, f0) -> torch.Tensor:
        if f0 is None:
            f0 = _eval_batched(self.step, x, params, self.max_batch)
        noise = _noise_floor(f0, self._mu(x.dtype), self.noise_factor)
        return torch.maximum(self.rtol * comp.flatten(1).abs().amax(1), noise)  # (B,)

    def _leaks(self, comp: torch.Tensor, x, params, f0) -> torch.Tensor | None:
        """Boolean (B, n, K) of compressed entries that should be zero and are not, or None."""
        tol = self._leak_tol(comp, x, params, f0)
        leak = (comp.abs() > tol.view(-1, 1, 1)) & self.colouring.on(comp.device, comp.dtype)[3]
        return leak if bool(leak.any()) else None

    def _widen(self, x: torch.Tensor, params, f0, comp: torch.Tensor, leaks: torch.Tensor) -> None:
        """Check a leak for a jump (DiscontinuityError), else add the leaking sample's full stencil."""
        b = int(leaks.flatten(1).any(1).nonzero()[0])
        xb, pb = x[b : b + 1], None if params is None else params[b : b + 1]
        fb = None if f0 is None else f0[b : b + 1]
        mu = self._mu(x.dtype)
        big = self.compressed(xb, pb, fb, mu=8 * mu)[0]
        lb = leaks[b]
        small_vals, big_vals = comp[b][lb], big[lb]
        change = float(((big_vals - small_vals).abs() / small_vals.abs()).max())
        if change > 0.5:
            raise DiscontinuityError(
                f"the black box's output jumps under perturbations of size mu={mu:g} (sample {b} of the batch: "
                f"difference quotients outside the Jacobian pattern change by {change:.0%} between steps mu and "
                f"8 mu, up to {float(small_vals.abs().max()):.3g}). The solver is discontinuous near this state "
                "(adaptive sub-stepping switching its number of sub-steps, a branch, a loosely converged "
                "iterative solve); make it continuous (fixed sub-steps, tighter tolerance) or change mu"
            )
        found = self._probe(xb, pb)
        n_leak = int(lb.sum())
        if found is None:
            self._go_dense(f"leak check: {n_leak} compressed entries that should be zero were not (sample {b})")
            return
        stencil = self.colouring.stencil.union(found)
        self._set_stencil(
            Stencil(stencil.state_shape, stencil.offsets, self.colouring.stencil.source + " + widened"),
            f"leak check: {n_leak} compressed entries that should be zero were not (sample {b}); "
            "the pattern was widened by the stencil probed at that state",
        )


class _FDStepFunction(torch.autograd.Function):
    """Forward: the black box.  Backward: the finite-difference Jacobian's transpose at the input."""

    @staticmethod
    def forward(ctx, state: torch.Tensor, params: torch.Tensor | None, jac: FDJacobian) -> torch.Tensor:
        out = jac.step(state.detach(), None if params is None else params.detach()).detach()
        ctx.jac, ctx.params = jac, None if params is None else params.detach()
        ctx.save_for_backward(state.detach(), out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        state, out = ctx.saved_tensors
        grad = ctx.jac.vjp(state, ctx.params, grad_out, f0=out)
        return grad.to(grad_out.dtype), None, None


def fd_step(jac: FDJacobian) -> Step:
    """A step ``(state, params) -> state`` that calls ``jac.step`` and backpropagates through it with
    finite-difference Jacobians.  Calls whose input does not require grad (e.g. the first call of a
    SOL window, on reference data) never compute a Jacobian."""

    def step(state: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        return _FDStepFunction.apply(state, params, jac)

    return step
