"""Plot the vorticity of a karman2d reference frame (full resolution and downsampled) next to the
coarse solver's frame started from the same downsampled state.

    python experiments/plot_karman2d.py [--preset default] [--warmup 300] [--coarse-steps 20] \
        [--out experiments/out/karman2d_vorticity.png]

The reference runs ``warmup`` steps from ``scenario.sample(seed)``; the coarse solver then runs
``coarse-steps`` steps from the downsampled frame while the reference keeps going, so the third
panel shows how the coarse solver drifts from the (downsampled) reference in the second panel.
``--warmup`` defaults to the preset's own warm-up (the first dataset frame: a developed wake).
The MAE of the coarse frame against the downsampled reference is printed and put in the title.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from zosol.solvers import get_scenario  # noqa: E402
from zosol.solvers.karman2d import vorticity  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seed", type=int, default=None, help="simulation seed (default: first training seed)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="reference steps before the coarse start (default: the preset's warm-up)",
    )
    ap.add_argument("--coarse-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/out/karman2d_vorticity.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sc = get_scenario("karman2d", args.preset)
    seed = sc.train_seeds[0] if args.seed is None else args.seed
    if args.warmup is None:
        args.warmup = sc.config.warmup
    ref, coarse = sc.reference_solver(), sc.coarse_solver()
    s, p = sc.sample(seed)
    s, p = s[None], p[None]
    with torch.no_grad():
        for _ in range(args.warmup):
            s = ref.step(s, p)
        c = sc.downsample(s)
        for _ in range(args.coarse_steps):
            s = ref.step(s, p)
            c = coarse.step(c, p)
        d = sc.downsample(s)
    mae = float((c - d).abs().mean())
    print(
        f"coarse vs downsampled reference after {args.coarse_steps} steps: MAE {mae:.4f} "
        f"(mean |v| {float(d.abs().mean()):.3f})"
    )
    panels = [
        (f"reference {ref.nx}x{ref.ny}", vorticity(s, ref.dx, ref.dy)[0]),
        (f"reference downsampled to {coarse.nx}x{coarse.ny}", vorticity(d, coarse.dx, coarse.dy)[0]),
        (
            f"coarse solver, {args.coarse_steps} steps from the downsampled frame (MAE {mae:.3f})",
            vorticity(c, coarse.dx, coarse.dy)[0],
        ),
    ]
    lim = float(panels[0][1].abs().quantile(0.99)) or 1.0
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), constrained_layout=True)
    for ax, (title, w) in zip(axes, panels):
        im = ax.imshow(w.numpy(), origin="lower", extent=(0, 200, 0, 100), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.add_patch(plt.Circle((50, 50), 10, color="k"))
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    fig.colorbar(im, ax=axes, label="vorticity dvy/dx - dvx/dy", shrink=0.8)
    fig.suptitle(
        f"karman2d ({args.preset}), seed {seed}, Re {float(p[0, 0]):.3g}, frame {args.warmup + args.coarse_steps}"
    )
    import os

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
