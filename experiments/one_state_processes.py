"""A solver without a batch axis in 1 vs 2 local processes: same result, and how much faster.

    python experiments/one_state_processes.py [--epochs 20] [--json experiments/out/one_state_processes.json]

The coarse solver is py-pde's 1-D Burgers (solvers/burgers1d_pypde.py, numba, one state per
call) wrapped as ``NumpySolver(step, batched=False, processes=P)``, P = 1 and 2.  Two steps are
measured: the scenario's own coarse step (10 forward-Euler sub-steps per dt, ~7 us per state)
and a costlier one (``--substeps``, default 200 sub-steps per dt: a black box whose step takes
longer, as most legacy codes do).  For each, side by side in one run, after a warm-up training
run, ``--repeats`` rounds in alternating order, medians: (a) one solver call on a ZO-SOL-sized
batch (``--states``, 2,048); (b) ZO-SOL training (tiny preset data and training preset,
``--epochs``) through it: final parameters compared with ``torch.equal``, wall time of
``train``.  The pool's worker is forked once, after the step function was compiled, so it does
not compile again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "solvers"))


def _side_by_side(fn, ds, x: torch.Tensor, cfg, repeats: int) -> dict:
    """One step function in 1 and 2 processes: solver-call and training times, equality."""
    import burgers1d_pypde

    from zosol.solvers.external import NumpySolver
    from zosol.training import train

    solvers = {
        p: NumpySolver(
            fn,
            dt=burgers1d_pypde.DT,
            channels=("u",),
            spatial_shape=(burgers1d_pypde.N_COARSE,),
            batched=False,
            processes=p,
        )
        for p in (1, 2)
    }
    train(ds, cfg, None, solver=solvers[1], progress=False)  # warm-up
    times: dict = {p: {"step": [], "train": []} for p in (1, 2)}
    results = {}
    for rep in range(repeats):  # alternate the order: load changes hit both alike
        for p in (1, 2) if rep % 2 == 0 else (2, 1):
            solvers[p].step(x[:8])  # (starts the pool once)
            t = time.perf_counter()
            y = solvers[p].step(x)
            times[p]["step"].append(time.perf_counter() - t)
            t = time.perf_counter()
            run = train(ds, cfg, None, solver=solvers[p], progress=False)
            times[p]["train"].append(time.perf_counter() - t)
            results[p] = (y, [q.detach().clone() for q in run.model.parameters()], len(run.history["loss"]))
    starts = solvers[2].pool.starts
    for s in solvers.values():
        s.close()
    med = {p: {k: statistics.median(v) for k, v in t.items()} for p, t in times.items()}
    return {
        "optimizer_steps": results[1][2],
        "times_s": times,
        "median_s": med,
        "us_per_state_1_process": 1e6 * med[1]["step"] / len(x),
        "speedup_step": med[1]["step"] / med[2]["step"],
        "speedup_train": med[1]["train"] / med[2]["train"],
        "identical_step": torch.equal(results[1][0], results[2][0]),
        "identical_trained_parameters": all(torch.equal(a, b) for a, b in zip(results[1][1], results[2][1])),
        "pool_starts": starts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--states", type=int, default=2048, help="states in the timed solver call")
    ap.add_argument("--substeps", type=int, default=200, help="Euler sub-steps per dt of the costlier step")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import burgers1d_pypde

    from zosol.config import train_config
    from zosol.datasets import generate, load_dataset
    from zosol.solvers import get_scenario

    t0 = time.perf_counter()
    scenario = get_scenario("burgers1d_pypde", "tiny")
    out: dict = {
        "compile_both_solvers_s": time.perf_counter() - t0,
        "states_per_step_call": args.states,
        "repeats": args.repeats,
        "epochs": args.epochs,
    }
    costly = burgers1d_pypde.make_step(burgers1d_pypde.N_COARSE, substeps=args.substeps)
    cfg = train_config("tiny", method="zo-sol", epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(generate(scenario, out=tmp, progress=False), scenario=scenario)
        x = ds.stacked("train")[0][:, :-1].reshape(-1, 1, burgers1d_pypde.N_COARSE)
        x = x.repeat(args.states // len(x) + 1, 1, 1)[: args.states]
        out["coarse_step_10_substeps"] = _side_by_side(scenario.coarse_solver().fn, ds, x, cfg, args.repeats)
        out[f"costlier_step_{args.substeps}_substeps"] = _side_by_side(costly, ds, x, cfg, args.repeats)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
