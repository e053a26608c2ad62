"""The package list: a regular (non-editable) install carries every sub-package, and importing
from the repository root (where ``./zosol`` shadows the installed copy) finds them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("zosol.solvers", "zosol.datasets", "zosol.zo", "zosol.training")


def test_regular_install_contains_every_subpackage(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip install . failed:\n{proc.stderr[-2000:]}")
    for name in SUBPACKAGES:
        assert (target / name.replace(".", "/") / "__init__.py").is_file(), f"{name} missing from the wheel"
    code = (
        "import importlib, sys; [importlib.import_module(n) for n in sys.argv[1:]]; import zosol; print(zosol.__file__)"
    )
    # from an unrelated directory: the installed copy
    out = subprocess.run(
        [sys.executable, "-c", code, *SUBPACKAGES],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": ""},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    # from the repository root, where ./zosol comes first on sys.path
    out = subprocess.run(
        [sys.executable, "-c", code, *SUBPACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": ""},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
