"""Tests of the 1-D viscous Burgers solver and scenario (zosol/solvers/burgers1d.py, zosol/solvers/base.py)."""

from __future__ import annotations

import math

import pytest
import torch

from zosol.solvers import BlackBox, get_scenario
from zosol.solvers.burgers1d import Burgers1D, Burgers1DScenario

F64 = torch.float64


# -- exact solution ---------------------------------------------------------------------------


def cole_hopf_cell_averages(n: int, t: float, nu: float, a: float) -> torch.Tensor:
    """Exact cell averages (n,) on [0, 2 pi) of the Cole-Hopf solution of unforced viscous Burgers

        u(x, t) = 2 nu a e^{-nu t} sin x / (1 + a e^{-nu t} cos x) = -2 nu d/dx log phi,
        phi(x, t) = 1 + a e^{-nu t} cos x   (phi solves the heat equation phi_t = nu phi_xx),

    so the average over a cell is -2 nu [log phi]_{x_{i-1/2}}^{x_{i+1/2}} / h."""
    h = 2 * math.pi / n
    faces = torch.arange(n + 1, dtype=F64) * h
    log_phi = torch.log(1 + a * math.exp(-nu * t) * torch.cos(faces))
    return -2 * nu * (log_phi[1:] - log_phi[:-1]) / h


def errors_vs_exact(ns, nu: float, a: float, t_end: float = 1.0, dt: float = 0.1, **kw) -> list[float]:
    """L1 (mean absolute) error of the cell averages at ``t_end`` for each grid size in ``ns``."""
    errs = []
    for n in ns:
        solver = Burgers1D(n, nu, dt, dtype=F64, **kw)
        u = cole_hopf_cell_averages(n, 0.0, nu, a)[None, None]
        for _ in range(round(t_end / dt)):
            u = solver.step(u)
        assert u.dtype == F64
        errs.append(float((u[0, 0] - cole_hopf_cell_averages(n, t_end, nu, a)).abs().mean()))
    return errs


def orders(errs: list[float]) -> list[float]:
    """Observed orders of consecutive grid doublings."""
    return [math.log2(e0 / e1) for e0, e1 in zip(errs, errs[1:])]


NS = (32, 64, 128, 256)


@pytest.mark.parametrize("a", [0.5, 0.9])
def test_reference_converges_to_cole_hopf_at_second_order(a):
    nu = 0.1
    errs = errors_vs_exact(NS, nu, a)
    p = orders(errs)
    # measured (a = 0.9): errors 9.7e-4, 2.7e-4, 6.8e-5, 1.7e-5; orders 1.87, 1.96, 1.99
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
    assert min(p) >= 1.5, f"observed orders {p} (errors {errs})"
    assert p[-1] >= 1.8, f"observed orders {p} (errors {errs})"
    umax = float(cole_hopf_cell_averages(256, 1.0, nu, a).abs().max())
    assert errs[-1] < 2e-4 * umax, f"final error {errs[-1]:.3g} vs max|u| {umax:.3g}"


def test_first_order_euler_converges_more_slowly():
    nu, a = 0.1, 0.9
    hi = errors_vs_exact(NS, nu, a)
    lo = errors_vs_exact(NS, nu, a, order=1, integrator="euler", cfl=0.9)
    p_lo = orders(lo)
    # measured: orders 0.75, 0.91, 0.97 (first order), final error 5.8e-4 vs 1.7e-5
    assert all(e1 < e0 for e0, e1 in zip(lo, lo[1:])), lo  # it does converge ...
    assert 0.6 <= p_lo[-1] <= 1.3, f"first-order scheme: observed orders {p_lo}"
    assert max(p_lo) < min(orders(hi)) - 0.5  # ... but clearly more slowly
    assert lo[-1] > 10 * hi[-1]


# -- conservation, stability ------------------------------------------------------------------


def _smooth_state(n: int, batch: int = 3, dtype=F64, amplitude: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = (torch.arange(n, dtype=F64) + 0.5) * 2 * math.pi / n
    k = torch.arange(1, 5, dtype=F64)
    amp = torch.rand(batch, 4, 1, generator=g, dtype=F64) / k[:, None]
    phase = 2 * math.pi * torch.rand(batch, 4, 1, generator=g, dtype=F64)
    u = (amp * torch.sin(k[:, None] * x + phase)).sum(1, keepdim=True) + 0.3  # nonzero mean
    return (amplitude * u / u.abs().amax(-1, keepdim=True)).to(dtype)


@pytest.mark.parametrize(
    "config", [dict(), dict(order=1, integrator="euler", cfl=0.9)], ids=["muscl-rk3", "upwind-euler"]
)
@pytest.mark.parametrize("forcing_modes", [0, 3])
def test_mean_is_conserved(config, forcing_modes):
    n = 64
    solver = Burgers1D(n, 0.02, 0.05, forcing_modes=forcing_modes, dtype=F64, **config)
    u = _smooth_state(n)
    params = (
        torch.randn(3, 2 * forcing_modes, generator=torch.Generator().manual_seed(2), dtype=F64)
        if forcing_modes
        else None
    )
    m0 = u.mean(-1)
    for _ in range(20):
        u = solver.step(u, params)
    assert not torch.allclose(u, _smooth_state(n))  # it moved
    assert torch.allclose(u.mean(-1), m0, rtol=0, atol=1e-13), (u.mean(-1) - m0).abs().max()


def _scenario_batch(sc, seeds, coarse: bool):
    states, params = zip(*(sc.sample(s) for s in seeds))
    u = torch.stack(states)
    return (sc.downsample(u) if coarse else u), torch.stack(params)


def test_default_coarse_solver_stays_finite_over_long_rollout():
    sc = get_scenario("burgers1d", "default")
    solver = sc.coarse_solver()
    assert solver.min_substeps == 1  # the coarse solver is one cheap Euler step per dt
    u, p = _scenario_batch(sc, [0, 1, 2, 3], coarse=True)
    m0 = u.mean(-1)
    for _ in range(2000):
        u = solver.step(u, p)
    assert torch.isfinite(u).all()
    assert u.abs().max() < 5 * sc.config.u_max
    assert torch.allclose(u.mean(-1), m0, atol=1e-4)  # float32, zero-mean forcing


def test_forced_reference_stays_finite_over_long_rollout():
    sc = get_scenario("burgers1d", "tiny")
    solver = sc.reference_solver()
    assert solver.forcing_modes == sc.config.forcing_modes > 0
    u, p = _scenario_batch(sc, [0, 1], coarse=False)
    u0 = u
    for _ in range(200):
        u = solver.step(u, p)
    assert torch.isfinite(u).all()
    assert u.abs().max() < 5 * sc.config.u_max
    assert (u - u0).abs().max() > 0.1  # the forcing drove it somewhere


# -- contract: batching, dtype, black box -----------------------------------------------------


@pytest.mark.parametrize("which", ["reference", "coarse"])
def test_batched_step_equals_per_sample_steps(which):
    sc = get_scenario("burgers1d", "tiny")
    solver = sc.reference_solver() if which == "reference" else sc.coarse_solver()
    u, p = _scenario_batch(sc, [0, 1, 2], coarse=which == "coarse")
    u, p = u.double(), p.double()
    u[2] *= 2.5  # max |u| = 2.5 > u_max: this sample needs more sub-steps than the others
    assert not torch.equal(p[0], p[1])  # different forcing per sample
    batched = u
    single = [u[i : i + 1] for i in range(3)]
    for _ in range(3):
        batched = solver.step(batched, p)
        single = [solver.step(s, p[i : i + 1]) for i, s in enumerate(single)]
    torch.testing.assert_close(batched, torch.cat(single), rtol=0, atol=1e-12)
    # and the samples really differ (the comparison is not trivially true)
    assert (batched[0] - batched[1]).abs().max() > 1e-2


def test_state_dtype_is_respected():
    s64 = Burgers1D(32, 0.05, 0.05, forcing_modes=1, dtype=F64)
    assert s64.coords["x"].dtype == F64
    s32 = Burgers1D(32, 0.05, 0.05, forcing_modes=1)
    assert s32.coords["x"].dtype == torch.float32
    u = _smooth_state(32, batch=2)
    p = torch.tensor([[0.1, -0.2], [0.3, 0.0]], dtype=F64)
    assert s64.step(u, p).dtype == F64
    assert s32.step(u, p).dtype == F64  # a float64 state stays float64 on a float32-coords solver
    out32 = s32.step(u.float(), p.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), s64.step(u, p), rtol=0, atol=1e-5)
    # coordinates are cell centres on [0, length)
    h = 2 * math.pi / 32
    torch.testing.assert_close(s64.coords["x"], (torch.arange(32, dtype=F64) + 0.5) * h)


def test_blackbox_returns_detached_results():
    solver = Burgers1D(32, 0.05, 0.05, forcing_modes=2, dtype=F64)
    u = _smooth_state(32, batch=2).requires_grad_(True)
    p = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    bb = solver.blackbox()
    assert isinstance(bb, BlackBox) and bb.blackbox() is bb and not bb.differentiable
    assert bb.dt == solver.dt and bb.num_params == 4 and bb.state_shape == (1, 32)
    assert torch.equal(bb.coords["x"], solver.coords["x"])
    out = bb.step(u, p)
    assert not out.requires_grad and out.grad_fn is None
    out2 = bb(u, p)
    assert not out2.requires_grad and out2.grad_fn is None
    # same numbers as the differentiable path, which does record history
    ref = solver.step(u, p)
    assert ref.requires_grad and ref.grad_fn is not None
    assert torch.equal(out, ref.detach())


def test_autograd_matches_central_finite_differences():
    n, steps = 16, 3
    solver = Burgers1D(n, 0.05, 0.05, forcing_modes=2, dtype=F64)
    assert solver.differentiable
    u0 = _smooth_state(n, batch=1)
    p0 = torch.tensor([[0.3, -0.2, 0.1, 0.25]], dtype=F64)
    w = torch.randn(1, 1, n, dtype=F64, generator=torch.Generator().manual_seed(3))

    def loss(u, p):
        for _ in range(steps):
            u = solver.step(u, p)
        return (w * u).sum() + 0.5 * (u**2).sum()

    u, p = u0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    gu, gp = torch.autograd.grad(loss(u, p), (u, p))

    def fd(x0, other, wrt_state: bool, eps=1e-6):
        g = torch.zeros_like(x0)
        for i in range(x0.numel()):
            e = torch.zeros_like(x0).view(-1)
            e[i] = eps
            e = e.view_as(x0)
            args = ((x0 + e, other), (x0 - e, other)) if wrt_state else ((other, x0 + e), (other, x0 - e))
            g.view(-1)[i] = (loss(*args[0]) - loss(*args[1])) / (2 * eps)
        return g

    with torch.no_grad():
        fu = fd(u0, p0, True)
        fp = fd(p0, u0, False)
    assert gu.abs().max() > 1e-2 and gp.abs().max() > 1e-3  # non-trivial gradients
    torch.testing.assert_close(gu, fu, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gp, fp, rtol=1e-6, atol=1e-7)


# -- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=3), r"\bn must"),
        (dict(n=0), r"\bn must"),
        (dict(n=16.5), r"\bn must"),
        (dict(nu=0.0), r"\bnu must"),
        (dict(nu=-0.1), r"\bnu must"),
        (dict(nu=float("nan")), r"\bnu must"),
        (dict(dt=0.0), r"\bdt must"),
        (dict(dt=-0.05), r"\bdt must"),
        (dict(order=3), r"order must"),
        (dict(integrator="rk4"), r"integrator must"),
        (dict(cfl=0.0), r"cfl must"),
        (dict(forcing_modes=-1), r"forcing_modes must"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(n=16, nu=0.05, dt=0.05) | kwargs
    with pytest.raises(ValueError, match=match):
        Burgers1D(**args)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 16), "state has shape"),
        ((2, 2, 16), "state has shape"),
        ((2, 1, 15), "state has shape"),
        ((1, 1, 16, 1), "state has shape"),
    ],
)
def test_wrong_state_shape(shape, match):
    solver = Burgers1D(16, 0.05, 0.05)
    with pytest.raises(ValueError, match=match):
        solver.step(torch.zeros(shape))
    with pytest.raises(ValueError, match=match):
        solver.blackbox().step(torch.zeros(shape))


@pytest.mark.parametrize(
    "params, match",
    [
        (None, "needs params"),
        (torch.zeros(2, 3), "params has shape"),
        (torch.zeros(1, 4), "params has shape"),
        (torch.zeros(4), "params has shape"),
    ],
)
def test_wrong_params_shape(params, match):
    solver = Burgers1D(16, 0.05, 0.05, forcing_modes=2)
    with pytest.raises(ValueError, match=match):
        solver.step(torch.zeros(2, 1, 16), params)


# -- scenario ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_coarse_error_well_above_reference_error(preset):
    """Coarse solver vs the downsampled reference, compared with the reference's own error
    (the reference at n_ref vs a reference at 4 n_ref, both downsampled to the coarse grid)."""
    sc = get_scenario("burgers1d", preset, frames=4)
    c = sc.config
    fine = get_scenario("burgers1d", preset, frames=4, n_ref=4 * c.n_ref)
    seeds = [0, 1]
    u4, p = _scenario_batch(fine, seeds, coarse=False)
    u4, p = u4.double(), p.double()
    u1 = u4.reshape(len(seeds), 1, c.n_ref, 4).mean(-1)  # the same initial state on the n_ref grid
    uc = sc.downsample(u1)
    ref4, ref1, coarse = fine.reference_solver(), sc.reference_solver(), sc.coarse_solver()
    err_ref = err_coarse = 0.0
    for _ in range(c.frames):
        u4, u1, uc = ref4.step(u4, p), ref1.step(u1, p), coarse.step(uc, p)
        truth = fine.downsample(u4)
        err_ref = max(err_ref, float((sc.downsample(u1) - truth).abs().mean()))
        err_coarse = max(err_coarse, float((uc - truth).abs().mean()))
    # measured: tiny 1.3e-4 vs 2.6e-2 (ratio ~200); default 8.9e-6 vs 1.4e-2 (ratio ~1600)
    assert err_coarse > 10 * err_ref, (err_coarse, err_ref)
    assert err_coarse > 1e-3  # the coarse solver is visibly wrong: there is something to correct


def test_downsample_conserves_mean_and_averages_cells():
    sc = get_scenario("burgers1d", "tiny")
    c = sc.config
    fine = torch.randn(3, 1, c.n_ref, generator=torch.Generator().manual_seed(0), dtype=F64)
    coarse = sc.downsample(fine)
    assert coarse.shape == (3, 1, c.n_coarse)
    torch.testing.assert_close(coarse.mean(-1), fine.mean(-1), rtol=0, atol=1e-14)
    r = c.n_ref // c.n_coarse
    torch.testing.assert_close(coarse[..., 1], fine[..., r : 2 * r].mean(-1))
    # the coarse solver's cell centres are the averages of the fine centres
    torch.testing.assert_close(
        sc.downsample(sc.reference_solver().coords["x"][None, None])[0, 0], sc.coarse_solver().coords["x"]
    )


def test_sample_is_seeded_and_well_formed():
    sc = get_scenario("burgers1d", "tiny")
    c = sc.config
    u0, p = sc.sample(5)
    assert u0.shape == (1, c.n_ref) and p.shape == (2 * c.forcing_modes,)
    assert u0.dtype == p.dtype == torch.float32
    u1, p1 = sc.sample(5)
    assert torch.equal(u0, u1) and torch.equal(p, p1)
    u2, p2 = sc.sample(6)
    assert not torch.equal(u0, u2) and not torch.equal(p, p2)
    assert abs(float(u0.mean())) < 1e-6 and abs(float(u0.abs().max()) - c.ic_amplitude) < 1e-6
    assert sc.train_seeds == [c.seed + i for i in range(c.train_sims)]
    assert sc.test_seeds == [c.seed + 10_000 + i for i in range(c.test_sims)]
    assert not set(sc.train_seeds) & set(sc.test_seeds)


def test_get_scenario_overrides_and_presets():
    sc = get_scenario("burgers1d", "tiny", frames=4)
    assert isinstance(sc, Burgers1DScenario) and sc.config.frames == 4 and sc.preset == "tiny"
    assert sc.config.n_ref == Burgers1DScenario.presets["tiny"]["n_ref"]
    for preset in ("tiny", "default", "paper"):
        cfg = get_scenario("burgers1d", preset).config
        assert cfg.n_ref % cfg.n_coarse == 0


@pytest.mark.parametrize(
    "args, overrides, match",
    [
        (("nope", "tiny"), {}, r"unknown scenario 'nope'"),
        (("burgers1d", "huge"), {}, r"unknown preset 'huge'"),
        (("burgers1d", "tiny"), {"bogus": 1}, r"unknown config field.*bogus"),
        (("burgers1d", "tiny"), {"n_coarse": 0}, r"'n_coarse' must be positive"),
        (("burgers1d", "tiny"), {"n_ref": -128}, r"'n_ref' must be positive"),
        (("burgers1d", "tiny"), {"frames": 0}, r"'frames' must be positive"),
        (("burgers1d", "tiny"), {"frames": -1}, r"'frames' must be positive"),
        (("burgers1d", "tiny"), {"train_sims": 0}, r"'train_sims' must be positive"),
        (("burgers1d", "tiny"), {"dt": 0.0}, r"'dt' must be positive"),
        (("burgers1d", "tiny"), {"dt": -0.1}, r"'dt' must be positive"),
        (("burgers1d", "tiny"), {"nu": 0}, r"'nu' must be positive"),
        (("burgers1d", "tiny"), {"dt": float("inf")}, r"'dt' must be positive"),
        (("burgers1d", "tiny"), {"n_ref": 128.0}, r"'n_ref' must be an integer"),
        (("burgers1d", "tiny"), {"n_coarse": 16.5}, r"'n_coarse' must be an integer"),
        (("burgers1d", "tiny"), {"n_ref": "abc"}, r"'n_ref' must be an integer"),
        (("burgers1d", "tiny"), {"frames": True}, r"'frames' must be an integer"),
        (("burgers1d", "tiny"), {"dt": "0.1"}, r"'dt' must be a number"),
        (("burgers1d", "tiny"), {"warmup": -1}, r"'warmup' must be >= 0"),
        (("burgers1d", "tiny"), {"n_ref": 100}, r"n_ref \(100\) must be a multiple of n_coarse \(16\)"),
    ],
)
def test_get_scenario_errors(args, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_scenario(*args, **overrides)
