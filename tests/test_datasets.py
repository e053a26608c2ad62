"""Tests of fidelity-dataset generation and the validating HDF5 reader (datasets/*.py)."""

from __future__ import annotations

import importlib
import json
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from zosol.datasets import SCHEMA_VERSION, DatasetError, dataset_path, generate, load_dataset
from zosol.solvers import get_scenario

# ``zosol.datasets.generate`` is the function (re-exported by the package), not the module
genmod = importlib.import_module("zosol.datasets.generate")


def _copy(src: Path, dst_dir: Path, name: str = "copy.h5") -> Path:
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    return dst


def _trajectories(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{s}/{k}": f[s][k][()] for s in ("train", "test") for k in f[s]}


# -- writing and reading ----------------------------------------------------------------------


def test_generate_writes_a_valid_file(tiny_h5):
    sc = get_scenario("burgers1d", "tiny")
    assert tiny_h5.name == "burgers1d_tiny.h5" and tiny_h5 == dataset_path(tiny_h5.parent, sc)
    # nothing else left behind: no temporary file, no parts directory
    assert sorted(p.name for p in tiny_h5.parent.iterdir()) == ["burgers1d_tiny.h5"]
    with h5py.File(tiny_h5, "r") as f:
        assert int(f.attrs["zosol_schema"]) == SCHEMA_VERSION
        assert bool(f.attrs["complete"])
        assert f.attrs["scenario"] == "burgers1d" and f.attrs["preset"] == "tiny"
        assert json.loads(f.attrs["config"]) == sc.config.to_dict()
        assert float(f.attrs["dt"]) == sc.config.dt
        assert json.loads(f.attrs["channels"]) == ["u"]
        assert json.loads(f.attrs["spatial_shape"]) == [sc.config.n_coarse]
        assert int(f.attrs["frames"]) == sc.config.frames
        np.testing.assert_allclose(f["coords/x"][()], sc.coarse_solver().coords["x"].numpy())
        assert sorted(map(int, f["train"])) == sc.train_seeds
        assert sorted(map(int, f["test"])) == sc.test_seeds
        d = f["train"][str(sc.train_seeds[0])]
        assert d.dtype == np.float32 and d.shape == (sc.config.frames + 1, 1, sc.config.n_coarse)


def test_load_round_trip(tiny_h5):
    sc = get_scenario("burgers1d", "tiny")
    c = sc.config
    ds = load_dataset(tiny_h5)
    assert ds.path == tiny_h5 and ds.frames == c.frames
    assert ds.scenario.name == "burgers1d" and ds.scenario.preset == "tiny"
    assert ds.scenario.config == c
    assert [s.seed for s in ds.train] == sc.train_seeds and [s.seed for s in ds.test] == sc.test_seeds
    for sim in ds.train + ds.test:
        assert sim.trajectory.shape == (c.frames + 1, 1, c.n_coarse)
        assert sim.trajectory.dtype == torch.float32 and torch.isfinite(sim.trajectory).all()
        u0, p = sc.sample(sim.seed)
        assert torch.equal(sim.params, p)
        # frame 0 is the downsampled initial state; later frames moved away from it
        torch.testing.assert_close(sim.trajectory[0], sc.downsample(u0[None])[0])
        assert (sim.trajectory[-1] - sim.trajectory[0]).abs().max() > 1e-2
    # the stored trajectory is the reference run (recomputed here for one simulation, alone)
    traj, params = genmod.simulate_reference(sc, [ds.test[1].seed])
    torch.testing.assert_close(ds.test[1].trajectory, traj[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.test[1].params, params[0])
    x, p = ds.stacked("train")
    assert x.shape == (c.train_sims, c.frames + 1, 1, c.n_coarse) and p.shape == (c.train_sims, 2 * c.forcing_modes)
    summary = ds.summary()
    assert summary["train_sims"] == c.train_sims and summary["test_sims"] == c.test_sims
    assert summary["trajectory_shape"] == [c.frames + 1, 1, c.n_coarse]
    # a matching scenario name is accepted
    assert load_dataset(tiny_h5, "burgers1d").scenario.config == c


def test_same_seed_gives_bit_identical_data(tiny_h5, tmp_path):
    again = generate("burgers1d", "tiny", tmp_path, progress=False)
    a, b = _trajectories(tiny_h5), _trajectories(again)
    assert a.keys() == b.keys() and len(a) == 5
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # and a different seed gives different data
    other = generate("burgers1d", "tiny", tmp_path / "seed7", progress=False, overrides={"seed": 7})
    assert other.name == "burgers1d_custom.h5"
    c = _trajectories(other)
    assert not np.array_equal(c["train/7"], a["train/0"])


def test_existing_file_is_reused_but_not_for_another_config(tmp_path):
    small = {"frames": 3, "train_sims": 1, "test_sims": 1}
    path = generate("burgers1d", "tiny", tmp_path, progress=False, overrides=small)
    mtime = path.stat().st_mtime_ns
    assert generate("burgers1d", "tiny", tmp_path, progress=False, overrides=small) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not regenerated
    with pytest.raises(ValueError, match=r"different config.*frames"):
        generate("burgers1d", "tiny", tmp_path, progress=False, overrides={**small, "frames": 4})
    path2 = generate("burgers1d", "tiny", tmp_path, progress=False, overrides={**small, "frames": 4}, overwrite=True)
    assert path2 == path and load_dataset(path).frames == 4


# -- resuming ---------------------------------------------------------------------------------


class _Interrupt(RuntimeError):
    pass


def _interrupt_after(monkeypatch, n_chunks: int) -> list[list[int]]:
    """Make ``simulate_reference`` fail after ``n_chunks`` chunks; returns the list of seeds run."""
    real = genmod.simulate_reference
    calls: list[list[int]] = []

    def flaky(scenario, seeds):
        if len(calls) >= n_chunks:
            raise _Interrupt("simulated crash")
        calls.append(list(seeds))
        return real(scenario, seeds)

    monkeypatch.setattr(genmod, "simulate_reference", flaky)
    return calls


def _counting(monkeypatch) -> list[list[int]]:
    real = genmod.simulate_reference
    calls: list[list[int]] = []

    def counted(scenario, seeds):
        calls.append(list(seeds))
        return real(scenario, seeds)

    monkeypatch.setattr(genmod, "simulate_reference", counted)
    return calls


def test_interrupted_generation_resumes_bit_identically(tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        calls = _interrupt_after(m, 1)
        with pytest.raises(_Interrupt):
            generate("burgers1d", "tiny", out, batch=2, progress=False)
    assert calls == [[0, 1]]  # the first chunk (two training sims) finished
    final = out / "burgers1d_tiny.h5"
    parts = out / "burgers1d_tiny.h5.parts"
    assert not final.exists() and not (out / "burgers1d_tiny.h5.tmp").exists()
    assert sorted(p.name for p in parts.iterdir()) == ["config.json", "train_0.npz", "train_1.npz"]
    with np.load(parts / "train_0.npz") as z:
        assert z["trajectory"].shape == (13, 1, 16) and np.isfinite(z["trajectory"]).all()

    # resume: only the unfinished chunks run
    with monkeypatch.context() as m:
        calls = _counting(m)
        resumed = generate("burgers1d", "tiny", out, batch=2, progress=False)
    assert calls == [[2, 10000], [10001]]
    assert resumed == final and not parts.exists()

    straight = generate("burgers1d", "tiny", tmp_path / "straight", batch=2, progress=False)
    a, b = _trajectories(resumed), _trajectories(straight)
    assert a.keys() == b.keys() and len(a) == 5
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    da, db = load_dataset(resumed), load_dataset(straight)
    for sa, sb in zip(da.train + da.test, db.train + db.test):
        assert sa.seed == sb.seed and torch.equal(sa.params, sb.params)


def test_parts_of_a_different_config_are_refused(tmp_path, monkeypatch):
    small = {"frames": 3, "train_sims": 2, "test_sims": 1}
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(_Interrupt):
            generate("burgers1d", "tiny", tmp_path, batch=1, progress=False, overrides=small)
    parts = tmp_path / "burgers1d_custom.h5.parts"
    assert (parts / "train_0.npz").exists()
    # another config under the same file name (both 'custom')
    with pytest.raises(ValueError, match="different config"):
        generate("burgers1d", "tiny", tmp_path, batch=1, progress=False, overrides={**small, "frames": 4})
    # the same config chunked differently would not be bit-identical: refused as well
    with pytest.raises(ValueError, match="different config"):
        generate("burgers1d", "tiny", tmp_path, batch=2, progress=False, overrides=small)
    assert (parts / "train_0.npz").exists()  # nothing finished was thrown away
    assert not (tmp_path / "burgers1d_custom.h5").exists()
    # overwrite starts over
    path = generate("burgers1d", "tiny", tmp_path, batch=2, progress=False, overrides=small, overwrite=True)
    assert load_dataset(path).frames == 3 and not parts.exists()


def test_bad_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch"):
        generate("burgers1d", "tiny", tmp_path, batch=0, progress=False)


# -- reader errors ----------------------------------------------------------------------------


def _assert_dataset_error(path: Path, match: str, scenario: str | None = None) -> None:
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(path, scenario)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    _assert_dataset_error(tmp_path / "nowhere.h5", "no such dataset file")


def test_truncated_file(tiny_h5, tmp_path):
    path = tmp_path / "truncated.h5"
    data = tiny_h5.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_dataset_error(path, "truncated or corrupt")


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("these are not the bytes you are looking for\n" * 20)
    _assert_dataset_error(path, "not a readable HDF5 file")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    _assert_dataset_error(empty, "not a readable HDF5 file")


def test_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=np.zeros((4, 4)))
        f.attrs["author"] = "someone else"
    _assert_dataset_error(path, "not a zosol dataset")


def test_wrong_schema_version(tiny_h5, tmp_path):
    path = _copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["zosol_schema"] = SCHEMA_VERSION + 1
    _assert_dataset_error(path, f"schema version {SCHEMA_VERSION + 1}")


def test_incomplete_file(tiny_h5, tmp_path):
    path = _copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    _assert_dataset_error(path, "incomplete dataset")
    with h5py.File(path, "r+") as f:
        del f.attrs["complete"]
    _assert_dataset_error(path, "incomplete dataset")


def test_scenario_mismatch(tiny_h5):
    _assert_dataset_error(tiny_h5, "holds scenario 'burgers1d', not 'burgers2d'", scenario="burgers2d")


@pytest.mark.parametrize(
    "edit, match",
    [
        ("wrong_shape", r"/train/0 has shape \(13, 1, 8\)"),
        ("float64", "expected .* float32"),
        ("nan", "NaN or inf"),
        ("params", "params"),
        ("bad_config", "invalid scenario config"),
        ("no_frames_attr", "corrupt or malformed"),
        ("no_test_group", "missing group '/test'"),
        ("empty", "holds no simulations"),
    ],
)
def test_inconsistent_contents(tiny_h5, tmp_path, edit, match):
    path = _copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        d = f["train/0"]
        data, attrs = d[()], dict(d.attrs)
        if edit in ("wrong_shape", "float64", "nan"):
            del f["train/0"]
            new = {
                "wrong_shape": data[..., ::2],
                "float64": data.astype(np.float64),
                "nan": np.where(np.arange(data.size).reshape(data.shape) == 7, np.nan, data).astype(np.float32),
            }[edit]
            nd = f.create_dataset("train/0", data=new)
            nd.attrs.update(attrs)
        elif edit == "params":
            d.attrs["params"] = np.zeros(2, np.float32)
        elif edit == "bad_config":
            f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), "n_coarse": 0})
        elif edit == "no_frames_attr":
            del f.attrs["frames"]
        elif edit == "no_test_group":
            del f["test"]
        elif edit == "empty":
            for split in ("train", "test"):
                for k in list(f[split]):
                    del f[split][k]
    _assert_dataset_error(path, match)


def test_damaged_bytes_give_dataset_errors(tiny_h5, tmp_path):
    """Bytes flipped inside a file that still opens: a DatasetError naming the file, never a raw
    OSError/RuntimeError from h5py (seeds chosen to hit attributes and compressed data)."""
    data = tiny_h5.read_bytes()
    errors = 0
    for seed in range(8):
        rng = random.Random(seed)
        damaged = bytearray(data)
        for _ in range(50):
            damaged[rng.randrange(len(damaged))] ^= 0xFF
        path = tmp_path / f"damaged{seed}.h5"
        path.write_bytes(bytes(damaged))
        try:
            load_dataset(path)
        except DatasetError as e:
            assert str(path) in str(e)
            errors += 1
    assert errors >= 6
