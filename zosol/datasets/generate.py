"""Generate fidelity datasets: run the reference solver, downsample every frame, write HDF5.

Generation is resumable: each finished simulation is saved atomically to
``<out>/<name>.h5.parts/<split>_<seed>.npz``; an interrupted run (even ``kill -9``) picks up
from there, and the final ``.h5`` appears (by rename) only once everything is done.  Parts are
validated before use (shape, dtype, finiteness, size): a stale or tampered part is regenerated,
never assembled.  One process at a time generates a dataset (an advisory lock on ``<name>.h5.lock``;
a second one is refused naming the holder), and the job is refused up front when its memory or
time estimate is out of reach (``budget.py``).
"""

from __future__ import annotations

from ..errors import UsageError

import json
import math
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime.files import FileLock, atomic_save, atomic_write_text
from ..solvers.base import Scenario, SolverDivergedError, SolverError, get_scenario
from .budget import check_generation_budget
from .hdf5 import DatasetError, Simulation, load_dataset, simulation_digest, write_dataset

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
        raise UsageError(
            f"{path} holds a dataset of a different config (differs in {diff or [name]}); "
            f"pass overwrite=True (--overwrite) or choose another output directory"
        )


def _check_existing(path: Path, scenario: Scenario) -> None:
    """An existing final file must hold this config and pass the validating reader; a damaged one
    is reported with the command that replaces it (it is never reported as a success)."""
    _check_same_config(path, scenario)
    try:
        load_dataset(path, scenario.name)
    except DatasetError as e:
        raise DatasetError(f"{e} [rerun with --overwrite (overwrite=True) to regenerate it]") from None


def simulate_reference(scenario: Scenario, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference trajectories of ``seeds`` run as one batch: (N, T+1, C, *coarse), params (N, K).
    Raises SolverError (SolverDivergedError for NaN/inf) when the reference solver fails."""
    solver = scenario.reference_solver()
    states, params = zip(*(_sample(scenario, s, solver.num_params) for s in seeds))
    state, p = torch.stack(states), torch.stack(params)
    p_arg = p if solver.num_params else None
    try:
        with torch.no_grad():
            for _ in range(scenario.config.warmup):
                state = solver.step(state, p_arg)
            frames = [scenario.downsample(state)]
            for _ in range(scenario.config.frames):
                state = solver.step(state, p_arg)
                frames.append(scenario.downsample(state))
    except SystemExit as e:
        raise SolverError(
            f"the reference step of '{scenario.name}' called sys.exit({e.code!r:.40}) for seeds {seeds} "
            f"(a step function must return or raise); no data were written for them"
        ) from None
    traj = torch.stack(frames, 1)
    if not torch.isfinite(traj).all():
        raise SolverDivergedError(f"reference solver of '{scenario.name}' produced NaN/inf for seeds {seeds}")
    return traj.float(), p.float()


def _sample(scenario: Scenario, seed: int, num_params: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scenario.sample(seed)`` checked: a (C, *reference) state and (K,) params tensor; else a
    one-line ValueError naming the scenario, the seed and what came back."""
    where = f"scenario '{scenario.name}': sample({seed})"
    try:
        out = scenario.sample(seed)
    except SystemExit as e:
        raise UsageError(f"{where} called sys.exit({e.code!r:.40}) (it must return or raise)") from None
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise UsageError(f"{where} failed: {type(e).__name__}: {str(e)[:300]}") from None
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise UsageError(f"{where} returned {type(out).__name__}, not (state, params) tensors")
    state, params = out
    want = scenario.state_shapes()["reference"]
    if tuple(state.shape) != tuple(want) or tuple(params.shape) != (num_params,):
        raise UsageError(
            f"{where} returned a state of shape {tuple(state.shape)} and params of shape {tuple(params.shape)}; "
            f"the scenario needs {tuple(want)} and ({num_params},)"
        )
    return state, params


def _part_path(parts: Path, split: str, seed: int) -> Path:
    return parts / f"{split}_{seed}.npz"


def _save_part(file: Path, traj: np.ndarray, params: np.ndarray) -> None:
    atomic_save(file, lambda f: np.savez(f, trajectory=traj, params=params, sha256=simulation_digest(traj, params)))


def _read_part(file: Path, traj_shape: tuple[int, ...], num_params: int) -> tuple[np.ndarray, np.ndarray]:
    """The (trajectory (T+1, C, *coarse), params (K,)) float32 arrays of one part file; ValueError
    naming what is wrong (sizes are checked in the zip directory before anything is decompressed;
    the data must match the part's checksum: finite, right-shaped tampering is caught too)."""
    if not stat.S_ISREG(file.lstat().st_mode):
        raise UsageError("not a regular file")
    limit = 4 * (math.prod(traj_shape) + num_params) + 4096
    with zipfile.ZipFile(file) as z:
        names = sorted(i.filename for i in z.infolist())
        if names != ["params.npy", "sha256.npy", "trajectory.npy"]:
            raise UsageError(f"holds {names}, expected params.npy, sha256.npy and trajectory.npy")
        size = sum(i.file_size for i in z.infolist())
        if size > limit:
            raise UsageError(f"holds {size} bytes uncompressed, at most {limit} expected")
    with np.load(file, allow_pickle=False) as z:
        traj, params, digest = z["trajectory"], z["params"], z["sha256"]
    for name, a, shape in (("trajectory", traj, traj_shape), ("params", params, (num_params,))):
        if a.shape != shape or a.dtype != np.float32:
            raise UsageError(f"{name} has shape {a.shape} {a.dtype}, expected {shape} float32")
        if not np.isfinite(a).all():
            raise UsageError(f"{name} contains NaN or inf")
    if not np.array_equal(digest, simulation_digest(traj, params)):
        raise UsageError("its data do not match its checksum (changed after it was written)")
    return traj, params


def _valid_part(file: Path, traj_shape: tuple[int, ...], num_params: int) -> bool:
    """Whether ``file`` is a usable part; a damaged one is removed (and reported) for regeneration."""
    if not file.exists():
        return False
    try:
        _read_part(file, traj_shape, num_params)
        return True
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        print(f"zosol: regenerating {file.name}: damaged part ({e})", file=sys.stderr)
        file.unlink(missing_ok=True)
        return False


def _prepare_parts(path: Path, scenario: Scenario, batch: int, overwrite: bool) -> Path:
    """The parts directory of ``path`` (created; emptied with ``overwrite``), stamped with the config."""
    parts = path.with_name(path.name + ".parts")
    if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
        raise UsageError(f"{parts} is not a directory of generation parts; remove it")
    if overwrite and parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    stamp = parts / "config.json"
    described = json.dumps({**scenario.describe(), "batch": batch}, sort_keys=True)
    if stamp.exists() and stamp.read_text() != described:
        raise UsageError(
            f"{parts} holds an interrupted generation of a different config; "
            f"delete it or pass overwrite=True (--overwrite)"
        )
    atomic_write_text(stamp, described)
    return parts


def _simulate_parts(scenario: Scenario, parts: Path, batch: int, progress: bool, label: str) -> None:
    """Run every simulation that has no valid part yet, in the fixed chunks of the full job list
    (a resumed run batches every simulation exactly as an uninterrupted run: bit-identical data)."""
    traj_shape = (scenario.config.frames + 1, *scenario.state_shapes()["coarse"])
    num_params = scenario.coarse_solver().num_params
    jobs = [
        (split, s) for split, seeds in (("train", scenario.train_seeds), ("test", scenario.test_seeds)) for s in seeds
    ]
    bar = tqdm(total=len(jobs), desc=f"generate {label}", unit="sim", disable=not progress)
    for chunk in (jobs[i : i + batch] for i in range(0, len(jobs), batch)):
        if all([_valid_part(_part_path(parts, *job), traj_shape, num_params) for job in chunk]):
            bar.update(len(chunk))
            continue
        traj, params = simulate_reference(scenario, [s for _, s in chunk])
        for (split, s), tr, p in zip(chunk, traj, params):
            _save_part(_part_path(parts, split, s), tr.numpy(), p.numpy())
        bar.update(len(chunk))
    bar.close()


def _assemble(path: Path, scenario: Scenario, parts: Path) -> None:
    """Write the final file from the (re-validated) parts, then remove them."""
    traj_shape = (scenario.config.frames + 1, *scenario.state_shapes()["coarse"])
    num_params = scenario.coarse_solver().num_params

    def load(split: str, seeds: list[int]) -> list[Simulation]:
        sims = []
        for s in seeds:
            try:
                traj, params = _read_part(_part_path(parts, split, s), traj_shape, num_params)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise DatasetError(
                    f"{_part_path(parts, split, s)} changed during generation ({e}); "
                    f"rerun the command (damaged parts are regenerated)"
                ) from None
            sims.append(Simulation(s, torch.from_numpy(traj), torch.from_numpy(params)))
        return sims

    write_dataset(path, scenario, load("train", scenario.train_seeds), load("test", scenario.test_seeds))
    shutil.rmtree(parts)


def _output_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def generate(
    scenario: str | Scenario,
    preset: str = "default",
    out: str | os.PathLike = "datasets",
    *,
    batch: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    check_budget: bool = True,
) -> Path:
    """Generate (or resume) the dataset of ``scenario`` at ``preset``; returns the ``.h5`` path.

    An existing complete file of the same config is validated and reused (``overwrite``
    regenerates it).  Raises ValueError for a config whose memory/time estimate is out of reach
    (``check_budget``), ``LockedError`` while another process generates the same file, DatasetError
    for a damaged existing file, SolverError when the reference solver fails.
    """
    if isinstance(scenario, str):
        scenario = get_scenario(scenario, preset, **(overrides or {}))
        if overrides:
            scenario.preset = None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    if check_budget:
        check_generation_budget(scenario, batch)
    path = dataset_path(_output_dir(out), scenario)
    if path.exists() and not overwrite:
        _check_existing(path, scenario)
        return path
    with FileLock(path, f"dataset {path}"):
        if path.exists() and not overwrite:  # finished by another process meanwhile
            _check_existing(path, scenario)
            return path
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run (we hold the lock)
            stale.unlink(missing_ok=True)
        parts = _prepare_parts(path, scenario, batch, overwrite)
        _simulate_parts(scenario, parts, batch, progress, path.name)
        _assemble(path, scenario, parts)
    return path
