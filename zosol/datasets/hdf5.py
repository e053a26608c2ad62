"""The zosol fidelity-dataset file format (HDF5) and its validating reader.

Layout (schema version 1)::

    /                       attrs: zosol_schema=1, scenario, preset, config (JSON), dt,
                                   channels (JSON), spatial_shape (JSON), frames, complete=True
    /coords/x, /coords/y    coarse-grid cell coordinates (y only in 2-D)
    /train/<seed>           dataset (T+1, C, *spatial) float32: the reference trajectory on the
    /test/<seed>            coarse grid; attrs: seed, params (K,) per-simulation parameters

Files are written whole to a unique temporary name and renamed (``zosol.runtime.files``), so a file with
the final name is always complete.  The reader checks every part and names the file, the problem
and the command that fixes it; it trusts nothing in the file: objects must be plain datasets
inside the file (external links, soft links, external raw storage and virtual datasets are
refused: they would read other files), attributes are size-checked before they are read, every
dataset's shape is compared with the one the config implies *before* anything is allocated, the
declared size must fit in memory and data compressed more than ``MAX_COMPRESSION_RATIO``-fold (a
decompression bomb) are refused, and trajectories and params must be finite.
"""
from __future__ import annotations

from ..errors import DataError, UsageError

import dataclasses
import hashlib
import io
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..runtime.files import atomic_write_bytes
from ..runtime.memory import format_bytes, machine_memory_bytes
from ..solvers.base import Scenario
from ..solvers.plugins import ScenarioNotFound, excerpt, scenario_from_record

SCHEMA_VERSION = 1
#: refuse attributes stored in more bytes than this (the config JSON of a scenario is ~1 KiB)
MAX_ATTRIBUTE_BYTES = 1 << 20
#: refuse datasets over 16 MiB whose data are compressed more than this (PDE data compress ~1-3x)
MAX_COMPRESSION_RATIO = 100
#: a dataset may declare at most this fraction of the machine's memory
MEMORY_FRACTION = 0.5
#: bytes a file may hold beyond its datasets' storage (object headers, attributes, heaps): a
#: variable-length attribute's real size is bounded by this before it is read (its storage size
#: reads 16 bytes whatever it holds); zosol's own files hold ~27 KiB + ~4.5 KiB per simulation
MAX_METADATA_BYTES = 4 << 20
MAX_METADATA_BYTES_PER_DATASET = 16 << 10
#: seeds are non-negative 63-bit integers (numpy / torch generators)
MAX_SEED = 2**63 - 1

__all__ = ["SCHEMA_VERSION", "DatasetError", "data_option", "simulation_digest", "Simulation", "FidelityDataset", "load_dataset", "write_dataset"]


class DatasetError(DataError):
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
    #: the ``module:object`` the file records for its scenario (shown by ``info``, never imported)
    source: str | None = None

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
            "scenario_source": self.source,
        }

    def duplicated_test_sims(self) -> dict[int, str]:
        """Test simulations that duplicate training ones: test seed -> ``"same seed"`` or
        ``"same data as training seed S"`` (then test errors are measured on training data)."""
        seeds = {s.seed for s in self.train}
        data = {(s.trajectory.numpy().tobytes(), s.params.numpy().tobytes()): s.seed for s in self.train}
        out: dict[int, str] = {}
        for s in self.test:
            twin = data.get((s.trajectory.numpy().tobytes(), s.params.numpy().tobytes()))
            if s.seed in seeds:
                out[s.seed] = "same seed"
            elif twin is not None:
                out[s.seed] = f"same data as training seed {twin}"
        return out


def simulation_digest(traj: np.ndarray, params: np.ndarray) -> np.ndarray:
    """SHA-256 of a simulation's float32 trajectory and params bytes, as 32 uint8 (the checksum a
    generation part and a dataset's trajectory carry)."""
    h = hashlib.sha256(np.ascontiguousarray(traj, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(params, dtype=np.float32).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def write_dataset(path: str | os.PathLike, scenario: Scenario, train: list[Simulation],
                  test: list[Simulation]) -> Path:
    """Write a complete dataset atomically (unique temporary file + rename).  The HDF5 image is built
    in memory and written by plain file I/O: a full disk or a file-size limit is then an ordinary
    OSError, never an HDF5 library left with a half-written open file (which crashed at exit)."""
    solver = scenario.coarse_solver()
    frames = (train or test)[0].trajectory.shape[0] - 1
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs.update({
            "zosol_schema": SCHEMA_VERSION,
            "scenario": scenario.name,
            "preset": scenario.preset or "",
            "config": json.dumps(scenario.config.to_dict()),
            "scenario_source": scenario.source,
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
                d.attrs["sha256"] = simulation_digest(sim.trajectory.numpy(), sim.params.numpy())
        f.attrs["complete"] = True
    return atomic_write_bytes(path, image.getbuffer())


def _fix(path: Path, attrs: dict[str, Any] | None = None) -> str:
    """The command that replaces a bad dataset file, as exact as the file allows."""
    attrs = attrs or {}
    name, preset = str(attrs.get("scenario", "")), str(attrs.get("preset", ""))
    if name and preset:
        return (f"regenerate it with `zosol generate --scenario {name} --preset {preset} --out {path.parent} "
                f"--overwrite`")
    return "regenerate it with `zosol generate --overwrite` and the options that made it (or delete it)"


def _attr(obj: Any, name: str, path: Path) -> Any:
    """Attribute ``name`` of ``obj``, refusing absurdly large ones before reading them."""
    if name not in obj.attrs:
        raise KeyError(f"attribute '{name}' of {obj.name} is missing")
    aid = obj.attrs.get_id(name)  # an empty array (no per-simulation parameters) stores 0 bytes, and
    size = aid.get_storage_size() if aid.get_space().get_simple_extent_npoints() else 0  # HDF5 errs on 0
    if size > MAX_ATTRIBUTE_BYTES:
        raise DatasetError(f"{path}: attribute '{name}' of {obj.name} holds {format_bytes(size)} "
                           f"(at most {format_bytes(MAX_ATTRIBUTE_BYTES)}); {_fix(path)}")
    value = obj.attrs[name]
    if isinstance(value, (str, bytes)) and len(value) > MAX_ATTRIBUTE_BYTES:
        raise DatasetError(f"{path}: attribute '{name}' of {obj.name} holds {format_bytes(len(value))} "
                           f"(at most {format_bytes(MAX_ATTRIBUTE_BYTES)}); {_fix(path)}")
    return value


def _check_metadata_size(f: h5py.File, path: Path) -> None:
    """Refuse a file holding far more than its datasets' storage before any attribute is read
    (a variable-length attribute's size is unknown until it is read)."""
    stored, count = 0, 0

    def visit(_name: str, obj: Any) -> None:
        nonlocal stored, count
        if isinstance(obj, h5py.Dataset):
            stored, count = stored + obj.id.get_storage_size(), count + 1

    f.visititems(visit)
    extra = path.stat().st_size - stored
    limit = MAX_METADATA_BYTES + MAX_METADATA_BYTES_PER_DATASET * count
    if extra > limit:
        raise DatasetError(f"{path}: holds {format_bytes(extra)} besides its {count} datasets' data (at most "
                           f"{format_bytes(limit)} of attributes and headers expected: a crafted or foreign "
                           f"file); {_fix(path)}")


def _member(group: h5py.Group, key: str, kind: type, path: Path) -> Any:
    """``group[key]`` when it is a plain object of type ``kind`` stored in this file."""
    link = group.get(key, getlink=True)
    if link is None:
        raise DatasetError(f"{path}: missing {'group' if kind is h5py.Group else 'dataset'} "
                           f"'{group.name.rstrip('/')}/{key}'; {_fix(path)}")
    if not isinstance(link, h5py.HardLink):
        raise DatasetError(f"{path}: {group.name.rstrip('/')}/{key} is a {type(link).__name__} (zosol datasets hold "
                           f"their data inside the file; links to other objects or files are refused)")
    obj = group[key]
    if not isinstance(obj, kind):
        raise DatasetError(f"{path}: {obj.name} is a {type(obj).__name__}, expected a {kind.__name__}")
    if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.id.get_create_plist().get_external_count()):
        raise DatasetError(f"{path}: {obj.name} keeps its data outside the file (external storage or a virtual "
                           f"dataset); refused: zosol reads only data stored inside the file")
    return obj


def _scenario_of(f: h5py.File, path: Path, scenario: str | Scenario | None) -> tuple[Scenario, dict[str, Any]]:
    """The file's scenario (validated config) and its top-level attributes."""
    if "zosol_schema" not in f.attrs:
        raise DatasetError(f"{path}: not a zosol dataset (no 'zosol_schema' attribute)")
    _check_metadata_size(f, path)
    attrs = {k: _attr(f, k, path) for k in ("zosol_schema", "scenario", "preset", "config", "frames")}
    attrs["complete"] = f.attrs.get("complete", False)
    version = int(attrs["zosol_schema"])
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{path}: schema version {version}, but this zosol reads version "
                           f"{SCHEMA_VERSION}; {_fix(path, attrs)}")
    if not attrs["complete"]:
        raise DatasetError(f"{path}: incomplete dataset (not written by zosol's atomic writer); {_fix(path, attrs)}")
    name = str(attrs["scenario"])
    if isinstance(scenario, str) and name != scenario:
        raise DatasetError(f"{path}: holds scenario {excerpt(name, 60)}, not '{scenario}'")
    source = str(_attr(f, "scenario_source", path)) if "scenario_source" in f.attrs else None
    attrs["scenario_source"] = source
    try:
        sc = scenario_from_record(name, json.loads(attrs["config"]), str(attrs["preset"]) or None, source,
                                  scenario if isinstance(scenario, Scenario) else None)
    except ScenarioNotFound as e:
        raise DatasetError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise DatasetError(f"{path}: invalid scenario config: {str(e)[:300]}; {_fix(path, attrs)}") from None
    return sc, attrs


def _plan(f: h5py.File, path: Path, expected: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, list]:
    """Check every trajectory's link, storage, shape and dtype without reading data: split ->
    [dataset]; then refuse sizes beyond memory and decompression bombs."""
    plan: dict[str, list] = {}
    total = 0
    for split in ("train", "test"):
        group = _member(f, split, h5py.Group, path)
        names = list(group)
        bad = [k for k in names if not (k.isdigit() and str(int(k)) == k and int(k) <= MAX_SEED)]
        if bad:
            raise DatasetError(f"{path}: /{split} holds names that are not seeds (0 .. 2**63-1): "
                               f"{excerpt(sorted(bad)[:5], 120)}; {_fix(path, attrs)}")
        keys = sorted(names, key=int)
        if not keys:
            raise DatasetError(f"{path}: /{split} holds no simulations (a dataset needs training and test "
                               f"simulations); {_fix(path, attrs)}")
        plan[split] = []
        for key in keys:
            d = _member(group, key, h5py.Dataset, path)
            if tuple(d.shape) != expected or d.dtype != np.float32:
                raise DatasetError(f"{path}: /{split}/{key} has shape {tuple(d.shape)} {d.dtype}, "
                                   f"expected {expected} float32; {_fix(path, attrs)}")
            nbytes = math.prod(expected) * 4
            stored = d.id.get_storage_size()
            if nbytes > 1 << 24 and nbytes > MAX_COMPRESSION_RATIO * max(stored, 1):
                raise DatasetError(f"{path}: /{split}/{key} decompresses {format_bytes(stored)} to "
                                   f"{format_bytes(nbytes)} (more than {MAX_COMPRESSION_RATIO}x: refused as a "
                                   f"decompression bomb); {_fix(path, attrs)}")
            total += nbytes
            plan[split].append(d)
    budget = MEMORY_FRACTION * machine_memory_bytes()
    if total > budget:
        raise DatasetError(f"{path}: its trajectories need {format_bytes(total)} in memory, more than "
                           f"{MEMORY_FRACTION:.0%} of this machine's ({format_bytes(budget)})")
    return plan


def _read_sim(d: h5py.Dataset, path: Path, num_params: int, attrs: dict[str, Any]) -> Simulation:
    """One planned (checked) dataset read into a Simulation; data and params must be finite."""
    try:
        data = d[()]
    except OSError as e:
        raise DatasetError(f"{path}: {d.name} cannot be read (corrupt?): {e}; {_fix(path, attrs)}") from None
    params = np.asarray(_attr(d, "params", path), dtype=np.float32).reshape(-1)
    if params.size != num_params:
        raise DatasetError(f"{path}: {d.name} has {params.size} params, the scenario needs {num_params}; "
                           f"{_fix(path, attrs)}")
    for what, a in (("trajectory", data), ("params", params)):
        if not np.isfinite(a).all():
            raise DatasetError(f"{path}: {d.name} {what} contains NaN or inf; {_fix(path, attrs)}")
    if "sha256" in d.attrs and not np.array_equal(
        np.asarray(_attr(d, "sha256", path)).reshape(-1), simulation_digest(data, params)
    ):
        raise DatasetError(f"{path}: {d.name} does not match its checksum (changed after it was written); "
                           f"{_fix(path, attrs)}")
    seed = _attr(d, "seed", path)
    if not (np.ndim(seed) == 0 and np.issubdtype(np.asarray(seed).dtype, np.integer) and
            str(int(seed)) == d.name.rsplit("/", 1)[-1]):
        raise DatasetError(f"{path}: {d.name} records seed {excerpt(seed, 40)}, not its name; {_fix(path, attrs)}")
    return Simulation(int(seed), torch.from_numpy(data), torch.from_numpy(params))


def _load(f: h5py.File, path: Path, scenario: str | Scenario | None) -> FidelityDataset:
    sc, attrs = _scenario_of(f, path, scenario)
    frames = int(attrs["frames"])
    if frames < 1:
        raise DatasetError(f"{path}: frames attribute is {frames} (a dataset holds at least one step after "
                           f"the initial state); {_fix(path, attrs)}")
    plan = _plan(f, path, (frames + 1, *sc.state_shapes()["coarse"]), attrs)
    num_params = sc.coarse_solver().num_params  # the grid now matches data of a checked size
    splits = {split: [_read_sim(d, path, num_params, attrs) for d in ds] for split, ds in plan.items()}
    return FidelityDataset(path, sc, splits["train"], splits["test"], attrs["scenario_source"])


def data_option(data: str | os.PathLike | None, default: str) -> Path | None:
    """The ``--data`` a user gave, which must exist: a dataset file, or a directory to generate
    in.  A path that does not exist is an error (a typo), never a place to generate into; None
    when not given (then data are generated in ``default``)."""
    if data is None:
        return None
    path = Path(data)
    if not path.exists():
        raise UsageError(
            f"--data {path}: no such file or directory; name an existing dataset file (make one with "
            f"`zosol generate --scenario S --preset P --out DIR`) or directory, or leave --data out to "
            f"generate the data in {default}"
        )
    if not (path.is_file() or path.is_dir()):
        raise UsageError(f"--data {path} is not a regular file (a pipe, socket or device); name a dataset file")
    return path


def load_dataset(path: str | os.PathLike, scenario: str | Scenario | None = None) -> FidelityDataset:
    """Read and validate a dataset; ``scenario`` (a name), if given, must match the file's.
    Raises DatasetError naming the file, the problem and the fix.

    The file's scenario is rebuilt from its record (name, config, ``scenario_source``
    ``module:object``; see :mod:`zosol.solvers.plugins`), or is ``scenario`` when that is a scenario
    object (reused as it is, with its built solvers, when its config equals the file's)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset file (create it with `zosol generate`)")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, not a dataset file")
    if not stat.S_ISREG(path.stat().st_mode):  # a fifo would block the reader, a device never end
        raise DatasetError(f"{path}: not a regular file (a pipe, socket or device); name a dataset file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}; {_fix(path)}") from None
    try:
        with f:
            return _load(f, path, scenario)
    except DatasetError:
        raise
    except MemoryError:
        raise DatasetError(f"{path}: too large to load into memory") from None
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        # damaged bytes inside an HDF5 file that still opens surface as any of these (h5py)
        raise DatasetError(f"{path}: corrupt or malformed dataset ({type(e).__name__}: {str(e)[:300]}); "
                           f"{_fix(path)}") from None
