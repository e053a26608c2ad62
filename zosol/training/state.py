"""What a training run is made of: the corrector, its optimizer and schedule, the window order's
generator, the history and the position in the run (:class:`RunState`), and what ``train``
returns (:class:`TrainResult`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import methods
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..models import build_corrector

__all__ = ["corrector_shape", "corrector_network", "make_corrector", "new_history", "RunState", "TrainResult"]


def corrector_shape(dataset: FidelityDataset) -> tuple[int, int, int]:
    """``(spatial dims, input channels, output channels)`` of the dataset's corrector: the
    state channels plus the scenario's feature channels in, the state channels out."""
    sc = dataset.scenario
    solver = sc.coarse_solver()
    sim = (dataset.train or dataset.test)[0]
    feats = sc.corrector_features(sim.params[None])
    in_ch = len(solver.channels) + (0 if feats is None else feats.shape[1])
    return len(solver.spatial_shape), in_ch, len(solver.channels)


def make_corrector(dataset: FidelityDataset, config: TrainConfig) -> torch.nn.Module:
    """The corrector network that ``config`` describes, sized for the dataset's scenario
    (seeds torch's global generator with ``config.seed`` first)."""
    shape = corrector_shape(dataset)
    torch.manual_seed(config.seed)
    return corrector_network(dataset, config, shape)


def corrector_network(dataset: FidelityDataset, config: TrainConfig, shape: tuple[int, int, int]) -> torch.nn.Module:
    """The network that ``config`` describes for ``shape`` = :func:`corrector_shape` (dim, in, out)
    of the dataset, unseeded (the caller seeds, or builds on the meta device)."""
    dim, in_ch, out_ch = shape
    return build_corrector(
        config.model,
        dim,
        in_ch,
        out_ch,
        width=config.width,
        depth=config.depth,
        kernel=config.kernel,
        padding_mode=dataset.scenario.padding_mode,
    )


def new_history(method: str | None = None) -> dict[str, Any]:
    """An empty run history: per-step ``loss``, ``epoch_loss``, ``wall_time`` (s), solver
    ``solver_calls`` / ``solver_samples``, and the keys ``method`` declares (:mod:`zosol.methods`,
    e.g. the ZO methods' gradient checks ``grad_cosine_vs_fo`` and ``zo_queries``)."""
    common = {"loss": [], "epoch_loss": [], "wall_time": 0.0, "solver_calls": 0, "solver_samples": 0}
    return {**common, **copy.deepcopy(methods.get(method).history if method is not None else {})}


@dataclass
class RunState:
    """Everything that changes while a run trains; a checkpoint stores all of it.

    ``perm``: this epoch's window order (None between epochs); ``position``: optimizer steps
    done in this epoch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    window_rng: torch.Generator
    history: dict[str, Any] = field(default_factory=new_history)
    epoch: int = 0
    position: int = 0
    perm: torch.Tensor | None = None

    @classmethod
    def fresh(cls, dataset: FidelityDataset, config: TrainConfig, device: torch.device, total_steps: int) -> RunState:
        """A new run: Adam at ``config.lr``, decayed by a cosine over ``total_steps`` to
        ``lr * lr_final``; windows ordered by a generator seeded with ``config.seed``."""
        model = make_corrector(dataset, config).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

        def schedule(k: int) -> float:
            return config.lr_final + (1 - config.lr_final) * 0.5 * (1 + math.cos(math.pi * k / total_steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return cls(model, optimizer, scheduler, torch.Generator().manual_seed(config.seed), new_history(config.method))

    def state_dict(self) -> dict[str, Any]:
        """The parts of a checkpoint that hold this state."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "perm": self.perm,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "window_rng": self.window_rng.get_state(),
            "history": self.history,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (see :meth:`state_dict`)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.window_rng.set_state(ckpt["window_rng"])
        self.history = ckpt["history"]
        self.epoch, self.position, self.perm = ckpt["epoch"], ckpt["position"], ckpt["perm"]


@dataclass
class TrainResult:
    """A trained corrector with its config and history; ``run_dir`` is where its checkpoint is
    (None: none written); ``extra["stopped_early"]`` when ``stop_after_steps`` stopped it."""

    model: torch.nn.Module
    config: TrainConfig
    history: dict[str, Any]
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
