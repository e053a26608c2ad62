"""``zosol bench solvers``: coarse-step throughput of every scenario against batch size.

ZO-SOL evaluates thousands of perturbed rollouts per gradient as one folded batch, so what
matters is how the per-sample cost of a solver step falls with batch size."""

from __future__ import annotations

import json

import torch

from ..solvers import get_scenario
from .timing import time_call

__all__ = ["median_step_seconds", "time_step", "run_solver_bench"]

BATCHES = {
    "burgers1d": (1, 64, 1024, 8192),
    "burgers2d": (1, 16, 256),
    "karman2d": (1, 16, 64, 256),
    "ks1d": (1, 64, 1024, 8192),
}


def median_step_seconds(step, x: torch.Tensor, params: torch.Tensor | None, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of one ``step(x, params)`` call (after ``warmup`` calls: JIT tracing, caches)."""
    with torch.no_grad():
        return time_call(lambda: step(x, params), repeats, warmup=warmup).median


def time_step(solver, batch: int, state: torch.Tensor, params: torch.Tensor | None, repeats: int = 3) -> float:
    """Median seconds of one ``solver.step`` on ``batch`` copies of ``state`` (C, *s)."""
    x = state.expand(batch, *state.shape).contiguous()
    p = None if params is None else params.expand(batch, *params.shape).contiguous()
    return median_step_seconds(solver.step, x, p, repeats)


def run_solver_bench(json_path: str | None = None, quick: bool = False, scenarios=None) -> list[dict]:
    """Print and return rows (scenario, solver, batch, ms/step, samples/s, per-sample ratio to b1)."""
    rows = []
    print(
        f"{'scenario':<10} {'solver':<10} {'batch':>6} {'ms/step':>10} {'samples/s':>12} {'us/sample':>10} {'vs b1':>7}"
    )
    for name in scenarios or BATCHES:
        sc = get_scenario(name, "default")
        state, params = sc.sample(0)
        coarse = sc.coarse_solver()
        p = params if coarse.num_params else None
        cs = sc.downsample(state[None])[0]
        base = None
        for b in BATCHES[name][:-1] if quick else BATCHES[name]:
            dt = time_step(coarse, b, cs, p)
            per = dt / b
            base = base or per
            row = {
                "scenario": name,
                "solver": "coarse",
                "batch": b,
                "ms_per_step": 1e3 * dt,
                "samples_per_s": b / dt,
                "per_sample_vs_b1": per / base,
            }
            rows.append(row)
            print(
                f"{name:<10} {'coarse':<10} {b:>6} {1e3 * dt:>10.2f} {b / dt:>12.0f} "
                f"{1e6 * per:>10.1f} {per / base:>7.3f}"
            )
        ref = sc.reference_solver()
        dt = time_step(ref, 1, state, p)
        rows.append(
            {"scenario": name, "solver": "reference", "batch": 1, "ms_per_step": 1e3 * dt, "samples_per_s": 1 / dt}
        )
        print(f"{name:<10} {'reference':<10} {1:>6} {1e3 * dt:>10.2f} {1 / dt:>12.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows
