"""What the two zeroth-order methods (ZO-SOL, ZO-JAC-SOL) share: the finite-difference options
(one group: ``--zo-mu``, ``--zo-scheme``), the in-loop gradient check's option, the cost line
printed at the start of training and their results-table entry."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from ..options import option
from ..zo.checks import SCHEMES

__all__ = ["FiniteDifferenceOptions", "GradientCheckOptions", "cost_model", "zo_entry", "ZO_HISTORY"]

#: finite-difference schemes: the ZO engine's own list
ZoScheme = Literal[SCHEMES]  # type: ignore[valid-type]


@dataclasses.dataclass
class FiniteDifferenceOptions:
    """The finite differences of both ZO methods (config keys ``zo_scheme``, ``zo_mu``)."""

    prefix: ClassVar[str] = "zo_"

    scheme: ZoScheme = option("central", "ZO-SOL / ZO-JAC-SOL finite-difference scheme")
    mu: float = option(1e-3, "ZO-SOL / ZO-JAC-SOL finite-difference step", gt=0)


@dataclasses.dataclass
class GradientCheckOptions:
    """How often a method's estimated gradient is compared with autograd during training."""

    prefix: ClassVar[str] = ""

    grad_checks: int = option(
        3,
        "ZO-SOL / ZO-JAC-SOL: times the ZO gradient is compared with autograd (FO-SOL) on the same window batch",
        ge=0,
        cap=10_000,
    )


#: history keys of both ZO methods, with their initial values: the gradient checks' cosines,
#: black-box evaluations spent on estimates, sparse ZO-SOL's layer-wise pruning ratios
ZO_HISTORY: dict[str, Any] = {"grad_cosine_vs_fo": [], "zo_queries": 0, "lprs": None}


def zo_entry(h: dict[str, Any]) -> dict[str, Any]:
    """What a ZO method's results-table entry adds: gradient checks, queries, ratios, cost line."""
    return dict(
        grad_cosine_vs_fo=h["grad_cosine_vs_fo"],
        grad_cosine_vs_fd=h.get("grad_cosine_vs_fd", []),
        zo_queries=h["zo_queries"],
        lprs=h["lprs"],
        cost_model=h.get("cost_model"),
    )


def cost_model(d: int, unmasked: int, scheme: str, jac_probes: int, jac_note: str) -> str:
    """The cost line printed at the start of ZO training: black-box evaluations per sample-step
    (one window step of one sample) of ZO-SOL (one perturbed window per estimated coordinate:
    2 x unmasked coordinates, central; unmasked + 1, forward) and of ZO-JAC-SOL (the step itself
    plus the Jacobian's probes, for every step after a window's first)."""
    zo_sol = 2 * unmasked if scheme == "central" else unmasked + 1
    which = "ZO-JAC-SOL" if 1 + jac_probes < zo_sol else "ZO-SOL"
    masked = "" if unmasked == d else f", {unmasked} unmasked"
    return (
        f"cost model, black-box evaluations per sample-step: ZO-SOL {zo_sol} ({scheme}, d = {d} parameters"
        f"{masked}); ZO-JAC-SOL {1 + jac_probes} (1 + {jac_probes} Jacobian probes, {jac_note}); "
        f"{which} is cheaper"
    )
