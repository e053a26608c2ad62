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
METHODS = ("non", "nog-sol", "fo-sol", "zo-sol", "zo-jac-sol")


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
    reuse.  ``grad_checks``: how many times during ZO-SOL / ZO-JAC-SOL training the ZO gradient
    is compared with the autograd (FO-SOL) gradient of the same window batch.
    jac_*: the finite-difference solver Jacobians of ZO-JAC-SOL (step ``zo_mu`` on the state,
    ``zo_scheme`` differences): ``jac_pattern`` "auto" (probe ``jac_probe_states`` training frames),
    "probe", "stencil" (the solver's declared ``stencil_reach``) or "dense"; ``jac_margin`` cells
    added around the pattern; ``jac_batch`` probe states per black-box call (None: all at once).
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
    jac_pattern: str = "auto"
    jac_margin: int = 0
    jac_probe_states: int = 4
    jac_batch: int | None = 256
    device: str = "cpu"

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the bad field and what it accepts (type, range, size bound)."""
        _check_types(self)
        _check_ranges(self)
        _check_device(self.device)
        return self

    @property
    def effective_window(self) -> int:
        return 1 if self.method == "non" else self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: sane upper bounds of the size fields: far above any useful run, low enough that nothing is
#: allocated or looped over for minutes before a run could fail (memory is estimated separately)
MAX_SIZES = {"window": 10_000, "epochs": 1_000_000, "batch_size": 1_000_000, "width": 4096, "depth": 1000,
             "kernel": 99, "zo_mask_every": 1_000_000, "grad_checks": 10_000, "zo_chunk": 10_000_000,
             "jac_margin": 1000, "jac_probe_states": 10_000, "jac_batch": 10_000_000}
_INTS = ("window", "epochs", "batch_size", "width", "depth", "kernel", "zo_mask_every", "seed", "grad_checks",
         "jac_margin", "jac_probe_states")
_FLOATS = ("lr", "lr_final", "zo_mu", "zo_sparsity")
_STRS = ("method", "loss", "model", "zo_scheme", "zo_lpr", "device", "jac_pattern")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(c: TrainConfig) -> None:
    """Every field has its declared type (a bool is not an int; "no" is not a bool)."""
    for name in _INTS:
        v = getattr(c, name)
        _need(_is_int(v), f"{name} must be an integer, got {v!r}")
    for name in _FLOATS:
        v = getattr(c, name)
        _need((_is_int(v) or isinstance(v, float)) and math.isfinite(v), f"{name} must be a finite number, got {v!r}")
    for name in _STRS:
        v = getattr(c, name)
        _need(isinstance(v, str), f"{name} must be a string, got {v!r}")
    _need(c.zo_chunk is None or _is_int(c.zo_chunk), f"zo_chunk must be an integer or null, got {c.zo_chunk!r}")
    _need(c.jac_batch is None or _is_int(c.jac_batch), f"jac_batch must be an integer or null, got {c.jac_batch!r}")
    _need(isinstance(c.zo_reuse, bool), f"zo_reuse must be true or false, got {c.zo_reuse!r}")


def _check_ranges(c: TrainConfig) -> None:
    _need(c.method in METHODS, f"unknown method '{c.method}'; choose one of {list(METHODS)}")
    for name in ("window", "epochs", "batch_size", "width", "depth", "kernel", "zo_mask_every"):
        _need(getattr(c, name) >= 1, f"{name} must be an integer >= 1, got {getattr(c, name)!r}")
    for name, top in MAX_SIZES.items():
        v = getattr(c, name)
        _need(v is None or v <= top, f"{name} {v} is larger than the maximum {top}; choose a smaller {name}")
    _need(c.kernel % 2 == 1, f"kernel must be odd (same-size convolutions), got {c.kernel}")
    _need(0 <= c.seed < 2 ** 63, f"seed must be in [0, 2**63), got {c.seed}")
    _need(c.lr > 0, f"lr must be positive, got {c.lr}")
    _need(0 < c.lr_final <= 1, f"lr_final must be in (0, 1], got {c.lr_final}")
    _need(c.loss in ("mse", "l1"), f"loss must be 'mse' or 'l1', got '{c.loss}'")
    _need(c.model in ("cnn", "resnet"), f"model must be 'cnn' or 'resnet', got '{c.model}'")
    _need(c.zo_scheme in ("central", "forward"), f"zo_scheme must be 'central' or 'forward', got '{c.zo_scheme}'")
    _need(c.zo_mu > 0, f"zo_mu must be positive, got {c.zo_mu}")
    _need(0 <= c.zo_sparsity < 1, f"zo_sparsity must be in [0, 1), got {c.zo_sparsity}")
    _need(c.zo_lpr in ("zo-grasp", "fo-grasp", "uniform"),
          f"zo_lpr must be 'zo-grasp', 'fo-grasp' or 'uniform', got '{c.zo_lpr}'")
    _need(c.zo_chunk is None or c.zo_chunk >= 1, f"zo_chunk must be >= 1 or null, got {c.zo_chunk}")
    _need(c.grad_checks >= 0, f"grad_checks must be >= 0, got {c.grad_checks}")
    _need(c.jac_pattern in ("auto", "probe", "stencil", "dense"),
          f"jac_pattern must be 'auto', 'probe', 'stencil' or 'dense', got '{c.jac_pattern}'")
    _need(c.jac_margin >= 0, f"jac_margin must be >= 0, got {c.jac_margin}")
    _need(c.jac_probe_states >= 1, f"jac_probe_states must be >= 1, got {c.jac_probe_states}")
    _need(c.jac_batch is None or c.jac_batch >= 1, f"jac_batch must be >= 1 or null, got {c.jac_batch}")


def _check_device(device: str) -> None:
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:1', ..."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device '{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        _need(torch.cuda.is_available(), f"device '{device}': CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        _need(dev.index is None or dev.index < n, f"device '{device}': this machine has {n} CUDA device(s)")
    else:
        _need(dev.type == "cpu", f"device '{device}' is not supported; use cpu, cuda or cuda:N")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(epochs=2, batch_size=8, window=2, width=6, depth=2, kernel=3, lr=2e-3, grad_checks=1),
    "default": dict(epochs=20, batch_size=16, window=4, width=8, depth=3, kernel=5, lr=1e-3),
    "paper": dict(epochs=100, batch_size=16, window=8, model="resnet", width=32, depth=5, kernel=5, lr=1e-4),
}


def train_config(preset: str = "default", scenario: Any = None, **overrides: Any) -> TrainConfig:
    """The training preset ``preset``, adjusted for ``scenario`` (a name or a scenario object; its
    ``train_presets``: e.g. a cheaper corrector for the 2-D scenarios on a CPU), then
    ``overrides``; validated."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset '{preset}'; choose one of {sorted(TRAIN_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(fields)}")
    per_scenario: dict[str, Any] = {}
    if scenario is not None:
        from .solvers import registered
        entry = registered(scenario) if isinstance(scenario, str) else scenario
        per_scenario = entry.train_presets.get(preset, {})
    return TrainConfig(**{**TRAIN_PRESETS[preset], **per_scenario, **overrides}).validate()
