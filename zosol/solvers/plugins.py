"""Scenarios of your own in any process: plugins, entry points, and rebuilding a dataset's scenario.

* ``load_plugin("my_pde")`` imports a module that registers scenarios
  (``zosol.solvers.register("my_pde", scenario)``); the CLI's ``--plugin MODULE`` calls it.
* ``load_twin("my_pde:twin")`` imports a module and returns its differentiable twin of the coarse
  solver (a Solver, e.g. ``TorchSolver(...)``, or a function returning one); the CLI's
  ``--twin MODULE:OBJECT`` calls it.
* Installed packages can declare scenarios in the entry-point group ``zosol.scenarios``
  (``my_pde = "my_package.module:scenario"``, the object being a Scenario subclass, a scenario
  object, or a zero-argument function returning either); they are found by name on first use.
* :func:`scenario_from_record` rebuilds the scenario a dataset was made with from what the file
  records: the name, the config and ``source`` (``module:object``).  The module is imported only
  when the name is not registered yet; a module named ``__main__`` (a script) cannot be imported
  by another process, and the error says what to do instead.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from types import ModuleType
from typing import Any

from ..errors import UsageError
from .base import ENTRY_POINT_GROUP, Scenario, is_registered, load_entry_points, registered

__all__ = [
    "ENTRY_POINT_GROUP",
    "ScenarioNotFound",
    "load_plugin",
    "load_twin",
    "load_entry_points",
    "scenario_from_record",
]

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ScenarioNotFound(UsageError, LookupError):
    """The scenario of a dataset or a command line is neither registered nor importable."""


def load_plugin(module: str) -> ModuleType:
    """Import ``module`` (a dotted name on ``sys.path``; the current directory counts) so that the
    scenarios it registers become available by name."""
    if not _DOTTED.match(module or ""):
        raise UsageError(
            f"--plugin expects an importable module name such as 'my_pde' or 'pkg.scenarios', "
            f"got '{module}' (for a file my_pde.py, pass 'my_pde' and run from its folder)"
        )
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # a plugin next to the user's command, as with `python -m`
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UsageError(
            f"plugin '{module}' cannot be imported: {e} (put its folder on PYTHONPATH or run from there)"
        ) from None


def load_twin(spec: str) -> Any:
    """The differentiable solver named by ``spec`` = ``"module:object"`` (``object`` may be dotted):
    a Solver with ``differentiable = True``, or a zero-argument function / class returning one.
    ``module`` is imported as :func:`load_plugin` does; every problem is a ValueError naming the fix."""
    module, _, attr = (spec or "").partition(":")
    if not (_DOTTED.match(module) and _DOTTED.match(attr)):
        raise UsageError(
            f"--twin expects MODULE:OBJECT, e.g. 'my_pde:twin' (a differentiable Solver in my_pde.py), got '{spec}'"
        )
    obj: Any = load_plugin(module)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--twin {spec}: module '{module}' has no '{attr}'")
        obj = getattr(obj, part)
    if not hasattr(obj, "step") and callable(obj):
        obj = obj()
    if not (hasattr(obj, "step") and hasattr(obj, "spatial_shape")):
        raise UsageError(
            f"--twin {spec} is a {type(obj).__name__}, not a solver; name a zosol Solver (e.g. "
            f"zosol.solvers.TorchSolver(step, dt=..., channels=..., spatial_shape=...)) or a function returning one"
        )
    if not getattr(obj, "differentiable", False):
        raise UsageError(f"--twin {spec}: {type(obj).__name__} is not differentiable (a twin must be, for autograd)")
    return obj


def _rebuild(entry: Any, config: dict[str, Any], preset: str | None) -> Scenario:
    if isinstance(entry, Scenario):
        return entry.with_config(config, preset)
    if isinstance(entry, type) and issubclass(entry, Scenario):
        return entry.from_config_dict(config, preset=preset)
    if callable(entry):
        return _rebuild(entry(), config, preset)
    raise TypeError(f"{entry!r} is not a Scenario class, a scenario object or a function returning one")


def _import_source(name: str, source: str) -> Any:
    module, _, attr = source.partition(":")
    if not (_DOTTED.match(module) and (not attr or _DOTTED.match(attr))):
        raise ScenarioNotFound(
            f"scenario '{name}' is not registered and its recorded source '{source}' is not "
            f"a 'module:object' path; import the module that defines it (--plugin MODULE)"
        )
    if module == "__main__":
        raise ScenarioNotFound(
            f"scenario '{name}' is not registered in this process: it was made in a script run as __main__ "
            f"(object '{attr}'), which another process cannot import; move the scenario into a module, then "
            f"import that module (--plugin MODULE) or pass the scenario object (load_dataset(path, scenario=...))"
        )
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ScenarioNotFound(
            f"scenario '{name}' is not registered and its module '{module}' cannot be imported "
            f"({e}); import the module that defines it first (--plugin {module}, with its folder "
            f"on PYTHONPATH) or pass the scenario object (load_dataset(path, scenario=...))"
        ) from None
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part, None)
    return obj


def scenario_from_record(
    name: str, config: dict[str, Any], preset: str | None, source: str | None = None, given: Scenario | None = None
) -> Scenario:
    """The scenario ``name`` with the recorded ``config``: ``given`` (a scenario object, reused
    as it is when its config equals the record), else the registered one, else the one that
    ``source`` (``module:object``) names."""
    if given is not None:
        if given.name != name:
            raise UsageError(f"holds scenario '{name}', not '{given.name}'")
        same = json.loads(json.dumps(given.config.to_dict())) == json.loads(json.dumps(config))
        return given if same else given.with_config(config, preset)
    if is_registered(name):
        return _rebuild(registered(name), config, preset)
    if not source:
        raise ScenarioNotFound(
            f"unknown scenario '{name}' (the file records no source module); import the module "
            f"that registers it (--plugin MODULE) or pass the scenario object"
        )
    obj = _import_source(name, source)
    if is_registered(name):  # importing the module registered it
        return _rebuild(registered(name), config, preset)
    if obj is None:
        raise ScenarioNotFound(
            f"scenario '{name}': '{source}' names no object after importing its module; "
            f"import the module that defines the scenario (--plugin MODULE)"
        )
    return _rebuild(obj, config, preset)
