"""Is the karman2d reference worth correcting toward?  Its own error vs a 2x finer grid, the coarse
solver's error, and the Strouhal numbers.

    python experiments/karman2d_reference.py [--preset default] [--relax 20] [--st-steps 240] \
        [--warm-solver direct] [--fine-solver direct] [--out experiments/out/karman2d_reference_default.json]

One test simulation of the preset (its first test seed and Re):

1. The seeded start runs ``warmup - relax`` steps on the reference grid (``--warm-solver``: the
   direct step, which has PhiFlow's numerics and is ~10x faster here, or ``phiflow``).
2. The state is prolonged to the 2x finer grid (``karman2d.prolong``) and run there for ``relax``
   steps (``--fine-solver``, same choice), so that the fine run starts on its own dynamics; its
   restriction ``S0`` to the reference grid is the common start (frame 0).
3. From ``S0``: the 2x finer run, the scenario's reference solver (PhiFlow, as in the dataset) and
   the scenario's coarse solver (from ``downsample(S0)``) each take ``frames`` steps.  All are
   restricted to the coarse grid and compared frame by frame (mean |difference| over cells and both
   components, the project's MAE): ``ref_vs_fine`` (the reference's own error), ``coarse_vs_ref``
   (what SRC scores and a corrector learns to remove), ``coarse_vs_fine``.  ``ratio`` = mean
   coarse_vs_ref / mean ref_vs_fine over frames 1..frames (acceptance: >= 5).
4. Strouhal numbers St = f D / U from a probe of vy 2.5 D behind the cylinder centre, on the axis,
   over ``st_steps`` steps from ``S0``: the PhiFlow reference (continued after the frames) and the
   coarse solver.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm.auto import tqdm

from zosol.solvers import get_scenario
from zosol.solvers.karman2d import DirectKarman2D, Karman2D, prolong, restrict, strouhal_number


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
    ap.add_argument("--st-steps", type=int, default=240)
    ap.add_argument("--warm-solver", choices=["direct", "phiflow"], default="direct")
    ap.add_argument("--fine-solver", choices=["direct", "phiflow"], default="direct")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sc = get_scenario("karman2d", args.preset)
    c = sc.config
    seed = sc.test_seeds[0]
    s, p = sc.sample(seed)
    s, p = s[None], p[None]
    kinds = {"direct": DirectKarman2D, "phiflow": Karman2D}
    common = dict(substeps=c.ref_substeps, inflow=c.inflow, diffusion=c.diffusion)
    warm = kinds[args.warm_solver](c.n_ref_x, c.n_ref_y, c.dt, **common)
    fine = kinds[args.fine_solver](2 * c.n_ref_x, 2 * c.n_ref_y, c.dt, **common)
    ref, coarse = sc.reference_solver(), sc.coarse_solver()
    out = {
        "preset": args.preset,
        "seed": seed,
        "re": float(p[0, 0]),
        "relax": args.relax,
        "frames": c.frames,
        "grids": {
            "coarse": [c.n_coarse_x, c.n_coarse_y],
            "reference": [c.n_ref_x, c.n_ref_y],
            "fine": [2 * c.n_ref_x, 2 * c.n_ref_y],
        },
        "warm_solver": args.warm_solver,
        "fine_solver": args.fine_solver,
        "coarse_solver": c.coarse,
        "seconds": {},
    }
    t = time.perf_counter()
    start = run(warm, s, p, c.warmup - args.relax, "warm-up")[0][-1:]
    out["seconds"]["warmup"] = time.perf_counter() - t
    t = time.perf_counter()
    f0 = run(fine, prolong(start, c.inflow), p, args.relax, "2x finer relax")[0][-1:]
    s0 = restrict(f0, 2)
    f_traj, _ = run(fine, f0, p, c.frames, "2x finer frames")
    out["seconds"]["fine"] = time.perf_counter() - t
    t = time.perf_counter()
    steps = max(c.frames, args.st_steps)
    r_traj, r_probe = run(ref, s0, p, steps, "reference (PhiFlow)", probe_index(ref))
    out["seconds"]["reference"] = time.perf_counter() - t
    c_traj, c_probe = run(coarse, sc.downsample(s0), p, steps, "coarse", probe_index(coarse))
    n = c.frames + 1
    f_c, r_c, c_c = restrict(f_traj, 2 * sc.ratio), sc.downsample(r_traj[:n]), c_traj[:n]
    per_frame = lambda a, b: (a[1:] - b[1:]).abs().flatten(1).mean(1)  # noqa: E731
    e_ref, e_coarse, e_coarse_fine = per_frame(r_c, f_c), per_frame(c_c, r_c), per_frame(c_c, f_c)
    out.update(
        ref_vs_fine=float(e_ref.mean()),
        coarse_vs_ref=float(e_coarse.mean()),
        coarse_vs_fine=float(e_coarse_fine.mean()),
        ratio=float(e_coarse.mean() / e_ref.mean()),
        mean_abs_velocity=float(r_c[1:].abs().mean()),
        per_frame={
            "ref_vs_fine": e_ref.tolist(),
            "coarse_vs_ref": e_coarse.tolist(),
            "coarse_vs_fine": e_coarse_fine.tolist(),
        },
        strouhal={
            "reference": strouhal_number(r_probe, c.dt),
            "coarse": strouhal_number(c_probe, c.dt),
            "probe_steps": steps,
        },
    )
    print(
        f"ref vs 2x finer {out['ref_vs_fine']:.5f}, coarse vs ref {out['coarse_vs_ref']:.5f}, coarse vs 2x "
        f"finer {out['coarse_vs_fine']:.5f}: ratio {out['ratio']:.2f}; St reference "
        f"{out['strouhal']['reference']:.3f}, coarse {out['strouhal']['coarse']:.3f}",
        flush=True,
    )
    path = args.out or os.path.join(os.path.dirname(__file__), "out", f"karman2d_reference_{args.preset}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
