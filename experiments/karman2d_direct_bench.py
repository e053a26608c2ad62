"""The direct coarse step (``coarse="direct"``) next to PhiFlow's coarse step, side by side in one run:
speed per sample at several batch sizes and the difference between the two on the same states.

    python experiments/karman2d_direct_bench.py [--batches 1 16 64 256] [--steps 10] \
        [--out experiments/out/karman2d_direct_bench.json]

States: ``--warm`` direct steps from the seeded starts of the default preset's simulations (a
developing wake), 64x32, paper Re.  One intra-op thread.  Per batch size, the two solvers alternate
(PhiFlow, direct, PhiFlow, direct, ...) for ``--steps`` steps each after one untimed step (PhiFlow
traces its jit there); the median seconds per step are reported as wall time and as this process's
CPU time (``time.process_time``: on a loaded shared machine the CPU time is the steadier measure).
``speedup`` = PhiFlow / direct per step, both measures.

Difference: ``step(s)`` of both solvers on the same 64 states; PhiFlow with its default pressure
tolerance (1e-4, what ``coarse="phiflow"`` runs) and solved to 1e-7; max and mean |difference|, and
the mean |v| for scale.  Also the direct step's forward + backward (autograd through the adjoint solve)
time per step at batch 64, relative to its forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from zosol.solvers import get_scenario
from zosol.solvers.karman2d import DirectKarman2D, Karman2D


def _states(batch: int, warm: int):
    sc = get_scenario("karman2d", "default")
    solver = sc.coarse_solver()
    seeds = sc.train_seeds + sc.test_seeds
    s, p = zip(*(sc.sample(seeds[i % len(seeds)]) for i in range(batch)))
    s, p = sc.downsample(torch.stack(s)), torch.stack(p)
    with torch.no_grad():
        for _ in range(warm):
            s = solver.step(s, p)
    return s, p


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def side_by_side(solvers: dict, s, p, steps: int) -> dict:
    """Median wall and CPU seconds per step of each solver, the solvers interleaved step by step."""
    times = {name: ([], []) for name in solvers}
    with torch.no_grad():
        for solver in solvers.values():
            solver.step(s, p)
        for _ in range(steps):
            for name, solver in solvers.items():
                w, c = _timed(lambda: solver.step(s, p))
                times[name][0].append(w)
                times[name][1].append(c)
    return {name: {"wall_s": statistics.median(w), "cpu_s": statistics.median(c)} for name, (w, c) in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "karman2d_direct_bench.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s_all, p_all = _states(max(args.batches + [64]), args.warm)
    solvers = {"phiflow": Karman2D(64, 32), "direct": DirectKarman2D(64, 32)}
    out = {"threads": 1, "steps": args.steps, "warm": args.warm, "speed": {}}
    for b in args.batches:
        r = side_by_side(solvers, s_all[:b], p_all[:b], args.steps)
        for k in ("wall_s", "cpu_s"):
            r[f"speedup_{k[:-2]}"] = r["phiflow"][k] / r["direct"][k]
        r["ms_per_sample"] = {n: 1e3 * r[n]["cpu_s"] / b for n in solvers}
        out["speed"][b] = r
        print(
            f"batch {b:4d}: PhiFlow {1e3 * r['phiflow']['cpu_s']:8.1f} ms CPU/step, direct "
            f"{1e3 * r['direct']['cpu_s']:7.1f} ms: speed-up {r['speedup_cpu']:.1f}x CPU, "
            f"{r['speedup_wall']:.1f}x wall",
            flush=True,
        )
    s, p = s_all[:64], p_all[:64]
    with torch.no_grad():
        d = solvers["direct"].step(s, p)
        diff = {}
        for tol in (1e-4, 1e-7):
            ph = Karman2D(64, 32, tol=tol, max_iterations=20_000).step(s, p)
            diff[f"tol_{tol:g}"] = {"max_abs": float((ph - d).abs().max()), "mean_abs": float((ph - d).abs().mean())}
    out["difference_vs_phiflow"] = {**diff, "mean_abs_velocity": float(d.abs().mean())}
    print("difference to PhiFlow's step:", json.dumps(out["difference_vs_phiflow"]), flush=True)
    x = s.clone().requires_grad_(True)
    direct = solvers["direct"]
    fwd = statistics.median(_timed(lambda: direct.step(s, p))[1] for _ in range(5))
    fb = statistics.median(_timed(lambda: direct.step(x, p).square().sum().backward())[1] for _ in range(5))
    out["forward_backward_over_forward_b64"] = fb / fwd
    print(f"direct b64 forward+backward / forward: {fb / fwd:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
