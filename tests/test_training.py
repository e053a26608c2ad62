"""Rollouts, window losses, the training loop (all methods), resumption, guards, metrics, compare."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from run_checks import assert_same_run

from zosol import zo
from zosol.compare import compare
from zosol.config import train_config
from zosol.datasets import generate, load_dataset
from zosol.evaluation import evaluate
from zosol.metrics import mae_per_frame, mae_per_simulation, summarize
from zosol.rollout import corrected_rollout, window_loss
from zosol.solvers.base import Solver
from zosol.training import CheckpointError, TrainingDiverged, Windows, load_run, make_corrector, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = generate("burgers1d", "tiny", tmp_path_factory.mktemp("data"), progress=False)
    return load_dataset(path)


def _batch(ds, m, n=4):
    w = Windows(ds, m, torch.device("cpu"))
    return w.batch(torch.arange(n))


def _randomized(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def test_window_loss_folded_perturbations_equal_separate_rollouts(tiny):
    """P perturbed parameter sets folded into one solver batch == P separate window losses."""
    cfg = train_config("tiny", method="zo-sol")
    batch = _batch(tiny, 3)
    solver = tiny.scenario.coarse_solver()
    models = [_randomized(make_corrector(tiny, cfg), seed=s) for s in range(3)]

    def forward(x):  # perturbation p uses models[p]
        b = batch.size
        if x.shape[0] == b:
            return torch.cat([m(x) for m in models])
        return torch.cat([m(x[i * b : (i + 1) * b]) for i, m in enumerate(models)])

    folded = window_loss(solver.step, forward, batch, 3)
    separate = torch.stack([window_loss(solver.step, m, batch, 1)[0] for m in models])
    assert folded.shape == (3,)
    torch.testing.assert_close(folded, separate, rtol=1e-5, atol=1e-7)


def test_rollout_shapes_and_batching(tiny):
    traj, params = tiny.stacked("test")
    sc = tiny.scenario
    solver = sc.coarse_solver()
    feats = sc.corrector_features(params)
    model = _randomized(make_corrector(tiny, train_config("tiny")), std=0.05)
    out = corrected_rollout(solver.step, model, traj[:, 0], params, feats, 5)
    assert out.shape == (traj.shape[0], 6, *traj.shape[2:])
    single = torch.cat(
        [
            corrected_rollout(solver.step, model, traj[i : i + 1, 0], params[i : i + 1], feats[i : i + 1], 5)
            for i in range(traj.shape[0])
        ]
    )
    torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-6)
    src = corrected_rollout(solver.step, None, traj[:, 0], params, feats, 5)
    assert not torch.allclose(src, out)


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_zo_gradient_matches_fo_on_window_loss(tiny, model):
    """ZO-SOL's structured CGE (black-box solver only) vs autograd through the solver (FO-SOL),
    for the small CNN and the SOL residual network (the `paper` corrector, here narrow)."""
    cfg = train_config("tiny", method="zo-sol", model=model, depth=2)
    model = _randomized(make_corrector(tiny, cfg), std=0.1)
    batch = _batch(tiny, 3)
    solver = tiny.scenario.coarse_solver()
    bb = solver.blackbox()
    est = zo.cge_structured(
        model,
        lambda f, p: window_loss(bb.step, f, batch, p),
        mu=1e-3,
        scheme="central",
        batch_size=batch.size,
    )
    model.zero_grad()
    window_loss(solver.step, model, batch, 1)[0].backward()
    fo = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    cos = torch.nn.functional.cosine_similarity(est.flat(), fo, dim=0)
    assert cos >= 0.99, cos
    assert est.queries == 2 * fo.numel()


class NumpyBurgers(Solver):
    """The burgers1d coarse solver behind numpy: autograd cannot flow through it."""

    def __init__(self, inner):
        self.inner = inner
        for k in ("dt", "channels", "spatial_shape", "coords", "num_params"):
            setattr(self, k, getattr(inner, k))
        self.differentiable = False

    def _step(self, state, params):
        if state.requires_grad:
            raise RuntimeError("this solver cannot be differentiated")
        x = state.detach().numpy().copy()
        out = self.inner.step(torch.from_numpy(x), params).numpy()
        return torch.from_numpy(np.ascontiguousarray(out))


def test_zo_sol_trains_with_a_solver_that_refuses_autograd(tiny):
    solver = NumpyBurgers(tiny.scenario.coarse_solver())
    cfg = train_config("tiny", method="zo-sol", epochs=3, grad_checks=0)
    result = train(tiny, cfg, progress=False, solver=solver)
    losses = result.history["epoch_loss"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        solver.step(
            torch.zeros(1, *solver.state_shape, requires_grad=True), torch.zeros(1, solver.num_params)
        ).sum().backward()


@pytest.mark.parametrize("method", ["non", "nog-sol", "fo-sol", "zo-sol"])
def test_every_method_lowers_the_training_loss(tiny, method):
    cfg = train_config("tiny", method=method, epochs=3)
    result = train(tiny, cfg, progress=False)
    h = result.history
    assert h["epoch_loss"][-1] < h["epoch_loss"][0]
    assert h["solver_calls"] > 0 or method == "non"
    if method == "zo-sol":
        assert h["grad_cosine_vs_fo"] and all(c["cosine"] >= 0.99 for c in h["grad_cosine_vs_fo"])


def test_resume_equals_uninterrupted(tiny, tmp_path):
    cfg = train_config("tiny", method="zo-sol", epochs=2, zo_sparsity=0.5, zo_lpr="uniform", zo_mask_every=1)
    full = train(tiny, cfg, tmp_path / "full", progress=False)
    part = train(tiny, cfg, tmp_path / "part", progress=False, stop_after_steps=3)
    assert part.extra.get("stopped_early")
    resumed = train(tiny, cfg, tmp_path / "part", progress=False, resume=True)
    assert_same_run(full, resumed)
    model, ckpt = load_run(tmp_path / "part", tiny)
    assert ckpt["epoch"] == 2


def test_resume_refuses_a_checkpoint_of_another_config(tiny, tmp_path):
    cfg = train_config("tiny", method="fo-sol", epochs=1)
    train(tiny, cfg, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="another config"):
        train(tiny, train_config("tiny", method="fo-sol", epochs=1, lr=0.5), tmp_path, resume=True, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        train(tiny, cfg, tmp_path, resume=True, progress=False)


class ExplodingSolver(Solver):
    """Returns NaN after a number of calls."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0
        for k in ("dt", "channels", "spatial_shape", "coords", "num_params"):
            setattr(self, k, getattr(inner, k))

    def _step(self, state, params):
        self.calls += 1
        out = self.inner.step(state, params)
        return out * float("nan") if self.calls > self.after else out


def test_divergence_guard_keeps_last_good_checkpoint(tiny, tmp_path):
    cfg = train_config("tiny", method="nog-sol", epochs=3)
    w = Windows(tiny, cfg.window, torch.device("cpu"))
    steps_per_epoch = math.ceil(len(w.starts) / cfg.batch_size)
    solver = ExplodingSolver(tiny.scenario.coarse_solver(), after=cfg.window * steps_per_epoch + 1)
    with pytest.raises(TrainingDiverged, match="diverged at epoch 1"):
        train(tiny, cfg, tmp_path, progress=False, solver=solver)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_metrics_against_hand_computed_values():
    ref = torch.zeros(2, 3, 1, 2)
    pred = torch.zeros(2, 3, 1, 2)
    pred[0, 0] = 100.0  # the initial frame never counts
    pred[0, 1] = torch.tensor([[1.0, 3.0]])
    pred[1, 2] = torch.tensor([[-2.0, 0.0]])
    assert mae_per_frame(pred, ref).tolist() == [[2.0, 0.0], [0.0, 1.0]]
    assert mae_per_simulation(pred, ref).tolist() == [1.0, 0.5]
    s = summarize([1.0, 0.5])
    assert s["mean"] == 0.75 and s["std"] == 0.25
    with pytest.raises(ValueError, match="shape"):
        mae_per_frame(pred, ref[:, :2])


def test_evaluate_src_is_the_bare_coarse_solver(tiny):
    ev = evaluate(tiny)
    traj, params = tiny.stacked("test")
    solver = tiny.scenario.coarse_solver()
    state, maes = traj[:, 0], []
    for t in range(1, traj.shape[1]):
        state = solver.step(state, params)
        maes.append((state - traj[:, t]).abs().mean(dim=(1, 2)))
    expected = torch.stack(maes, 1).mean(1)
    np.testing.assert_allclose(ev["mae_per_sim"], expected.tolist(), rtol=1e-6)


def test_compare_end_to_end_tiny(tmp_path):
    results = compare("burgers1d", "tiny", tmp_path, progress=False, log=lambda *a: None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["methods"]) == {"SRC", "NON", "NOG-SOL", "FO-SOL", "ZO-SOL", "ZO-JAC-SOL"}
    for name, r in on_disk["methods"].items():
        assert len(r["mae_per_sim"]) == 2 and math.isfinite(r["mae_mean"]), name
        assert {"mae_mean", "mae_std", "wall_time", "solver_calls"} <= set(r)
    assert on_disk["methods"]["ZO-SOL"]["grad_cosine_vs_fo"] and on_disk["methods"]["ZO-JAC-SOL"]["grad_cosine_vs_fo"]
    for f in ("results.md", "results.csv", "frame_mae.png", "test_simulation.png"):
        assert (tmp_path / f).stat().st_size > 0
    # a second call resumes the finished runs instead of retraining
    again = compare("burgers1d", "tiny", tmp_path, progress=False, log=lambda *a: None)
    assert again["methods"]["ZO-SOL"]["mae_per_sim"] == results["methods"]["ZO-SOL"]["mae_per_sim"]


def test_divergence_guard_in_zo_sol(tiny, tmp_path):
    """A NaN in the perturbed rollouts of ZO-SOL stops the run as a divergence, checkpoint intact."""
    cfg = train_config("tiny", method="zo-sol", epochs=3, grad_checks=0)
    counting = ExplodingSolver(tiny.scenario.coarse_solver(), after=10**9)
    train(tiny, train_config("tiny", method="zo-sol", epochs=1, grad_checks=0), progress=False, solver=counting)
    solver = ExplodingSolver(tiny.scenario.coarse_solver(), after=counting.calls + 3)  # NaN early in epoch 2
    with pytest.raises(TrainingDiverged, match="diverged at epoch"):
        train(tiny, cfg, tmp_path, progress=False, solver=solver)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] >= 1


def test_zo_sol_in_two_processes_equals_one(tiny, tmp_path):
    """Perturbation chunks sharded over 2 processes (gloo) give the same training run."""
    cfg = train_config("tiny", method="zo-sol", epochs=2, zo_chunk=16, zo_sparsity=0.5, zo_lpr="uniform")
    one = train(tiny, cfg, tmp_path / "one", progress=False)
    two = train(tiny, cfg, tmp_path / "two", progress=False, workers=2)
    assert_same_run(one, two, "zo_queries")


def test_multiprocess_failure_keeps_its_type(tiny, tmp_path):
    cfg = train_config("tiny", method="zo-sol", epochs=1, window=50)
    with pytest.raises(ValueError, match="window 50 is longer than"):
        train(tiny, cfg, tmp_path, progress=False, workers=2)


def test_training_presets_adapt_to_the_scenario():
    assert train_config("default").kernel == 5
    two_d = train_config("default", "burgers2d", method="zo-sol")
    assert (two_d.kernel, two_d.window, two_d.zo_sparsity) == (3, 2, 0.9)
    assert train_config("default", "burgers2d", window=4).window == 4  # the user's option wins
    assert train_config("default", "burgers1d") == train_config("default")
    with pytest.raises(ValueError, match="unknown scenario"):
        train_config("default", "heat3d")
