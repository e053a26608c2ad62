"""Adversarial inputs to dataset generation and reading (issue 15: findings 2, 3, 4, 6, 7, 8, 9 on
the data side).  Each test reproduces one probe at tiny sizes and checks the documented outcome:
one line, exit code 2 (user error) or 1 (failed run), no traceback, no foreign file touched, and
a rerun that reaches the result of an undisturbed run."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from zosol.cli import main
from zosol.datasets import DatasetError, generate, load_dataset
from zosol.solvers import SolverError, get_scenario
from zosol.solvers.burgers1d import Burgers1D

genmod = importlib.import_module("zosol.datasets.generate")
ROOT = Path(__file__).resolve().parents[1]
GEN = ["generate", "--scenario", "burgers1d", "--preset", "tiny", "--quiet"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _same_data(a: Path, b: Path) -> None:
    da, db = load_dataset(a), load_dataset(b)
    for sa, sb in zip(da.train + da.test, db.train + db.test):
        assert sa.seed == sb.seed and torch.equal(sa.trajectory, sb.trajectory) and torch.equal(sa.params, sb.params)


@pytest.fixture
def cli_failure(capsys):
    """``cli_failure(argv, match)``: exit code 1, one stderr line ``zosol: failed: ...``, no traceback."""

    def run(argv: list[str], match: str = "") -> str:
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 1, captured
        assert captured.err.count("\n") == 1 and captured.err.startswith("zosol: failed: "), captured.err
        assert "Traceback" not in captured.err and match in captured.err, captured.err
        return captured.err.strip()

    return run


# -- 3: data outside the file -----------------------------------------------------------------


def _secret(tmp_path: Path, nbytes: int) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(nbytes // 4, dtype=np.float32).tobytes())
    return secret


def _replace_train0(path: Path, make) -> None:
    with h5py.File(path, "r+") as f:
        d = f["train/0"]
        shape, attrs = d.shape, dict(d.attrs)
        del f["train/0"]
        make(f, shape)
        if isinstance(f["train"].get("0", getlink=True), h5py.HardLink):
            f["train/0"].attrs.update(attrs)


@pytest.mark.parametrize("kind", ["external_storage", "external_link", "soft_link", "virtual"])
def test_data_stored_outside_the_file_are_refused(tiny_h5, tmp_path, kind, cli_user_error):
    path = _copy(tiny_h5, tmp_path / "evil.h5")
    nbytes = 13 * 16 * 4
    secret = _secret(tmp_path, nbytes)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as g:
        g.create_dataset("x", data=np.ones((13, 1, 16), np.float32))

    def make(f, shape):
        if kind == "external_storage":
            f.create_dataset("train/0", shape=shape, dtype=np.float32, external=[(str(secret), 0, nbytes)])
        elif kind == "external_link":
            f["train/0"] = h5py.ExternalLink(str(other), "/x")
        elif kind == "soft_link":
            f["train/0"] = h5py.SoftLink("/test/10000")
        else:
            layout = h5py.VirtualLayout(shape=shape, dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(other), "x", shape=shape)
            f.create_virtual_dataset("train/0", layout)

    _replace_train0(path, make)
    with pytest.raises(DatasetError, match="/train/0") as info:
        load_dataset(path)
    assert "refused" in str(info.value) and "\n" not in str(info.value)
    cli_user_error(["info", str(path)], "refused")


# -- 2 + 4: planted symlinks, concurrent generate -------------------------------------------------


def test_generate_never_follows_planted_symlinks(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "data"
    parts = out / "burgers1d_tiny.h5.parts"
    parts.mkdir(parents=True)
    # the old fixed temporary names
    (out / "burgers1d_tiny.h5.tmp").symlink_to(victim)
    for name in ("train_0.tmp.npz", "test_10000.tmp.npz", "config.json.tmp"):
        (parts / name).symlink_to(victim)
    assert main([*GEN, "--out", str(out)]) == 0
    assert victim.read_text() == "precious"
    _same_data(out / "burgers1d_tiny.h5", generate("burgers1d", "tiny", tmp_path / "clean", progress=False))
    # a symlink at the final name is replaced by --overwrite, its target untouched
    final = tmp_path / "data2" / "burgers1d_tiny.h5"
    final.parent.mkdir()
    final.symlink_to(victim)
    assert main([*GEN, "--out", str(final.parent), "--overwrite"]) == 0
    assert victim.read_text() == "precious" and not final.is_symlink()


def test_second_generate_of_the_same_dataset_is_refused_naming_the_holder(tmp_path, cli_user_error):
    out = tmp_path / "data"
    out.mkdir()
    code = (
        "import sys, time; from zosol.runtime.files import FileLock; FileLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out / "burgers1d_tiny.h5")], stdout=subprocess.PIPE, env=env
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        t0 = time.monotonic()
        line = cli_user_error([*GEN, "--out", str(out)], f"is in use by pid {holder.pid} on host")
        assert time.monotonic() - t0 < 1.0, line
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == ["burgers1d_tiny.h5.lock"]  # nothing generated meanwhile
    assert main([*GEN, "--out", str(out)]) == 0  # the lock of a dead holder is free
    assert sorted(p.name for p in out.iterdir()) == ["burgers1d_tiny.h5"]


def test_two_identical_generate_processes_do_not_crash(tmp_path):
    """Both started at once: one generates, the other is refused in one line or reuses the result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "zosol.cli", *GEN, "--out", str(tmp_path), "--batch", "1"]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            assert err.count("\n") == 1 and "is in use by pid" in err
    _same_data(
        tmp_path / "burgers1d_tiny.h5", generate("burgers1d", "tiny", tmp_path / "clean", batch=1, progress=False)
    )


# -- 8: sizes bounded before allocation ----------------------------------------------------------


@pytest.mark.parametrize(
    "override, match",
    [
        ("n_ref=67108864", "would take at least"),
        ("train_sims=1000000000", "of memory"),
        ("frames=1000000000", "of memory"),
        ("warmup=1000000000000", "would take at least"),
    ],
)
def test_absurd_generation_sizes_are_refused_up_front(tmp_path, override, match, cli_user_error):
    t0 = time.monotonic()
    line = cli_user_error([*GEN, "--set", override, "--out", str(tmp_path)], match)
    assert time.monotonic() - t0 < 2.0
    assert "GiB" in line or "years" in line or "days" in line  # the estimate is in the message
    assert list(tmp_path.iterdir()) == []


def test_crafted_grid_attribute_is_refused_before_allocating(tiny_h5, tmp_path, monkeypatch, cli_user_error):
    path = _copy(tiny_h5, tmp_path / "crafted.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = (
            f.attrs["config"]
            .replace('"n_coarse": 16', f'"n_coarse": {2**30}')
            .replace('"n_ref": 128', f'"n_ref": {2**31}')
        )
    real = Burgers1D.__init__

    def guarded(self, n, *a, **kw):
        assert n <= 4096, f"a solver of {n} cells was built"
        real(self, n, *a, **kw)

    monkeypatch.setattr(Burgers1D, "__init__", guarded)
    cli_user_error(["info", str(path)], "has shape (13, 1, 16) float32, expected (13, 1, 1073741824)")


def test_decompression_bomb_is_refused(tiny_h5, tmp_path, cli_user_error):
    path = _copy(tiny_h5, tmp_path / "bomb.h5")
    frames = 2**20  # 64 MiB per simulation that decompress from (almost) nothing
    with h5py.File(path, "r+") as f:
        f.attrs["frames"] = frames
        for split in ("train", "test"):
            for key in list(f[split]):
                attrs = dict(f[split][key].attrs)
                del f[split][key]
                d = f[split].create_dataset(
                    key,
                    shape=(frames + 1, 1, 16),
                    dtype=np.float32,
                    compression="gzip",
                    chunks=(4096, 1, 16),
                    fillvalue=0.0,
                )
                d[:8] = 1.0
                d.attrs.update(attrs)
    t0 = time.monotonic()
    cli_user_error(["info", str(path)], "decompression bomb")
    assert time.monotonic() - t0 < 2.0


def test_huge_attribute_is_refused_unread(tiny_h5, tmp_path):
    path = _copy(tiny_h5, tmp_path / "fat.h5")
    with h5py.File(path, "r+", libver="latest") as f:  # new object headers: no 64 KiB attribute limit
        data, seed = f["train/0"][()], f["train/0"].attrs["seed"]
        del f["train/0"]
        d = f.create_dataset("train/0", data=data)
        d.attrs["seed"] = seed
        d.attrs["params"] = np.zeros(2**19, np.float32)  # 2 MiB
    with pytest.raises(DatasetError, match="attribute 'params' of /train/0 holds 2 MiB"):
        load_dataset(path)


def test_deeply_nested_config_is_a_dataset_error(tiny_h5, tmp_path):
    path = _copy(tiny_h5, tmp_path / "nested.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = "[" * 100_000 + "]" * 100_000
    with pytest.raises(DatasetError, match="invalid scenario config"):
        load_dataset(path)


# -- 9: contents validated, damaged files repaired ---------------------------------------------


@pytest.mark.parametrize("where", ["train", "test"])
def test_nan_params_are_refused(tiny_h5, tmp_path, where, cli_user_error):
    path = _copy(tiny_h5, tmp_path / "nan.h5")
    key = "train/1" if where == "train" else "test/10001"
    with h5py.File(path, "r+") as f:
        p = f[key].attrs["params"].copy()
        p[0] = np.nan
        f[key].attrs["params"] = p
    line = cli_user_error(["info", str(path)], f"/{key} params contains NaN or inf")
    assert "zosol generate --scenario burgers1d --preset tiny" in line and "--overwrite" in line


def test_empty_test_group_is_a_clear_error(tiny_h5, tmp_path, cli_user_error):
    path = _copy(tiny_h5, tmp_path / "notest.h5")
    with h5py.File(path, "r+") as f:
        for k in list(f["test"]):
            del f["test"][k]
    cli_user_error(["info", str(path)], "/test holds no simulations")


@pytest.mark.parametrize("tamper", ["wrong_shape", "nan", "float64", "garbage", "missing_key", "pickle"])
def test_tampered_parts_are_regenerated_not_assembled(tmp_path, tamper, capsys):
    out = tmp_path / "data"
    parts = out / "burgers1d_tiny.h5.parts"
    parts.mkdir(parents=True)
    sc = get_scenario("burgers1d", "tiny")
    good = np.zeros((13, 1, 16), np.float32)
    params = np.zeros(6, np.float32)
    part = parts / "train_1.npz"
    if tamper == "wrong_shape":
        np.savez(part, trajectory=good[:, :, ::2], params=params)
    elif tamper == "nan":
        np.savez(part, trajectory=np.full_like(good, np.nan), params=params)
    elif tamper == "float64":
        np.savez(part, trajectory=good.astype(np.float64), params=params)
    elif tamper == "garbage":
        part.write_bytes(b"PK\x03\x04 not really a zip")
    elif tamper == "missing_key":
        np.savez(part, trajectory=good)
    else:
        np.savez(part, trajectory=np.array([object()], dtype=object), params=params)
    # a stamp of the same config, as an interrupted run leaves it
    import json

    (parts / "config.json").write_text(json.dumps({**sc.describe(), "batch": 8}, sort_keys=True))
    assert main([*GEN, "--out", str(out)]) == 0
    assert "regenerating train_1.npz: damaged part" in capsys.readouterr().err
    _same_data(out / "burgers1d_tiny.h5", generate("burgers1d", "tiny", tmp_path / "clean", progress=False))


def test_damaged_final_file_is_reported_then_repaired_by_the_named_command(tiny_h5, tmp_path, cli_user_error):
    out = tmp_path / "data"
    out.mkdir()
    path = _copy(tiny_h5, out / "burgers1d_tiny.h5")
    with h5py.File(path, "r+") as f:
        f["test/10000"][3, 0, 5] = np.nan
    line = cli_user_error([*GEN, "--out", str(out)], "contains NaN or inf")
    command = line[line.index("`") + 1 : line.rindex("`")]
    assert command == f"zosol generate --scenario burgers1d --preset tiny --out {out} --overwrite"
    assert main([*command.split()[1:], "--quiet"]) == 0  # exactly the command the message names
    _same_data(path, tiny_h5)
    assert main([*GEN, "--out", str(out)]) == 0  # and now a plain rerun accepts it


# -- 6: divergence in solvers and generation is a SolverError -----------------------------------


def test_burgers_blow_up_is_a_solver_error():
    solver = get_scenario("burgers1d", "tiny").coarse_solver()
    with pytest.raises(SolverError, match="diverging"):
        solver.step(torch.full((1, 1, 16), 1e12), torch.zeros(1, 6))
    s2 = get_scenario("burgers2d", "tiny").coarse_solver()
    with pytest.raises(SolverError, match="diverging"):
        s2.step(torch.full((1, 2, 16, 16), 1e12), torch.zeros(1, s2.num_params))
    with pytest.raises(FloatingPointError):  # still one for code that caught the old exception
        solver.step(torch.full((1, 1, 16), 1e12), torch.zeros(1, 6))


def test_non_finite_output_from_a_finite_state_is_a_solver_error():
    solver = get_scenario("burgers1d", "tiny").coarse_solver()
    u = torch.zeros(2, 1, 16)
    u[1, 0, 3] = 3e38  # finite, but the flux u^2/2 overflows float32
    with pytest.raises(SolverError, match=r"NaN/inf in 1 of 2 samples .*first: sample 1"):
        solver.step(u, torch.zeros(2, 6))
    nan_in = torch.full((1, 1, 16), float("nan"))
    assert torch.isnan(solver.step(nan_in, torch.zeros(1, 6))).all()  # NaN in, NaN out: not the solver's fault


def test_diverging_generation_is_a_failed_run_and_keeps_finished_parts(tmp_path, monkeypatch, cli_failure):
    real, calls = genmod.simulate_reference, []

    def blows_up(scenario, seeds):
        calls.append(seeds)
        if len(calls) == 2:
            return real(
                scenario.__class__(scenario.config.__class__(**{**scenario.config.to_dict(), "ic_amplitude": 1e12})),
                seeds,
            )
        return real(scenario, seeds)

    out = tmp_path / "data"
    monkeypatch.setattr(genmod, "simulate_reference", blows_up)
    cli_failure([*GEN, "--out", str(out), "--batch", "2"], "diverging")
    assert sorted(p.name for p in (out / "burgers1d_tiny.h5.parts").glob("*.npz")) == ["train_0.npz", "train_1.npz"]
    monkeypatch.setattr(genmod, "simulate_reference", real)
    assert main([*GEN, "--out", str(out), "--batch", "2"]) == 0
    _same_data(out / "burgers1d_tiny.h5", generate("burgers1d", "tiny", tmp_path / "clean", batch=2, progress=False))


# -- 7: plots and file-system errors -----------------------------------------------------------


def test_info_plot_honours_the_suffix(tiny_h5, tmp_path, capsys, cli_user_error):
    for suffix, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml"), (".png", b"\x89PNG")):
        target = tmp_path / f"figure{suffix}"
        assert main(["info", str(tiny_h5), "--plot", str(target)]) == 0
        assert target.read_bytes().startswith(magic), suffix
    t0 = time.monotonic()
    cli_user_error(["info", str(tiny_h5), "--plot", str(tmp_path / "figure.xyz")], "one of .")
    cli_user_error(["info", str(tiny_h5), "--plot", str(tmp_path / "figure")], "the suffix must name")
    assert time.monotonic() - t0 < 1.0  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.pdf", "figure.png", "figure.svg"]


def test_out_that_is_a_file(tmp_path, cli_user_error):
    f = tmp_path / "afile"
    f.write_text("keep")
    cli_user_error([*GEN, "--out", str(f)], "is a file, not a directory")
    assert f.read_text() == "keep"


class _FillingDisk:
    """``os.fdopen`` whose files raise ENOSPC once ``budget`` bytes were written in all."""

    def __init__(self, budget: int):
        self.left, self.real = budget, os.fdopen

    def __call__(self, fd, *args, **kw):
        f, disk = self.real(fd, *args, **kw), self

        class Filling:
            def write(self, data):
                n = memoryview(data).nbytes
                if n > disk.left:
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.left -= n
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Filling()


@pytest.mark.parametrize("budget, full_at", [(2000, "part"), (10000, "final")])
def test_disk_full_is_one_line_and_loses_nothing(tmp_path, monkeypatch, budget, full_at, cli_user_error):
    """The disk fills up while a part (2 kB free) or the final file (10 kB free) is written: one line,
    exit 2, no temporary left, every part written before kept intact; the rerun with space again
    equals an undisturbed run."""
    out = tmp_path / "data"
    monkeypatch.setattr(os, "fdopen", _FillingDisk(budget))
    line = cli_user_error([*GEN, "--out", str(out), "--batch", "2"], "No space left on device")
    monkeypatch.undo()
    assert "Traceback" not in line
    parts = out / "burgers1d_tiny.h5.parts"
    assert not (out / "burgers1d_tiny.h5").exists()
    assert not list(out.glob(".*.tmp")) and not list(parts.glob(".*.tmp"))
    kept = sorted(p.name for p in parts.glob("*.npz"))
    assert (len(kept) < 5) if full_at == "part" else (len(kept) == 5)
    for name in kept:
        with np.load(parts / name) as z:
            assert z["trajectory"].shape == (13, 1, 16) and np.isfinite(z["trajectory"]).all()
    assert main([*GEN, "--out", str(out), "--batch", "2"]) == 0
    _same_data(out / "burgers1d_tiny.h5", generate("burgers1d", "tiny", tmp_path / "clean", batch=2, progress=False))


def test_file_size_limit_is_one_line_not_a_crash(tmp_path):
    """``ulimit -f`` 20 kB: the parts (1.4 kB) fit, the final file (~30 kB) does not; the kernel
    refuses the write (EFBIG).  Was a segfault / bus error from h5py at exit."""
    limit = 20_000
    import resource

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "zosol.cli", *GEN, "--out", str(tmp_path / "data")]
    p = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "File too large" in p.stderr and "Traceback" not in p.stderr
    assert not list((tmp_path / "data").rglob(".*.tmp"))
    assert len(list((tmp_path / "data").rglob("*.npz"))) == 5  # the finished parts are kept
    assert main([*GEN, "--out", str(tmp_path / "data")]) == 0
    _same_data(
        tmp_path / "data" / "burgers1d_tiny.h5", generate("burgers1d", "tiny", tmp_path / "clean", progress=False)
    )


def test_read_only_directory_is_one_line(tmp_path, monkeypatch, cli_user_error):
    """As root a chmod 555 directory stays writable, so the refusal is injected where the kernel
    would raise it (creating the temporary file)."""
    fsutil = importlib.import_module("zosol.runtime.files")

    def read_only(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))

    monkeypatch.setattr(fsutil, "_new_temp", read_only)
    line = cli_user_error([*GEN, "--out", str(tmp_path)], ": Permission denied")
    assert f"cannot write or read {tmp_path}" in line


def test_output_name_too_long_is_one_line(tmp_path, cli_user_error):
    cli_user_error([*GEN, "--out", str(tmp_path / ("x" * 300))], "File name too long")
    assert list(tmp_path.iterdir()) == []
