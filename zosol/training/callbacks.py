"""Callbacks of the training loop: what happens around the gradient step that is not the step.

The loop (:class:`~zosol.training.loop.TrainingLoop`) calls, in list order, for every callback:

* ``on_train_start(loop)`` once before the first step (its ``on_train_end(loop)`` runs when the
  run ends, however it ends, in reverse order);
* ``on_gradient(loop, batch)`` after the gradient source wrote ``.grad`` and before the optimizer
  step (a solver error raised here is reported like one of the source's own);
* ``on_step_end(loop, loss)`` after the optimizer step; a callback may call
  ``loop.request_stop(reason)``: the loop then skips the remaining callbacks of this step,
  checkpoints and returns;
* ``on_epoch_end(loop)`` after the epoch's checkpoint.

The loop builds its default list from the run controls (:meth:`TrainingLoop.callbacks`):
:class:`~zosol.training.gradcheck.GradientCheck`, :class:`ProgressBar`, :class:`StopAfterSteps`,
:class:`StopSignal` (SIGTERM: checkpoint, then :class:`~zosol.runtime.stop.Terminated`) and
:class:`TimedCheckpoint`; ``run(callbacks=...)`` appends more.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..config import TrainConfig
from ..runtime import stop
from ..runtime.launch import rank_label
from .checkpoint import Checkpointer
from .sources import GradientSource
from .state import RunState
from .windows import WindowBatch

__all__ = ["Callback", "LoopView", "ProgressBar", "StopAfterSteps", "StopSignal", "TimedCheckpoint"]


class LoopView(Protocol):
    """What a callback sees of the training loop (:class:`zosol.training.loop.TrainingLoop`)."""

    config: TrainConfig
    state: RunState
    source: GradientSource
    checkpointer: Checkpointer
    steps_per_epoch: int
    total_steps: int
    cost: str | None  #: the gradient source's cost model, if it has one
    run_path: Path | None  #: the run directory (None: a run without checkpoints)

    def save(self) -> None:
        """Checkpoint now (history's wall time and solver counts brought up to date)."""

    def request_stop(self, reason: dict) -> None:
        """Stop after this step, checkpointed; ``reason`` becomes the result's ``extra``."""


class Callback:
    """A training-loop callback; every hook does nothing unless overridden."""

    def on_train_start(self, loop: LoopView) -> None:
        """Before the first step of this call (also of a resumed run)."""

    def on_gradient(self, loop: LoopView, batch: WindowBatch) -> None:
        """The source wrote its gradient of ``batch`` into ``.grad``; the optimizer has not stepped."""

    def on_step_end(self, loop: LoopView, loss: float) -> None:
        """The optimizer stepped; ``loss`` is the step's window loss."""

    def on_epoch_end(self, loop: LoopView) -> None:
        """The epoch ended and was checkpointed."""

    def on_train_end(self, loop: LoopView) -> None:
        """The run ended (finished, stopped or failed)."""


class ProgressBar(Callback):
    """A tqdm bar over all steps of the run (and the gradient source's cost model, printed once)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_start(self, loop: LoopView) -> None:
        s = loop.state
        self.bar = tqdm(
            total=loop.total_steps,
            initial=s.epoch * loop.steps_per_epoch + s.position,
            desc=" ".join(filter(None, (f"train {loop.config.method}", rank_label()))),
            unit="step",
        )
        if loop.cost is not None:
            tqdm.write(loop.cost)

    def on_step_end(self, loop: LoopView, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3g}", epoch=loop.state.epoch)

    def on_train_end(self, loop: LoopView) -> None:
        if self.bar is not None:
            self.bar.close()


class StopAfterSteps(Callback):
    """Stop (checkpointed) after ``steps`` steps in this call: ``extra == {"stopped_early": True}``."""

    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def on_train_start(self, loop: LoopView) -> None:
        self.done = 0

    def on_step_end(self, loop: LoopView, loss: float) -> None:
        self.done += 1
        if self.done >= self.steps:
            loop.request_stop({"stopped_early": True})


class StopSignal(Callback):
    """SIGTERM (see :mod:`zosol.runtime.stop`) is deferred while training and honoured after the
    current step, in every process of a multi-process run at the same step: checkpoint, then
    raise :class:`~zosol.runtime.stop.Terminated`."""

    def __init__(self) -> None:
        self._deferred: contextlib.ExitStack | None = None

    def on_train_start(self, loop: LoopView) -> None:
        self._deferred = contextlib.ExitStack()
        self._deferred.enter_context(stop.deferred())

    def on_step_end(self, loop: LoopView, loss: float) -> None:
        device = next(loop.state.model.parameters()).device
        if stop.requested_by_any(loop.source.distributed, device):
            loop.save()
            s = loop.state
            where = (
                f"; checkpoint in {loop.run_path}, rerun with --resume" if loop.checkpointer.path is not None else ""
            )
            raise stop.Terminated(f"stopped by SIGTERM at epoch {s.epoch}, step {s.position}{where}")

    def on_train_end(self, loop: LoopView) -> None:
        if self._deferred is not None:
            self._deferred.close()
            self._deferred = None


class TimedCheckpoint(Callback):
    """Checkpoint at most every ``seconds`` between the end-of-epoch checkpoints (runs with a
    run directory only)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, 0.0

    def on_train_start(self, loop: LoopView) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, loop: LoopView, loss: float) -> None:
        if loop.checkpointer.path is not None and time.perf_counter() - self.last > self.seconds:
            loop.save()
            self.last = time.perf_counter()

    def on_epoch_end(self, loop: LoopView) -> None:
        self.last = time.perf_counter()
