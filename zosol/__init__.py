"""zosol: train neural correctors of black-box PDE solvers with zeroth-order Solver-in-the-Loop.

Subpackages: ``zosol.solvers`` (step functions and scenarios), ``zosol.datasets`` (fidelity
datasets in HDF5), ``zosol.zo`` (the DeepZero engine), and the training modules
``rollout``, ``models``, ``train``, ``metrics``, ``report``; ``zosol.cli`` is the command line.
"""

__version__ = "0.1.0"
