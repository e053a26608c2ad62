"""zosol's CGE vs DeepZero's own feature-reuse CGE worker on DeepZero's ResNet-20, side by side.

DeepZero (Chen et al., ICLR 2024) is NOT part of zosol: check its repository out anywhere and pass
the path (nothing is copied from it; its modules are imported from that checkout at run time):

    git clone https://github.com/OPTML-Group/DeepZero /tmp/deepzero
    python experiments/engine_deepzero.py --deepzero /tmp/deepzero --json experiments/out/engine_deepzero.json

Problem: DeepZero's ``resnet20`` (269,722 parameters, BatchNorm in train mode as DeepZero trains it),
batch 8 of CIFAR-sized inputs (3 x 32 x 32), cross-entropy, float32, one thread, forward CGE
(mu = 5e-3).  All methods run on the same random subset of coordinates and are extrapolated to the
full gradient (time x d / coordinates); the subset is 8 evenly spaced runs of consecutive
coordinates (:func:`block_masks`), so layers are sampled in proportion to their size:

* deepzero_worker  -- ``models.distributed_model.DistributedCGEModel.calculate_grads`` (feature reuse
                      at DeepZero's block granularity, one perturbed tail forward per coordinate);
* zosol            -- ``zosol.zo.cge_structured`` at its default chunk (``"auto"``, memory budget);
* floor            -- feature-reuse floor: one unperturbed forward of the network from the perturbed
                      layer on (batch B) per coordinate, timed per parameter tensor on torch.fx's graph;
* zosol SOL        -- the SOL-style corrector with a custom forward vs its ``nn.Sequential`` rewrite
                      (same parameters; ``zosol.zo.bench_nets.SolCorrector``), batch 8 at 64 x 32.

Peak memory: each estimator once more in a fresh subprocess (peak RSS of that process, VmHWM, and
its increase over the RSS just before the estimate).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch
import torch.fx as fx
import torch.nn.functional as F

from zosol.bench.engine import subset_masks
from zosol.zo import cge_structured, n_params
from zosol.zo.bench_nets import SolCorrector
from zosol.zo.checks import cosine


class _Ref:
    """Stand-in for ``torch.distributed.rpc.RRef`` (``to_here()``): the worker runs in this process."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def to_here(self) -> torch.Tensor:
        return self.t


def _problem(deepzero: str, seed: int = 0, B: int = 8):
    sys.path.insert(0, deepzero)
    from models.resnet_s import param_name_to_module_id_rn20, resnet20

    torch.manual_seed(seed)
    model = resnet20().train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    return model, x, y, param_name_to_module_id_rn20


def block_masks(model, coords: int, blocks: int = 8) -> dict:
    """``blocks`` evenly spaced runs of consecutive coordinates (``coords`` in all) over the flat
    parameter vector: layers are hit in proportion to their size, and a run is what one chunk of a
    full-gradient estimate holds (consecutive coordinates of one layer)."""
    params = dict(model.named_parameters())
    d = sum(p.numel() for p in params.values())
    size = max(1, coords // blocks)
    flat = torch.zeros(d, dtype=torch.bool)
    for j in range(blocks):
        start = min(d - size, int((j + 0.5) * d / blocks) - size // 2)
        flat[start : start + size] = True
    out, o = {}, 0
    for k, p in params.items():
        out[k] = flat[o : o + p.numel()].reshape(p.shape)
        o += p.numel()
    return out


def _worker(deepzero: str, model, masks: dict, module_id):
    """DeepZero's worker holding a copy of ``model``, instructed to perturb the coordinates in ``masks``."""
    sys.path.insert(0, deepzero)
    from models.distributed_model import DistributedCGEModel

    w = DistributedCGEModel("cpu", lambda: copy.deepcopy(model), F.cross_entropy, module_id, None, False, True)
    names = [k for k, _ in model.named_parameters()]
    rows = [(i, int(j)) for i, k in enumerate(names) for j in torch.nonzero(masks[k].reshape(-1)).reshape(-1)]
    w.instruction = torch.tensor(rows, dtype=torch.long)
    w.set_param_names(names)
    return w


def _lof(x, y):
    def lof(forward, P):
        out = forward(x)
        return F.cross_entropy(out.double(), y.repeat(P), reduction="none").reshape(P, -1).mean(1)

    return lof


def _floor_seconds(model, x, masks: dict, reps: int) -> float:
    """Sum over parameter tensors of (its coordinates) x (one tail forward at batch B from its layer)."""
    gm = fx.symbolic_trace(copy.deepcopy(model), concrete_args={"starting_id": 0, "return_interval": False})
    nodes = list(gm.graph.nodes)
    interp = fx.Interpreter(gm)
    env: dict = {}
    interp.env = env
    with torch.no_grad():
        for node in nodes[:-1]:
            if node.op == "placeholder":
                env[node] = node.args[0] if node.args else x  # args: a traced-in default
            else:
                env[node] = interp.run_node(node)
    owner = {}
    for i, node in enumerate(nodes):
        if node.op == "call_module":
            for kind, _ in gm.get_submodule(node.target).named_parameters(recurse=False):
                owner[f"{node.target}.{kind}"] = i
    total = 0.0
    for name, m in masks.items():
        k = int(m.sum())
        if not k:
            continue
        start = owner[name]

        def tail():
            local = {n: env[n] for n in nodes[:start]}
            interp.env = local
            for node in nodes[start:]:
                if node.op == "output":
                    break
                local[node] = interp.run_node(node)

        with torch.no_grad():
            best = min(_time(tail) for _ in range(reps))
        total += best * k
    return total


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _memory_child(deepzero: str, method: str, coords: int, mu: float) -> dict:
    """Run one estimator in this (fresh) process; peak RSS in bytes."""
    torch.set_num_threads(1)
    model, x, y, module_id = _problem(deepzero)
    masks = block_masks(model, coords)
    warm = subset_masks(model, 16, seed=2)
    if method == "deepzero_worker":
        w = _worker(deepzero, model, warm, module_id)
        w.calculate_grads(_Ref(x), _Ref(y), mu)
        w = _worker(deepzero, model, masks, module_id)
        run = lambda: w.calculate_grads(_Ref(x), _Ref(y), mu)  # noqa: E731
    else:
        cge_structured(model, _lof(x, y), mu=mu, masks=warm)
        box = {}
        run = lambda: box.setdefault("est", cge_structured(model, _lof(x, y), mu=mu, masks=masks))  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS") * 1024
    run()
    peak = _status_kb("VmHWM") * 1024
    out = {
        "method": method,
        "coords": coords,
        "peak_rss_bytes": peak,
        "rss_before_bytes": before,
        "peak_increase_bytes": peak - before,
    }
    if method == "zosol":
        out["chunk_size"] = box["est"].info["chunk_size"]
    return out


def _memory(deepzero: str, method: str, coords: int, mu: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--deepzero",
        deepzero,
        "--memory-child",
        method,
        "--coords",
        str(coords),
        "--mu",
        str(mu),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def _sol(coords: int, reps: int, mu: float, B: int = 8) -> dict:
    """SOL-style corrector: custom forward vs its nn.Sequential rewrite, same parameters and coordinates."""
    net = SolCorrector()
    seq = net.sequential()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 2, 64, 32, generator=g)
    t = 0.1 * torch.randn(B, 2, 64, 32, generator=g)

    def lof(forward, P):
        return ((forward(x).double().reshape(P, -1) - t.double().reshape(1, -1)) ** 2).mean(1)

    masks = block_masks(net, coords)
    smasks = {k2: masks[k1] for (k1, _), (k2, _) in zip(net.named_parameters(), seq.named_parameters())}
    cge_structured(net, lof, mu=mu, masks=subset_masks(net, 16, seed=4))
    res = {"d": n_params(net), "coords": int(sum(int(m.sum()) for m in masks.values())), "B": B, "grid": [64, 32]}
    tc, ts = [], []
    for _ in range(reps):
        tc.append(_time(lambda: res.setdefault("a", cge_structured(net, lof, mu=mu, masks=masks))))
        ts.append(_time(lambda: res.setdefault("b", cge_structured(seq, lof, mu=mu, masks=smasks))))
    a, b = res.pop("a"), res.pop("b")
    res.update(
        {
            "custom_forward_s_per_grad": min(tc) * res["d"] / res["coords"],
            "sequential_s_per_grad": min(ts) * res["d"] / res["coords"],
            "engine_custom": a.info["engine"],
            "engine_sequential": b.info["engine"],
            "max_abs_diff": float((a.flat() - b.flat()).abs().max()),
        }
    )
    res["custom_vs_sequential_time_ratio"] = res["custom_forward_s_per_grad"] / res["sequential_s_per_grad"]
    return res


def run(deepzero: str, coords: int, reps: int, mu: float, mem_coords: int, sol_coords: int) -> dict:
    """All measurements; returns the metrics dict."""
    torch.set_num_threads(1)
    model, x, y, module_id = _problem(deepzero)
    d = n_params(model)
    masks = block_masks(model, coords)
    K = int(sum(int(m.sum()) for m in masks.values()))
    worker = _worker(deepzero, model, masks, module_id)
    lof = _lof(x, y)
    warm = subset_masks(model, 32, seed=2)
    _worker(deepzero, model, warm, module_id).calculate_grads(_Ref(x), _Ref(y), mu)
    cge_structured(model, lof, mu=mu, masks=warm)
    t_dz, t_zo, box = [], [], {}
    for _ in range(reps):  # alternate, keep the best of each (the machine is shared)
        t_dz.append(_time(lambda: box.__setitem__("dz", worker.calculate_grads(_Ref(x), _Ref(y), mu))))
        t_zo.append(_time(lambda: box.__setitem__("zo", cge_structured(model, lof, mu=mu, masks=masks))))
    floor = _floor_seconds(model, x, masks, reps)
    est, dz = box["zo"], box["dz"]
    names = [k for k, _ in model.named_parameters()]
    zo_vals = torch.stack([est[names[int(r[0])]].reshape(-1)[int(r[1])] for r in dz]).double()
    dz_vals = dz[:, 2].double()
    scale = d / K
    res = {
        "model": "DeepZero resnet20 (train-mode BatchNorm)",
        "d": d,
        "coords_timed": K,
        "batch": x.shape[0],
        "input": list(x.shape[1:]),
        "mu": mu,
        "scheme": "forward",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "zosol_engine": est.info["engine"],
        "zosol_chunk_size": est.info["chunk_size"],
        "deepzero_worker_s_per_grad": min(t_dz) * scale,
        "zosol_s_per_grad": min(t_zo) * scale,
        "floor_s_per_grad": floor * scale,
        "cosine_zosol_vs_deepzero": cosine(zo_vals, dz_vals),
    }
    res["speedup_vs_deepzero_worker"] = res["deepzero_worker_s_per_grad"] / res["zosol_s_per_grad"]
    res["zosol_vs_floor"] = res["zosol_s_per_grad"] / res["floor_s_per_grad"]
    res["deepzero_worker_vs_floor"] = res["deepzero_worker_s_per_grad"] / res["floor_s_per_grad"]
    res["memory"] = {m: _memory(deepzero, m, mem_coords, mu) for m in ("deepzero_worker", "zosol")}
    res["peak_rss_ratio_zosol_vs_deepzero"] = (
        res["memory"]["zosol"]["peak_rss_bytes"] / res["memory"]["deepzero_worker"]["peak_rss_bytes"]
    )
    res["sol_corrector"] = _sol(sol_coords, reps, mu)
    return res


def _print(res: dict) -> None:
    print(
        f"ResNet-20 (DeepZero's), d={res['d']}, batch {res['batch']}, {res['coords_timed']} coordinates timed, "
        f"extrapolated to the full gradient; one thread; zosol engine {res['zosol_engine']}, "
        f"chunk {res['zosol_chunk_size']}"
    )
    for k in ("deepzero_worker_s_per_grad", "zosol_s_per_grad", "floor_s_per_grad"):
        print(f"  {k:32s} {res[k]:9.1f} s")
    for k in (
        "speedup_vs_deepzero_worker",
        "zosol_vs_floor",
        "deepzero_worker_vs_floor",
        "cosine_zosol_vs_deepzero",
        "peak_rss_ratio_zosol_vs_deepzero",
    ):
        print(f"  {k:32s} {res[k]:9.3f}")
    for m, r in res["memory"].items():
        print(
            f"  peak RSS {m:18s} {r['peak_rss_bytes'] / 2**20:8.0f} MiB (+{r['peak_increase_bytes'] / 2**20:.0f} MiB "
            f"during the estimate, {r['coords']} coordinates)"
        )
    s = res["sol_corrector"]
    print(
        f"SOL corrector d={s['d']}, batch {s['B']} on {s['grid']}: "
        f"custom forward {s['custom_forward_s_per_grad']:.1f} s, "
        f"Sequential {s['sequential_s_per_grad']:.1f} s per gradient "
        f"(ratio {s['custom_vs_sequential_time_ratio']:.3f}, "
        f"engines {s['engine_custom']}/{s['engine_sequential']}, max |diff| {s['max_abs_diff']:.1e})"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepzero", required=True, help="path of a DeepZero checkout (github.com/OPTML-Group/DeepZero)")
    ap.add_argument("--coords", type=int, default=1000, help="coordinates timed (random subset, all methods)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--mu", type=float, default=5e-3)
    ap.add_argument("--mem-coords", type=int, default=1024, help="coordinates of the peak-memory runs")
    ap.add_argument("--sol-coords", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.memory_child:
        print(json.dumps(_memory_child(a.deepzero, a.memory_child, a.coords, a.mu)))
        return
    res = run(a.deepzero, a.coords, a.reps, a.mu, a.mem_coords, a.sol_coords)
    _print(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
