"""Solvers and scenarios: what a simulator looks like to zosol (installed as ``zosol.solvers``)."""
from .base import (BlackBox, Scenario, ScenarioConfig, Solver, SolverDivergedError, SolverError, check_state,
                   get_scenario, register, scenario_class, scenario_names)


def _burgers1d():
    from .burgers1d import Burgers1DScenario
    return Burgers1DScenario


def _burgers2d():
    from .burgers2d import Burgers2DScenario
    return Burgers2DScenario


def _karman2d():
    from .karman2d import Karman2DScenario
    return Karman2DScenario


register("burgers1d", _burgers1d)
register("burgers2d", _burgers2d)
register("karman2d", _karman2d)

__all__ = ["BlackBox", "Scenario", "ScenarioConfig", "Solver", "SolverDivergedError", "SolverError", "check_state",
           "get_scenario", "register", "scenario_class", "scenario_names"]
