"""FO-SOL: autograd through the differentiable coarse solver over the whole window."""

from __future__ import annotations

from ..training.sources import AutogradSource
from .base import Method, register

__all__ = ["FoSolSource", "METHOD"]


class FoSolSource(AutogradSource):
    """Autograd through the differentiable solver (or the black box's differentiable twin)."""

    needs = "differentiable"


METHOD = register(Method("fo-sol", "FO-SOL", FoSolSource))
