"""Shared fixtures: one tiny burgers1d dataset per test session (generation takes about a second)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The tests use tiny tensors: one intra-op thread is faster than two (on a busy 2-core machine
    about 30x faster), and results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    """A complete ``burgers1d`` ``tiny`` dataset, generated once; copy it before modifying it."""
    from zosol.datasets import generate

    return generate("burgers1d", "tiny", tmp_path_factory.mktemp("tiny_data"), progress=False)


@pytest.fixture
def cli_user_error(capsys):
    """``cli_user_error(argv, match)``: run ``zosol`` with ``argv`` and check that it fails as a user
    error should: exit code 2, exactly one stderr line ``zosol: error: ...`` containing ``match``,
    no traceback. Returns that line."""
    from zosol.cli import main

    def run(argv: list[str], match: str = "") -> str:
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 2, captured
        err = captured.err
        assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
        assert err.startswith("zosol: error: "), err
        assert "Traceback" not in err and "Traceback" not in captured.out
        assert match in err, err
        return err.strip()

    return run
