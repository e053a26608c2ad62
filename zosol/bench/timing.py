"""The one timing helper of every benchmark: functions timed in turns, after untimed warm-up calls.

Round-robin timing (call 1 of every function, then call 2 of every function, ...) makes a
changing machine load hit every timed function alike, so their ratios hold on a busy machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Timing", "time_calls", "time_call"]


@dataclass
class Timing:
    """The seconds of every timed call of one function and what its last call returned."""

    seconds: list[float]
    output: Any = None

    @property
    def median(self) -> float:
        """The median (the upper one of an even count) of the timed calls."""
        return sorted(self.seconds)[len(self.seconds) // 2]

    @property
    def best(self) -> float:
        """The fastest timed call."""
        return min(self.seconds)


def time_calls(
    fns: Sequence[Callable[[], Any]],
    repeats: int = 3,
    *,
    warmup: int = 1,
    min_seconds: float = 0.0,
    max_repeats: int = 41,
) -> list[Timing]:
    """Time every function ``repeats`` times in turns, after ``warmup`` untimed calls of each (JIT
    traces, allocator and primitive caches).  With ``min_seconds`` > 0 (and a warm-up) the number
    of rounds grows, up to ``max_repeats``, until the rounds would take about ``min_seconds``:
    cheap calls on a loaded machine need many samples for a stable median."""
    t = time.perf_counter()
    for _ in range(warmup):
        for fn in fns:
            fn()
    per_round = (time.perf_counter() - t) / max(warmup, 1)
    if warmup and min_seconds > 0:
        repeats = max(repeats, min(max_repeats, math.ceil(min_seconds / max(per_round, 1e-9))))
    timings = [Timing([]) for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, timing in zip(fns, timings):
            t = time.perf_counter()
            timing.output = fn()
            timing.seconds.append(time.perf_counter() - t)
    return timings


def time_call(fn: Callable[[], Any], repeats: int = 3, *, warmup: int = 1, min_seconds: float = 0.0) -> Timing:
    """:func:`time_calls` of one function."""
    return time_calls([fn], repeats, warmup=warmup, min_seconds=min_seconds)[0]
