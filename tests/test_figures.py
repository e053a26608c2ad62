"""zosol.figures: the test-simulation figure (one column per method, frames, colour bars), the
per-frame error figure (a band defined on the log axis), animations (frame count, size cap, GIF /
MP4) and the missing-matplotlib path.  Synthetic arrays only: each test takes about a second."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zosol import figures as F


def _flow(frames: int = 12, nx: int = 16, ny: int = 8) -> tuple[dict[str, np.ndarray], F.FieldMeta]:
    """2-D velocity trajectories (T+1, 2, ny, nx): a travelling wave, and two 'methods' off it."""
    x = (np.arange(nx) + 0.5) * 2.0
    y = (np.arange(ny) + 0.5) * 2.0
    t = np.arange(frames + 1)[:, None, None]
    u = np.sin(0.3 * x[None, None] - 0.2 * t) * np.cos(0.4 * y[None, :, None])
    ref = np.stack([u, 0.5 * u], 1)
    trajs = {"reference": ref, "SRC": 1.3 * ref, "NON": 0.9 * ref, "FO-SOL": 1.01 * ref}
    return trajs, F.FieldMeta(("vx", "vy"), {"x": x, "y": y}, dt=0.5, name="flow")


def _wave(frames: int = 20, n: int = 32) -> tuple[dict[str, np.ndarray], F.FieldMeta]:
    x = (np.arange(n) + 0.5) / n * 2 * np.pi
    t = np.arange(frames + 1)[:, None, None]
    ref = np.sin(x - 0.1 * t)
    return {"reference": ref, "SRC": np.sin(x - 0.13 * t), "ZO-SOL": 0.95 * ref}, F.FieldMeta(("u",), {"x": x}, 0.05)


def test_vorticity_of_a_rotation_on_the_grid():
    """u = -y, v = x rotates rigidly: vorticity dv/dx - du/dy = 2 everywhere (central differences
    are exact for linear fields), on an anisotropic grid, for any leading axes."""
    x, y = np.linspace(0, 3, 7), np.linspace(0, 1, 5)
    X, Y = np.meshgrid(x, y)
    state = np.stack([-Y, X])[None, None].repeat(2, 0)  # (2, 1, C=2, ny, nx)
    w, label = F.quantity(state, F.FieldMeta(("u", "v"), {"x": x, "y": y}, 1.0))
    assert w.shape == (2, 1, 5, 7)
    np.testing.assert_allclose(w, 2.0, atol=1e-12)
    assert label.startswith("vorticity")
    # scalar 2-D field and a 1-D field with two channels: the first channel, named
    field, label = F.quantity(state, F.FieldMeta(("p", "q"), {"x": x, "y": y}, 1.0))
    np.testing.assert_array_equal(field, state[:, :, 0])
    assert label == "p (channel 1 of 2)"


def test_test_simulation_figure_has_a_column_per_method_and_the_frames(tmp_path):
    trajs, meta = _flow(frames=12)
    fig = F.trajectory_figure(trajs, meta, title="flow")
    d = F.describe(fig)
    assert d["columns"] == ["reference", "SRC", "NON", "FO-SOL"]
    assert d["error_columns"] == ["SRC", "NON", "FO-SOL"]
    assert d["frames"] == [1, 6, 12] == F.pick_frames(12)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "frame 6\nt = 3" in labels
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bars == ["vorticity ∂vy/∂x − ∂vx/∂y", "error of the vorticity"]
    F.save_figure(fig, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # more methods, other order: the columns follow the dict, no fixed list
    more = {"reference": trajs["reference"], "SRC": trajs["SRC"], "ZO-JAC-SOL": trajs["NON"], "X": trajs["NON"]}
    assert F.describe(F.trajectory_figure(more, meta, frames=[0, 3]))["columns"] == list(more)
    with pytest.raises(ValueError, match="outside the trajectory's frames 0..12"):
        F.trajectory_figure(trajs, meta, frames=[13])


def test_one_d_figure_is_space_time_per_method():
    trajs, meta = _wave()
    fig = F.trajectory_figure(trajs, meta)
    assert F.describe(fig) == {"columns": list(trajs), "error_columns": ["SRC", "ZO-SOL"], "frames": ["all"]}
    ax = next(a for a in fig.axes if a.get_label() == "field:SRC:all")
    assert ax.images[0].get_array().shape == (21, 32)  # time vertical, x horizontal
    assert ax.get_ylim()[1] == pytest.approx(20.5 * 0.05)  # time units, up
    no_error = F.trajectory_figure(trajs, meta, error=False)
    assert F.describe(no_error)["error_columns"] == []


def test_frame_error_band_is_defined_on_the_log_axis_when_std_exceeds_the_mean():
    """Heavy-tailed errors over 10 test simulations: mean - std < 0 (the old band left the log axis);
    the quantile band stays positive and finite, and brackets the median."""
    rng = np.random.default_rng(0)
    err = np.exp(rng.normal(size=(10, 30)) * 2.0) * 1e-3
    assert (err.mean(0) - err.std(0) < 0).any()
    fig = F.frame_error_figure({"SRC": err, "FO-SOL": err / 3}, dt=0.25, title="t")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "frame"
    for band, line in zip(ax.collections, ax.lines):
        y = band.get_paths()[0].vertices[:, 1]
        assert np.isfinite(y).all() and (y > 0).all()
        assert y.min() <= line.get_ydata().min() and y.max() >= line.get_ydata().max()
    top = [c for c in ax.child_axes if "time" in c.get_xlabel()]
    assert top and "dt = 0.25" in top[0].get_xlabel()
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(1, 31))
    with pytest.raises(ValueError, match="two quantiles"):
        F.frame_error_figure({"SRC": err}, dt=1.0, band=(0.9, 0.1))


def _gif_frames(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.n_frames


def test_animation_has_every_frame_up_to_the_cap(tmp_path):
    trajs, meta = _wave(frames=12)
    info = F.write_animation(trajs, meta, tmp_path / "a.gif", title="flow")
    assert info.frames == tuple(range(13)) and info.format == "gif"
    assert _gif_frames(tmp_path / "a.gif") == 13 == len(info.frames)
    assert info.bytes == (tmp_path / "a.gif").stat().st_size
    capped = F.write_animation(trajs, meta, tmp_path / "b.gif", max_frames=5)
    assert capped.frames == (0, 3, 6, 9, 12) and _gif_frames(tmp_path / "b.gif") == 5


def test_animation_respects_the_size_cap(tmp_path):
    trajs, meta = _flow(frames=16)
    full = F.write_animation(trajs, meta, tmp_path / "full.gif")
    cap = full.bytes // 3
    info = F.write_animation(trajs, meta, tmp_path / "small.gif", max_bytes=cap)
    assert info.bytes <= cap and info.bytes == (tmp_path / "small.gif").stat().st_size
    assert 2 <= len(info.frames) < len(full.frames) // 2
    assert info.frames[0] == 0 and info.frames[-1] == 16  # the whole rollout, subsampled
    assert _gif_frames(tmp_path / "small.gif") == len(info.frames)


def test_mp4_goes_through_ffmpeg(tmp_path, monkeypatch):
    """A stand-in ffmpeg that copies its input to its output: the frames reach it as raw RGB of
    the size the command line declares."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ffmpeg"
    fake.write_text('#!/bin/sh\nfor a; do out="$a"; done\necho "$@" > "$out.args"\ncat > "$out"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert F.default_animation_suffix() == ".mp4"
    trajs, meta = _flow(frames=4)
    shown, images = F.render_animation(trajs, meta)
    info = F.write_animation(trajs, meta, tmp_path / "a.mp4")
    h, w, _ = images[0].shape
    assert info.format == "mp4" and info.bytes == 5 * h * w * 3


def test_animation_format_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        F.animation_format(tmp_path / "a.avi")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg
    assert F.default_animation_suffix() == ".gif"
    with pytest.raises(ValueError, match="needs ffmpeg on PATH.*write a .gif"):
        F.animation_format(tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="suffix must name an image format"):
        F.image_format(tmp_path / "a.xyz")


def test_missing_matplotlib_draws_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert F.missing_matplotlib() == F.MISSING_MATPLOTLIB
    assert "\n" not in F.MISSING_MATPLOTLIB and "pip install matplotlib" in F.MISSING_MATPLOTLIB
    trajs, meta = _flow(frames=3)
    with pytest.raises(F.PlotsUnavailable, match="matplotlib is not installed"):
        F.trajectory_figure(trajs, meta)
    with pytest.raises(F.PlotsUnavailable):
        F.write_animation(trajs, meta, tmp_path / "a.gif")
    assert list(tmp_path.iterdir()) == []


def test_drawing_leaves_pyplot_and_the_backend_alone():
    """Figures are Figure objects on their own Agg canvas: pyplot is never imported."""
    code = (
        "import sys, numpy as np\n"
        "from zosol import figures as F\n"
        "m = F.FieldMeta(('u',), {'x': np.arange(8.0)}, 1.0)\n"
        "F.trajectory_figure({'reference': np.zeros((3, 1, 8)), 'SRC': np.ones((3, 1, 8))}, m)\n"
        "F.render_animation({'reference': np.zeros((3, 1, 8))}, m)\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(F.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
