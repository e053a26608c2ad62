"""Typed training configuration with named presets.

``TrainConfig`` holds everything that decides how a corrector is trained; a run directory stores
it (JSON) beside the checkpoint, and ``--resume`` refuses a checkpoint of another config.
It is composed of the options every method has (:class:`CommonOptions`) and the option groups of
the registered methods (:mod:`zosol.methods`: ``zo_mu``, ``jac_pattern``, ...), all flat keys.
Each option declares its type (a ``Literal`` of the allowed values where it has them), help text and
bounds once (:func:`zosol.options.option`); validation, the CLI options and the lists of allowed
values elsewhere (``rollout.LOSSES``, ``models.CORRECTORS``) derive from these declarations; the
allowed methods are the registered ones.
Presets: ``tiny`` (tests: seconds), ``default`` (a CPU laptop: minutes), ``paper`` (the SOL
residual network and long training).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Literal, get_args

from . import methods
from .errors import UsageError
from .options import Spec, check_fields, option, specs
from .options import field_defaults as _field_defaults

__all__ = ["LOSSES", "MODEL_KINDS", "CommonOptions", "TrainConfig", "TRAIN_PRESETS", "train_config"]

#: pointwise training losses (implemented in zosol.rollout)
Loss = Literal["mse", "l1"]
#: corrector networks (built by zosol.models)
ModelKind = Literal["cnn", "resnet"]

LOSSES: tuple[str, ...] = get_args(Loss)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)


@dataclasses.dataclass
class CommonOptions:
    """The training options of every method (each method adds its own groups: zosol.methods)."""

    prefix: ClassVar[str] = ""

    method: str = option("zo-sol", "training method")
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
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")


_LAST = ("device",)  # common keys listed after the methods' groups (the order of runs' config.json)
methods.reserve(set(specs(CommonOptions)))


def _defaults() -> dict[str, Any]:
    """Config key -> default of every common field and registered option group."""
    return {**_field_defaults(CommonOptions), **methods.option_defaults()}


class TrainConfig:
    """How one corrector is trained: the common options (:class:`CommonOptions`) and the option
    groups of every registered method (:mod:`zosol.methods`), each a flat attribute
    (``config.lr``, ``config.zo_mu``, ``config.jac_pattern``) and a key of :meth:`to_dict`.

    Each option declares its type, help text and bounds once (:mod:`zosol.options`);
    :meth:`validate`, the ``zosol train`` / ``compare`` options and their help derive from these
    declarations (:meth:`option_specs`).  ``TrainConfig(**config.to_dict())`` gives the same config."""

    def __init__(self, **values: Any):
        declared = self.option_specs()
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise UsageError(
                f"unknown training option(s) {unknown}; valid: {sorted(declared)} (an option of a "
                f"method of your own needs its plugin loaded first)"
            )
        defaults = _defaults()
        for key in declared:
            setattr(self, key, values[key] if key in values else defaults[key])

    @classmethod
    def option_specs(cls) -> dict[str, Spec]:
        """Config key -> :class:`~zosol.options.Spec`: the common fields and the registered
        methods' option groups (``method``'s choices: the registered methods)."""
        common = specs(CommonOptions)
        out = {k: s for k, s in common.items() if k not in _LAST}
        out["method"] = dataclasses.replace(out["method"], kind="choice", choices=methods.names())
        out.update(methods.option_groups())
        out.update({k: common[k] for k in _LAST})
        return out

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the bad field and what it accepts (declared type, range, size
        cap; a registered method; a device this machine has)."""
        check_fields(self)
        _check_device(self.device)
        return self

    @property
    def effective_window(self) -> int:
        """The window the method trains on: ``window``, or 1 for a method that does not unroll (NON)."""
        return self.window if methods.get(self.method).unrolled else 1

    def to_dict(self) -> dict[str, Any]:
        """Every option by its config key (what a run directory's config.json holds)."""
        return dict(vars(self))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (config keys), not validated."""
        return TrainConfig(**{**self.to_dict(), **changes})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "TrainConfig(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"

    def __reduce__(self) -> tuple:
        """Pickled with the module of its method, which a worker process imports first if the
        method is not registered there (a plugin's method)."""
        module = methods.get(self.method).source.__module__ if self.method in methods.names() else None
        return _unpickle, (self.to_dict(), module)


def _unpickle(values: dict[str, Any], module: str | None) -> TrainConfig:
    if module is not None and values.get("method") not in methods.names():
        importlib.import_module(module)
    return TrainConfig(**values)


def _check_device(device: str) -> None:
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:1', ..."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"device '{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{device}': CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"device '{device}': this machine has {n} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"device '{device}' is not supported; use cpu, cuda or cuda:N")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(epochs=2, batch_size=8, window=2, width=6, depth=2, kernel=3, lr=2e-3, grad_checks=1),
    "default": dict(epochs=20, batch_size=16, window=4, width=8, depth=3, kernel=5, lr=1e-3),
    "paper": dict(epochs=100, batch_size=16, window=8, model="resnet", width=32, depth=5, kernel=5, lr=1e-4),
}


def train_config(preset: str = "default", scenario: Any = None, **overrides: Any) -> TrainConfig:
    """The training preset ``preset``, adjusted for ``scenario`` (a name or a scenario object; its
    ``train_presets``: e.g. a cheaper corrector for the 2-D scenarios on a CPU), then
    ``overrides``; validated."""
    fields = set(TrainConfig.option_specs())
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"unknown training option(s) {unknown}; valid: {sorted(fields)}")
    per_scenario: dict[str, dict[str, Any]] = {}
    if scenario is not None:
        from .solvers import registered

        entry = registered(scenario) if isinstance(scenario, str) else scenario
        per_scenario = entry.train_presets
    if preset not in TRAIN_PRESETS and preset not in per_scenario:
        known = sorted(set(TRAIN_PRESETS) | set(per_scenario))
        raise UsageError(f"unknown training preset '{preset}'; choose one of {known}")
    # a scenario's own preset (e.g. karman2d "large") starts from the common "default"
    base = TRAIN_PRESETS.get(preset, TRAIN_PRESETS["default"])
    return TrainConfig(**{**base, **per_scenario.get(preset, {}), **overrides}).validate()


def __getattr__(name: str) -> Any:
    """``METHODS``: the registered method names (:func:`zosol.methods.names`), read when asked."""
    if name == "METHODS":
        return methods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
