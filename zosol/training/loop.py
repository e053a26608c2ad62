"""The training loop, the same for every method:

    sample windows -> gradient source (loss, .grad) -> callbacks' on_gradient (gradient check)
    -> divergence checks -> optimizer and learning-rate schedule -> callbacks' on_step_end
    (progress bar, stop after N steps, SIGTERM, timed checkpoint)

What happens around the step is a list of callbacks (:mod:`zosol.training.callbacks`), built
from the run controls by :meth:`TrainingLoop.callbacks`.

Runs are reproducible from ``config.seed`` and resumable: the run directory holds
``checkpoint.pt`` (:mod:`zosol.training.checkpoint`), written atomically every epoch and at most
every ``checkpoint_seconds``.  A divergence guard stops a run whose loss, gradient or parameters
become non-finite, or whose solver blows up (``FloatingPointError``), leaving the last good
checkpoint.  SIGTERM (see :mod:`zosol.runtime.stop`) is honoured after the current step: the
loop checkpoints and raises :class:`~zosol.runtime.stop.Terminated`.  In a multi-process run
(:mod:`zosol.training.processes`) every process runs this loop; rank 0 writes and reports.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import methods, zo
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..errors import UsageError
from ..models import n_params
from ..runtime.launch import is_lead, world
from ..runtime.options import RunOptions
from ..runtime.rundir import RunDirectory
from ..solvers.base import BlackBox, Solver, SolverError, trains_through_autograd
from .budget import check_memory, check_time
from .callbacks import Callback, ProgressBar, StopAfterSteps, StopSignal, TimedCheckpoint
from .checkpoint import Checkpointer
from .errors import TrainingDiverged, TrainingError
from .gradcheck import GradientCheck
from .sources import GradientSource, SolverViews, source_class
from .state import RunState, TrainResult
from .windows import WindowBatch, Windows

__all__ = ["TrainingLoop"]


class TrainingLoop:
    """One run in this process: built by :meth:`setup`, trained by :meth:`run`."""

    def __init__(
        self,
        config: TrainConfig,
        windows: Windows,
        state: RunState,
        source: GradientSource,
        solvers: SolverViews,
        checkpointer: Checkpointer,
        options: RunOptions,
    ):
        self.config, self.windows, self.state, self.source = config, windows, state, source
        self.solvers, self.checkpointer, self.options = solvers, checkpointer, options
        self.progress = options.progress and is_lead()  # the lead process writes and reports
        self.steps_per_epoch = math.ceil(len(windows) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.check = GradientCheck(source, solvers, config.grad_checks, self.total_steps)
        self.active: list[Callback] = []  # the callbacks of the current run() call
        self.cost: str | None = None  # the source's cost model (set when a run starts)
        self.stop_reason: dict | None = None

    @classmethod
    def setup(
        cls,
        dataset: FidelityDataset,
        config: TrainConfig,
        run_dir: RunDirectory | None,
        options: RunOptions,
        solver: Solver | BlackBox | None = None,
        twin: Solver | None = None,
    ) -> TrainingLoop:
        """Build the solver views, windows, run state (resumed as ``options.resume`` says) and the
        gradient source."""
        _, world_size, backend = world()
        if not dataset.train:
            raise UsageError(f"{dataset.path}: no training simulations")
        source_cls = source_class(config.method)
        base = solver if solver is not None else dataset.scenario.coarse_solver()
        solvers = SolverViews.of(base, dataset.scenario, twin)
        if source_cls.needs == "differentiable" and not trains_through_autograd(base, twin):
            others = [m.name for m in methods.registered_methods() if m.needs == "blackbox"]
            raise UsageError(
                f"{config.method} needs a differentiable solver; {type(base).__name__} is a black box "
                f"(use one of {others}, or pass a differentiable twin: twin=... in Python, "
                f"--twin MODULE:OBJECT on the command line)"
            )
        device = torch.device(config.device)
        windows = Windows(dataset, config.effective_window, device)
        check_memory(dataset, config, len(windows))
        check_time(dataset, config, len(windows), announce=is_lead() and options.progress)
        steps_per_epoch = math.ceil(len(windows) / config.batch_size)
        state = RunState.fresh(dataset, config, device, steps_per_epoch * config.epochs)
        checkpointer = Checkpointer(run_dir, config, dataset)
        resumed = checkpointer.begin(state, options.resume, len(windows), steps_per_epoch)
        source = source_cls(state.model, config, windows, solvers, world_size > 1)
        source.run_dir = None if run_dir is None else run_dir.path
        source.prepare(state.history)
        state.history.update(world_size=world_size, backend=backend)  # how this (part of the) run ran
        if resumed:  # the counts go on from the checkpoint's (prepare's solver calls were counted there)
            solvers.restore(state.history)
        return cls(config, windows, state, source, solvers, checkpointer, options)

    def callbacks(self) -> list[Callback]:
        """The default callbacks of a run, from its options: gradient check, progress bar (lead
        process, if asked), stop after ``stop_after_steps`` steps, SIGTERM, a checkpoint every
        ``checkpoint_seconds``."""
        out: list[Callback] = [self.check]
        if self.progress:
            out.append(ProgressBar())
        if self.options.stop_after_steps is not None:
            out.append(StopAfterSteps(self.options.stop_after_steps))
        return [*out, StopSignal(), TimedCheckpoint(self.options.checkpoint_seconds)]

    def run(self, callbacks: Sequence[Callback] = ()) -> TrainResult:
        """Train to the last epoch (or ``options.stop_after_steps`` steps in this call, then
        checkpoint); SIGTERM stops it after the current step, checkpointed.  ``callbacks`` run
        after the default ones (:meth:`callbacks`)."""
        self.active = [*self.callbacks(), *callbacks]
        self.stop_reason = None
        s = self.state
        self._started, self._wall_before = time.perf_counter(), s.history["wall_time"]
        self.cost = self.source.cost()
        if self.cost is not None:
            s.history["cost_model"] = self.cost
        with contextlib.ExitStack() as ends:
            for cb in self.active:
                cb.on_train_start(self)
                ends.callback(cb.on_train_end, self)
            return self._train()

    def request_stop(self, reason: dict) -> None:
        """Called by a callback: stop after this step (checkpointed); ``reason`` becomes the
        result's ``extra``."""
        self.stop_reason = reason

    def _train(self) -> TrainResult:
        s, cfg = self.state, self.config
        while s.epoch < cfg.epochs:
            if s.perm is None:
                s.perm, s.position = self.windows.order(s.window_rng), 0
            self.source.start_epoch(s.epoch)
            while s.position < self.steps_per_epoch:
                loss = self.step()
                for cb in self.active:
                    cb.on_step_end(self, loss)
                    if self.stop_reason is not None:
                        self.save()
                        return TrainResult(s.model, cfg, s.history, self.run_path, self.stop_reason)
            self.end_epoch()
            for cb in self.active:
                cb.on_epoch_end(self)
        s.history["parameters"] = n_params(s.model)
        self.save()
        self.checkpointer.write_history(s.history)
        return TrainResult(s.model, cfg, s.history, self.run_path)

    @property
    def run_path(self) -> Path | None:
        """The run directory's path (None: a run without checkpoints)."""
        return self.checkpointer.run_dir.path if self.checkpointer.run_dir is not None else None

    def step(self) -> float:
        """One optimizer step on the next batch of this epoch's window order; returns the loss."""
        s, bs = self.state, self.config.batch_size
        batch = self.windows.batch(s.perm[s.position * bs : (s.position + 1) * bs])
        s.optimizer.zero_grad(set_to_none=True)
        loss = self._gradient(batch)
        loss_value = float(loss.detach())
        grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in s.model.parameters())
        if not math.isfinite(loss_value) or not grads_ok:
            raise TrainingDiverged(
                f"training diverged at epoch {s.epoch}, step {s.position}: loss {loss_value}"
                f"{'' if grads_ok else ', non-finite gradient'}; try a lower --lr or a smaller --window"
            )
        s.optimizer.step()
        s.scheduler.step()
        if not all(torch.isfinite(p).all() for p in s.model.parameters()):
            raise TrainingDiverged(
                f"training diverged at epoch {s.epoch}, step {s.position}: non-finite parameters; try a lower --lr"
            )
        s.history["loss"].append(loss_value)
        s.position += 1
        return loss_value

    def _gradient(self, batch: WindowBatch) -> torch.Tensor:
        """The source's loss and gradient, then the callbacks' ``on_gradient`` (the gradient check);
        solver failures and non-finite perturbed rollouts become training errors."""
        s = self.state
        try:
            loss = self.source.step(batch, s.history)
            for cb in self.active:
                cb.on_gradient(self, batch)
        except FloatingPointError as e:  # the solver blew up on the corrected states
            raise TrainingDiverged(
                f"training diverged at epoch {s.epoch}, step {s.position}: the coarse solver "
                f"blew up ({e}); try a lower --lr or a smaller --window"
            ) from e
        except SolverError as e:
            raise TrainingError(f"coarse solver failed at epoch {s.epoch}, step {s.position}: {e}") from e
        except zo.JacobianError as e:
            raise TrainingError(f"solver Jacobian failed at epoch {s.epoch}, step {s.position}: {e}") from e
        except zo.NonFiniteLossError as e:
            raise TrainingDiverged(
                f"training diverged at epoch {s.epoch}, step {s.position}: a perturbed "
                f"rollout's loss is not finite ({e}); try a lower --lr or --zo-mu"
            ) from e
        return loss

    def end_epoch(self) -> None:
        """Record the epoch's mean loss, move to the next epoch, checkpoint."""
        s = self.state
        recent = s.history["loss"][-self.steps_per_epoch :]
        s.history["epoch_loss"].append(sum(recent) / len(recent))
        s.epoch, s.position, s.perm = s.epoch + 1, 0, None
        self.save()

    def save(self) -> None:
        """Bring the history's wall time and solver counts up to date; write the checkpoint."""
        h = self.state.history
        h["wall_time"] = self._wall_before + time.perf_counter() - self._started
        self.solvers.sync(h)
        self.checkpointer.save(self.state, self.source.checkpoint_masks(self.state.epoch))
