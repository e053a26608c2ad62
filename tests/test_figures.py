"""zosol.figures: the test-simulation figure (one column per method, frames, colour bars), the
per-frame error figure (a band defined on the log axis), animations (frame count, size cap, GIF /
MP4) and the missing-matplotlib path.  Synthetic arrays only: each test takes about a second."""

from __future__ import annotations

import json
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


def test_frame_error_long_title_stays_inside_the_figure_above_the_time_axis():
    """A long scenario title (the karman2d run with --set) is wrapped to the figure's width and sits
    above the top (time) axis label, not over it."""
    err = np.full((2, 20), 0.1)
    title = "karman2d (default with reference=direct, train_sims=3, test_sims=2, frames=100): MAE per frame"
    fig = F.frame_error_figure({"SRC": err, "FO-SOL": err / 3}, dt=1.0, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    head = fig.texts[0].get_window_extent(renderer)
    time_label = fig.axes[0].child_axes[0].xaxis.label.get_window_extent(renderer)
    assert fig.texts[0].get_text() == title
    assert 0 <= head.x0 and head.x1 <= fig.bbox.width and head.y1 <= fig.bbox.height
    assert head.y0 >= time_label.y1


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


# -- wiring: compare, evaluate --animate, info --plot ------------------------------------------------
@pytest.fixture(scope="module")
def compared(tiny_h5, tmp_path_factory) -> tuple[Path, dict]:
    """``compare`` on the tiny burgers1d data with NON and NOG-SOL (no fixed method list), a GIF."""
    from zosol.compare import compare

    out = tmp_path_factory.mktemp("cmp")
    lines: list[str] = []
    results = compare(
        "burgers1d", "tiny", out, methods=["nog-sol", "non"], data_dir=tiny_h5, animation="gif",
        overrides={"epochs": 1}, progress=False, log=lines.append,
    )  # fmt: skip
    return out, results, lines


def test_compare_draws_every_method_that_ran(compared):
    out, results, lines = compared
    drawn = results["figures"]
    assert drawn["columns"] == ["reference", "SRC", "NOG-SOL", "NON"]  # the table's order
    assert list(results["methods"]) == drawn["columns"][1:]
    assert drawn["frames"] == ["all"]  # 1-D: space-time images
    assert drawn["animation"] == {
        "file": "test_simulation.gif",
        "frames": list(range(13)),
        "bytes": drawn["animation"]["bytes"],
    }
    assert _gif_frames(out / "test_simulation.gif") == 13
    assert 0 < (out / "test_simulation.gif").stat().st_size <= F.MAX_ANIMATION_BYTES
    for f in ("frame_mae.png", "test_simulation.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["figures"]["columns"] == drawn["columns"]
    assert any(line.startswith(f"animation {out / 'test_simulation.gif'}: 13 frames") for line in lines)


def test_evaluate_animates_one_run(compared, tmp_path, capsys):
    from zosol.cli import main

    out, _, _ = compared
    gif = tmp_path / "run.gif"
    capsys.readouterr()
    assert main(["evaluate", str(out / "runs" / "non"), "--animate", str(gif)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["animation"]["frames"] == 13 == _gif_frames(gif)


def test_animation_options_are_checked_before_any_work(tmp_path, cli_user_error, monkeypatch, compared):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg
    argv = ["compare", "--scenario", "burgers1d", "--preset", "tiny", "--out", str(tmp_path / "c")]
    cli_user_error([*argv, "--animation", "mp4"], "needs ffmpeg on PATH")
    assert not (tmp_path / "c").exists()
    run = str(compared[0] / "runs" / "non")
    cli_user_error(["evaluate", run, "--animate", str(tmp_path / "a.avi")], ".gif or .mp4")
    cli_user_error(["evaluate", run, "--animate", str(tmp_path / "a.mp4")], "needs ffmpeg")


def test_compare_without_animation(tiny_h5, tmp_path):
    from zosol.cli import main

    argv = ["compare", "--scenario", "burgers1d", "--preset", "tiny", "--data", str(tiny_h5), "--out", str(tmp_path)]
    assert main([*argv, "--methods", "non", "--epochs", "1", "--no-animation", "--quiet"]) == 0
    assert (tmp_path / "test_simulation.png").exists()
    assert not list(tmp_path.glob("test_simulation.gif")) and not list(tmp_path.glob("*.mp4"))


def test_info_plot_shows_a_few_simulations(tiny_h5, tmp_path, monkeypatch):
    from zosol.cli import main

    seen = []
    save = F.save_figure
    monkeypatch.setattr(F, "save_figure", lambda fig, path, **kw: (seen.append(F.describe(fig)), save(fig, path))[1])
    assert main(["info", str(tiny_h5), "--plot", str(tmp_path / "data.png")]) == 0
    assert seen[0]["columns"] == ["test 0 (seed 10000)", "test 1 (seed 10001)", "train 0 (seed 0)", "train 1 (seed 1)"]
    assert seen[0]["error_columns"] == [] and (tmp_path / "data.png").exists()


def test_compare_without_matplotlib_writes_the_tables_and_says_so(tiny_h5, tmp_path):
    """In a process where matplotlib cannot be imported: one line says why no figure was drawn,
    the tables are written, no image."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from zosol.compare import compare\n"
        f"compare('burgers1d', 'tiny', {str(tmp_path)!r}, methods=['non'], data_dir={str(tiny_h5)!r},\n"
        "        overrides={'epochs': 1}, progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(F.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.count(F.MISSING_MATPLOTLIB) == 1, out.stdout
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.gif"))


def test_info_plot_without_matplotlib_says_so(tiny_h5, tmp_path, monkeypatch, capsys):
    from zosol.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    capsys.readouterr()
    assert main(["info", str(tiny_h5), "--plot", str(tmp_path / "data.png")]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f"zosol: note: {F.MISSING_MATPLOTLIB}" and not (tmp_path / "data.png").exists()
