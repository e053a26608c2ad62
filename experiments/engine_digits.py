"""Train a small CNN on scikit-learn's bundled digits (8x8, no download) with the zosol.zo engine.

Methods, at the same budget of function queries (loss evaluations of a perturbed network on
one mini-batch): CGE dense (forward differences, structured perturbed forward with feature
reuse), CGE sparse (ZO-GraSP layer-wise pruning ratios -> random gradient masks redrawn
every 5 epochs, DeepZero-style), RGE (q = 192 Gaussian directions); FO (autograd) is run for
the same number of optimizer steps as CGE dense (it uses no function queries).

    python experiments/engine_digits.py [--budget-steps 100] [--sparsity 0.9] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from zosol.zo import (
    MaskScheduler,
    batched_loss_from_module,
    cge_structured,
    mask_sparsity,
    n_params,
    rge,
    write_grads,
    zo_grasp_lprs,
)
from zosol.zo.bench_nets import cnn2d


def data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = Xtr.mean(), Xtr.std()
    t = lambda a: torch.tensor((a - mean) / std)  # noqa: E731
    return t(Xtr), torch.tensor(ytr), t(Xte), torch.tensor(yte)


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def batches(n: int, B: int, gen: torch.Generator):
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - B + 1, B):
            yield epoch, perm[s : s + B]
        epoch += 1


def train(method: str, steps_or_queries: int, args, Xtr, ytr, Xte, yte) -> dict:
    model = cnn2d(in_ch=1, hw=8, ch=4, n_out=10, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    d = n_params(model)
    params = dict(model.named_parameters())
    queries, steps, extra_q = 0, 0, 0
    sched = None
    t0 = time.perf_counter()
    if method == "cge_sparse":
        Xb, yb = Xtr[: args.batch], ytr[: args.batch]
        bl = batched_loss_from_module(model, lambda o: F.cross_entropy(o.double(), yb), Xb)
        lprs = zo_grasp_lprs(
            bl, params, args.sparsity, q=192, mu=5e-3, generator=torch.Generator().manual_seed(1), chunk_size=193
        )
        extra_q = 2 * 193  # ZO-GraSP queries count against the budget
        queries = extra_q
        sched = MaskScheduler(params, lprs, every=5, seed=args.seed)
    budget = steps_or_queries
    for epoch, idx in batches(len(Xtr), args.batch, gen):
        xb, yb = Xtr[idx], ytr[idx]
        if method == "fo":
            if steps >= budget:
                break
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
        else:

            def lof(forward, P, xb=xb, yb=yb):
                logp = F.log_softmax(forward(xb).double().reshape(P, len(yb), -1), -1)
                return -logp.gather(2, yb.view(1, -1, 1).expand(P, -1, 1)).squeeze(2).mean(1)

            if method == "rge":
                if queries + args.q + 1 > budget:
                    break
                bl = batched_loss_from_module(model, lambda o, yb=yb: F.cross_entropy(o.double(), yb), xb)
                est = rge(bl, params, q=args.q, mu=args.mu, generator=gen, chunk_size=args.q)
            else:
                masks = sched.masks(epoch) if sched is not None else None
                n_on = d if masks is None else sum(int(m.sum()) for m in masks.values())
                if queries + n_on + 1 > budget:
                    break
                est = cge_structured(model, lof, mu=args.mu, masks=masks, chunk_size=args.chunk)
            queries += est.queries
            write_grads(model, est)
        opt.step()
        steps += 1
    wall = time.perf_counter() - t0
    out = {
        "method": method,
        "steps": steps,
        "queries": queries if method != "fo" else 0,
        "grasp_queries": extra_q,
        "test_acc": accuracy(model, Xte, yte),
        "train_acc": accuracy(model, Xtr, ytr),
        "wall_s": wall,
        "d": d,
    }
    if sched is not None:
        out["grad_sparsity"] = mask_sparsity(sched.masks(0))
        out["lprs"] = {k: round(v, 3) for k, v in sched.lprs.items()}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-steps", type=int, default=100, help="CGE-dense steps defining the query budget")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--mu", type=float, default=5e-3)
    ap.add_argument("--q", type=int, default=192)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="fo,cge_dense,cge_sparse,rge")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    Xtr, ytr, Xte, yte = data(args.seed)
    d = n_params(cnn2d(in_ch=1, hw=8, ch=4, n_out=10))
    budget = args.budget_steps * (d + 1)
    print(
        f"digits: train {len(Xtr)}, test {len(Xte)}; CNN d={d}; query budget {budget} "
        f"(= {args.budget_steps} dense CGE steps); batch {args.batch}, Adam lr {args.lr}, mu {args.mu}"
    )
    rows = []
    for m in args.methods.split(","):
        r = train(m, args.budget_steps if m == "fo" else budget, args, Xtr, ytr, Xte, yte)
        rows.append(r)
        print(
            f"  {m:11s} steps {r['steps']:5d} queries {r['queries']:8d} test acc {r['test_acc']:.4f} "
            f"wall {r['wall_s']:.1f}s",
            flush=True,
        )
    print(f"\n{'method':12s} {'steps':>6s} {'queries':>9s} {'test acc':>9s} {'train acc':>9s} {'wall s':>8s}")
    for r in rows:
        print(
            f"{r['method']:12s} {r['steps']:6d} {r['queries']:9d} {r['test_acc']:9.4f} {r['train_acc']:9.4f} "
            f"{r['wall_s']:8.1f}"
        )
    for r in rows:
        if "lprs" in r:
            print(f"cge_sparse: gradient sparsity {r['grad_sparsity']:.3f}, ZO-GraSP LPRs {r['lprs']}")
    res = {"budget_queries": budget, "rows": rows, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
