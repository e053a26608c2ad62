"""Typed training configuration with named presets.

``TrainConfig`` holds everything that decides how a corrector is trained; a run directory stores
it (JSON) beside the checkpoint, and ``--resume`` refuses a checkpoint of another config.
Each field declares its type (a ``Literal`` of the allowed values where it has them), help text and
bounds once (:func:`zosol.options.option`); validation, the CLI options and the lists of allowed
values elsewhere (``rollout.LOSSES``, ``models.CORRECTORS``, the registered gradient sources) derive
from these declarations; the ZO schemes are the engine's own ``zo.SCHEMES``.
Presets: ``tiny`` (tests: seconds), ``default`` (a CPU laptop: minutes), ``paper`` (the SOL
residual network and long training).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from .options import check_fields, option
from .zo.checks import SCHEMES

__all__ = ["METHODS", "LOSSES", "MODEL_KINDS", "ZO_LPRS", "TrainConfig", "TRAIN_PRESETS", "train_config"]

#: trained methods ("src", the bare coarse solver, needs no training); each has a gradient source
#: registered in zosol.training.sources
Method = Literal["non", "nog-sol", "fo-sol", "zo-sol", "zo-jac-sol"]
#: pointwise training losses (implemented in zosol.rollout)
Loss = Literal["mse", "l1"]
#: corrector networks (built by zosol.models)
ModelKind = Literal["cnn", "resnet"]
#: where sparse ZO-SOL's layer-wise pruning ratios come from (zosol.training.sparsity)
ZoLpr = Literal["zo-grasp", "fo-grasp", "uniform"]
#: finite-difference schemes: the ZO engine's own list
ZoScheme = Literal[SCHEMES]  # type: ignore[valid-type]
#: how ZO-JAC-SOL finds the sparsity pattern of the solver Jacobian (zosol.zo.jacobian)
JacPattern = Literal["auto", "probe", "stencil", "dense"]

METHODS: tuple[str, ...] = get_args(Method)
LOSSES: tuple[str, ...] = get_args(Loss)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
ZO_LPRS: tuple[str, ...] = get_args(ZoLpr)


@dataclasses.dataclass
class TrainConfig:
    """How one corrector is trained.  Each field declares its type, help text and bounds once
    (:mod:`zosol.options`); :meth:`validate`, the ``zosol train`` / ``compare`` options and their
    help are derived from these declarations."""

    method: Method = option("zo-sol", "training method")
    window: int = option(4, "SOL unroll length m (NON always uses 1)", ge=1, cap=10_000)
    epochs: int = option(10, "passes over all training windows", ge=1, cap=1_000_000)
    batch_size: int = option(16, "windows per optimizer step", ge=1, cap=1_000_000)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    lr_final: float = option(0.05, "final learning rate as a fraction of lr (cosine decay)", gt=0, le=1)
    loss: Loss = option("mse", "pointwise loss over window steps, channels and cells")
    model: ModelKind = option("cnn", "corrector: cnn (depth conv layers) or resnet (depth residual blocks)")
    width: int = option(16, "hidden channels of the corrector", ge=1, cap=4096)
    depth: int = option(3, "conv layers (cnn) or residual blocks (resnet)", ge=1, cap=1000)
    kernel: int = option(5, "convolution kernel size (odd: same-size convolutions)", ge=1, odd=True, cap=99)
    seed: int = option(0, "seed of the corrector's initialisation and the window order", ge=0, lt=2**63)
    zo_scheme: ZoScheme = option("central", "ZO-SOL finite-difference scheme")
    zo_mu: float = option(1e-3, "ZO-SOL finite-difference step", gt=0)
    zo_sparsity: float = option(0.0, "ZO-SOL gradient sparsity: share of coordinates not perturbed", ge=0, lt=1)
    zo_lpr: ZoLpr = option("zo-grasp", "ZO-SOL layer-wise pruning ratios of the sparse gradient")
    zo_mask_every: int = option(5, "ZO-SOL: epochs between redrawn sparsity masks", ge=1, cap=1_000_000)
    zo_chunk: int | None = option(
        128,
        "ZO-SOL perturbations per batched evaluation, none: all at once "
        "(chunks of ~128 were 3x faster than one huge batch here)",
        ge=1,
        cap=10_000_000,
    )
    zo_reuse: bool = option(True, "ZO-SOL feature reuse (unperturbed layers evaluated once)")
    grad_checks: int = option(
        3,
        "ZO-SOL / ZO-JAC-SOL: times the ZO gradient is compared with autograd (FO-SOL) on the same window batch",
        ge=0,
        cap=10_000,
    )
    jac_pattern: JacPattern = option(
        "auto",
        "ZO-JAC-SOL Jacobian pattern: auto (probe jac_probe_states training "
        "frames), probe, stencil (the solver's stencil_reach) or dense",
    )
    jac_margin: int = option(0, "ZO-JAC-SOL: cells added around the Jacobian pattern", ge=0, cap=1000)
    jac_probe_states: int = option(4, "ZO-JAC-SOL: training frames probed for the pattern", ge=1, cap=10_000)
    jac_batch: int | None = option(
        256, "ZO-JAC-SOL probe states per black-box call, none: all at once", ge=1, cap=10_000_000
    )
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the bad field and what it accepts (declared type, range, size
        cap; a device this machine has)."""
        check_fields(self)
        _check_device(self.device)
        return self

    @property
    def effective_window(self) -> int:
        return 1 if self.method == "non" else self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_device(device: str) -> None:
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:1', ..."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device '{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}': CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device '{device}': this machine has {n} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device '{device}' is not supported; use cpu, cuda or cuda:N")


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
