"""Figures and animations of trajectories: pure functions from arrays + metadata to matplotlib figures.

Nothing here touches pyplot or matplotlib's global backend: figures are built as
``matplotlib.figure.Figure`` objects and rendered through their own Agg canvas, so importing or
calling this module never changes how the caller's own plots are shown.  matplotlib is imported
only when a figure is drawn; without it :func:`missing_matplotlib` returns the one-line message
callers print (and the drawing functions raise :class:`PlotsUnavailable` with it).

What is drawn (``trajectories``: ``{name: (T+1, C, *spatial) array}``, the first entry being the
reference; ``meta``: :class:`FieldMeta`, the channels, grid coordinates and time between frames):

* :func:`trajectory_figure`: one panel column per entry; 2-D states as snapshots at a few frames
  (rows, labelled with frame and time) of the shown quantity -- the vorticity for 2-D velocity
  fields, else the first channel -- on one colour scale with a colour bar, then a block of the
  same rows with each method's error to the reference; 1-D states as space-time images (x
  horizontal, time upward), one per entry, and their errors below.
* :func:`frame_error_figure`: per-frame MAE of each method over the test simulations, x in
  frames and (top axis) in time; line = median, band = quantiles over the test simulations (always
  positive, so defined on the log axis even where the spread exceeds the mean).
* :func:`write_animation`: the same comparison in motion, every frame (subsampled to a cap),
  reference beside every method and the errors below; GIF through Pillow or MP4 through ffmpeg,
  re-subsampled until the file fits ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunFailed, UsageError, ZosolError
from .runtime.files import atomic_write_bytes

__all__ = [
    "MISSING_MATPLOTLIB",
    "PlotsUnavailable",
    "FieldMeta",
    "AnimationInfo",
    "missing_matplotlib",
    "image_format",
    "animation_format",
    "quantity",
    "pick_frames",
    "trajectory_figure",
    "frame_error_figure",
    "describe",
    "save_figure",
    "render_animation",
    "write_animation",
]

MISSING_MATPLOTLIB = "matplotlib is not installed: no figures or animation drawn (pip install matplotlib)"
#: channel-name pairs read as the (x, y) components of a 2-D velocity (shown as vorticity)
VELOCITY_PAIRS = (("u", "v"), ("vx", "vy"), ("ux", "uy"), ("velocity_x", "velocity_y"), ("v_x", "v_y"))
#: default cap on an animation's frames and bytes: a default ``compare`` writes a few MB at most
MAX_ANIMATION_FRAMES = 60
MAX_ANIMATION_BYTES = 4 << 20
ANIMATION_FORMATS = ("gif", "mp4")

PANEL_INCHES = 2.4  # width of one panel
FIELD_CMAP, ONE_SIGNED_CMAP, ERROR_CMAP = "RdBu_r", "viridis", "PuOr_r"


class PlotsUnavailable(ZosolError, ImportError):
    """matplotlib (or, for MP4, ffmpeg) is missing: nothing was drawn."""


@dataclasses.dataclass(frozen=True)
class FieldMeta:
    """What a figure needs to know about the states: channel names, grid coordinates
    (``x`` and, in 2-D, ``y``: 1-D arrays of cell positions; a state's last axis is x, the one
    before it y), the time ``dt`` between two frames and a name for titles."""

    channels: tuple[str, ...]
    coords: Mapping[str, np.ndarray]
    dt: float
    name: str = ""

    @classmethod
    def of(cls, solver: Any, name: str = "") -> FieldMeta:
        """From a solver (its ``channels``, ``coords`` and ``dt``; frames are one ``dt`` apart)."""
        coords = {k: np.asarray(v, dtype=np.float64) for k, v in solver.coords.items()}
        return cls(tuple(solver.channels), coords, float(solver.dt), name)

    @property
    def ndim(self) -> int:
        return 2 if "y" in self.coords else 1

    def time(self, frame: float) -> float:
        return frame * self.dt


@dataclasses.dataclass(frozen=True)
class AnimationInfo:
    """What :func:`write_animation` wrote: ``frames`` (the trajectory frames shown), size in bytes."""

    path: Path
    format: str
    frames: tuple[int, ...]
    bytes: int


# -- matplotlib, imported on use ------------------------------------------------------------------
def missing_matplotlib() -> str | None:
    """None when figures can be drawn, else the one-line message saying why not."""
    try:
        _mpl()
    except PlotsUnavailable as e:
        return str(e)
    return None


def _mpl() -> tuple[Any, Any]:
    """(matplotlib.figure.Figure, FigureCanvasAgg); PlotsUnavailable when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (first: a package blocked in sys.modules fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(MISSING_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float) -> Any:
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def image_format(path: str | os.PathLike) -> str:
    """The image format named by ``path``'s suffix ("png", "pdf", "svg", ...); UsageError naming
    the supported suffixes when matplotlib cannot write it (PlotsUnavailable without matplotlib)."""
    _, FigureCanvasAgg = _mpl()
    supported = sorted(FigureCanvasAgg.get_supported_filetypes())
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in supported:
        raise UsageError(
            f"cannot write a figure to '{path}': the suffix must name an image format, one of "
            f"{', '.join('.' + s for s in supported)}"
        )
    return fmt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) atomically, through its Agg canvas."""
    from .runtime.files import atomic_save

    fmt = image_format(path)
    return atomic_save(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


# -- what is shown ---------------------------------------------------------------------------------
def _velocity_channels(channels: Sequence[str]) -> tuple[int, int] | None:
    lower = [c.lower() for c in channels]
    for a, b in VELOCITY_PAIRS:
        if a in lower and b in lower:
            return lower.index(a), lower.index(b)
    return None


def quantity(traj: np.ndarray, meta: FieldMeta) -> tuple[np.ndarray, str]:
    """The scalar field a figure shows, and its name: ``traj`` (..., C, *spatial) -> (..., *spatial).

    2-D states with velocity channels (``u``/``v``, ``vx``/``vy``, ...): the vorticity
    dv/dx - du/dy by central differences on the grid coordinates (one-sided at the edges; on a
    staggered grid the components sit half a cell apart, which a picture does not show); otherwise
    the first channel."""
    traj = np.asarray(traj, dtype=np.float64)
    c_axis = traj.ndim - 1 - meta.ndim
    pair = _velocity_channels(meta.channels) if meta.ndim == 2 else None
    if pair is not None and min(traj.shape[-2:]) >= 2:
        u, v = np.take(traj, pair[0], axis=c_axis), np.take(traj, pair[1], axis=c_axis)
        x, y = meta.coords["x"], meta.coords["y"]
        w = np.gradient(v, x, axis=-1) - np.gradient(u, y, axis=-2)
        a, b = meta.channels[pair[0]], meta.channels[pair[1]]
        return w, f"vorticity ∂{b}/∂x − ∂{a}/∂y"
    label = meta.channels[0] if meta.channels else "field"
    if traj.shape[c_axis] > 1:
        label += f" (channel 1 of {traj.shape[c_axis]})"
    return np.take(traj, 0, axis=c_axis), label


def pick_frames(frames: int, count: int = 3) -> list[int]:
    """``count`` frames spread over a rollout of ``frames`` steps: the first predicted frame (1),
    the last (``frames``) and evenly spaced ones between."""
    if frames < 1:
        raise UsageError(f"a rollout needs at least one frame after the initial one, got {frames}")
    return sorted({int(round(f)) for f in np.linspace(1, frames, max(1, min(count, frames)))})


def _robust_max(a: np.ndarray, q: float = 99.5) -> float:
    a = np.abs(a[np.isfinite(a)])
    m = float(np.percentile(a, q)) if a.size else 0.0
    return m if m > 0 else (float(a.max()) if a.size and a.max() > 0 else 1.0)


def _scales(fields: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Colour scales shared by every panel: the field's from the reference (diverging and symmetric
    when it takes both signs), the error's symmetric over every method's error."""
    names = list(fields)
    ref = fields[names[0]]
    lo, hi = np.nanpercentile(ref, [0.5, 99.5]) if np.isfinite(ref).any() else (0.0, 1.0)
    if lo < 0 < hi:
        m = _robust_max(ref)
        field = dict(cmap=FIELD_CMAP, vmin=-m, vmax=m)
    else:
        field = dict(cmap=ONE_SIGNED_CMAP, vmin=float(lo), vmax=float(hi) if hi > lo else float(lo) + 1.0)
    errs = [fields[n] - ref for n in names[1:]]
    e = _robust_max(np.concatenate([d.ravel() for d in errs])) if errs else 1.0
    return {"field": field, "error": dict(cmap=ERROR_CMAP, vmin=-e, vmax=e)}


def _extent(meta: FieldMeta) -> tuple[float, float, float, float]:
    def edges(c: np.ndarray) -> tuple[float, float]:
        h = float(c[1] - c[0]) if c.size > 1 else 1.0
        return float(c[0]) - h / 2, float(c[-1]) + h / 2

    return (*edges(meta.coords["x"]), *edges(meta.coords["y"]))


def _fields(trajectories: Mapping[str, np.ndarray], meta: FieldMeta) -> tuple[dict[str, np.ndarray], str]:
    if not trajectories:
        raise UsageError("no trajectories to draw: give at least the reference")
    if meta.ndim == 2 and "x" not in meta.coords:
        raise UsageError("FieldMeta.coords needs 'x' (and 'y' in 2-D)")
    fields, label = {}, ""
    for name, tr in trajectories.items():
        fields[name], label = quantity(tr, meta)
    return fields, label


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _caption(ax: Any, text: str, shared: bool = False) -> None:
    """An empty panel (the reference's slot in the error block) that carries a caption; ``shared``:
    its axes are shared with others (then hidden whole, since removing its ticks would remove theirs)."""
    if shared:
        ax.axis("off")
    else:
        _bare(ax)
        for s in ax.spines.values():
            s.set_visible(False)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes, color="0.35")


def _frame_label(meta: FieldMeta, f: int) -> str:
    return f"frame {f}\nt = {meta.time(f):.4g}"


def _blocks(names: Sequence[str], error: bool) -> tuple[str, ...]:
    return ("field", "error") if error and len(names) > 1 else ("field",)


# -- the test-simulation figure --------------------------------------------------------------------
def trajectory_figure(
    trajectories: Mapping[str, np.ndarray],
    meta: FieldMeta,
    *,
    frames: Sequence[int] | None = None,
    title: str = "",
    error: bool = True,
) -> Any:
    """One panel column per entry of ``trajectories`` ({name: (T+1, C, *spatial)}, the first one
    the reference; dict order is column order), the shown quantity (:func:`quantity`) on one
    colour scale, and (``error``) a second block with each entry's difference to the reference.

    2-D: rows at ``frames`` (default :func:`pick_frames`: first, middle and last predicted frame),
    labelled with frame and time.  1-D: one space-time image per entry (x horizontal, time up).
    Returns a ``matplotlib.figure.Figure`` (Agg canvas attached; :func:`describe` reads its panels)."""
    fields, label = _fields(trajectories, meta)
    if meta.ndim == 1:
        return _spacetime_figure(fields, label, meta, title, error)
    steps = next(iter(fields.values())).shape[0] - 1
    frames = pick_frames(steps) if frames is None else [int(f) for f in frames]
    bad = [f for f in frames if not 0 <= f <= steps]
    if bad:
        raise UsageError(f"frames {bad} outside the trajectory's frames 0..{steps}")
    return _snapshot_figure(fields, label, meta, frames, title, error)[0]


def _snapshot_figure(
    fields: dict[str, np.ndarray], label: str, meta: FieldMeta, frames: Sequence[int], title: str, error: bool
) -> tuple[Any, list]:
    """2-D snapshots: rows = frames (per block), columns = entries.  Also returns the update
    functions ``u(frame)`` that redraw a one-frame figure at another frame (animation)."""
    names, ref = list(fields), next(iter(fields.values()))
    ext = _extent(meta)
    blocks, scales = _blocks(names, error), _scales(fields)
    aspect = (ext[3] - ext[2]) / (ext[1] - ext[0])
    nrows = len(frames) * len(blocks)
    fig = _new_figure(len(names) * PANEL_INCHES + 1.4, nrows * (PANEL_INCHES * aspect + 0.15) + 0.6)
    axes = fig.subplots(nrows, len(names), squeeze=False)
    updates: list = []
    for b, kind in enumerate(blocks):
        block = axes[b * len(frames) : (b + 1) * len(frames)]
        for r, f in enumerate(frames):
            for c, name in enumerate(names):
                ax = block[r, c]
                _bare(ax)
                if kind == "error" and c == 0:
                    _caption(ax, f"error:\nmethod − {name}" if r == 0 else "")
                    continue
                get = (lambda t, n=name: fields[n][t]) if kind == "field" else (lambda t, n=name: fields[n][t] - ref[t])
                im = ax.imshow(get(f), origin="lower", extent=ext, interpolation="nearest", **scales[kind])
                updates.append(lambda t, im=im, get=get: im.set_data(get(t)))
                ax.set_label(f"{kind}:{name}:{f}")
                if r == 0:
                    ax.set_title(name if kind == "field" else f"{name} − {names[0]}", fontsize=9)
            block[r, 0].set_ylabel(_frame_label(meta, f), fontsize=8)
            updates.append(lambda t, ax=block[r, 0]: ax.set_ylabel(_frame_label(meta, t), fontsize=8))
        what = label if kind == "field" else f"error of the {label.split(' ')[0]}"
        if len(frames) == 1:  # one row per block (animation): the label in two short lines
            what = what.replace(" ", "\n", 1) if kind == "field" else "error"
        bar = fig.colorbar(block[0, -1].images[0], ax=block.ravel().tolist(), extend="both", shrink=0.9)
        bar.set_label(what, fontsize=10 if len(frames) > 1 else 7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, updates


def _spacetime_figure(fields: dict[str, np.ndarray], label: str, meta: FieldMeta, title: str, error: bool) -> Any:
    """1-D: one space-time image (x horizontal, time up) per entry, errors to the reference below."""
    names, ref = list(fields), next(iter(fields.values()))
    steps = ref.shape[0] - 1
    x = meta.coords["x"]
    h = float(x[1] - x[0]) if x.size > 1 else 1.0
    ext = (float(x[0]) - h / 2, float(x[-1]) + h / 2, -meta.dt / 2, meta.time(steps + 0.5))
    blocks, scales = _blocks(names, error), _scales(fields)
    fig = _new_figure(len(names) * PANEL_INCHES + 1.4, len(blocks) * 2.6 + 0.6)
    axes = fig.subplots(len(blocks), len(names), squeeze=False, sharex=True, sharey=True)
    for b, kind in enumerate(blocks):
        for c, name in enumerate(names):
            ax = axes[b, c]
            if kind == "error" and c == 0:
                _caption(ax, f"error:\nmethod − {name}", shared=True)
                continue
            data = fields[name] if kind == "field" else fields[name] - ref
            ax.imshow(data, origin="lower", extent=ext, aspect="auto", interpolation="nearest", **scales[kind])
            ax.set_label(f"{kind}:{name}:all")
            ax.set_title(name if kind == "field" else f"{name} − {names[0]}", fontsize=9)
            if b == len(blocks) - 1:
                ax.set_xlabel("x")
        first = axes[b, 0 if kind == "field" else 1]
        first.set_ylabel(f"time t ({steps} frames, dt = {meta.dt:g})")
        first.tick_params(labelleft=True)  # shared y axis: the first drawn panel of each row shows the times
        what = label if kind == "field" else f"error of {label.split(' ')[0]}"
        fig.colorbar(axes[b, -1].images[0], ax=axes[b].tolist(), label=what, extend="both", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def describe(fig: Any) -> dict[str, list]:
    """What a :func:`trajectory_figure` shows, read back from its axes: ``columns`` (the entries,
    in order), ``error_columns`` and ``frames`` (["all"] for 1-D space-time images)."""
    panels = []
    for ax in fig.axes:
        kind, _, rest = ax.get_label().partition(":")
        if kind in ("field", "error") and rest:
            name, _, frame = rest.rpartition(":")
            panels.append((kind, name, frame))
    frames = list(dict.fromkeys(f for k, _, f in panels if k == "field"))
    return {
        "columns": list(dict.fromkeys(n for k, n, _ in panels if k == "field")),
        "error_columns": list(dict.fromkeys(n for k, n, _ in panels if k == "error")),
        "frames": [int(f) if f.isdigit() else f for f in frames],
    }


# -- per-frame error --------------------------------------------------------------------------------
def frame_error_figure(
    per_frame: Mapping[str, np.ndarray], dt: float, title: str = "", band: tuple[float, float] = (0.1, 0.9)
) -> Any:
    """Per-frame MAE of each method, ``per_frame`` {name: (N, T)} over N test simulations and
    frames 1..T: line = median, band = the ``band`` quantiles over the simulations (positive
    wherever the errors are, so the log axis shows it even where the spread exceeds the mean).
    x axis in frames, top axis in time (frame x ``dt``)."""
    if not 0 <= band[0] < band[1] <= 1:
        raise UsageError(f"band {band}: give two quantiles 0 <= low < high <= 1")
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    sims = 0
    for name, err in per_frame.items():
        err = np.asarray(err, dtype=np.float64)
        err = err.reshape(-1, err.shape[-1])
        sims = max(sims, err.shape[0])
        frames = np.arange(1, err.shape[1] + 1)
        pos = np.where(err > 0, err, np.nan)  # a log axis shows positive values only
        with np.errstate(all="ignore"), _quiet():
            med = np.nanmedian(pos, 0)
            lo, hi = np.nanquantile(pos, band, axis=0)
        (line,) = ax.plot(frames, med, label=name)
        ax.fill_between(frames, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("frame")
    ax.set_ylabel("MAE vs reference")
    top = ax.secondary_xaxis("top", functions=(lambda f: f * dt, lambda t: t / dt))
    top.set_xlabel(f"time t (dt = {dt:g} per frame)")
    pct = f"{100 * band[0]:g}–{100 * band[1]:g} %"
    ax.legend(title=f"median; band: {pct} of {sims} test simulations", title_fontsize=8, fontsize=8)
    # above the top (time) axis and its label, wrapped to the figure's width (a long scenario title)
    fig.suptitle(title or "per-frame error on the test simulations", fontsize=10, wrap=True)
    return fig


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's all-NaN RuntimeWarnings (a frame where every error is 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# -- animation ---------------------------------------------------------------------------------------
def animation_format(path: str | os.PathLike) -> str:
    """ "gif" or "mp4" from ``path``'s suffix; UsageError for another suffix, or for .mp4 without
    ffmpeg on PATH (naming the fix)."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in ANIMATION_FORMATS:
        raise UsageError(f"cannot write an animation to '{path}': the suffix must be .gif or .mp4")
    if fmt == "mp4" and shutil.which("ffmpeg") is None:
        raise UsageError(f"cannot write '{path}': .mp4 needs ffmpeg on PATH (not found); install it or write a .gif")
    return fmt


def default_animation_suffix() -> str:
    """ ".mp4" when ffmpeg is on PATH (smaller files), else ".gif" (Pillow, always there with matplotlib)."""
    return ".mp4" if shutil.which("ffmpeg") else ".gif"


def _subsample(n: int, cap: int) -> list[int]:
    """At most ``cap`` (>= 2) of the indices 0..n-1, evenly spread, first and last kept."""
    if n <= cap:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max(2, cap))})


def _profile_figure(
    fields: dict[str, np.ndarray], label: str, meta: FieldMeta, frames: Sequence[int], title: str, error: bool
) -> tuple[Any, list]:
    """1-D animation frame: each entry's profile over the reference's (top), its error (below)."""
    names, ref = list(fields), next(iter(fields.values()))
    x, f0 = meta.coords["x"], frames[0]
    blocks, scales = _blocks(names, error), _scales(fields)
    fig = _new_figure(len(names) * PANEL_INCHES + 0.6, len(blocks) * 1.9 + 0.6)
    axes = fig.subplots(len(blocks), len(names), squeeze=False, sharex=True)
    updates: list = []
    for b, kind in enumerate(blocks):
        lim = scales[kind]
        for c, name in enumerate(names):
            ax = axes[b, c]
            if kind == "error" and c == 0:
                _caption(ax, f"error:\nmethod − {name}", shared=True)
                continue
            if kind == "field":
                (rl,) = ax.plot(x, ref[f0], color="0.6", lw=1, ls="--")
                updates.append(lambda t, ln=rl: ln.set_ydata(ref[t]))
            get = (lambda t, n=name: fields[n][t]) if kind == "field" else (lambda t, n=name: fields[n][t] - ref[t])
            (ln,) = ax.plot(x, get(f0), lw=1.2, color="C0" if kind == "field" else "C3")
            updates.append(lambda t, ln=ln, get=get: ln.set_ydata(get(t)))
            pad = 0.05 * (lim["vmax"] - lim["vmin"])
            ax.set_ylim(lim["vmin"] - pad, lim["vmax"] + pad)
            ax.set_label(f"{kind}:{name}:{f0}")
            ax.set_title(name if kind == "field" else f"{name} − {names[0]}", fontsize=9)
            ax.tick_params(labelsize=7)
        axes[b, 0 if kind == "field" else 1].set_ylabel(label if kind == "field" else "error", fontsize=8)
    return fig, updates


def render_animation(
    trajectories: Mapping[str, np.ndarray],
    meta: FieldMeta,
    *,
    max_frames: int = MAX_ANIMATION_FRAMES,
    title: str = "",
    dpi: int = 72,
    error: bool = True,
) -> tuple[list[int], list[np.ndarray]]:
    """The animation's pictures: (the frames shown, at most ``max_frames`` of 0..T evenly spread,
    and one RGB image (H, W, 3) uint8 per frame).  2-D: the :func:`trajectory_figure` panels at one
    frame; 1-D: profiles over the reference's; same colour scales / axis limits in every frame."""
    if max_frames < 2:
        raise UsageError(f"max_frames must be >= 2, got {max_frames}")
    fields, label = _fields(trajectories, meta)
    steps = next(iter(fields.values())).shape[0] - 1
    shown = _subsample(steps + 1, max_frames)
    draw = _profile_figure if meta.ndim == 1 else _snapshot_figure
    fig, updates = draw(fields, label, meta, [shown[0]], title, error)
    fig.set_dpi(dpi)
    head = fig.suptitle(title, fontsize=10)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: panels must not move between frames
    images = []
    for f in shown:
        for update in updates:
            update(f)
        head.set_text(f"{title}   frame {f}/{steps}, t = {meta.time(f):.4g}".strip())
        fig.canvas.draw()
        images.append(np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
    return shown, images


def write_animation(
    trajectories: Mapping[str, np.ndarray],
    meta: FieldMeta,
    path: str | os.PathLike,
    *,
    max_frames: int = MAX_ANIMATION_FRAMES,
    max_bytes: int = MAX_ANIMATION_BYTES,
    fps: float = 8.0,
    title: str = "",
    dpi: int = 72,
    error: bool = True,
) -> AnimationInfo:
    """Write the animation of :func:`render_animation` to ``path`` (.gif through Pillow, .mp4
    through ffmpeg), atomically.  Over ``max_bytes`` the frames are halved (first and last kept)
    and the file encoded again, down to 2 frames; ``AnimationInfo.bytes`` says what it came to."""
    fmt = animation_format(path)
    shown, images = render_animation(trajectories, meta, max_frames=max_frames, title=title, dpi=dpi, error=error)
    while True:
        data = _encode(images, fmt, fps)
        if len(data) <= max_bytes or len(images) <= 2:
            break
        keep = sorted(set(range(0, len(images), 2)) | {len(images) - 1})
        shown, images = [shown[i] for i in keep], [images[i] for i in keep]
    atomic_write_bytes(path, data)
    return AnimationInfo(Path(path), fmt, tuple(shown), len(data))


def _encode(images: Sequence[np.ndarray], fmt: str, fps: float) -> bytes:
    return _gif(images, fps) if fmt == "gif" else _mp4(images, fps)


def _gif(images: Sequence[np.ndarray], fps: float) -> bytes:
    """GIF of RGB images on one palette (taken from a montage of a few frames: no flicker), no dithering
    (smooth fields then compress well)."""
    try:
        from PIL import Image
    except ImportError:
        raise PlotsUnavailable("Pillow is not installed: no GIF written (pip install pillow)") from None
    sample = [images[i] for i in _subsample(len(images), 6)]
    palette = Image.fromarray(np.concatenate(sample, 0)).quantize(
        colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    frames = [Image.fromarray(a).quantize(palette=palette, dither=Image.Dither.NONE) for a in images]
    buf = io.BytesIO()
    frames[0].save(
        buf, format="GIF", save_all=True, append_images=frames[1:], duration=max(20, round(1000 / fps)), loop=0
    )
    return buf.getvalue()


def _mp4(images: Sequence[np.ndarray], fps: float) -> bytes:
    """H.264 (or ffmpeg's default MP4 codec) of RGB images, through ffmpeg on PATH."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise UsageError(".mp4 needs ffmpeg on PATH (not found); install it or write a .gif")
    h, w = images[0].shape[:2]
    with tempfile.TemporaryDirectory(prefix="zosol-mp4-") as tmp:
        out = Path(tmp) / "animation.mp4"
        cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}"]
        cmd += ["-r", f"{fps:g}", "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p"]
        cmd += ["-movflags", "+faststart", str(out)]
        proc = subprocess.run(cmd, input=b"".join(a.tobytes() for a in images), capture_output=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RunFailed(f"ffmpeg failed (exit {proc.returncode}): {tail[0]}")
        return out.read_bytes()


# -- the figures of a comparison ---------------------------------------------------------------------
ANIMATION_CHOICES = ("auto", "gif", "mp4", "none")


def animation_path(out: str | os.PathLike, kind: str | None = "auto", stem: str = "test_simulation") -> Path | None:
    """Where a comparison's animation goes: ``out/<stem>.gif`` or ``.mp4`` (``kind`` "auto": MP4 when
    ffmpeg is on PATH, else GIF), None for "none"; UsageError for another kind or MP4 without ffmpeg."""
    if kind is None or kind == "none":
        return None
    if kind not in ANIMATION_CHOICES:
        raise UsageError(f"animation '{kind}': choose one of {', '.join(ANIMATION_CHOICES)}")
    path = Path(out) / (stem + (default_animation_suffix() if kind == "auto" else f".{kind}"))
    animation_format(path)
    return path


def write_comparison_figures(
    out: str | os.PathLike,
    meta: FieldMeta,
    trajectories: Mapping[str, np.ndarray],
    per_frame: Mapping[str, np.ndarray],
    title: str,
    animation: str | None = "auto",
    log: Any = print,
) -> dict[str, Any]:
    """``frame_mae.png``, ``test_simulation.png`` and (``animation``, see :func:`animation_path`)
    ``test_simulation.gif`` / ``.mp4`` into ``out``; ``trajectories`` {name: (T+1, C, *s)} of one
    test simulation, reference first, ``per_frame`` {name: (N, T)}.  Returns what was drawn
    (``columns``, ``frames``, ``animation``: file, frames, bytes); without matplotlib logs the
    one-line message and returns {}."""
    missing = missing_matplotlib()
    if missing:
        log(missing)
        return {}
    out = Path(out)
    save_figure(frame_error_figure(per_frame, meta.dt, f"{title}: MAE per frame"), out / "frame_mae.png")
    fig = trajectory_figure(trajectories, meta, title=f"{title}: test simulation 0")
    save_figure(fig, out / "test_simulation.png")
    drawn: dict[str, Any] = describe(fig)
    path = animation_path(out, animation)
    if path is not None:
        info = write_animation(trajectories, meta, path, title=f"{title}: test simulation 0")
        drawn["animation"] = {"file": path.name, "frames": list(info.frames), "bytes": info.bytes}
        log(f"animation {path}: {len(info.frames)} frames, {info.bytes / 2**20:.2f} MiB")
    return drawn
