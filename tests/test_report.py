"""Tests of the comparison tables (zosol/report.py): median and wins against NON per method."""

from __future__ import annotations

from zosol.report import COLUMNS, csv_table, markdown_table, wins_against


def _results(non: list[float] | None = (0.2, 0.1, 0.3)) -> dict:
    methods = {
        "SRC": {"mae_mean": 0.5, "mae_std": 0.1, "mae_per_sim": [0.4, 0.5, 0.6], "wall_time": 0.0, "solver_samples": 0},
        "FO-SOL": {"mae_mean": 0.2, "mae_std": 0.1, "mae_per_sim": [0.1, 0.2, 0.9], "wall_time": 2.0},
        "ZO-SOL": {"mae_mean": None, "status": "diverged", "wall_time": 1.0},
    }
    if non is not None:
        methods["NON"] = {"mae_mean": 0.2, "mae_std": 0.08, "mae_per_sim": list(non), "wall_time": 1.0}
    return {"methods": methods}


def test_table_has_median_and_wins_against_non():
    lines = markdown_table(_results()).splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in lines[2:]}
    header = list(COLUMNS)
    fo, src, non = rows["FO-SOL"], rows["SRC"], rows["NON"]
    assert fo[header.index("MAE median")] == "0.20000" and fo[header.index("wins vs NON")] == "1/3"
    assert src[header.index("wins vs NON")] == "0/3" and non[header.index("wins vs NON")] == "-"
    assert src[header.index("vs SRC")] == "1.000" and fo[header.index("vs SRC")] == "0.400"
    assert rows["ZO-SOL"][1] == "diverged" and len(rows["ZO-SOL"]) == len(COLUMNS)
    assert csv_table(_results()).splitlines()[0] == ",".join(COLUMNS)


def test_wins_need_the_same_test_simulations():
    no_non = markdown_table(_results(non=None))
    assert "| FO-SOL | 0.20000 | 0.10000 | 0.20000 | 0.400 | - |" in no_non
    assert wins_against([0.1, 0.2], [0.3]) == "-" and wins_against(None, [0.1]) == "-"
    assert wins_against([0.1, 0.2], [0.2, 0.2]) == "1/2"  # a tie is not a win
