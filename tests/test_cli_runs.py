"""train / evaluate / compare from the command line: nothing lost on interruption (kill -9 of
generate and train, then resume), and one-line errors for bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zosol.cli import main
from zosol.datasets import load_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _zosol(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zosol.cli", *args], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "timed out waiting for progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_during_generate_then_rerun_equals_uninterrupted(tmp_path):
    args = [
        "generate",
        "--scenario",
        "burgers1d",
        "--preset",
        "default",
        "--set",
        "train_sims=4",
        "--set",
        "test_sims=2",
        "--batch",
        "1",
        "--quiet",
    ]
    proc = _zosol(*args, "--out", "killed", cwd=tmp_path)
    parts = tmp_path / "killed" / "burgers1d_custom.h5.parts"
    finished = lambda: {p.name for p in parts.glob("*_*.npz") if ".tmp" not in p.name}  # noqa: E731
    _kill_when(proc, lambda: len(finished()) >= 2)
    assert not (tmp_path / "killed" / "burgers1d_custom.h5").exists()
    done_before = finished()
    assert (
        subprocess.run(
            [sys.executable, "-m", "zosol.cli", *args, "--out", "killed"], cwd=tmp_path, env=ENV, capture_output=True
        ).returncode
        == 0
    )
    assert (
        subprocess.run(
            [sys.executable, "-m", "zosol.cli", *args, "--out", "clean"], cwd=tmp_path, env=ENV, capture_output=True
        ).returncode
        == 0
    )
    a = load_dataset(tmp_path / "killed" / "burgers1d_custom.h5")
    b = load_dataset(tmp_path / "clean" / "burgers1d_custom.h5")
    assert len(done_before) >= 2 and not parts.exists()
    for split in ("train", "test"):
        for sa, sb in zip(getattr(a, split), getattr(b, split)):
            assert sa.seed == sb.seed
            assert torch.equal(sa.trajectory, sb.trajectory) and torch.equal(sa.params, sb.params)


def test_kill_9_during_train_then_resume_equals_uninterrupted(tmp_path, tiny_h5):
    args = [
        "train",
        "--scenario",
        "burgers1d",
        "--preset",
        "tiny",
        "--method",
        "fo-sol",
        "--data",
        str(tiny_h5),
        "--epochs",
        "40",
    ]
    proc = _zosol(*args, "--out", "killed", cwd=tmp_path)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    _kill_when(proc, ckpt.exists)
    epoch_at_kill = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < 40
    resumed = subprocess.run(
        [sys.executable, "-m", "zosol.cli", *args, "--out", "killed", "--resume"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run(
        [sys.executable, "-m", "zosol.cli", *args, "--out", "clean"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert clean.returncode == 0, clean.stderr
    a = torch.load(ckpt, weights_only=True)
    b = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 40
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"]["loss"] == b["history"]["loss"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "sgd"], "unknown method 'sgd'"),
        (["--method", "zo-sol", "--epochs", "0"], "epochs must be an integer >= 1"),
        (["--method", "zo-sol", "--lr", "-1"], "lr must be positive"),
        (["--method", "zo-sol", "--window", "99"], "window 99 is longer than"),
        (["--method", "zo-sol", "--zo-sparsity", "1.5"], "zo_sparsity must be in"),
        (["--method", "zo-sol", "--train-preset", "huge"], "unknown training preset 'huge'"),
        (["--method", "zo-sol", "--train-set", "bogus=1"], "unknown training option"),
    ],
)
def test_train_user_errors(tmp_path, tiny_h5, extra, match, cli_user_error):
    err = cli_user_error(
        [
            "train",
            "--scenario",
            "burgers1d",
            "--preset",
            "tiny",
            "--data",
            str(tiny_h5),
            "--out",
            str(tmp_path / "run"),
            *extra,
        ]
    )
    assert match in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_train_on_a_dataset_of_another_scenario(tmp_path, tiny_h5, cli_user_error):
    err = cli_user_error(
        [
            "train",
            "--scenario",
            "burgers2d",
            "--preset",
            "tiny",
            "--method",
            "non",
            "--data",
            str(tiny_h5),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert "holds scenario 'burgers1d', not 'burgers2d'" in err


def test_train_refuses_to_overwrite_and_resume_checks_the_config(tmp_path, tiny_h5, capsys, cli_user_error):
    base = [
        "train",
        "--scenario",
        "burgers1d",
        "--preset",
        "tiny",
        "--method",
        "non",
        "--data",
        str(tiny_h5),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
    ]
    assert main(base) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert "already holds a run" in cli_user_error(base)
    assert "another config" in cli_user_error(base[:-1] + ["2", "--lr", "0.5", "--resume"])
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_evaluate_errors(tmp_path, tiny_h5, capsys, cli_user_error):
    assert "no checkpoint" in cli_user_error(["evaluate", str(tmp_path), "--data", str(tiny_h5)])
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--scenario",
                "burgers1d",
                "--preset",
                "tiny",
                "--method",
                "non",
                "--data",
                str(tiny_h5),
                "--out",
                str(run),
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    assert main(["evaluate", str(run)]) == 0
    capsys.readouterr()
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    assert "unreadable checkpoint" in cli_user_error(["evaluate", str(run)])
    other = tmp_path / "other"
    assert (
        main(
            [
                "generate",
                "--scenario",
                "burgers1d",
                "--preset",
                "tiny",
                "--set",
                "n_coarse=32",
                "--out",
                str(other),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--scenario",
                "burgers1d",
                "--preset",
                "tiny",
                "--method",
                "non",
                "--data",
                str(tiny_h5),
                "--out",
                str(tmp_path / "run2"),
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    err = cli_user_error(["evaluate", str(tmp_path / "run2"), "--data", str(other / "burgers1d_custom.h5")])
    assert "trained on another dataset" in err and "channels and grid [C, *grid]: [1, 16] vs [1, 32]" in err
    assert "no run.json" in cli_user_error(["evaluate", str(tmp_path / "nowhere")])


def test_compare_user_errors(tmp_path, cli_user_error):
    assert "unknown method" in cli_user_error(
        ["compare", "--scenario", "burgers1d", "--preset", "tiny", "--out", str(tmp_path), "--methods", "non,magic"]
    )
    assert "unknown scenario" in cli_user_error(["compare", "--scenario", "heat3d", "--out", str(tmp_path)])
    err = cli_user_error(
        ["compare", "--scenario", "burgers1d", "--preset", "tiny", "--set", "frames=0", "--out", str(tmp_path)]
    )
    assert "'frames' must be positive" in err
