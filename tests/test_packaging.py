"""The package list: a regular (non-editable) install carries every sub-package, and importing
from the repository root (where ``./zosol`` shadows the installed copy) finds them too, and an editable
install works from the folder that contains the clone (where ``./zosol`` is the clone's root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("zosol.solvers", "zosol.datasets", "zosol.zo", "zosol.training", "zosol.runtime", "zosol.bench")


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


def _copy_clone(dest: Path) -> None:
    """The files an install reads, copied into ``dest`` (a clone named ``zosol``)."""
    import shutil

    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    # solvers/ (standalone programs, no __init__) is what `zosol.solvers` resolved to in the bug
    for name in ("zosol", "solvers"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


def test_editable_install_imports_from_the_folder_containing_the_clone(tmp_path):
    """`pip install -e .` of a clone named ``zosol``, then Python started in the clone's parent folder:
    ``./zosol`` (the clone's root, no ``__init__``) must not shadow the package as a namespace package."""
    import sysconfig

    clone, target = tmp_path / "zosol", tmp_path / "site"
    _copy_clone(clone)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*pip, "--target", str(target), "-e", str(clone)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(f"pip install -e failed:\n{proc.stderr[-2000:]}")
    # -S: no site-packages of this interpreter (whose own zosol install would answer); the target is
    # processed as a site directory (its .pth files run), then this environment's packages (torch) follow
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); sys.path.append(sys.argv[2]); "
        "from zosol.solvers import make_scenario; import zosol; print(zosol.__file__)"
    )
    purelib = sysconfig.get_paths()["purelib"]
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target), purelib],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": ""},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == clone / "zosol" / "__init__.py"
