"""Up-front size checks: what generating (or loading) a dataset costs, refused before allocating.

The estimate comes from the scenario config alone (``Scenario.state_shapes`` and
``Scenario.reference_substeps``), never from building solvers, so that an absurd config (say
``n_ref=2**26`` or ``frames=10**9``) is refused in milliseconds with the estimate in the message
instead of running for minutes into an out-of-memory kill.
"""
from __future__ import annotations

from ..errors import UsageError

import dataclasses
import math
import sys

from ..runtime.memory import format_bytes, machine_memory_bytes
from ..solvers.base import Scenario

__all__ = ["GenerationEstimate", "estimate_generation", "check_generation_budget", "CELL_UPDATES_PER_SECOND",
           "MAX_GENERATE_SECONDS", "STEP_TEMPORARIES", "set_time_limit", "time_limit_seconds", "check_time",
           "duration"]

#: reference-grid cell-updates per second assumed by the time estimate: optimistic on purpose (30x
#: to 100x what one CPU core did here: 3.5e6 burgers1d, 1.2e6 burgers2d), so only configs that
#: cannot finish are refused
CELL_UPDATES_PER_SECOND = 1e8
#: refuse jobs (generation, training) whose optimistic estimate exceeds this, unless the user
#: raises the bound explicitly (``--max-hours``, :func:`set_time_limit`)
MAX_GENERATE_SECONDS = 24 * 3600.0
#: print the estimate before starting a job expected to take at least this long
ANNOUNCE_SECONDS = 300.0
_time_limit: list[float] = [MAX_GENERATE_SECONDS]


def set_time_limit(hours: float | None) -> None:
    """Bound the estimated time of the jobs this process starts (None: the default, 24 h)."""
    if hours is not None and not (isinstance(hours, (int, float)) and hours > 0 and math.isfinite(hours)):
        raise UsageError(f"--max-hours must be a positive number of hours, got {hours!r}")
    _time_limit[0] = MAX_GENERATE_SECONDS if hours is None else float(hours) * 3600.0


def time_limit_seconds() -> float:
    return _time_limit[0]


def check_time(what: str, seconds: float, fix: str, announce: bool = True) -> None:
    """Print the (optimistic) estimate of a long job before it starts; ValueError beyond the limit."""
    limit = time_limit_seconds()
    if seconds > limit:
        raise UsageError(f"{what} would take at least {duration(seconds)} (optimistic estimate; limit "
                         f"{duration(limit)}); {fix}, or pass --max-hours {math.ceil(seconds / 3600)} to run it anyway")
    if announce and seconds >= ANNOUNCE_SECONDS:
        print(f"zosol: {what}: estimated at least {duration(seconds)} (optimistic; --max-hours bounds it)",
              file=sys.stderr)
#: reference-state-sized float32 buffers alive during one batched reference step (stages, fluxes, rolls)
STEP_TEMPORARIES = 16


@dataclasses.dataclass
class GenerationEstimate:
    """Peak memory (bytes) and optimistic run time (seconds) of generating one dataset."""

    step_bytes: int      # one batched reference step with its temporaries
    stored_bytes: int    # every coarse trajectory held for the final file
    seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.step_bytes + self.stored_bytes


def estimate_generation(scenario: Scenario, batch: int) -> GenerationEstimate:
    """Memory and time of ``generate(scenario, batch=batch)`` from the config alone."""
    c = scenario.config
    shapes = scenario.state_shapes()
    ref_cells = math.prod(shapes["reference"])
    coarse_cells = math.prod(shapes["coarse"])
    sims = c.train_sims + c.test_sims
    step = STEP_TEMPORARIES * min(batch, sims) * ref_cells * 4
    stored = sims * (c.frames + 1) * coarse_cells * 4 + min(batch, sims) * (c.frames + 1) * coarse_cells * 4
    updates = sims * (c.warmup + c.frames) * (ref_cells // shapes["reference"][0]) * scenario.reference_substeps()
    return GenerationEstimate(step, stored, updates / CELL_UPDATES_PER_SECOND)


def duration(seconds: float) -> str:
    """``seconds`` in a readable unit (min, h, days, years)."""
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.3g} h"
    years = seconds / (365.25 * 86400)
    return f"{seconds / 86400:.3g} days" if years < 1 else f"{years:.3g} years"


def check_generation_budget(scenario: Scenario, batch: int, memory_bytes: int | None = None,
                            max_seconds: float | None = None, announce: bool = True) -> GenerationEstimate:
    """Raise ValueError (estimate and fix in the message) when generating ``scenario`` needs more
    memory than ``memory_bytes`` (default: this machine's) or more than ``max_seconds`` (default:
    :func:`time_limit_seconds`); print the time estimate of a long job (``announce``)."""
    est = estimate_generation(scenario, batch)
    memory = machine_memory_bytes() if memory_bytes is None else int(memory_bytes)
    c = scenario.config
    what = f"generating {scenario.name} (frames={c.frames}, warmup={c.warmup}, {c.train_sims}+{c.test_sims} sims, " \
           f"reference state {list(scenario.state_shapes()['reference'])})"
    if est.peak_bytes > memory:
        per_batch = min(batch, c.train_sims + c.test_sims)
        raise UsageError(f"{what} needs about {format_bytes(est.peak_bytes)} of memory "
                         f"({format_bytes(est.step_bytes)} per batch of {per_batch} reference states, "
                         f"{format_bytes(est.stored_bytes)} of trajectories), more than this machine's "
                         f"{format_bytes(memory)}; lower the grid size, frames, the number of simulations or --batch")
    fix = "lower warmup, frames, the grid size or the number of simulations"
    if max_seconds is not None and est.seconds > max_seconds:
        raise UsageError(f"{what} would take at least {duration(est.seconds)} (optimistic estimate at "
                         f"{CELL_UPDATES_PER_SECOND:.0e} cell-updates/s; limit {duration(max_seconds)}); {fix}")
    check_time(what, est.seconds, fix, announce)
    return est
