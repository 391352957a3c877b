"""Resource limits of a daemon: setrlimit resources and cgroup limits, as one value.

:class:`ResourceLimits` is the ``limits`` field of an executable, whichever
way it was written: a Python value, a TOML table (``limits = { nofile =
[1024, 4096], memory_max = "512M" }``) or a JSON object. :func:`check_limits`
is the one check of that field (the field table of
:mod:`ikos.platform._exec_options` uses it, and so does
:meth:`ResourceLimits.from_mapping`): it accepts the spellings users write
(``"infinity"``, ``[soft, hard]``, ``"512M"``, ``"50%"``, ``as`` for
``as_``) and returns a normalised, hashable value. Whether the machine lets a
limit be applied (a hard limit above the current one needs
``CAP_SYS_RESOURCE``) is decided when the process is planned, not here.
"""

from __future__ import annotations

import math
import re
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeAlias, cast

from ikos._errors import SpawnError
from ikos.platform._fields import InvalidField, UnknownField, is_int

__all__ = [
    "CGROUP_FIELDS",
    "LIMIT_NAMES",
    "RLIMIT_FIELDS",
    "ResourceLimits",
    "check_limits",
    "limits_json",
    "rlimit_key",
    "rlimit_resource",
]

RLimitValue: TypeAlias = int | tuple[int, int] | None

# The setrlimit resources, as fields of ResourceLimits. RLIMIT_LOCKS is
# missing from some builds of Python's ``resource`` module although Linux
# has it (number 10); RLIMIT_OFILE is the BSD alias of RLIMIT_NOFILE.
RLIMIT_FIELDS: tuple[str, ...] = (
    "as_", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue",
    "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip
CGROUP_FIELDS: tuple[str, ...] = ("memory_max", "cpu_quota", "tasks_max")
#: Every key a table of limits may have (``as`` is TOML's spelling of ``as_``).
LIMIT_NAMES: tuple[str, ...] = (*RLIMIT_FIELDS, *CGROUP_FIELDS, "as")
_LINUX_RLIMIT_FALLBACK = {"locks": 10}


def rlimit_resource(name: str) -> int | None:
    """The ``resource.RLIMIT_*`` number of a :class:`ResourceLimits` field, or None."""
    number = getattr(resource, "RLIMIT_" + name.rstrip("_").upper(), None)
    if number is None and sys.platform.startswith("linux"):
        number = _LINUX_RLIMIT_FALLBACK.get(name)
    return cast("int | None", number)


@dataclass(frozen=True, repr=False)
class ResourceLimits:
    """Resource limits of a daemon: setrlimit resources plus cgroup limits.

    Each rlimit field is named as ``resource.RLIMIT_<NAME>`` in lower case
    (``as_`` for ``RLIMIT_AS``); its value is None (unchanged), an int (soft
    and hard) or a ``(soft, hard)`` pair, ``resource.RLIM_INFINITY`` meaning
    unlimited. ``memory_max`` (bytes), ``cpu_quota`` (a fraction of one CPU,
    0.5 = half a CPU, 2 = two CPUs) and ``tasks_max`` are applied through
    cgroups (see :mod:`ikos.platform._cgroups`).

    Example::

        ResourceLimits(nofile=4096, core=0, memory_max=512 << 20, cpu_quota=0.5)
        ResourceLimits.from_mapping("web", {"nofile": [1024, 4096], "as": "infinity"})
    """

    as_: RLimitValue = None
    core: RLimitValue = None
    cpu: RLimitValue = None
    data: RLimitValue = None
    fsize: RLimitValue = None
    locks: RLimitValue = None
    memlock: RLimitValue = None
    msgqueue: RLimitValue = None
    nice: RLimitValue = None
    nofile: RLimitValue = None
    nproc: RLimitValue = None
    rss: RLimitValue = None
    rtprio: RLimitValue = None
    rttime: RLimitValue = None
    sigpending: RLimitValue = None
    stack: RLimitValue = None
    memory_max: int | None = None
    cpu_quota: float | None = None
    tasks_max: int | None = None

    @classmethod
    def from_mapping(cls, daemon: str, m: Mapping[str, Any]) -> ResourceLimits:
        """Validate a mapping of limits (e.g. a TOML table) into ResourceLimits.

        Keys are field names (``as`` is accepted for ``as_``); values as
        described on the class, with ``"infinity"`` for RLIM_INFINITY,
        ``memory_max`` also as ``"512M"``/``"2G"`` and ``cpu_quota`` also as
        ``"50%"``. Raises :class:`SpawnError` naming ``limits.<key>``.
        """
        try:
            return check_limits(m)
        except InvalidField as exc:
            error = exc.within("limits")
            raise SpawnError(daemon, error.key, str(InvalidField(None, exc.expected, exc.got)))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.as_mapping().items())
        return f"ResourceLimits({shown})"

    def as_mapping(self) -> dict[str, Any]:
        """The fields that are set, by name (the inverse of :meth:`from_mapping`)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def rlimits(self) -> list[tuple[str, int, tuple[int, int]]]:
        """``(field, resource number, (soft, hard))`` for every rlimit that is set."""
        out = []
        for name in RLIMIT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            number = rlimit_resource(name)
            if number is None:  # refused by check_limits; possible only if built by hand
                continue
            pair = (value, value) if isinstance(value, int) else (value[0], value[1])
            out.append((name, number, pair))
        return out

    @property
    def needs_cgroup(self) -> bool:
        """Whether any limit must be applied through a cgroup."""
        return any(getattr(self, name) is not None for name in CGROUP_FIELDS)


def check_limits(value: object) -> ResourceLimits:
    """The ``limits`` field: a table of limits (or a ResourceLimits), normalised.

    Raises :class:`InvalidField` whose key is the limit at fault (``"nofile"``),
    :class:`UnknownField` for a key that names no limit.
    """
    if isinstance(value, ResourceLimits):
        value = value.as_mapping()
    if not isinstance(value, Mapping):
        raise InvalidField(None, "a table like { nofile = 1024, core = 0 }", value)
    values: dict[str, Any] = {}
    for key, item in value.items():
        name = "as_" if key == "as" else key
        if name in RLIMIT_FIELDS:
            values[name] = _check_rlimit(key, name, item)
        elif name == "memory_max":
            values[name] = _check_memory(key, item)
        elif name == "cpu_quota":
            values[name] = _check_cpu_quota(key, item)
        elif name == "tasks_max":
            values[name] = _check_tasks(key, item)
        else:
            raise UnknownField.among(str(key), LIMIT_NAMES, "limit")
    return ResourceLimits(**values)


def limits_json(limits: ResourceLimits) -> dict[str, Any] | None:
    """``limits`` as JSON: the limits that are set, pairs as lists; None when none is.

    RLIM_INFINITY is written ``"infinity"`` (its number, -1, reads like a mistake).
    """
    out: dict[str, Any] = {}
    for key, value in limits.as_mapping().items():
        if key in RLIMIT_FIELDS:
            pair = [_rlim_json(v) for v in value] if isinstance(value, tuple) else None
            out[key] = pair if pair is not None else _rlim_json(value)
        else:
            out[key] = value
    return out or None


def _rlim_json(value: int) -> int | str:
    return "infinity" if value == resource.RLIM_INFINITY else value


_RLIMIT_EXPECTED = "an integer >= 0, 'infinity', or [soft, hard] of those"


def _rlim_value(key: str, v: object) -> int:
    if isinstance(v, str) and v.strip().lower() in ("infinity", "unlimited"):
        return resource.RLIM_INFINITY
    if is_int(v) and (cast(int, v) >= 0 or v == resource.RLIM_INFINITY):
        return cast(int, v)
    raise InvalidField(key, _RLIMIT_EXPECTED, v)


def rlimit_key(v: int) -> float:
    """A limit as a number that compares right: RLIM_INFINITY above every other."""
    return math.inf if v == resource.RLIM_INFINITY else v


def _check_rlimit(key: str, name: str, value: object) -> RLimitValue:
    if value is None:
        return None
    if rlimit_resource(name) is None:
        raise InvalidField(
            key, f"a limit this system supports (it has no RLIMIT_{name.rstrip('_').upper()})"
        )
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise InvalidField(key, "[soft, hard]", value)
        soft, hard = (_rlim_value(key, v) for v in value)
        if rlimit_key(soft) > rlimit_key(hard):
            raise InvalidField(key, "[soft, hard] with soft <= hard", value)
        return (soft, hard)
    return _rlim_value(key, value)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def _check_memory(key: str, value: object) -> int | None:
    expected = "bytes > 0, or a size like '512M' or '2G'"
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("infinity", "max"):
            return None
        match = _SIZE_RE.match(value)
        if match is None:
            raise InvalidField(key, expected, value)
        value = int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    if not is_int(value) or cast(int, value) <= 0:
        raise InvalidField(key, expected, value)
    return cast(int, value)


def _check_cpu_quota(key: str, value: object) -> float | None:
    expected = "CPUs > 0 (1.5 = one and a half CPUs), or a percentage"
    if value is None:
        return None
    given = value
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise InvalidField(key, expected, given) from None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidField(key, expected, given)
    if not (math.isfinite(value) and value > 0):
        raise InvalidField(key, expected, given)
    return float(value)


def _check_tasks(key: str, value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("infinity", "max")):
        return None
    if not is_int(value) or cast(int, value) < 1:
        raise InvalidField(key, "an integer >= 1, or 'infinity'", value)
    return cast(int, value)
