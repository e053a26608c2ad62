"""Finite-difference Jacobians of black-box steps (zosol.zo.jacobian): patterns, colouring, leak
check, dense fallback, and SOL window gradients against autograd through the differentiable twin."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from zosol.models import small_cnn
from zosol.rollout import WindowBatch, window_loss
from zosol.solvers.base import get_scenario
from zosol.zo.jacobian import (
    DiscontinuityError,
    FDJacobian,
    colour_columns,
    colouring_is_valid,
    fd_step,
    stencil_offsets,
    stencil_pattern,
)


class PeriodicStencil:
    """A linear periodic black box on (B, C, n): out = sum_k w_k roll(x, k) + 0.1 x^2 (local)."""

    def __init__(self, reach: int, channels: int = 1, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(2 * reach + 1, channels, channels, generator=g, dtype=torch.float64)
        self.reach = reach

    def __call__(self, x: torch.Tensor, params=None) -> torch.Tensor:
        out = 0.1 * x**2
        for i, k in enumerate(range(-self.reach, self.reach + 1)):
            out = out + torch.einsum("oc,bcn->bon", self.w[i].to(x.dtype), torch.roll(x, k, -1))
        return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- colouring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,reach", [((1, 32), 1), ((1, 30), 1), ((2, 12, 10), 2), ((3, 17), 3)])
def test_stencil_colouring_is_valid_and_tight(shape, reach):
    pattern = stencil_pattern(stencil_offsets(shape, reach))
    colours = colour_columns(pattern, shape)
    assert colouring_is_valid(pattern, colours)
    # brute-force validity: no row holds two columns of one colour
    dense = pattern.toarray()
    for row in dense:
        cols = np.nonzero(row)[0]
        assert len(set(colours[cols])) == len(cols)
    per_row = dense.sum(1).max()
    assert per_row <= colours.max() + 1 <= 2 * per_row


def test_colouring_of_random_patterns_and_the_validity_check_can_fail():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pattern = sp.random(60, 50, density=0.08, random_state=rng, format="csr") != 0
        colours = colour_columns(pattern)
        assert colouring_is_valid(pattern, colours)
    assert not colouring_is_valid(pattern, np.zeros(50, dtype=np.int64))


def test_burgers1d_default_needs_four_colours():
    sc = get_scenario("burgers1d", "default")
    solver = sc.coarse_solver()
    jac = FDJacobian.for_step(solver.blackbox().step, solver.state_shape, stencil_reach=solver.stencil_reach)
    assert jac.colouring.n_colours == 4 and jac.probes_per_sample == 8
    assert "4 colours" in jac.describe()


# -- estimates ----------------------------------------------------------------------------------


def _burgers1d_state(preset="tiny", batch=3, dtype=torch.float64):
    sc = get_scenario("burgers1d", preset)
    solver = sc.coarse_solver()
    xs, ps = zip(*(sc.sample(s) for s in range(batch)))
    x, p = sc.downsample(torch.stack(xs)).to(dtype), torch.stack(ps).to(dtype)
    for _ in range(4):
        x = solver.step(x, p)
    return sc, solver, x, p


def test_probed_pattern_matches_the_declared_stencil_and_vjp_is_exact():
    sc, solver, x, p = _burgers1d_state()
    probed = FDJacobian.for_step(solver.blackbox().step, solver.state_shape, states=x, params=p)
    declared = stencil_pattern(stencil_offsets(solver.state_shape, solver.stencil_reach)).toarray()
    found = stencil_pattern(probed.colouring.stencil).toarray()
    assert found.sum() > 0 and not (found & ~declared).any()
    xx = x.clone().requires_grad_(True)
    out = solver.step(xx, p)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (ref,) = torch.autograd.grad(out, xx, g)
    est = probed.vjp(x, p, g, f0=out.detach())
    assert _rel(est, ref) < 1e-8


def test_dense_fallback_equals_sparse_path():
    sc, solver, x, p = _burgers1d_state()
    step = solver.blackbox().step
    sparse = FDJacobian.for_step(step, solver.state_shape, stencil_reach=solver.stencil_reach)
    dense = FDJacobian.dense(step, solver.state_shape, max_batch=7)  # several chunks, padded
    assert not sparse.is_dense and dense.is_dense
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    f0 = step(x, p)
    a, b = sparse.vjp(x, p, g, f0), dense.vjp(x, p, g, f0)
    assert _rel(a, b) < 1e-8
    assert torch.allclose(sparse.jacobian(x, p, f0), dense.jacobian(x, p, f0), atol=1e-7)
    assert dense.evaluations >= x.shape[0] * 2 * sparse.n


def test_too_many_colours_switch_to_dense():
    box = PeriodicStencil(reach=5, n=16)
    with pytest.warns(RuntimeWarning, match="dense"):
        jac = FDJacobian.from_stencil(box, stencil_offsets((1, 16), 5))
    assert jac.is_dense and jac.probes_per_sample == 32


def test_forward_differences_reuse_the_forward_output():
    box = PeriodicStencil(reach=1, channels=2)
    x = torch.randn(2, 2, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    jac = FDJacobian.from_stencil(box, stencil_offsets((2, 24), 1), scheme="forward", mu=1e-7)
    xx = x.clone().requires_grad_(True)
    out = box(xx)
    g = torch.randn(out.shape, dtype=out.dtype)
    (ref,) = torch.autograd.grad(out, xx, g)
    assert _rel(jac.vjp(x, None, g, f0=out.detach()), ref) < 1e-6
    assert jac.evaluations == 2 * jac.colouring.n_colours  # no extra evaluation of step(x)


# -- run-time checks ----------------------------------------------------------------------------


def test_leak_check_catches_a_too_narrow_pattern_and_widens_it():
    box = PeriodicStencil(reach=2, n=24)
    x = torch.randn(3, 1, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    narrow = FDJacobian.from_stencil(box, stencil_offsets((1, 24), 1), check=False)
    checked = FDJacobian.from_stencil(box, stencil_offsets((1, 24), 1))
    xx = x.clone().requires_grad_(True)
    out = box(xx)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    (ref,) = torch.autograd.grad(out, xx, g)
    assert _rel(narrow.vjp(x, None, g, out.detach()), ref) > 1e-2  # the wrong pattern gives a wrong gradient
    with pytest.warns(RuntimeWarning, match="leak check"):
        est = checked.vjp(x, None, g, out.detach())
    assert _rel(est, ref) < 1e-8
    assert checked.events and checked.colouring.stencil.per_row == 5


def test_leak_check_catches_burgers1d_extra_substeps():
    """Beyond max|u| ~ 3.4 the coarse burgers1d takes two sub-steps and its stencil widens."""
    sc, solver, x, p = _burgers1d_state(preset="default", batch=2)
    x = x * (4.0 / x.abs().max())
    jac = FDJacobian.for_step(solver.blackbox().step, solver.state_shape, stencil_reach=solver.stencil_reach)
    xx = x.clone().requires_grad_(True)
    out = solver.step(xx, p)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(6))
    (ref,) = torch.autograd.grad(out, xx, g)
    with pytest.warns(RuntimeWarning, match="leak check"):
        est = jac.vjp(x, p, g, out.detach())
    assert _rel(est, ref) < 1e-6


def test_a_jump_under_tiny_perturbations_is_a_clear_error():
    box = PeriodicStencil(reach=1, n=24)

    def jumpy(x, params=None):  # adds a global offset once max(x) passes 1: discontinuous
        return box(x) + 0.5 * (x.flatten(1).amax(1) > 1.0).to(x.dtype).view(-1, 1, 1)

    x = torch.randn(1, 1, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = x / x.max() * (1.0 - 1e-7)  # max just below the switch: +mu crosses it
    jac = FDJacobian.from_stencil(jumpy, stencil_offsets((1, 24), 1))
    with pytest.raises(DiscontinuityError, match="jumps under perturbations"):
        jac.vjp(x, None, torch.ones_like(x), jumpy(x))


# -- SOL window gradients -----------------------------------------------------------------------


def _window_grads(sc, solver, jac, x, p, targets, feats, seed=0, dtype=torch.float64):
    """Gradients of an m-step window loss: autograd through the solver vs fd_step(jac)."""
    c = len(solver.channels)
    cin = c + (0 if feats is None else feats.shape[1])
    torch.manual_seed(seed)
    net = small_cnn(len(solver.spatial_shape), cin, c, width=4, depth=2, kernel=3, padding_mode=sc.padding_mode).to(
        dtype
    )
    nn.init.normal_(net[-1].weight, std=0.05)  # a random last layer: gradients reach every layer
    out = []
    for step in (solver.step, fd_step(jac)):
        net.zero_grad()
        window_loss(step, net, WindowBatch(x, targets, p, feats)).sum().backward()
        out.append(torch.cat([q.grad.flatten() for q in net.parameters()]))
    return out


def _window_data(name, preset, dtype, batch=2, m=3, **overrides):
    sc = get_scenario(name, preset, **overrides)
    solver = sc.coarse_solver()
    xs, ps = zip(*(sc.sample(s) for s in range(batch)))
    x, p = sc.downsample(torch.stack(xs)), torch.stack(ps)
    frames = [x]
    ref = sc.reference_solver()
    fine = torch.stack(xs)
    for _ in range(m):
        fine = ref.step(fine, p)
        frames.append(sc.downsample(fine))
    traj = torch.stack(frames, 1).to(dtype)
    feats = sc.corrector_features(p)
    return sc, solver, traj[:, 0], traj[:, 1:], p.to(dtype), None if feats is None else feats.to(dtype)


@pytest.mark.parametrize("name", ["burgers1d", "burgers2d"])
def test_float64_window_gradient_matches_autograd(name):
    sc, solver, x, targets, p, feats = _window_data(name, "tiny", torch.float64)
    jac = FDJacobian.for_step(solver.blackbox().step, solver.state_shape, states=targets[:, 0], params=p)
    fo, zo = _window_grads(sc, solver, jac, x, p, targets, feats)
    assert _rel(zo, fo) <= 1e-6
    # only the m - 1 solver calls after the first of the window needed Jacobians
    probes = jac.evaluations
    jac.evaluations = 0
    _window_grads(sc, solver, jac, x, p, targets, feats)
    assert jac.evaluations == (targets.shape[1] - 1) * x.shape[0] * jac.probes_per_sample
    assert probes > 0


@pytest.mark.parametrize("name", ["burgers1d", "burgers2d"])
def test_float32_window_gradient_cosine(name):
    sc, solver, x, targets, p, feats = _window_data(name, "tiny", torch.float32)
    jac = FDJacobian.for_step(solver.blackbox().step, solver.state_shape, states=targets[:, 0], params=p)
    fo, zo = _window_grads(sc, solver, jac, x, p, targets, feats, dtype=torch.float32)
    assert _cosine(zo, fo) >= 0.9999


@pytest.mark.parametrize("coarse", [dict(coarse="direct"), dict(coarse="phiflow", tol=1e-6)])
def test_float32_window_gradient_cosine_karman2d(coarse):
    """karman2d's pressure projection is global (dense Jacobian).  The direct coarse step (a
    factored pressure matrix) has no solver noise: cosine 1.0 at 16x8.  With PhiFlow's CG step the
    tolerance sets the noise floor of the finite differences: measured at 16x8, float32, mu 1e-3:
    cosine 0.99963 at tol 1e-4 (gradient norm 28 % off), 0.99997 at 1e-5, 0.9999999 at 1e-6
    (32x16: 0.99977 / 0.99974 / 0.9999994): tol 1e-6 is what cosine >= 0.9999 needs."""
    sc = get_scenario("karman2d", "tiny", n_coarse_x=16, n_coarse_y=8, **coarse)
    solver = sc.coarse_solver()
    fine, p = sc.sample(0)
    x = sc.downsample(fine[None])
    p = p[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            x = solver.step(x, p)
        targets = torch.stack([solver.step(x, p) + 0.01, solver.step(solver.step(x, p), p) + 0.02], 1)
        jac = FDJacobian.dense(solver.blackbox().step, solver.state_shape, max_batch=256)
        fo, zo = _window_grads(sc, solver, jac, x, p, targets, sc.corrector_features(p), dtype=torch.float32)
    assert _cosine(zo, fo) >= 0.9999
