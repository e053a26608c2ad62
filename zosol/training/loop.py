"""The training loop, the same for every method:

    sample windows -> gradient source (loss, .grad) -> gradient check hook -> divergence checks
    -> optimizer and learning-rate schedule -> progress bar, timed checkpoint

Runs are reproducible from ``config.seed`` and resumable: the run directory holds
``checkpoint.pt`` (:mod:`zosol.training.checkpoint`), written atomically every epoch and at most
every ``checkpoint_seconds``.  A divergence guard stops a run whose loss, gradient or parameters
become non-finite, or whose solver blows up (``FloatingPointError``), leaving the last good
checkpoint.  SIGTERM (see :mod:`zosol.runtime.stop`) is honoured after the current step: the
loop checkpoints and raises :class:`~zosol.runtime.stop.Terminated`.  In a multi-process run
(:mod:`zosol.training.processes`) every process runs this loop; rank 0 writes and reports.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import zo
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..models import n_params
from ..runtime import stop
from ..runtime.launch import is_lead, rank_label, world
from ..runtime.options import RunOptions
from ..runtime.rundir import RunDirectory
from ..solvers.base import BlackBox, Solver, SolverError, trains_through_autograd
from .budget import check_memory
from .checkpoint import Checkpointer
from .errors import TrainingDiverged, TrainingError
from .gradcheck import GradientCheck
from .sources import SOURCES, GradientSource, SolverViews, source_class
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
            raise ValueError(f"{dataset.path}: no training simulations")
        source_cls = source_class(config.method)
        base = solver if solver is not None else dataset.scenario.coarse_solver()
        solvers = SolverViews.of(base, dataset.scenario, twin)
        if source_cls.needs == "differentiable" and not trains_through_autograd(base, twin):
            others = [n for n, s in SOURCES.items() if s.needs == "blackbox"]
            raise ValueError(
                f"{config.method} needs a differentiable solver; {type(base).__name__} is a black box "
                f"(use one of {others}, or pass a differentiable twin: twin=...)"
            )
        device = torch.device(config.device)
        windows = Windows(dataset, config.effective_window, device)
        check_memory(dataset, config, len(windows))
        steps_per_epoch = math.ceil(len(windows) / config.batch_size)
        state = RunState.fresh(dataset, config, device, steps_per_epoch * config.epochs)
        checkpointer = Checkpointer(run_dir, config, dataset)
        resumed = checkpointer.begin(state, options.resume, len(windows), steps_per_epoch)
        source = source_cls(state.model, config, windows, solvers, world_size > 1)
        source.prepare(state.history)
        state.history.update(world_size=world_size, backend=backend)  # how this (part of the) run ran
        if resumed:  # the counts go on from the checkpoint's (prepare's solver calls were counted there)
            solvers.restore(state.history)
        return cls(config, windows, state, source, solvers, checkpointer, options)

    def run(self) -> TrainResult:
        """Train to the last epoch (or ``options.stop_after_steps`` steps in this call, then
        checkpoint); SIGTERM stops it after the current step, checkpointed."""
        with stop.deferred():
            return self._train()

    def _train(self) -> TrainResult:
        s, cfg = self.state, self.config
        stop_after_steps, checkpoint_seconds = self.options.stop_after_steps, self.options.checkpoint_seconds
        bar = tqdm(
            total=self.total_steps,
            initial=s.epoch * self.steps_per_epoch + s.position,
            desc=" ".join(filter(None, (f"train {cfg.method}", rank_label()))),
            unit="step",
            disable=not self.progress,
        )
        self._started, self._wall_before = time.perf_counter(), s.history["wall_time"]
        cost = self.source.cost()
        if cost is not None:
            s.history["cost_model"] = cost
            if self.progress:
                tqdm.write(cost)
        last_save, done_here = time.perf_counter(), 0
        try:
            while s.epoch < cfg.epochs:
                if s.perm is None:
                    s.perm, s.position = self.windows.order(s.window_rng), 0
                self.source.start_epoch(s.epoch)
                while s.position < self.steps_per_epoch:
                    loss = self.step()
                    done_here += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3g}", epoch=s.epoch)
                    if stop_after_steps is not None and done_here >= stop_after_steps:
                        self.save()
                        return TrainResult(s.model, cfg, s.history, self._run_path, {"stopped_early": True})
                    self._honour_sigterm()
                    if self.checkpointer.path is not None and time.perf_counter() - last_save > checkpoint_seconds:
                        self.save()
                        last_save = time.perf_counter()
                self.end_epoch()
                last_save = time.perf_counter()
        finally:
            bar.close()
        s.history["parameters"] = n_params(s.model)
        self.save()
        self.checkpointer.write_history(s.history)
        return TrainResult(s.model, cfg, s.history, self._run_path)

    @property
    def _run_path(self) -> Path | None:
        return self.checkpointer.run_dir.path if self.checkpointer.run_dir is not None else None

    def _honour_sigterm(self) -> None:
        """After a step: if SIGTERM arrived (in any process of a multi-process run), checkpoint and
        raise Terminated (every process stops at the same step)."""
        flag = stop.requested()
        if self.source.distributed:
            t = torch.tensor([float(flag)], device=next(self.state.model.parameters()).device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.save()
            s = self.state
            where = (
                f"; checkpoint in {self._run_path}, rerun with --resume" if self.checkpointer.path is not None else ""
            )
            raise stop.Terminated(f"stopped by SIGTERM at epoch {s.epoch}, step {s.position}{where}")

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
        """The source's loss and gradient, then the gradient-check hook; solver failures and
        non-finite perturbed rollouts become training errors."""
        s = self.state
        try:
            loss = self.source.step(batch, s.history)
            self.check(s.epoch * self.steps_per_epoch + s.position, s.epoch, batch, s.history)
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
