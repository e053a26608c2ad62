"""The run's one owner (zosol/runtime): ``RunDirectory`` is prepared and locked once and is what
``train()`` writes for every run, whoever called it, so ``zosol evaluate RUN`` works on every run
directory; ``RunOptions`` carries the run controls and is checked once per command."""

from __future__ import annotations

import json
import os

import pytest

from zosol.cli import main
from zosol.config import train_config
from zosol.datasets import load_dataset
from zosol.runtime import options as options_module
from zosol.runtime.files import LockedError
from zosol.runtime.options import RunOptions
from zosol.runtime.rundir import RunDirectory
from zosol.runtime.workers import MAX_WORKERS
from zosol.training import train

TINY = ["--scenario", "burgers1d", "--preset", "tiny"]


def _evaluate(capsys, run) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_evaluate_works_on_a_compare_run(tmp_path, tiny_h5, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, "--quiet", "--data", str(tiny_h5), "--out", str(out), "--methods", "non", "--epochs", "1"]
    assert main(argv) == 0
    got = _evaluate(capsys, out / "runs" / "non")
    results = json.loads((out / "results.json").read_text())["methods"]
    assert got["method"] == "non" and got["epochs_done"] == 1
    assert got["mae_per_sim"] == pytest.approx(results["NON"]["mae_per_sim"], rel=1e-12)
    assert got["src_mae_mean"] == pytest.approx(results["SRC"]["mae_mean"], rel=1e-12)


def test_evaluate_works_on_a_python_train_run(tmp_path, tiny_h5, capsys):
    dataset = load_dataset(tiny_h5)
    run = tmp_path / "py-run"
    train(dataset, train_config("tiny", method="non", epochs=1), run_dir=run, progress=False)
    files = sorted(p.name for p in run.iterdir())
    assert files == ["checkpoint.pt", "config.json", "history.json", "run.json"]
    assert json.loads((run / "run.json").read_text()) == {"dataset": str(tiny_h5.resolve())}
    got = _evaluate(capsys, run)
    assert got["method"] == "non" and got["epochs_done"] == 1


def test_a_run_directory_is_locked_once_and_not_again_by_train(tmp_path, tiny_h5):
    """The caller opens (prepares and locks) the directory; train() writes into it without taking
    the lock a second time, and a second holder, even in this process, is refused."""
    dataset = load_dataset(tiny_h5)
    with RunDirectory(tmp_path / "run") as run:
        assert run.is_open and (run.path / ".zosol.lock").exists()
        with pytest.raises(LockedError, match="in use by"):
            RunDirectory(run.path).open()
        with pytest.raises(LockedError, match="in use by"):
            train(dataset, train_config("tiny", method="non", epochs=1), tmp_path / "run", progress=False)
        result = train(dataset, train_config("tiny", method="non", epochs=1), run, progress=False)
        assert result.run_dir == run.path and run.has_checkpoint()
    assert not (tmp_path / "run" / ".zosol.lock").exists()
    assert RunDirectory.existing(tmp_path / "run").dataset() == str(tiny_h5.resolve())


def test_a_file_in_the_way_is_refused_with_one_message(tmp_path, tiny_h5, cli_user_error):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (
        ["train", *TINY, "--method", "non", "--data", str(tiny_h5), "--out", str(afile)],
        ["evaluate", str(afile)],
    ):
        cli_user_error(argv, f"{afile} is not a directory (a file is there)")
    with pytest.raises(ValueError, match="a file is there"):
        train(load_dataset(tiny_h5), train_config("tiny", method="non", epochs=1), afile, progress=False)


def test_run_options_are_checked_when_made():
    for bad, match in (
        ({"workers": 0}, "--workers must be an integer >= 1"),
        ({"workers": True}, "--workers must be an integer >= 1"),
        ({"resume": "yes"}, "resume must be True, False or 'auto'"),
        ({"checkpoint_seconds": 0}, "checkpoint_seconds must be a number > 0"),
        ({"checkpoint_seconds": float("nan")}, "checkpoint_seconds must be a number > 0"),
        ({"stop_after_steps": 0}, "stop_after_steps must be None or an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            RunOptions(**bad)
    cores = len(os.sched_getaffinity(0))
    if cores < MAX_WORKERS:
        assert RunOptions(workers=cores + 1).workers == cores + 1  # from Python: up to MAX_WORKERS
        with pytest.raises(ValueError, match="CPU cores"):
            RunOptions(workers=cores + 1, bound_by_cores=True)
    base = RunOptions(workers=2)
    with pytest.raises(ValueError, match="resume must be"):
        base.but(resume="later")
    assert base.but(workers=None, progress=None) is base and base.but(workers=2) is base
    assert base.but(resume="auto") == RunOptions(workers=2, resume="auto")
    assert RunOptions.of(None, progress=False) == RunOptions(progress=False)


def test_workers_are_checked_once_per_command(tmp_path, tiny_h5, monkeypatch):
    calls = []
    real = options_module.check_workers
    monkeypatch.setattr(options_module, "check_workers", lambda *a: calls.append(a) or real(*a))
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, "--quiet", "--data", str(tiny_h5), "--out", str(out), "--methods", "non,nog-sol"]
    assert main([*argv, "--epochs", "1"]) == 0
    assert calls == [(1, True)]
    calls.clear()
    run = ["train", *TINY, "--method", "non", "--data", str(tiny_h5), "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert main(run) == 0 and main([*run, "--resume"]) == 0
    assert calls == [(1, True), (1, True)]
