"""Shared fixtures: one tiny burgers1d dataset per test session (generation takes about a second)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    """A complete ``burgers1d`` ``tiny`` dataset, generated once; copy it before modifying it."""
    from zosol.datasets import generate

    return generate("burgers1d", "tiny", tmp_path_factory.mktemp("tiny_data"), progress=False)
