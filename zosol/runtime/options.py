"""``RunOptions``: how a run is carried out (processes, resumption, progress, checkpoint timing),
as opposed to ``TrainConfig``, which says what it computes.  Checked once, when made."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..errors import UsageError
from .workers import check_workers

__all__ = ["RunOptions", "Resume"]

#: False: start afresh; True: continue from the run directory's checkpoint (it must be there);
#: "auto": continue if a checkpoint is there, else start afresh (``compare``, ``train --resume``)
Resume = bool | Literal["auto"]


@dataclass(frozen=True)
class RunOptions:
    """The run controls of ``train()`` / ``compare()`` (the result does not depend on them).

    ``workers``: local processes that share a shardable method's perturbation chunks (identical
    result to one).  ``resume``: see :data:`Resume`.  ``progress``: show a progress bar.
    ``checkpoint_seconds``: besides every epoch, checkpoint at most this often (seconds).
    ``stop_after_steps``: stop (checkpointed) after this many optimizer steps in this call (tests
    of resumption).  ``bound_by_cores``: refuse more ``workers`` than this process's CPU cores
    (the CLI does; from Python up to :data:`~zosol.runtime.workers.MAX_WORKERS` are allowed).
    """

    workers: int = 1
    resume: Resume = False
    progress: bool = True
    checkpoint_seconds: float = 60.0
    stop_after_steps: int | None = None
    bound_by_cores: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            self._check(f.name, getattr(self, f.name))

    def _check(self, name: str, value: Any) -> None:
        """ValueError naming the field and the fix if ``value`` is not a valid ``name``."""
        if name == "workers":
            check_workers(value, self.bound_by_cores)
        elif name == "resume" and value not in (True, False, "auto"):
            raise UsageError(f"resume must be True, False or 'auto', got {value!r}")
        elif name == "checkpoint_seconds" and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0  # NaN too
        ):
            raise UsageError(f"checkpoint_seconds must be a number > 0, got {value!r}")
        elif name == "stop_after_steps" and not (
            value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        ):
            raise UsageError(f"stop_after_steps must be None or an integer >= 1, got {value!r}")

    def but(self, **changes: Any) -> RunOptions:
        """These options with the given fields changed (only those are checked); ``None`` values
        change nothing, so that a function's keyword defaults can be passed through."""
        changes = {k: v for k, v in changes.items() if v is not None and getattr(self, k) != v}
        if not changes:
            return self
        new = copy.copy(self)
        for name, value in changes.items():
            if name == "bound_by_cores":
                raise UsageError("bound_by_cores is set when the options are made")
            new._check(name, value)
            object.__setattr__(new, name, value)
        return new

    @classmethod
    def of(cls, options: RunOptions | None, **changes: Any) -> RunOptions:
        """``options`` (default: the defaults) with the non-None ``changes`` (see :meth:`but`)."""
        given = {k: v for k, v in changes.items() if v is not None}
        return cls(**given) if options is None else options.but(**given)
