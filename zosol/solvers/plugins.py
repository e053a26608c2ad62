"""Scenarios of your own in any process: plugins, entry points, and rebuilding a dataset's scenario.

* ``load_plugin("my_pde")`` imports a module that registers scenarios
  (``zosol.solvers.register("my_pde", scenario)``); the CLI's ``--plugin MODULE`` calls it.  A
  module in the current directory is found, but never in place of an installed package of the
  same name: the directory is appended to ``sys.path``, not put first.
* ``load_twin("my_pde:twin")`` imports a module and returns its differentiable twin of the coarse
  solver (a Solver, e.g. ``TorchSolver(...)``, or a function returning one); the CLI's
  ``--twin MODULE:OBJECT`` calls it (a module the user names, as with ``--plugin``).
* Installed packages can declare scenarios in the entry-point group ``zosol.scenarios``
  (``my_pde = "my_package.module:scenario"``, the object being a Scenario subclass, a scenario
  object, or a zero-argument function returning either); they are found by name on first use.
* :func:`scenario_from_record` rebuilds the scenario a dataset was made with from what the file
  records: the name, the config and ``source`` (``module:object``).  Files from others are data,
  never code: the recorded source is never imported nor called.  Scenario code runs only from
  what the user names (``--plugin``, ``load_dataset(..., scenario=)``, an installed entry point,
  a module the program imported itself); a dataset of a scenario that is not loaded says which
  module it was made with and how to load it.
"""

from __future__ import annotations

import importlib
import json
import os
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
    "source_module",
    "excerpt",
    "loaded_plugins",
]

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: longest excerpt of a refused text (a file's attribute, a program's reply) quoted in a message
EXCERPT_CHARS = 160


class ScenarioNotFound(UsageError, LookupError):
    """The scenario of a dataset or a command line is neither registered nor importable."""


def excerpt(text: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr``-quoted ``text`` cut to ``limit`` characters (with the full length), for messages
    that refuse what a file or a program sent."""
    s = str(text)
    if len(s) <= limit:
        return repr(s)
    return repr(s[:limit]) + f"... ({len(s):,} characters)"


def _where(e: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of ``e`` (the line of a SyntaxError)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" ({e.filename}:{e.lineno})"
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def load_plugin(module: str) -> ModuleType:
    """Import ``module`` (a dotted name on ``sys.path``; the current directory is searched last)
    so that the scenarios it registers become available by name.  UsageError (one line) when it
    cannot be found or fails while importing."""
    if not _DOTTED.match(module or ""):
        raise UsageError(
            f"--plugin expects an importable module name such as 'my_pde' or 'pkg.scenarios', "
            f"got {excerpt(module)} (for a file my_pde.py, pass 'my_pde' and run from its folder)"
        )
    here = os.getcwd()
    if here not in sys.path:
        sys.path.append(here)  # a plugin next to the user's command, after every installed package
    try:
        imported = importlib.import_module(module)
        if module not in _LOADED:
            _LOADED.append(module)
        return imported
    except ModuleNotFoundError as e:
        if e.name and module.split(".")[0] != e.name.split(".")[0] and e.name in str(e):
            raise UsageError(f"plugin '{module}' failed while importing: {e}{_where(e)}") from None
        raise UsageError(
            f"plugin '{module}' cannot be imported: {e} (put its folder on PYTHONPATH or run from there)"
        ) from None
    except (Exception, SystemExit) as e:  # the plugin's own fault, in one line
        what = f"{type(e).__name__}: {excerpt(e, 300) if str(e) else ''}".rstrip(": ")
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) or e.code is None else excerpt(e.code, 60)
            what = f"it called sys.exit({'' if code is None else code})"
        raise UsageError(f"plugin '{module}' failed while importing: {what}{_where(e)}") from None


_LOADED: list[str] = []  # the plugin modules this process imported, in order


def loaded_plugins() -> tuple[str, ...]:
    """The modules :func:`load_plugin` imported in this process (workers import them by name)."""
    return tuple(_LOADED)


def source_module(source: str | None) -> str | None:
    """The module part of a recorded ``module:object`` source, if it is a plain dotted name."""
    module = (source or "").partition(":")[0]
    return module if _DOTTED.match(module) else None


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
    """A registered Scenario class or scenario object at the recorded config (loaders were called
    by :func:`~zosol.solvers.base.registered`; nothing named by a file is ever called here)."""
    if isinstance(entry, Scenario):
        return entry.with_config(config, preset)
    if isinstance(entry, type) and issubclass(entry, Scenario):
        return entry.from_config_dict(config, preset=preset)
    raise TypeError(f"{type(entry).__name__} is not a Scenario class or a scenario object")


def _entry_source(entry: Any) -> str | None:
    if isinstance(entry, Scenario):
        return entry.source
    if isinstance(entry, type):
        return f"{entry.__module__}:{entry.__qualname__}"
    return None


def _check_source(name: str, entry: Any, source: str | None) -> None:
    """A file that records another implementation of ``name`` than the registered one is refused
    (a record that names one scenario and the code of another)."""
    own = _entry_source(entry)
    if not source or own is None or source == own:
        return
    recorded, current = source_module(source), own.partition(":")[0]
    if recorded in ("__main__", None) or current == "__main__" or not own.startswith("zosol."):
        return  # a user's scenario moved from a script or between modules: the physics check decides
    raise ScenarioNotFound(
        f"records scenario '{name}' but the source {excerpt(source)}, while '{name}' is zosol's {own}; "
        f"the file's name and source disagree (a crafted or damaged file)"
    )


def _unknown_config_keys(entry: Any, config: dict[str, Any]) -> list[str]:
    import dataclasses

    cls = entry.Config if isinstance(entry, type) else type(entry.config)
    fields = {f.name for f in dataclasses.fields(cls)}
    return sorted(set(config) - fields)


def _already_loaded(name: str, source: str | None) -> Any:
    """The object ``source`` names when its module was already imported by this program (never
    imported here) and it is a scenario of this ``name`` (never called here); else None."""
    module = source_module(source)
    if module is None or module == "__main__" or module not in sys.modules:
        return None
    obj: Any = sys.modules[module]
    for part in source.partition(":")[2].split(".") if ":" in source else ["?"]:
        obj = getattr(obj, part, None) if part.isidentifier() else None
    named = isinstance(obj, Scenario) or (isinstance(obj, type) and issubclass(obj, Scenario))
    return obj if named and getattr(obj, "name", None) == name else None


def _how_to_load(name: str, source: str | None) -> str:
    """Why the scenario ``name`` is not available and how to load it, naming the recorded module
    without importing it."""
    module = source_module(source)
    if not source:
        return (
            f"unknown scenario '{name}' (the file records no source module); import the module "
            f"that registers it (--plugin MODULE) or pass the scenario object"
        )
    if module is None:
        return (
            f"scenario '{name}' is not registered and its recorded source {excerpt(source)} is not "
            f"a 'module:object' path; import the module that defines it (--plugin MODULE)"
        )
    if module == "__main__":
        return (
            f"scenario '{name}' is not registered in this process: it was made in a script run as __main__ "
            f"(object {excerpt(source.partition(':')[2], 60)}), which another process cannot import; move the "
            f"scenario into a module, then import that module (--plugin MODULE) or pass the scenario object "
            f"(load_dataset(path, scenario=...))"
        )
    return (
        f"scenario '{name}' is not loaded: the file says it was made with module '{module}' (source "
        f"{excerpt(source, 80)}), which zosol does not import on a file's word; if you trust that module, "
        f"load it with --plugin {module} (its folder on PYTHONPATH or the current directory), or in Python "
        f"import it first or pass the scenario object (load_dataset(path, scenario=...))"
    )


def scenario_from_record(
    name: str, config: dict[str, Any], preset: str | None, source: str | None = None, given: Scenario | None = None
) -> Scenario:
    """The scenario ``name`` with the recorded ``config``: ``given`` (a scenario object, reused
    as it is when its config equals the record), else the registered one, else the object that
    ``source`` (``module:object``) names in a module this program already imported.  Nothing
    the record names is imported or called: ScenarioNotFound says which module to load."""
    if given is not None:
        if given.name != name:
            raise UsageError(f"holds scenario '{name}', not '{given.name}'")
        same = json.loads(json.dumps(given.config.to_dict())) == json.loads(json.dumps(config))
        return given if same else given.with_config(config, preset)
    if is_registered(name):
        entry = registered(name)
        _check_source(name, entry, source)
    else:
        entry = _already_loaded(name, source)
        if entry is None:
            raise ScenarioNotFound(_how_to_load(name, source))
    unknown = _unknown_config_keys(entry, config)
    if unknown:
        raise UsageError(
            f"its config has field(s) {excerpt(unknown, 120)} that scenario '{name}' does not have "
            f"(a crafted file, or one made by another version)"
        )
    return _rebuild(entry, config, preset)
