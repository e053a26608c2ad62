"""Checkpoints: a run directory's ``checkpoint.pt``, written atomically, read with checks.

A checkpoint holds the whole :class:`~zosol.training.state.RunState` (model, optimizer,
scheduler, window-order generator, epoch, position and order within it, history), the gradient
masks of sparse ZO-SOL, the config and a fingerprint of the dataset; resuming from it continues
the run bit for bit.  Resuming refuses a checkpoint of another config or dataset; ``load_run``
rebuilds a trained corrector.

Everything stored is plain data (dicts, lists, numbers, strings, tensors; the RNG state is a
tensor), and checkpoints are read with ``torch.load(weights_only=True)``: a file that would run
code when unpickled is refused, never executed.  Its contents are validated before use (keys,
types, the config, finite weights, epoch and position in range); a drift is a one-line
:class:`CheckpointError`.  Writes go to a fresh, exclusively created temporary file that is
renamed over ``checkpoint.pt`` (a planted symlink is replaced, never followed).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .. import methods
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..errors import UsageError
from ..runtime.files import atomic_save
from ..runtime.launch import broadcast_from_lead
from ..runtime.options import Resume
from ..runtime.rundir import RunDirectory
from .budget import check_corrector_fits, meta_corrector
from .errors import CheckpointError
from .state import RunState, make_corrector, new_history

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpointer",
    "load_run",
    "read_checkpoint",
    "fingerprint",
    "same_dataset",
    "dataset_differences",
    "restore_model",
]

CHECKPOINT_VERSION = 1
#: the keys of a checkpoint, each with the type it must have
_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "config": dict,
    "dataset": dict,
    "epoch": int,
    "position": int,
    "perm": (torch.Tensor, type(None)),
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "window_rng": torch.Tensor,
    "masks": (dict, type(None)),
    "history": dict,
}


def fingerprint(dataset: FidelityDataset) -> dict[str, Any]:
    """What identifies the data a run trains on: the scenario description, training seeds and the
    layout of a state (channels and coarse grid ``[C, *grid]``, parameters per simulation)."""
    sim = (dataset.train or dataset.test)[0]
    layout = {"state_shape": list(sim.trajectory.shape[1:]), "num_params": int(sim.params.numel())}
    return {**dataset.scenario.describe(), "train_seeds": [s.seed for s in dataset.train], "layout": layout}


def same_dataset(recorded: dict[str, Any], dataset: FidelityDataset) -> bool:
    """Whether a checkpoint's ``recorded`` fingerprint is ``dataset``'s (one written before the
    fingerprint held the layout is compared without it)."""
    now = fingerprint(dataset)
    if "layout" not in recorded:
        now.pop("layout")
    return recorded == now


def dataset_differences(recorded: dict[str, Any], dataset: FidelityDataset) -> tuple[list[str], list[str]]:
    """How ``dataset`` differs from the one a run was trained on (its checkpoint's ``recorded``
    fingerprint): ``(incompatible, other)``. Incompatible: another scenario, channels, grid or
    parameter count (the corrector cannot run on it); other: preset, config fields, training seeds
    (it can be evaluated there), each as ``"what: run's vs this"``."""
    now = fingerprint(dataset)
    incompatible, other = [], []
    if recorded.get("scenario") != now["scenario"]:
        incompatible.append(f"scenario: {recorded.get('scenario')} vs {now['scenario']}")
    for key, value in (recorded.get("layout") or {}).items():
        if now["layout"].get(key) != value:
            what = "channels and grid [C, *grid]" if key == "state_shape" else "parameters per simulation"
            incompatible.append(f"{what}: {value} vs {now['layout'].get(key)}")
    if recorded.get("preset") != now["preset"]:  # None: a config changed field by field
        other.append(f"preset: {recorded.get('preset') or 'custom'} vs {now['preset'] or 'custom'}")
    old_cfg, new_cfg = recorded.get("config") or {}, now["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            other.append(f"{key}: {old_cfg.get(key)} vs {new_cfg.get(key)}")
    if recorded.get("train_seeds") != now["train_seeds"] and not any(s.startswith("train_sims") for s in other):
        other.append("training seeds")
    return incompatible, other


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict at ``path``, read without running code (``weights_only=True``) and
    validated (:func:`_check_contents`); CheckpointError if missing, unreadable, unsafe, of
    another version or malformed."""
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint (train first, or check the run directory)")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that would run code
        raise CheckpointError(
            f"{path}: unreadable checkpoint (corrupt, truncated, or not plain data: "
            f"{_first_line(e, 120)}); retrain or restore it"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "zosol-checkpoint":
        raise CheckpointError(f"{path}: not a zosol checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')}, this zosol reads {CHECKPOINT_VERSION}; retrain"
        )
    _check_contents(ckpt, path)
    return ckpt


def _check_contents(ckpt: dict, path: Path) -> None:
    """Keys and types of every entry, the config, finite weights, epoch/position in range."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: damaged checkpoint: {what}; retrain or restore it")

    need(set(ckpt) == set(_SCHEMA), f"keys {sorted(set(ckpt) ^ set(_SCHEMA))} unexpected or missing")
    for key, kind in _SCHEMA.items():
        need(
            isinstance(ckpt[key], kind) and not isinstance(ckpt[key], bool), f"'{key}' is a {type(ckpt[key]).__name__}"
        )
    try:
        config = TrainConfig(**ckpt["config"]).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint: its config: {_first_line(e)}") from None
    model = ckpt["model"]
    need(bool(model) and all(isinstance(v, torch.Tensor) for v in model.values()), "the model holds no weights")
    need(
        all(v.is_floating_point() and bool(torch.isfinite(v).all()) for v in model.values()),
        "the model's weights are not all finite",
    )
    need(0 <= ckpt["epoch"] <= config.epochs, f"epoch {ckpt['epoch']} outside 0..{config.epochs}")
    need(
        ckpt["position"] >= 0 and (ckpt["perm"] is not None or ckpt["position"] == 0),
        f"position {ckpt['position']} in epoch {ckpt['epoch']}",
    )
    need(ckpt["perm"] is None or (ckpt["perm"].dim() == 1 and ckpt["perm"].dtype == torch.long), "'perm'")
    _check_optimizer(ckpt["optimizer"], [v.shape for v in model.values()], need)
    h, fresh = ckpt["history"], new_history(config.method)
    need(
        set(fresh) <= set(h) and all(isinstance(h[k], type(v)) for k, v in fresh.items() if v is not None),
        "its history",
    )
    need(all(isinstance(x, (int, float)) and math.isfinite(x) for x in h["loss"]), "non-finite losses in its history")
    for key in [k for k in ("solver_calls", "solver_samples", "zo_queries") if k in h]:
        need(
            isinstance(h[key], int) and not isinstance(h[key], bool) and h[key] >= 0, f"history {key} = {h[key]!r:.40}"
        )
    need(math.isfinite(h["wall_time"]) and h["wall_time"] >= 0, f"history wall_time = {h['wall_time']!r:.40}")
    sched = ckpt["scheduler"]
    need(
        isinstance(sched.get("last_epoch"), int) and isinstance(sched.get("_step_count"), int),
        "its learning-rate schedule",
    )
    need(sched.get("base_lrs") == [config.lr], f"its schedule's base learning rate {sched.get('base_lrs')!r:.60}")


def _check_optimizer(opt: dict, shapes: list[torch.Size], need) -> None:
    """Adam's per-parameter state: indices of the model's parameters (state-dict order), moment
    tensors of their shapes (``load_state_dict`` itself does not check)."""
    state = opt.get("state")
    need(isinstance(state, dict) and isinstance(opt.get("param_groups"), list), "its optimizer state")
    need(
        all(isinstance(i, int) and 0 <= i < len(shapes) and isinstance(e, dict) for i, e in state.items()),
        "its optimizer state names unknown parameters",
    )
    for i, entry in state.items():
        for name, t in entry.items():
            need(
                not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape == shapes[i],
                f"optimizer state '{name}' of parameter {i} has shape {tuple(getattr(t, 'shape', ()))}, "
                f"the parameter {tuple(shapes[i])}",
            )


def _check_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """CheckpointError naming the first mismatch if ``weights`` do not fit ``model``."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"{path}: damaged checkpoint: the model's weights do not match its config "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); retrain or restore it"
        )
    for k, v in own.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: damaged checkpoint: weight '{k}' has shape {tuple(weights[k].shape)}, "
                f"the config's network needs {tuple(v.shape)}; retrain or restore it"
            )


def restore_model(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(weights)`` after :func:`_check_weights`."""
    _check_weights(model, weights, path)
    model.load_state_dict(weights)


def _restore_state(state: RunState, ckpt: dict, n_windows: int, steps_per_epoch: int, path: Path) -> None:
    """Continue ``state`` from a validated checkpoint; a CheckpointError if it does not fit the run
    (weights, optimizer state shapes, window order, position, history length)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: damaged checkpoint: {what}; retrain or restore it")

    _check_weights(state.model, ckpt["model"], path)
    perm, pos = ckpt["perm"], ckpt["position"]
    need(
        perm is None or torch.equal(perm.sort().values, torch.arange(n_windows)),
        f"its window order is not a permutation of the {n_windows} training windows",
    )
    need(pos <= steps_per_epoch, f"position {pos} beyond the {steps_per_epoch} steps of an epoch")
    done = ckpt["epoch"] * steps_per_epoch + pos
    need(
        len(ckpt["history"]["loss"]) == done,
        f"epoch {ckpt['epoch']}, position {pos} disagree with its {len(ckpt['history']['loss'])} recorded steps",
    )
    sched = ckpt["scheduler"]
    need(
        sched["last_epoch"] == done and sched["_step_count"] == done + 1,
        f"its learning-rate schedule is at step {sched['last_epoch']}, the run at step {done}",
    )
    try:
        state.load_state_dict(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint: {_first_line(e)}; retrain or restore it") from None


def load_run(
    run_dir: str | os.PathLike | RunDirectory, dataset: FidelityDataset, *, other_data: bool = False
) -> tuple[torch.nn.Module, dict]:
    """The trained corrector and the checkpoint dict of a run directory, validated against
    ``dataset``: the one the run was trained on, or with ``other_data=True`` any dataset of the same
    scenario, channels, grid and parameter count (another preset, more test simulations);
    ``ckpt["dataset_differences"]`` then lists what differs (:func:`dataset_differences`)."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.existing(run_dir)
    ckpt = read_checkpoint(run.checkpoint)
    differences: list[str] = []
    if not same_dataset(ckpt["dataset"], dataset):
        incompatible, differences = dataset_differences(ckpt["dataset"], dataset)
        if incompatible or not other_data:
            trained = f"{ckpt['dataset'].get('scenario')}, {ckpt['dataset'].get('preset')}"
            why = "; ".join(incompatible or differences)
            fix = (
                "evaluate it on a dataset of the same scenario, channels and grid"
                if incompatible
                else "pass other_data=True (zosol evaluate RUN --data FILE) to evaluate it there"
            )
            raise CheckpointError(f"{run.path}: the run was trained on another dataset ({trained}; {why}); {fix}")
    config = TrainConfig(**ckpt["config"])
    try:
        check_corrector_fits(dataset, config)
    except ValueError as e:
        raise CheckpointError(f"{run.checkpoint}: damaged checkpoint: its config: {e}") from None
    _check_weights(meta_corrector(dataset, config), ckpt["model"], run.checkpoint)  # shapes first, no memory
    model = make_corrector(dataset, config)
    restore_model(model, ckpt["model"], run.checkpoint)
    ckpt["dataset_differences"] = differences
    return model, ckpt


def _save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a unique temporary file renamed over ``path``; an OSError names ``path``."""
    try:
        atomic_save(path, lambda f: torch.save(obj, f))
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


class Checkpointer:
    """The checkpoint of one run: ``checkpoint.pt`` of its :class:`RunDirectory` (None: nothing
    is written).  Only the directory's writer (rank 0 of a multi-process run) writes."""

    def __init__(self, run_dir: RunDirectory | None, config: TrainConfig, dataset: FidelityDataset):
        self.run_dir = run_dir
        self.path = run_dir.checkpoint if run_dir is not None else None
        self.config, self.dataset = config, dataset
        self.write = run_dir is not None and run_dir.writer

    def begin(self, state: RunState, resume: Resume, n_windows: int, steps_per_epoch: int) -> bool:
        """Resume ``state`` from the checkpoint (checked against config, dataset and the run's
        ``n_windows`` training windows in ``steps_per_epoch`` steps), or start a new run directory
        holding ``config.json``.  ``resume="auto"``: resume if rank 0 finds a checkpoint.
        Returns whether the run resumed."""
        if resume == "auto":
            resume = self.run_dir is not None and broadcast_from_lead(self.run_dir.has_checkpoint)
        if not resume:
            if self.run_dir is not None:
                self.run_dir.record_config(self.config.to_dict())
            return False
        if self.path is None:
            raise UsageError("resume needs a run directory")
        ckpt = broadcast_from_lead(lambda: read_checkpoint(self.path))  # rank 0's disk
        now = self.config.to_dict()
        # an option added since the checkpoint was written counts as its default there
        saved = {**{k: v for k, v in methods.option_defaults().items() if k in now}, **ckpt["config"]}
        if saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise CheckpointError(
                f"{self.path}: checkpoint from another config (checkpoint vs now: {diff}); "
                f"use the same options or a new run directory"
            )
        if not same_dataset(ckpt["dataset"], self.dataset):
            raise CheckpointError(f"{self.path}: checkpoint from another dataset; use the dataset it was trained on")
        _restore_state(state, ckpt, n_windows, steps_per_epoch, self.path)
        return True

    def save(self, state: RunState, masks: dict[str, torch.Tensor] | None) -> None:
        """Write the checkpoint atomically (a crash leaves the previous one)."""
        if not self.write:
            return
        _save_checkpoint(
            {
                "format": "zosol-checkpoint",
                "version": CHECKPOINT_VERSION,
                "config": self.config.to_dict(),
                "dataset": fingerprint(self.dataset),
                **state.state_dict(),
                "masks": masks,
            },
            self.path,
        )

    def write_history(self, history: dict[str, Any]) -> None:
        """``history.json`` at the end of a run."""
        if self.run_dir is not None:
            self.run_dir.record_history(history)
