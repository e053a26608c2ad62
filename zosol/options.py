"""Declared options: a config dataclass states each field's type, help text and bounds once.

    @dataclasses.dataclass
    class MyConfig:
        lr: float = option(1e-3, "Adam learning rate", gt=0)
        loss: Literal["mse", "l1"] = option("mse", "pointwise loss")
        chunk: int | None = option(128, "perturbations per batch (None: all)", ge=1, cap=10**7)

The field's annotation is its type: ``int``, ``float`` (finite; an int is accepted), ``bool``
(only ``True``/``False``), ``str``, a ``Literal`` of allowed values, ``X | None``, or a container
such as ``tuple``.  Bounds: ``ge``/``gt``/``le``/``lt`` (the valid range), ``odd``, ``cap`` (a
sanity maximum for sizes, far above any useful value).  Everything else is derived from these
declarations: :func:`check_fields` (what ``validate()`` runs, one message naming the field and
what it accepts), :func:`describe` (help text with the accepted values) and :func:`parse_text`
(a value given as text on the command line; booleans are only true or false).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from .errors import UsageError

__all__ = ["option", "Spec", "specs", "field_defaults", "check_fields", "describe", "parse_text", "parse_bool"]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    odd: bool = False,
    cap: int | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text and bounds (see the module docstring)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "odd": odd, "cap": cap}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"zosol": meta})


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a field declares: ``kind`` (int, float, bool, str, a container type, or "choice"),
    ``choices`` (of a Literal), ``nullable`` (None allowed), ``help`` and the bounds."""

    name: str
    kind: Any
    choices: tuple = ()
    nullable: bool = False
    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    odd: bool = False
    cap: int | None = None


def _split_type(tp: Any) -> tuple[Any, tuple, bool]:
    """(kind, choices, nullable) of an annotation."""
    nullable = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported option type {tp!r}: one type or one type | None")
        tp = args[0]
    if typing.get_origin(tp) is Literal:
        return "choice", typing.get_args(tp), nullable
    return typing.get_origin(tp) or tp, (), nullable


_SPECS: dict[type, dict[str, Spec]] = {}


def specs(cls: type) -> dict[str, Spec]:
    """Field name -> :class:`Spec` of a dataclass (fields declared without :func:`option` get
    their type and no bounds), or of a class that composes its options (an ``option_specs()``
    classmethod, e.g. TrainConfig)."""
    composed = getattr(cls, "option_specs", None)
    if composed is not None:
        return composed()
    if cls not in _SPECS:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            kind, choices, nullable = _split_type(hints[f.name])
            out[f.name] = Spec(f.name, kind, choices, nullable, **f.metadata.get("zosol", {}))
        _SPECS[cls] = out
    return _SPECS[cls]


def field_defaults(cls: type) -> dict[str, Any]:
    """Field name -> default value of a dataclass whose fields all have defaults (a fresh value
    from ``default_factory`` where one is declared)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            raise TypeError(f"option {cls.__name__}.{f.name} has no default")
    return out


def _num(v: float) -> str:
    """2**63 for large powers of two, else the number as written."""
    if isinstance(v, int) and v >= 2**20 and v & (v - 1) == 0:
        return f"2**{v.bit_length() - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range(s: Spec) -> str:
    """The valid range in words: "positive", ">= 1", "in [0, 1)", "" (unbounded)."""
    low = (f"[{_num(s.ge)}" if s.ge is not None else f"({_num(s.gt)}") if s.ge is not None or s.gt is not None else None
    high = (
        (f"{_num(s.le)}]" if s.le is not None else f"{_num(s.lt)})") if s.le is not None or s.lt is not None else None
    )
    if low and high:
        return f"in {low}, {high}"
    if low:
        return "positive" if s.gt == 0 else (f">= {_num(s.ge)}" if s.ge is not None else f"> {_num(s.gt)}")
    if high:
        return f"<= {_num(s.le)}" if s.le is not None else f"< {_num(s.lt)}"
    return ""


def _in_range(s: Spec, v: float) -> bool:
    return (
        (s.ge is None or v >= s.ge)
        and (s.gt is None or v > s.gt)
        and (s.le is None or v <= s.le)
        and (s.lt is None or v < s.lt)
    )


def _type_error(s: Spec, v: Any) -> str | None:
    """What is wrong with the type of ``v`` (None: nothing)."""
    if v is None:
        return None if s.nullable else "must not be None"
    if s.kind == "choice":
        return None  # the value check names the choices
    is_int = isinstance(v, int) and not isinstance(v, bool)
    ok = {int: is_int, float: is_int or isinstance(v, float), bool: isinstance(v, bool), str: isinstance(v, str)}.get(
        s.kind
    )
    if ok if ok is not None else isinstance(v, s.kind):
        return None
    noun = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        s.kind, f"a {getattr(s.kind, '__name__', s.kind)}"
    )
    return f"must be {noun}{' or null' if s.nullable else ''}"


def _value_error(s: Spec, v: Any, label: str, nouns: bool) -> str | None:
    """The message for a value of the right type that the bounds refuse (None: accepted)."""
    if s.kind == "choice":
        return None if v in s.choices else f"unknown {s.name} {v!r}; choose one of {list(s.choices)}"
    if v is None or s.kind not in (int, float):
        return None
    if not math.isfinite(v) and not _range(s):
        return f"{label} must be a finite number, got {v!r}"
    if not (math.isfinite(v) and _in_range(s, v)):
        noun = "an integer " if nouns and s.kind is int and _range(s) != "positive" else ""
        return f"{label} must be {noun}{_range(s)}{' or null' if s.nullable else ''}, got {v!r}"
    if s.cap is not None and v > s.cap:
        return f"{s.name} {v} is larger than the maximum {_num(s.cap)}; choose a smaller {s.name}"
    if s.odd and v % 2 != 1:
        return f"{label} must be odd, got {v!r}"
    return None


def check_fields(obj: Any, label: str = "{name}", nouns: bool = True) -> None:
    """Raise ValueError for the first field of dataclass ``obj`` that breaks its declaration.

    ``label``: how messages name a field (``"{name}"``, ``"config field '{name}'"``);
    ``nouns``: say "an integer >= 1" rather than ">= 1"."""
    for name, s in specs(type(obj)).items():
        v = getattr(obj, name)
        where = label.format(name=name)
        bad = _type_error(s, v)
        if bad is not None:
            raise UsageError(f"{where} {bad}, got {v!r}")
        msg = _value_error(s, v, where, nouns)
        if msg is not None:
            raise UsageError(msg)


def describe(s: Spec) -> str:
    """Help text: the declared help plus what the field accepts (the help says what None means)."""
    if s.kind == "choice":
        accepts = "one of " + ", ".join(map(str, s.choices))
    else:
        accepts = ", ".join(
            p for p in (_range(s), "odd" if s.odd else "", f"at most {_num(s.cap)}" if s.cap is not None else "") if p
        )
        if s.kind is bool:
            accepts = "true or false"
    return f"{s.help} ({accepts})" if accepts else s.help


def parse_bool(text: str) -> bool:
    """``true`` or ``false`` (any case); anything else (``no``, ``1``, ...) is a ValueError."""
    t = text.strip().lower()
    if t in ("true", "false"):
        return t == "true"
    raise UsageError(f"'{text}' is not a boolean; use true or false")


def parse_text(s: Spec, text: str) -> Any:
    """A value of field ``s`` given as text (a command-line option); ValueError if it is not one."""
    if s.nullable and text.strip().lower() in ("none", "null"):
        return None
    if s.kind == "choice":
        return text
    parse: Callable[[str], Any] = {bool: parse_bool, int: int, float: float, str: str}.get(s.kind, str)
    try:
        return parse(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(s.kind, "a value")
        raise UsageError(f"{s.name} must be {kind}, got '{text}'") from None
