"""ZO-SOL epoch time on burgers1d `default` with 1 and 2 ranks under torchrun, side by side.

    python experiments/torchrun_scaling.py [--epochs 1] [--repeats 2] [--ranks 1,2]

Each run is a fresh ``torchrun --standalone --nproc-per-node R -m zosol.cli train --method zo-sol``
on the same dataset; the figure is the training wall time the run records in its checkpoint
(``history.wall_time``: the loop only, no process start-up) divided by the epochs; runs of
different rank counts alternate so machine load hits them alike.  Prints a table and the ratio,
and writes ``experiments/out/torchrun_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, data: Path, out: Path, epochs: int) -> tuple[float, float]:
    """(training seconds per epoch, whole command seconds) of one torchrun launch."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun,
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "zosol.cli",
        "train",
        "--scenario",
        "burgers1d",
        "--preset",
        "default",
        "--data",
        str(data),
        "--method",
        "zo-sol",
        "--epochs",
        str(epochs),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    whole = time.perf_counter() - t0
    hist = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    assert hist["world_size"] == ranks
    return hist["wall_time"] / epochs, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ranks", default="1,2")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "zosol.cli",
                "generate",
                "--scenario",
                "burgers1d",
                "--preset",
                "default",
                "--out",
                str(tmp),
                "--quiet",
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        data = tmp / "burgers1d_default.h5"
        times: dict[int, list[tuple[float, float]]] = {r: [] for r in ranks}
        for k in range(args.repeats):
            for r in ranks:
                times[r].append(run(r, data, tmp / f"run_{r}_{k}", args.epochs))
    print("| ranks | ZO-SOL s/epoch (runs) | median | whole command s (median) |")
    print("|---|---|---|---|")
    med = {r: statistics.median(t for t, _ in v) for r, v in times.items()}
    for r, v in times.items():
        whole = statistics.median(w for _, w in v)
        print(f"| {r} | {', '.join(f'{t:.1f}' for t, _ in v)} | {med[r]:.1f} | {whole:.1f} |")
    base = med[ranks[0]]
    for r in ranks[1:]:
        print(f"speed-up {ranks[0]} -> {r} ranks: {base / med[r]:.2f}x")
    out = ROOT / "experiments" / "out" / "torchrun_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"epochs": args.epochs, "times": times, "median": med, "cpu_count": os.cpu_count()}, indent=1)
    )


if __name__ == "__main__":
    main()
