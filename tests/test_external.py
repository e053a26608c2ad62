"""External-process and numpy black-box solvers (zosol/solvers/external.py, solvers/burgers1d_numpy.py).

The external program is ``solvers/burgers1d_numpy.py``: the burgers1d coarse solver in
plain numpy behind the frame protocol of ``docs/external_solvers.md``.  Its float32 numerics
follow the torch code op by op; the only differences are 1-ulp differences of float32 sin/cos
(numpy vs torch) in the static forcing, so single steps agree to ~1e-7 and ZO-SOL training
agrees to a tolerance set by how CGE (1 / 2 mu) and Adam amplify such differences.  Runs of the
same numpy code in-process (NumpySolver) and out of process (ExternalSolver) agree bit for bit.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from zosol.config import train_config
from zosol.datasets import load_dataset
from zosol.evaluation import evaluate
from zosol.solvers.base import BlackBox, SolverError
from zosol.solvers.burgers1d import Burgers1DScenario
from zosol.solvers.external import ExternalSolver, NotDifferentiableError, NumpySolver
from zosol.training import TrainingError, load_run, train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "solvers" / "burgers1d_numpy.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("external_burgers1d", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ext_mod = _load_script()


def _cmd(sc: Burgers1DScenario, *extra: str) -> list[str]:
    c = sc.config
    return [
        sys.executable,
        str(SCRIPT),
        "--n",
        str(c.n_coarse),
        "--nu",
        repr(c.nu),
        "--dt",
        repr(c.dt),
        "--length",
        repr(c.length),
        "--forcing-modes",
        str(c.forcing_modes),
        "--u-max",
        repr(c.u_max),
        "--cfl",
        "0.9",
        *extra,
    ]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def tiny(tiny_h5):
    return load_dataset(tiny_h5)


@pytest.fixture(scope="module")
def sc(tiny) -> Burgers1DScenario:
    return tiny.scenario


@pytest.fixture(scope="module")
def ext(sc):
    with ExternalSolver(_cmd(sc), timeout=30) as solver:
        yield solver


def _cfg(epochs: int = 1, **kw):
    return train_config("tiny", method="zo-sol", epochs=epochs, **kw)


def _numpy_coarse(sc: Burgers1DScenario) -> NumpySolver:
    c = sc.config
    core = ext_mod.CoarseBurgers1D(
        c.n_coarse, c.nu, c.dt, c.length, cfl=0.9, forcing_modes=c.forcing_modes, u_max=c.u_max
    )
    return NumpySolver(
        core.step,
        dt=c.dt,
        channels=("u",),
        spatial_shape=(c.n_coarse,),
        num_params=core.num_params,
        coords={"x": core.x()},
        name="burgers1d-numpy",
    )


def _assert_same_model(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k}: max diff {(sa[k] - sb[k]).abs().max():.3g}"


# -- the external step equals the in-process coarse step -----------------------------------------


def test_handshake_reports_the_coarse_solvers_metadata(sc, ext):
    ref = Burgers1DScenario.from_preset("tiny").coarse_solver()
    assert ext.dt == ref.dt and ext.channels == ref.channels and ext.spatial_shape == ref.spatial_shape
    assert ext.num_params == ref.num_params == 2 * sc.config.forcing_modes
    torch.testing.assert_close(ext.coords["x"], ref.coords["x"])
    assert ext.differentiable is False and ext.alive and ext.metadata["config"]["n"] == sc.config.n_coarse


@pytest.mark.parametrize("batch", [1, 64])
def test_external_step_equals_inprocess_step(sc, ext, batch):
    ref = Burgers1DScenario.from_preset("tiny").coarse_solver()
    g = torch.Generator().manual_seed(batch)
    u = 0.8 * torch.randn(batch, 1, sc.config.n_coarse, generator=g)
    p = 0.3 * torch.randn(batch, ref.num_params, generator=g)
    if batch > 1:
        u[1] *= 6.0  # faster than u_max: more sub-steps than the others (masked path)
    want, got = ref.step(u, p), ext.step(u, p)
    assert got.dtype == u.dtype and got.shape == u.shape
    # float32: identical op order; only float32 sin/cos of the forcing differ by an ulp (numpy vs torch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # a 10-step rollout stays within float tolerance too
    a, b = u, u
    for _ in range(10):
        a, b = ref.step(a, p), ext.step(b, p)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)
    # float64 on the wire: the result comes back in the caller's dtype
    u64 = u.double()
    torch.testing.assert_close(
        ext.step(u64, p.double()), ref.step(u64, p.double()), rtol=1e-5, atol=1e-6, check_dtype=True
    )


def test_server_needs_neither_zosol_nor_torch(sc):
    block = (
        "import sys, runpy; sys.modules['zosol'] = None; sys.modules['torch'] = None; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    cmd = _cmd(sc)
    with ExternalSolver([cmd[0], "-c", block, *cmd[1:]], timeout=30) as solver:
        u = torch.zeros(2, 1, sc.config.n_coarse)
        assert torch.isfinite(solver.step(u, torch.ones(2, solver.num_params))).all()


def test_not_differentiable_but_blackbox_works(sc, ext):
    u = torch.randn(3, 1, sc.config.n_coarse, requires_grad=True)
    p = torch.zeros(3, ext.num_params)
    with pytest.raises(NotDifferentiableError, match="not differentiable"):
        ext.step(u, p)
    bb = ext.blackbox()
    assert isinstance(bb, BlackBox) and bb.dt == ext.dt and not bb.differentiable
    out = bb.step(u, p)
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ext.step(u, p), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected"):
        ext.step(torch.zeros(2, 1, 5), p[:2])  # check_state before anything is sent


# -- ZO-SOL trains through the external process ----------------------------------------------------


def test_zo_sol_external_matches_inprocess(tiny, sc, ext):
    cfg = _cfg(1)
    inproc = train(tiny, cfg, progress=False)
    calls = ext.calls
    outside = train(tiny, cfg, progress=False, solver=ext)
    assert ext.calls - calls == 20  # 5 optimizer steps x (2 CGE + 2 loss) window-2 solver calls
    # Same loss curve and model up to float tolerance: the forcing's 1-ulp sin/cos differences are
    # amplified by CGE's 1/(2 mu) and by Adam's per-coordinate normalisation; 1e-4 is 5% of one
    # Adam step (lr 2e-3), the observed difference is ~2e-5.
    np.testing.assert_allclose(outside.history["loss"], inproc.history["loss"], rtol=1e-5)
    for k, v in inproc.model.state_dict().items():
        torch.testing.assert_close(outside.model.state_dict()[k], v, rtol=0, atol=1e-4)
    mae_in, mae_out = evaluate(tiny, inproc.model)["mae_mean"], evaluate(tiny, outside.model)["mae_mean"]
    assert mae_out == pytest.approx(mae_in, rel=1e-5)
    # the test MAE with the external process as the coarse solver, too
    assert evaluate(tiny, outside.model, solver=ext)["mae_mean"] == pytest.approx(mae_out, rel=1e-5)


def test_external_process_is_bitwise_the_same_as_its_numpy_code_in_process(tiny, sc, ext):
    """The protocol adds no numerical change: ExternalSolver == NumpySolver of the same code."""
    cfg = _cfg(1)
    a = train(tiny, cfg, progress=False, solver=ext)
    b = train(tiny, cfg, progress=False, solver=_numpy_coarse(sc))
    _assert_same_model(a.model, b.model)
    assert a.history["loss"] == b.history["loss"]


# -- faults during training: clear error, checkpoint intact, resume reproduces the clean run -------


@pytest.fixture(scope="module")
def clean_two_epochs(tiny, sc, ext):
    return train(tiny, _cfg(2), progress=False, solver=ext).model.state_dict()


# 20 solver calls per epoch: a fault after 25 calls strikes in the second epoch
FAULTS = {
    "crash": (["--crash-after", "25"], 30.0, r"crashed.*exit code 3.*stderr tail:.*injected crash in step call 26"),
    "hang": (["--hang-after", "25"], 1.5, r"timeout after 1.5 s with no reply \(process killed\)"),
    "nan": (["--nan-after", "25"], 30.0, r"non-finite values \(NaN/inf\)"),
    "bad_shape": (["--bad-shape-after", "25"], 30.0, r"returned shape \[\d+, 1, 15\], expected \[\d+, 1, 16\]"),
    "garbage": (["--garbage-after", "25"], 30.0, r"garbage output"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_mid_training_then_resume(tiny, sc, clean_two_epochs, tmp_path, fault):
    flags, timeout, pattern = FAULTS[fault]
    run = tmp_path / "run"
    cfg = _cfg(2)
    bad = ExternalSolver(_cmd(sc, *flags), timeout=timeout)
    pid = bad.pid
    t0 = time.perf_counter()
    with pytest.raises(TrainingError, match="coarse solver failed at epoch 1") as info:
        train(tiny, cfg, run, progress=False, solver=bad)
    assert isinstance(info.value.__cause__, SolverError)
    assert re.search(pattern, str(info.value), re.S), str(info.value)
    if fault == "hang":
        assert time.perf_counter() - t0 < 30 and _gone(pid) and not bad.alive
    if fault in ("crash", "hang", "garbage"):
        assert not bad.alive
    bad.close()
    # the checkpoint of the finished epoch is intact and loadable
    model, ckpt = load_run(run, tiny)
    assert ckpt["epoch"] == 1 and ckpt["position"] == 0 and len(ckpt["history"]["epoch_loss"]) == 1
    # resuming with a healthy external solver finishes exactly as an uninterrupted run
    with ExternalSolver(_cmd(sc), timeout=30) as good:
        resumed = train(tiny, cfg, run, resume=True, progress=False, solver=good)
    _assert_same_model(resumed.model, clean_two_epochs)


def test_restart_recovers_a_crash_and_reruns_the_call(tiny, sc, clean_two_epochs):
    with ExternalSolver(_cmd(sc, "--crash-after", "30"), timeout=30, restart=True, max_restarts=2) as solver:
        first = solver.pid
        res = train(tiny, _cfg(2), progress=False, solver=solver)
        assert solver.restarts == 1 and solver.pid != first and _gone(first)
    _assert_same_model(res.model, clean_two_epochs)


def test_restart_limit_and_rerun_failure(sc):
    u, p = torch.zeros(2, 1, sc.config.n_coarse), torch.zeros(2, 2 * sc.config.forcing_modes)
    with ExternalSolver(_cmd(sc, "--crash-after", "0"), timeout=30, restart=True, max_restarts=1) as solver:
        with pytest.raises(SolverError, match="re-run after a restart failed too"):
            solver.step(u, p)
        assert solver.restarts == 1
        with pytest.raises(SolverError, match="not running"):
            solver.step(u, p)


def test_error_reply_keeps_the_process(sc):
    u, p = torch.zeros(2, 1, sc.config.n_coarse), torch.zeros(2, 2 * sc.config.forcing_modes)
    with ExternalSolver(_cmd(sc, "--error-after", "1"), timeout=30, restart=True) as solver:
        solver.step(u, p)
        with pytest.raises(SolverError, match="refused step .*injected error in step call 2"):
            solver.step(u, p)
        assert solver.alive and solver.restarts == 0


def test_fault_injection_via_environment(sc):
    u, p = torch.zeros(2, 1, sc.config.n_coarse), torch.zeros(2, 2 * sc.config.forcing_modes)
    with ExternalSolver(_cmd(sc), timeout=30, env={"ZOSOL_FAULT": "nan-after=0"}) as solver:
        with pytest.raises(SolverError, match="non-finite"):
            solver.step(u, p)
        # NaN in, NaN out is the solver's business (the divergence guard's), not a fault
        bad = u.clone()
        bad[0, 0, 0] = float("nan")
        with pytest.raises(SolverError, match="1 of 2 samples"):
            solver.step(bad, p)


def test_start_failures_name_the_cause(tmp_path):
    with pytest.raises(SolverError, match="cannot start"):
        ExternalSolver([str(tmp_path / "no-such-solver")])
    dying = [sys.executable, "-c", "import sys; sys.stderr.write('solver: licence file missing\\n'); sys.exit(2)"]
    with pytest.raises(SolverError, match=r"(?s)hello.*exit code 2.*licence file missing"):
        ExternalSolver(dying, timeout=5)
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(SolverError, match="timeout after 0.5 s"):
        ExternalSolver(silent, startup_timeout=0.5)
    wrong = [sys.executable, str(SCRIPT), "--n", "16"]
    with pytest.raises(SolverError, match="reports dt=0.05, expected 0.1"):
        ExternalSolver(wrong, expect={"dt": 0.1})


def test_close_context_manager_and_garbage_collection(sc):
    with ExternalSolver(_cmd(sc), timeout=30) as solver:
        pid = solver.pid
        assert solver.alive
    assert not solver.alive and _gone(pid)
    solver.close()  # idempotent
    with pytest.raises(SolverError, match="not running \\(the solver was closed\\)"):
        solver.step(torch.zeros(1, 1, sc.config.n_coarse), torch.zeros(1, 2 * sc.config.forcing_modes))
    forgotten = ExternalSolver(_cmd(sc), timeout=30)
    pid = forgotten.pid
    del forgotten
    gc.collect()
    assert _gone(pid)


# -- NumpySolver ---------------------------------------------------------------------------------


def test_numpy_solver_validates_and_refuses_autograd(sc):
    ref = sc.coarse_solver()
    solver = _numpy_coarse(sc)
    assert solver.differentiable is False
    g = torch.Generator().manual_seed(3)
    u = 0.8 * torch.randn(8, 1, sc.config.n_coarse, generator=g)
    p = 0.3 * torch.randn(8, solver.num_params, generator=g)
    torch.testing.assert_close(solver.step(u, p), ref.step(u, p), rtol=1e-6, atol=1e-6)
    with pytest.raises(NotDifferentiableError):
        solver.step(u.requires_grad_(), p)
    u = u.detach()
    assert not solver.blackbox().step(u.requires_grad_(), p).requires_grad
    u = u.detach()
    shape = dict(dt=0.1, channels=("u",), spatial_shape=(16,))
    with pytest.raises(SolverError, match=r"returned shape \[8, 1, 15\]"):
        NumpySolver(lambda s, q: s[..., 1:], **shape).step(u)
    with pytest.raises(SolverError, match="non-finite"):
        NumpySolver(lambda s, q: s * np.nan, **shape).step(u)
    with pytest.raises(ZeroDivisionError):  # a bug in the step function: raised as it is (traceback)
        NumpySolver(lambda s, q: 1 / 0, **shape).step(u)
    with pytest.raises(SolverError, match="returned list"):
        NumpySolver(lambda s, q: s.tolist(), **shape).step(u)


def test_zo_sol_trains_with_a_numpy_solver(tiny, sc):
    res = train(tiny, _cfg(3), progress=False, solver=_numpy_coarse(sc))
    ep = res.history["epoch_loss"]
    assert len(ep) == 3 and ep[-1] < ep[0] and ep[1] < ep[0]
    assert res.history["zo_queries"] > 0


# -- overhead bench (smoke) ------------------------------------------------------------------------


def test_bench_prints_the_overhead_table(capsys):
    args = argparse.Namespace(n=16, nu=0.02, dt=0.05, length=2 * np.pi, forcing_modes=3, u_max=2.0, cfl=0.9)
    rows = ext_mod.bench(args, sizes=(1, 64), repeats=2)
    assert [r["batch"] for r in rows] == [1, 64] and all(r["external_ms"] > 0 for r in rows)
    assert "| batch |" in capsys.readouterr().out
