"""ZO-JAC-SOL training: finite-difference solver Jacobians inside the one training loop."""

from __future__ import annotations

import math

import pytest
import torch
from run_checks import assert_same_run
from test_external import _numpy_coarse

from zosol.config import train_config
from zosol.datasets import load_dataset
from zosol.solvers.base import Solver
from zosol.training import TrainingDiverged, TrainingError, train


@pytest.fixture(scope="module")
def tiny(tiny_h5):
    return load_dataset(tiny_h5)


class Exploding(Solver):
    """The coarse solver, returning NaN for every call after ``after`` calls; counts calls."""

    def __init__(self, inner, after=10**9):
        self.inner, self.after, self.calls = inner, after, 0
        for k in ("dt", "channels", "spatial_shape", "coords", "num_params", "stencil_reach"):
            setattr(self, k, getattr(inner, k))

    def _step(self, state, params):
        self.calls += 1
        out = self.inner.step(state, params)
        return out * float("nan") if self.calls > self.after else out


def test_zo_jac_sol_trains_and_matches_fo_sol_gradients(tiny):
    cfg = train_config("tiny", method="zo-jac-sol", epochs=3, grad_checks=3)
    h = train(tiny, cfg, progress=False).history
    assert h["epoch_loss"][-1] < h["epoch_loss"][0]
    assert len(h["grad_cosine_vs_fo"]) == 3 and all(c["cosine"] >= 0.9999 for c in h["grad_cosine_vs_fo"])
    jac = h["jacobian"]
    assert jac["pattern"]["kind"] == "sparse" and jac["probes_per_sample"] == 8  # 16 cells, reach 1: 4 colours
    assert "ZO-SOL" in h["cost_model"] and "ZO-JAC-SOL 9 " in h["cost_model"]
    assert h["zo_queries"] > 0


def test_zo_jac_sol_same_as_fo_sol_training_in_float32(tiny):
    """Same budget, same seed: ZO-JAC-SOL's loss curve follows FO-SOL's closely."""
    fo = train(tiny, train_config("tiny", method="fo-sol", epochs=2), progress=False).history["loss"]
    zj = train(tiny, train_config("tiny", method="zo-jac-sol", epochs=2, grad_checks=0), progress=False).history["loss"]
    assert zj == pytest.approx(fo, rel=1e-3)


def test_a_numpy_only_black_box_trains(tiny):
    solver = _numpy_coarse(tiny.scenario)
    assert not solver.differentiable and getattr(solver, "stencil_reach", None) is None  # probed pattern
    cfg = train_config("tiny", method="zo-jac-sol", epochs=3, grad_checks=1)
    h = train(tiny, cfg, progress=False, solver=solver).history
    assert all(math.isfinite(v) for v in h["epoch_loss"]) and h["epoch_loss"][-1] < h["epoch_loss"][0]
    assert h["jacobian"]["pattern"]["kind"] == "sparse"
    assert h["grad_cosine_vs_fo"][0]["cosine"] >= 0.999  # against the in-process torch twin


def test_resume_equals_uninterrupted(tiny, tmp_path):
    cfg = train_config("tiny", method="zo-jac-sol", epochs=2, grad_checks=0)
    full = train(tiny, cfg, tmp_path / "full", progress=False)
    part = train(tiny, cfg, tmp_path / "part", progress=False, stop_after_steps=3)
    assert part.extra.get("stopped_early")
    resumed = train(tiny, cfg, tmp_path / "part", progress=False, resume=True)
    assert_same_run(full, resumed, "zo_queries")


def test_divergence_guard(tiny, tmp_path):
    """NaN from the black box (forward or a Jacobian probe) stops the run as a divergence."""
    cfg = train_config("tiny", method="zo-jac-sol", epochs=3, grad_checks=0)
    counting = Exploding(tiny.scenario.coarse_solver())
    train(tiny, train_config("tiny", method="zo-jac-sol", epochs=1, grad_checks=0), progress=False, solver=counting)
    solver = Exploding(tiny.scenario.coarse_solver(), after=counting.calls + 2)  # early in epoch 2
    with pytest.raises(TrainingDiverged, match="diverged at epoch"):
        train(tiny, cfg, tmp_path, progress=False, solver=solver)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] >= 1


def test_a_discontinuous_black_box_stops_with_a_training_error(tiny):
    class Jumpy(Exploding):
        def _step(self, state, params):  # a different sub-step count once a state moves by ~1e-3
            out = self.inner.step(state, params)
            return out + 0.05 * (state.flatten(1).sum(1) * 1e3 % 2 > 1).to(out.dtype).view(-1, 1, 1)

    cfg = train_config("tiny", method="zo-jac-sol", epochs=1, grad_checks=0, jac_pattern="stencil")
    with pytest.raises(TrainingError, match="jumps under perturbations"):
        train(tiny, cfg, progress=False, solver=Jumpy(tiny.scenario.coarse_solver()))


def test_sol_bench_rows():
    from zosol.bench.sol import SolCase, run_sol_bench

    lines = []
    rows = run_sol_bench(
        cases=[SolCase("burgers1d", "tiny", {}, preset="tiny")], repeats=1, budget=64, log=lines.append
    )
    r = rows[0]
    assert r["params"] > 32 and r["zo_sol_extrapolated"] and not r["zo_jac_sol_extrapolated"]
    assert r["evals_zo_jac_sol"] == 1 + 8 * (r["window"] - 1) / r["window"]
    assert r["evals_zo_sol"] == (1 + 2 * r["params"] * (r["window"] - 1)) / r["window"] + 1
    assert all(r[k] > 0 for k in ("fo_sol_s", "zo_jac_sol_s", "zo_sol_s")) and "~" in lines[1]
