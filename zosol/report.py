"""Tables (Markdown / CSV / JSON) of a method comparison.  Every file is written atomically
(zosol.runtime.files: unique temporary name, then rename).  Figures and animations: zosol.figures."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from typing import Any

from .methods.base import BASELINE
from .runtime.files import atomic_write_text

__all__ = ["markdown_table", "csv_table", "write_json", "wins_against", "WINS_AGAINST"]

#: the row every method's per-simulation MAE is compared with (the corrector trained offline)
WINS_AGAINST = "NON"

COLUMNS = (
    "method",
    "MAE mean",
    "MAE std",
    "MAE median",
    f"vs {BASELINE}",
    f"wins vs {WINS_AGAINST}",
    "train time [s]",
    "training solver sample-steps",
)


def wins_against(per_sim: list[float] | None, baseline: list[float] | None) -> str:
    """``"k/N"``: on how many of the N test simulations the per-simulation MAE ``per_sim`` (N,) is
    below ``baseline``'s (N,); ``"-"`` when either is missing or they differ in length."""
    if not per_sim or not baseline or len(per_sim) != len(baseline):
        return "-"
    return f"{sum(a < b for a, b in zip(per_sim, baseline))}/{len(per_sim)}"


def _rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per method; the median and the wins against NON come from ``mae_per_sim`` (chaotic
    scenarios: one test simulation can dominate the mean)."""
    methods = results["methods"]
    src = methods.get(BASELINE, {}).get("mae_mean")
    non = methods.get(WINS_AGAINST, {}).get("mae_per_sim")
    rows = []
    for name, r in methods.items():
        tail = [f"{r.get('wall_time', 0.0):.1f}", str(r.get("solver_samples", 0))]
        if r.get("mae_mean") is None:  # diverged or failed: no score
            rows.append([name, r.get("status", "failed"), "-", "-", "-", "-", *tail])
            continue
        per_sim = r.get("mae_per_sim")
        median = f"{statistics.median(per_sim):.5f}" if per_sim else "-"
        ratio = f"{r['mae_mean'] / src:.3f}" if src else "-"
        wins = "-" if name == WINS_AGAINST else wins_against(per_sim, non)
        rows.append([name, f"{r['mae_mean']:.5f}", f"{r['mae_std']:.5f}", median, ratio, wins, *tail])
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """The MAE table: one row per method (mean +- std and median over the test simulations, the
    test simulations on which it beats NON; a method that diverged or failed shows its status
    instead of a score)."""
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
