"""ZO-SOL ablation: the effect of the window length m and of gradient sparsity on MAE and time.

    python experiments/sol_ablation.py --scenario burgers1d --preset default --out results/ablation

Trains ZO-SOL on the same dataset for each setting (m in --windows at sparsity 0, and each
sparsity in --sparsities at m = --window), evaluates on the test simulations, prints a Markdown
table and writes ``ablation.json``.  Every run is resumable (run directories under --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zosol.config import train_config
from zosol.datasets import generate, load_dataset
from zosol.evaluation import evaluate
from zosol.training import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="burgers1d")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="results/ablation")
    ap.add_argument("--windows", default="1,2,4,8")
    ap.add_argument("--sparsities", default="0.5,0.9")
    ap.add_argument("--window", type=int, default=4, help="m used for the sparsity runs")
    ap.add_argument("--epochs", type=int, default=None, help="default: the training preset's")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    dataset = load_dataset(generate(args.scenario, args.preset, out / "data"))
    extra = {"epochs": args.epochs} if args.epochs else {}
    settings = [dict(window=m) for m in map(int, args.windows.split(","))]
    settings += [dict(window=args.window, zo_sparsity=s) for s in map(float, args.sparsities.split(","))]
    src = evaluate(dataset)
    rows = []
    print(f"SRC MAE {src['mae_mean']:.5f} +- {src['mae_std']:.5f}")
    for s in settings:
        name = f"m{s['window']}_s{s.get('zo_sparsity', 0.0)}"
        cfg = train_config(args.preset, args.scenario, method="zo-sol", **s, **extra)
        run = out / "runs" / name
        result = train(dataset, cfg, run, resume=(run / "checkpoint.pt").exists())
        ev = evaluate(dataset, result.model)
        h = result.history
        rows.append(
            {
                "window": cfg.window,
                "sparsity": cfg.zo_sparsity,
                "mae_mean": ev["mae_mean"],
                "mae_std": ev["mae_std"],
                "wall_time": h["wall_time"],
                "zo_queries": h["zo_queries"],
                "solver_samples": h["solver_samples"],
                "lprs": h["lprs"],
                "grad_cosine_vs_fo": [c["cosine"] for c in h["grad_cosine_vs_fo"]],
            }
        )
        print(f"{name}: MAE {ev['mae_mean']:.5f} +- {ev['mae_std']:.5f}, {h['wall_time']:.0f} s", flush=True)
    table = ["| m | sparsity | ZO-SOL MAE | train time [s] | queries | cosine vs FO |", "|---|---|---|---|---|---|"]
    for r in rows:
        cos = ", ".join(f"{c:.4f}" for c in r["grad_cosine_vs_fo"])
        table.append(
            f"| {r['window']} | {r['sparsity']} | {r['mae_mean']:.5f} +- {r['mae_std']:.5f} | "
            f"{r['wall_time']:.0f} | {r['zo_queries']} | {cos} |"
        )
    print("\n".join(table))
    (out / "ablation.json").write_text(
        json.dumps({"src": {k: src[k] for k in ("mae_mean", "mae_std")}, "runs": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
