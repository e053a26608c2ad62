"""NON: one-step training on pre-computed pairs (coarse step of a reference frame, next reference
frame); the corrector never sees its own corrections (m = 1, whatever ``window`` says)."""

from __future__ import annotations

from typing import Any

import torch

from ..training.sources import AutogradSource, Step
from ..training.windows import WindowBatch
from .base import Method, register

__all__ = ["NonSource", "METHOD"]


class NonSource(AutogradSource):
    """The coarse step of every reference frame is computed once (black box); m = 1."""

    needs = "blackbox"

    def prepare(self, history: dict[str, Any]) -> None:
        w = self.windows
        with torch.no_grad():
            traj = w.traj
            flat = traj[:, :-1].reshape(-1, *traj.shape[2:])
            p = w.params.repeat_interleave(traj.shape[1] - 1, 0) if w.num_params else None
            self.coarse_next = self.solver_step(flat, p).view(traj.shape[0], traj.shape[1] - 1, *traj.shape[2:])

    def _step_fn(self, batch: WindowBatch) -> Step:
        cached = self.coarse_next[batch.sim, batch.frame]
        return lambda s, p: cached


METHOD = register(Method("non", "NON", NonSource, unrolled=False))
