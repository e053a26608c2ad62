"""A scenario from parts, no subclass needed: :func:`make_scenario`.

A scenario is a reference step, a coarse step, a sampler of initial states and per-simulation
parameters, a downsampling rule from the reference grid to the coarse grid, ``dt``, the number of
frames and the train/test seeds.  ``make_scenario`` takes each as a plain value::

    scenario = make_scenario(
        "my_pde",
        reference=fine_step,            # Solver, or fn(state, params) -> state on numpy arrays
        coarse=coarse_step,             # Solver or fn; a black box is fine
        sample=lambda seed: (u0, p),    # (C, *fine) and (K,) arrays or tensors
        reference_shape=(128,), coarse_shape=(32,), dt=0.05,
        frames=32, train_sims=8, test_sims=3)

Step functions given as callables are wrapped in :class:`~zosol.solvers.external.NumpySolver`
(``batched=False`` when they step one state at a time, ``processes=N`` to spread a batch over
N local processes).  The solvers are built by you, once; every copy of the scenario at another
preset shares them.

Arguments of ``make_scenario`` (all but ``name`` keyword-only):

* ``name``: the scenario's name (datasets are named ``<name>_<preset>.h5``).
* ``reference``, ``coarse``: a :class:`Solver` (any, black boxes included) or a numpy step function
  ``fn(state (B, C, *shape), params (B, K) | None) -> (B, C, *shape)``; with ``batched=False`` the
  functions take one state ``(C, *shape)`` and params ``(K,)``.
* ``sample``: ``sample(seed) -> (state (C, *reference_shape), params (K,) or None)``.
* ``dt``: time between frames (both solvers advance exactly ``dt`` per step).
* ``reference_shape``, ``coarse_shape``: the grids (needed for step functions; read from Solvers).
* ``downsample``: ``(B, C, *reference) tensor -> (B, C, *coarse)``; default: conservative block
  averaging when each reference extent is a multiple of the coarse one.
* ``channels``, ``num_params``: state channel names and per-simulation parameter count K.
* ``batched``, ``processes``: for step functions: False when they take one state at a time; spread
  every batch over this many local processes (see ``NumpySolver``).
* ``dtype``: "float32" (default) or "float64": the arrays step functions get and return, and the
  states ``sample`` gives (the reference trajectory is computed in it; datasets store float32).
* ``timeout``: seconds one call of a step function may take (``processes=1``); a call that takes
  longer is interrupted with a SolverError instead of hanging the run.
* ``frames``, ``warmup``, ``train_sims``, ``test_sims``, ``seed``: as in :class:`ScenarioConfig`
  (train seeds ``seed + i``, test seeds ``seed + 10000 + i``).
* ``presets``: preset name -> overrides of those fields (``"default"`` is added if missing).
* ``physics``: JSON-able description recorded in datasets (e.g. ``{"nu": 0.01, "n": 32}``).
* ``features``: extra corrector input channels from params (B, K) -> (B, F, *coarse).
* ``padding_mode``: the corrector's convolution padding ("circular" for periodic domains).
* ``train_presets``: training-preset adjustments (preset -> TrainConfig fields).
* ``description``: a sentence saying what the scenario is (its ``description`` attribute).

A dataset records how to rebuild its scenario (:attr:`CustomScenario.source`, an importable
``module:object``): define the scenario at module level of an importable module (not in a
script run as ``__main__``) and ``load_dataset`` / ``zosol info`` / ``zosol evaluate`` open it
in any process.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .base import Scenario, ScenarioConfig, Solver

__all__ = ["make_scenario", "CustomScenario", "CustomConfig", "block_average"]


@dataclasses.dataclass
class CustomConfig(ScenarioConfig):
    """The generic fields of every scenario plus ``physics``: a JSON-able description of the
    physics the parts implement (recorded in datasets; a rebuilt scenario must match it)."""

    physics: dict = dataclasses.field(default_factory=dict)


def block_average(fine: torch.Tensor, coarse_shape: Sequence[int]) -> torch.Tensor:
    """Conservative averaging of (B, C, *fine) onto (B, C, *coarse) when every fine extent is a
    multiple of the coarse one (each coarse cell = the mean of its r_1 x r_2 ... fine cells)."""
    fine_shape = fine.shape[2:]
    ratios = [f // c for f, c in zip(fine_shape, coarse_shape)]
    shape: list[int] = list(fine.shape[:2])
    for c, r in zip(coarse_shape, ratios):
        shape += [c, r]
    out = fine.reshape(shape)
    return out.mean(dim=tuple(range(3, 3 + 2 * len(ratios), 2)))


def _as_solver(
    part: Any,
    role: str,
    dt: float,
    channels: Sequence[str],
    shape: Sequence[int] | None,
    num_params: int,
    batched: bool,
    processes: int,
    dtype: str,
    timeout: float | None = None,
) -> Solver:
    if isinstance(part, Solver) or (hasattr(part, "step") and hasattr(part, "spatial_shape")):
        return part
    if not callable(part):
        raise TypeError(
            f"make_scenario: {role} must be a Solver or a step function fn(state, params) -> state, "
            f"got {type(part).__name__}"
        )
    if shape is None:
        raise UsageError(f"make_scenario: {role} is a function; pass {role}_shape=(cells, ...) (its grid)")
    from .external import NumpySolver

    return NumpySolver(
        part,
        dt=dt,
        channels=channels,
        spatial_shape=shape,
        num_params=num_params,
        batched=batched,
        processes=processes,
        dtype=dtype,
        timeout=timeout,
        name=f"{role} {getattr(part, '__name__', 'fn')}",
    )


def _check_parts(ref: Solver, coarse: Solver, dt: float) -> None:
    for what in ("channels", "num_params"):
        a, b = getattr(ref, what), getattr(coarse, what)
        if (tuple(a) if what == "channels" else a) != (tuple(b) if what == "channels" else b):
            raise UsageError(f"make_scenario: reference and coarse solvers differ in {what}: {a} vs {b}")
    for role, s in (("reference", ref), ("coarse", coarse)):
        if not math.isclose(float(s.dt), dt, rel_tol=1e-9):
            raise UsageError(f"make_scenario: the {role} solver advances dt={s.dt}, the scenario's dt is {dt}")


class CustomScenario(Scenario):
    """A scenario assembled from parts by :func:`make_scenario` (see the module docstring)."""

    Config = CustomConfig
    presets: dict[str, dict[str, Any]] = {"default": {}}

    def __init__(self, config: CustomConfig, preset: str | None = None, *, parts: dict[str, Any]):
        super().__init__(config, preset)
        self._parts = parts
        self.name = parts["name"]
        self.presets = parts["presets"]
        self.padding_mode = parts["padding_mode"]
        self.description = parts["description"]
        self.train_presets = parts["train_presets"]
        self.__dict__["_solvers"] = {"reference_solver": parts["reference"], "coarse_solver": parts["coarse"]}

    # the solvers were built by the caller: return them (never rebuild)
    def reference_solver(self) -> Solver:
        return self._parts["reference"]

    def coarse_solver(self) -> Solver:
        return self._parts["coarse"]

    def downsample(self, fine: torch.Tensor) -> torch.Tensor:
        rule = self._parts["downsample"]
        out = rule(fine)
        return _tensor(out, fine.dtype).to(fine.device) if not isinstance(out, torch.Tensor) else out

    def sample(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state (C, *reference_shape), params (K,))`` of simulation ``seed``, in the scenario's
        ``dtype`` (``make_scenario(dtype=...)``: the reference trajectory is computed in it)."""
        state, params = self._parts["sample"](int(seed))
        dtype = _TORCH_DTYPES[self._parts.get("dtype", "float32")]
        params = torch.zeros(0, dtype=dtype) if params is None else _tensor(params, dtype)
        return _tensor(state, dtype), params.reshape(-1)

    def corrector_features(self, params: torch.Tensor) -> torch.Tensor | None:
        fn = self._parts["features"]
        return None if fn is None else fn(params)

    # -- copies at other presets / configs share the parts (and so the built solvers) ----------
    def with_preset(self, preset: str = "default", **overrides: Any) -> CustomScenario:
        if preset not in self.presets:
            raise UsageError(
                f"unknown preset '{preset}' for scenario '{self.name}'; choose one of {sorted(self.presets)}"
            )
        fields = {f.name for f in dataclasses.fields(CustomConfig)} - {"physics"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UsageError(
                f"unknown config field(s) {unknown} for scenario '{self.name}' (a scenario from "
                f"parts has only {sorted(fields)}: change the physics where the parts are made)"
            )
        merged = {**self._parts["base_config"], **self.presets[preset], **overrides}
        return CustomScenario(CustomConfig(**merged), preset if not overrides else None, parts=self._parts)

    def with_config(self, config: dict[str, Any], preset: str | None = None) -> CustomScenario:
        recorded = json.loads(json.dumps(config.get("physics", {})))
        mine = json.loads(json.dumps(self.config.physics))
        if recorded != mine:
            diff = sorted(k for k in set(recorded) | set(mine) if recorded.get(k) != mine.get(k))
            raise UsageError(
                f"scenario '{self.name}' ({self.source}) now has other physics than the dataset "
                f"was made with (differs in {diff}: dataset {recorded}, now {mine})"
            )
        fields = {f.name for f in dataclasses.fields(CustomConfig)}
        return CustomScenario(
            CustomConfig(**{k: v for k, v in config.items() if k in fields}), preset, parts=self._parts
        )

    @property
    def source(self) -> str:
        """``module:name`` of the module-level variable (or registered name) holding this scenario,
        or of the function that made it; ``__main__:...`` when it was made in a script."""
        module = self._parts["module"]
        mod = sys.modules.get(module)
        name = _script_module(mod) if module == "__main__" else module
        for key, value in vars(mod).items() if mod is not None else ():
            if isinstance(value, CustomScenario) and value._parts is self._parts:
                return f"{name}:{key}"
        return f"{name}:{self._parts['maker'] or self.name}"

    def __repr__(self) -> str:
        return f"CustomScenario({self.name!r}, preset={self.preset!r}, source={self.source!r})"


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _dtype_name(dtype: str | torch.dtype) -> str:
    """The name float32 / float64 of that string, torch dtype or numpy dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise UsageError(f"make_scenario: dtype must be float32 or float64, got {dtype!r}")
    return name


def _tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` from a tensor or array-like; numpy arrays are copied, so a read-only one
    (``np.asarray`` of a JAX array) never reaches ``torch.as_tensor`` (which warns about it)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.from_numpy(np.array(value, dtype=_NUMPY_DTYPES[dtype]))


def _script_module(mod: Any) -> str:
    """A script run as ``python my_pde.py`` is the module ``my_pde`` to another process that has
    its folder on the path; ``__main__`` when there is no such file (``python -c``, notebooks)."""
    file = getattr(mod, "__file__", None)
    stem = Path(file).stem if file else ""
    return stem if stem.isidentifier() and getattr(mod, "__spec__", None) is None else "__main__"


def _caller() -> tuple[str, str | None]:
    """Module name and function name of the code that called make_scenario."""
    frame = inspect.currentframe().f_back.f_back
    module = frame.f_globals.get("__name__", "__main__")
    func = frame.f_code.co_name
    return module, (None if func == "<module>" else func)


def _default_downsample(fine: tuple[int, ...], small: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Block averaging (B, C, *fine) -> (B, C, *small) (the identity for equal grids); UsageError
    naming the fix when the grids do not divide."""
    if len(fine) != len(small) or any(f % c for f, c in zip(fine, small)):
        raise UsageError(
            f"make_scenario: the reference grid {list(fine)} is not a multiple of the coarse grid "
            f"{list(small)}; pass downsample=fn (B, C, *reference) -> (B, C, *coarse)"
        )
    return (lambda u: u) if fine == small else (lambda u: block_average(u, small))


def _physics(physics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``physics`` as a dict; UsageError when it is not JSON-serialisable (datasets record it)."""
    physics = dict(physics or {})
    try:
        json.dumps(physics)
    except TypeError as e:
        raise UsageError(f"make_scenario: physics must be JSON-serialisable ({e})") from None
    return physics


def make_scenario(
    name: str,
    *,
    reference: Solver | Callable,
    coarse: Solver | Callable,
    sample: Callable[[int], tuple[Any, Any]],
    dt: float,
    reference_shape: Sequence[int] | None = None,
    coarse_shape: Sequence[int] | None = None,
    downsample: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels: Sequence[str] = ("u",),
    num_params: int = 0,
    batched: bool = True,
    processes: int = 1,
    dtype: str | torch.dtype = "float32",
    timeout: float | None = None,
    frames: int = 32,
    warmup: int = 0,
    train_sims: int = 4,
    test_sims: int = 2,
    seed: int = 0,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    physics: Mapping[str, Any] | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    padding_mode: str = "circular",
    train_presets: Mapping[str, Mapping[str, Any]] | None = None,
    description: str = "",
) -> CustomScenario:
    """A scenario from parts: ``reference`` and ``coarse`` steps, a ``sample`` of initial states and
    ``dt`` (the arguments are described in the module docstring); returns it at preset "default"."""
    module, maker = _caller()
    dtype = _dtype_name(dtype)
    host = dict(batched=batched, processes=processes, dtype=dtype, timeout=timeout)
    ref = _as_solver(reference, "reference", dt, channels, reference_shape, num_params, **host)
    crs = _as_solver(coarse, "coarse", dt, channels, coarse_shape, num_params, **host)
    _check_parts(ref, crs, float(dt))
    if downsample is None:
        downsample = _default_downsample(tuple(ref.spatial_shape), tuple(crs.spatial_shape))
    parts = dict(
        name=name,
        reference=ref,
        coarse=crs,
        sample=sample,
        dtype=dtype,
        downsample=downsample,
        features=features,
        presets={"default": {}, **{k: dict(v) for k, v in (presets or {}).items()}},
        padding_mode=padding_mode,
        description=description,
        module=module,
        maker=maker,
        train_presets={k: dict(v) for k, v in (train_presets or {}).items()},
    )
    config = CustomConfig(
        frames=frames, warmup=warmup, train_sims=train_sims, test_sims=test_sims, seed=seed, physics=_physics(physics)
    )
    parts["base_config"] = config.to_dict()
    return CustomScenario(config, "default", parts=parts)
