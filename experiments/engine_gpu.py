"""GPU vs CPU throughput of the zosol.zo engine (runs on CPU too; CUDA parts are skipped without CUDA).

For a few 1-D CNN correctors (32 cells, batch 8) it times, on every available device, a CGE
estimate over a random subset of coordinates with the structured perturbed forward (feature
reuse), without reuse, and with the generic vmap engine, and reports queries/s, the GPU/CPU
ratio, the peak memory per chunk and the max |difference| between the CPU and GPU gradients.
Designed to finish in well under 5 minutes on one GPU.

    python experiments/engine_gpu.py [--json out.json] [--coords 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zosol.bench.engine import subset_masks
from zosol.zo import cge_structured, n_params
from zosol.zo.bench_nets import cnn1d_corrector
from zosol.zo.parallel import measure_peak_memory


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_one(hidden, dev, n_coords, chunk, variants):
    model = cnn1d_corrector(hidden=hidden).to(dev)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 32, generator=g).to(dev), torch.randn(8, 1, 32, generator=g).to(dev)

    def lof(forward, P):
        return ((forward(x).reshape(P, -1).double() - y.reshape(1, -1).double()) ** 2).mean(1)

    masks = subset_masks(model, n_coords)
    n = sum(int(m.sum()) for m in masks.values())
    out = {"d": n_params(model), "coords": n}
    grads = {}
    for name, kw in variants.items():
        cge_structured(model, lof, mu=1e-3, masks=subset_masks(model, min(64, n), 7), chunk_size=chunk, **kw)  # warm-up
        sync(dev)
        box = {}

        def run():
            t = time.perf_counter()
            box["est"] = cge_structured(model, lof, mu=1e-3, masks=masks, chunk_size=chunk, **kw)
            sync(dev)
            box["t"] = time.perf_counter() - t

        peak = measure_peak_memory(run, dev)
        out[name] = {"s": box["t"], "queries_per_s": (n + 1) / box["t"], "peak_bytes": peak}
        grads[name] = box["est"].flat().double().cpu()
    return out, grads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--coords", type=int, default=4096, help="coordinates per timed estimate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("CUDA not available: running the CPU part only")
    sizes = [(10, 10, 8), (32, 32, 24)] + ([] if a.quick else [(64, 64, 48), (128, 128, 96)])
    variants = {"reuse": {"reuse": True}, "no_reuse": {"reuse": False}, "vmap": {"engine": "vmap"}}
    res = {"devices": [str(d) for d in devices], "rows": []}
    t0 = time.perf_counter()
    for hidden in sizes:
        row = {"hidden": list(hidden)}
        gg = {}
        for dev in devices:
            coords = min(a.coords, 1024) if dev.type == "cpu" and hidden[0] >= 64 else a.coords
            chunk = 512 if dev.type == "cpu" else 4096
            vs = variants if dev.type == "cuda" or hidden[0] <= 32 else {"reuse": variants["reuse"]}
            r, g = bench_one(hidden, dev, coords, chunk, vs)
            row[dev.type] = r
            gg[dev.type] = g
        if "cuda" in row:
            row["gpu_over_cpu_reuse_qps"] = row["cuda"]["reuse"]["queries_per_s"] / row["cpu"]["reuse"]["queries_per_s"]
            if row["cpu"]["coords"] == row["cuda"]["coords"]:
                row["cpu_gpu_max_abs_grad_diff"] = float((gg["cpu"]["reuse"] - gg["cuda"]["reuse"]).abs().max())
        res["rows"].append(row)
        line = f"hidden={hidden} d={row['cpu']['d']}: "
        for dev in devices:
            r = row[dev.type]
            line += (
                " | " + dev.type + " " + ", ".join(f"{k} {r[k]['queries_per_s']:.0f} q/s" for k in variants if k in r)
            )
        if "gpu_over_cpu_reuse_qps" in row:
            line += f" | GPU/CPU (reuse) {row['gpu_over_cpu_reuse_qps']:.1f}x"
        print(line, flush=True)
    res["wall_s"] = time.perf_counter() - t0
    print(f"wall {res['wall_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
