"""A training method of a test's own, registered by ``--plugin scaled_nog``: NOG-SOL whose gradient
is multiplied by ``--scaled-factor`` (1: exactly NOG-SOL), counting its steps in the history."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from zosol.methods import Method, register
from zosol.options import option
from zosol.training import AutogradSource, WindowBatch


@dataclasses.dataclass
class ScaledOptions:
    prefix: ClassVar[str] = "scaled_"

    factor: float = option(1.0, "SCALED-NOG: factor on the NOG-SOL gradient", gt=0)


class ScaledNogSource(AutogradSource):
    needs = "blackbox"

    def step(self, batch: WindowBatch, history: dict[str, Any]) -> torch.Tensor:
        loss = super().step(batch, history)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(self.config.scaled_factor)
        history["scaled_steps"] += 1
        return loss


register(
    Method(
        "scaled-nog",
        "SCALED-NOG",
        ScaledNogSource,
        options=(ScaledOptions,),
        history={"scaled_steps": 0},
        entry=lambda h: {"scaled_steps": h["scaled_steps"]},
    )
)
