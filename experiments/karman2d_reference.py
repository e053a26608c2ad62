"""Is the karman2d reference worth correcting toward?  Its own error vs a 2x finer grid, the coarse
solver's error, and the Strouhal numbers.

    python experiments/karman2d_reference.py [--preset default] [--relax 20] [--st-steps 400] \
        [--out experiments/out/karman2d_reference_default.json]

One test simulation of the preset (its first test seed and Re), PhiFlow everywhere except the coarse
solver (the scenario's, ``coarse="direct"`` by default):

1. The reference solver (``n_ref``) runs from the seeded start for ``warmup - relax`` steps.
2. The state is prolonged to the 2x finer grid (``karman2d.prolong``) and run there for ``relax``
   steps, so that the fine run starts on its own dynamics; its restriction ``S0`` to the reference
   grid is the common start.
3. From ``S0`` (frame 0 of the evaluated window): the 2x finer run, the reference run and the
   coarse solver (from ``downsample(S0)``) each take ``frames`` steps.  All are restricted to the
   coarse grid and compared frame by frame (mean |difference| over cells and both components, the
   project's MAE): ``ref_vs_fine`` (the reference's own error), ``coarse_vs_ref`` (what SRC scores
   and a corrector learns to remove), ``coarse_vs_fine``.  ``ratio`` = mean coarse_vs_ref / mean
   ref_vs_fine over frames 1..frames (acceptance: >= 5).
4. Strouhal numbers St = f D / U from a probe of vy 2.5 D behind the cylinder centre, on the axis:
   the reference run continued from step ``warmup - relax`` to ``warmup + st_steps`` (probe from
   ``warmup``), and the coarse solver from ``downsample(S0)`` for ``st_steps`` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm.auto import tqdm

from zosol.solvers import get_scenario
from zosol.solvers.karman2d import Karman2D, prolong, restrict, strouhal_number


def run(solver, state, params, steps: int, desc: str, probe=None):
    """``steps`` steps from state (1, 2, H, W): the states (steps + 1, 2, H, W), probe values (steps,)."""
    states, values = [state[0]], []
    with torch.no_grad():
        for _ in tqdm(range(steps), desc=desc, unit="step", mininterval=10):
            state = solver.step(state, params)
            states.append(state[0])
            if probe is not None:
                values.append(float(state[0, 1, probe[1], probe[0]]))
    return torch.stack(states), torch.tensor(values)


def probe_index(solver) -> tuple[int, int]:
    """(ix, iy) of the vy face at x ~ 100 (2.5 D behind the centre), y = 50 (the axis)."""
    return int(100 / solver.dx), int(50 / solver.dy)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--relax", type=int, default=20)
    ap.add_argument("--st-steps", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sc = get_scenario("karman2d", args.preset)
    c = sc.config
    seed = sc.test_seeds[0]
    s, p = sc.sample(seed)
    s, p = s[None], p[None]
    ref = sc.reference_solver()
    fine = Karman2D(2 * c.n_ref_x, 2 * c.n_ref_y, c.dt, substeps=c.ref_substeps, inflow=c.inflow, tol=c.tol,
                    diffusion=c.diffusion)
    coarse = sc.coarse_solver()
    out = {"preset": args.preset, "seed": seed, "re": float(p[0, 0]), "relax": args.relax, "frames": c.frames,
           "grids": {"coarse": [c.n_coarse_x, c.n_coarse_y], "reference": [c.n_ref_x, c.n_ref_y],
                     "fine": [2 * c.n_ref_x, 2 * c.n_ref_y]}, "coarse_solver": c.coarse, "seconds": {}}
    t = time.perf_counter()
    traj, _ = run(ref, s, p, c.warmup - args.relax, "reference warm-up")
    out["seconds"]["reference_warmup"] = time.perf_counter() - t
    start = traj[-1:]
    t = time.perf_counter()
    f_relax, _ = run(fine, prolong(start, c.inflow), p, args.relax, "2x finer relax")
    f0 = f_relax[-1:]
    s0 = restrict(f0, 2)
    out["seconds"]["fine_relax"] = time.perf_counter() - t
    t = time.perf_counter()
    f_traj, _ = run(fine, f0, p, c.frames, "2x finer frames")
    out["seconds"]["fine_frames"] = time.perf_counter() - t
    t = time.perf_counter()
    r_traj, _ = run(ref, s0, p, c.frames, "reference frames")
    out["seconds"]["reference_frames"] = time.perf_counter() - t
    c_traj, c_probe = run(coarse, sc.downsample(s0), p, max(c.frames, args.st_steps), "coarse", probe_index(coarse))
    f_c = restrict(f_traj, 2 * sc.ratio)
    r_c = sc.downsample(r_traj)
    per_frame = lambda a, b: (a[1:] - b[1:]).abs().flatten(1).mean(1)  # noqa: E731
    e_ref = per_frame(r_c, f_c)
    e_coarse = per_frame(c_traj[:c.frames + 1], r_c)
    e_coarse_fine = per_frame(c_traj[:c.frames + 1], f_c)
    out.update(ref_vs_fine=float(e_ref.mean()), coarse_vs_ref=float(e_coarse.mean()),
               coarse_vs_fine=float(e_coarse_fine.mean()), ratio=float(e_coarse.mean() / e_ref.mean()),
               mean_abs_velocity=float(r_c[1:].abs().mean()),
               per_frame={"ref_vs_fine": e_ref.tolist(), "coarse_vs_ref": e_coarse.tolist(),
                          "coarse_vs_fine": e_coarse_fine.tolist()})
    print(f"ref vs 2x finer {out['ref_vs_fine']:.5f}, coarse vs ref {out['coarse_vs_ref']:.5f}, "
          f"coarse vs 2x finer {out['coarse_vs_fine']:.5f}: ratio {out['ratio']:.2f}", flush=True)
    # Strouhal numbers: the reference run continued from the warm-up, the coarse run from S0
    t = time.perf_counter()
    _, r_probe = run(ref, start, p, args.relax + args.st_steps, "reference St", probe_index(ref))
    out["seconds"]["reference_st"] = time.perf_counter() - t
    out["strouhal"] = {"reference": strouhal_number(r_probe[args.relax:], c.dt),
                       "coarse": strouhal_number(c_probe[:args.st_steps], c.dt),
                       "probe_steps": args.st_steps, "reference_probe_from_step": c.warmup}
    print(f"St reference {out['strouhal']['reference']:.3f}, coarse {out['strouhal']['coarse']:.3f}", flush=True)
    path = args.out or os.path.join(os.path.dirname(__file__), "out", f"karman2d_reference_{args.preset}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
