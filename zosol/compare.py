"""Evaluate correctors on the test simulations and compare SRC / NON / NOG-SOL / FO-SOL / ZO-SOL.

``compare`` is what ``zosol compare`` runs: it generates missing data, trains every method on
the same data for the same number of epochs (each in ``<out>/runs/<method>``, resumable), rolls
every method out on the test simulations, and writes ``results.json``, ``results.md``,
``results.csv`` and the plots.  Re-running it after an interruption resumes where it stopped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import METHODS, train_config
from .datasets import generate, load_dataset
from .datasets.hdf5 import FidelityDataset
from .metrics import mae_per_frame, mae_per_simulation, nrmse_per_simulation, summarize
from .report import csv_table, markdown_table, plot_frame_errors, plot_side_by_side, write_json
from .rollout import corrected_rollout
from .solvers.base import BlackBox, Solver
from .training import SolverCounter, train
from .training.launch import broadcast_from_lead, is_lead, lead_first, world

__all__ = ["evaluate", "compare", "DISPLAY_NAMES"]

DISPLAY_NAMES = {"src": "SRC", "non": "NON", "nog-sol": "NOG-SOL", "fo-sol": "FO-SOL", "zo-sol": "ZO-SOL"}


def evaluate(dataset: FidelityDataset, model: torch.nn.Module | None = None,
             solver: Solver | BlackBox | None = None, device: str = "cpu") -> dict[str, Any]:
    """Roll out the corrected coarse solver (``model=None``: bare coarse solver, SRC) from frame 0
    of every test simulation and score it against the reference.

    Returns ``mae_mean``, ``mae_std``, ``mae_per_sim`` (N,), ``nrmse_per_sim``, ``per_frame``
    (N, T) MAE, ``solver_calls``, ``solver_samples`` and ``prediction`` (N, T+1, C, *s)."""
    sc = dataset.scenario
    traj, params = dataset.stacked("test")
    traj, params = traj.to(device), params.to(device)
    solver = solver if solver is not None else sc.coarse_solver()
    step = SolverCounter(solver.blackbox().step)
    feats = sc.corrector_features(params)
    p_arg = params if solver.num_params else None
    if model is not None:
        model = model.to(device).eval()
    pred = corrected_rollout(step, model, traj[:, 0], p_arg, feats, traj.shape[1] - 1)
    mae = mae_per_simulation(pred, traj)
    stats = summarize(mae)
    return {"mae_mean": stats["mean"], "mae_std": stats["std"], "mae_per_sim": mae.tolist(),
            "nrmse_per_sim": nrmse_per_simulation(pred, traj).tolist(),
            "per_frame": mae_per_frame(pred, traj).tolist(), "solver_calls": step.calls,
            "solver_samples": step.samples, "prediction": pred.cpu()}


def compare(scenario: str, preset: str = "default", out: str | os.PathLike = "results", *,
            methods: Sequence[str] = METHODS, data_dir: str | os.PathLike | None = None,
            train_preset: str | None = None, overrides: dict[str, Any] | None = None,
            scenario_overrides: dict[str, Any] | None = None, workers: int = 1, progress: bool = True,
            log=print) -> dict[str, Any]:
    """Generate data if missing, train ``methods``, evaluate them and SRC, write the reports.

    ``train_preset`` defaults to ``preset`` (tiny / default / paper); ``overrides`` change
    training options for every method (e.g. ``{"epochs": 5}``); ``scenario_overrides`` change the
    scenario config (e.g. ``{"frames": 20}``; the dataset is then named ``<scenario>_custom.h5``);
    ``workers``: processes that share ZO-SOL's perturbation chunks (same result as one)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    out = Path(out)
    if not is_lead():  # other ranks of a torchrun launch compute, rank 0 reports and writes
        log, progress = (lambda *a, **k: None), False
    else:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = lead_first(lambda: generate(scenario, preset, data_dir if data_dir is not None else out / "data",
                                       progress=progress, overrides=scenario_overrides))
    gen_time = time.perf_counter() - t0
    dataset = load_dataset(path, scenario)
    log(f"dataset {path} ({len(dataset.train)} train / {len(dataset.test)} test simulations, "
        f"{dataset.frames} frames; {gen_time:.1f} s)")
    configs = {m: train_config(train_preset or preset, scenario, method=m, **(overrides or {})) for m in methods}

    results: dict[str, Any] = {"scenario": dataset.scenario.describe(), "dataset": str(path),
                               "generation_time": gen_time, "train_config": {}, "methods": {},
                               "launch": dict(zip(("world_size", "backend"), world()[1:]))}
    src = evaluate(dataset)
    results["methods"]["SRC"] = {k: v for k, v in src.items() if k not in ("prediction", "solver_calls", "solver_samples")}
    results["methods"]["SRC"].update(wall_time=0.0, solver_calls=0, solver_samples=0,
                                     eval_solver_samples=src["solver_samples"])
    predictions = {"reference": dataset.stacked("test")[0][0].numpy(), "SRC": src["prediction"][0].numpy()}
    per_frame = {"SRC": np.asarray(src["per_frame"])}
    log(f"SRC      MAE {src['mae_mean']:.5f} +- {src['mae_std']:.5f}")
    for m in methods:
        cfg = configs[m]
        run_dir = out / "runs" / m  # a run already there (finished or interrupted) is resumed
        resume = broadcast_from_lead(lambda: (run_dir / "checkpoint.pt").exists())
        result = train(dataset, cfg, run_dir, resume=resume, progress=progress,
                       workers=workers)
        ev = evaluate(dataset, result.model, device=cfg.device)
        name = DISPLAY_NAMES[m]
        h = result.history
        entry = {k: v for k, v in ev.items() if k not in ("prediction", "solver_calls", "solver_samples")}
        entry.update(wall_time=h["wall_time"], solver_calls=h["solver_calls"], solver_samples=h["solver_samples"],
                     eval_solver_samples=ev["solver_samples"], final_loss=h["epoch_loss"][-1] if h["epoch_loss"] else None,
                     parameters=h.get("parameters"), epochs=cfg.epochs, window=cfg.effective_window)
        if m == "zo-sol":
            entry.update(grad_cosine_vs_fo=h["grad_cosine_vs_fo"], zo_queries=h["zo_queries"], lprs=h["lprs"])
        results["methods"][name] = entry
        results["train_config"][name] = cfg.to_dict()
        predictions[name] = ev["prediction"][0].numpy()
        per_frame[name] = np.asarray(ev["per_frame"])
        log(f"{name:<8} MAE {ev['mae_mean']:.5f} +- {ev['mae_std']:.5f}  (train {h['wall_time']:.1f} s)")

    results["total_time"] = time.perf_counter() - t0
    if not is_lead():
        return results
    write_json(results, out / "results.json")
    table = markdown_table(results)
    (out / "results.md").write_text(f"# {dataset.scenario.name} ({preset})\n\n{table}")
    (out / "results.csv").write_text(csv_table(results))
    sc = dataset.scenario
    plot_frame_errors(per_frame, sc.coarse_solver().dt, out / "frame_mae.png", f"{sc.name} ({preset}): MAE per frame")
    shown = {k: v for k, v in predictions.items() if k in ("reference", "SRC", "NON", "ZO-SOL", "FO-SOL")}
    plot_side_by_side(shown, out / "test_simulation.png", f"{sc.name} ({preset}): test simulation 0")
    return results
