"""Reading untrusted mappings (JSON, YAML, environment variables) into frozen dataclasses.

Written by hand rather than with pydantic: importing pydantic and building models cost about
100 ms of every start (measured with ``-X importtime``), two thirds of the CLI's cold-start
budget, to check two dozen fields. A check is a function that returns the value, possibly
converted, or raises ``ValueError`` with what is expected; it never echoes the input, which may
be a secret.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

Loc = tuple[int | str, ...]
Check = Callable[[Any], Any]
T = TypeVar("T")

_REQUIRED: Any = object()


class Invalid(ValueError):
    """Every problem found in one value, each located relative to that value."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__(problems[0][1])
        self.problems = problems

    def within(self, *prefix: int | str) -> list[tuple[Loc, str]]:
        return [(prefix + loc, message) for loc, message in self.problems]


def camel(name: str) -> str:
    """``endpoint_url`` as DRUM spells it: ``endpointUrl``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True)
class Field:
    """One key: the attribute it fills, how it is checked, its default and other spellings."""

    name: str
    check: Check
    default: Any = _REQUIRED
    key: str = ""
    also: tuple[str, ...] = ()

    @property
    def spelling(self) -> str:
        return self.key or self.name


def camel_fields(*fields: Field) -> tuple[Field, ...]:
    """Fields whose documented key is the camelCase of the attribute (snake_case still read)."""
    return tuple(Field(f.name, f.check, f.default, f.key or camel(f.name), f.also)
                 for f in fields)


def _normalized(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _reject_case_variants(fields: Sequence[Field], data: Mapping[Any, Any]) -> None:
    """A key like ``endpointURL`` is a typo of a known key, not an unknown extension: DRUM
    ignores it and silently falls back to AWS; we refuse it and name the right spelling."""
    known = {f.name: f.spelling for f in fields} | {f.spelling: f.spelling for f in fields}
    by_normal = {_normalized(k): v for k, v in known.items()}
    for key in data:
        if isinstance(key, str) and key not in known:
            spelled = by_normal.get(_normalized(key))
            if spelled is not None:
                raise Invalid([((), f"unknown key {key!r}; did you mean {spelled!r}?")])


def read(fields: Sequence[Field], data: Mapping[Any, Any]) -> dict[str, Any]:
    """Check every field of ``data`` and return them by attribute name; unknown keys are
    ignored. Raises ``Invalid`` listing every problem, each located by the key the document
    used (the documented spelling for a missing one)."""
    _reject_case_variants(fields, data)
    values: dict[str, Any] = {}
    problems: list[tuple[Loc, str]] = []
    for field in fields:
        key = next((k for k in (field.spelling, field.name, *field.also) if k in data), None)
        if key is None:
            if field.default is _REQUIRED:
                problems.append(((field.spelling,), "is required"))
            else:
                values[field.name] = field.default
        else:
            values[field.name] = _located(field.check, data[key], key, problems)
    if problems:
        raise Invalid(problems)
    return values


def _located(check: Check, value: Any, at: int | str, problems: list[tuple[Loc, str]]) -> Any:
    """``check(value)``, or None with its problems added to ``problems``, located at ``at``."""
    try:
        return check(value)
    except Invalid as exc:
        problems.extend(exc.within(at))
    except ValueError as exc:
        problems.append(((at,), str(exc)))
    return None


def check_settings(instance: Any, fields: Sequence[Field], variable: Callable[[str], str]
                   ) -> None:
    """Check a frozen settings dataclass's values as its constructor got them and keep what the
    checks return (``"16"`` becomes 16), so one built in code is checked like one read from
    the environment. The first problem is one line naming the ``variable`` of its field."""
    try:
        checked = read(fields, {field.name: getattr(instance, field.name) for field in fields})
    except Invalid as exc:
        (loc, *_), message = exc.problems[0]
        name = str(loc)
        raise ConfigError(f"{variable(name)}: {message} (got {getattr(instance, name)!r})"
                          ) from None
    for name, value in checked.items():
        object.__setattr__(instance, name, value)


def path(value: Any) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ValueError("must be a path")


def record(build: Callable[[Mapping[Any, Any]], T]) -> Callable[[Any], T]:
    """A nested mapping, built by ``build`` (which raises ``Invalid`` or ``ValueError``)."""
    def check(value: Any) -> T:
        if not isinstance(value, Mapping):
            raise ValueError("must be a mapping")
        return build(value)
    return check


def list_of(item: Check, min_length: int = 0) -> Check:
    """A list, every item checked (all problems reported, each at its index)."""
    def check(value: Any) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list")
        if len(value) < min_length:
            raise ValueError("must not be empty")
        problems: list[tuple[Loc, str]] = []
        items = [_located(item, element, index, problems)
                 for index, element in enumerate(value)]
        if problems:
            raise Invalid(problems)
        return items
    return check


def text(min_length: int = 0) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if len(value) < min_length:
            raise ValueError("must not be empty")
        return value
    return check


def optional(inner: Check) -> Check:
    """``None`` (JSON null) stands for the default-less absence of a value."""
    return lambda value: None if value is None else inner(value)


def chain(*checks: Check) -> Check:
    def check(value: Any) -> Any:
        for step in checks:
            value = step(value)
        return value
    return check


def one_of(*allowed: str, message: str) -> Check:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(message)
        return str(value)
    return check


def _bounded(value: T, ge: float | None, gt: float | None, le: float | None) -> T:
    number: Any = value
    if ge is not None and number < ge:
        raise ValueError(f"must be at least {_shown(ge)}")
    if gt is not None and number <= gt:
        raise ValueError(f"must be greater than {_shown(gt)}")
    if le is not None and number > le:
        raise ValueError(f"must be at most {_shown(le)}")
    return value


def _shown(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else str(limit)


def integer(ge: int | None = None, le: int | None = None, strict: bool = False) -> Check:
    """An int; unless ``strict``, also its decimal text (``"16"``, ``" 1_000 "``, ``"16.0"``),
    as an environment variable gives it."""
    def check(value: Any) -> int:
        if isinstance(value, str) and not strict:
            value = _parse_integer(value)
        elif isinstance(value, float) and not strict and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be an integer")
        return _bounded(value, ge, None, le)
    return check


_DECIMAL_INTEGER = re.compile(r"[+-]?[0-9]+(_[0-9]+)*(\.0*)?")


def _parse_integer(raw: str) -> int:
    candidate = raw.strip()
    if not _DECIMAL_INTEGER.fullmatch(candidate):
        raise ValueError("must be an integer")
    return int(candidate.partition(".")[0])


def number(ge: float | None = None, gt: float | None = None, le: float | None = None) -> Check:
    """A finite number, or its text (``"15"``, ``"2.5"``, ``"1e3"``)."""
    def check(value: Any) -> float:
        if isinstance(value, str) and value.isascii():
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError("must be a number")
        if math.isnan(value):
            raise ValueError("must be a number")
        return _bounded(float(value), ge, gt, le)
    return check


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def boolean(value: Any) -> bool:
    """true or false, or the words an environment variable or YAML uses for them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    raise ValueError("must be true or false (also 1/0, yes/no, on/off)")


def located(loc: Loc) -> str:
    """``files[0].remotePath``: the path a user would follow in their document."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def one_line(source: str, exc: Invalid) -> str:
    """The first problem, where it is, and how many more there are; never the input value."""
    loc, message = exc.problems[0]
    where = f"{source}: {located(loc)}: " if loc else f"{source}: "
    others = len(exc.problems) - 1
    more = f" (+{others} more problem{'s' if others > 1 else ''})" if others else ""
    return f"{where}{message}{more}"
