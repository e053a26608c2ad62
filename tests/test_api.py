"""The public facade (``import zosol``) and the export lists: every name in every ``__all__``
imports, ``import zosol`` is cheap, and no zosol import changes matplotlib's backend."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import zosol

ROOT = Path(__file__).resolve().parents[1]
API = (
    "train",
    "evaluate",
    "compare",
    "generate",
    "load_dataset",
    "TrainConfig",
    "train_config",
    "get_scenario",
    "make_scenario",
    "register",
    "NumpySolver",
    "ExternalSolver",
    "check_gradient",
)


def _python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _modules() -> list[str]:
    return ["zosol"] + [m.name for m in pkgutil.walk_packages(zosol.__path__, "zosol.")]


def test_facade_lists_and_resolves_the_user_api():
    assert set(API) <= set(dir(zosol))
    for name in API:
        assert getattr(zosol, name) is not None, name
    assert callable(zosol.compare) and callable(zosol.evaluate) and callable(zosol.train)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zosol.nope  # noqa: B018


def test_a_submodule_of_the_same_name_does_not_hide_the_function():
    out = _python(
        "import zosol.compare, zosol.evaluation, zosol\n"
        "from zosol.compare import compare\n"
        "from zosol.evaluation import evaluate\n"
        "print(zosol.compare is compare, zosol.evaluate is evaluate)"
    )
    assert out.split() == ["True", "True"]


def test_import_zosol_is_cheap():
    out = _python(
        "import sys, time\nt = time.perf_counter()\nimport zosol\n"
        "print(time.perf_counter() - t, 'torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    seconds, torch_loaded, mpl_loaded = out.split()
    assert (torch_loaded, mpl_loaded) == ("False", "False")
    assert float(seconds) < 0.3


@pytest.mark.parametrize("module", _modules())
def test_every_name_in_all_imports(module):
    mod = importlib.import_module(module)
    missing = [n for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"


def test_star_import_of_the_engine():
    namespace: dict = {}
    exec("from zosol.zo import *", namespace)
    assert {"cge", "rge", "cge_structured", "FDJacobian", "fd_step"} <= set(namespace)
    assert "spawn_local" not in namespace and "iter_chunks" not in namespace  # plumbing: zosol.zo.parallel


def test_no_zosol_import_changes_the_matplotlib_backend(tmp_path):
    out = _python(
        "import matplotlib\nmatplotlib.use('pdf')\n"
        "import numpy as np\nimport zosol.compare, zosol.report, zosol.cli\n"
        "from zosol.figures import FieldMeta, frame_error_figure, save_figure, trajectory_figure\n"
        f"save_figure(frame_error_figure({{'A': np.ones((2, 3))}}, 0.1), r'{tmp_path / 'f.png'}')\n"
        "m = FieldMeta(('u',), {'x': np.arange(8.0)}, 0.1)\n"
        f"save_figure(trajectory_figure({{'A': np.zeros((4, 1, 8))}}, m), r'{tmp_path / 's.svg'}')\n"
        "print(matplotlib.get_backend())"
    )
    assert out.strip() == "pdf"
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "s.svg").stat().st_size > 0
