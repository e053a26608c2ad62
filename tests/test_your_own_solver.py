"""The path of a new user with their own solver (issue 22, part 2): read-only arrays from a JAX-like
solver, float64 black boxes, a differentiable twin without private names, and the documented
output of docs/your_own_solver.md."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from zosol.datasets.generate import simulate_reference
from zosol.solvers import Solver, TorchSolver, make_scenario

N_FINE, N_COARSE, DT, NU = 32, 8, 0.05, 0.1


def _heat_np(n: int, seen: list | None = None, readonly: bool = False):
    """Batched periodic heat step on numpy arrays (B, 1, n); records the dtypes it gets."""
    h = 2 * np.pi / n

    def step(u, p):
        if seen is not None:
            seen.append(u.dtype)
        out = u + DT * NU * (np.roll(u, 1, -1) - 2 * u + np.roll(u, -1, -1)) / h**2 * 0.1
        if readonly:  # as np.asarray(jax_array) gives it
            out.flags.writeable = False
        return out

    return step


def _sample(readonly: bool = False):
    def sample(seed):
        rng = np.random.default_rng(seed)
        x = (np.arange(N_FINE) + 0.5) * 2 * np.pi / N_FINE
        u = np.sin(x + rng.uniform(0, 6.3))[None]
        p = rng.uniform(0.5, 1.0, size=1)
        if readonly:
            u.flags.writeable = p.flags.writeable = False
        return u, p

    return sample


def _scenario(readonly: bool = False, seen: list | None = None, **kw):
    return make_scenario(
        "user_path_heat",
        reference=_heat_np(N_FINE, seen, readonly),
        coarse=_heat_np(N_COARSE, seen, readonly),
        sample=_sample(readonly),
        dt=DT,
        reference_shape=(N_FINE,),
        coarse_shape=(N_COARSE,),
        num_params=1,
        frames=3,
        train_sims=2,
        test_sims=1,
        **kw,
    )


def test_read_only_arrays_from_the_users_solver_give_no_warning():
    """``sample`` and the steps returning read-only arrays (``np.asarray`` of a JAX array): no torch
    "not writable" UserWarning, and the tensors zosol keeps do not share the read-only memory."""
    sc = _scenario(readonly=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u, p = sc.sample(0)
        traj, params = simulate_reference(sc, [0, 1])
        nxt = sc.coarse_solver().step(traj[:, 0], params)
    u.add_(1.0)  # writable, a copy
    assert traj.shape == (2, 4, 1, N_COARSE) and torch.isfinite(nxt).all()
    assert u.dtype == torch.float32 and p.shape == (1,)


def test_make_scenario_dtype_float64_reaches_the_steps_and_the_reference():
    seen: list = []
    sc64 = _scenario(seen=seen, dtype="float64")
    u, p = sc64.sample(0)
    assert u.dtype == p.dtype == torch.float64
    traj64, _ = simulate_reference(sc64, [0])
    assert seen and set(seen) == {np.dtype(np.float64)}
    assert traj64.dtype == torch.float32  # datasets store float32
    seen.clear()
    sc32 = _scenario(seen=seen)  # default: float32 as before
    traj32, _ = simulate_reference(sc32, [0])
    assert set(seen) == {np.dtype(np.float32)}
    # the float64 reference is the float64 numpy loop rounded once to float32
    state, params = _sample()(0)
    step = _heat_np(N_FINE)
    frames = [state]
    for _ in range(3):
        frames.append(step(frames[-1], params[None]))
    exact = np.stack([f.reshape(1, N_COARSE, -1).mean(-1) for f in frames])[None]
    np.testing.assert_array_equal(traj64.numpy(), exact.astype(np.float32))
    assert np.abs(traj32.numpy() - exact).max() < 1e-6
    sc64.coarse_solver().step(traj64[:, 0], torch.ones(1, 1))  # a float32 state goes in as float64
    assert seen[-1] == np.float64
    assert sc64.coarse_solver().step(traj64[:, 0], torch.ones(1, 1)).dtype == torch.float32
    assert _scenario(dtype=torch.float64).sample(0)[0].dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        _scenario(dtype="float16")


def test_torch_solver_is_a_differentiable_twin_of_the_black_box():
    """A differentiable twin written as a torch function, with no subclass and no private name."""
    h = 2 * np.pi / N_COARSE

    def heat(u, params):
        return u + DT * NU * (u.roll(1, -1) - 2 * u + u.roll(-1, -1)) / h**2 * 0.1

    twin = TorchSolver(heat, dt=DT, channels=("u",), spatial_shape=(N_COARSE,), num_params=1)
    assert isinstance(twin, Solver) and twin.differentiable and twin.name == "heat"
    sc = _scenario()
    u = torch.randn(3, 1, N_COARSE)
    p = torch.ones(3, 1)
    torch.testing.assert_close(twin.step(u, p), sc.coarse_solver().step(u, p))
    x = u.double().requires_grad_()
    torch.autograd.gradcheck(lambda s: twin.step(s, p.double()), (x,))
    from zosol.compare import runnable_methods

    lines: list[str] = []
    assert "fo-sol" in runnable_methods(["fo-sol", "zo-sol"], sc.coarse_solver().blackbox(), twin, lines.append)
    assert not lines
    bad = TorchSolver(lambda s, q: s[..., :-1], dt=DT, channels=("u",), spatial_shape=(N_COARSE,))
    with pytest.raises(ValueError, match=r"fn returned shape \[3, 1, 7\], expected a tensor of shape \[3, 1, 8\]"):
        bad.step(u)


# A stand-in for py-pde with the few names the doc's example uses (plain numpy, no numba compile):
# the documented lines are about zosol's output, not py-pde's numbers.
PDE_STUB = '''
import types
import numpy as np

class CartesianGrid:
    def __init__(self, bounds, shape, periodic=True):
        self.shape = tuple(shape)

class ScalarField:
    def __init__(self, grid):
        self.data = np.zeros(grid.shape)

class PDE:
    def __init__(self, rhs):
        self.rhs = rhs

class _Solver:
    def __init__(self, eq):
        self.eq = eq
    def make_stepper(self, field, dt):
        def stepper(f, t, duration):
            for _ in range(int(round(duration / dt))):
                f.data[:] = f.data + 0.1 * (np.roll(f.data, 1) - 2 * f.data + np.roll(f.data, -1))
            return t + duration
        return stepper

solvers = types.SimpleNamespace(RungeKuttaSolver=_Solver, EulerSolver=_Solver)
'''

# runs the doc's `python my_burgers.py` with compare() cut to NON (and FO-SOL, which it leaves out), one epoch
RUN_DOC_EXAMPLE = '''
import runpy, sys
import zosol, zosol.compare
c = sys.modules["zosol.compare"]  # the module (zosol.compare is the function)
full = c.compare
cut = {"methods": ["non", "fo-sol"], "overrides": {"epochs": 1}, "progress": False}
c.compare = zosol.compare = lambda *a, **k: full(*a, **{**k, **cut})
sys.argv = ["my_burgers.py"]
runpy.run_path("src/my_burgers.py", run_name="__main__")
'''


def _documented_output_lines(text: str) -> list[str]:
    """The lines of every fenced block without a language (output, not code) of a Markdown page."""
    blocks = text.split("```")[1::2]
    return [ln for b in blocks if b.startswith("\n") for ln in b.splitlines() if ln.strip()]


def test_documented_output_lines_are_what_the_example_prints(tmp_path):
    """Every output line docs/your_own_solver.md shows is printed by its own example (issue 22 item 8:
    the doc showed another file's solver name)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "your_own_solver.md").read_text()
    documented = _documented_output_lines(text)
    assert any("left out" in ln for ln in documented) and any(ln.startswith("zosol: error:") for ln in documented)
    code = text.split("## The whole example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "my_burgers.py").write_text(code)
    (tmp_path / "src" / "pde.py").write_text(PDE_STUB)
    (tmp_path / "bin").mkdir()  # a console script: the current folder is not on sys.path
    (tmp_path / "bin" / "zosol_cli.py").write_text("from zosol.cli import main\nraise SystemExit(main())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", RUN_DOC_EXAMPLE],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(root)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "results_my_burgers" / "data" / "my_burgers_default.h5").is_file()
    info = subprocess.run(  # the module is not importable here: the documented error
        [
            sys.executable,
            str(tmp_path / "bin" / "zosol_cli.py"),
            "info",
            "results_my_burgers/data/my_burgers_default.h5",
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 2
    printed = set((run.stdout + run.stderr + info.stdout + info.stderr).splitlines())
    missing = [ln for ln in documented if ln not in printed]
    assert not missing, f"documented but not printed: {missing}\nprinted: {sorted(printed)}"
