"""A solver without a batch axis in 1 vs 2 local processes: same result, and how much faster.

    python experiments/one_state_processes.py [--epochs 1] [--json experiments/out/one_state_processes.json]

The coarse solver is py-pde's 1-D Burgers (solvers/burgers1d_pypde.py, numba, one state per
call) wrapped as ``NumpySolver(step, batched=False, processes=P)``.  Measured side by side in one
run: (a) one solver call on a ZO-SOL-sized batch (2,048 states), median of 5; (b) ZO-SOL training
(tiny preset data and training preset, ``--epochs``) with P = 1 and P = 2: final parameters
compared with ``torch.equal``, wall time of ``train``.  The pool's processes are forked once, after
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "solvers"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
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
        step = scenario.coarse_solver().fn
        x = ds.stacked("train")[0][:, :-1].reshape(-1, 1, 32)
        x = x.repeat(2048 // len(x) + 1, 1, 1)[:2048]
        results = {}
        for procs in (1, 2):
            with NumpySolver(step, dt=burgers1d_pypde.DT, channels=("u",), spatial_shape=(32,), batched=False,
                             processes=procs) as solver:
                solver.step(x[:8])  # start the pool
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    y = solver.step(x)
                    times.append(time.perf_counter() - t)
                cfg = train_config("tiny", method="zo-sol", epochs=args.epochs)
                t = time.perf_counter()
                run = train(ds, cfg, None, solver=solver, progress=False)
                results[procs] = dict(step_2048_s=statistics.median(times), train_s=time.perf_counter() - t,
                                      out=y, params=[p.detach().clone() for p in run.model.parameters()],
                                      loss=run.history["loss"])
        same_step = torch.equal(results[1]["out"], results[2]["out"])
        same_train = all(torch.equal(a, b) for a, b in zip(results[1]["params"], results[2]["params"]))
        out.update({
            "step_2048_states_s": {p: r["step_2048_s"] for p, r in results.items()},
            "train_s": {p: r["train_s"] for p, r in results.items()},
            "speedup_step": results[1]["step_2048_s"] / results[2]["step_2048_s"],
            "speedup_train": results[1]["train_s"] / results[2]["train_s"],
            "identical_step": same_step, "identical_trained_parameters": same_train,
            "optimizer_steps": len(results[1]["loss"]),
        })
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
