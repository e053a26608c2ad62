"""Declared options (zosol.options): TrainConfig and scenario configs state each field's type, help
and bounds once; validation, the CLI options and the lists of allowed values derive from that."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from zosol import methods, zo
from zosol.cli import _train_overrides, build_parser
from zosol.config import LOSSES, MODEL_KINDS, TrainConfig, train_config
from zosol.models import CORRECTORS
from zosol.options import check_fields, option, parse_bool, specs
from zosol.rollout import LOSSES as ROLLOUT_LOSSES
from zosol.solvers import get_scenario
from zosol.training import GradientSource

FIELDS = list(specs(TrainConfig))


def _args(command: str, *extra: str):
    base = ["--scenario", "burgers1d"] + (["--method", "zo-sol"] if command == "train" else [])
    return build_parser().parse_args([command, *base, *extra])


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_training_field_is_a_cli_option(command):
    """One --option per TrainConfig field (method: train's --method / compare's --methods)."""
    values = {
        "kernel": "7",
        "lr_final": "0.1",
        "zo_mask_every": "2",
        "zo_reuse": "false",
        "grad_checks": "0",
        "zo_chunk": "none",
        "loss": "l1",
        "model": "resnet",
        "zo_scheme": "forward",
        "zo_lpr": "uniform",
        "device": "cpu",
        "seed": "3",
        "window": "2",
        "epochs": "4",
        "batch_size": "5",
        "lr": "0.01",
        "width": "6",
        "depth": "2",
        "zo_mu": "0.002",
        "zo_sparsity": "0.5",
        "jac_pattern": "dense",
        "jac_margin": "1",
        "jac_probe_states": "2",
        "jac_batch": "none",
        "jac_mode": "reference",
        "jac_scheme": "central",
        "jac_reach": "1",
        "jac_shape": "diamond",
        "jac_max_reach": "2",
        "jac_references": "frame",
        "jac_ref_stride": "5",
        "jac_frame_reach": "4",
        "jac_check_every": "3",
        "jac_tol": "0.1",
    }
    assert set(values) == set(FIELDS) - {"method"}
    extra = [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), v)]
    overrides = _train_overrides(_args(command, *extra))
    cfg = train_config("tiny", method="zo-sol", **overrides)
    assert (cfg.kernel, cfg.lr_final, cfg.zo_mask_every, cfg.zo_reuse, cfg.grad_checks) == (7, 0.1, 2, False, 0)
    assert cfg.zo_chunk is None and cfg.model == "resnet" and cfg.zo_sparsity == 0.5
    assert (cfg.jac_pattern, cfg.jac_margin, cfg.jac_probe_states, cfg.jac_batch) == ("dense", 1, 2, None)
    assert (cfg.jac_mode, cfg.jac_scheme, cfg.jac_reach, cfg.jac_shape, cfg.jac_references) == (
        "reference",
        "central",
        1,
        "diamond",
        "frame",
    )
    assert (cfg.jac_max_reach, cfg.jac_ref_stride, cfg.jac_check_every, cfg.jac_tol) == (2, 5, 3, 0.1)
    assert cfg.jac_frame_reach == 4


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("true", True), ("TRUE", True)])
def test_booleans_parse_strictly(text, value):
    assert _train_overrides(_args("train", "--zo-reuse", text))["zo_reuse"] is value
    assert _train_overrides(_args("train", "--train-set", f"zo_reuse={text}"))["zo_reuse"] is value


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--zo-reuse", "maybe"], "zo_reuse must be true or false, got 'maybe'"),
        (["--zo-reuse", "no"], "zo_reuse must be true or false, got 'no'"),
        (["--train-set", "zo_reuse=1"], "zo_reuse must be true or false"),
        (["--epochs", "x"], "epochs must be an integer, got 'x'"),
        (["--lr", "fast"], "lr must be a number"),
    ],
)
def test_unparsable_option_values_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        _train_overrides(_args("train", *argv))
    with pytest.raises(ValueError, match="true or false"):
        parse_bool("nope")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("zo_reuse", "no", "zo_reuse must be true or false, got 'no'"),
        ("zo_reuse", 1, "zo_reuse must be true or false"),
        ("epochs", True, "epochs must be an integer, got True"),
        ("epochs", 0, "epochs must be an integer >= 1, got 0"),
        ("kernel", 4, "kernel must be odd"),
        ("lr", float("nan"), "lr must be positive"),
        ("lr_final", 1.5, r"lr_final must be in \(0, 1\]"),
        ("zo_sparsity", 1.0, r"zo_sparsity must be in \[0, 1\)"),
        ("zo_chunk", 0, "zo_chunk must be an integer >= 1 or null"),
        ("window", 10**9, "window 1000000000 is larger than the maximum 10000"),
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*63\)"),
        ("loss", "l2", r"unknown loss 'l2'; choose one of \['mse', 'l1'\]"),
        ("model", "mlp", "unknown model 'mlp'"),
        ("zo_scheme", "backward", "unknown zo_scheme 'backward'"),
        ("zo_lpr", "random", "unknown zo_lpr 'random'"),
        ("jac_pattern", "guess", "unknown jac_pattern 'guess'"),
        ("jac_batch", 0, "jac_batch must be an integer >= 1 or null"),
        ("device", 0, "device must be a string"),
    ],
)
def test_validate_follows_the_declarations(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value}).validate()


def test_allowed_values_have_one_source():
    """Methods = the registry's; losses = rollout's; model kinds = models'; ZO schemes = the engine's."""
    assert tuple(ROLLOUT_LOSSES) == LOSSES
    assert tuple(CORRECTORS) == MODEL_KINDS
    assert specs(TrainConfig)["zo_scheme"].choices == zo.SCHEMES
    assert specs(TrainConfig)["method"].choices == methods.names()

    class Magic(GradientSource):
        needs = "sideways"

    with pytest.raises(ValueError, match="needs must be 'blackbox' or 'differentiable'"):
        methods.register(methods.Method("magic", "MAGIC", Magic))
    assert "magic" not in methods.names()


def test_every_field_declares_help():
    for name, s in specs(TrainConfig).items():
        assert s.help, name


@dataclasses.dataclass
class _Toy:
    n: int = option(2, "a count", gt=0)
    frac: float = option(0.5, "a share", ge=0, lt=1)
    mode: typing.Literal["a", "b"] = option("a", "a mode")
    size: int | None = option(None, "a size, None: auto", ge=1, cap=100)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n": 0}, "'n' must be positive, got 0"),
        ({"n": 1.0}, "'n' must be an integer"),
        ({"frac": "x"}, "'frac' must be a number"),
        ({"frac": 1}, r"'frac' must be in \[0, 1\)"),
        ({"mode": "c"}, "unknown mode 'c'"),
        ({"size": 101}, "size 101 is larger than the maximum 100"),
    ],
)
def test_check_fields_on_any_declared_dataclass(kw, match):
    check_fields(_Toy(size=5), label="field '{name}'", nouns=False)
    with pytest.raises(ValueError, match=match):
        check_fields(_Toy(**kw), label="field '{name}'", nouns=False)


@pytest.mark.parametrize(
    "scenario, overrides, match",
    [
        ("burgers1d", {"u_max": 0}, "'u_max' must be positive"),
        ("burgers1d", {"n_ref": 100}, r"n_ref \(100\) must be a multiple of n_coarse \(16\)"),
        ("burgers2d", {"n_ref": 40}, r"n_ref \(40\) must be a multiple of n_coarse"),
        ("burgers2d", {"cfl_coarse": 0}, r"'cfl_coarse' must be in \(0, 1\]"),
        ("burgers2d", {"ic_kmax": 0}, "'ic_kmax' must be >= 1"),
        ("karman2d", {"n_ref_x": 48}, "reference grid 48x32 must be a multiple of the coarse grid 32x16"),
        ("karman2d", {"n_ref_x": 128}, "ratio must be the same in x and y"),
        ("karman2d", {"test_re": ()}, "positive Reynolds numbers"),
        ("karman2d", {"diffusion": "no"}, "'diffusion' must be true or false"),
        ("karman2d", {"perturbation": -1.0}, "'perturbation' must be >= 0"),
    ],
)
def test_scenario_configs_declare_their_constraints(scenario, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_scenario(scenario, "tiny", **overrides)
