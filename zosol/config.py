"""Typed training configuration with named presets.

``TrainConfig`` holds everything that decides how a corrector is trained; a run directory stores
it (JSON) beside the checkpoint, and ``--resume`` refuses a checkpoint of another config.
Presets: ``tiny`` (tests: seconds), ``default`` (a CPU laptop: minutes), ``paper`` (the SOL
residual network and long training).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["METHODS", "TrainConfig", "TRAIN_PRESETS", "train_config"]

#: trained methods; "src" (bare coarse solver) needs no training
METHODS = ("non", "nog-sol", "fo-sol", "zo-sol")


@dataclasses.dataclass
class TrainConfig:
    """How one corrector is trained.

    method: one of METHODS.  window: SOL unroll length m (NON always uses 1).
    epochs: passes over all training windows; batch_size: windows per optimizer step.
    lr: Adam learning rate, decayed by a cosine to ``lr * lr_final``.  loss: "mse" or "l1".
    model: "cnn" (``depth`` conv layers) or "resnet" (``depth`` residual blocks), ``width``
    channels, ``kernel`` size.  seed: model initialisation and window order.
    zo_*: the zeroth-order estimator of ZO-SOL: ``zo_scheme`` "central" or "forward", step
    ``zo_mu``, gradient ``zo_sparsity`` in [0, 1) with layer-wise ratios from ``zo_lpr``
    ("zo-grasp", "fo-grasp" or "uniform"), masks redrawn every ``zo_mask_every`` epochs,
    ``zo_chunk`` perturbations per batched evaluation (None: all at once; chunks of ~128 were
    3x faster than one huge batch here: they stay in cache), ``zo_reuse`` feature
    reuse.  ``grad_checks``: how many times during ZO-SOL training the ZO gradient is compared
    with the autograd (FO-SOL) gradient of the same window batch.
    """

    method: str = "zo-sol"
    window: int = 4
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    lr_final: float = 0.05
    loss: str = "mse"
    model: str = "cnn"
    width: int = 16
    depth: int = 3
    kernel: int = 5
    seed: int = 0
    zo_scheme: str = "central"
    zo_mu: float = 1e-3
    zo_sparsity: float = 0.0
    zo_lpr: str = "zo-grasp"
    zo_mask_every: int = 5
    zo_chunk: int | None = 128
    zo_reuse: bool = True
    grad_checks: int = 3
    device: str = "cpu"

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the bad field and what it accepts."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(self.method in METHODS, f"unknown method '{self.method}'; choose one of {list(METHODS)}")
        for name in ("window", "epochs", "batch_size", "width", "kernel", "zo_mask_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        need(isinstance(self.depth, int) and self.depth >= 1, f"depth must be an integer >= 1, got {self.depth!r}")
        need(self.kernel % 2 == 1, f"kernel must be odd (same-size convolutions), got {self.kernel}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 < self.lr_final <= 1, f"lr_final must be in (0, 1], got {self.lr_final}")
        need(self.loss in ("mse", "l1"), f"loss must be 'mse' or 'l1', got '{self.loss}'")
        need(self.model in ("cnn", "resnet"), f"model must be 'cnn' or 'resnet', got '{self.model}'")
        need(self.zo_scheme in ("central", "forward"), f"zo_scheme must be 'central' or 'forward', got '{self.zo_scheme}'")
        need(math.isfinite(self.zo_mu) and self.zo_mu > 0, f"zo_mu must be positive, got {self.zo_mu}")
        need(0 <= self.zo_sparsity < 1, f"zo_sparsity must be in [0, 1), got {self.zo_sparsity}")
        need(self.zo_lpr in ("zo-grasp", "fo-grasp", "uniform"),
             f"zo_lpr must be 'zo-grasp', 'fo-grasp' or 'uniform', got '{self.zo_lpr}'")
        need(self.zo_chunk is None or self.zo_chunk >= 1, f"zo_chunk must be >= 1 or None, got {self.zo_chunk}")
        need(self.grad_checks >= 0, f"grad_checks must be >= 0, got {self.grad_checks}")
        return self

    @property
    def effective_window(self) -> int:
        return 1 if self.method == "non" else self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(epochs=2, batch_size=8, window=2, width=6, depth=2, kernel=3, lr=2e-3, grad_checks=1),
    "default": dict(epochs=20, batch_size=16, window=4, width=8, depth=3, kernel=5, lr=1e-3),
    "paper": dict(epochs=100, batch_size=16, window=8, model="resnet", width=32, depth=5, kernel=5, lr=1e-4),
}


def train_config(preset: str = "default", scenario: str | None = None, **overrides: Any) -> TrainConfig:
    """The training preset ``preset``, adjusted for ``scenario`` (its ``train_presets``: e.g. a
    cheaper corrector for the 2-D scenarios on a CPU), then ``overrides``; validated."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset '{preset}'; choose one of {sorted(TRAIN_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(fields)}")
    per_scenario: dict[str, Any] = {}
    if scenario is not None:
        from .solvers import scenario_class
        per_scenario = scenario_class(scenario).train_presets.get(preset, {})
    return TrainConfig(**{**TRAIN_PRESETS[preset], **per_scenario, **overrides}).validate()
