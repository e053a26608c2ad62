"""Generate fidelity datasets: run the reference solver, downsample every frame, write HDF5.

Generation is resumable: each finished simulation is saved atomically to
``<out>/<name>.h5.parts/<split>_<seed>.npz``; an interrupted run (even ``kill -9``) picks up
from there, and the final ``.h5`` appears (by rename) only once everything is done.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from ..solvers.base import Scenario, get_scenario
from .hdf5 import Simulation, write_dataset

__all__ = ["dataset_path", "generate", "simulate_reference"]


def dataset_path(out_dir: str | os.PathLike, scenario: Scenario) -> Path:
    """``<out_dir>/<scenario>_<preset>.h5`` (preset 'custom' when config overrides were given)."""
    return Path(out_dir) / f"{scenario.name}_{scenario.preset or 'custom'}.h5"


def _check_same_config(path: Path, scenario: Scenario) -> None:
    """Raise ValueError when the existing file ``path`` holds another scenario or config (e.g. an
    earlier run with other ``--set`` overrides: both are named ``<scenario>_custom.h5``).
    Unreadable files are left to the validating reader."""
    try:
        with h5py.File(path, "r") as f:
            name, config = str(f.attrs["scenario"]), json.loads(f.attrs["config"])
    except Exception:  # noqa: BLE001 - load_dataset reports what is wrong with it
        return
    wanted = json.loads(json.dumps(scenario.config.to_dict()))
    if name != scenario.name or config != wanted:
        diff = sorted(k for k in set(config) | set(wanted) if config.get(k) != wanted.get(k))
        raise ValueError(f"{path} holds a dataset of a different config (differs in {diff or [name]}); "
                         f"pass overwrite=True (--overwrite) or choose another output directory")


def simulate_reference(scenario: Scenario, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference trajectories of ``seeds`` run as one batch: (N, T+1, C, *coarse), params (N, K)."""
    solver = scenario.reference_solver()
    states, params = zip(*(scenario.sample(s) for s in seeds))
    state, p = torch.stack(states), torch.stack(params)
    p_arg = p if solver.num_params else None
    with torch.no_grad():
        for _ in range(scenario.config.warmup):
            state = solver.step(state, p_arg)
        frames = [scenario.downsample(state)]
        for _ in range(scenario.config.frames):
            state = solver.step(state, p_arg)
            frames.append(scenario.downsample(state))
    traj = torch.stack(frames, 1)
    if not torch.isfinite(traj).all():
        raise FloatingPointError(f"reference solver of '{scenario.name}' produced NaN/inf for seeds {seeds}")
    return traj.float(), p.float()


def generate(scenario: str | Scenario, preset: str = "default", out: str | os.PathLike = "datasets", *,
             batch: int = 8, overwrite: bool = False, progress: bool = True,
             overrides: dict[str, Any] | None = None) -> Path:
    """Generate (or resume) the dataset of ``scenario`` at ``preset``; returns the ``.h5`` path."""
    if isinstance(scenario, str):
        scenario = get_scenario(scenario, preset, **(overrides or {}))
        if overrides:
            scenario.preset = None
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = dataset_path(out, scenario)
    parts = path.with_name(path.name + ".parts")
    if path.exists() and not overwrite:
        _check_same_config(path, scenario)
        return path
    if overwrite and parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    stamp = parts / "config.json"
    described = json.dumps({**scenario.describe(), "batch": batch}, sort_keys=True)
    if stamp.exists() and stamp.read_text() != described:
        raise ValueError(f"{parts} holds an interrupted generation of a different config; "
                         f"delete it or pass overwrite=True (--overwrite)")
    stamp.write_text(described)

    # Fixed chunks of the full job list: a resumed run batches every simulation exactly as an
    # uninterrupted run does, so the data are bit-identical either way.
    jobs = [(split, s) for split, seeds in (("train", scenario.train_seeds), ("test", scenario.test_seeds))
            for s in seeds]
    chunks = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    done = lambda job: (parts / f"{job[0]}_{job[1]}.npz").exists()  # noqa: E731
    bar = tqdm(total=len(jobs), desc=f"generate {path.name}", unit="sim", disable=not progress)
    for chunk in chunks:
        if all(map(done, chunk)):
            bar.update(len(chunk))
            continue
        traj, params = simulate_reference(scenario, [s for _, s in chunk])
        for (split, s), tr, p in zip(chunk, traj, params):
            tmp = parts / f"{split}_{s}.tmp.npz"
            np.savez(tmp, trajectory=tr.numpy(), params=p.numpy())
            os.replace(tmp, parts / f"{split}_{s}.npz")
        bar.update(len(chunk))
    bar.close()

    def load(split: str, seeds: list[int]) -> list[Simulation]:
        sims = []
        for s in seeds:
            with np.load(parts / f"{split}_{s}.npz") as z:
                sims.append(Simulation(s, torch.from_numpy(z["trajectory"]), torch.from_numpy(z["params"])))
        return sims

    write_dataset(path, scenario, load("train", scenario.train_seeds), load("test", scenario.test_seeds))
    shutil.rmtree(parts)
    return path
