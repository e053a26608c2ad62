"""Tests of the Kuramoto-Sivashinsky solver and scenario (zosol/solvers/ks1d.py): exactness of the
linear part, measured orders of the ETD schemes, the reference's own error against SRC's, the
solver contract (batching, dtypes, black box, autograd) and the scenario (presets, seeds, sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from zosol.errors import UsageError
from zosol.solvers import BlackBox, SolverDivergedError, get_scenario
from zosol.solvers.ks1d import KS1D, etd_coefficients

F64 = torch.float64


def smooth_state(n: int, length: float, dtype: torch.dtype = F64) -> torch.Tensor:
    """Kassam-Trefethen's start ``cos(2 pi x / L) (1 + sin(2 pi x / L))`` on ``n`` points: (1, 1, n)."""
    x = torch.arange(n, dtype=dtype) * (length / n)
    w = 2 * math.pi / length
    return (torch.cos(w * x) * (1 + torch.sin(w * x)))[None, None]


def random_states(batch: int, n: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Smooth random zero-mean states (batch, 1, n) with modes 1..8, amplitude ~1."""
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(batch, 1, n // 2 + 1, dtype=torch.complex128)
    v[..., 1:9] = torch.randn(batch, 1, 8, 2, generator=g, dtype=F64).mul(n / 4).view(torch.complex128).squeeze(-1)
    return torch.fft.irfft(v, n=n).to(dtype)


# -- exactness and order ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["etdrk1", "etdrk2", "etdrk4"])
def test_linear_step_is_the_exact_solution(scheme):
    """Without the nonlinearity every scheme is exp(L t) (L = k^2 - k^4), here to 1e-10."""
    n, length, dt = 64, 32.0, 0.7
    solver = KS1D(n, dt, length, scheme=scheme, substeps=3, nonlinear=0.0, dtype=F64)
    u = random_states(3, n)
    k = 2 * math.pi * torch.fft.rfftfreq(n, d=length / n, dtype=F64)
    for steps in (1, 5):
        out = u
        for _ in range(steps):
            out = solver.step(out)
        exact = torch.fft.irfft(torch.exp((k**2 - k**4) * steps * dt) * torch.fft.rfft(u), n=n)
        assert (out - exact).abs().max() < 1e-10


def test_contour_coefficients_match_the_direct_formulas():
    """Kassam-Trefethen contour means equal phi-functions where the direct formula is accurate,
    and the Runge-Kutta weights (1/6 each) at z = 0 where it is 0/0."""
    z = torch.tensor([-0.5, -5.0, -50.0, -700.0, 0.3], dtype=F64)
    c = etd_coefficients(z, 1.0, "etdrk4")
    ez = torch.exp(z)
    direct = {
        "Q": (torch.exp(z / 2) - 1) / z,
        "f1": (-4 - z + ez * (4 - 3 * z + z**2)) / z**3,
        "f2": (2 + z + ez * (z - 2)) / z**3,
        "f3": (-4 - 3 * z - z**2 + ez * (4 - z)) / z**3,
    }
    for name, want in direct.items():
        torch.testing.assert_close(c[name], want, rtol=1e-12, atol=0)
    at_zero = etd_coefficients(torch.zeros(1, dtype=F64), 1.0, "etdrk4")
    for name in ("f1", "f2", "f3"):
        assert abs(float(at_zero[name]) - 1 / 6) < 1e-14
    c2 = etd_coefficients(z, 0.5, "etdrk2")
    torch.testing.assert_close(c2["phi1"], 0.5 * (ez - 1) / z, rtol=1e-12, atol=0)
    torch.testing.assert_close(c2["phi2"], 0.5 * (ez - 1 - z) / z**2, rtol=1e-12, atol=0)
    with pytest.raises(UsageError, match="unknown ETD scheme"):
        etd_coefficients(z, 1.0, "rk4")


def observed_orders(scheme: str, substeps: tuple[int, ...]) -> tuple[list[float], list[float]]:
    """Max-norm errors at t = 1 (L = 32, 64 points, float64) against ETDRK4 with 4096 steps, and
    the observed orders of consecutive step halvings."""
    n, length = 64, 32.0
    u0 = smooth_state(n, length)
    exact = KS1D(n, 1.0, length, scheme="etdrk4", substeps=4096, dtype=F64).step(u0)
    errs = [
        float((KS1D(n, 1.0, length, scheme=scheme, substeps=s, dtype=F64).step(u0) - exact).abs().max())
        for s in substeps
    ]
    return errs, [math.log2(a / b) for a, b in zip(errs, errs[1:])]


@pytest.mark.parametrize("scheme, order", [("etdrk1", 1), ("etdrk2", 2), ("etdrk4", 4)])
def test_measured_convergence_order_is_the_schemes(scheme, order):
    # measured (docs/ks1d.md): etdrk4 errors 1.9e-6 ... 6.1e-11 for 8 ... 128 steps, orders 3.51 3.69 3.84 3.92;
    # etdrk2 orders 1.96 1.98 1.99 2.00; etdrk1 1.00 (all four)
    errs, orders = observed_orders(scheme, (8, 16, 32, 64, 128))
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
    assert abs(orders[-1] - order) < 0.15, (orders, errs)


def test_reference_error_is_far_below_the_coarse_solvers():
    """The default reference against a 2x finer grid with 4x smaller ETDRK4 steps, from the same
    attractor state, on the coarse grid: its own error is >= 5x (measured: thousands of times)
    below SRC's (the coarse solver against the same finer run)."""
    sc = get_scenario("ks1d", "default", frames=48, warmup=200)
    c = sc.config
    ref = sc.reference_solver()
    start = torch.stack([sc.sample(s)[0] for s in sc.test_seeds[:4]]).double()
    for _ in range(c.warmup):
        start = ref.step(start)
    fine = KS1D(2 * c.n_ref, c.dt, c.length, scheme="etdrk4", substeps=4 * c.ref_substeps)
    v = torch.zeros(start.shape[0], 1, c.n_ref + 1, dtype=torch.complex128)
    v[..., : c.n_ref // 2] = 2 * torch.fft.rfft(start)[..., : c.n_ref // 2]  # spectral prolongation
    uf, ur, uc = torch.fft.irfft(v, n=2 * c.n_ref), start, sc.downsample(start).float()
    coarse = sc.coarse_solver()
    err_ref = err_src = 0.0
    for _ in range(c.frames):
        uf, ur, uc = fine.step(uf), ref.step(ur), coarse.step(uc)
        truth = uf[..., :: 2 * c.n_ref // c.n_coarse]
        err_ref += float((sc.downsample(ur) - truth).abs().mean()) / c.frames
        err_src += float((uc.double() - truth).abs().mean()) / c.frames
    # measured (experiments/ks1d_reference.py, 8 test seeds): reference 6.3e-6, SRC 0.22: ratio ~35,000
    assert err_src > 5 * err_ref, (err_src, err_ref)
    assert err_src > 1e-2  # the coarse solver is visibly wrong
    assert err_ref < 1e-4


# -- the solver contract -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["reference", "coarse"])
def test_batched_step_equals_per_sample_steps(which):
    sc = get_scenario("ks1d", "default")
    solver = sc.reference_solver() if which == "reference" else sc.coarse_solver()
    u = random_states(5, solver.n, seed=1)
    batched = solver.step(u)
    single = torch.cat([solver.step(u[i : i + 1]) for i in range(u.shape[0])])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-13)


def test_state_dtype_and_device_are_respected():
    solver = get_scenario("ks1d", "tiny").coarse_solver()
    u64 = random_states(2, solver.n)
    out32, out64 = solver.step(u64.float()), solver.step(u64)
    assert out32.dtype == torch.float32 and out64.dtype == F64
    assert (out32.double() - out64).abs().max() < 1e-5
    with pytest.raises(TypeError, match="float32 or float64"):
        solver.step(u64.half())
    if torch.cuda.is_available():  # device-agnostic: the same step on the GPU
        torch.testing.assert_close(solver.step(u64.cuda()).cpu(), out64, rtol=0, atol=1e-12)


def test_blackbox_returns_detached_results():
    solver = get_scenario("ks1d", "tiny").coarse_solver()
    u = random_states(2, solver.n).float().requires_grad_()
    box = solver.blackbox()
    assert isinstance(box, BlackBox) and not box.differentiable
    out = box.step(u)
    assert not out.requires_grad and out.grad_fn is None
    assert solver.step(u).requires_grad  # the solver itself is the differentiable twin
    assert box.stencil_reach is None  # spectral: dense Jacobian


def test_autograd_matches_finite_differences():
    """The coarse step is differentiable (FO-SOL's twin): torch.autograd.gradcheck in float64."""
    sc = get_scenario("ks1d", "tiny")
    solver = sc.coarse_solver()
    u = random_states(2, solver.n, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: solver.step(s), (u,), eps=1e-6, atol=1e-6)


def test_dealiased_coarse_solver_drops_the_upper_third():
    solver = KS1D(32, 0.5, 32.0, scheme="etdrk1", substeps=2, dealias=True, dtype=F64)
    plain = KS1D(32, 0.5, 32.0, scheme="etdrk1", substeps=2, dtype=F64)
    u = random_states(2, 32)
    assert (solver.step(u) - plain.step(u)).abs().max() > 1e-6  # aliasing changes the step
    torch.testing.assert_close(solver.step(u).mean(-1), u.mean(-1), rtol=0, atol=1e-12)


def test_mean_is_conserved_and_default_coarse_rollout_stays_finite():
    sc = get_scenario("ks1d", "default")
    ref, coarse = sc.reference_solver(), sc.coarse_solver()
    u = torch.stack([sc.sample(s)[0] for s in sc.test_seeds[:6]]).double() + 0.3
    mean = u.mean(-1)
    for _ in range(100):
        u = ref.step(u)
    torch.testing.assert_close(u.mean(-1), mean, rtol=0, atol=1e-12)
    uc = sc.downsample(u - mean[..., None]).float()  # zero mean, as every dataset state (a mean advects)
    for _ in range(4 * sc.config.frames):  # no blow-up over 4x the recorded frames
        uc = coarse.step(uc)
    assert uc.abs().max() < 10


def test_diverging_state_raises():
    solver = KS1D(32, 0.5, 32.0, scheme="etdrk1", substeps=1)
    u = 1e18 * random_states(1, 32).float()
    with pytest.raises(SolverDivergedError, match="diverged"):
        for _ in range(5):
            u = solver.step(u)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=31), "even integer"),
        (dict(n=2), "even integer"),
        (dict(dt=0.0), "dt must be a positive"),
        (dict(length=-1.0), "length must be a positive"),
        (dict(scheme="rk4"), "scheme must be one of"),
        (dict(substeps=0), "substeps must be an integer"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(n=32, dt=0.5, length=32.0) | kwargs
    n, dt, length = args.pop("n"), args.pop("dt"), args.pop("length")
    with pytest.raises(UsageError, match=match):
        KS1D(n, dt, length, **args)


def test_wrong_state_shape():
    solver = KS1D(32, 0.5)
    with pytest.raises(ValueError, match=r"expected \(B, 1, 32\)"):
        solver.step(torch.zeros(2, 1, 16))


# -- the scenario ------------------------------------------------------------------------------


def test_scenario_presets_seeds_and_sampling():
    sc = get_scenario("ks1d", "default")
    c = sc.config
    assert c.length >= 22 and c.test_sims >= 20 and c.warmup > 0
    assert sc.test_seeds[0] == c.seed + 10_000 and len(set(sc.train_seeds) & set(sc.test_seeds)) == 0
    u0, p = sc.sample(7)
    assert u0.shape == (1, c.n_ref) and u0.dtype == torch.float32 and p.shape == (0,)
    assert torch.equal(u0, sc.sample(7)[0]) and not torch.equal(u0, sc.sample(8)[0])
    assert abs(float(u0.mean())) < 1e-6 and abs(float(u0.abs().max()) - c.ic_amplitude) < 1e-6
    assert sc.state_shapes() == {"reference": (1, c.n_ref), "coarse": (1, c.n_coarse)}
    assert sc.reference_solver() is sc.reference_solver()
    tiny = get_scenario("ks1d", "tiny", frames=3)
    assert tiny.config.frames == 3 and tiny.preset == "tiny"
    with pytest.raises(ValueError, match="must be a multiple of n_coarse"):
        get_scenario("ks1d", "tiny", n_coarse=24)


def test_downsample_samples_points():
    """The coarse grid's points are every r-th reference point (not block averages)."""
    sc = get_scenario("ks1d", "default")
    ref, coarse = sc.reference_solver(), sc.coarse_solver()
    fine = torch.arange(2 * sc.config.n_ref, dtype=F64).view(2, 1, -1)
    down = sc.downsample(fine)
    r = sc.config.n_ref // sc.config.n_coarse
    assert torch.equal(down, fine[..., ::r])
    torch.testing.assert_close(sc.downsample(ref.coords["x"][None, None]), coarse.coords["x"][None, None])


def test_lyapunov_experiment_measures_a_positive_exponent():
    """experiments/ks1d_lyapunov.py on a short run: chaotic at L = 22 (the full run gives ~0.049,
    docs/ks1d.md), while at L = 10 the dynamics settle (no positive exponent)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "ks1d_lyapunov.py"
    spec = importlib.util.spec_from_file_location("ks1d_lyapunov", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    chaotic = script.lyapunov(22.0, n=64, dt=0.25, batch=4, transient=100.0, time_units=200.0)
    assert 0.02 < chaotic["mean"] < 0.1 and len(chaotic["per_trajectory"]) == 4, chaotic
    settled = script.lyapunov(10.0, n=32, dt=0.25, batch=2, transient=100.0, time_units=100.0)
    assert settled["mean"] < 0.005, settled  # measured -0.009


def test_tiny_compare_trains_every_method_and_states_the_dense_cost(tmp_path):
    """All six rows on the tiny preset; the Jacobian of the spectral step is dense, and the cost
    model of the ZO methods says so and names the cheaper one."""
    from zosol.compare import compare

    res = compare("ks1d", "tiny", tmp_path, overrides={"epochs": 1}, progress=False, log=lambda *a: None)
    methods = res["methods"]
    assert set(methods) == {"SRC", "NON", "NOG-SOL", "FO-SOL", "ZO-SOL", "ZO-JAC-SOL"}
    assert all(m["status"] == "ok" and math.isfinite(m["mae_mean"]) for m in methods.values()), methods
    cost = methods["ZO-JAC-SOL"]["cost_model"]
    assert "dense Jacobian, n = 32" in cost and "is cheaper" in cost, cost
    assert abs(methods["ZO-SOL"]["mae_mean"] / methods["FO-SOL"]["mae_mean"] - 1) < 0.02  # same gradient, estimated


def test_default_simulations_are_chaotic():
    """After the warm-up every default simulation is on a chaotic attractor: a twin displaced by 1e-8
    separates at a finite-time rate > 0.02 over 100 time units (measured 0.05-0.10; at L = 32
    two of these four have settled onto a stable state, rates -0.006 and -0.018, docs/ks1d.md)."""
    sc = get_scenario("ks1d", "default")
    c, ref = sc.config, sc.reference_solver()
    u = torch.stack([sc.sample(s)[0] for s in sc.test_seeds[:4]]).double()
    for _ in range(c.warmup):
        u = ref.step(u)
    d = random_states(4, c.n_ref, seed=5)
    w = u + 1e-8 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1)
    growth = torch.zeros(4, dtype=F64)
    frames = round(100 / c.dt)
    for _ in range(frames):
        both = ref.step(torch.cat([u, w]))
        u, w = both[:4], both[4:]
        dist = (w - u).flatten(1).norm(dim=1)
        growth += torch.log(dist / 1e-8)
        w = u + 1e-8 * (w - u) / dist.view(-1, 1, 1)
    rates = growth / (frames * c.dt)
    assert (rates > 0.02).all(), rates
