"""Validation of the ks1d solvers: measured orders of the ETD schemes, and whether the reference is
worth correcting toward (its own error against a finer run, next to the coarse solver's error).

    python experiments/ks1d_reference.py [--preset default] [--sims 8] [--out experiments/out/ks1d_reference.json]

1. Orders: from Kassam-Trefethen's smooth start ``cos(2 pi x/L)(1 + sin(2 pi x/L))`` (L = 32, 64
   points, float64) to t = 1 with 8, 16, ..., 128 steps of each scheme; max-norm error against
   ETDRK4 with 4096 steps, and the observed order log2(e_h / e_{h/2}).
2. Worth correcting toward: ``sims`` test seeds of the preset run their warm-up with the reference
   solver (float64); from that common start the 2x finer run (2 n_ref points, 4x the ETDRK4
   sub-steps), the reference and the coarse solver (float32, as in training) take the preset's
   frames.  Mean |difference| on the coarse grid per frame: ``ref_vs_fine`` (the reference's own
   error), ``coarse_vs_ref`` (what SRC scores) and ``coarse_vs_fine``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from zosol.solvers import get_scenario
from zosol.solvers.ks1d import KS1D

F64 = torch.float64


def orders(substeps=(8, 16, 32, 64, 128), length: float = 32.0, n: int = 64) -> dict:
    """Per scheme: the max-norm errors at t = 1 and the observed orders of consecutive halvings."""
    x = torch.arange(n, dtype=F64) * (length / n)
    w = 2 * math.pi / length
    u0 = (torch.cos(w * x) * (1 + torch.sin(w * x)))[None, None]
    exact = KS1D(n, 1.0, length, scheme="etdrk4", substeps=4096, dtype=F64).step(u0)
    out = {}
    for scheme in ("etdrk1", "etdrk2", "etdrk4"):
        errs = [
            float((KS1D(n, 1.0, length, scheme=scheme, substeps=s, dtype=F64).step(u0) - exact).abs().max())
            for s in substeps
        ]
        out[scheme] = {
            "substeps": list(substeps),
            "errors": errs,
            "orders": [math.log2(a / b) for a, b in zip(errs, errs[1:])],
        }
    return out


def worth_correcting(preset: str = "default", sims: int = 8) -> dict:
    """Per-frame MAE on the coarse grid (mean over ``sims`` test seeds) of the three comparisons."""
    sc = get_scenario("ks1d", preset)
    c = sc.config
    ref, coarse = sc.reference_solver(), sc.coarse_solver()
    u = torch.stack([sc.sample(s)[0] for s in sc.test_seeds[:sims]]).double()
    for _ in range(c.warmup):
        u = ref.step(u)
    fine = KS1D(2 * c.n_ref, c.dt, c.length, scheme="etdrk4", substeps=4 * c.ref_substeps)
    v = torch.zeros(u.shape[0], 1, c.n_ref + 1, dtype=torch.complex128)
    v[..., : c.n_ref // 2] = 2 * torch.fft.rfft(u)[..., : c.n_ref // 2]  # spectral prolongation
    uf, ur, uc = torch.fft.irfft(v, n=2 * c.n_ref), u, sc.downsample(u).float()
    rows: dict[str, list[float]] = {"ref_vs_fine": [], "coarse_vs_ref": [], "coarse_vs_fine": []}
    for _ in range(c.frames):
        uf, ur, uc = fine.step(uf), ref.step(ur), coarse.step(uc)
        f, r, k = uf[..., :: 2 * c.n_ref // c.n_coarse], sc.downsample(ur), uc.double()
        rows["ref_vs_fine"].append(float((r - f).abs().mean()))
        rows["coarse_vs_ref"].append(float((k - r).abs().mean()))
        rows["coarse_vs_fine"].append(float((k - f).abs().mean()))
    means = {k: sum(v) / len(v) for k, v in rows.items()}
    return {
        "preset": preset,
        "sims": sims,
        "per_frame": rows,
        "mean": means,
        "ratio": means["coarse_vs_ref"] / means["ref_vs_fine"],
        "mean_abs_u": float(u.abs().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--sims", type=int, default=8)
    ap.add_argument("--out", default="experiments/out/ks1d_reference.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = {"orders": orders(), "worth_correcting": worth_correcting(a.preset, a.sims)}
    print("| scheme | " + " | ".join(f"{s} steps" for s in res["orders"]["etdrk4"]["substeps"]) + " | orders |")
    print("|---" * 7 + "|")
    for scheme, r in res["orders"].items():
        print(
            f"| {scheme} | "
            + " | ".join(f"{e:.2e}" for e in r["errors"])
            + " | "
            + ", ".join(f"{p:.2f}" for p in r["orders"])
            + " |"
        )
    w = res["worth_correcting"]
    frames = [f for f in (1, 5, 10, 20, 30, 48) if f <= len(w["per_frame"]["ref_vs_fine"])]
    print("\n| frames after the common start | " + " | ".join(map(str, frames)) + " | mean |")
    print("|---" * (len(frames) + 2) + "|")
    for key in ("ref_vs_fine", "coarse_vs_ref", "coarse_vs_fine"):
        vals = [w["per_frame"][key][f - 1] for f in frames]
        print(f"| {key} | " + " | ".join(f"{x:.2e}" for x in vals) + f" | {w['mean'][key]:.2e} |")
    print(f"\nratio coarse_vs_ref / ref_vs_fine: {w['ratio']:.0f} (mean |u| {w['mean_abs_u']:.2f})")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
