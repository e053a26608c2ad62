"""Bring your own solver: scenarios from parts, datasets that open in a new process, importers,
solvers without a batch axis (split batches, local process pools)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from zosol.datasets import generate, load_dataset
from zosol.datasets.hdf5 import DatasetError
from zosol.datasets.importers import import_hdf5, import_trajectories
from zosol.solvers import block_average, get_scenario, make_scenario
from zosol.solvers.external import ExternalSolver, NumpySolver

ROOT = Path(__file__).resolve().parents[1]

# A user's module: a forced heat equation stepped one state at a time in numpy, made into a
# scenario from parts at module level and registered under its name.
HEAT_MODULE = textwrap.dedent('''
    import numpy as np
    from zosol.solvers import make_scenario, register

    def heat(n, nu=0.2, dt=0.05, sub=8):
        h = 2 * np.pi / n
        x = (np.arange(n) + 0.5) * h
        def step(u, p):                       # one state (1, n), params (1,)
            for _ in range(sub):
                lap = (np.roll(u, 1, -1) - 2 * u + np.roll(u, -1, -1)) / h ** 2
                u = u + dt / sub * (nu * lap + p[0] * np.sin(x))
            return u
        return step

    def sample(seed):
        rng = np.random.default_rng(seed)
        x = (np.arange(64) + 0.5) * 2 * np.pi / 64
        return np.cos(x + rng.uniform(0, 6.3))[None], rng.uniform(0.5, 1.0, size=1)

    scenario = make_scenario("user_heat", reference=heat(64), coarse=heat(16, sub=2), sample=sample, dt=0.05,
                             reference_shape=(64,), coarse_shape=(16,), num_params=1, batched=False,
                             frames=6, train_sims=3, test_sims=2, presets={"tiny": {"frames": 4}},
                             physics={"nu": 0.2})
    register("user_heat", scenario)
''')


@pytest.fixture
def heat_module(tmp_path, monkeypatch):
    """The user's module written to a folder on sys.path (as ``import user_heat_mod`` would find it)."""
    (tmp_path / "user_heat_mod.py").write_text(HEAT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_heat_mod", None)
    import user_heat_mod

    yield user_heat_mod
    sys.modules.pop("user_heat_mod", None)
    from zosol.solvers import base

    base._REGISTRY.pop("user_heat", None)


def _zosol(args, cwd, env_path=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([str(env_path)] if env_path else []))
    return subprocess.run(
        [sys.executable, "-m", "zosol.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_block_average_is_conservative():
    fine = torch.randn(3, 2, 8, 12, dtype=torch.float64)
    small = block_average(fine, (4, 3))
    assert small.shape == (3, 2, 4, 3)
    torch.testing.assert_close(small.sum((-1, -2)) * 8, fine.sum((-1, -2)))  # 2 x 4 cells per coarse cell
    torch.testing.assert_close(small[0, 0, 1, 2], fine[0, 0, 2:4, 8:12].mean())


def test_scenario_from_parts_generates_and_reopens(heat_module, tmp_path):
    sc = heat_module.scenario
    assert sc.source == "user_heat_mod:scenario"
    path = generate(sc, out=tmp_path / "data", progress=False)
    assert path.name == "user_heat_default.h5"
    ds = load_dataset(path)
    assert ds.scenario.coarse_solver() is sc.coarse_solver()  # rebuilt from the record, solvers shared
    traj, params = ds.stacked("train")
    assert traj.shape == (3, 7, 1, 16) and params.shape == (3, 1)
    # frame 0 is the block average of the sampled reference state
    u0, p0 = sc.sample(sc.train_seeds[0])
    torch.testing.assert_close(traj[0, 0], u0.reshape(1, 16, 4).mean(-1), rtol=1e-6, atol=1e-6)
    # the reference really ran: frame 1 is the averaged reference step
    ref1 = sc.reference_solver().step(u0[None], p0[None])
    torch.testing.assert_close(traj[0, 1], ref1.reshape(1, 16, 4).mean(-1), rtol=1e-5, atol=1e-6)
    tiny = get_scenario("user_heat", "tiny")
    assert tiny.config.frames == 4 and tiny.coarse_solver() is sc.coarse_solver()
    with pytest.raises(ValueError, match="unknown config field"):
        get_scenario("user_heat", "tiny", nu=3)
    assert load_dataset(path, scenario=sc).scenario is sc


def test_dataset_of_user_scenario_opens_in_fresh_process(heat_module, tmp_path):
    path = generate(heat_module.scenario, out=tmp_path / "data", progress=False)
    with h5py.File(path) as f:
        assert f.attrs["scenario_source"] == "user_heat_mod:scenario"
    ok = _zosol(["info", str(path), "--json", "--plugin", "user_heat_mod"], tmp_path, env_path=tmp_path)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["scenario"] == "user_heat" and info["coarse_error_vs_reference"]["mae_mean"] > 0
    assert info["scenario_source"] == "user_heat_mod:scenario"  # shown, not executed
    for cwd in (tmp_path, tmp_path.parent):  # importable or not: a file's word never imports a module
        bad = _zosol(["info", str(path)], cwd, env_path=tmp_path if cwd == tmp_path else None)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert "made with module 'user_heat_mod'" in bad.stderr and "--plugin user_heat_mod" in bad.stderr


def test_scenario_made_in_a_script_opens_or_names_the_fix(tmp_path, monkeypatch):
    code = HEAT_MODULE.replace("user_heat", "script_heat") + textwrap.dedent(f'''
        if __name__ == "__main__":
            from zosol.datasets import generate
            print(generate(scenario, out={str(tmp_path / "d")!r}, progress=False))
    ''')
    (tmp_path / "script_heat_run.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    made = subprocess.run(
        [sys.executable, str(tmp_path / "script_heat_run.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert made.returncode == 0, made.stderr
    path = made.stdout.strip()
    with pytest.raises(DatasetError, match="made with module 'script_heat_run'.*--plugin script_heat_run"):
        load_dataset(path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the script's folder: the script is a module there
    try:
        with pytest.raises(DatasetError, match="made with module 'script_heat_run'"):
            load_dataset(path)  # importable now, but never imported on the file's word
        assert "script_heat_run" not in sys.modules
        __import__("script_heat_run")  # the user imports it
        assert load_dataset(path).scenario.name == "script_heat"
    finally:
        sys.modules.pop("script_heat_run", None)
        from zosol.solvers import base

        base._REGISTRY.pop("script_heat", None)
    inline = subprocess.run(
        [sys.executable, "-c", code.replace(str(tmp_path / "d"), str(tmp_path / "e"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # python -c: no module
    assert inline.returncode == 0, inline.stderr
    with pytest.raises(DatasetError, match="__main__.*move the scenario into a module"):
        load_dataset(inline.stdout.strip())


def test_scenario_without_parameters_round_trips(tmp_path):
    """K = 0 (no per-simulation parameters): the params attribute is an empty array."""
    step = lambda u, p: 0.9 * u  # noqa: E731
    sc = make_scenario(
        "no_params",
        reference=step,
        coarse=step,
        sample=lambda s: (np.full((1, 8), s + 1.0), None),
        dt=0.1,
        reference_shape=(8,),
        coarse_shape=(4,),
        batched=False,
        frames=2,
        train_sims=2,
        test_sims=1,
    )
    ds = load_dataset(generate(sc, out=tmp_path, progress=False), scenario=sc)
    assert ds.stacked("train")[1].shape == (2, 0)
    torch.testing.assert_close(ds.stacked("test")[0][0, :, 0, 0], torch.tensor([10001.0, 9000.9, 8100.81]))


def test_make_scenario_checks_its_parts():
    step = lambda u, p: u  # noqa: E731
    with pytest.raises(ValueError, match="not a multiple of the coarse grid"):
        make_scenario("x", reference=step, coarse=step, sample=None, dt=0.1, reference_shape=(10,), coarse_shape=(4,))
    with pytest.raises(ValueError, match="reference_shape"):
        make_scenario("x", reference=step, coarse=step, sample=None, dt=0.1, coarse_shape=(4,))
    other = NumpySolver(step, dt=0.2, channels=("u",), spatial_shape=(4,))
    with pytest.raises(ValueError, match="dt=0.2"):
        make_scenario("x", reference=step, coarse=other, sample=None, dt=0.1, reference_shape=(8,))


def test_import_trajectories_and_pdebench_hdf5(heat_module, tmp_path):
    sc = heat_module.scenario
    ref = sc.reference_solver()
    states, params = zip(*(sc.sample(s) for s in range(5)))
    u, p = torch.stack(states), torch.stack(params)
    frames = [u]
    for _ in range(3):
        u = ref.step(u, p)
        frames.append(u)
    fine = torch.stack(frames, 1)  # (5, 4, 1, 64): the user's own reference runs
    path = import_trajectories(sc, fine[:3], fine[3:], tmp_path / "imported.h5", train_params=p[:3], test_params=p[3:])
    ds = load_dataset(path)
    assert ds.frames == 3 and len(ds.train) == 3 and len(ds.test) == 2
    torch.testing.assert_close(ds.stacked("test")[0], block_average(fine[3:].flatten(0, 1), (16,)).view(2, 4, 1, 16))
    torch.testing.assert_close(ds.stacked("train")[1], p[:3])
    # the same runs as a PDEBench-style file: "tensor" (N, T, X), every other stored step kept
    with h5py.File(tmp_path / "pdebench.h5", "w") as f:
        f["tensor"] = np.repeat(fine[:, :, 0].numpy(), 2, axis=1)[:, ::1]
        f["nu_forcing"] = p.numpy()
    path2 = import_hdf5(
        sc, tmp_path / "pdebench.h5", tmp_path / "pdebench_zosol.h5", every=2, test=2, params="nu_forcing"
    )
    ds2 = load_dataset(path2)
    torch.testing.assert_close(ds2.stacked("test")[0], ds.stacked("test")[0])
    # The Well style: one array per field under t0_fields, on the coarse grid already
    with h5py.File(tmp_path / "the_well.h5", "w") as f:
        f["t0_fields/u"] = ds.stacked("train")[0][:, :, 0].numpy()
        f["params"] = p[:3].numpy()
    path3 = import_hdf5(
        sc, tmp_path / "the_well.h5", tmp_path / "well_zosol.h5", fields=["t0_fields/u"], test=1, params="params"
    )
    torch.testing.assert_close(load_dataset(path3).stacked("test")[0], ds.stacked("train")[0][2:])
    with pytest.raises(DatasetError, match="no array 't0_fields/v'"):
        import_hdf5(sc, tmp_path / "the_well.h5", tmp_path / "z.h5", fields=["t0_fields/v"])
    with pytest.raises(ValueError, match="grid \\[10\\] is neither"):
        import_trajectories(
            sc,
            np.zeros((2, 3, 1, 10)),
            np.zeros((1, 3, 1, 10)),
            tmp_path / "x.h5",
            train_params=np.ones((2, 1)),
            test_params=np.ones((1, 1)),
        )
    with pytest.raises(ValueError, match="needs 1 per-simulation parameters"):
        import_trajectories(sc, fine[:3], fine[3:], tmp_path / "y.h5")


def _unbatched(u, p):
    """One state (1, n) -> (1, n); deliberately slow (a legacy code's per-call cost)."""
    time.sleep(0.002)
    return np.tanh(u) + p[0] * np.roll(u, 1, -1)


def test_one_state_solver_splits_batches_and_processes_match():
    x, p = torch.randn(40, 1, 16), torch.randn(40, 1)
    want = torch.tanh(x) + p[:, :, None] * torch.roll(x, 1, -1)
    seen = []

    def recording(u, q):
        seen.append(u.shape)
        return _unbatched(u, q)

    one = NumpySolver(recording, dt=0.1, channels=("u",), spatial_shape=(16,), num_params=1, batched=False)
    torch.testing.assert_close(one.step(x, p), want)
    assert seen == [(1, 16)] * 40
    limited = NumpySolver(
        lambda u, q: (seen.append(u.shape), u)[1], dt=0.1, channels=("u",), spatial_shape=(16,), max_batch=16
    )
    seen.clear()
    limited.step(x)
    assert seen == [(16, 1, 16), (16, 1, 16), (8, 1, 16)]
    with NumpySolver(
        _unbatched, dt=0.1, channels=("u",), spatial_shape=(16,), num_params=1, batched=False, processes=2
    ) as two:
        a, b = two.step(x, p), two.step(x * 2, p)
        assert torch.equal(a, one.step(x, p)) and torch.equal(b, one.step(x * 2, p))
        assert two.pool.starts == 1  # the processes start once and serve every later batch


class _UnpicklableError(Exception):
    def __init__(self):
        super().__init__("holds a lambda")
        self.hook = lambda: None


def _fails_on_negative(u, q):
    if (u == 5).all():
        raise _UnpicklableError()
    if (u < 0).all():
        raise ValueError("negative state")
    if (u > 100).all():
        os._exit(3)  # a worker that dies
    if (u == 7).all():
        raise KeyboardInterrupt  # the user stops the run half-way through a batch
    return u + 1


def test_state_pool_errors_name_the_cause_and_the_pool_recovers():
    from zosol.solvers.base import SolverError

    with pytest.raises(ValueError, match="NumpySolver: processes must be an integer >= 1, got 0"):
        NumpySolver(_fails_on_negative, dt=0.1, channels=("u",), spatial_shape=(4,), batched=False, processes=0)
    x = torch.ones(6, 1, 4)
    with NumpySolver(
        _fails_on_negative, dt=0.1, channels=("u",), spatial_shape=(4,), batched=False, processes=2
    ) as two:
        assert torch.equal(two.step(x), x + 1)
        bad = x.clone()
        bad[4:] = -1  # only in the worker's block
        with pytest.raises(ValueError, match="negative state"):  # the step's own exception, with its type
            two.step(bad)
        assert torch.equal(two.step(x), x + 1) and two.pool.starts == 1  # the pipes stayed in step
        bad = x.clone()
        bad[:3] = -1  # only in this process's block
        with pytest.raises(ValueError, match="negative state"):
            two.step(bad)
        assert torch.equal(two.step(x * 2), x * 2 + 1) and two.pool.starts == 1
        odd = x.clone()
        odd[4:] = 5  # the worker's exception cannot be pickled: its text comes back
        with pytest.raises(RuntimeError, match="_UnpicklableError: holds a lambda"):
            two.step(odd)
        assert two.pool.starts == 1
        dead = x.clone()
        dead[4:] = 1000
        with pytest.raises(SolverError, match="worker process of the state pool stopped"):
            two.step(dead)
        assert torch.equal(two.step(x), x + 1) and two.pool.starts == 2  # new workers for the next batch
        stop = x.clone()
        stop[:3] = 7
        with pytest.raises(KeyboardInterrupt):
            two.step(stop)
        assert torch.equal(two.step(x * 3), x * 3 + 1) and two.pool.starts == 3  # no stale answer


def test_external_solver_max_batch_and_copies():
    cmd = [sys.executable, str(ROOT / "solvers" / "burgers1d_numpy.py"), "--n", "16"]
    x, p = torch.randn(11, 1, 16) * 0.5, torch.randn(11, 6) * 0.1
    with (
        ExternalSolver(cmd, timeout=30) as plain,
        ExternalSolver(cmd + ["--max-batch", "3"], timeout=30) as small,
        ExternalSolver(cmd + ["--max-batch", "3"], timeout=30, processes=2) as two,
    ):
        assert small.max_batch == 3 and two.processes == 2
        want = plain.step(x, p)
        assert torch.equal(small.step(x, p), want)
        assert small.calls == 4  # 3 + 3 + 3 + 2 states
        assert torch.equal(two.step(x, p), want)
        assert two.calls + two._copies[0].calls == 4
        pids = {two.pid, two._copies[0].pid}
        two.step(x, p)
        assert {two.pid, two._copies[0].pid} == pids and len(pids) == 2  # started once


# ---- solvers built once, compare() for user solvers, gradient checks without a twin ----------

from zosol.compare import compare  # noqa: E402
from zosol.config import train_config  # noqa: E402
from zosol.solvers import register  # noqa: E402
from zosol.solvers.burgers1d import Burgers1DScenario  # noqa: E402
from zosol.training import train  # noqa: E402
from zosol.training.gradcheck import check_gradient  # noqa: E402


class CountingBurgers(Burgers1DScenario):
    """burgers1d that counts how often its solvers are constructed."""

    name = "counting_burgers1d"
    built = {"coarse": 0, "reference": 0}

    def coarse_solver(self):
        CountingBurgers.built["coarse"] += 1
        return super().coarse_solver()

    def reference_solver(self):
        CountingBurgers.built["reference"] += 1
        return super().reference_solver()


@pytest.fixture
def counting_registered():
    register(CountingBurgers.name, CountingBurgers)
    yield
    from zosol.solvers import base

    base._REGISTRY.pop(CountingBurgers.name, None)


def test_train_and_compare_build_each_solver_once(tmp_path, counting_registered):
    CountingBurgers.built.update(coarse=0, reference=0)
    results = compare(
        CountingBurgers.name, "tiny", tmp_path, overrides={"epochs": 1}, progress=False, log=lambda *a: None
    )
    assert set(results["methods"]) == {"SRC", "NON", "NOG-SOL", "FO-SOL", "ZO-SOL", "ZO-JAC-SOL"}
    assert CountingBurgers.built == {"coarse": 1, "reference": 1}
    CountingBurgers.built.update(coarse=0, reference=0)
    ds = load_dataset(tmp_path / "data" / "counting_burgers1d_tiny.h5", scenario=CountingBurgers.name)
    for method in ("non", "fo-sol", "zo-sol", "zo-jac-sol"):  # the ZO methods also run their gradient checks
        train(ds, train_config("tiny", method=method, epochs=1), progress=False)
    assert CountingBurgers.built == {"coarse": 1, "reference": 0}


def test_compare_user_black_box_leaves_out_fo_sol(heat_module, tmp_path):
    lines = []
    results = compare(
        heat_module.scenario,
        "tiny",
        tmp_path,
        overrides={"epochs": 1, "grad_checks": 1},
        progress=False,
        log=lines.append,
    )
    assert set(results["methods"]) == {"SRC", "NON", "NOG-SOL", "ZO-SOL", "ZO-JAC-SOL"}
    assert lines[0].startswith("FO-SOL left out: it needs autograd") and "twin=" in lines[0]
    for name in ("ZO-SOL", "ZO-JAC-SOL"):  # the checks ran through the black box, no twin
        fd = results["methods"][name]["grad_cosine_vs_fd"]
        assert len(fd) == 1 and fd[0]["cosine"] > 0.99, (name, fd)
    assert (tmp_path / "data" / "user_heat_tiny.h5").exists()


def test_public_gradient_check_with_and_without_twin(heat_module, tmp_path):
    sc = get_scenario("burgers1d", "tiny")
    ds = load_dataset(generate(sc, out=tmp_path, progress=False), scenario=sc)
    rep = check_gradient(ds, train_config("tiny", window=3), solver=sc.coarse_solver().blackbox())
    assert set(rep["methods"]) == {"zo-sol", "zo-jac-sol"}
    for zo in rep["methods"].values():
        assert zo["cosine_vs_fd"] > 0.999 and zo["cosine_vs_twin"] > 0.999
    assert rep["twin"]["cosine"] > 0.999
    heat = load_dataset(generate(heat_module.scenario, out=tmp_path, progress=False))
    rep = check_gradient(heat, train_config("tiny"))
    assert rep["twin"] is None and rep["methods"]["zo-sol"]["cosine_vs_twin"] is None
    assert rep["methods"]["zo-sol"]["cosine_vs_fd"] > 0.999
    # a wrong gradient is caught: a solver that adds fresh noise on every call (seeded)
    rng = np.random.default_rng(0)
    noisy = NumpySolver(
        lambda u, p: u + 1e-2 * rng.standard_normal(u.shape),
        dt=0.05,
        channels=("u",),
        spatial_shape=(16,),
        num_params=1,
    )
    bad = check_gradient(heat, train_config("tiny"), solver=noisy)
    assert bad["methods"]["zo-sol"]["cosine_vs_fd"] < 0.99


def test_cli_plugin_trains_and_opens_user_scenario(heat_module, tmp_path):
    run = _zosol(
        [
            "train",
            "--plugin",
            "user_heat_mod",
            "--scenario",
            "user_heat",
            "--preset",
            "tiny",
            "--method",
            "zo-sol",
            "--epochs",
            "1",
            "--data",
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "run"),
        ],
        tmp_path,
        env_path=tmp_path,
    )
    assert run.returncode == 2 and "--data" in run.stderr and "no such file or directory" in run.stderr
    (tmp_path / "d").mkdir()  # --data names an existing folder to generate in
    run = _zosol(run.args[3:], tmp_path, env_path=tmp_path)
    assert run.returncode == 0, run.stderr
    ev = _zosol(["evaluate", str(tmp_path / "run"), "--plugin", "user_heat_mod"], tmp_path, env_path=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["method"] == "zo-sol"
    missing = _zosol(["compare", "--plugin", "no_such_plugin_mod", "--scenario", "x"], tmp_path)
    assert missing.returncode == 2 and "plugin 'no_such_plugin_mod' cannot be imported" in missing.stderr


def _doc_module() -> str:
    """The `my_burgers.py` block of docs/your_own_solver.md."""
    text = (ROOT / "docs" / "your_own_solver.md").read_text()
    return text.split("## The whole example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_your_own_solver_doc_is_short_and_public():
    code = _doc_module()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 40
    imports = [ln for ln in lines if "import" in ln]
    assert imports and not any("._" in ln or "import _" in ln for ln in imports)  # no private names


@pytest.mark.slow
def test_your_own_solver_doc(tmp_path):
    """The doc's example end to end at the tiny preset (py-pde compiles with numba: minutes)."""
    pytest.importorskip("pde")
    (tmp_path / "my_burgers.py").write_text(_doc_module())
    script = textwrap.dedent('''
        import json, torch
        from zosol.compare import compare
        from zosol.config import train_config
        from zosol.datasets import load_dataset
        from zosol.training.gradcheck import check_gradient
        from my_burgers import scenario
        torch.set_num_threads(1)
        res = compare(scenario, "tiny", "out", train_preset="tiny", overrides={"epochs": 1}, progress=False)
        ds = load_dataset("out/data/my_burgers_tiny.h5", scenario=scenario)
        rep = check_gradient(ds, train_config("tiny"))
        print(json.dumps({"methods": sorted(res["methods"]), "cos": rep["methods"]["zo-sol"]["cosine_vs_fd"]}))
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["methods"] == ["NOG-SOL", "NON", "SRC", "ZO-JAC-SOL", "ZO-SOL"] and out["cos"] >= 0.999
    info = _zosol(["info", "out/data/my_burgers_tiny.h5", "--json", "--plugin", "my_burgers"], tmp_path)
    assert info.returncode == 0, info.stderr[-2000:]
    assert json.loads(info.stdout)["scenario"] == "my_burgers"
    cli = _zosol(
        [
            "train",
            "--plugin",
            "my_burgers",
            "--scenario",
            "my_burgers",
            "--preset",
            "tiny",
            "--method",
            "zo-sol",
            "--epochs",
            "1",
            "--data",
            "out/data",
            "--out",
            "runs/zo",
        ],
        tmp_path,
        env_path=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]


def test_entry_point_group_registers_scenarios(heat_module, tmp_path, monkeypatch):
    """An installed package declares `ep_heat = "user_heat_mod:scenario"` in `zosol.scenarios`."""
    from zosol.solvers import base

    info = tmp_path / "site" / "fake_zosol_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-zosol-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[zosol.scenarios]\nep_heat = user_heat_mod:scenario\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    try:
        sc = get_scenario("ep_heat", "tiny")
        assert sc.name == "user_heat" and sc.config.frames == 4
        assert sc.coarse_solver() is heat_module.scenario.coarse_solver()
    finally:
        base._REGISTRY.pop("ep_heat", None)
