"""Tests of the command line's `generate` and `info` (zosol/cli.py) and its user-error handling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from zosol.cli import main
from zosol.datasets import load_dataset
from zosol.solvers import get_scenario


def _coarse_mae(path: Path) -> tuple[float, float]:
    """SRC error computed here from scratch: bare coarse rollout of every test simulation from its
    frame 0, MAE over frames 1..T, then mean and population std over the simulations (as zosol.metrics.summarize)."""
    ds = load_dataset(path)
    traj, params = ds.stacked("test")
    solver = ds.scenario.coarse_solver()
    u, frames = traj[:, 0], [traj[:, 0]]
    for _ in range(traj.shape[1] - 1):
        u = solver.step(u, params)
        frames.append(u)
    pred = torch.stack(frames, 1)
    mae = (pred[:, 1:] - traj[:, 1:]).abs().flatten(1).mean(1)
    return float(mae.mean()), float(mae.std(unbiased=False))


def test_generate_and_info(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["generate", "--scenario", "burgers1d", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out.strip()
    path = out / "burgers1d_tiny.h5"
    assert stdout == str(path) and path.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["burgers1d_tiny.h5"]
    ds = load_dataset(path, "burgers1d")
    assert ds.frames == 12 and len(ds.train) == 3 and len(ds.test) == 2

    mean, std = _coarse_mae(path)
    assert mean > 1e-3  # the coarse solver is visibly off the reference

    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scenario"] == "burgers1d" and summary["preset"] == "tiny"
    assert summary["train_sims"] == 3 and summary["test_sims"] == 2
    assert summary["trajectory_shape"] == [13, 1, 16]
    err = summary["coarse_error_vs_reference"]
    assert err["mae_mean"] == pytest.approx(mean, rel=1e-4)
    assert err["mae_std"] == pytest.approx(std, rel=1e-3, abs=1e-7)

    png = tmp_path / "plot.png"
    assert main(["info", str(path), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    printed = re.search(r"coarse_error_vs_reference: \{'mae_mean': ([0-9.eE+-]+)", text)
    assert printed and float(printed.group(1)) == pytest.approx(mean, rel=1e-4), text
    assert f"wrote {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_generate_with_overrides(tmp_path, capsys):
    out = tmp_path / "data"
    args = [
        "generate",
        "--scenario",
        "burgers1d",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "frames=3",
        "--set",
        "train_sims=1",
        "--set",
        "test_sims=1",
        "--batch",
        "1",
    ]
    assert main(args) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == out / "burgers1d_custom.h5"
    ds = load_dataset(path)
    assert ds.frames == 3 and ds.scenario.config.n_coarse == 16 and ds.scenario.preset is None
    assert main(args) == 0  # rerun: the finished file is reused
    assert Path(capsys.readouterr().out.strip()) == path
    # same file name, other overrides: a one-line user error, not a stale file
    assert main(args[:-4] + ["--set", "frames=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zosol: error:") and "different config" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--scenario", "nope"], "unknown scenario 'nope'"),
        (["--scenario", "burgers1d", "--preset", "huge"], "unknown preset 'huge'"),
        (["--scenario", "burgers1d", "--set", "n_coarse=0"], "'n_coarse' must be positive"),
        (["--scenario", "burgers1d", "--set", "frames=-1"], "'frames' must be positive"),
        (["--scenario", "burgers1d", "--set", "bogus=1"], "unknown config field(s) ['bogus']"),
        (["--scenario", "burgers1d", "--set", "n_ref=abc"], "'n_ref' must be an integer"),
        (["--scenario", "burgers1d", "--set", "n_ref=100"], "must be a multiple of n_coarse"),
        (["--scenario", "burgers1d", "--set", "dt=0"], "'dt' must be positive"),
        (["--scenario", "burgers1d", "--set", "frames"], "--set expects KEY=VALUE"),
        (["--scenario", "burgers1d", "--batch", "0"], "batch must be >= 1"),
    ],
)
def test_generate_user_errors(tmp_path, extra, match, cli_user_error):
    out = tmp_path / "data"
    argv = ["generate", "--preset", "tiny", "--out", str(out), "--quiet"]
    # the later --preset wins when a case gives its own
    cli_user_error(argv + extra, match)
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert not [p for p in leftovers if p.suffix in (".h5", ".tmp") or p.name.endswith(".h5.tmp")], leftovers


def test_info_user_errors(tiny_h5, tmp_path, cli_user_error):
    missing = tmp_path / "missing.h5"
    err = cli_user_error(["info", str(missing)], "no such dataset file")
    assert str(missing) in err

    truncated = tmp_path / "truncated.h5"
    data = tiny_h5.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    err = cli_user_error(["info", str(truncated)], "truncated or corrupt")
    assert str(truncated) in err

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00\x01not hdf5" * 100)
    cli_user_error(["info", str(garbage)], str(garbage))

    damaged = tmp_path / "damaged.h5"  # opens as HDF5, fails while reading (attributes)
    raw = bytearray(data)
    import random

    rng = random.Random(2)
    for _ in range(50):
        raw[rng.randrange(len(raw))] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    cli_user_error(["info", str(damaged)], str(damaged))
    assert not (tmp_path / "plot.png").exists()


def test_info_plot_on_bad_file_writes_nothing(tmp_path, cli_user_error):
    png = tmp_path / "plot.png"
    cli_user_error(["info", str(tmp_path / "missing.h5"), "--plot", str(png)], "no such dataset file")
    assert not png.exists()


def test_interrupted_generate_keeps_parts_and_exits_130(tmp_path, capsys, monkeypatch):
    import importlib

    genmod = importlib.import_module("zosol.datasets.generate")
    real, calls = genmod.simulate_reference, []

    def interrupted(scenario, seeds):
        if calls:
            raise KeyboardInterrupt
        calls.append(seeds)
        return real(scenario, seeds)

    out = tmp_path / "data"
    argv = ["generate", "--scenario", "burgers1d", "--preset", "tiny", "--out", str(out), "--quiet", "--batch", "2"]
    with monkeypatch.context() as m:
        m.setattr(genmod, "simulate_reference", interrupted)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "burgers1d_tiny.h5").exists()
    assert (out / "burgers1d_tiny.h5.parts" / "train_1.npz").exists()
    assert main(argv) == 0
    assert load_dataset(out / "burgers1d_tiny.h5").frames == 12
    assert not (out / "burgers1d_tiny.h5.parts").exists()


@pytest.mark.parametrize(
    "scenario, preset",
    [("burgers1d", "default"), ("burgers2d", "tiny"), ("burgers2d", "default"), ("karman2d", "tiny"), ("ks1d", "tiny")],
)
def test_generate_each_scenario_round_trip(tmp_path, capsys, scenario, preset):
    """`zosol generate` writes a dataset that reads back with the scenario's shapes and seeds."""
    assert main(["generate", "--scenario", scenario, "--preset", preset, "--out", str(tmp_path), "--quiet"]) == 0
    path = tmp_path / f"{scenario}_{preset}.h5"
    assert capsys.readouterr().out.strip() == str(path)
    ds = load_dataset(path, scenario)
    sc = get_scenario(scenario, preset)
    coarse = sc.coarse_solver()
    assert [s.seed for s in ds.train] == sc.train_seeds and [s.seed for s in ds.test] == sc.test_seeds
    for sim in ds.train + ds.test:
        assert sim.trajectory.shape == (sc.config.frames + 1, *coarse.state_shape)
        assert sim.params.shape == (coarse.num_params,)
        assert torch.isfinite(sim.trajectory).all()
    assert ds.scenario.config == sc.config
