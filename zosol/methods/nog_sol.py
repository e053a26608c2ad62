"""NOG-SOL: the unrolled m-step window with the gradient cut at every solver call (black-box
solver, autograd through the network only; List et al. 2024)."""

from __future__ import annotations

from ..training.sources import AutogradSource
from .base import Method, register

__all__ = ["NogSolSource", "METHOD"]


class NogSolSource(AutogradSource):
    """The black-box solver in the window, autograd through the corrector only."""

    needs = "blackbox"


METHOD = register(Method("nog-sol", "NOG-SOL", NogSolSource))
