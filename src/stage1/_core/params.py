"""Parameters declared once per part: name, type, default, range or choices, help.

Every pluggable part (head, calibrator, exit policy) lists its parameters as a ``Params`` table of
``Param`` entries. Everything else is derived from that table: the defaults (``defaults()``), the
validation of given values (``resolve``: unknown names, type, range, choices; a ``ConfigError``
naming the part, the parameter and what is valid), the CLI's option types / choices / help, and the
checks of a sweep's TOML search space (a space may only name parameters that exist, within range).

Stdlib only: the CLI reads these tables without importing numpy or torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping

from .errors import ConfigError

__all__ = ["Param", "Params", "TYPE_NAMES"]

#: how a type is written in messages and help.
TYPE_NAMES: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


class _Invalid(Exception):
    """Internal: a value does not fit (``resolve`` turns it into a ConfigError)."""


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Param:
    """One declared parameter of a part.

    ``type`` is the main type (bool, int, float, str, list, dict); ``also`` lists other accepted
    types (e.g. a grid given as a list or as an int); ``optional`` accepts None. Numbers must be
    finite and within ``low`` / ``high`` (open ends with ``low_open`` / ``high_open``); ``choices``
    (a tuple, or a callable giving the names of a registry) restricts the value. ``check`` is an
    extra rule: it returns the (possibly normalised) value or raises ``ValueError(what is valid)``.
    ``note`` is added to every error message about this parameter.
    """

    name: str
    type: type
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | Callable[[], Iterable[Any]] | None = None
    optional: bool = False
    also: tuple[type, ...] = ()
    check: Callable[[Any], Any] | None = None
    note: str = ""

    # -- description --------------------------------------------------------------------------
    def valid_choices(self) -> tuple[Any, ...] | None:
        """The allowed values (resolved now when they come from a registry), or None."""
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    @property
    def has_range(self) -> bool:
        """True when the value is bounded (low / high) or limited to choices."""
        return self.low is not None or self.high is not None or self.choices is not None

    def range_text(self) -> str:
        """The bounds as text: ``in (0, 1)``, ``>= 1``, ``one of a, b`` or ``""``."""
        choices = self.valid_choices()
        if choices is not None:
            return "one of " + ", ".join(map(str, choices))
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {_fmt(lo)}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {_fmt(hi)}"
        return ""

    def describe(self) -> str:
        """What a valid value is, e.g. ``float in (0, 1) or None``."""
        kinds = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in (self.type, *self.also))
        rng = self.range_text()
        text = f"{kinds} {rng}" if rng else kinds
        return text + (" or None" if self.optional else "")

    # -- validation ---------------------------------------------------------------------------
    def _convert(self, value: Any) -> Any:
        """``value`` as this parameter's type (CLI strings and JSON numbers accepted), or _Invalid."""
        for t in (self.type, *self.also):
            try:
                return _as_type(value, t)
            except _Invalid:
                continue
        raise _Invalid

    def _in_range(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return False
        return True

    def validate(self, value: Any, owner: str) -> Any:
        """The value converted and checked; a one-line ConfigError naming ``owner`` and the parameter."""
        note = f" ({self.note})" if self.note else ""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{owner}: {self.name}=None: expected {self.describe()}{note}")
        try:
            v = self._convert(value)
        except _Invalid:
            raise ConfigError(f"{owner}: {self.name}={value!r}: expected {self.describe()}{note}") from None
        choices = self.valid_choices()
        if choices is not None and v not in choices:
            valid = ", ".join(map(str, choices)) + (", or None" if self.optional else "")
            raise ConfigError(f"{owner}: unknown {self.name} {value!r}; choose one of: {valid}{note}")
        if not self._in_range(v):
            raise ConfigError(f"{owner}: {self.name}={value!r}: expected {self.describe()}{note}")
        if self.check is not None:
            try:
                v = self.check(v)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{owner}: {self.name}={value!r}: expected {exc}{note}") from None
        return v

    def with_default(self, default: Any) -> "Param":
        """A copy with another default (a part that overrides an inherited default)."""
        return replace(self, default=default)


def _as_type(value: Any, t: type) -> Any:
    """Convert ``value`` to ``t`` the way a command line or a JSON / TOML file writes it."""
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Invalid
    if t is int:
        if isinstance(value, bool):
            raise _Invalid
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Invalid from None
        raise _Invalid
    if t is float:
        if isinstance(value, bool):
            raise _Invalid
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                raise _Invalid from None
        else:
            raise _Invalid
        if not math.isfinite(v):
            raise _Invalid
        return v
    if t is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise _Invalid
    if isinstance(value, t):
        return value
    raise _Invalid


class Params:
    """An ordered table of ``Param`` entries: one part's parameters, declared once."""

    def __init__(self, *params: Param) -> None:
        self._by_name: dict[str, Param] = {}
        for p in params:
            if p.name in self._by_name:
                raise ValueError(f"parameter {p.name!r} is declared twice")  # a programming error
            self._by_name[p.name] = p

    # -- table operations ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Param]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    def __add__(self, other: "Params") -> "Params":
        """This table then ``other``'s entries (a name in both is an error)."""
        return Params(*self, *other)

    def __repr__(self) -> str:
        return f"Params({', '.join(self.names())})"

    def names(self) -> list[str]:
        """Parameter names in declaration order."""
        return list(self._by_name)

    def defaults(self) -> dict[str, Any]:
        """``{name: default}`` (mutable defaults copied)."""
        return {p.name: _copy(p.default) for p in self}

    def with_defaults(self, **defaults: Any) -> "Params":
        """A copy whose named parameters have other defaults (each name must exist)."""
        unknown = sorted(set(defaults) - set(self._by_name))
        if unknown:
            raise ValueError(f"cannot override undeclared parameter(s) {', '.join(unknown)}")  # programming error
        return Params(*(p.with_default(defaults[p.name]) if p.name in defaults else p for p in self))

    # -- validation ---------------------------------------------------------------------------
    def check_names(self, given: Iterable[str], owner: str, noun: str = "parameter") -> None:
        """ConfigError when ``given`` names a parameter this table does not declare."""
        unknown = sorted(set(given) - set(self._by_name))
        if unknown:
            raise ConfigError(
                f"{owner} has no {noun}(s) {', '.join(unknown)}; it does not accept unknown {noun}s; "
                f"valid: {', '.join(sorted(self._by_name))}"
            )

    def coerce(self, given: Mapping[str, Any], owner: str, noun: str = "parameter") -> dict[str, Any]:
        """Only the ``given`` values, each converted and checked (names first, then values)."""
        self.check_names(given, owner, noun)
        return {k: self._by_name[k].validate(v, owner) for k, v in given.items()}

    def resolve(self, given: Mapping[str, Any], owner: str, noun: str = "parameter") -> dict[str, Any]:
        """Every parameter: the ``given`` values checked, the others at their defaults (declaration order)."""
        checked = self.coerce(given, owner, noun)
        return {p.name: checked[p.name] if p.name in checked else _copy(p.default) for p in self}


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v
