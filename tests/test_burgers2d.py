"""Tests of the 2-D forced viscous Burgers scenario (zosol/solvers/burgers2d.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from zosol.solvers import check_state, get_scenario
from zosol.solvers.burgers2d import Burgers2D, Burgers2DScenario, forcing_field


@pytest.fixture(scope="module")
def tiny() -> Burgers2DScenario:
    return get_scenario("burgers2d", "tiny")


def _batch(sc: Burgers2DScenario, seeds, coarse: bool = True, dtype=torch.float32):
    states, params = zip(*(sc.sample(s) for s in seeds))
    x = torch.stack(states)
    if coarse:
        x = sc.downsample(x)
    return x.to(dtype), torch.stack(params).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- contract: layout, batching, black box ------------------------------------------------------


def test_layout_and_sample(tiny):
    c = tiny.config
    u0, p = tiny.sample(0)
    assert u0.shape == (2, c.n_ref, c.n_ref) and u0.dtype == torch.float32
    assert p.shape == (5 * c.forcing_sines,) and p.dtype == torch.float32
    u1, p1 = tiny.sample(0)
    assert torch.equal(u0, u1) and torch.equal(p, p1)  # seeded
    assert not torch.equal(tiny.sample(1)[0], u0)
    assert float(u0.abs().max()) == pytest.approx(c.ic_amplitude, rel=0.05)
    s = tiny.coarse_solver()
    assert s.channels == ("u", "v") and s.spatial_shape == (c.n_coarse, c.n_coarse)
    assert set(s.coords) == {"x", "y"} and s.coords["x"].shape == (c.n_coarse,)
    feats = tiny.corrector_features(p[None])
    assert feats.shape == (1, 2, c.n_coarse, c.n_coarse)


@pytest.mark.parametrize("which", ["coarse", "reference"])
def test_batched_equals_per_sample(tiny, which):
    x, p = _batch(tiny, [0, 1, 2], coarse=(which == "coarse"))
    solver = tiny.coarse_solver() if which == "coarse" else tiny.reference_solver()
    x[2] *= 25.0  # a much faster sample: needs more sub-steps than the others (masked path)
    assert len(set(solver._nsub(x).tolist())) > 1
    batched = solver.step(x, p)
    for i in range(3):
        single = solver.step(x[i : i + 1], p[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-6)


def test_blackbox_has_no_grad_history(tiny):
    x, p = _batch(tiny, [0, 1])
    x.requires_grad_(True)
    solver = tiny.coarse_solver()
    out = solver.blackbox().step(x, p)
    assert out.requires_grad is False and out.grad_fn is None
    assert solver.step(x, p).grad_fn is not None  # the solver itself is differentiable
    torch.testing.assert_close(out, solver.step(x, p).detach())


def test_shape_validation(tiny):
    solver = tiny.coarse_solver()
    x, p = _batch(tiny, [0])
    with pytest.raises(ValueError):
        solver.step(x[:, :1], p)  # one channel
    with pytest.raises(ValueError):
        solver.step(torch.zeros(1, 2, 8, 8), p)  # wrong grid
    with pytest.raises(ValueError):
        solver.step(x, p[:, :-1])  # wrong K
    with pytest.raises(ValueError):
        solver.step(x, None)  # forced solver needs params
    with pytest.raises(ValueError):
        check_state(solver, x[0], p)  # no batch axis
    with pytest.raises(ValueError):
        tiny.downsample(x)  # coarse state is not a reference state


# -- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["coarse", "reference"])
def test_torch_step_matches_phiflow(tiny, which):
    """Hand-written torch step vs PhiFlow 3.4 (torch backend, jit): measured max |diff| ~1e-6
    after 3 steps (float32, |u| ~ 1); asserted below 1e-5."""
    pytest.importorskip("phi")
    coarse = which == "coarse"
    x, p = _batch(tiny, [0, 1], coarse=coarse)
    make = tiny.coarse_solver if coarse else tiny.reference_solver
    a, b = make(), make(backend="phiflow")
    xa, xb = x, x
    for _ in range(3):
        xa, xb = a.step(xa, p), b.step(xb, p)
    assert float((xa - xb).abs().max()) < 1e-5
    assert float((xa - x).abs().max()) > 1e-2  # the flow actually moved


@pytest.mark.parametrize("which", ["coarse", "reference"])
def test_autograd_matches_finite_differences(tiny, which):
    torch.manual_seed(0)
    coarse = which == "coarse"
    x, p = _batch(tiny, [3, 4], coarse=coarse, dtype=torch.float64)
    solver = tiny.coarse_solver() if coarse else tiny.reference_solver()
    w = torch.randn_like(x)

    def loss(s):
        for _ in range(2):
            s = solver.step(s, p)
        return (w * s).sum() + (s**2).sum()

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xg), xg)
    eps = 1e-6
    for _ in range(3):
        d = torch.randn_like(x)
        fd = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
        ad = (grad * d).sum()
        assert float(abs(fd - ad)) <= 1e-6 * float(abs(ad)) + 1e-7, (float(fd), float(ad))


def test_mean_momentum_balance(tiny):
    """Without forcing, shear flows u(y) keep their mean exactly; in general the 2-D Burgers
    equation changes the mean velocity at the rate <u div u> (it is not a conservation law),
    which the solver reproduces."""
    for solver in (tiny.coarse_solver(), tiny.reference_solver()):
        zero = torch.zeros(1, solver.num_params, dtype=torch.float64)
        y = solver.coords["y"].double()
        shear = torch.zeros(1, 2, solver.n, solver.n, dtype=torch.float64)
        shear[:, 0] = 0.3 + torch.sin(2 * math.pi * y / solver.length)[:, None]
        out = shear
        for _ in range(50):
            out = solver.step(out, zero)
        torch.testing.assert_close(out.mean((2, 3)), shear.mean((2, 3)), rtol=0, atol=1e-12)
        # general state: d<u>/dt == <u div u> (centred divergence)
        x = (tiny.sample(3)[0] if solver.n == tiny.config.n_ref else tiny.downsample(tiny.sample(3)[0][None])[0])[
            None
        ].double()
        h = solver.h
        div = (
            (torch.roll(x[:, 0], -1, -1) - torch.roll(x[:, 0], 1, -1))
            + (torch.roll(x[:, 1], -1, -2) - torch.roll(x[:, 1], 1, -2))
        ) / (2 * h)
        source = (x * div[:, None]).mean((2, 3))
        rate = (solver.step(x, zero).mean((2, 3)) - x.mean((2, 3))) / solver.dt
        assert float((rate - source).abs().max()) < 0.05 * float(source.abs().max()) + 1e-4
        # forcing has zero mean: with forcing the mean moves at the same rate
        _, p = tiny.sample(3)
        rate_f = (solver.step(x, p[None].double()).mean((2, 3)) - x.mean((2, 3))) / solver.dt
        torch.testing.assert_close(rate_f, rate, rtol=0, atol=1e-9)


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_long_rollout_stays_finite(preset):
    sc = get_scenario("burgers2d", preset)
    x, p = _batch(sc, sc.test_seeds[:2])
    solver = sc.coarse_solver().blackbox()
    for _ in range(200):
        x = solver.step(x, p)
    assert bool(torch.isfinite(x).all())
    assert float(x.abs().max()) < 10.0


def test_downsample_conserves_mean_and_forcing(tiny):
    x, p = _batch(tiny, [0, 1], coarse=False)
    x = x + torch.randn_like(x)
    d = tiny.downsample(x)
    c = tiny.config
    assert d.shape == (2, 2, c.n_coarse, c.n_coarse)
    torch.testing.assert_close(d.mean((2, 3)), x.mean((2, 3)), rtol=0, atol=1e-6)
    # forcing = exact cell averages: the reference grid's forcing averages to the coarse one's
    f_ref = forcing_field(p.double(), c.n_ref, c.length)
    f_crs = forcing_field(p.double(), c.n_coarse, c.length)
    torch.testing.assert_close(tiny.downsample(f_ref), f_crs, rtol=0, atol=1e-12)
    assert float(f_crs.mean((2, 3)).abs().max()) < 1e-12


def test_coarse_error_well_above_reference_error(tiny):
    """Coarse solver vs downsampled reference, against reference vs a twice-finer reference
    (same settings).  Measured on the tiny preset (32 -> 16, 8 frames, seeds 10000-10001):
    ratio ~14; asserted >= 5."""
    c = tiny.config
    finer = Burgers2DScenario(dataclasses.replace(c, n_ref=2 * c.n_ref))
    seeds = tiny.test_seeds[:2]
    xr, p = _batch(tiny, seeds, coarse=False)
    xf, _ = _batch(finer, seeds, coarse=False)
    xc = tiny.downsample(xr)
    torch.testing.assert_close(finer.downsample(xf), xc, rtol=0, atol=1e-5)  # same initial flow
    ref, fin, crs = (
        tiny.reference_solver().blackbox(),
        finer.reference_solver().blackbox(),
        tiny.coarse_solver().blackbox(),
    )
    e_coarse = e_ref = 0.0
    for _ in range(c.frames):
        xr, xf, xc = ref.step(xr, p), fin.step(xf, p), crs.step(xc, p)
        r = tiny.downsample(xr)
        e_coarse += float((xc - r).abs().mean()) / c.frames
        e_ref += float((r - finer.downsample(xf)).abs().mean()) / c.frames
    assert e_coarse > 5 * e_ref, (e_coarse, e_ref)


# -- registry / presets --------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "default", "paper"])
def test_presets(preset):
    sc = get_scenario("burgers2d", preset)
    assert isinstance(sc, Burgers2DScenario) and sc.preset == preset
    c = sc.config
    ref, crs = sc.reference_solver(), sc.coarse_solver()
    assert isinstance(ref, Burgers2D) and isinstance(crs, Burgers2D)
    assert ref.spatial_shape == (c.n_ref, c.n_ref) and crs.spatial_shape == (c.n_coarse, c.n_coarse)
    assert ref.dt == crs.dt == c.dt == 0.1 and ref.nu == 0.1 and c.length == 32.0
    assert crs.num_params == ref.num_params == 5 * 20
    if preset == "paper":
        assert (c.n_ref, c.n_coarse) == (128, 32)
    else:
        x, p = sc.sample(0)
        assert sc.coarse_solver().step(sc.downsample(x[None]), p[None]).shape == (1, 2, c.n_coarse, c.n_coarse)


def test_bad_config():
    with pytest.raises(ValueError):
        get_scenario("burgers2d", "tiny", n_ref=40)  # not a multiple of n_coarse
    with pytest.raises(ValueError):
        get_scenario("burgers2d", "tiny", cfl_ref=1.5)
    with pytest.raises(ValueError):
        Burgers2D(16, advection="upwind")


def test_unforced_scenario():
    sc = get_scenario("burgers2d", "tiny", forcing_sines=0)
    x, p = sc.sample(0)
    assert p.shape == (0,) and sc.corrector_features(p[None]) is None
    solver = sc.coarse_solver()
    assert solver.num_params == 0
    x = sc.downsample(x[None])
    torch.testing.assert_close(solver.step(x), solver.step(x, p[None]))
    with pytest.raises(ValueError):
        get_scenario("burgers2d", "tiny", forcing_sines=-1)
