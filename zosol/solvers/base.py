"""What a simulator looks like to zosol: the Solver contract, its black-box view, and scenarios.

A *solver* advances a batch of states by exactly ``dt``::

    state  : torch.Tensor of shape (B, C, *spatial)     (C = len(solver.channels))
    params : torch.Tensor of shape (B, K) or None        per-simulation parameters (forcing
                                                        coefficients, Reynolds number, ...)
    solver.step(state, params) -> torch.Tensor (B, C, *spatial)

``step`` is batch-agnostic: a batched call equals per-sample calls.  A *scenario* pairs a
high-fidelity (reference) solver with a cheap low-fidelity (coarse) one, a conservative
``downsample`` from the reference grid to the coarse grid, and a seeded sampler of initial
states and parameters.  Scenarios are registered by name with presets ``tiny`` (tests, seconds),
``default`` (a CPU laptop, minutes) and ``paper`` (published sizes).
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..errors import RunFailed, UsageError
from ..options import check_fields, option

__all__ = [
    "Solver",
    "BlackBox",
    "Scenario",
    "ScenarioConfig",
    "SolverError",
    "SolverDivergedError",
    "register",
    "get_scenario",
    "scenario_names",
    "check_state",
    "registered",
    "is_registered",
    "load_entry_points",
    "is_differentiable",
    "default_twin",
    "trains_through_autograd",
]


class SolverError(RunFailed):
    """A solver failed to produce a valid next state (crash, timeout, NaN, wrong shape)."""


class SolverDivergedError(SolverError, FloatingPointError):
    """The state blew up inside the solver (velocities beyond any stable sub-stepping, NaN/inf
    from finite input).  A :class:`SolverError` (training stops that run with its last good
    checkpoint); also a ``FloatingPointError`` for code that caught the old exception."""


class Solver(ABC):
    """A batched step function ``step(state, params) -> state`` advancing exactly ``dt``.

    Subclasses set ``dt``, ``channels`` (names of the C state channels), ``spatial_shape`` and
    ``coords`` (dict of 1-D coordinate tensors: ``x`` and, in 2-D, ``y``), and implement
    :meth:`_step`.  ``differentiable`` says whether autograd flows through ``step``.
    """

    dt: float
    channels: tuple[str, ...]
    spatial_shape: tuple[int, ...]
    coords: dict[str, torch.Tensor]
    differentiable: bool = True
    #: number of per-simulation parameters K (0: ``params`` may be None)
    num_params: int = 0
    #: optional metadata for finite-difference Jacobians (``zosol.zo.jacobian``): half-width in cells,
    #: per spatial axis, of the stencil of one ``step`` in the usual regime (every output entry
    #: depends only on input entries that close, periodic wrap allowed); None: unknown or global
    stencil_reach: tuple[int, ...] | None = None
    #: raise SolverDivergedError when ``step`` turns a finite state into NaN/inf (the built-in
    #: solvers do; off by default so that a user's solver keeps its own NaN semantics)
    check_finite: bool = False

    @abstractmethod
    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """Advance ``state`` (B, C, *spatial) by ``dt``; inputs are already validated."""

    def step(self, state: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Advance a batch of states by ``dt``. ``state``: (B, C, *spatial); ``params``: (B, K)."""
        check_state(self, state, params)
        out = self._step(state, params)
        if self.check_finite:
            check_finite_output(self, state, out)
        return out

    __call__ = step

    def blackbox(self) -> BlackBox:
        """A view of this solver that only offers ``step`` and never records autograd history."""
        return BlackBox(self)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one state without the batch axis: (C, *spatial)."""
        return (len(self.channels), *self.spatial_shape)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "dt": self.dt,
            "channels": list(self.channels),
            "spatial_shape": list(self.spatial_shape),
        }


class BlackBox:
    """Query-only view of a solver: ``step`` runs under ``torch.no_grad`` and returns detached
    tensors.  Zeroth-order code receives this view and nothing else of the solver."""

    differentiable = False

    def __init__(self, solver: Solver | Callable[..., torch.Tensor]):
        self._solver = solver
        for name in ("dt", "channels", "spatial_shape", "coords", "num_params", "stencil_reach"):
            if hasattr(solver, name):
                setattr(self, name, getattr(solver, name))

    def step(self, state: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            out = self._solver.step(state.detach(), None if params is None else params.detach())
        return out.detach()

    __call__ = step

    def blackbox(self) -> BlackBox:
        return self

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (len(self.channels), *self.spatial_shape)

    def __repr__(self) -> str:
        return f"BlackBox({self._solver!r})"


def is_differentiable(solver: Any) -> bool:
    """Whether autograd flows through ``solver.step`` (its ``differentiable`` attribute)."""
    return bool(getattr(solver, "differentiable", False))


def default_twin(solver: Solver | BlackBox, scenario: Any, twin: Solver | None = None) -> Solver | BlackBox:
    """The differentiable twin of the solver a run trains with (gradient checks compare with it):
    ``twin`` if given, else ``solver`` if differentiable, else the scenario's coarse solver (which
    may be a black box too: ask :func:`is_differentiable`).  The one place this is decided."""
    if twin is not None:
        return twin
    return solver if is_differentiable(solver) else scenario.coarse_solver()


def trains_through_autograd(solver: Solver | BlackBox, twin: Solver | None) -> bool:
    """Whether a method that needs autograd through the solver (FO-SOL) may train with ``solver``:
    it is differentiable, or the caller named a differentiable ``twin`` (the scenario's own solver
    is never silently substituted for a black box of the caller's)."""
    return is_differentiable(solver) or (twin is not None and is_differentiable(twin))


def check_state(solver: Solver, state: torch.Tensor, params: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the mismatch when ``state``/``params`` do not fit ``solver``."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{type(solver).__name__}.step expects a torch.Tensor state, got {type(state).__name__}")
    expected = tuple(solver.state_shape)
    if state.dim() != len(expected) + 1 or tuple(state.shape[1:]) != expected:
        raise UsageError(
            f"{type(solver).__name__}.step: state has shape {tuple(state.shape)}, expected "
            f"(B, {', '.join(map(str, expected))}) = (batch, channels {list(solver.channels)}, "
            f"spatial {list(solver.spatial_shape)})"
        )
    if solver.num_params:
        if params is None:
            raise UsageError(f"{type(solver).__name__}.step needs params of shape (B, {solver.num_params})")
        if tuple(params.shape) != (state.shape[0], solver.num_params):
            raise UsageError(
                f"{type(solver).__name__}.step: params has shape {tuple(params.shape)}, expected "
                f"({state.shape[0]}, {solver.num_params}) (batch, per-simulation parameters)"
            )


def check_finite_output(solver: Any, state: torch.Tensor, out: torch.Tensor) -> None:
    """Raise SolverDivergedError when ``out`` (B, C, *spatial) holds NaN/inf for a sample whose input
    ``state`` (B, C, *spatial) was finite (NaN in, NaN out is the caller's business)."""
    with torch.no_grad():
        bad_out = ~torch.isfinite(out.detach()).flatten(1).all(1)
        if not bool(bad_out.any()):
            return
        culprits = bad_out & torch.isfinite(state.detach()).flatten(1).all(1)
        if bool(culprits.any()):
            first = int(culprits.nonzero()[0, 0])
            raise SolverDivergedError(
                f"{type(solver).__name__}: NaN/inf in {int(culprits.sum())} of {out.shape[0]} samples after one "
                f"step from a finite state (first: sample {first}): the state diverged"
            )


# --------------------------------------------------------------------------------------------
# Scenarios


#: a rule between fields of a scenario config: ``config -> message naming the fix, or None``
Constraint = Callable[[Any], "str | None"]


def multiple_of(fine: str, coarse: str) -> Constraint:
    """Constraint: field ``fine`` (a reference grid size) is a multiple of field ``coarse``."""

    def rule(c: Any) -> str | None:
        a, b = getattr(c, fine), getattr(c, coarse)
        return None if a % b == 0 else f"{fine} ({a}) must be a multiple of {coarse} ({b})"

    return rule


@dataclasses.dataclass
class ScenarioConfig:
    """Fields shared by every scenario's config; scenarios subclass it with their physics.

    Every field declares its type, help text and bounds with :func:`zosol.options.option`; rules
    between fields (e.g. a reference grid divisible by the coarse grid) are listed in the
    subclass's ``constraints``.  :meth:`validate` checks both.  Seeds are ``seed + i`` for
    training and ``seed + 10_000 + i`` for testing.
    """

    frames: int = option(32, "coarse steps recorded after the initial frame (T)", gt=0)
    warmup: int = option(0, "reference steps run (and discarded) before frame 0", ge=0)
    train_sims: int = option(4, "training simulations", gt=0)
    test_sims: int = option(2, "test simulations", gt=0)
    seed: int = option(0, "first seed of the simulations", ge=0)

    constraints: ClassVar[tuple[Constraint, ...]] = ()

    def validate(self) -> None:
        """Raise ValueError for values that cannot work, naming the field and the fix."""
        check_fields(self, label="config field '{name}'", nouns=False)
        for rule in self.constraints:
            message = rule(self)
            if message:
                raise UsageError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _built_once(method: Callable[[Scenario], Solver]) -> Callable[[Scenario], Solver]:
    """Memoise a scenario's solver factory per scenario object (and per process: the cache is not
    pickled), so a solver with an expensive start (a compile, an external process) starts once."""

    @functools.wraps(method)
    def get(self: Scenario, *args: Any, **kwargs: Any) -> Solver:
        cache = self.__dict__.setdefault("_solvers", {})
        key = method.__name__ if not (args or kwargs) else (method.__name__, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = method(self, *args, **kwargs)
        return cache[key]

    get.built_once = True
    return get


class Scenario(ABC):
    """A named pair of fidelities plus the sampler of simulations.

    Subclasses define ``name``, ``Config`` (a ScenarioConfig subclass), ``presets``
    (preset name -> dict of config overrides) and the abstract methods below.
    ``reference_solver()`` and ``coarse_solver()`` build their solver on the first call only:
    later calls on the same scenario object (in the same process) return the same solver.
    Without subclassing: :func:`zosol.solvers.make_scenario`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("reference_solver", "coarse_solver"):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "built_once", False):
                setattr(cls, name, _built_once(fn))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its built solvers: each process builds its own once."""
        return {k: v for k, v in self.__dict__.items() if k != "_solvers"}

    @property
    def source(self) -> str:
        """Importable ``module:object`` that rebuilds this scenario from its config (recorded in
        datasets so that they open in a new process)."""
        cls = type(self)
        return f"{cls.__module__}:{cls.__qualname__}"

    name: ClassVar[str]
    Config: ClassVar[type[ScenarioConfig]]
    presets: ClassVar[dict[str, dict[str, Any]]]
    description: ClassVar[str] = ""
    #: padding of the corrector's convolutions: "circular" for periodic domains, else e.g. "replicate"
    padding_mode: ClassVar[str] = "circular"
    #: training-preset adjustments for this scenario (preset -> TrainConfig fields), see zosol.config
    train_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: methods ``compare`` leaves out unless asked for by name (method -> why), e.g. one whose cost
    #: on this scenario is out of proportion
    not_by_default: ClassVar[dict[str, str]] = {}

    def __init__(self, config: ScenarioConfig, preset: str | None = None):
        config.validate()
        self.config = config
        self.preset = preset

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> Scenario:
        if preset not in cls.presets:
            raise UsageError(
                f"unknown preset '{preset}' for scenario '{cls.name}'; choose one of {sorted(cls.presets)}"
            )
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UsageError(f"unknown config field(s) {unknown} for scenario '{cls.name}'; valid: {sorted(fields)}")
        return cls(cls.Config(**{**cls.presets[preset], **overrides}), preset=preset)

    @classmethod
    def from_config_dict(cls, d: dict[str, Any], preset: str | None = None) -> Scenario:
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        return cls(cls.Config(**{k: v for k, v in d.items() if k in fields}), preset=preset)

    def with_preset(self, preset: str = "default", **overrides: Any) -> Scenario:
        """This scenario at another preset / config overrides (what ``get_scenario`` calls)."""
        return type(self).from_preset(preset, **overrides)

    def with_config(self, config: dict[str, Any], preset: str | None = None) -> Scenario:
        """This scenario with the config a dataset recorded (what ``load_dataset`` calls)."""
        return type(self).from_config_dict(config, preset=preset)

    # -- the two fidelities --------------------------------------------------------------
    @abstractmethod
    def reference_solver(self) -> Solver:
        """High-fidelity solver (fine grid, accurate numerics)."""

    @abstractmethod
    def coarse_solver(self) -> Solver:
        """Low-fidelity solver on the coarse grid: the solver that a corrector corrects."""

    @abstractmethod
    def downsample(self, fine: torch.Tensor) -> torch.Tensor:
        """Conservatively average reference states (B, C, *fine) onto the coarse grid (B, C, *coarse)."""

    @abstractmethod
    def sample(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial reference state (C, *fine) and per-simulation parameters (K,) from ``seed``."""

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """One state's shape (C, *spatial) on the ``"reference"`` and the ``"coarse"`` grid.  The
        default builds both solvers; built-in scenarios compute it from the config alone, so that
        size checks never allocate a grid of an absurd config."""
        return {
            "reference": tuple(self.reference_solver().state_shape),
            "coarse": tuple(self.coarse_solver().state_shape),
        }

    def reference_substeps(self) -> int:
        """Rough cost of one reference step in cell-updates per cell (sub-steps x stages), for the
        time estimate of dataset generation (default 1)."""
        return 1

    def corrector_features(self, params: torch.Tensor) -> torch.Tensor | None:
        """Extra input channels for the corrector from params (B, K): (B, F, *coarse) or None."""
        return None

    # -- seeds ----------------------------------------------------------------------------
    @property
    def train_seeds(self) -> list[int]:
        return [self.config.seed + i for i in range(self.config.train_sims)]

    @property
    def test_seeds(self) -> list[int]:
        return [self.config.seed + 10_000 + i for i in range(self.config.test_sims)]

    def describe(self) -> dict[str, Any]:
        return {"scenario": self.name, "preset": self.preset, "config": self.config.to_dict()}


#: name -> a zero-argument loader returning a Scenario class, a Scenario class, or a Scenario object
_REGISTRY: dict[str, Any] = {}


def register(name: str, scenario: Any) -> None:
    """Register a scenario under ``name``: a Scenario subclass, a scenario object (e.g. from
    :func:`zosol.solvers.make_scenario`), or a zero-argument loader returning either (imported
    lazily: PhiFlow is slow to import).  zosol's own scenarios cannot be replaced."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise TypeError(f"register(name, ...) needs a name such as 'my_pde', got {name!r:.80}")
    if not (isinstance(scenario, Scenario) or callable(scenario)):
        raise TypeError(
            f"register('{name}', ...) needs a Scenario subclass, a scenario object or a loader; "
            f"got {type(scenario).__name__}"
        )
    if name in _BUILT_IN and _REGISTRY.get(name) is not None:
        raise UsageError(
            f"register('{name}', ...): '{name}' is one of zosol's scenarios; register yours under another name"
        )
    _REGISTRY[name] = scenario


#: zosol's own scenario names (see zosol.solvers): register() refuses to replace them
_BUILT_IN: set[str] = set()


ENTRY_POINT_GROUP = "zosol.scenarios"
_entry_points_loaded = False


def load_entry_points() -> None:
    """Register every scenario that installed packages declare in the ``zosol.scenarios``
    entry-point group (``my_pde = "my_package.module:scenario"``); each is imported on first use."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            register(ep.name, lambda ep=ep: ep.load())


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered scenario (entry points included)."""
    load_entry_points()
    return name in _REGISTRY


def scenario_names() -> list[str]:
    load_entry_points()
    return sorted(_REGISTRY)


def registered(name: str) -> type[Scenario] | Scenario:
    """The Scenario class or scenario object registered under ``name`` (loaders are called)."""
    load_entry_points()
    if name not in _REGISTRY:
        raise UsageError(
            f"unknown scenario '{name}'; choose one of {scenario_names()} (a scenario of your own: "
            f"register it in a module and load that module with --plugin MODULE)"
        )
    entry = _REGISTRY[name]
    if isinstance(entry, Scenario) or (isinstance(entry, type) and issubclass(entry, Scenario)):
        return entry
    try:
        loaded = entry()
    except (Exception, SystemExit) as e:  # a user's loader or an entry point's module: one line
        raise UsageError(
            f"the loader registered for scenario '{name}' failed: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not (isinstance(loaded, Scenario) or (isinstance(loaded, type) and issubclass(loaded, Scenario))):
        raise UsageError(
            f"the loader registered for scenario '{name}' returned {type(loaded).__name__}, "
            f"not a Scenario subclass or scenario object"
        )
    _REGISTRY[name] = loaded  # loaded once: a scenario object keeps its solvers
    return loaded


def scenario_class(name: str) -> type[Scenario]:
    entry = registered(name)
    return entry if isinstance(entry, type) else type(entry)


def get_scenario(name: str, preset: str = "default", **overrides: Any) -> Scenario:
    """The scenario ``name`` at ``preset`` with optional config overrides, e.g. ``frames=16``."""
    entry = registered(name)
    if isinstance(entry, Scenario):
        return entry.with_preset(preset, **overrides)
    return entry.from_preset(preset, **overrides)
