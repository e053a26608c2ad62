"""Benchmark the karman2d solvers (PhiFlow 3.4, torch, jit_compile) on CPU, measure dataset
generation time, the coarse solver's error and the reference's own error.

    python experiments/bench_karman2d.py [--threads 1] [--steps 10] [--paper-steps 5] \
        [--out experiments/out/bench_karman2d.json] [--skip-generate] [--skip-accuracy]

Sections (each printed and written to the JSON):

* ``coarse_64x32``: ms per coarse step (the paper's coarse grid) at batch 1/16/64/256, measured on
  a developed wake (``--warm`` steps first; the pressure solve's cost depends on the state).
* ``reference_256x128_b1``: ms per paper reference step, batch 1, ``--paper-steps`` steps after a
  short warm-up (the wake is not developed yet: a developed one may cost more).
* ``estimates.default_s``: wall time of ``datasets.generate(karman2d, default)`` into a temporary
  directory, *measured* (batch 8, as ``zosol generate``).  ``estimates.paper_s``: the paper's
  generation extrapolated from ``--paper-frac`` reference steps run at its generation batch (8,
  then the last chunk of 3), i.e. (warmup + frames) x (t_8 + t_3).
* ``accuracy``: from a 256x128 run (``--acc-warm`` steps, seed = first training seed) its frame is
  restricted to 128x64 (default reference grid) and 64x32 (default coarse grid); each runs
  ``--acc-steps`` steps on its own grid.  MAE against the 256x128 run restricted to 64x32:
  ``ref128_vs_256`` (the reference's own error), ``coarse64_vs_256``; and ``coarse64_vs_ref128``
  (the error a corrector learns to remove: coarse solver vs downsampled default reference).

* ``thread_comparison`` (``--thread-compare``): ms per 64x32 step at batch 6 from ``sample`` with
  the solver's default cap (1 thread) vs uncapped 2 threads (``Karman2D(threads=None)``).

``torch.set_num_threads(--threads)``; the solver itself caps its step at 1 intra-op thread
(``Karman2D(threads=1)``), which on the shared 2-core machine was ~50x faster than 2 threads.
``--only thread_comparison --update`` runs one section and merges it into an existing ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from zosol.solvers import get_scenario


def _state(scenario, solver, batch: int, warm: int):
    seeds = scenario.train_seeds + scenario.test_seeds
    seeds = [seeds[i % len(seeds)] for i in range(batch)]
    s0, p0 = zip(*(scenario.sample(s) for s in seeds))
    s, p = torch.stack(s0), torch.stack(p0)
    with torch.no_grad():
        for _ in range(warm):
            s = solver.step(s, p)
    return s, p


def time_steps(solver, s, p, steps: int) -> float:
    """Median seconds per step (after one untimed step that triggers tracing)."""
    with torch.no_grad():
        s = solver.step(s, p)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            s = solver.step(s, p)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def accuracy(warm: int, steps: int, seed: int | None = None) -> dict:
    """Coarse error and reference error against a 256x128 run (see module docstring)."""
    fine_sc = get_scenario("karman2d", "paper", n_coarse_x=64, n_coarse_y=32)  # 256x128 -> 64x32
    to128 = get_scenario("karman2d", "paper", n_coarse_x=128, n_coarse_y=64)  # 256x128 -> 128x64
    default = get_scenario("karman2d", "default")  # 128x64 -> 64x32
    fine, ref, coarse = fine_sc.reference_solver(), default.reference_solver(), default.coarse_solver()
    seed = default.train_seeds[0] if seed is None else seed
    s, p = fine_sc.sample(seed)
    s, p = s[None], p[None]
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(warm):
            s = fine.step(s, p)
        r = to128.downsample(s)
        c = fine_sc.downsample(s)
        rows = []
        for k in range(1, steps + 1):
            s, r, c = fine.step(s, p), ref.step(r, p), coarse.step(c, p)
            truth, r_d = fine_sc.downsample(s), default.downsample(r)
            if k in (1, 2, 5, 10, 20, 50) or k == steps:
                row = {
                    "step": k,
                    "ref128_vs_256": float((r_d - truth).abs().mean()),
                    "coarse64_vs_256": float((c - truth).abs().mean()),
                    "coarse64_vs_ref128": float((c - r_d).abs().mean()),
                    "mean_abs_velocity": float(truth.abs().mean()),
                }
                rows.append(row)
                print("  " + "  ".join(f"{k_}={v:.4g}" for k_, v in row.items()), flush=True)
    return {
        "seed": seed,
        "re": float(p[0, 0]),
        "warm_steps_256x128": warm,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def thread_comparison(steps: int) -> dict:
    """ms per 64x32 step (batch 6, from ``sample``) with the 1-thread cap vs 2 uncapped threads."""
    from zosol.solvers.karman2d import Karman2D

    sc = get_scenario("karman2d", "tiny", n_ref_x=64, n_ref_y=32, n_coarse_x=64, n_coarse_y=32)
    seeds = sc.train_seeds + sc.test_seeds
    s0, p0 = zip(*(sc.sample(x) for x in (seeds * 6)[:6]))
    s, p = torch.stack(s0), torch.stack(p0)
    before = torch.get_num_threads()
    out = {}
    try:
        torch.set_num_threads(2)
        for name, threads in (("capped_1_thread", 1), ("uncapped_2_threads", None)):
            solver = Karman2D(64, 32, threads=threads)
            dt = time_steps(solver, s, p, steps)
            out[name] = {"ms_per_step": 1e3 * dt, "batch": 6, "steps": steps}
            print(f"64x32 batch 6, {name}: {1e3 * dt:.1f} ms/step", flush=True)
    finally:
        torch.set_num_threads(before)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--paper-steps", type=int, default=5)
    ap.add_argument("--paper-frac", type=int, default=5, help="reference steps per chunk for the paper estimate")
    ap.add_argument("--warm", type=int, default=60, help="coarse steps run before timing (develops the wake)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--gen-batch", type=int, default=8, help="simulations per generation batch (zosol generate)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--acc-warm", type=int, default=300)
    ap.add_argument("--acc-steps", type=int, default=20)
    ap.add_argument("--thread-compare", action="store_true", help="also time 1 vs 2 threads")
    ap.add_argument("--only", default=None, help="run only this section: thread_comparison, accuracy")
    ap.add_argument("--update", action="store_true", help="merge into an existing --out file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "coarse_64x32": {}, "estimates": {}}
    if args.update and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            res = json.load(f)

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)

    if args.thread_compare or args.only == "thread_comparison":
        res["thread_comparison"] = thread_comparison(args.steps)
        dump()
    if args.only == "accuracy":
        res["accuracy"] = accuracy(args.acc_warm, args.acc_steps)
        dump()
    if args.only:
        return res

    paper = get_scenario("karman2d", "paper")
    coarse = paper.coarse_solver()
    single = get_scenario("karman2d", "paper", n_ref_x=64, n_ref_y=32)
    s1, p1 = _state(single, coarse, 1, args.warm)
    print(f"coarse step {coarse.nx}x{coarse.ny} (ms/step, ms/sample):")
    for b in map(int, args.batches.split(",")):
        s = s1.repeat(b, 1, 1, 1) + 0.01 * torch.randn(b, *s1.shape[1:])
        s[:, 1, 0] = 0
        p = p1.repeat(b, 1)
        dt = time_steps(coarse, s, p, args.steps)
        res["coarse_64x32"][b] = {"ms_per_step": 1e3 * dt, "ms_per_sample": 1e3 * dt / b}
        print(f"  batch {b:4d}: {1e3 * dt:9.1f} ms/step  {1e3 * dt / b:8.2f} ms/sample", flush=True)
    dump()

    ref = paper.reference_solver()
    s, p = _state(paper, ref, 1, 3)
    dt = time_steps(ref, s, p, args.paper_steps)
    res["reference_256x128_b1"] = {"ms_per_step": 1e3 * dt, "ms_per_sample": 1e3 * dt}
    print(f"reference step 256x128 batch 1: {1e3 * dt:.1f} ms/step", flush=True)
    dump()

    # paper: (warmup + frames) steps for each chunk of the 11 simulations (8 + 3 at batch 8)
    c = paper.config
    nsim = c.train_sims + c.test_sims
    sizes = [min(args.gen_batch, nsim - i) for i in range(0, nsim, args.gen_batch)]
    per_chunk = {}
    for b in sorted(set(sizes)):
        s, p = _state(paper, ref, b, 3)
        per_chunk[b] = time_steps(ref, s, p, args.paper_frac)
        print(f"reference step 256x128 batch {b}: {1e3 * per_chunk[b]:.1f} ms/step", flush=True)
    est = (c.warmup + c.frames) * sum(per_chunk[b] for b in sizes)
    res["estimates"]["paper_s"] = est
    res["estimates"]["paper_ms_per_step_by_batch"] = {b: 1e3 * t for b, t in per_chunk.items()}
    print(
        f"paper dataset estimate: {nsim} sims in chunks {sizes} x {c.warmup + c.frames} ref steps at 256x128: "
        f"~{est / 3600:.2f} h (extrapolated from {args.paper_frac} early steps per chunk; a developed wake "
        f"may cost more)",
        flush=True,
    )
    dump()

    if not args.skip_generate:
        from zosol.datasets.generate import generate

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = generate("karman2d", "default", tmp, batch=args.gen_batch, progress=False)
            el = time.perf_counter() - t
        d = get_scenario("karman2d", "default").config
        res["estimates"]["default_s"] = el
        res["estimates"]["default_measured"] = True
        res["estimates"]["default_config"] = {
            k: getattr(d, k)
            for k in ("n_ref_x", "n_ref_y", "n_coarse_x", "n_coarse_y", "warmup", "frames", "train_sims", "test_sims")
        }
        print(
            f"default dataset generation (measured, batch {args.gen_batch}): {el:.1f} s ({el / 60:.2f} min) "
            f"-> {path.name}",
            flush=True,
        )
        dump()

    if not args.skip_accuracy:
        print(f"accuracy vs a 256x128 run ({args.acc_warm} warm-up steps, then {args.acc_steps} steps):")
        res["accuracy"] = accuracy(args.acc_warm, args.acc_steps)
        dump()
    return res


if __name__ == "__main__":
    main()
