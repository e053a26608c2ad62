"""Throughput of the burgers2d solvers: coarse step at several batch sizes, the reference step,
and the hand-written torch step vs PhiFlow 3.4's jit-compiled step on the same grid.

    python experiments/bench_burgers2d.py [--preset default] [--threads 2] [--batches 1 16 256]

Prints Markdown tables (median ms per step over ``--repeats`` timed calls after warm-up).
On a shared, oversubscribed 2-core machine ``--threads 2`` made each parallelised torch op cost
~10 ms (OpenMP threads waiting for a core) and the batched steps 30-100x slower than
``--threads 1``: compare runs with the same thread count and a quiet machine.
"""

from __future__ import annotations

import argparse

import torch

from zosol.bench.solvers import median_step_seconds
from zosol.solvers import get_scenario


def _inputs(sc, batch: int, coarse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = [sc.config.seed + i % 8 for i in range(batch)]
    states, params = zip(*(sc.sample(s) for s in seeds[:8]))
    x = torch.stack(states)
    if coarse:
        x = sc.downsample(x)
    reps = -(-batch // x.shape[0])
    return x.repeat(reps, 1, 1, 1)[:batch].contiguous(), torch.stack(params).repeat(reps, 1)[:batch].contiguous()


def _time(step, x, p, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds per step."""
    return 1e3 * median_step_seconds(step, x, p, repeats, warmup)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-phiflow", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sc = get_scenario("burgers2d", args.preset)
    c = sc.config
    coarse, ref = sc.coarse_solver(), sc.reference_solver()
    print(f"burgers2d preset={args.preset}  threads={torch.get_num_threads()}  torch {torch.__version__}")
    print(
        f"coarse: {c.n_coarse}x{c.n_coarse} semi-Lagrangian, {coarse.min_substeps} sub-step(s)/dt;  "
        f"reference: {c.n_ref}x{c.n_ref} MacCormack, {ref.min_substeps} sub-step(s)/dt\n"
    )

    print("| solver | grid | batch | ms/step | samples/s |")
    print("|---|---|---|---|---|")
    for b in args.batches:
        x, p = _inputs(sc, b, coarse=True)
        ms = _time(coarse.step, x, p, args.repeats)
        print(f"| coarse (torch) | {c.n_coarse}^2 | {b} | {ms:.3f} | {b / ms * 1e3:,.0f} |")
    x, p = _inputs(sc, 1, coarse=False)
    ms = _time(ref.step, x, p, max(3, args.repeats // 4))
    print(f"| reference (torch) | {c.n_ref}^2 | 1 | {ms:.3f} | {1 / ms * 1e3:,.0f} |")

    if args.no_phiflow:
        return
    import warnings

    warnings.filterwarnings("ignore")
    print("\nhand-written torch vs PhiFlow 3.4 jit_compile (same numerics, same grid), ms/step")
    print("| scheme | grid | batch | torch | PhiFlow jit | ratio | max abs diff (1 step) |")
    print("|---|---|---|---|---|---|---|")
    cases = [
        ("semi-Lagrangian (coarse)", sc.coarse_solver, True, args.batches),
        ("MacCormack (reference)", sc.reference_solver, False, [1, 16]),
    ]
    for name, make, is_coarse, batches in cases:
        a, bphi = make(), make(backend="phiflow")
        n = c.n_coarse if is_coarse else c.n_ref
        for b in batches:
            x, p = _inputs(sc, b, coarse=is_coarse)
            reps = args.repeats if is_coarse else max(3, args.repeats // 4)
            ta = _time(a.step, x, p, reps)
            tb = _time(bphi.step, x, p, reps, warmup=2)  # the first call traces (1-2 s)
            with torch.no_grad():
                diff = float((a.step(x, p) - bphi.step(x, p)).abs().max())
            print(f"| {name} | {n}^2 | {b} | {ta:.3f} | {tb:.3f} | {tb / ta:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
