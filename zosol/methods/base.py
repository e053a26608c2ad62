"""The method registry: what a training method declares, and the list of registered methods.

A training method is one module of :mod:`zosol.methods` (or of a plugin) that calls
:func:`register` with a :class:`Method`: its name (``TrainConfig.method``, the run directory
under ``compare``), display name (the results table), its gradient step (a
:class:`~zosol.training.sources.GradientSource` subclass, which also says which solver view it
needs: the black box or the differentiable solver), its option groups, history keys, memory
estimate and results-table entry.  ``TrainConfig``, the CLI options, ``compare``'s method list and
report derive from the registry; nothing else names a method.

An option group is a dataclass of :func:`zosol.options.option` fields with a ``prefix`` class
variable: field ``mu`` of a group with prefix ``"zo_"`` is the config key ``zo_mu`` and the CLI
flag ``--zo-mu``.  Several methods may share a group (the finite-difference options of both ZO
methods); a config key belongs to one group.

Built-in methods are the modules named in :data:`BUILTIN` (imported on first use: adding one is
a module plus its line there); a plugin module (``--plugin MODULE``) calls :func:`register` itself.
This module imports nothing else from zosol but :mod:`zosol.options`, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..options import Spec, field_defaults, specs

__all__ = [
    "BUILTIN",
    "BASELINE",
    "Method",
    "MemorySizes",
    "register",
    "reserve",
    "get",
    "names",
    "registered_methods",
    "display_name",
    "option_groups",
    "option_defaults",
    "group_specs",
]

#: built-in method modules of zosol.methods, in the order of the results table
BUILTIN = ("non", "nog_sol", "fo_sol", "zo_sol", "zo_jac_sol")
#: the results-table name of the bare coarse solver (no corrector, nothing trained)
BASELINE = "SRC"


@dataclass(frozen=True)
class MemorySizes:
    """What a memory estimate of one training step may use (float32 bytes are 4 per number):
    ``params`` corrector parameters, ``batch`` windows per step, ``cells`` grid cells of a state,
    ``in_channels`` the corrector's input channels."""

    params: int
    batch: int
    cells: int
    in_channels: int


@dataclass(frozen=True)
class Method:
    """One training method (see the module docstring).

    ``source``: its GradientSource subclass (``source.needs``: the solver view it calls).
    ``options``: its option groups.  ``history``: history keys it writes, with their initial
    values (every run also has loss, epoch_loss, wall_time and the solver counts).
    ``unrolled``: trains on SOL windows of ``config.window`` steps (False: always one step).
    ``memory(config, sizes)``: bytes its gradient step needs beyond autograd over the window
    (None: nothing); ``memory_options``: the config keys that lower it (named when a run is
    refused for memory).  ``entry(history)``: what its results-table entry adds to the common one
    (scores, time, solver counts)."""

    name: str
    display: str
    source: type
    options: tuple[type, ...] = ()
    history: dict[str, Any] = field(default_factory=dict)
    unrolled: bool = True
    memory: Callable[[Any, MemorySizes], int] | None = None
    memory_options: tuple[str, ...] = ()
    entry: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def needs(self) -> str:
        """ "blackbox" or "differentiable": the solver view its gradient step calls."""
        return self.source.needs


_METHODS: dict[str, Method] = {}
_GROUPS: dict[type, dict[str, Spec]] = {}  # option group -> its config keys' specs
_RESERVED: set[str] = set()
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(f"{__package__}.{module}")


def group_specs(group: type) -> dict[str, Spec]:
    """Config key -> :class:`~zosol.options.Spec` of an option group (keys carry the prefix)."""
    if not (dataclasses.is_dataclass(group) and isinstance(getattr(group, "prefix", None), str)):
        raise TypeError(f"option group {group!r} must be a dataclass of option(...) fields with a 'prefix' str")
    out = {}
    for name, spec in specs(group).items():
        key = group.prefix + name
        out[key] = dataclasses.replace(spec, name=key)
    return out


def _check_new(method: Method, reserved: set[str]) -> None:
    """ValueError if ``method`` cannot join the registry (name taken, bad fields, key clash)."""
    if not isinstance(method.name, str) or not method.name or method.name == BASELINE.lower():
        raise UsageError(f"method name must be a non-empty string other than '{BASELINE.lower()}', got {method.name!r}")
    if method.name in _METHODS:
        other = _METHODS[method.name].source
        raise UsageError(
            f"method '{method.name}' is already registered (by {other.__module__}); register yours under another name"
        )
    if any(m.display == method.display for m in _METHODS.values()) or method.display == BASELINE:
        raise UsageError(f"method '{method.name}': display name '{method.display}' is already taken")
    if getattr(method.source, "needs", None) not in ("blackbox", "differentiable"):
        raise UsageError(
            f"method '{method.name}': its source's needs must be 'blackbox' or 'differentiable', "
            f"got {getattr(method.source, 'needs', None)!r}"
        )
    taken = reserved | {k for g in _GROUPS for k in _GROUPS[g]}
    for group in method.options:
        if group in _GROUPS:
            continue
        clash = sorted(set(group_specs(group)) & taken)
        if clash:
            raise UsageError(
                f"method '{method.name}': option group {group.__name__} declares {clash}, "
                f"already a training option; choose another prefix or field name"
            )


def reserve(keys: set[str]) -> None:
    """Config keys no option group may declare (zosol.config reserves TrainConfig's common fields)."""
    _RESERVED.update(keys)


def _builtin_rank(method: Method) -> int:
    """The method's place in :data:`BUILTIN` (plugins: after every built-in)."""
    module = method.source.__module__
    tail = module.rsplit(".", 1)[-1]
    return BUILTIN.index(tail) if module == f"{__package__}.{tail}" and tail in BUILTIN else len(BUILTIN)


def register(method: Method) -> Method:
    """Add ``method`` to the registry; returns it.  ValueError if its name or display name is
    taken or one of its config keys is already a training option."""
    if _builtin_rank(method) == len(BUILTIN):
        _load_builtins()  # a plugin's method must not take a built-in's name
    _check_new(method, _RESERVED)
    for group in method.options:
        _GROUPS.setdefault(group, group_specs(group))
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``; ValueError listing the registered ones if there is none."""
    _load_builtins()
    if name not in _METHODS:
        raise UsageError(
            f"unknown method {name!r}; registered: {list(names())} (a method of your own: a module "
            f"that calls zosol.methods.register, loaded with --plugin MODULE)"
        )
    return _METHODS[name]


def names() -> tuple[str, ...]:
    """The registered method names, built-ins first (the results table's order)."""
    return tuple(m.name for m in registered_methods())


def registered_methods() -> tuple[Method, ...]:
    """Every registered :class:`Method`, in :func:`names` order."""
    _load_builtins()
    return tuple(sorted(_METHODS.values(), key=_builtin_rank))


def display_name(method: str) -> str:
    """The results-table name of a registered method (its name upper-cased if it is not registered)."""
    return {m.name: m.display for m in registered_methods()}.get(method, method.upper())


def option_groups() -> dict[str, Spec]:
    """Config key -> Spec of every registered option group, in registration order."""
    ordered = {g: None for m in registered_methods() for g in m.options}
    return {k: s for g in ordered for k, s in _GROUPS[g].items()}


def option_defaults() -> dict[str, Any]:
    """Config key -> default of every registered option group."""
    ordered = {g: None for m in registered_methods() for g in m.options}
    return {g.prefix + k: v for g in ordered for k, v in field_defaults(g).items()}
