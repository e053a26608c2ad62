"""Engine benchmark: naive vs batched (vmap) vs structured (feature reuse) CGE.

``run_engine_bench(json_path=None, quick=False) -> dict`` (CLI: ``zosol bench engine`` or
``python -m zosol.bench.engine [--json PATH] [--quick] [--threads N]``).  It imports nothing of
zosol but the engine (:mod:`zosol.zo`) and the timing helper.

All variants are timed side by side in one run on the same model and loss
(1-D CNN corrector, 4 conv layers, 32 periodic cells, batch 8, MSE):

* naive     -- reference design: copy the parameter vector, perturb one coordinate, one forward
               per coordinate (timed on a subset of coordinates and extrapolated to d + 1 queries);
* batched   -- ``functional_call`` + ``vmap`` over perturbed parameter copies (no reuse);
* dense     -- structured shared-weight forward + per-perturbation delta, reuse off;
* reuse     -- structured forward with feature reuse (the fast path);
* floor     -- one ordinary forward of the unperturbed network over (d + 1) x B samples.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from ..zo.bench_nets import cnn1d_corrector
from ..zo.checks import cosine
from ..zo.parallel import measure_peak_memory
from ..zo.plan import n_params
from ..zo.reuse import cge_structured
from .timing import time_call

__all__ = ["run_engine_bench", "subset_masks"]

#: the 10k model's metrics the result repeats at its top level (and the table prints)
HEADLINE = (
    "speedup_batched_vs_naive",
    "speedup_reuse_vs_naive",
    "speedup_feature_reuse",
    "cge_cost_vs_dense_forward",
    "reuse_max_abs_grad_diff",
    "cge_rel_err_vs_autograd",
)


def _timeit(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` calls (no warm-up) and the last call's output."""
    t = time_call(fn, repeats, warmup=0)
    return t.best, t.output


def _problem(hidden: tuple, B: int = 8, N: int = 32, seed: int = 0):
    model = cnn1d_corrector(hidden=hidden, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 2, N, generator=g)
    y = torch.randn(B, 1, N, generator=g)

    def lof(forward, P):  # float32 network, loss reduced in float64 (no loss-rounding noise in differences)
        return ((forward(x).reshape(P, -1).double() - y.reshape(1, -1).double()) ** 2).mean(1)

    return model, x, y, lof


@torch.no_grad()
def _naive(model: nn.Module, x, y, mu: float, coords: torch.Tensor) -> torch.Tensor:
    """Reference design on ``coords``: copy + perturb one coordinate + one forward each."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th):
        pd, o = {}, 0
        for k, s in zip(names, shapes):
            n = int(torch.Size(s).numel())
            pd[k] = th[o : o + n].view(s)
            o += n
        return float(((functional_call(model, pd, (x,)).double() - y.double()) ** 2).mean())

    f0 = loss(theta.clone())
    g = torch.empty(coords.numel(), dtype=torch.float64)
    for i, j in enumerate(coords.tolist()):
        th = theta.clone()
        th[j] += mu
        g[i] = (loss(th) - f0) / mu
    return g


def subset_masks(model: nn.Module, n: int, seed: int = 0) -> dict:
    """Masks selecting ``n`` random coordinates of ``model`` (for timing a subset of coordinates)."""
    params = dict(model.named_parameters())
    d = sum(p.numel() for p in params.values())
    flat = torch.zeros(d, dtype=torch.bool)
    flat[torch.randperm(d, generator=torch.Generator().manual_seed(seed))[: min(n, d)]] = True
    out, o = {}, 0
    for k, p in params.items():
        out[k] = flat[o : o + p.numel()].reshape(p.shape)
        o += p.numel()
    return out


def _speed_block(hidden: tuple, chunk: int, naive_coords: int, repeats: int, mu: float, with_vmap: bool) -> dict:
    model, x, y, lof = _problem(hidden)
    d, B = n_params(model), x.shape[0]
    r: dict = {"d": d, "B": B, "chunk_size": chunk}
    warm = subset_masks(model, chunk)  # warm-up (allocator, oneDNN primitive caches)
    for eng in ("structured", "vmap"):
        cge_structured(model, lof, mu=mu, chunk_size=chunk, masks=warm, engine=eng)
    # naive (subset, extrapolated per coordinate to d + 1 queries)
    coords = torch.randperm(d, generator=torch.Generator().manual_seed(0))[: min(naive_coords, d)]
    t, g_naive = _timeit(lambda: _naive(model, x, y, mu, coords), 1)
    r["naive_coords_timed"] = int(coords.numel())
    r["naive_s"] = t / (coords.numel() + 1) * (d + 1)
    r["naive_extrapolated"] = coords.numel() < d
    t, est = _timeit(lambda: cge_structured(model, lof, mu=mu, chunk_size=chunk, reuse=True), repeats)
    r["reuse_s"] = t
    r["speedup_reuse_vs_naive"] = r["naive_s"] / t
    r["naive_vs_reuse_max_abs_diff_on_subset"] = float((est.flat()[coords].double() - g_naive).abs().max())
    if with_vmap:
        t, est_v = _timeit(lambda: cge_structured(model, lof, mu=mu, chunk_size=chunk, engine="vmap"), repeats)
        r["batched_vmap_s"] = t
        r["speedup_batched_vs_naive"] = r["naive_s"] / t
        r["speedup_feature_reuse"] = r["batched_vmap_s"] / r["reuse_s"]
        r["reuse_max_abs_grad_diff"] = float((est.flat() - est_v.flat()).abs().max())
        t, est_d = _timeit(lambda: cge_structured(model, lof, mu=mu, chunk_size=chunk, reuse=False), repeats)
        r["dense_no_reuse_s"] = t
        r["dense_vs_reuse_max_abs_grad_diff"] = float((est.flat() - est_d.flat()).abs().max())
        xx = x.repeat(chunk, 1, 1)
        n_rows = (d + 1) * B

        def floor():
            with torch.no_grad():
                for s in range(0, n_rows, chunk * B):
                    model(xx[: min(chunk * B, n_rows - s)])

        t, _ = _timeit(floor, repeats)
        r["dense_forward_floor_s"] = t
        r["cge_cost_vs_dense_forward"] = r["dense_no_reuse_s"] / t
        r["reuse_cost_vs_dense_forward"] = r["reuse_s"] / t
        # accuracy vs autograd (float32 forward differences)
        loss = ((model(x) - y) ** 2).mean()
        ref = torch.cat([gg.reshape(-1) for gg in torch.autograd.grad(loss, list(model.parameters()))]).double()
        e = est.flat().double()
        r["cge_rel_err_vs_autograd"] = float((e - ref).norm() / ref.norm())
        r["cge_cosine_vs_autograd"] = cosine(e, ref)
    return r


def run_engine_bench(
    json_path: str | None = None, quick: bool = False, threads: int | None = 1, mu: float = 1e-3
) -> dict:
    """Run the engine benchmark, print a table, optionally write JSON; returns the metrics dict.

    ``quick`` shrinks the naive subset, repeats and the model-size sweep (about a minute).
    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards; None: unchanged).
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(json_path, quick, mu)
    finally:
        torch.set_num_threads(old)


def _run(json_path, quick, mu) -> dict:
    reps = 1 if quick else 2
    chunk = 512
    t0 = time.perf_counter()
    res: dict = {
        "quick": quick,
        "threads": torch.get_num_threads(),
        "mu": mu,
        "dtype": "float32",
        "torch": torch.__version__,
    }
    main = _speed_block((32, 32, 24), chunk, 300 if quick else 2000, reps, mu, with_vmap=True)
    small = _speed_block((10, 10, 8), chunk, 300 if quick else 1070, reps, mu, with_vmap=True)
    res["model_10k"] = main
    res["model_1k"] = small
    res.update({k: main[k] for k in HEADLINE})
    res["speedup_reuse_vs_naive_1k"] = small["speedup_reuse_vs_naive"]
    res["peak_memory_per_chunk"] = _memory_per_chunk(mu, quick)
    res["queries_per_s_vs_model_size"] = _model_size_sweep(mu, quick, chunk, reps)
    res["wall_s"] = time.perf_counter() - t0
    _print_table(res)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)
    return res


def _memory_per_chunk(mu: float, quick: bool) -> list[dict]:
    """Peak memory and queries/s per chunk size (one chunk of random coordinates of the 10k model,
    reuse on); chunk "auto": the default, from the memory budget."""
    model, x, y, lof = _problem((32, 32, 24))
    mem = []
    for c in (64, 512, 2048, "auto") if quick else (64, 256, 1024, 4096, "auto"):
        masks = subset_masks(model, c if c != "auto" else 4096, seed=7)
        box = {}

        def go():
            t = time.perf_counter()
            box["est"] = cge_structured(model, lof, mu=mu, masks=masks, chunk_size=c)
            box["t"] = time.perf_counter() - t

        peak = measure_peak_memory(go)
        mem.append(
            {
                "chunk_size": c,
                "chosen": box["est"].info["chunk_size"],
                "peak_bytes": peak,
                "queries_per_s": (box["est"].queries) / box["t"],
            }
        )
    return mem


def _model_size_sweep(mu: float, quick: bool, chunk: int, reps: int) -> list[dict]:
    """Queries/s vs model size (reuse on, a random subset of coordinates)."""
    sweep = []
    for hidden in (
        ((4, 4, 4), (10, 10, 8), (32, 32, 24))
        if quick
        else ((4, 4, 4), (10, 10, 8), (16, 16, 16), (32, 32, 24), (64, 64, 48))
    ):
        model, x, y, lof = _problem(hidden)
        n = min(n_params(model), 1024 if quick else 2048)
        masks = subset_masks(model, n)
        t, _ = _timeit(lambda: cge_structured(model, lof, mu=mu, masks=masks, chunk_size=chunk), reps)
        sweep.append({"hidden": list(hidden), "d": n_params(model), "coords_timed": n, "queries_per_s": (n + 1) / t})
    return sweep


def _print_table(res: dict) -> None:
    print(f"zosol.zo engine bench (threads={res['threads']}, float32, mu={res['mu']}, quick={res['quick']})")
    for key in ("model_10k", "model_1k"):
        m = res[key]
        print(f"\n{key}: d={m['d']} B={m['B']} chunk={m['chunk_size']}")
        print(f"  {'variant':34s} {'s/grad':>9s} {'vs naive':>9s}")
        ex = f" (extrapolated from {m['naive_coords_timed']} coords)" if m["naive_extrapolated"] else ""
        print(f"  {'naive copy+perturb+forward' + ex:34s} {m['naive_s']:9.3f} {1.0:9.2f}")
        for name, k in (
            ("batched vmap (no reuse)", "batched_vmap_s"),
            ("structured, no reuse", "dense_no_reuse_s"),
            ("structured + feature reuse", "reuse_s"),
            ("dense forward floor (d+1)xB", "dense_forward_floor_s"),
        ):
            if k in m:
                print(f"  {name:34s} {m[k]:9.3f} {m['naive_s'] / m[k]:9.2f}")
    print("\nheadline metrics (10k model):")
    for k in (*HEADLINE, "speedup_reuse_vs_naive_1k"):
        print(f"  {k:32s} {res[k]:.4g}")
    print(f"  {'cge_cosine_vs_autograd':32s} {res['model_10k']['cge_cosine_vs_autograd']:.5f}")
    print("\npeak memory per chunk size (structured + reuse, 10k model; auto = the default, from the memory budget):")
    for r in res["peak_memory_per_chunk"]:
        pk = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MiB"
        name = f"auto ({r['chosen']})" if r["chunk_size"] == "auto" else str(r["chunk_size"])
        print(f"  chunk {name:>11s}: peak {pk:>10s}, {r['queries_per_s']:.0f} queries/s")
    print("\nqueries/s vs model size (structured + reuse):")
    for r in res["queries_per_s_vs_model_size"]:
        print(f"  d={r['d']:6d} hidden={r['hidden']}: {r['queries_per_s']:.0f} queries/s")
    print(f"\nbench wall time {res['wall_s']:.1f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write metrics to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smaller, faster run")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: leave unchanged); 1 avoids OpenMP sync stalls on a busy 2-core machine",
    )
    a = ap.parse_args(argv)
    run_engine_bench(a.json, a.quick, a.threads or None)


if __name__ == "__main__":
    main()
