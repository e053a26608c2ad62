"""Files from others are data, never code; nothing written outside ``--out``; every fault one line
(issue 23).  Each test names its item of the issue and asserts the one line the user sees."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

from zosol.cli import main
from zosol.datasets import load_dataset
from zosol.datasets.hdf5 import Simulation, write_dataset

TINY = ["--scenario", "burgers1d", "--preset", "tiny"]


def _copy(tiny_h5: Path, tmp_path: Path, name: str = "evil.h5") -> Path:
    path = tmp_path / name
    shutil.copyfile(tiny_h5, path)
    return path


def _set_attrs(path: Path, **attrs) -> Path:
    with h5py.File(path, "r+") as f:
        f.attrs.update(attrs)
    return path


@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """``evil_sec_mod`` on sys.path: importing it or calling ``boom`` creates a marker file."""
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_sec_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        f"def boom():\n    pathlib.Path({str(marker)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("evil_sec_mod", None)
    yield marker
    sys.modules.pop("evil_sec_mod", None)


# -- 1: opening a dataset never imports or calls what it names ------------------------------------
@pytest.mark.parametrize(
    "source",
    [
        "evil_sec_mod:boom",
        "os:abort",
        "sys:exit",
        "code:interact",
        "tempfile:mkdtemp",
        "zosol.cli:main",
        "venv.__main__:main",
        "signal:pause",
    ],
)
def test_1_dataset_source_is_never_imported_nor_called(source, tiny_h5, tmp_path, planted_module, cli_user_error):
    path = _set_attrs(_copy(tiny_h5, tmp_path), scenario="evil_pde", scenario_source=source)
    module = source.partition(":")[0]
    imported_before = module in sys.modules
    line = cli_user_error(["info", str(path)], f"made with module '{module}'")
    assert f"--plugin {module}" in line and "does not import" in line
    assert not planted_module.exists()
    assert (module in sys.modules) == imported_before  # not imported by zosol
    assert list(tmp_path.glob("tmp*")) == []


def test_1_info_shows_the_recorded_source(tiny_h5, capsys):
    assert main(["info", str(tiny_h5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scenario_source"] == "zosol.solvers.burgers1d:Burgers1DScenario"


# -- 2: --plugin never lets the current directory shadow an installed package --------------------
def test_2_plugin_folder_is_searched_last(tmp_path, monkeypatch):
    from zosol.solvers import load_plugin

    (tmp_path / "my_sec_plugin.py").write_text("VALUE = 7\n")
    (tmp_path / "json.py").write_text("raise SystemExit('planted json imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        assert load_plugin("my_sec_plugin").VALUE == 7
        assert sys.path[-1] == str(tmp_path)  # appended, not prepended
        import importlib.util

        assert not importlib.util.find_spec("json").origin.startswith(str(tmp_path))
    finally:
        sys.modules.pop("my_sec_plugin", None)


# -- 6: --data that does not exist is an error, never a place to generate into -------------------
@pytest.mark.parametrize("command", ["train", "compare"])
def test_6_missing_data_is_an_error(command, tmp_path, cli_user_error):
    data = tmp_path / "nope" / "missing.h5"
    extra = ["--method", "non"] if command == "train" else ["--methods", "non", "--quiet"]
    cli_user_error(
        [command, *TINY, *extra, "--data", str(data), "--out", str(tmp_path / "o")],
        f"--data {data}: no such file or directory",
    )
    assert not (tmp_path / "nope").exists() and not (tmp_path / "o" / "data").exists()


# -- 8: info warns when test simulations duplicate training ones ---------------------------------
def test_8_info_warns_on_test_sims_that_are_training_sims(tiny_h5, tmp_path, capsys):
    ds = load_dataset(tiny_h5)
    first = ds.train[0]
    twin = Simulation(10_000, first.trajectory, first.params)  # another seed, the same data
    path = write_dataset(tmp_path / "dup.h5", ds.scenario, ds.train, [ds.train[1], twin])
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("zosol: warning: 2 of 2 test simulations duplicate training ones: ") and err.count("\n") == 1
    assert f"{ds.train[1].seed} (same seed)" in err and f"10000 (same data as training seed {first.seed})" in err
    assert main(["info", str(tiny_h5)]) == 0 and "warning" not in capsys.readouterr().err


# -- 10: plugin and registration faults are one line ---------------------------------------------
PLUGIN_FAULTS = {
    "raise RuntimeError('boom')": "RuntimeError: 'boom'",
    "def f(:\n    pass": "SyntaxError",
    "from os import no_such_name": "ImportError",
    "import no_such_dependency_sec": "No module named 'no_such_dependency_sec'",
    "import sys\nsys.exit(3)": "it called sys.exit(3)",
    "from zosol.solvers import register\nregister('x', 5)": "needs a Scenario subclass",
    "from zosol.solvers import register\nregister('burgers1d', 'a string')": "needs a Scenario subclass",
    "from zosol.solvers import register, get_scenario\nregister('burgers1d', get_scenario('burgers1d'))": (
        "'burgers1d' is one of zosol's scenarios"
    ),
}


@pytest.mark.parametrize("code", list(PLUGIN_FAULTS))
def test_10_plugin_faults_are_one_line(code, tmp_path, monkeypatch, cli_user_error, tiny_h5):
    name = f"faulty_sec_{abs(hash(code)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(code) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        line = cli_user_error(["info", str(tiny_h5), "--plugin", name], f"plugin '{name}' failed while importing")
        assert PLUGIN_FAULTS[code] in line
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "loader, match",
    [(lambda: 42, "returned int, not a Scenario"), (lambda: {}["k"], "failed: KeyError")],
)
def test_10_loader_faults_are_one_line(loader, match, tiny_h5, tmp_path, cli_user_error):
    from zosol.solvers import base, register

    register("loader_sec", loader)
    try:
        path = _set_attrs(_copy(tiny_h5, tmp_path), scenario="loader_sec")
        cli_user_error(["info", str(path)], match)
    finally:
        base._REGISTRY.pop("loader_sec", None)


# -- 13: files that are not files ----------------------------------------------------------------
def test_13_fifo_and_devices_are_refused_before_opening(tmp_path, cli_user_error):
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    cli_user_error(["info", str(fifo)], "not a regular file")  # opening it would block forever
    cli_user_error(
        ["train", *TINY, "--method", "non", "--data", "/dev/zero", "--out", str(tmp_path / "r")],
        "--data /dev/zero is not a regular file",
    )


# -- 14: crafted datasets ------------------------------------------------------------------------
def _frames_zero(tiny_h5: Path, tmp_path: Path) -> Path:
    ds = load_dataset(tiny_h5)
    cut = [Simulation(s.seed, s.trajectory[:1], s.params) for s in ds.train + ds.test]
    return write_dataset(tmp_path / "zero.h5", ds.scenario, cut[: len(ds.train)], cut[len(ds.train) :])


def _edit(change):
    def make(tiny_h5: Path, tmp_path: Path) -> Path:
        path = _copy(tiny_h5, tmp_path)
        with h5py.File(path, "r+") as f:
            change(f)
        return path

    return make


def _config_with(**extra):
    def change(f):
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), **extra})

    return change


def _rename(old: str, new: str):
    def change(f):
        f.move(old, new)

    return change


CRAFTED = {
    "frames=0": (_frames_zero, "frames attribute is 0"),
    "5 MB string attribute": (_edit(lambda f: f.attrs.__setitem__("preset", "x" * (5 << 20))), "besides its"),
    "2 MB string attribute": (_edit(lambda f: f.attrs.__setitem__("preset", "x" * (2 << 20))), "attribute 'preset'"),
    "unknown config key": (_edit(_config_with(evil=1)), "does not have"),
    "name vs source": (
        _edit(lambda f: f.attrs.__setitem__("scenario_source", "zosol.solvers.karman2d:Karman2DScenario")),
        "disagree",
    ),
    "seed -1": (_edit(_rename("train/0", "train/-1")), "not seeds"),
    "seed 2**70": (_edit(_rename("train/0", f"train/{2**70}")), "not seeds"),
    "seed attribute": (_edit(lambda f: f["train/0"].attrs.__setitem__("seed", 5)), "records seed '5'"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_14_crafted_datasets_are_refused_in_one_bounded_line(case, tiny_h5, tmp_path, cli_user_error):
    make, match = CRAFTED[case]
    line = cli_user_error(["info", str(make(tiny_h5, tmp_path))], match)
    assert len(line) < 2000


def test_14_error_lines_are_bounded(tmp_path, capsys):
    from zosol.cli import MAX_MESSAGE_CHARS

    assert main(["train", *TINY, "--method", "non", "--train-set", "x" * 100_000 + "=1", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) <= MAX_MESSAGE_CHARS + 20


# -- 7: checksums on finished parts and datasets -------------------------------------------------
def test_7_finite_tampering_of_a_part_is_caught_and_regenerated(tmp_path, tiny_h5, capsys):
    import numpy as np

    from zosol.datasets.generate import _save_part

    out = tmp_path / "data"
    parts = out / "burgers1d_tiny.h5.parts"
    parts.mkdir(parents=True)
    clean = load_dataset(tiny_h5)
    sim = clean.train[1]
    _save_part(parts / "train_1.npz", sim.trajectory.numpy(), sim.params.numpy())
    with np.load(parts / "train_1.npz") as z:  # finite, right-shaped values, the old checksum kept
        tampered = {**z, "trajectory": z["trajectory"] + np.float32(0.5)}
    np.savez(parts / "train_1.npz", **tampered)
    (parts / "config.json").write_text(json.dumps({**clean.scenario.describe(), "batch": 8}, sort_keys=True))
    capsys.readouterr()
    assert main(["generate", *TINY, "--quiet", "--out", str(out)]) == 0
    assert "regenerating train_1.npz: damaged part (its data do not match its checksum" in capsys.readouterr().err
    made = load_dataset(out / "burgers1d_tiny.h5")
    assert all(a.trajectory.equal(b.trajectory) for a, b in zip(made.train, clean.train))


def test_7_finite_tampering_of_a_dataset_is_refused(tiny_h5, tmp_path, cli_user_error):
    path = _copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f["train/1"][2, 0, 3] += 0.25
    cli_user_error(["info", str(path)], "/train/1 does not match its checksum (changed after it was written)")


# -- 10: bad sizes are refused before anything is built -------------------------------------------
def test_10_kernel_wider_than_the_grid(tiny_h5, tmp_path, cli_user_error):
    cli_user_error(
        ["train", *TINY, "--method", "non", "--kernel", "35", "--data", str(tiny_h5), "--out", str(tmp_path / "r")],
        "--kernel 35 is wider than the coarse grid (16 cells); use an odd kernel of at most 15",
    )


SAMPLE_FAULTS = {
    "return np.zeros((1, 64)), None": "returned a state of shape (1, 64)",  # wrong shape
    "return np.zeros((1, 1, 128)), None": "returned a state of shape (1, 1, 128)",  # extra dims
    "return None": "sample(0) failed: TypeError",
    "return 'abc'": "sample(0) failed: ValueError",
    "return np.zeros((1, 128)), np.zeros(seed % 2 + 1)": "params of shape",  # varying length
    "raise KeyError(seed)": "failed: KeyError",
    "import sys; sys.exit(0)": "called sys.exit(0)",
}


@pytest.mark.parametrize("body", list(SAMPLE_FAULTS))
def test_10_sample_faults_are_one_line(body, tmp_path, monkeypatch, cli_user_error):
    from zosol.solvers import base

    name = f"samp_sec_{list(SAMPLE_FAULTS).index(body)}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(f"""
        import numpy as np
        from zosol.solvers import make_scenario, register

        def sample(seed):
            {body}

        register({name!r}, make_scenario({name!r}, reference=lambda u, p: u, coarse=lambda u, p: u, sample=sample,
                 dt=0.1, reference_shape=(128,), coarse_shape=(16,), num_params=1, frames=2, train_sims=2,
                 test_sims=1))
        """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        line = cli_user_error(["generate", "--plugin", name, "--scenario", name, "--quiet", "--out", "d"])
        assert "sample(" in line and SAMPLE_FAULTS[body] in line
    finally:
        sys.modules.pop(name, None)
        base._REGISTRY.pop(name, None)


# -- 11: user steps that exit or hang -------------------------------------------------------------
def test_11_reference_step_calling_sys_exit_is_a_clear_failure(tmp_path, monkeypatch, capsys):
    from zosol.solvers import base

    (tmp_path / "exit_sec.py").write_text(
        "import sys, numpy as np\nfrom zosol.solvers import make_scenario, register\n"
        "def ref(u, p):\n    sys.exit(0)\n"
        "register('exit_sec', make_scenario('exit_sec', reference=ref, coarse=lambda u, p: u, "
        "sample=lambda s: (np.zeros((1, 8)), None), dt=0.1, reference_shape=(8,), coarse_shape=(8,), frames=2, "
        "train_sims=1, test_sims=1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        capsys.readouterr()
        assert main(["generate", "--plugin", "exit_sec", "--scenario", "exit_sec", "--quiet", "--out", "d"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("zosol: failed: NumpySolver(reference ref) called sys.exit(0)")
        assert not list((tmp_path / "d").glob("*.h5"))
    finally:
        sys.modules.pop("exit_sec", None)
        base._REGISTRY.pop("exit_sec", None)


def test_11_in_process_step_timeout():
    import time

    import torch

    from zosol.solvers import SolverError
    from zosol.solvers.external import NumpySolver

    slow = NumpySolver(lambda u, p: time.sleep(30) or u, dt=0.1, channels=("u",), spatial_shape=(4,), timeout=0.3)
    t0 = time.perf_counter()
    with pytest.raises(SolverError, match=r"a call ran longer than its timeout of 0.3 s \(interrupted\)"):
        slow.step(torch.zeros(1, 1, 4))
    assert time.perf_counter() - t0 < 10
    fast = NumpySolver(lambda u, p: u + 1, dt=0.1, channels=("u",), spatial_shape=(4,), timeout=5)
    assert fast.step(torch.zeros(1, 1, 4)).eq(1).all()
    with pytest.raises(ValueError, match="processes=1"):
        NumpySolver(lambda u, p: u, dt=0.1, channels=("u",), spatial_shape=(4,), timeout=1, processes=2)


# -- 12: time bounded up front --------------------------------------------------------------------
def test_12_a_run_beyond_the_time_bound_is_refused_unless_asked(tiny_h5, tmp_path, cli_user_error, capsys):
    from zosol.datasets.budget import check_time, set_time_limit

    line = cli_user_error(
        ["train", *TINY, "--method", "non", "--epochs", str(10**6), "--width", "256", "--depth", "8"]
        + ["--data", str(tiny_h5), "--out", str(tmp_path / "r")],
        "would take at least",
    )
    assert "--max-hours" in line and "lower --epochs" in line
    try:
        set_time_limit(10**6)  # what --max-hours 1000000 does
        capsys.readouterr()
        check_time("training x", 7200.0, "fix")
        assert (
            capsys.readouterr().err == "zosol: training x: estimated at least 2 h (optimistic; --max-hours bounds it)\n"
        )
    finally:
        set_time_limit(None)
    cli_user_error(["--threads", "1000000", "info", str(tiny_h5)], "--threads 1000000: use 1 to")


# -- 3: process groups listen on loopback only; no pickle over the group ------------------------------
def _listening_inodes_not_on_loopback() -> list[str]:
    """Local addresses of this process's listening TCP sockets that are not 127.0.0.1."""
    own = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            own.add(target[8:-1])
    bad = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in own and not f[1].startswith(("0100007F:", "00000000000000000000000001000000:")):
                bad.append(f[1])
    return bad


def _group_check(rank: int, world_size: int, out: str) -> None:
    import torch.distributed as dist

    from zosol.runtime.launch import broadcast_from_lead

    def no_pickle(*a, **k):
        raise AssertionError("pickle over the process group")

    dist.broadcast_object_list = dist.all_gather_object = no_pickle
    got = broadcast_from_lead(lambda: {"epoch": 3, "w": __import__("torch").arange(4.0), "ok": True})
    assert got["epoch"] == 3 and got["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and got["ok"] is True
    Path(out, f"rank{rank}.json").write_text(json.dumps(_listening_inodes_not_on_loopback()))


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="Linux /proc")
def test_3_local_process_group_listens_on_loopback_only(tmp_path):
    from zosol.zo.parallel import spawn_local

    spawn_local(_group_check, 2, args=(str(tmp_path),), backend="gloo")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == []


# -- 4: no symlinked directory inside --out is followed ------------------------------------------
@pytest.mark.parametrize("link", ["runs", "runs/non", "data"])
def test_4_symlinked_directory_inside_out_is_refused(link, tiny_h5, tmp_path, cli_user_error):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(elsewhere)
    data = [] if link == "data" else ["--data", str(tiny_h5)]
    cli_user_error(
        ["compare", *TINY, "--quiet", "--methods", "non", "--epochs", "1", *data, "--out", str(out)],
        f"{out / link} is a symbolic link inside --out",
    )
    assert list(elsewhere.iterdir()) == []


# -- 5: lock files that are hard links or not regular files ---------------------------------------
@pytest.mark.parametrize("kind", ["hard link", "fifo"])
def test_5_lock_file_hard_link_or_fifo_is_refused(kind, tiny_h5, tmp_path, cli_user_error):
    out = tmp_path / "run"
    out.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    if kind == "hard link":
        os.link(precious, out / ".zosol.lock")
    else:
        os.mkfifo(out / ".zosol.lock")
    match = "is a hard link" if kind == "hard link" else "is not a regular file"
    cli_user_error(["train", *TINY, "--method", "non", "--data", str(tiny_h5), "--out", str(out)], match)
    assert precious.read_text() == "precious\n"


# -- 9: nothing orphaned -------------------------------------------------------------------------
def _gone(pids: list[int], seconds: float = 15) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


@pytest.mark.skipif(not Path("/proc").exists(), reason="Linux /proc")
def test_9_state_pool_workers_leave_when_their_parent_is_killed():
    import subprocess

    code = (
        "import os, numpy as np\nfrom zosol.solvers.pool import StatePool\n"
        "pool = StatePool(lambda x, p: x + 1, 3)\npool.map(np.zeros((3, 1, 4)), None)\n"
        "print(' '.join(str(w.pid) for w, _ in pool._workers), flush=True)\nos.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2 and _gone(pids), f"state-pool workers {pids} survived their parent's kill -9"


@pytest.mark.skipif(not Path("/proc").exists(), reason="Linux /proc")
def test_9_external_program_child_that_calls_setsid_is_killed(tmp_path):
    import subprocess

    from zosol.solvers.external import _kill_group

    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        ["bash", "-c", f"setsid sleep 300 & echo $! > {pidfile}; sleep 300"], start_new_session=True
    )
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        __import__("time").sleep(0.05)
    escaped = int(pidfile.read_text())
    assert _state(escaped) != "X"
    _kill_group(proc)
    assert _gone([escaped]), "a child in its own session survived the external solver's close"


# -- 16 and 9: --workers with a make_scenario plugin; no temporary run directory left ---------------
@pytest.mark.slow
def test_16_workers_import_a_make_scenario_plugin_by_name(tmp_path, monkeypatch, capsys):
    import tempfile

    from zosol.solvers import base

    (tmp_path / "lambda_sec.py").write_text(
        "import numpy as np\nfrom zosol.solvers import make_scenario, register\n"
        "register('lambda_sec', make_scenario('lambda_sec', reference=lambda u, p: 0.9 * u,"
        " coarse=lambda u, p: 0.8 * u, sample=lambda s: (np.random.default_rng(s).normal(size=(1, 16)), None),"
        " dt=0.1, reference_shape=(16,), coarse_shape=(16,), frames=4, train_sims=2, test_sims=1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))  # apart from other processes' temporary files
    try:
        argv = ["train", "--plugin", "lambda_sec", "--scenario", "lambda_sec", "--method", "zo-sol"]
        assert main([*argv, "--epochs", "1", "--workers", "2", "--out", "run"]) == 0, capsys.readouterr().err
    finally:
        sys.modules.pop("lambda_sec", None)
        base._REGISTRY.pop("lambda_sec", None)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert list(private.glob("zosol-run-*")) == []


def _fails(rank: int, world_size: int) -> None:
    raise RuntimeError(f"rank {rank} fails on purpose")


def test_9_a_failed_worker_leaves_no_temporary_file(tmp_path, monkeypatch):
    import tempfile

    from zosol.zo.parallel import spawn_local

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(Exception, match="fails on purpose"):
        spawn_local(_fails, 2, backend="gloo")
    assert list(tmp_path.iterdir()) == []  # no pytorch-errorfile-*.pickle, no zosol-spawn-* folder
