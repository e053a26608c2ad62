"""Kernel time of ZO-SOL: a burgers1d default ZO-SOL epoch with and without ``keep_freed_memory``.

    python experiments/zo_page_faults.py [--rounds 2] [--steps 0] [--json experiments/out/zo_page_faults.json]

Each epoch runs in its own process (fresh allocator state), rounds alternate off / on. "off" is the
allocator as before (``zosol.zo.parallel.keep_freed_memory`` replaced by a no-op); "on" is the
default. Recorded per run: wall time, user and system CPU time and minor page faults of ``train``
alone (``resource.getrusage``), peak RSS, and a digest of the trained weights (must be equal).
``--steps N`` stops after N optimizer steps (0: the whole epoch, 61 steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import hashlib, json, resource, sys, time
import torch
torch.set_num_threads(1)
import zosol.zo.parallel as zp
if sys.argv[1] == "off":
    zp.keep_freed_memory = lambda *a, **k: False
from zosol.config import train_config
from zosol.datasets import generate, load_dataset
from zosol.solvers import get_scenario
from zosol.training import train

sc = get_scenario("burgers1d", "default")
ds = load_dataset(generate(sc, out=sys.argv[2], progress=False))
cfg = train_config("default", sc, method="zo-sol", epochs=1, grad_checks=0)
steps = int(sys.argv[3]) or None
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
res = train(ds, cfg, progress=False, stop_after_steps=steps)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
w = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()]).numpy().tobytes()
print(json.dumps({"wall_s": t1 - t0, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                  "minor_faults": r1.ru_minflt - r0.ru_minflt, "max_rss_mb": r1.ru_maxrss / 1024,
                  "weights_sha256": hashlib.sha256(w).hexdigest()[:16]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "experiments" / "out" / "zo_page_faults.json"))
    args = ap.parse_args()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as data:
        for r in range(args.rounds):
            for mode in ("off", "on"):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, mode, data, str(args.steps)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                run = {"mode": mode, "round": r, **json.loads(out.stdout.strip().splitlines()[-1])}
                runs.append(run)
                print(json.dumps(run))
    digests = {r["weights_sha256"] for r in runs}
    summary = {"runs": runs, "identical_weights": len(digests) == 1, "load": Path("/proc/loadavg").read_text()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print("identical weights:", summary["identical_weights"])


if __name__ == "__main__":
    main()
