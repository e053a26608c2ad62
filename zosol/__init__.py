"""zosol: train neural correctors of black-box PDE solvers with zeroth-order Solver-in-the-Loop.

The user API is here, imported lazily (``import zosol`` costs no torch or matplotlib import until
a name is used)::

    import zosol

    scenario = zosol.get_scenario("burgers1d", "tiny")
    dataset = zosol.load_dataset(zosol.generate(scenario, out="datasets"))
    result = zosol.train(dataset, zosol.train_config("tiny", scenario, method="zo-sol"), "runs/zo-sol")
    print(zosol.evaluate(dataset, result.model)["mae_mean"])

========================  =====================================================================
``train``                 train one method (:mod:`zosol.training`)
``evaluate``              score a corrector on the test simulations (:mod:`zosol.evaluation`)
``compare``               generate, train every method, evaluate, write reports (:mod:`zosol.compare`)
``generate``              write a fidelity dataset (:mod:`zosol.datasets`)
``load_dataset``          open one
``TrainConfig``           training options; ``train_config`` builds one from a preset
``get_scenario``          a registered scenario; ``make_scenario`` one from your own solvers;
                          ``register`` a scenario of your own (:mod:`zosol.solvers`)
``NumpySolver``           your NumPy step function as a black-box solver; ``ExternalSolver``
                          a solver in another program (:mod:`zosol.solvers.external`)
``check_gradient``        is a method's gradient through your solver right? (:mod:`zosol.training.gradcheck`)
``window_gradients``      a method's gradient and a reference gradient on one window batch, as vectors
========================  =====================================================================

Packages: ``zosol.solvers`` (solvers and scenarios), ``zosol.datasets`` (HDF5 fidelity datasets),
``zosol.training`` (the training loop and its methods), ``zosol.zo`` (the PDE-independent
zeroth-order engine), ``zosol.bench`` (benchmarks); ``zosol.cli`` is the command line.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

#: public name -> the module it lives in
_API = {
    "train": "zosol.training",
    "evaluate": "zosol.evaluation",
    "compare": "zosol.compare",
    "generate": "zosol.datasets",
    "load_dataset": "zosol.datasets",
    "TrainConfig": "zosol.config",
    "train_config": "zosol.config",
    "get_scenario": "zosol.solvers",
    "make_scenario": "zosol.solvers",
    "register": "zosol.solvers",
    "NumpySolver": "zosol.solvers",
    "ExternalSolver": "zosol.solvers",
    "check_gradient": "zosol.training.gradcheck",
    "window_gradients": "zosol.training.gradcheck",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    """Import the module of a public name on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'zosol' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API and the version (what ``dir(zosol)`` and tab completion show)."""
    return sorted(__all__)


class _Package(types.ModuleType):
    """``zosol.compare`` is the function even after ``import zosol.compare``: the import system
    binds a loaded submodule as an attribute of its package, which would hide the public function
    of the same name (the submodule stays importable as ``from zosol.compare import ...``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
