"""ZO-JAC-SOL with reference-subtracted Jacobians in the training loop (karman2d, 16x8, direct
reference): the cost model's choice, gradient checks, cached references, error-check records,
refreshes replayed on resume, and a poor estimate stopping the run."""

from __future__ import annotations

import pytest
import torch
from run_checks import assert_same_run

from zosol.config import train_config
from zosol.datasets import generate, load_dataset
from zosol.solvers.base import Solver
from zosol.training import TrainingError, train
from zosol.training.checkpoint import read_checkpoint

GRID = dict(reference="direct", n_ref_x=32, n_ref_y=16, n_coarse_x=16, n_coarse_y=8)


@pytest.fixture(scope="module")
def karman(tmp_path_factory):
    path = generate("karman2d", "tiny", tmp_path_factory.mktemp("karman"), progress=False, overrides=GRID)
    return load_dataset(path)


def _cfg(**kw):
    return train_config("tiny", method="zo-jac-sol", **{"epochs": 2, "grad_checks": 0, **kw})


def test_auto_picks_reference_subtracted_and_matches_fo_gradients(karman, tmp_path):
    h = train(karman, _cfg(grad_checks=3, jac_check_every=2), tmp_path / "run", progress=False).history
    jac = h["jacobian"]
    # default global+frames: the dense reference + a field at frames 0 and 5 of the 2 simulations, live reach 1
    assert jac["mode"] == "reference" and jac["probes_per_sample"] == 18 and jac["references"] == 4
    assert jac["setup_seconds"] > 0
    assert "chosen: reference-subtracted (auto)" in h["cost_model"] and "ZO-JAC-SOL 19 " in h["cost_model"]
    assert "sparse coloured - (the pattern is dense)" in h["cost_model"]
    assert all(c["cosine"] >= 0.9999 for c in h["grad_cosine_vs_fo"]) and len(h["grad_cosine_vs_fo"]) == 3
    checks = h["jac_error"]
    assert [c["step"] for c in checks] == list(range(0, len(h["loss"]), 2))
    assert all(c["passed"] and 0 < c["error"] < 0.05 for c in checks)
    cache = tmp_path / "run" / "jacobian-references" / f"{jac['key']}.pt"
    assert cache.is_file() and not jac["cached"]
    # a second run next to it reads the cached references instead of probing them again
    again = train(karman, _cfg(grad_checks=3, jac_check_every=2), tmp_path / "run", progress=False).history
    assert again["jacobian"]["cached"] and again["zo_queries"] == h["zo_queries"] - jac["setup_evaluations"]
    assert again["loss"] == h["loss"]


def test_forced_modes_and_per_frame_references(karman):
    dense = train(karman, _cfg(epochs=1, jac_mode="dense"), progress=False).history
    assert dense["jacobian"]["mode"] == "dense" and "forced by jac_mode" in dense["cost_model"]
    frame = train(karman, _cfg(epochs=1, jac_references="frame", jac_ref_stride=2, grad_checks=1), progress=False)
    h = frame.history
    assert h["jacobian"]["references"] == 2 * 5  # 2 simulations x frames 0, 2, 4, 6, 8
    assert h["grad_cosine_vs_fo"][0]["cosine"] >= 0.9999
    assert h["loss"] == pytest.approx(dense["loss"], rel=1e-3)
    one = train(karman, _cfg(epochs=1, jac_references="global", grad_checks=1), progress=False).history
    assert one["jacobian"]["references"] == 1 and one["jacobian"]["probes_per_sample"] == 50  # live reach 2
    assert one["grad_cosine_vs_fo"][0]["cosine"] >= 0.9999
    strided = train(karman, _cfg(epochs=1, jac_ref_stride=4, jac_frame_reach=2, grad_checks=1), progress=False)
    assert strided.history["jacobian"]["references"] == 2 * 3  # frames 0, 4, 8 of each simulation
    assert strided.history["grad_cosine_vs_fo"][0]["cosine"] >= 0.9999


def test_resume_with_refreshes_equals_uninterrupted(karman, tmp_path):
    """batch 1, a tight tolerance: the check refreshes the reference (at the window's state) every
    few steps; a resumed run replays the refreshes its checkpoint saw and continues identically."""
    cfg = _cfg(
        batch_size=1, jac_mode="reference", jac_references="global", jac_reach=1, jac_tol=5e-3, jac_check_every=3,
        jac_max_reach=1,
    )  # fmt: skip
    full = train(karman, cfg, tmp_path / "full", progress=False)
    assert full.history["jacobian"]["refreshes"] >= 2
    part = train(karman, cfg, tmp_path / "part", progress=False, stop_after_steps=7)
    assert 0 < part.history["jacobian"]["refreshes"] < full.history["jacobian"]["refreshes"]
    resumed = train(karman, cfg, tmp_path / "part", progress=False, resume=True)
    assert_same_run(full, resumed, "zo_queries", "jac_error")
    timeless = [{k: v for k, v in r.history["jacobian"].items() if k != "setup_seconds"} for r in (full, resumed)]
    assert timeless[0] == timeless[1]


def test_auto_rejects_the_reference_estimate_where_the_jacobian_changes_everywhere(tmp_path):
    """ks1d's spectral step: J(x) - J_ref is not local, the up-front check one step from the probed frames
    says so (widening the reach does not help), and the cost model falls back to the dense Jacobian."""
    ks = load_dataset(generate("ks1d", "tiny", tmp_path, progress=False))
    h = train(ks, _cfg(epochs=1, grad_checks=1), progress=False).history
    assert h["jacobian"]["mode"] == "dense" and "chosen: dense (auto)" in h["cost_model"]
    assert "reference-subtracted estimate rejected" in h["jacobian"]["reference_check"]
    assert "reference-subtracted estimate rejected" in h["cost_model"]
    assert h["grad_cosine_vs_fo"][0]["cosine"] >= 0.9999


def test_auto_keeps_the_reference_estimate_that_passes_its_check(karman):
    h = train(karman, _cfg(epochs=1), progress=False).history
    assert h["jacobian"]["mode"] == "reference" and h["jacobian"]["reference_check"].startswith("J v error")


class Drifting(Solver):
    """The coarse step, plus (after ``after`` calls) a dense state-dependent term: J(x) - J_ref is
    no longer local, so no reach can capture it."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.calls = inner, after, 0
        for k in ("dt", "channels", "spatial_shape", "coords", "num_params"):
            setattr(self, k, getattr(inner, k))
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(inner.state_shape, generator=g)

    def _step(self, state, params):
        self.calls += 1
        out = self.inner.step(state, params)
        if self.calls <= self.after:
            return out
        s = (state * self.w).flatten(1).sum(1)
        return out + getattr(self, "amp", 0.05) * s.view(-1, 1, 1, 1) ** 2 * self.w


def test_a_poor_estimate_stops_the_run_keeping_the_checkpoint(karman, tmp_path):
    cfg = _cfg(jac_check_every=1, jac_max_reach=2)
    first = Drifting(karman.scenario.coarse_solver(), after=10**9)
    train(karman, _cfg(epochs=1, jac_check_every=1, jac_max_reach=2), progress=False, solver=first)
    solver = Drifting(karman.scenario.coarse_solver(), after=first.calls + 1)  # early in epoch 2
    with pytest.raises(TrainingError, match="stays poor") as err:
        train(karman, cfg, tmp_path / "run", progress=False, solver=solver, twin=karman.scenario.coarse_solver())
    assert "\n" not in str(err.value) and "checkpoint is kept" in str(err.value)
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"] == 0  # the end of epoch 1, before the estimate went bad


@pytest.mark.slow
def test_sol_bench_times_the_reference_subtracted_estimate_on_karman2d():
    from zosol.bench.sol import SolCase, run_sol_bench

    lines = []
    case = SolCase("karman2d", "tiny", {}, preset="tiny")
    r = run_sol_bench(cases=[case], repeats=1, budget=64, log=lines.append)[0]
    assert r["jacobian"].startswith("reference-subtracted") and r["reference_setup_s"] > 0
    assert r["evals_zo_jac_sol"] == 1 + 18 * (r["window"] - 1) / r["window"] and not r["zo_jac_sol_extrapolated"]
    assert "the difference at" in r["jacobian"]  # the frame fields, as training builds them
    assert "references" in lines[1]


def test_resume_with_frame_fields_equals_uninterrupted(karman, tmp_path):
    """The default (global+frames) with run-time checks: a resumed run reads the cached fields and
    continues exactly as the uninterrupted one."""
    cfg = _cfg(batch_size=2, jac_check_every=2)
    full = train(karman, cfg, tmp_path / "full", progress=False)
    part = train(karman, cfg, tmp_path / "part", progress=False, stop_after_steps=3)
    resumed = train(karman, cfg, tmp_path / "part", progress=False, resume=True)
    assert_same_run(full, resumed, "zo_queries", "jac_error")
    assert part.history["jacobian"]["references"] == resumed.history["jacobian"]["references"] == 4


def test_references_that_do_not_fit_memory_are_refused_naming_the_fix(karman, monkeypatch):
    import zosol.methods.jacobians as jacobians

    monkeypatch.setattr(jacobians, "available_memory", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(ValueError, match=r"4 frame fields \(global\+frames\) need .* jac_ref_stride"):
        train(karman, _cfg(epochs=1), progress=False)


def test_two_processes_read_cached_references_and_train_as_one(karman, tmp_path):
    """--workers 2: references read from the cache by rank 0 are sent to rank 1 as plain tensors (a
    References object does not load with weights_only=True), references probed by both ranks
    together agree; either run equals the one-process run."""
    import shutil

    cfg = _cfg(epochs=1)
    one = train(karman, cfg, tmp_path / "one", progress=False)
    shutil.copytree(tmp_path / "one" / "jacobian-references", tmp_path / "two" / "jacobian-references")
    two = train(karman, cfg, tmp_path / "two", progress=False, workers=2)
    assert two.history["jacobian"]["cached"] and not one.history["jacobian"]["cached"]
    assert two.history["loss"] == pytest.approx(one.history["loss"], rel=1e-5)
    probed = train(karman, cfg, tmp_path / "probed", progress=False, workers=2)  # probes shared by the ranks
    assert not probed.history["jacobian"]["cached"]
    assert probed.history["loss"] == pytest.approx(one.history["loss"], rel=1e-5)
