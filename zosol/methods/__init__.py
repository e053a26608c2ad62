"""Training methods, one module each (``non``, ``nog_sol``, ``fo_sol``, ``zo_sol``, ``zo_jac_sol``),
and their registry (:mod:`zosol.methods.base`).

A method module declares everything about its method in one :class:`Method` passed to
:func:`register`: name, display name, gradient step (a GradientSource subclass, which says the
solver view it needs), option groups (the shared finite-difference group of both ZO methods is in
:mod:`zosol.methods.shared`), history keys, memory estimate and results-table entry.  A new built-in
method is its module plus its line in :data:`BUILTIN`; a plugin module (``--plugin MODULE``)
registers its own method the same way.
"""

from .base import (
    BASELINE,
    BUILTIN,
    MemorySizes,
    Method,
    display_name,
    get,
    group_specs,
    names,
    option_defaults,
    option_groups,
    register,
    registered_methods,
    reserve,
)

__all__ = [
    "BASELINE",
    "BUILTIN",
    "MemorySizes",
    "Method",
    "display_name",
    "get",
    "group_specs",
    "names",
    "option_defaults",
    "option_groups",
    "register",
    "registered_methods",
    "reserve",
]
