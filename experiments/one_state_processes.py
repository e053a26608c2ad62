"""A solver without a batch axis in 1 vs 2 local processes: same result, and how much faster.

    python experiments/one_state_processes.py [--epochs 1] [--json experiments/out/one_state_processes.json]

The coarse solver is py-pde's 1-D Burgers (solvers/burgers1d_pypde.py, numba, one state per
call) wrapped as ``NumpySolver(step, batched=False, processes=P)``.  Measured side by side in one
run, after a warm-up training run, ``--repeats`` rounds in alternating order, medians: (a) one
solver call on a ZO-SOL-sized batch (``--states``, 2,048); (b) ZO-SOL training (tiny preset data
and training preset, ``--epochs``) with P = 1 and P = 2: final parameters compared with
``torch.equal``, wall time of ``train``; (c) the same for a costlier CPU-bound one-state numpy
step (~1 ms per state, 256 states per call).  The pool's processes are forked once, after
the step function was compiled, so they do not compile again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "solvers"))


def _stencil_step(u, params):
    """A CPU-bound one-state step (~1 ms): 200 explicit heat sub-steps on 256 cells, numpy."""
    for _ in range(200):
        u = u + 0.2 * (np.roll(u, 1, -1) - 2 * u + np.roll(u, -1, -1))
    return u


def _synthetic(repeats: int) -> dict:
    """1 vs 2 processes for a costlier one-state step (256 states per call, medians)."""
    from zosol.solvers.external import NumpySolver
    x = torch.randn(256, 1, 256)
    solvers = {p: NumpySolver(_stencil_step, dt=0.1, channels=("u",), spatial_shape=(256,), batched=False,
                              processes=p) for p in (1, 2)}
    times: dict = {1: [], 2: []}
    outs = {}
    for rep in range(repeats):
        for p in ((1, 2) if rep % 2 == 0 else (2, 1)):
            solvers[p].step(x[:8])
            t = time.perf_counter()
            outs[p] = solvers[p].step(x)
            times[p].append(time.perf_counter() - t)
    for s in solvers.values():
        s.close()
    med = {p: statistics.median(v) for p, v in times.items()}
    return {"median_s": med, "speedup": med[1] / med[2], "identical": torch.equal(outs[1], outs[2]), "times_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--states", type=int, default=2048, help="states in the timed solver call")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import burgers1d_pypde
    from zosol.config import train_config
    from zosol.datasets import generate, load_dataset
    from zosol.solvers import get_scenario
    from zosol.solvers.external import NumpySolver
    from zosol.training import train

    t0 = time.perf_counter()
    scenario = get_scenario("burgers1d_pypde", "tiny")
    compile_s = time.perf_counter() - t0
    out: dict = {"compile_both_solvers_s": compile_s}
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(generate(scenario, out=tmp, progress=False), scenario=scenario)
        x = ds.stacked("train")[0][:, :-1].reshape(-1, 1, 32)
        x = x.repeat(args.states // len(x) + 1, 1, 1)[:args.states]
        solvers = {p: NumpySolver(scenario.coarse_solver().fn, dt=burgers1d_pypde.DT, channels=("u",),
                                  spatial_shape=(32,), batched=False, processes=p) for p in (1, 2)}
        cfg = train_config("tiny", method="zo-sol", epochs=args.epochs)
        train(ds, train_config("tiny", method="zo-sol", epochs=1), None, solver=solvers[1], progress=False)  # warm-up
        times: dict = {p: {"step": [], "train": []} for p in (1, 2)}
        results = {}
        for rep in range(args.repeats):  # alternate the order: load changes hit both alike
            for p in ((1, 2) if rep % 2 == 0 else (2, 1)):
                solvers[p].step(x[:8])  # (starts the pool once)
                t = time.perf_counter()
                y = solvers[p].step(x)
                times[p]["step"].append(time.perf_counter() - t)
                t = time.perf_counter()
                run = train(ds, cfg, None, solver=solvers[p], progress=False)
                times[p]["train"].append(time.perf_counter() - t)
                results[p] = (y, [q.detach().clone() for q in run.model.parameters()], len(run.history["loss"]))
        for s in solvers.values():
            s.close()
        med = {p: {k: statistics.median(v) for k, v in t.items()} for p, t in times.items()}
        out.update({
            "states_per_step_call": args.states, "repeats": args.repeats, "epochs": args.epochs,
            "optimizer_steps": results[1][2], "times_s": times, "median_s": med,
            "speedup_step": med[1]["step"] / med[2]["step"], "speedup_train": med[1]["train"] / med[2]["train"],
            "identical_step": torch.equal(results[1][0], results[2][0]),
            "identical_trained_parameters": all(torch.equal(a, b) for a, b in zip(results[1][1], results[2][1])),
            "pool_starts": solvers[2].pool.starts,
        })
    out["costlier_step_256_states"] = _synthetic(args.repeats)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
