"""Reference-subtracted finite-difference Jacobians (zosol.zo.refjac): exactness when the difference
to the reference lies within the reach, karman2d window gradients against autograd, and the
run-time error check (catching a reference that is too far away, refreshing, giving up)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_zo_jacobian import _cosine, _window_grads

from zosol.solvers.base import get_scenario
from zosol.zo.jacobian import fd_step
from zosol.zo.refjac import (
    References,
    RefJacobian,
    build_frame_references,
    build_references,
    lattice_difference_colouring,
)

SHAPE = (2, 6, 5)


class CoupledSolver:
    """A black box on (B, 2, 6, 5) with a dense constant Jacobian part M plus a local nonlinearity
    (reach 1, not wrapping around the edges) and an optional dense nonlinear part:
    f(x) = M x + a x * shift(x) + dense (w.x)^2 u / 2."""

    def __init__(self, dense: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n = 2 * 6 * 5
        self.m = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        self.w = torch.randn(n, generator=g, dtype=torch.float64) / n**0.5
        self.u = torch.randn(n, generator=g, dtype=torch.float64)
        self.dense = dense

    def __call__(self, x: torch.Tensor, params=None) -> torch.Tensor:
        b = x.shape[0]
        flat = x.reshape(b, -1)
        shifted = torch.zeros_like(x)
        shifted[:, 0, 1:, :] = x[:, 1, :-1, :]  # channel 1, one row up
        shifted[:, 1, :, 1:] = x[:, 0, :, :-1]  # channel 0, one column left
        local = 0.5 * x * shifted
        dense = 0.5 * self.dense * (flat @ self.w)[:, None] ** 2 * self.u
        return (flat @ self.m.T + dense).reshape(x.shape) + local


def _exact(solver, x: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda s: solver(s[None])[0], xi).reshape(60, 60) for xi in x]
    )


def _states(b: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lattice_difference_colouring_counts_and_validity():
    col = lattice_difference_colouring((2, 8, 16), 2)
    assert col.n_colours == 50
    col1 = lattice_difference_colouring((2, 8, 16), 1)
    assert col1.n_colours == 18
    # no row holds two pattern columns of one colour (brute force)
    pairs = torch.stack([col.rows, col.entry_colour], 1)
    assert pairs.unique(dim=0).shape[0] == pairs.shape[0]
    with pytest.raises(ValueError, match="half-width"):
        lattice_difference_colouring((2, 8, 16), (1,))


def test_references_are_the_dense_jacobians():
    solver = CoupledSolver(dense=0.3)
    x = _states(2, 1)
    refs = build_references(solver, x, scheme="central", max_batch=7, labels=["a", "b"])
    assert torch.allclose(refs.jacobians, _exact(solver, x), atol=1e-8)
    assert refs.evaluations == 2 * 2 * 60
    again = References.from_state(refs.to_state())
    assert torch.equal(again.jacobians, refs.jacobians) and again.labels == ["a", "b"]
    assert again.nearest(x[[1, 0, 1]] + 1e-3).tolist() == [1, 0, 1]


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_estimate_is_exact_when_the_difference_lies_within_the_reach(scheme):
    solver = CoupledSolver()
    refs = build_references(solver, _states(1, 0), scheme="central")
    x = _states(3, 5, scale=2.0)  # far from the reference: J(x) - J_ref is large but local
    exact = _exact(solver, x)
    jac = RefJacobian(solver, SHAPE, refs, reach=1, scheme=scheme)
    est = jac.jacobian(x, None, solver(x))
    tol = 1e-8 if scheme == "central" else 1e-5  # forward differences: O(mu) on the quadratic term
    assert (est - exact).abs().max() <= tol
    assert (refs.jacobians[0] - exact).abs().max() > 0.5  # the reference alone is far off
    # reach 0 misses the neighbour coupling: the test can fail
    narrow = RefJacobian(solver, SHAPE, refs, reach=0, scheme=scheme).jacobian(x, None, solver(x))
    assert (narrow - exact).abs().max() > 0.1
    # vjp and jvp agree with the dense estimate
    g = _states(3, 9)
    vjp = jac.vjp(x, None, g, f0=solver(x))
    assert torch.allclose(vjp.reshape(3, -1), torch.einsum("bij,bi->bj", exact, g.reshape(3, -1)), atol=tol * 60)


def test_at_the_reference_state_the_estimate_is_the_reference():
    """Forward differences along colour directions carry a truncation error (mu/2 d^T H d, large when
    a direction perturbs many cells); the reference's own colour probes cancel it."""
    solver = CoupledSolver(dense=1.0)
    x = _states(1, 4, scale=3.0)
    refs = build_references(solver, x, scheme="forward", mu=1e-3)
    est = RefJacobian(solver, SHAPE, refs, reach=1, mu=1e-3).jacobian(x, None)
    assert torch.equal(est, refs.jacobians)
    jac = RefJacobian(solver, SHAPE, refs, reach=1, mu=1e-3)
    rows, _, colour, _, dirs = jac._colouring.on(x.device, x.dtype)
    exact_products = (refs.jacobians[0] @ dirs.T).T.reshape(-1)[colour * 60 + rows]
    probed = jac._reference_compressed(x.dtype)[0]
    assert (probed - exact_products).abs().max() > 1e-4  # what subtracting exact products would have left


def test_selection_picks_the_reference_of_each_sample():
    solver = CoupledSolver(dense=1.0)
    x = _states(2, 3)
    refs = build_references(solver, x, scheme="central")
    jac = RefJacobian(solver, SHAPE, refs, reach=0, scheme="central")
    exact = _exact(solver, x)
    # nearest: each sample gets its own reference, so the estimate is exact
    assert (jac.jacobian(x, None) - exact).abs().max() < 1e-8
    jac.select(torch.tensor([1, 0]))  # swapped: wrong references, the dense part shows
    assert (jac.jacobian(x, None) - exact).abs().max() > 1e-2
    with pytest.raises(IndexError, match="out of range"):
        jac.select(torch.tensor([2, 0]))


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_frame_references_share_one_dense_jacobian_and_are_exact_within_their_reaches(scheme):
    """J(x) = M + L(x), L local (reach 1): a frame's field (J(frame) - J_base within reach 1) is exact,
    and so is the estimate at a state near a frame (the live difference within reach 1)."""
    solver = CoupledSolver()
    base = build_references(solver, _states(1, 0), scheme="central")
    frames = _states(4, 7, scale=2.0)
    refs = build_frame_references(solver, base, frames, reach=1, scheme="central", chunk=3)
    assert refs.fields.shape == (4, 2, 2, 9, 30) and refs.shared and len(refs) == 4
    assert refs.evaluations == base.evaluations + 2 * 18 * 5  # 18 colours at 4 frames and the base
    tol = 1e-8 if scheme == "central" else 1e-5
    jac = RefJacobian(solver, SHAPE, refs, reach=1, scheme=scheme)
    assert (jac.jacobian(frames, None) - _exact(solver, frames)).abs().max() <= tol  # nearest: their own
    x = frames[[2, 0, 3]] + 0.3 * _states(3, 8)
    jac.select(torch.tensor([[1, 2], [0, 3], [3, 1]]))  # candidates: the nearest of each row is used
    assert jac._ref_index(x).tolist() == [2, 0, 3]
    exact, est = _exact(solver, x), jac.jacobian(x, None, solver(x))
    assert (est - exact).abs().max() <= tol
    g, f0 = _states(3, 9), solver(x)
    vjp = jac.vjp(x, None, g, f0=f0).reshape(3, -1)
    assert torch.allclose(vjp, torch.einsum("bij,bi->bj", est, g.reshape(3, -1)), atol=1e-10)
    index = jac._ref_index(x)
    v = _states(6, 10).reshape(3, 2, 60)
    jv = jac.jvp_estimate(jac.difference(x, None, f0, index), index, v)
    assert torch.allclose(jv, torch.einsum("bij,bdj->bdi", est, v), atol=1e-10)
    # the base alone, or a field reach of 0, misses the local coupling: the test can fail
    assert (refs.jacobians[0] - exact).abs().max() > 0.5
    narrow = build_frame_references(solver, base, frames, reach=0, scheme="central")
    assert (
        RefJacobian(solver, SHAPE, narrow, reach=0, scheme="central").jacobian(frames, None) - _exact(solver, frames)
    ).abs().max() > 0.1
    again = References.from_state(refs.to_state())
    assert (
        torch.equal(again.fields, refs.fields) and again.field_reach == 1 and torch.equal(again.base_state, base.states)
    )
    # a refresh re-estimates the field at the new state
    jac.select(None)
    jac.refresh_at(0, x[1:2], None)
    assert torch.equal(refs.states[0], x[1]) and (jac.jacobian(x[1:2], None) - exact[1:2]).abs().max() <= tol


def test_error_check_catches_a_reference_that_is_too_far_and_refreshes_it():
    solver = CoupledSolver(dense=1.0)
    x0 = _states(1, 0)
    refs = build_references(solver, x0, scheme="forward")
    jac = RefJacobian(solver, SHAPE, refs, reach=1, tol=1e-3, max_reach=2)
    g = _states(1, 7)
    # near the reference: the check passes, nothing changes
    jac.request_check(torch.Generator().manual_seed(0))
    jac.vjp(x0 + 1e-4, None, g, solver(x0 + 1e-4))
    assert jac.checks[-1].passed and jac.checks[-1].actions == [] and jac.events == []
    # the state moves far away: the dense part of J(x) - J_ref is outside any reach
    x = x0 + 2.0 * _states(1, 11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jac.request_check(torch.Generator().manual_seed(1))
        vjp = jac.vjp(x, None, g, solver(x))
    rec = jac.checks[-1]
    assert rec.error > 0.05 and rec.actions == ["refresh"] and rec.passed and rec.final_error <= 1e-3
    assert any("error check" in str(w.message) for w in caught) and jac.poor is None
    assert "(refreshed)" in refs.labels[0] and torch.allclose(refs.states[0], x[0])
    exact = torch.einsum("ij,i->j", _exact(solver, x)[0], g.flatten())
    assert torch.allclose(vjp.flatten(), exact, rtol=1e-4, atol=1e-4)  # this step's gradient used the fresh one


def test_error_check_widens_then_gives_up_with_one_line():
    solver = CoupledSolver(dense=1.0)
    refs = build_references(solver, _states(1, 0), scheme="forward")
    jac = RefJacobian(solver, SHAPE, refs, reach=1, tol=1e-6, max_reach=2)
    x = torch.cat([_states(1, 2, 2.0), _states(1, 3, 2.0)])  # one global reference cannot fit both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jac.request_check(torch.Generator().manual_seed(0))
        jac.vjp(x, None, _states(2, 4), solver(x))
    rec = jac.checks[-1]
    assert rec.actions == ["refresh", "widen to 2"] and not rec.passed and jac.reach == 2
    assert jac.poor is not None and "\n" not in jac.poor and "stays poor" in jac.poor
    assert jac.n_colours == 50  # 2 channels x 5 x 5


def test_karman2d_direct_window_gradient_matches_autograd():
    """16x8 direct coarse step, float64, m = 3: one global reference at the mean of the window's
    data states, reach 2, forward differences: the window gradient matches autograd (measured
    1 - cosine 4e-9).  Plain truncation to the reach (a zero reference) misses the pressure
    projection's far field (1 - cosine 3.6e-4): the bar can fail."""
    sc = get_scenario("karman2d", "tiny", n_coarse_x=16, n_coarse_y=8)
    solver = sc.coarse_solver()
    fine, p = sc.sample(0)
    x = sc.downsample(fine[None]).double()
    p = p[None].double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            x = solver.step(x, p)
        t1 = solver.step(x, p)
        t2 = solver.step(t1, p)
        targets = torch.stack([t1 + 0.01, t2 + 0.02, solver.step(t2, p) + 0.03], 1)
        box = solver.blackbox().step
        mean = torch.cat([x, targets[0]]).mean(0, keepdim=True)
        refs = build_references(box, mean, p, scheme="forward", mu=1e-7)
        jac = RefJacobian(box, solver.state_shape, refs, reach=2, mu=1e-7)
        fo, zo = _window_grads(sc, solver, jac, x, p, targets, sc.corrector_features(p))
        assert _cosine(zo, fo) >= 0.99999
        # m - 1 = 2 Jacobians, and the colour probes at the reference (+ its forward output) once
        assert jac.evaluations == 2 * x.shape[0] * jac.probes_per_sample + jac.probes_per_sample + 1
        # frame fields (the default): the difference at the window's data frames within reach 3, the
        # nearest per call, the live difference within reach 1
        frames = torch.cat([x, targets[0, :-1] - torch.tensor([0.01, 0.02])[:, None, None, None].double()])
        layered = build_frame_references(box, refs, frames, p.expand(3, -1), reach=3, mu=1e-7)
        jac = RefJacobian(box, solver.state_shape, layered, reach=1, mu=1e-7)
        jac.select(torch.arange(3)[None])
        fo, zo = _window_grads(sc, solver, jac, x, p, targets, sc.corrector_features(p))
        assert _cosine(zo, fo) >= 0.99999
        refs.jacobians.zero_()
        fo, zo = _window_grads(sc, solver, RefJacobian(box, solver.state_shape, refs, reach=2, mu=1e-7), x, p,
                               targets, sc.corrector_features(p))  # fmt: skip
        assert _cosine(zo, fo) < 0.9999


def test_fd_step_accepts_the_estimator():
    solver = CoupledSolver()
    refs = build_references(solver, _states(1, 0), scheme="central")
    jac = RefJacobian(solver, SHAPE, refs, reach=1, scheme="central")
    x = _states(2, 6).requires_grad_()
    fd_step(jac)(x).pow(2).sum().backward()
    y = _states(2, 6).requires_grad_()
    solver(y).pow(2).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-7)


@pytest.mark.parametrize("shape, reach", [((2, 9), 2), ((1, 5, 6), 1), ((2, 3, 4, 5), 1)])
def test_stencil_field_products_equal_the_dense_matrix_in_every_dimension(shape, reach):
    """1-D, 2-D and 3-D fields on the non-periodic reach pattern: vjp and jvp equal the dense
    matrices the fields stand for (a shift in the wrong direction or a swapped channel fails)."""
    from zosol.zo.refjac import field_jvp, field_vjp, stencil_index

    g = torch.Generator().manual_seed(0)
    c, spatial, n = shape[0], shape[1:], math.prod(shape)
    pattern = lattice_difference_colouring(shape, reach)
    k = (2 * reach + 1) ** len(spatial)
    fields = torch.zeros(3, c * c * k * (n // c), dtype=torch.float64)
    where = stencil_index(shape, pattern)
    fields[:, where] = torch.randn(3, where.numel(), generator=g, dtype=torch.float64)
    dense = torch.zeros(3, n, n, dtype=torch.float64)
    dense[:, pattern.rows, pattern.cols] = fields[:, where]
    fields = fields.reshape(3, c, c, k, n // c)
    u = torch.randn(3, n, generator=g, dtype=torch.float64)
    vjp = field_vjp(fields, u.reshape(3, 1, c, -1), spatial, reach).reshape(3, n)
    assert torch.allclose(vjp, torch.einsum("bij,bi->bj", dense, u), atol=1e-12)
    v = torch.randn(3, 2, n, generator=g, dtype=torch.float64)
    jvp = field_jvp(fields, v.reshape(3, 2, c, -1), spatial, reach).reshape(3, 2, n)
    assert torch.allclose(jvp, torch.einsum("bij,bdj->bdi", dense, v), atol=1e-12)
