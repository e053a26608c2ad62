"""``--twin MODULE:OBJECT``: FO-SOL from the command line through a differentiable twin of a black
box, and the messages that ask for a twin name the option (issue 22 item 7)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from zosol.cli import main

MODULE = textwrap.dedent('''
    import numpy as np
    import torch
    from zosol.solvers import NumpySolver, TorchSolver, make_scenario, register

    N, DT, K = 16, 0.05, 0.2

    def heat_np(u, p):                      # the black box: (B, 1, n) numpy arrays
        return u + K * (np.roll(u, 1, -1) - 2 * u + np.roll(u, -1, -1))

    def heat_torch(u, p):                   # its differentiable twin
        return u + K * (u.roll(1, -1) - 2 * u + u.roll(-1, -1))

    def sample(seed):
        x = (np.arange(4 * N) + 0.5) * 2 * np.pi / (4 * N)
        return np.sin(x + seed)[None] + 0.3 * np.cos(3 * x)[None], None

    scenario = make_scenario("twin_heat", reference=lambda u, p: heat_np(u, p), coarse=heat_np, sample=sample,
                             dt=DT, reference_shape=(4 * N,), coarse_shape=(N,), frames=4, train_sims=2, test_sims=1,
                             downsample=lambda u: u[..., ::4])
    register("twin_heat", scenario)
    twin = TorchSolver(heat_torch, dt=DT, channels=("u",), spatial_shape=(N,))

    def make_twin():
        return TorchSolver(heat_torch, dt=DT, channels=("u",), spatial_shape=(N,))

    not_a_solver = 3
    box = NumpySolver(heat_np, dt=DT, channels=("u",), spatial_shape=(N,))
''')


@pytest.fixture
def twin_module(tmp_path, monkeypatch):
    (tmp_path / "twin_heat_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("twin_heat_mod", None)
    import twin_heat_mod

    from zosol.datasets import generate

    generate(twin_heat_mod.scenario, out=tmp_path / "data", progress=False)  # no progress bar in stderr
    yield "twin_heat_mod"
    sys.modules.pop("twin_heat_mod", None)
    from zosol.solvers import base

    base._REGISTRY.pop("twin_heat", None)


def _args(tmp_path, *extra):
    return ["--plugin", "twin_heat_mod", "--scenario", "twin_heat", "--data", str(tmp_path / "data"), *extra]


def test_train_fo_sol_through_a_twin_named_on_the_command_line(twin_module, tmp_path, capsys, cli_user_error):
    err = cli_user_error(["train", *_args(tmp_path, "--method", "fo-sol", "--out", str(tmp_path / "r0"))])
    assert "fo-sol needs a differentiable solver" in err and "--twin MODULE:OBJECT" in err
    for i, spec in enumerate(("twin_heat_mod:twin", "twin_heat_mod:make_twin")):
        out = tmp_path / f"run{i}"
        argv = ["train", *_args(tmp_path, "--method", "fo-sol", "--epochs", "1", "--out", str(out), "--twin", spec)]
        assert main(argv) == 0
        assert "fo-sol: test MAE" in capsys.readouterr().out
        assert json.loads((out / "config.json").read_text())["method"] == "fo-sol"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("twin_heat_mod", "--twin expects MODULE:OBJECT"),
        ("twin_heat_mod:nothing", "module 'twin_heat_mod' has no 'nothing'"),
        ("twin_heat_mod:not_a_solver", "is a int, not a solver"),
        ("twin_heat_mod:box", "NumpySolver is not differentiable"),
        ("no_such_twin_mod:twin", "plugin 'no_such_twin_mod' cannot be imported"),
    ],
)
def test_bad_twin_names_the_problem(twin_module, tmp_path, spec, match, cli_user_error):
    cli_user_error(
        ["train", *_args(tmp_path, "--method", "fo-sol", "--out", str(tmp_path / "r"), "--twin", spec)], match
    )


def test_compare_runs_fo_sol_with_twin_and_says_how_without(twin_module, tmp_path, capsys):
    base = ["compare", *_args(tmp_path, "--methods", "non,fo-sol", "--epochs", "1", "--quiet")]
    assert main([*base, "--out", str(tmp_path / "c0")]) == 0
    out = capsys.readouterr().out
    assert "FO-SOL left out" in out and "--twin MODULE:OBJECT on the command line to run it" in out
    assert main([*base, "--out", str(tmp_path / "c1"), "--twin", "twin_heat_mod:twin"]) == 0
    out = capsys.readouterr().out
    assert "left out" not in out
    results = json.loads((tmp_path / "c1" / "results.json").read_text())
    assert results["methods"]["FO-SOL"]["status"] == "ok"
