"""DeepZero's wake-flow benchmark (its ZO-SOL table) at the ``paper`` preset, one command, on a CUDA machine:

    python experiments/karman2d_paper.py --device cuda --out results/karman2d_paper

What it runs: ``zosol.compare`` on the karman2d ``paper`` scenario (SOL / DeepZero sizes: PhiFlow
reference on 256x128 restricted to the 64x32 coarse grid, training Re 1.6e5 .. 5.12e6, test Re
2.4e5 .. 3.84e6, 1000 warm-up steps + 500 frames, 6 training / 5 test simulations) with the
``paper`` training preset as karman2d adjusts it (``Karman2DScenario.train_presets["paper"]``: CNN
corrector, window m = 4, batch 16, 100 epochs, sparse ZO-SOL at 90 % with ZO-GraSP layer ratios, as
DeepZero), every method the project has (SRC, NON, NOG-SOL, FO-SOL, ZO-SOL, and any added later).
The coarse solver is the direct step (``coarse="direct"``): on a GPU its pressure solve is one batched
product with the explicit inverse of the fixed pressure matrix.

Before training, every method is timed for ``--probe-steps`` optimizer steps on the real data and
device; the script prints the expected training time per method (and writes it to
``<out>/expected_time.json``), then runs the comparison (resumable: run the same command again).
``--estimate-only`` stops after the estimate.

Expected run time on one H200 (not measured here -- this project's machine has no GPU; estimated from
the operation counts): data generation ~1 h (PhiFlow reference on the CPU, 1500 steps of 256x128;
~0.9 h extrapolated on a 2-core CPU, see the README), ZO-SOL ~3 h (each optimizer step evaluates
~3,000 perturbed windows, ~2e5 coarse sample-steps of a few microseconds each, 187 steps per epoch),
the other methods minutes: about 4-5 h in all.  The printed estimate replaces this guess with
measured step times.

Any ``--set KEY=VALUE`` changes the scenario (e.g. ``--set frames=100``), ``--train KEY=VALUE`` a
training option for every method (e.g. ``--train epochs=20``); ``--preset tiny --train-preset tiny``
runs the same code paths in seconds on a CPU (tests/test_karman2d.py does).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from zosol.compare import compare
from zosol.config import METHODS, train_config
from zosol.datasets import generate, load_dataset
from zosol.training import train


def _value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _pairs(items: list[str] | None, flag: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{flag} expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = _value(value.strip())
    return out


def estimate(dataset, configs: dict, probe_steps: int) -> dict:
    """Seconds per optimizer step of every method (``probe_steps`` steps on the real data and device)
    and the expected training time (steps per epoch x epochs x seconds per step)."""
    out = {}
    windows_per_sim = dataset.frames
    for method, cfg in configs.items():
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            result = train(dataset, cfg, Path(tmp) / method, progress=False, stop_after_steps=probe_steps)
            per_step = (time.perf_counter() - t) / max(len(result.history["loss"]), 1)
        steps = (
            math.ceil(len(dataset.train) * (windows_per_sim - cfg.effective_window + 1) / cfg.batch_size) * cfg.epochs
        )
        out[method] = {"seconds_per_step": per_step, "steps": steps, "expected_seconds": per_step * steps}
        print(f"{method:<8} {per_step:8.3f} s/step x {steps} steps = {per_step * steps / 3600:.2f} h", flush=True)
    out["total_expected_hours"] = sum(v["expected_seconds"] for v in out.values()) / 3600
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--train-preset", default=None, help="default: the scenario preset")
    ap.add_argument("--out", default="results/karman2d_paper")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--workers", type=int, default=1, help="processes sharing ZO-SOL's perturbations")
    ap.add_argument("--probe-steps", type=int, default=2)
    ap.add_argument("--estimate-only", action="store_true")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="scenario config override")
    ap.add_argument("--train", action="append", metavar="KEY=VALUE", help="training option for every method")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scenario_overrides = _pairs(args.set, "--set") or None
    overrides = {"device": args.device, **_pairs(args.train, "--train")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = generate("karman2d", args.preset, out / "data", overrides=scenario_overrides)
    print(f"data: {path} ({time.perf_counter() - t:.0f} s)", flush=True)
    dataset = load_dataset(path, "karman2d")
    preset = args.train_preset or args.preset
    configs = {m: train_config(preset, "karman2d", method=m, **overrides) for m in args.methods}
    expected = estimate(dataset, configs, args.probe_steps)
    (out / "expected_time.json").write_text(json.dumps(expected, indent=1))
    if args.estimate_only:
        return {"expected": expected}
    results = compare(
        "karman2d",
        args.preset,
        out,
        methods=args.methods,
        data_dir=out / "data",
        train_preset=preset,
        overrides=overrides,
        scenario_overrides=scenario_overrides,
        workers=args.workers,
    )
    return {"expected": expected, "results": results}


if __name__ == "__main__":
    main()
