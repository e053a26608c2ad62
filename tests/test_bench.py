"""The benchmarks' timing helper, and the engine bench's independence from the rest of zosol."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from zosol.bench.solvers import median_step_seconds
from zosol.bench.timing import Timing, time_call, time_calls

ROOT = Path(__file__).resolve().parents[1]


def test_functions_are_timed_in_turns_after_their_warmup():
    calls: list[str] = []
    a = lambda: calls.append("a") or "A"  # noqa: E731
    b = lambda: calls.append("b") or "B"  # noqa: E731
    ta, tb = time_calls([a, b], repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert len(ta.seconds) == len(tb.seconds) == 3 and (ta.output, tb.output) == ("A", "B")


def test_min_seconds_adds_rounds_up_to_the_cap():
    calls = []
    t = time_call(lambda: calls.append(1), repeats=2, min_seconds=10.0)
    assert len(t.seconds) == 41 and len(calls) == 42  # 1 warm-up + 41 rounds of a near-free call
    assert len(time_call(lambda: None, repeats=2, warmup=0, min_seconds=10.0).seconds) == 2  # no warm-up: no growth


def test_median_and_best():
    t = Timing([0.3, 0.1, 0.4, 0.2])
    assert t.median == 0.3 and t.best == 0.1  # the upper median of an even count
    step = lambda x, p: x * 2  # noqa: E731
    assert median_step_seconds(step, torch.ones(4), None, repeats=3) >= 0.0


def test_the_engine_bench_imports_nothing_of_zosol_but_the_engine():
    code = "import sys, zosol.bench.engine\nprint(sorted(m for m in sys.modules if m.startswith('zosol')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mods = eval(out.stdout)
    outside = [m for m in mods if m not in ("zosol", "zosol.bench") and not m.startswith(("zosol.zo", "zosol.bench."))]
    assert not outside, outside
