"""Tables (Markdown / CSV / JSON) of a method comparison.  Every file is written atomically
(zosol.runtime.files: unique temporary name, then rename).  Figures and animations: zosol.figures."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from .methods.base import BASELINE
from .runtime.files import atomic_write_text

__all__ = ["markdown_table", "csv_table", "write_json"]

COLUMNS = ("method", "MAE mean", "MAE std", f"vs {BASELINE}", "train time [s]", "training solver sample-steps")


def _rows(results: dict[str, Any]) -> list[list[str]]:
    methods = results["methods"]
    src = methods.get(BASELINE, {}).get("mae_mean")
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
