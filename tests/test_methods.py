"""Training methods (zosol.methods): one module each, a registry that TrainConfig, the CLI and
compare derive from, and methods of your own from a plugin module (tests/plugins/scaled_nog.py:
a NOG-SOL variant that touches no zosol file)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from zosol import methods
from zosol.config import TrainConfig, train_config
from zosol.methods.nog_sol import NogSolSource
from zosol.options import option

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"

#: a run's config.json as the code before zosol.methods wrote it (tiny preset, zo-jac-sol)
OLD_CONFIG = {
    "method": "zo-jac-sol",
    "window": 2,
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.002,
    "lr_final": 0.05,
    "loss": "mse",
    "model": "cnn",
    "width": 6,
    "depth": 2,
    "kernel": 3,
    "seed": 0,
    "zo_scheme": "central",
    "zo_mu": 0.001,
    "zo_sparsity": 0.0,
    "zo_lpr": "zo-grasp",
    "zo_mask_every": 5,
    "zo_chunk": 128,
    "zo_reuse": True,
    "grad_checks": 1,
    "jac_pattern": "auto",
    "jac_margin": 0,
    "jac_probe_states": 4,
    "jac_batch": 256,
    "device": "cpu",
}


def test_builtin_methods_in_table_order():
    assert methods.names() == ("non", "nog-sol", "fo-sol", "zo-sol", "zo-jac-sol")
    assert [m.display for m in methods.registered_methods()] == ["NON", "NOG-SOL", "FO-SOL", "ZO-SOL", "ZO-JAC-SOL"]
    assert {m.name: m.needs for m in methods.registered_methods()}["fo-sol"] == "differentiable"


def test_config_keeps_the_flat_keys_of_existing_runs():
    """Runs and results written before the registry: same keys, same order, same values."""
    cfg = train_config("tiny", method="zo-jac-sol")
    old = {k: v for k, v in cfg.to_dict().items() if k in OLD_CONFIG}
    assert old == OLD_CONFIG and list(old) == list(OLD_CONFIG)
    added = set(cfg.to_dict()) - set(OLD_CONFIG)  # options added since, with defaults (a resume fills them in)
    assert added == {f"jac_{k}" for k in ("mode", "scheme", "reach", "shape", "max_reach", "references")} | {
        "jac_ref_stride",
        "jac_frame_reach",
        "jac_check_every",
        "jac_tol",
    }
    assert TrainConfig(**OLD_CONFIG).validate() == cfg
    assert cfg.zo_mu == 1e-3 and cfg.jac_pattern == "auto" and cfg.effective_window == 2
    assert train_config("tiny", method="non").effective_window == 1


def test_both_zo_methods_share_one_finite_difference_group():
    from zosol.methods.shared import FiniteDifferenceOptions

    zo_sol, zo_jac = methods.get("zo-sol"), methods.get("zo-jac-sol")
    assert FiniteDifferenceOptions in zo_sol.options and FiniteDifferenceOptions in zo_jac.options
    assert set(methods.group_specs(FiniteDifferenceOptions)) == {"zo_scheme", "zo_mu"}


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown method 'bogus'; choose one of \['non', 'nog-sol'"):
        train_config("tiny", method="bogus")
    with pytest.raises(ValueError, match=r"unknown method 'bogus'; registered: \['non', .*--plugin"):
        methods.get("bogus")


@pytest.fixture
def registry():
    """Restore the registry after a test that registers methods in this process."""
    saved = dict(methods.base._METHODS), dict(methods.base._GROUPS)
    yield
    methods.base._METHODS.clear(), methods.base._GROUPS.clear()
    methods.base._METHODS.update(saved[0]), methods.base._GROUPS.update(saved[1])


def test_duplicate_names_and_option_keys_are_refused(registry):
    before = methods.names()
    with pytest.raises(ValueError, match="method 'nog-sol' is already registered .*another name"):
        methods.register(methods.Method("nog-sol", "NOG-SOL 2", NogSolSource))
    with pytest.raises(ValueError, match="display name 'FO-SOL' is already taken"):
        methods.register(methods.Method("my-sol", "FO-SOL", NogSolSource))

    @dataclasses.dataclass
    class Clash:
        prefix: ClassVar[str] = "zo_"
        mu: float = option(1.0, "a second zo_mu")

    with pytest.raises(ValueError, match=r"declares \['zo_mu'\], already a training option"):
        methods.register(methods.Method("my-sol", "MY-SOL", NogSolSource, options=(Clash,)))

    @dataclasses.dataclass
    class Common:
        prefix: ClassVar[str] = ""
        lr: float = option(1.0, "a second lr")

    with pytest.raises(ValueError, match=r"declares \['lr'\]"):
        methods.register(methods.Method("my-sol", "MY-SOL", NogSolSource, options=(Common,)))
    assert methods.names() == before


def _zosol(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(PLUGINS)])
    return subprocess.run(
        [sys.executable, "-m", "zosol.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_plugin_method_is_trained_by_compare(tmp_path, tiny_h5):
    """--plugin scaled_nog registers SCALED-NOG and its --scaled-factor option; compare trains it
    beside NOG-SOL (factor 1: the same gradient, so the same scores) and reports it."""
    common = ["--scenario", "burgers1d", "--preset", "tiny", "--data", str(tiny_h5), "--plugin", "scaled_nog"]
    run = _zosol(
        ["compare", *common, "--out", str(tmp_path / "out"), "--methods", "nog-sol,scaled-nog", "--scaled-factor", "1"],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ours, nog = results["methods"]["SCALED-NOG"], results["methods"]["NOG-SOL"]
    assert ours["status"] == "ok" and ours["mae_mean"] == nog["mae_mean"]
    assert ours["scaled_steps"] > 0 and "scaled_steps" not in nog
    assert results["train_config"]["SCALED-NOG"]["scaled_factor"] == 1.0
    assert "| SCALED-NOG |" in (tmp_path / "out" / "results.md").read_text()

    bad = _zosol(["compare", *common, "--out", str(tmp_path / "bad"), "--methods", "scaled-nog,bogus"], tmp_path)
    assert bad.returncode == 2 and "unknown method(s) ['bogus']" in bad.stderr and "'scaled-nog'" in bad.stderr


def test_a_plugin_method_config_unpickles_in_a_fresh_process(tmp_path, registry, monkeypatch):
    """A worker process (spawned: nothing imported) rebuilds a plugin method's config: the pickle
    names the plugin module, imported first."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.delitem(sys.modules, "scaled_nog", raising=False)
    importlib.import_module("scaled_nog")
    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps(train_config("tiny", method="scaled-nog", scaled_factor=0.5)))
    sys.modules.pop("scaled_nog")
    load = f"import pickle; c = pickle.load(open({str(path)!r}, 'rb')); print(c.method, c.scaled_factor)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(PLUGINS)])}
    out = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scaled-nog", "0.5"]
