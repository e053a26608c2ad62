"""The zosol fidelity-dataset file format (HDF5) and its validating reader.

Layout (schema version 1)::

    /                       attrs: zosol_schema=1, scenario, preset, config (JSON), dt,
                                   channels (JSON), spatial_shape (JSON), frames, complete=True
    /coords/x, /coords/y    coarse-grid cell coordinates (y only in 2-D)
    /train/<seed>           dataset (T+1, C, *spatial) float32: the reference trajectory on the
    /test/<seed>            coarse grid; attrs: seed, params (K,) per-simulation parameters

Files are written whole to a temporary name and renamed, so a file with the final name is
always complete.  The reader checks every part and names the file and the problem on failure.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..solvers.base import Scenario, scenario_class

SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "DatasetError", "Simulation", "FidelityDataset", "load_dataset", "write_dataset"]


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, foreign, of another schema version, or inconsistent."""


@dataclasses.dataclass
class Simulation:
    """One simulation: ``trajectory`` (T+1, C, *spatial) on the coarse grid, ``params`` (K,)."""

    seed: int
    trajectory: torch.Tensor
    params: torch.Tensor


@dataclasses.dataclass
class FidelityDataset:
    path: Path
    scenario: Scenario
    train: list[Simulation]
    test: list[Simulation]

    @property
    def frames(self) -> int:
        return self.train[0].trajectory.shape[0] - 1 if self.train else self.test[0].trajectory.shape[0] - 1

    def stacked(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All trajectories of ``split`` as (N, T+1, C, *spatial) and params as (N, K)."""
        sims = getattr(self, split)
        return torch.stack([s.trajectory for s in sims]), torch.stack([s.params for s in sims])

    def summary(self) -> dict[str, Any]:
        sim = (self.train or self.test)[0]
        return {
            "path": str(self.path),
            **self.scenario.describe(),
            "train_sims": len(self.train),
            "test_sims": len(self.test),
            "trajectory_shape": list(sim.trajectory.shape),
            "params_per_sim": int(sim.params.numel()),
        }


def write_dataset(path: str | os.PathLike, scenario: Scenario, train: list[Simulation],
                  test: list[Simulation]) -> Path:
    """Write a complete dataset atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    solver = scenario.coarse_solver()
    frames = (train or test)[0].trajectory.shape[0] - 1
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "zosol_schema": SCHEMA_VERSION,
            "scenario": scenario.name,
            "preset": scenario.preset or "",
            "config": json.dumps(scenario.config.to_dict()),
            "dt": solver.dt,
            "channels": json.dumps(list(solver.channels)),
            "spatial_shape": json.dumps(list(solver.spatial_shape)),
            "frames": frames,
        })
        for name, c in solver.coords.items():
            f.create_dataset(f"coords/{name}", data=c.numpy())
        for split, sims in (("train", train), ("test", test)):
            g = f.create_group(split)
            for sim in sims:
                d = g.create_dataset(str(sim.seed), data=sim.trajectory.numpy().astype(np.float32),
                                     compression="gzip", compression_opts=1)
                d.attrs["seed"] = sim.seed
                d.attrs["params"] = sim.params.numpy().astype(np.float32)
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return path


def load_dataset(path: str | os.PathLike, scenario: str | None = None) -> FidelityDataset:
    """Read and validate a dataset; ``scenario`` (a name), if given, must match the file's."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset file (create it with `zosol generate`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None
    try:
        with f:
            attrs = dict(f.attrs)
            if "zosol_schema" not in attrs:
                raise DatasetError(f"{path}: not a zosol dataset (no 'zosol_schema' attribute)")
            version = int(attrs["zosol_schema"])
            if version != SCHEMA_VERSION:
                raise DatasetError(f"{path}: schema version {version}, but this zosol reads version "
                                   f"{SCHEMA_VERSION}; regenerate it with `zosol generate`")
            if not attrs.get("complete", False):
                raise DatasetError(f"{path}: incomplete dataset (generation was interrupted); rerun `zosol generate`")
            name = str(attrs["scenario"])
            if scenario is not None and name != scenario:
                raise DatasetError(f"{path}: holds scenario '{name}', not '{scenario}'")
            try:
                cls = scenario_class(name)
                sc = cls.from_config_dict(json.loads(attrs["config"]), preset=str(attrs["preset"]) or None)
            except (ValueError, TypeError, KeyError) as e:
                raise DatasetError(f"{path}: invalid scenario config: {e}") from None
            solver = sc.coarse_solver()
            expected = (int(attrs["frames"]) + 1, *solver.state_shape)
            splits: dict[str, list[Simulation]] = {}
            for split in ("train", "test"):
                if split not in f:
                    raise DatasetError(f"{path}: missing group '/{split}'")
                sims = []
                for key in sorted(f[split], key=int):
                    d = f[split][key]
                    if tuple(d.shape) != expected or d.dtype != np.float32:
                        raise DatasetError(f"{path}: /{split}/{key} has shape {tuple(d.shape)} {d.dtype}, "
                                           f"expected {expected} float32")
                    try:
                        data = d[()]
                    except OSError as e:
                        raise DatasetError(f"{path}: /{split}/{key} cannot be read (corrupt?): {e}") from None
                    params = torch.from_numpy(np.asarray(d.attrs["params"], dtype=np.float32))
                    if params.numel() != solver.num_params:
                        raise DatasetError(f"{path}: /{split}/{key} has {params.numel()} params, "
                                           f"the scenario needs {solver.num_params}")
                    if not np.isfinite(data).all():
                        raise DatasetError(f"{path}: /{split}/{key} contains NaN or inf")
                    sims.append(Simulation(int(d.attrs["seed"]), torch.from_numpy(data), params))
                splits[split] = sims
            if not splits["train"] and not splits["test"]:
                raise DatasetError(f"{path}: holds no simulations")
    except DatasetError:
        raise
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        # damaged bytes inside an HDF5 file that still opens surface as any of these (h5py)
        raise DatasetError(f"{path}: corrupt or malformed dataset ({type(e).__name__}: {e})") from None
    return FidelityDataset(path, sc, splits["train"], splits["test"])
