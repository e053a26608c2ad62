"""Evaluate correctors on the test simulations and compare the bare coarse solver with every training method.

``compare`` is what ``zosol compare`` runs: it generates missing data, trains every method
(:mod:`zosol.methods`, the registry's order) on
the same data for the same number of epochs (each in ``<out>/runs/<method>``, resumable), rolls
every method out on the test simulations, and writes ``results.json``, ``results.md``,
``results.csv`` and the plots.  Re-running it after an interruption resumes where it stopped.

A method whose training diverges or fails (or whose trained corrector blows up on the test
simulations) is stopped with its last good checkpoint and recorded with ``status`` "diverged"
or "failed" and its ``message``; the other methods still run and the reports are written.  The
output directory is locked while ``compare`` runs (a second process is refused at once).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import TRAIN_PRESETS, TrainConfig, train_config
from .datasets import generate, load_dataset
from .datasets.hdf5 import FidelityDataset, data_option
from .errors import UsageError, ZosolError
from .evaluation import evaluate
from .figures import FieldMeta, animation_path, write_comparison_figures
from .methods import BASELINE, display_name
from .methods import get as get_method
from .methods import names as method_names
from .report import csv_table, markdown_table, write_json
from .runtime.files import atomic_write_text, prepare_directory, real_subdirectory
from .runtime.launch import is_lead, lead_first, world
from .runtime.options import RunOptions
from .runtime.rundir import RunDirectory, directory_lock
from .solvers.base import BlackBox, Scenario, Solver, default_twin, get_scenario, registered, trains_through_autograd
from .training import TrainingDiverged, TrainingError, read_checkpoint, train

__all__ = [
    "compare",
    "runnable_methods",
    "display_name",
    "REPORT_FILES",
    "stopped_methods",
]

#: what ``compare`` writes into its output directory
REPORT_FILES = (
    "results.json",
    "results.md",
    "results.csv",
    "frame_mae.png",
    "test_simulation.png",
    "test_simulation.gif",
    "test_simulation.mp4",
)


def compare(
    scenario: str | Scenario | FidelityDataset,
    preset: str | None = None,
    out: str | os.PathLike = "results",
    *,
    methods: Sequence[str] | None = None,
    solver: Solver | BlackBox | None = None,
    twin: Solver | None = None,
    data_dir: str | os.PathLike | None = None,
    train_preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    scenario_overrides: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    options: RunOptions | None = None,
    animation: str | None = "auto",
    log=print,
) -> dict[str, Any]:
    """Generate data if missing, train ``methods``, evaluate them and SRC, write the reports.

    ``scenario``: a registered name, a scenario object (e.g. from ``make_scenario``) or a loaded dataset;
    ``preset``: the scenario preset (default: "default" for a name, the object's own config for an
    object).  ``methods``: default all registered methods (:func:`zosol.methods.names`) less the scenario's
    ``not_by_default``; methods that cannot run with ``solver`` are left out before any training (each with
    one line saying why).  ``solver``: the coarse solver every method trains and is evaluated with (default:
    the scenario's; e.g. your black box); ``twin``: an optional differentiable twin of it (methods that need
    a differentiable solver train through it; default: the solver itself if differentiable, else the
    scenario's coarse solver if that is).  ``train_preset`` defaults to ``preset`` (or "default");
    ``overrides`` change training options for every method (e.g. ``{"epochs": 5}``); ``scenario_overrides``
    change the scenario config (e.g. ``{"frames": 20}``; the dataset is then named
    ``<scenario>_custom.h5``); ``data_dir``: where the dataset is generated (default ``out/data``), or an
    existing dataset file.  ``options`` (RunOptions) or the keywords ``workers``, ``progress``: the run
    controls; a run already in ``out/runs/<method>`` is resumed.  ``animation``: "auto" (``.mp4`` when ffmpeg
    is on PATH, else ``.gif``), "gif", "mp4" or "none"/None; the figures and animation show every method
    that ran (zosol.figures).

    Returns ``results`` (what ``results.json`` holds): every method's entry has a ``status``, "ok",
    or "diverged" / "failed" with a ``message`` and no scores (its last good checkpoint stays in
    ``out/runs/<method>``)."""
    options = RunOptions.of(options, workers=workers, progress=progress, resume="auto")
    animation_path(".", animation)  # an unknown kind, or MP4 without ffmpeg, fails before any work
    lead = is_lead()  # other ranks of a torchrun launch compute (quietly); rank 0 reports, writes and locks
    log = log if lead else (lambda *a, **k: None)
    configs = _configs(scenario, methods, train_preset or preset, overrides, log)
    out = _output_directory(out) if lead else Path(out)
    with directory_lock(out, f"compare output directory {out}") if lead else contextlib.nullcontext():
        t0 = time.perf_counter()
        dataset = _dataset(scenario, preset, out, data_dir, scenario_overrides, options.progress and lead)
        solver, twin = _solvers(dataset.scenario, solver, twin)
        configs = {m: configs[m] for m in runnable_methods(list(configs), solver, twin, log)}
        log(
            f"dataset {dataset.path} ({len(dataset.train)} train / {len(dataset.test)} test simulations, "
            f"{dataset.frames} frames; {time.perf_counter() - t0:.1f} s)"
        )
        results = _results_head(dataset, generation_time=time.perf_counter() - t0)
        curves = _evaluate_all(dataset, configs, out, results, options, log, solver, twin)
        results["total_time"] = time.perf_counter() - t0
        if lead:
            _write_reports(dataset, _title(dataset, preset, scenario_overrides), out, results, *curves, animation, log)
    return results


def _configs(
    scenario: str | Scenario | FidelityDataset,
    methods: Sequence[str] | None,
    train_preset: str | None,
    overrides: dict[str, Any] | None,
    log,
) -> dict[str, TrainConfig]:
    """Every method's TrainConfig (``methods`` default: :func:`default_methods`) at ``train_preset``,
    default: the scenario object's preset if it names a training preset, else "default"."""
    scenario = scenario.scenario if isinstance(scenario, FidelityDataset) else scenario
    methods = _check_methods(default_methods(scenario, log) if methods is None else methods)
    own = getattr(scenario, "preset", None)
    preset = train_preset or (own if own in TRAIN_PRESETS else "default")
    return {m: train_config(preset, scenario, method=m, **(overrides or {})) for m in methods}


def _results_head(dataset: FidelityDataset, generation_time: float) -> dict[str, Any]:
    """``results`` before any method ran: the scenario, dataset, generation time and launch."""
    return {
        "scenario": dataset.scenario.describe(),
        "dataset": str(dataset.path),
        "generation_time": generation_time,
        "train_config": {},
        "methods": {},
        "launch": dict(zip(("world_size", "backend"), world()[1:])),
    }


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods, known = list(methods), list(method_names())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UsageError(
            f"unknown method(s) {unknown}; choose from the registered methods {known} (a method of your "
            f"own: --plugin MODULE that registers it)"
        )
    if not methods or len(set(methods)) != len(methods):
        raise UsageError(f"methods {methods}: give each of {known} at most once, at least one")
    return methods


def default_methods(scenario: str | Scenario, log=print) -> list[str]:
    """All methods less the scenario's ``not_by_default``, each left out with one line."""
    entry = registered(scenario) if isinstance(scenario, str) else scenario
    skip = getattr(entry, "not_by_default", {})
    for m, why in skip.items():
        log(
            f"{display_name(m)} left out by default on {getattr(entry, 'name', 'this scenario')}: {why} "
            f"(name it in --methods / methods= to run it)"
        )
    return [m for m in method_names() if m not in skip]


def runnable_methods(methods: Sequence[str], solver: Solver | BlackBox, twin: Solver | None, log=print) -> list[str]:
    """``methods`` less those that cannot run with this solver (a method that needs a differentiable
    solver or twin), each left out with one line saying why."""
    differentiable = trains_through_autograd(solver, twin)
    keep = []
    for m in _check_methods(methods):
        if get_method(m).needs == "differentiable" and not differentiable:
            log(
                f"{display_name(m)} left out: it needs autograd through the solver, and "
                f"{getattr(solver, 'name', type(solver).__name__)} is a black box with no differentiable twin "
                f"(pass twin=... in Python or --twin MODULE:OBJECT on the command line to run it)"
            )
            continue
        keep.append(m)
    return keep


def _solvers(sc: Scenario, solver: Solver | BlackBox | None, twin: Solver | None) -> tuple:
    """The black box every method uses (default: the scenario's coarse solver) and its
    differentiable twin (default: the solver if differentiable, else the scenario's coarse solver)."""
    solver = solver if solver is not None else sc.coarse_solver()
    return solver, default_twin(solver, sc, twin)


def _solver_args(solver: Solver | BlackBox, twin: Solver | None, scenario: Scenario) -> dict:
    """train()'s solver/twin arguments: none when they are the scenario's own (so that ``workers``
    processes can rebuild them), else the objects."""
    if solver is scenario.coarse_solver() and twin in (None, solver):
        return {}
    return {"solver": solver, "twin": twin}


def _output_directory(out: str | os.PathLike) -> Path:
    """``out`` created and checked (see prepare_directory); none of the report names a directory."""
    out = prepare_directory(out, "--out")
    for name in REPORT_FILES:
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise UsageError(
                f"{out / name} is a directory, where compare writes a file; remove it or choose another --out"
            )
    return out


def _dataset(
    scenario: str | Scenario | FidelityDataset,
    preset: str | None,
    out: Path,
    data_dir: str | os.PathLike | None,
    scenario_overrides: dict[str, Any] | None,
    progress: bool,
) -> FidelityDataset:
    """The comparison's dataset: given; ``data_dir`` if it is a dataset file; else generated (or
    found) there for the scenario name or object.  The scenario object is the one the dataset
    holds, so its solvers are built once."""
    if isinstance(scenario, FidelityDataset):
        return scenario
    data_dir = data_option(data_dir, str(out / "data"))
    if data_dir is not None and data_dir.is_file():
        if scenario_overrides:
            raise UsageError(
                f"--data {data_dir} is a dataset file: --set cannot change it (leave out --set, "
                f"or give a directory to generate the data in)"
            )
        return load_dataset(data_dir, scenario)
    if isinstance(scenario, str):
        scenario = get_scenario(scenario, preset or "default", **(scenario_overrides or {}))
    elif preset is not None or scenario_overrides:
        scenario = scenario.with_preset(preset or scenario.preset or "default", **(scenario_overrides or {}))
    if scenario_overrides:
        scenario.preset = None
    path = lead_first(
        lambda: generate(
            scenario, out=data_dir if data_dir is not None else real_subdirectory(out, "data"), progress=progress
        )
    )
    return load_dataset(path, scenario=scenario)


def _evaluate_all(
    dataset: FidelityDataset,
    configs: dict[str, Any],
    out: Path,
    results: dict[str, Any],
    options: RunOptions,
    log,
    solver: Solver | BlackBox,
    twin: Solver | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SRC and every method into ``results["methods"]``; returns the per-frame MAE (N, T) and the
    first test simulation's trajectory of every method that finished."""
    src = evaluate(dataset, solver=solver)
    results["methods"][BASELINE] = _scores(src)
    results["methods"][BASELINE].update(
        status="ok", wall_time=0.0, solver_calls=0, solver_samples=0, eval_solver_samples=src["solver_samples"]
    )
    predictions = {"reference": dataset.stacked("test")[0][0].numpy(), BASELINE: src["prediction"][0].numpy()}
    per_frame = {BASELINE: np.asarray(src["per_frame"])}
    log(f"{BASELINE:<8} MAE {src['mae_mean']:.5f} +- {src['mae_std']:.5f}")
    for m, cfg in configs.items():
        name = display_name(m)
        results["train_config"][name] = cfg.to_dict()
        run_dir = real_subdirectory(out, Path("runs") / m) if is_lead() else out / "runs" / m  # resumed if there
        try:
            result = train(dataset, cfg, run_dir, options=options, **_solver_args(solver, twin, dataset.scenario))
            ev = evaluate(dataset, result.model, solver=solver, device=cfg.device)
        except TrainingError as e:
            results["methods"][name] = _stopped_entry(e, cfg, run_dir)
            log(f"{name:<8} {results['methods'][name]['status']}: {e}")
            continue
        results["methods"][name] = _entry(m, cfg, ev, result.history)
        predictions[name] = ev["prediction"][0].numpy()
        per_frame[name] = np.asarray(ev["per_frame"])
        log(f"{name:<8} MAE {ev['mae_mean']:.5f} +- {ev['mae_std']:.5f}  (train {result.history['wall_time']:.1f} s)")
    return per_frame, predictions


def _scores(ev: dict[str, Any]) -> dict[str, Any]:
    """What of evaluate()'s result goes into a method's entry: all but the prediction and the
    evaluation's solver counts (the entry names those ``eval_solver_samples``)."""
    return {k: v for k, v in ev.items() if k not in ("prediction", "solver_calls", "solver_samples")}


def _entry(method: str, cfg: Any, ev: dict[str, Any], h: dict[str, Any]) -> dict[str, Any]:
    """The entry of a method that finished: its scores, training cost and the method's own keys."""
    entry = _scores(ev)
    entry.update(
        status="ok",
        wall_time=h["wall_time"],
        solver_calls=h["solver_calls"],
        solver_samples=h["solver_samples"],
        eval_solver_samples=ev["solver_samples"],
        final_loss=h["epoch_loss"][-1] if h["epoch_loss"] else None,
        parameters=h.get("parameters"),
        epochs=cfg.epochs,
        window=cfg.effective_window,
    )
    own = get_method(method).entry
    if own is not None:
        entry.update(own(h))
    return entry


def _stopped_entry(e: TrainingError, cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The entry of a method that diverged or failed: no scores, its message and how far it got."""
    entry: dict[str, Any] = {
        "status": "diverged" if isinstance(e, TrainingDiverged) else "failed",
        "message": str(e),
        "mae_mean": None,
        "mae_std": None,
        "mae_per_sim": None,
        "epochs": cfg.epochs,
        "window": cfg.effective_window,
        "epochs_done": 0,
        "wall_time": 0.0,
        "solver_samples": 0,
        "checkpoint": None,
    }
    ckpt_path = RunDirectory(run_dir, writer=False).checkpoint
    if is_lead() and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        entry.update(
            epochs_done=ckpt["epoch"],
            wall_time=ckpt["history"]["wall_time"],
            solver_samples=ckpt["history"]["solver_samples"],
            checkpoint=str(ckpt_path),
        )
    return entry


def _title(dataset: FidelityDataset, preset: str | None, scenario_overrides: dict[str, Any] | None) -> str:
    """``scenario (preset)`` or ``scenario (preset with key=value, ...)`` for the reports' titles."""
    what = preset or dataset.scenario.preset or "custom"
    if scenario_overrides:
        what += " with " + ", ".join(f"{k}={v}" for k, v in scenario_overrides.items())
    return f"{dataset.scenario.name} ({what})"


def _write_reports(
    dataset: FidelityDataset,
    title: str,
    out: Path,
    results: dict[str, Any],
    per_frame: dict[str, np.ndarray],
    predictions: dict[str, np.ndarray],
    animation: str | None,
    log,
) -> None:
    """results.json / .md / .csv, then the figures and the animation of every method that ran
    (zosol.figures; what they show goes into ``results["figures"]``), each written atomically.  A
    figure that cannot be drawn costs one line, never the tables."""
    write_json(results, out / "results.json")
    atomic_write_text(out / "results.md", f"# {title}\n\n{markdown_table(results)}")
    atomic_write_text(out / "results.csv", csv_table(results))
    sc = dataset.scenario
    try:
        drawn = write_comparison_figures(
            out, FieldMeta.of(sc.coarse_solver(), sc.name), predictions, per_frame, title, animation, log
        )
    except (ZosolError, ValueError, RuntimeError) as e:  # a figure never costs the tables
        log(f"figures not drawn: {e}")
        return
    if drawn:
        results["figures"] = drawn
        write_json(results, out / "results.json")


def stopped_methods(results: dict[str, Any]) -> dict[str, str]:
    """``{display name: "diverged" | "failed"}`` of the methods that did not finish."""
    return {k: v["status"] for k, v in results["methods"].items() if v.get("status", "ok") != "ok"}
