"""Checkpoints: a run directory's ``checkpoint.pt``, written atomically, read with checks.

A checkpoint holds the whole :class:`~zosol.training.state.RunState` (model, optimizer,
scheduler, window-order generator, epoch, position and order within it, history), the gradient
masks of sparse ZO-SOL, the config and a fingerprint of the dataset; resuming from it continues
the run bit for bit.  Resuming refuses a checkpoint of another config or dataset; ``load_run``
rebuilds a trained corrector.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from .errors import CheckpointError
from .launch import broadcast_from_lead
from .state import RunState, make_corrector

__all__ = ["CHECKPOINT_VERSION", "Checkpointer", "load_run", "read_checkpoint", "fingerprint"]

CHECKPOINT_VERSION = 1


def fingerprint(dataset: FidelityDataset) -> dict[str, Any]:
    """What identifies the data a run trains on: the scenario description and training seeds."""
    return {**dataset.scenario.describe(), "train_seeds": [s.seed for s in dataset.train]}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict at ``path``; CheckpointError if missing, unreadable or of another version."""
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint (train first, or check the run directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint (corrupt or truncated?): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "zosol-checkpoint":
        raise CheckpointError(f"{path}: not a zosol checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')}, this zosol reads "
                              f"{CHECKPOINT_VERSION}; retrain")
    return ckpt


def load_run(run_dir: str | os.PathLike, dataset: FidelityDataset) -> tuple[torch.nn.Module, dict]:
    """The trained corrector and the checkpoint dict of a run directory, validated against the
    dataset the run must have been trained on."""
    ckpt = read_checkpoint(Path(run_dir) / "checkpoint.pt")
    if ckpt["dataset"] != fingerprint(dataset):
        raise CheckpointError(f"{run_dir}: the run was trained on another dataset "
                              f"({ckpt['dataset'].get('scenario')}, {ckpt['dataset'].get('preset')})")
    model = make_corrector(dataset, TrainConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


class Checkpointer:
    """The checkpoint of one run: ``run_dir/checkpoint.pt`` (``run_dir=None``: nothing is written).

    Only the process with ``write=True`` writes (rank 0 of a multi-process run)."""

    def __init__(self, run_dir: str | os.PathLike | None, config: TrainConfig, dataset: FidelityDataset,
                 write: bool = True):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.path = self.run_dir / "checkpoint.pt" if self.run_dir is not None else None
        self.config, self.dataset, self.write = config, dataset, write

    def begin(self, state: RunState, resume: bool) -> None:
        """Resume ``state`` from the checkpoint (checked against config and dataset), or start a
        new run directory holding ``config.json``."""
        if resume:
            if self.path is None:
                raise ValueError("resume needs a run directory")
            ckpt = broadcast_from_lead(lambda: read_checkpoint(self.path))  # rank 0's disk
            now = self.config.to_dict()
            if ckpt["config"] != now:
                diff = {k: (ckpt["config"].get(k), v) for k, v in now.items() if ckpt["config"].get(k) != v}
                raise CheckpointError(f"{self.path}: checkpoint from another config (checkpoint vs now: {diff}); "
                                      f"use the same options or a new run directory")
            if ckpt["dataset"] != fingerprint(self.dataset):
                raise CheckpointError(f"{self.path}: checkpoint from another dataset; use the dataset it was "
                                      f"trained on")
            state.load_state_dict(ckpt)
        elif self.run_dir is not None and self.write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))

    def save(self, state: RunState, masks: dict[str, torch.Tensor] | None) -> None:
        """Write the checkpoint atomically (a crash leaves the previous one)."""
        if self.path is None or not self.write:
            return
        _atomic_save({"format": "zosol-checkpoint", "version": CHECKPOINT_VERSION, "config": self.config.to_dict(),
                      "dataset": fingerprint(self.dataset), **state.state_dict(), "masks": masks}, self.path)

    def write_history(self, history: dict[str, Any]) -> None:
        """``run_dir/history.json`` at the end of a run."""
        if self.path is not None and self.write:
            (self.run_dir / "history.json").write_text(json.dumps(history, indent=1))
