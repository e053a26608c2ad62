"""Turn reference trajectories you already have into a zosol dataset.

* :func:`import_trajectories` takes arrays: ``(N, T+1, C, *grid)`` (or ``(N, T+1, *grid)`` for one
  channel) on the scenario's reference grid (downsampled with the scenario's rule) or already on
  its coarse grid, plus optional per-simulation parameters ``(N, K)``.
* :func:`import_hdf5` reads them from an HDF5 file in the layouts of the big PDE data collections:
  PDEBench (one array such as ``tensor`` of shape ``(N, T, *grid)`` or ``(N, T, *grid, C)``) and
  The Well (``t0_fields/<name>`` of shape ``(N, T, *grid)``, one field per channel).

The dataset records the scenario (name, config with ``frames``/``train_sims``/``test_sims`` set
from the data, ``module:object`` source), so it opens like a generated one; the coarse solver of
the scenario is what the correctors correct.  Frame k must be the state at time ``k * dt``.
"""
from __future__ import annotations

from ..errors import UsageError

import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from ..solvers.base import Scenario
from .hdf5 import DatasetError, Simulation, write_dataset

__all__ = ["import_trajectories", "import_hdf5"]


def _on_coarse_grid(scenario: Scenario, traj: np.ndarray, name: str) -> torch.Tensor:
    """(N, T+1, C, *grid) on the reference or coarse grid -> float32 tensor on the coarse grid."""
    coarse, ref = scenario.coarse_solver(), scenario.reference_solver()
    c = len(coarse.channels)
    t = torch.as_tensor(np.asarray(traj), dtype=torch.float64)
    if t.dim() == 2 + len(coarse.spatial_shape) and c == 1:
        t = t.unsqueeze(2)  # (N, T+1, *grid): one channel
    grid = tuple(t.shape[3:])
    if t.dim() != 3 + len(coarse.spatial_shape) or t.shape[2] != c:
        raise UsageError(f"{name}: trajectories of shape {list(t.shape)}; expected (N, T+1, {c}, *grid) with "
                         f"{c} channel(s) {list(coarse.channels)}")
    if grid == tuple(coarse.spatial_shape):
        out = t
    elif grid == tuple(ref.spatial_shape):
        n, t1 = t.shape[:2]
        out = scenario.downsample(t.reshape(n * t1, *t.shape[2:])).reshape(n, t1, c, *coarse.spatial_shape)
    else:
        raise UsageError(f"{name}: grid {list(grid)} is neither the scenario's reference grid "
                         f"{list(ref.spatial_shape)} nor its coarse grid {list(coarse.spatial_shape)}")
    if t.shape[1] < 2:
        raise UsageError(f"{name}: needs at least 2 frames per trajectory, got {t.shape[1]}")
    if not torch.isfinite(out).all():
        raise UsageError(f"{name}: trajectories contain NaN or inf")
    return out.float()


def _params(params: Any, n: int, k: int, name: str) -> torch.Tensor:
    if params is None:
        if k:
            raise UsageError(f"{name}: the scenario needs {k} per-simulation parameters; pass params of shape ({n}, {k})")
        return torch.zeros(n, 0)
    p = torch.as_tensor(np.asarray(params), dtype=torch.float32).reshape(n, -1)
    if p.shape[1] != k:
        raise UsageError(f"{name}: params of shape {list(p.shape)}, the scenario needs ({n}, {k})")
    return p


def import_trajectories(scenario: Scenario, train: Any, test: Any, out: str | os.PathLike, *,
                        train_params: Any = None, test_params: Any = None) -> Path:
    """Write ``train`` / ``test`` trajectories ``(N, T+1, C, *grid)`` (reference or coarse grid) as the
    zosol dataset ``out`` (.h5) of ``scenario``; seeds are numbered as the scenario numbers them
    (``seed + i`` and ``seed + 10000 + i``).  Returns the path."""
    k = scenario.coarse_solver().num_params
    tr, te = _on_coarse_grid(scenario, train, "train"), _on_coarse_grid(scenario, test, "test")
    if tr.shape[1] != te.shape[1]:
        raise UsageError(f"train and test trajectories differ in length: {tr.shape[1]} vs {te.shape[1]} frames")
    config = {**scenario.config.to_dict(), "frames": tr.shape[1] - 1, "train_sims": tr.shape[0],
              "test_sims": te.shape[0], "warmup": 0}
    sc = scenario.with_config(config, None)
    ptr, pte = _params(train_params, tr.shape[0], k, "train"), _params(test_params, te.shape[0], k, "test")
    sims = {split: [Simulation(seed, traj, p) for seed, traj, p in zip(seeds, data, ps)]
            for split, seeds, data, ps in (("train", sc.train_seeds, tr, ptr), ("test", sc.test_seeds, te, pte))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_dataset(out, sc, sims["train"], sims["test"])


def _read_fields(f: h5py.File, fields: Sequence[str], channels_last: bool) -> np.ndarray:
    """(N, T, C, *grid) from one channels-last array or one array per field (N, T, *grid)."""
    for name in fields:
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise DatasetError(f"{f.filename}: no array '{name}' (arrays: {sorted(_arrays(f))[:12]})")
    if channels_last:
        if len(fields) != 1:
            raise UsageError("channels_last=True reads one array (N, T, *grid, C); pass one field")
        return np.moveaxis(f[fields[0]][()], -1, 2)
    return np.stack([f[name][()] for name in fields], axis=2)


def _arrays(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def import_hdf5(scenario: Scenario, file: str | os.PathLike, out: str | os.PathLike, *,
                fields: Sequence[str] = ("tensor",), channels_last: bool = False, test: int | float = 0.2,
                every: int = 1, frames: int | None = None, params: str | None = None) -> Path:
    """Import the trajectories in the HDF5 ``file`` (PDEBench: ``fields=["tensor"]``; The Well:
    ``fields=["t0_fields/u", ...]``, one per channel) as the zosol dataset ``out``.

    ``test``: the last trajectories become test simulations (a count, or a fraction of N);
    ``every``: keep every k-th stored time step (so that frames are ``dt`` apart); ``frames``: keep
    the first ``frames + 1`` of them; ``params``: name of an ``(N, K)`` array of per-simulation
    parameters in the file."""
    file = Path(file)
    try:
        f = h5py.File(file, "r")
    except OSError as e:
        raise DatasetError(f"{file}: not a readable HDF5 file: {e}") from None
    with f:
        data = _read_fields(f, list(fields), channels_last)[:, ::every]
        p = None if params is None else f[params][()]
    if frames is not None:
        data = data[:, :frames + 1]
    n_test = int(round(test * len(data))) if isinstance(test, float) else int(test)
    if not 1 <= n_test < len(data):
        raise UsageError(f"test={test} leaves {len(data) - n_test} of {len(data)} trajectories for training; "
                         f"choose a count between 1 and {len(data) - 1}")
    cut = len(data) - n_test
    return import_trajectories(scenario, data[:cut], data[cut:], out, train_params=None if p is None else p[:cut],
                               test_params=None if p is None else p[cut:])
