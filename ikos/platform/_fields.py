"""Typed field tables: one definition per field, read by every front end.

An executable's options arrive in four spellings: keywords of
``ikos.Exec(...)``, keys of an ``[executables.NAME]`` table, JSON fields of
``daemon_create``/``daemon_update`` and attributes of
``ikos.daemon.DaemonConfig``. Each field is defined once, as an attribute of
a frozen dataclass declared with :func:`option`: its type and default are
the attribute's, and the metadata holds the check that validates and
normalises a value, a one-line description, whether changing it restarts a
running daemon, and how it is written back as JSON. :func:`field_table`
turns such a class into the table that :func:`check_fields` reads, and
every front end calls :func:`check_fields`; only the way an error is
reported differs (a ``SpecError`` naming the daemon, a ``ConfigError``
naming the file, table and key...).

A check takes the raw value and returns it normalised to a hashable form
(tuples, :class:`FrozenDict`, frozen dataclasses), or raises
:class:`InvalidField` with what was expected; a check accepts its own output
unchanged, so that normalising twice is harmless. Checks only look at the
value: whatever depends on the machine (does the user exist, is the
executable on ``PATH``) is resolved when the process is planned
(:func:`ikos.platform._spawn.build_exec_plan`).

A schema library (pydantic, attrs validators) was rejected for the reason
the TOML loader gives: errors must name a daemon and field, or a file,
table and key, in words, and the checks fit in a few screens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

__all__ = [
    "FieldSpec",
    "FrozenDict",
    "InvalidField",
    "UnknownField",
    "boolean",
    "check_fields",
    "choice",
    "close_match",
    "field_table",
    "integer",
    "is_int",
    "is_number",
    "json_value",
    "normalise_fields",
    "option",
    "seconds",
]

_K = TypeVar("_K")
_V = TypeVar("_V")

Check = Callable[[Any], Any]


class InvalidField(ValueError):
    """A value breaks its field's rule.

    ``key`` names the field (dotted below it: ``"limits.nofile"``,
    ``"environment.PORT"``; None while a check does not know its own name),
    ``expected`` says what was expected and ``got`` what was found. Front
    ends turn it into their own error; it never reaches users as such.
    """

    def __init__(self, key: str | None, expected: str, got: object = None) -> None:
        super().__init__(key, expected, got)
        self.key, self.expected, self.got = key, expected, got

    def within(self, key: str) -> InvalidField:
        """The same error seen from the field ``key`` that contains this value."""
        return type(self)(f"{key}.{self.key}" if self.key else key, self.expected, self.got)

    def __str__(self) -> str:
        text = f"{self.key}: expected {self.expected}" if self.key else f"expected {self.expected}"
        return text if self.got is None else f"{text}, got {self.got!r}"


class UnknownField(InvalidField):
    """A key names no field; ``expected`` suggests the closest one, or lists them all."""

    def __init__(self, key: str | None, expected: str, got: object = None) -> None:
        super().__init__(key, expected, got)

    @classmethod
    def among(cls, key: str, known: Collection[str], what: str = "field") -> UnknownField:
        """The error for ``key``, with a "did you mean" when a known name is close."""
        close = close_match(key, known)
        if close is not None:
            return cls(key, f"a known {what} (did you mean '{close}'?)")
        return cls(key, f"a known {what}: one of " + ", ".join(known))


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice that ``word`` is most likely a misspelling of, if one is close enough.

    >>> close_match("restart_dealy", ["restart_delay", "restart_on"])
    'restart_delay'
    """
    import difflib  # only for a misspelt key: not loaded by a configuration without one

    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return found[0] if found else None


class FrozenDict(Mapping[_K, _V]):
    """An immutable, hashable mapping that keeps its insertion order.

    Equal to any mapping with the same items (``FrozenDict(a=1) == {"a": 1}``),
    so code and tests that compare with plain dicts keep working.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[_K, _V] | Iterable[tuple[_K, _V]] = ()) -> None:
        self._data: dict[_K, _V] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._data,))


def json_value(value: Any) -> Any:
    """A normalised value as JSON: tuples become lists, mappings objects."""
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


class FieldSpec:
    """One row of a field table: what :func:`option` declared for an attribute.

    A plain class, not a dataclass: ikosd and every tree module import the
    tables, and a dataclass compiles its generated methods at import
    (docs/performance.md, "Launch"). Nothing compares or hashes the rows.
    """

    __slots__ = ("check", "default", "doc", "name", "restarts", "to_json")

    def __init__(
        self,
        name: str,
        default: Any,
        check: Check,
        doc: str,
        restarts: bool,
        to_json: Callable[[Any], Any],
    ) -> None:
        self.name = name
        self.default = default
        self.check = check
        self.doc = doc
        #: whether a change restarts a running daemon (else it applies at its next exit
        #: or stop)
        self.restarts = restarts
        self.to_json = to_json

    def __repr__(self) -> str:
        return f"FieldSpec({self.name!r}, default={self.default!r})"


def option(
    default: Any,
    check: Check,
    doc: str,
    *,
    restarts: bool = True,
    to_json: Callable[[Any], Any] = json_value,
) -> Any:
    """Declare a dataclass attribute as a field of a table (see the module docstring).

    Example::

        @dataclass(frozen=True)
        class Options:
            umask: int | None = option(None, check_umask, "file mode creation mask")
    """
    meta = {"option": (check, doc, restarts, to_json)}
    return dataclasses.field(default=default, metadata=meta)


def field_table(cls: type) -> dict[str, FieldSpec]:
    """The fields of ``cls`` declared with :func:`option`, by name, in declaration order."""
    table: dict[str, FieldSpec] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is not None:
            check, doc, restarts, to_json = meta
            table[f.name] = FieldSpec(f.name, f.default, check, doc, restarts, to_json)
    return table


def check_fields(table: Mapping[str, FieldSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise ``values``, each by its field's check.

    None stands for the field's default ("unset"). Raises :class:`UnknownField`
    for a key that names no field (with a "did you mean") and
    :class:`InvalidField` naming the key for a bad value.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        spec = table.get(key)
        if spec is None:
            raise UnknownField.among(key, table)
        out[key] = spec.default if value is None else _checked(spec, value)
    return out


def normalise_fields(obj: Any, table: Mapping[str, FieldSpec]) -> None:
    """Check and normalise every field of the frozen dataclass ``obj`` in place.

    For ``__post_init__``: an instance built directly holds the same forms as
    one built by :func:`check_fields`.
    """
    for name, spec in table.items():
        value = getattr(obj, name)
        if value is None or value is spec.default:
            if value is None:
                object.__setattr__(obj, name, spec.default)
            continue
        object.__setattr__(obj, name, _checked(spec, value))


def _checked(spec: FieldSpec, value: Any) -> Any:
    try:
        return spec.check(value)
    except InvalidField as exc:
        raise exc.within(spec.name) from None


# --- checks shared by many fields -----------------------------------------------------------


def is_int(x: object) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def boolean(value: object) -> bool:
    """``true`` or ``false``, nothing that merely looks like one."""
    if not isinstance(value, bool):
        raise InvalidField(None, "true or false", value)
    return value


def seconds(*, zero_ok: bool = True) -> Check:
    """A check for a number of seconds (>= 0, or > 0), normalised to a float."""
    expected = "seconds >= 0" if zero_ok else "seconds > 0"

    def check(value: object) -> float:
        if not is_number(value) or cast(float, value) < 0 or (value == 0 and not zero_ok):
            raise InvalidField(None, expected, value)
        return float(cast(float, value))

    return check


def integer(minimum: int) -> Check:
    """A check for an integer >= ``minimum``."""

    def check(value: object) -> int:
        if not is_int(value) or cast(int, value) < minimum:
            raise InvalidField(None, f"an integer >= {minimum}", value)
        return cast(int, value)

    return check


def choice(choices: Collection[str]) -> Check:
    """A check for one string among ``choices``."""

    def check(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise InvalidField(None, "one of " + ", ".join(choices), value)
        return value

    return check
