"""Tables (Markdown / CSV / JSON) and plots (PNG, PDF, SVG, ... by the file's suffix) of a method
comparison.  Every file is written atomically (zosol.runtime.files: unique temporary name, then rename).

Figures are ``matplotlib.figure.Figure`` objects drawn on their own Agg canvas: importing this
module or saving a plot never changes matplotlib's global backend (a notebook's inline plots stay)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import UsageError
from .runtime.files import atomic_save, atomic_write_text

__all__ = ["markdown_table", "csv_table", "write_json", "plot_frame_errors", "plot_side_by_side", "plot_format"]

COLUMNS = ("method", "MAE mean", "MAE std", "vs SRC", "train time [s]", "training solver sample-steps")


def _rows(results: dict[str, Any]) -> list[list[str]]:
    methods = results["methods"]
    src = methods.get("SRC", {}).get("mae_mean")
    rows = []
    for name, r in methods.items():
        tail = [f"{r.get('wall_time', 0.0):.1f}", str(r.get("solver_samples", 0))]
        if r.get("mae_mean") is None:  # diverged or failed: no score
            rows.append([name, r.get("status", "failed"), "-", "-", *tail])
            continue
        ratio = f"{r['mae_mean'] / src:.3f}" if src else "-"
        rows.append([name, f"{r['mae_mean']:.5f}", f"{r['mae_std']:.5f}", ratio, *tail])
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """The MAE table: one row per method (mean +- std over the test simulations; a method that
    diverged or failed shows its status instead of a score)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(results)]
    return "\n".join(lines) + "\n"


def csv_table(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(_rows(results))
    return buf.getvalue()


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (unique temporary file + rename; see zosol.runtime.files)."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def plot_format(path: str | os.PathLike) -> str:
    """The image format named by ``path``'s suffix ("png", "pdf", "svg", ...); ValueError naming the
    supported suffixes when matplotlib cannot write it."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in supported:
        raise UsageError(
            f"cannot write a figure to '{path}': the suffix must name an image format, one of "
            f"{', '.join('.' + s for s in supported)}"
        )
    return fmt


def _figure(**kwargs: Any) -> Figure:
    """A figure with its own Agg canvas (not registered with pyplot: nothing to close)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    fmt = plot_format(path)
    atomic_save(path, lambda f: fig.savefig(f, format=fmt, dpi=120))


def plot_frame_errors(per_frame: dict[str, np.ndarray], dt: float, path: str | os.PathLike, title: str = "") -> None:
    """Per-frame MAE (mean over test simulations, band = +- std) of each method."""
    fig = _figure(figsize=(6.4, 4))
    ax = fig.subplots()
    for name, err in per_frame.items():
        err = np.asarray(err)
        t = dt * np.arange(1, err.shape[1] + 1)
        mean, std = err.mean(0), err.std(0)
        ax.plot(t, mean, label=name)
        ax.fill_between(t, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("time")
    ax.set_ylabel("MAE vs reference")
    ax.set_yscale("log")
    ax.set_title(title or "per-frame error on the test simulations")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_side_by_side(trajectories: dict[str, np.ndarray], path: str | os.PathLike, title: str = "") -> None:
    """One test simulation: each method's trajectory (T+1, C, *s) next to the reference.

    1-D states are shown as space-time images (x horizontal, time down); 2-D states as the first
    channel of the last frame."""
    names = list(trajectories)
    fig = _figure(figsize=(3.2 * len(names), 3.4))
    axes = fig.subplots(1, len(names), squeeze=False)
    first = np.asarray(trajectories[names[0]])
    lo, hi = float(first.min()), float(first.max())
    for ax, name in zip(axes[0], names):
        tr = np.asarray(trajectories[name])
        img = tr[:, 0] if tr.ndim == 3 else tr[-1, 0]
        ax.imshow(img, aspect="auto", cmap="RdBu_r", vmin=lo, vmax=hi, origin="upper" if tr.ndim == 3 else "lower")
        ax.set_title(name)
        ax.set_xlabel("x")
        ax.set_ylabel("frame" if tr.ndim == 3 else "y")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
