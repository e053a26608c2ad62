"""The error taxonomy (zosol.errors) and how the CLI shows errors: zosol's own in one line with exit
code 2 (the input) or 1 (the run failed); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import numpy as np
import pytest

from zosol import cli, errors
from zosol.datasets.hdf5 import DatasetError
from zosol.runtime.files import LockedError
from zosol.solvers import base, make_scenario
from zosol.solvers.base import SolverError
from zosol.training.errors import CheckpointError, TrainingDiverged, TrainingError


def test_every_error_has_one_base_and_keeps_its_builtin_type():
    assert issubclass(errors.UsageError, ValueError) and issubclass(errors.DataError, ValueError)
    assert issubclass(errors.RunFailed, RuntimeError) and issubclass(errors.LockedError, RuntimeError)
    for cls, branch in [
        (DatasetError, errors.DataError),
        (CheckpointError, errors.DataError),
        (SolverError, errors.RunFailed),
        (TrainingError, errors.RunFailed),
        (TrainingDiverged, errors.RunFailed),
        (LockedError, errors.LockedError),
    ]:
        assert issubclass(cls, branch) and issubclass(cls, errors.ZosolError), cls
    assert {errors.UsageError.exit_code, errors.DataError.exit_code, errors.LockedError.exit_code} == {2}
    assert errors.RunFailed.exit_code == 1


def _buggy_scenario(name: str, exc: type[Exception]):
    def reference(u, p):
        return u

    def coarse(u, p):
        raise exc("bug in the user's coarse step: index out of range")

    return make_scenario(
        name,
        reference=reference,
        coarse=coarse,
        sample=lambda s: (np.full((1, 8), 1.0 + s, dtype=np.float32), None),
        dt=0.1,
        reference_shape=(8,),
        coarse_shape=(8,),
        batched=False,
        frames=3,
        train_sims=2,
        test_sims=1,
    )


def test_a_bug_raising_valueerror_in_a_solver_step_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(base._REGISTRY, "buggy_step", _buggy_scenario("buggy_step", ValueError))
    code = cli.main(["train", "--scenario", "buggy_step", "--method", "non", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert "ValueError: bug in the user's coarse step" in err
    assert "internal error" in err and "this is a bug" in err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "--scenario", "burgers1d", "--method", "non", "--lr", "-1"], "lr"),
        (["train", "--scenario", "no_such_pde", "--method", "non"], "unknown scenario 'no_such_pde'"),
        (["train", "--scenario", "burgers1d", "--method", "fo-sol", "--window", "0"], "window"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(argv, says, tmp_path, capsys):
    code = cli.main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("zosol: error:")]
    assert len(lines) == 1 and says in lines[0], err


def test_a_damaged_dataset_is_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file at all")
    code = cli.main(["info", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(bad) in err
