"""Solvers and scenarios: what a simulator looks like to zosol (installed as ``zosol.solvers``)."""

from .base import (
    _BUILT_IN,
    BlackBox,
    Scenario,
    ScenarioConfig,
    Solver,
    SolverDivergedError,
    SolverError,
    check_state,
    get_scenario,
    is_registered,
    register,
    registered,
    scenario_class,
    scenario_names,
)
from .custom import CustomScenario, block_average, make_scenario
from .external import ExternalSolver, NumpySolver
from .plugins import ScenarioNotFound, load_plugin, load_twin, scenario_from_record
from .torch_step import TorchSolver


def _burgers1d():
    from .burgers1d import Burgers1DScenario

    return Burgers1DScenario


def _burgers2d():
    from .burgers2d import Burgers2DScenario

    return Burgers2DScenario


def _karman2d():
    from .karman2d import Karman2DScenario

    return Karman2DScenario


def _ks1d():
    from .ks1d import KS1DScenario

    return KS1DScenario


register("burgers1d", _burgers1d)
register("burgers2d", _burgers2d)
register("karman2d", _karman2d)
register("ks1d", _ks1d)
_BUILT_IN.update(("burgers1d", "burgers2d", "karman2d", "ks1d"))

__all__ = [
    "BlackBox",
    "CustomScenario",
    "ExternalSolver",
    "NumpySolver",
    "Scenario",
    "ScenarioConfig",
    "ScenarioNotFound",
    "Solver",
    "SolverDivergedError",
    "SolverError",
    "TorchSolver",
    "block_average",
    "check_state",
    "get_scenario",
    "is_registered",
    "load_plugin",
    "load_twin",
    "make_scenario",
    "register",
    "registered",
    "scenario_class",
    "scenario_from_record",
    "scenario_names",
]
