"""Reference-subtracted finite-difference Jacobians for globally coupled black-box steps.

A solver with a global solve in its step (a pressure projection, an implicit diffusion solve, a
spectral method) has a dense Jacobian: colouring cannot compress it and a dense estimate costs
``n`` probes per call.  Yet the Jacobian often *changes* locally with the state: for a projection
method ``J(x) = Pi A(x)`` with ``Pi`` fixed and ``A(x)`` a local stencil, and ``J(x) - J(x_ref)`` is
far more local than ``J(x)`` (measured in ``notes/dense-jacobians.md``: 95 % of its norm within
two cells, the rest decaying like ``1/r^2``).  So (:class:`RefJacobian`)::

    J(x) ~ J_ref + colour-estimate of (J(x) - J_ref) within a reach r

* ``J_ref``: dense references probed once (:func:`build_references`; ``n + 1`` forward or ``2n``
  central evaluations each, batched and shared out over the ranks of a process group) at one
  global state (e.g. the mean training state) or at several states (e.g. per data frame).  Each
  call uses the reference chosen with :meth:`RefJacobian.select` (one index per sample, or the
  nearest of a few candidates per sample) or, without a selection, the one whose state is
  nearest to the call's input.
* **frame fields** (:func:`build_frame_references`): references that share one dense ``J_ref``
  and add, per state ``f``, ``F_f ~ J(f) - J_ref`` estimated within a reach ``R`` by the same
  colouring and stored by stencil offset (``C^2 (2R+1)^nd`` numbers per cell, ``C (2R+1)^nd + 1``
  evaluations).  A state near ``f`` then needs only the small difference ``J(x) - J(f)``:
  ``J(x) ~ J_ref + F_f + colour-estimate of (J(x) - J(f))`` within a small live reach.
* the difference: a non-periodic lattice colouring with spacing ``2r + 1`` per spatial axis and
  one colour set per channel (``C (2r+1)^nd`` colours: 18 / 50 for r = 1 / 2 in 2-D with 2
  channels); one probe per colour (forward differences, reusing the forward's output) or two
  (central) gives ``J(x) d_k``; subtracting ``J_ref d_k`` and reading every entry within reach ``r``
  of its column gives the estimate.  Entries of ``J(x) - J_ref`` beyond the reach alias into it:
  the estimate is exact when the difference lies within the reach.
* **error control** (:meth:`RefJacobian.request_check`): at the next product, ``check_dirs`` extra
  probes in random directions ``v`` compare ``J(x) v`` from the black box with the estimate; when
  the relative error exceeds ``tol`` the reference is refreshed (re-probed densely at the failing
  samples' mean state), then the reach widened up to ``max_reach``, re-checking after each; an
  estimate that stays above ``tol`` sets :attr:`RefJacobian.poor` (a one-line reason) for the
  caller to act on.  Every check is appended to :attr:`RefJacobian.checks`.

Why this and not a structured recovery from one dense Jacobian at a rest state (also measured in
the notes, exact to 1e-7 with float64 probes): that recovery needs a pseudo-inverse per colour
(4.7 CPU-min, 2.7 GiB at 64x32) and ~0.7 CPU-s of linear algebra per training step, and it is only
as good as float32 central differences allow (3e-4); the subtraction costs one dense matrix product
per call (plus a stencil product for frame fields) and reached gradient cosines >= 0.9977 (one
reference, r = 2, 50 probes) / >= 0.9995 (frame fields R = 5, live r = 1, 18 probes) at the end
of a karman2d training run (``docs/results.md``).

The class offers the interface :func:`~zosol.zo.jacobian.fd_step` uses (``step``, ``vjp``,
``evaluations``, ``events``), so ``fd_step(RefJacobian(...))`` backpropagates through the black box.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_mu, check_scheme
from .jacobian import DEFAULT_MU, Step, _eval_batched, colouring_on, directional_differences
from .parallel import iter_chunks

__all__ = [
    "References",
    "build_references",
    "build_frame_references",
    "lattice_difference_colouring",
    "RefJacobian",
    "CheckRecord",
]


# --------------------------------------------------------------------------------------------
# References


@dataclass
class References:
    """Reference Jacobians and the states they were taken at.

    ``states``: (R, C, *s); ``params``: (R, K) or None; ``labels``: R strings naming each reference
    (e.g. "mean" or "sim 2 frame 40"); ``evaluations``: black-box sample-steps spent probing them.
    Reference r's Jacobian (row: output entry, column: input entry) is

    * ``jacobians[r]`` when ``jacobians`` is (R, n, n): dense references (:func:`build_references`);
    * ``jacobians[0] + fields[r]`` when ``jacobians`` is (1, n, n) and ``fields`` (R, C, C, K, cells)
      is given: one dense reference plus, for every state, the difference to it estimated within
      ``field_reach`` cells and stored by stencil offset (:func:`build_frame_references`; entry
      ``fields[r, c_out, c_in, k, cell]`` couples output ``(c_out, cell)`` to input
      ``(c_in, cell - offset_k)``).  ``base_state`` / ``base_params`` are the dense reference's state.
    """

    states: torch.Tensor
    params: torch.Tensor | None
    jacobians: torch.Tensor
    labels: list[str]
    evaluations: int = 0
    fields: torch.Tensor | None = None
    field_reach: int = 0
    base_state: torch.Tensor | None = None
    base_params: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def shared(self) -> bool:
        """One dense Jacobian for all references (plus their fields)."""
        return self.jacobians.shape[0] == 1

    def nearest(self, x: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Index (B,) of the reference whose state is nearest (Euclidean) to each state of x (B, C, *s),
        among all or among each sample's ``candidates`` (B, K) indices."""
        if candidates is not None:
            d = (self.states[candidates].flatten(2) - x.flatten(1).to(self.states.dtype)[:, None]).norm(dim=2)
            return candidates.gather(1, d.argmin(1, keepdim=True))[:, 0]
        if len(self) == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        d = torch.cdist(x.flatten(1).to(self.states.dtype), self.states.flatten(1))
        return d.argmin(1)

    def to_state(self) -> dict:
        """Plain tensors, lists and numbers (``torch.save`` it; reload with ``torch.load(weights_only=True)``)."""
        return {
            "states": self.states,
            "params": self.params,
            "jacobians": self.jacobians,
            "labels": list(self.labels),
            "evaluations": int(self.evaluations),
            "fields": self.fields,
            "field_reach": int(self.field_reach),
            "base_state": self.base_state,
            "base_params": self.base_params,
        }

    @classmethod
    def from_state(cls, state: dict) -> References:
        for key in ("states", "jacobians", "labels"):
            if key not in state:
                raise ValueError(f"saved reference Jacobians lack {key!r}: the file is not a References state")
        j, s, fields = state["jacobians"], state["states"], state.get("fields")
        n, r = s[0].numel(), s.shape[0]
        dense_ok = j.dim() == 3 and j.shape[1:] == (n, n) and j.shape[0] == (1 if fields is not None else r)
        fields_ok = fields is None or (
            fields.dim() == 5 and fields.shape[0] == r and fields.shape[1] * fields.shape[4] == n
        )
        if not (dense_ok and fields_ok) or len(state["labels"]) != r:
            raise ValueError(
                f"saved reference Jacobians do not fit their states: jacobians {tuple(j.shape)}, states "
                f"{tuple(s.shape)}, {len(state['labels'])} labels; delete the file to probe them again"
            )
        return cls(
            s, state.get("params"), j, list(state["labels"]), int(state.get("evaluations", 0)), fields,
            int(state.get("field_reach", 0)), state.get("base_state"), state.get("base_params"),
        )  # fmt: skip


def build_references(
    step: Step,
    states: torch.Tensor,
    params: torch.Tensor | None = None,
    *,
    labels: Sequence[str] | None = None,
    mu: float | None = None,
    scheme: str = "forward",
    max_batch: int | None = None,
    distributed: bool = False,
) -> References:
    """Dense finite-difference Jacobians of ``step`` at ``states`` (R, C, *s) (params (R, K) or None).

    Probes all references together, a few columns at a time (about ``max_batch`` probes per
    block, default 256), each block in batched black-box calls of ``max_batch`` states shared out
    over the process group's ranks with ``distributed`` (every rank gets the same result).
    Costs ``R (n + 1)`` (forward) or ``2 R n`` (central) black-box sample-steps.
    """
    check_scheme(scheme)
    r, n = states.shape[0], states[0].numel()
    mu = DEFAULT_MU.get(states.dtype, 1e-3) if mu is None else check_mu(mu)
    f0 = _eval_batched(step, states, params, max_batch, distributed) if scheme == "forward" else None
    jac = torch.empty(r, n, n, dtype=states.dtype, device=states.device)
    eye = torch.eye(n, dtype=states.dtype, device=states.device)
    per = 1 if scheme == "forward" else 2
    cols = max(1, (max_batch or 256) * 4 // (r * per))
    for s, e in iter_chunks(n, cols):
        q = directional_differences(step, states, params, eye[s:e], mu, scheme, f0, max_batch, distributed)
        jac[:, :, s:e] = q.transpose(1, 2)
    labels = [f"reference {i}" for i in range(r)] if labels is None else list(labels)
    if len(labels) != r:
        raise ValueError(f"build_references: {len(labels)} labels for {r} states")
    evals = r * (n + 1) if scheme == "forward" else 2 * r * n
    return References(states.detach().clone(), None if params is None else params.detach().clone(), jac, labels, evals)


# --------------------------------------------------------------------------------------------
# Colouring of the difference


@dataclass
class _DiffColouring:
    """The reach-r pattern (non-periodic), its lattice colours and CPR index tensors."""

    reach: tuple[int, ...]
    rows: torch.Tensor  # (nnz,) output entry
    cols: torch.Tensor  # (nnz,) input entry
    entry_colour: torch.Tensor  # (nnz,) colour of the entry's column
    colours: torch.Tensor  # (n,) colour of every column
    n_colours: int
    _on: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(rows, cols, entry_colour, colours, directions (K, n)) on ``device`` (cached)."""
        fixed = (self.rows, self.cols, self.entry_colour, self.colours)
        return colouring_on(self._on, device, dtype, fixed, self.colours, self.n_colours)


def lattice_difference_colouring(
    state_shape: Sequence[int], reach: int | Sequence[int], shape: str = "box"
) -> _DiffColouring:
    """The pattern of every (output, input) pair of entries within ``reach`` cells, not wrapping
    around the grid's edges, and a lattice colouring of it, one colour set per channel:

    * ``shape="box"``: within ``reach_k`` cells along every axis k; colour ``(c, x_1 mod s_1, ...,
      x_nd mod s_nd)``, ``s_k = 2 reach_k + 1``: two columns of one colour are ``>= 2r + 1`` cells
      apart along some axis, so no row lies within reach of both (a valid CPR colouring);
      ``C prod(2 r_k + 1)`` colours.
    * ``shape="diamond"`` (1-D or 2-D, one reach): within ``r`` cells in the L1 sense;
      colour ``(c, (x + (2r+1) y) mod (2r^2 + 2r + 1))``, the perfect Lee-sphere tiling of the
      plane: same-colour columns are ``>= 2r + 1`` apart in L1.  ``C (2r^2 + 2r + 1)`` colours
      (2-D, r = 2: 26 instead of the box's 50).
    """
    dims = tuple(int(s) for s in state_shape)
    c, spatial = dims[0], dims[1:]
    reach = (int(reach),) * len(spatial) if isinstance(reach, int) else tuple(int(r) for r in reach)
    if len(reach) != len(spatial) or min(reach) < 0:
        raise ValueError(f"reach {reach} does not fit a state of shape {dims} (one half-width >= 0 per spatial axis)")
    cells = np.indices(spatial).reshape(len(spatial), -1).T  # (cells, nd)
    ncell = cells.shape[0]
    box = list(itertools.product(*(range(-r, r + 1) for r in reach)))
    if shape == "box":
        period = np.array([2 * r + 1 for r in reach])
        label, per_channel = np.ravel_multi_index(tuple((cells % period).T), tuple(period)), int(period.prod())
        offsets = box
    elif shape == "diamond":
        if len(spatial) > 2 or len(set(reach)) != 1:
            raise ValueError(f"a diamond pattern needs a 1-D or 2-D state and one reach, got {dims}, reach {reach}")
        r = reach[0]
        per_channel = 2 * r * r + 2 * r + 1 if len(spatial) == 2 else 2 * r + 1
        weights = np.array([1, 2 * r + 1][: len(spatial)])[::-1]  # (y, x) order of the grid's axes
        label = (cells @ weights) % per_channel
        offsets = [o for o in box if sum(abs(v) for v in o) <= r]
    else:
        raise ValueError(f"unknown pattern shape {shape!r}; choose 'box' or 'diamond'")
    colours = (np.arange(c)[:, None] * per_channel + label[None]).reshape(-1)
    rows, cols = [], []
    for off in offsets:
        src = cells + np.array(off)
        ok = np.all((src >= 0) & (src < np.array(spatial)), 1)
        cell_out, cell_in = np.nonzero(ok)[0], np.ravel_multi_index(tuple(src[ok].T), spatial)
        for co, ci in itertools.product(range(c), range(c)):
            rows.append(co * ncell + cell_out)
            cols.append(ci * ncell + cell_in)
    r_t, c_t = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
    col_t = torch.from_numpy(colours.astype(np.int64))
    return _DiffColouring(reach, r_t, c_t, col_t[c_t], col_t, c * per_channel)


# --------------------------------------------------------------------------------------------
# Per-frame differences stored by stencil offset


def _offsets(nd: int, reach: int) -> list[tuple[int, ...]]:
    """The box of stencil offsets (output cell minus input cell), in the order of a field's K axis."""
    return list(itertools.product(range(-reach, reach + 1), repeat=nd))


def stencil_index(state_shape: Sequence[int], colouring: _DiffColouring) -> torch.Tensor:
    """For every entry of a box ``colouring`` (one reach on every axis), its position in a flattened
    field (C, C, K, cells): ``((c_out C + c_in) K + k) cells + cell_out``."""
    dims = tuple(int(v) for v in state_shape)
    c, spatial, reach = dims[0], dims[1:], colouring.reach[0]
    ncell, side = math.prod(spatial), 2 * reach + 1
    co, cell_out = colouring.rows // ncell, colouring.rows % ncell
    ci, cell_in = colouring.cols // ncell, colouring.cols % ncell
    k = torch.zeros_like(cell_out)
    for stride_out, size in zip(_strides(spatial), spatial):
        off = (cell_out // stride_out) % size - (cell_in // stride_out) % size + reach
        k = k * side + off
    return ((co * c + ci) * side ** len(spatial) + k) * ncell + cell_out


def _strides(spatial: Sequence[int]) -> list[int]:
    return [math.prod(spatial[i + 1 :]) for i in range(len(spatial))]


def _shifted(t: torch.Tensor, spatial: Sequence[int], reach: int, offsets, sign: int) -> torch.Tensor:
    """t (..., *s) padded by ``reach``: the windows ``t(cell + sign * offset_k)`` stacked on a new
    axis before the spatial ones (..., K, *s), zero outside the grid."""
    padded = torch.nn.functional.pad(t, [reach, reach] * len(spatial))
    views = [padded[(...,) + tuple(slice(reach + sign * o, reach + sign * o + n) for o, n in zip(off, spatial))]
             for off in offsets]  # fmt: skip
    return torch.stack(views, -1 - len(spatial))


def field_vjp(fields: torch.Tensor, g: torch.Tensor, spatial: Sequence[int], reach: int) -> torch.Tensor:
    """``F_b^T g_bd`` for fields (B, C, C, K, cells) and g (B, D, C, cells): (B, D, C, cells)."""
    b, d, c = g.shape[:3]
    # sum over c_out as C products of (B, D, C_in, K, cells): faster than einsum / bmm here
    per_offset = sum(fields[:, None, o] * g[:, :, o, None, None, :] for o in range(c)).reshape(b, d, c, -1, *spatial)
    out = torch.zeros(b, d, c, *(n + 2 * reach for n in spatial), dtype=g.dtype, device=g.device)
    for k, off in enumerate(_offsets(len(spatial), reach)):
        # output (c_out, cell) couples to input (c_in, cell - off): the input gets the value at cell
        out[(...,) + tuple(slice(reach - o, reach - o + n) for o, n in zip(off, spatial))] += per_offset[:, :, :, k]
    crop = (...,) + tuple(slice(reach, reach + n) for n in spatial)
    return out[crop].reshape(b, d, c, -1)


def field_jvp(fields: torch.Tensor, v: torch.Tensor, spatial: Sequence[int], reach: int) -> torch.Tensor:
    """``F_b v_bd`` for fields (B, C, C, K, cells) and directions v (B, D, C, cells): (B, D, C, cells)."""
    b, d, c = v.shape[:3]
    shifted = _shifted(v.reshape(b, d, c, *spatial), spatial, reach, _offsets(len(spatial), reach), -1)
    return torch.einsum("boikn,bdikn->bdon", fields, shifted.reshape(b, d, c, -1, fields.shape[-1]))


def pattern_entries(
    step: Step,
    x: torch.Tensor,
    params: torch.Tensor | None,
    colouring: _DiffColouring,
    mu: float,
    scheme: str,
    f0: torch.Tensor | None,
    max_batch: int | None,
    distributed: bool,
) -> torch.Tensor:
    """``J(x_b) d_k`` along the colouring's directions by finite differences, read at the pattern's
    entries (entry ``(row, col)`` from the probe of ``col``'s colour): (B, nnz)."""
    rows, _, colour, _, dirs = colouring.on(x.device, x.dtype)
    q = directional_differences(step, x, params, dirs, mu, scheme, f0, max_batch, distributed)  # (B, K, n)
    return q.reshape(q.shape[0], -1).index_select(1, colour * x[0].numel() + rows)


def build_frame_references(
    step: Step,
    base: References,
    states: torch.Tensor,
    params: torch.Tensor | None = None,
    *,
    reach: int = 5,
    labels: Sequence[str] | None = None,
    mu: float | None = None,
    scheme: str = "forward",
    max_batch: int | None = None,
    distributed: bool = False,
    chunk: int = 16,
) -> References:
    """References at ``states`` (R, C, *s) (params (R, K) or None) that share ``base``'s one dense
    Jacobian: each is ``J_base`` plus the difference ``J(state) - J_base`` estimated within ``reach``
    cells (box, lattice-coloured, the base's own colour probes subtracted), stored by stencil offset.

    Costs ``R ((2 reach + 1)^nd C + 1)`` black-box sample-steps (forward) and ``R C^2 (2 reach + 1)^nd
    cells`` numbers: at 64x32 with 2 channels and reach 5, 243 evaluations and 4 MB per state (a
    dense reference: 4,097 and 64 MiB).  The estimate of a state near one of them then only needs
    the small, fast-changing part of its difference (:class:`RefJacobian`)."""
    if len(base) != 1 or base.fields is not None:
        raise ValueError("build_frame_references: base must be one dense reference")
    check_scheme(scheme)
    shape = tuple(states.shape[1:])
    mu = DEFAULT_MU.get(states.dtype, 1e-3) if mu is None else check_mu(mu)
    colouring = lattice_difference_colouring(shape, reach, "box")
    where = stencil_index(shape, colouring)

    def probes(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        f0 = _eval_batched(step, x, p, max_batch, distributed) if scheme == "forward" else None
        return pattern_entries(step, x, p, colouring, mu, scheme, f0, max_batch, distributed)

    base_p = None if base.params is None else base.params.to(states.dtype)
    at_base = probes(base.states.to(states.dtype), base_p)
    c, ncell = shape[0], math.prod(shape[1:])
    fields = torch.zeros(states.shape[0], c * colouring.n_colours * ncell, dtype=states.dtype)
    for s, e in iter_chunks(states.shape[0], chunk):
        fields[s:e, where] = probes(states[s:e], None if params is None else params[s:e]) - at_base
    per = colouring.n_colours * (2 if scheme == "central" else 1) + (scheme == "forward")
    labels = [f"state {i}" for i in range(states.shape[0])] if labels is None else list(labels)
    if len(labels) != states.shape[0]:
        raise ValueError(f"build_frame_references: {len(labels)} labels for {states.shape[0]} states")
    fields = fields.reshape(-1, c, c, (2 * reach + 1) ** (len(shape) - 1), ncell)
    return References(
        states.detach().clone(), None if params is None else params.detach().clone(), base.jacobians, labels,
        base.evaluations + per * (states.shape[0] + 1), fields, reach,
        base.states.clone(), None if base.params is None else base.params.clone(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The estimator


@dataclass
class CheckRecord:
    """One run-time error check: relative errors of ``J v`` (max over samples and directions) before
    and after the reactions taken (``actions``: "refresh" / "widen to r"), and whether it passed."""

    error: float
    final_error: float
    actions: list[str]
    passed: bool
    reach: int

    def as_dict(self) -> dict:
        return {
            "error": self.error,
            "final_error": self.final_error,
            "actions": list(self.actions),
            "passed": self.passed,
            "reach": self.reach,
        }


@dataclass
class RefJacobian:
    """``J(x) ~ J_ref + coloured estimate of J(x) - J_ref`` for a black-box ``step`` (module docstring).

    ``references``: the dense references; ``reach``: half-width of the difference's pattern (cells);
    ``scheme``: "forward" (one probe per colour, reusing the forward's output) or "central";
    ``mu=None``: :data:`~zosol.zo.jacobian.DEFAULT_MU` of the state's dtype; ``max_batch``: states
    per black-box call; ``distributed``: probe batches shared out over the process group's ranks.
    Error control: ``tol`` (relative error of ``J v`` that triggers a reaction), ``check_dirs``
    random directions per check, ``max_reach`` (widening stops there), ``refresh`` (re-probe the
    reference first).  ``evaluations`` counts black-box sample-steps of probes (references and
    checks included), ``events`` the reactions taken, ``checks`` every check's record.
    """

    step: Step
    state_shape: tuple[int, ...]
    references: References
    reach: int = 1
    pattern: str = "box"
    mu: float | None = None
    scheme: str = "forward"
    max_batch: int | None = None
    distributed: bool = False
    tol: float = 0.03
    check_dirs: int = 2
    max_reach: int = 4
    refresh: bool = True
    evaluations: int = 0
    events: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    poor: str | None = None
    refreshed: list = field(default_factory=list)
    selection: torch.Tensor | None = None

    def __post_init__(self):
        check_scheme(self.scheme)
        self.mu = None if self.mu is None else check_mu(self.mu)
        self.state_shape = tuple(int(s) for s in self.state_shape)
        if tuple(self.references.states.shape[1:]) != self.state_shape:
            raise ValueError(
                f"RefJacobian: references of states {tuple(self.references.states.shape[1:])}, "
                f"expected {self.state_shape}"
            )
        self._colouring = lattice_difference_colouring(self.state_shape, self.reach, self.pattern)
        self._ref_comp: torch.Tensor | None = None
        self._check_generator: torch.Generator | None = None
        self._reference_compressed(self.references.states.dtype)  # probed now: a set-up cost

    # -- reporting ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return math.prod(self.state_shape)

    @property
    def n_colours(self) -> int:
        return self._colouring.n_colours

    @property
    def is_dense(self) -> bool:
        """False: the estimate is never the dense fallback (for code that handles FDJacobian too)."""
        return False

    @property
    def probes_per_sample(self) -> int:
        """Black-box evaluations per sample-step (the forward output is reused by forward differences)."""
        return self.n_colours * (2 if self.scheme == "central" else 1)

    def describe(self) -> str:
        refs = self.references
        if refs.fields is not None:
            head = (
                f"1 dense reference + the difference at {len(refs)} reference states within reach "
                f"{refs.field_reach} (the nearest per call)"
            )
        else:
            head = f"{len(refs)} dense reference{'s' if len(refs) > 1 else ''}"
        return (
            f"reference-subtracted Jacobian, n = {self.n}, {head} + the live difference coloured within reach "
            f"{self.reach} ({self.n_colours} colours): {self.probes_per_sample} black-box evaluations per "
            f"sample-step ({self.scheme} differences)"
        )

    def _mu(self, dtype: torch.dtype) -> float:
        return float(self.mu) if self.mu is not None else DEFAULT_MU.get(dtype, 1e-3)

    # -- reference selection -----------------------------------------------------------------
    def select(self, index: torch.Tensor | None) -> None:
        """Use reference ``index[b]`` (B,) for sample b of the following calls, or the nearest of
        sample b's candidates ``index[b]`` (B, K) at each call (None: the nearest of all)."""
        if index is not None and (int(index.min()) < 0 or int(index.max()) >= len(self.references)):
            raise IndexError(f"reference index out of range 0..{len(self.references) - 1}")
        self.selection = None if index is None else index.detach().long()

    def _ref_index(self, x: torch.Tensor) -> torch.Tensor:
        if self.selection is None:
            return self.references.nearest(x)
        if self.selection.shape[0] != x.shape[0]:
            raise ValueError(f"RefJacobian: {self.selection.shape[0]} selected references for {x.shape[0]} states")
        if self.selection.dim() == 2:
            return self.references.nearest(x, self.selection.to(self.references.states.device)).to(x.device)
        return self.selection.to(x.device)

    def _reference_compressed(self, dtype: torch.dtype) -> torch.Tensor:
        """The colour probes at every reference state, ``~ J_ref d_k``, read at the pattern's entries:
        (R, nnz), probed with the same finite differences as the estimate (``R K`` black-box
        evaluations, cached until the references or the reach change).  Subtracting these rather
        than the exact products ``J_ref d_k`` cancels the differences' own truncation error
        (``mu/2 d_k^T H d_k``, large for colour directions that perturb many cells at once): at a
        reference state the estimate is exactly ``J_ref``."""
        if self._ref_comp is None or self._ref_comp.dtype != dtype:
            refs = self.references
            states = refs.states.to(dtype)
            self._ref_comp = torch.cat([
                self._colour_probes(states[s:e], None if refs.params is None else refs.params[s:e])
                for s, e in iter_chunks(states.shape[0], 16)
            ])  # fmt: skip
        return self._ref_comp

    def _probe_entries(self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None) -> torch.Tensor:
        """:func:`pattern_entries` of the live colouring at x (B, C, *s): (B, nnz)."""
        params = None if params is None else params.to(x.dtype)
        self.evaluations += x.shape[0] * self.probes_per_sample
        return pattern_entries(
            self.step, x, params, self._colouring, self._mu(x.dtype), self.scheme, f0, self.max_batch, self.distributed
        )

    def _colour_probes(self, states: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_probe_entries` at reference states (R, C, *s), their own forward outputs included."""
        p = None if params is None else params.to(states.dtype)
        f0 = _eval_batched(self.step, states, p, self.max_batch, self.distributed) if self.scheme == "forward" else None
        self.evaluations += states.shape[0] * (self.scheme == "forward")
        return self._probe_entries(states, p, f0)

    # -- the estimate ------------------------------------------------------------------------
    def difference(
        self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None, index: torch.Tensor
    ) -> torch.Tensor:
        """Estimated entries of ``J(x_b) - J_ref[index_b]`` on the reach pattern: (B, nnz)."""
        ref = self._reference_compressed(x.dtype)
        return self._probe_entries(x, params, f0) - ref[index.to(ref.device)].to(x.device)

    def _ref_apply(self, index: torch.Tensor, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``J_ref[index_b] v_b`` (or ``J_ref^T v_b``) for v (B, D, n): (B, D, n); one (samples x D, n)
        @ (n, n) product per dense reference used (the matrix is read once, not once per sample),
        plus the references' stencil fields."""
        refs, n = self.references, v.shape[-1]
        if refs.shared:
            j = refs.jacobians[0].to(device=v.device, dtype=v.dtype)
            out = (v.reshape(-1, n) @ (j if transpose else j.T)).reshape(v.shape)
        else:
            out = torch.empty_like(v)
            for r in index.unique().tolist():
                m = index == r
                j = refs.jacobians[r].to(device=v.device, dtype=v.dtype)
                out[m] = (v[m].reshape(-1, n) @ (j if transpose else j.T)).reshape(-1, v.shape[1], n)
        if refs.fields is not None:
            f = refs.fields[index.to(refs.fields.device)].to(device=v.device, dtype=v.dtype)
            spatial, c = self.state_shape[1:], self.state_shape[0]
            product = field_vjp if transpose else field_jvp
            out += product(f, v.reshape(*v.shape[:2], c, -1), spatial, refs.field_reach).reshape(v.shape)
        return out

    def vjp(
        self, x: torch.Tensor, params: torch.Tensor | None, grad_out: torch.Tensor, f0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``J(x_b)^T grad_out_b`` estimated for every sample: x, grad_out, f0 (= step(x)): (B, C, *s) ->
        (B, C, *s).  Runs a requested error check first (and its reactions)."""
        if tuple(x.shape[1:]) != self.state_shape:
            raise ValueError(f"RefJacobian: state of shape {tuple(x.shape)}, expected (B, *{self.state_shape})")
        x = x.detach()
        if f0 is None and self.scheme == "forward":
            f0 = _eval_batched(self.step, x, params, self.max_batch, self.distributed)
        index = self._ref_index(x)
        vals = self.difference(x, params, f0, index)
        if self._check_generator is not None:
            vals, index = self._controlled(x, params, f0, vals, index)
        g = grad_out.detach().reshape(x.shape[0], 1, -1).to(x.dtype)
        rows, cols = self._colouring.on(x.device, x.dtype)[:2]
        out = self._ref_apply(index, g, transpose=True)[:, 0]
        out.index_add_(1, cols, vals * g[:, 0, rows])
        return out.reshape(x.shape)

    def jvp_estimate(self, vals: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The estimate's ``J v`` for directions v (B, D, n) given :meth:`difference`'s ``vals``: (B, D, n)."""
        rows, cols = self._colouring.on(v.device, v.dtype)[:2]
        out = self._ref_apply(index, v, transpose=False)
        return out.index_add_(2, rows, vals[:, None, :] * v[:, :, cols])

    def jacobian(self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None = None) -> torch.Tensor:
        """The estimated Jacobians as dense (B, n, n) tensors (for tests and small problems)."""
        x = x.detach()
        index = self._ref_index(x)
        vals = self.difference(x, params, f0, index)
        rows, cols = self._colouring.on(x.device, x.dtype)[:2]
        refs = self.references
        out = refs.jacobians.to(device=x.device, dtype=x.dtype)[index if not refs.shared else 0 * index].clone()
        if refs.fields is not None:
            field = lattice_difference_colouring(self.state_shape, refs.field_reach, "box")
            where = stencil_index(self.state_shape, field)
            f = refs.fields[index].to(device=x.device, dtype=x.dtype).flatten(1)
            out[:, field.rows, field.cols] += f[:, where]
        out[:, rows, cols] += vals
        return out

    # -- error control -----------------------------------------------------------------------
    def error_at(
        self, x: torch.Tensor, params: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Relative ``J v`` errors (B,) of the estimate at states x (B, C, *s): :meth:`check` without
        its reactions (e.g. to decide up front whether the estimate suits a solver at all)."""
        x = x.detach()
        f0 = _eval_batched(self.step, x, params, self.max_batch, self.distributed) if self.scheme == "forward" else None
        index = self._ref_index(x)
        return self.check(x, params, f0, self.difference(x, params, f0, index), index, generator)

    def request_check(self, generator: torch.Generator) -> None:
        """Check the estimate at the next :meth:`vjp` with random directions drawn from ``generator``
        (seed it from the run and step for reproducible runs)."""
        self._check_generator = generator

    def check(
        self,
        x: torch.Tensor,
        params: torch.Tensor | None,
        f0: torch.Tensor | None,
        vals: torch.Tensor,
        index: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Relative errors ``|J v - J_est v| / |J v|`` (B,), the max over ``check_dirs`` Gaussian
        directions v scaled to the norm of a colour's direction (so the probes perturb the state as
        much as the estimate's own), ``J v`` by central differences: ``2 check_dirs`` probes per sample."""
        b = x.shape[0]
        v = torch.randn(b, self.check_dirs, self.n, generator=generator, dtype=torch.float64)
        v = (v * (self.n / self.n_colours) ** 0.5 / v.norm(dim=2, keepdim=True)).to(x.device, x.dtype)
        jv = directional_differences(
            self.step, x, params, v, self._mu(x.dtype), "central", None, self.max_batch, self.distributed
        )
        self.evaluations += 2 * b * self.check_dirs
        est = self.jvp_estimate(vals, index, v)
        return ((jv - est).norm(dim=2) / jv.norm(dim=2).clamp_min(torch.finfo(x.dtype).tiny)).amax(1)

    def _controlled(
        self, x: torch.Tensor, params: torch.Tensor | None, f0: torch.Tensor | None, vals, index
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The requested check and its reactions: refresh the references of failing samples, then widen
        the reach, re-checking after each; sets :attr:`poor` when nothing helps."""
        gen, self._check_generator = self._check_generator, None
        err = self.check(x, params, f0, vals, index, gen)
        first, actions = float(err.max()), []
        plan = (["refresh"] if self.refresh else []) + [
            f"widen to {r}" for r in range(self.reach + 1, self.max_reach + 1)
        ]
        for action in plan:
            if float(err.max()) <= self.tol:
                break
            if action == "refresh":
                self._refresh(x, params, index, err > self.tol)
            else:
                self.set_reach(self.reach + 1)
            actions.append(action)
            index = self._ref_index(x)
            vals = self.difference(x, params, f0, index)
            err = self.check(x, params, f0, vals, index, gen)
        rec = CheckRecord(first, float(err.max()), actions, float(err.max()) <= self.tol, self.reach)
        self.checks.append(rec)
        if actions:
            self._event(
                f"error check: relative error {first:.3g} > tol {self.tol:g}; {', '.join(actions)}: "
                f"now {rec.final_error:.3g}"
            )
        if not rec.passed:
            self.poor = (
                f"the reference-subtracted Jacobian stays poor: relative error {rec.final_error:.3g} > tol "
                f"{self.tol:g} after {', '.join(actions) or 'no reaction (refresh off, reach at max_reach)'}"
            )
        return vals, index

    def _refresh(
        self, x: torch.Tensor, params: torch.Tensor | None, index: torch.Tensor, failing: torch.Tensor
    ) -> None:
        """Re-probe each reference used by failing samples at the mean of those samples' states (and params)."""
        for r in index[failing].unique().tolist():
            m = failing & (index == r)
            p = None if params is None else params[m].mean(0, keepdim=True)
            self.refresh_at(r, x[m].mean(0, keepdim=True), p)

    def refresh_at(self, r: int, state: torch.Tensor, params: torch.Tensor | None) -> None:
        """Replace reference ``r`` by the one at ``state`` (1, C, *s) (params (1, K) or None): a dense
        Jacobian, or for references with fields the field of ``state``; the index is appended to
        :attr:`refreshed`."""
        refs = self.references
        dtype = refs.states.dtype
        kw = dict(mu=self._mu(dtype), scheme=self.scheme, max_batch=self.max_batch, distributed=self.distributed)
        p = None if params is None else params.to(dtype)
        if refs.fields is None:
            new = build_references(self.step, state.to(dtype), p, **kw)
            refs.jacobians[r] = new.jacobians[0].to(refs.jacobians.dtype)
        else:
            base = References(refs.base_state, refs.base_params, refs.jacobians, ["base"])
            new = build_frame_references(self.step, base, state.to(dtype), p, reach=refs.field_reach, **kw)
            refs.fields[r] = new.fields[0].to(refs.fields.dtype)
        refs.states[r] = new.states[0]
        if refs.params is not None and params is not None:
            refs.params[r] = new.params[0].to(refs.params.dtype)
        refs.labels[r] = f"{refs.labels[r].split(' (refreshed')[0]} (refreshed)"
        spent = new.evaluations
        refs.evaluations += spent
        self.evaluations += spent
        self.refreshed.append(int(r))
        comp = self._reference_compressed(refs.states.dtype)
        comp[r] = self._colour_probes(refs.states[r : r + 1], None if refs.params is None else refs.params[r : r + 1])[
            0
        ]

    def set_reach(self, reach: int) -> None:
        """Change the reach of the difference's pattern (and its colouring)."""
        self.reach = int(reach)
        self._colouring = lattice_difference_colouring(self.state_shape, self.reach, self.pattern)
        self._ref_comp = None
        self._reference_compressed(self.references.states.dtype)

    def _event(self, msg: str) -> None:
        self.events.append(msg)
        warnings.warn(f"RefJacobian: {msg}", RuntimeWarning, stacklevel=3)
