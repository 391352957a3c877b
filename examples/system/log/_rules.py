"""Which records the logger keeps (filter rules) and which a query returns.

Plain values checked once, up front: a bad rule fails the daemon's start (or
``child()``, before anything runs) with a message naming the rule and the
key; a bad query is answered with a message naming the key. Matching is a
pure function of a record.

A filter is an ordered list of rules, the first whose selectors (``program``
glob, ``facility``) match a record decides: ``drop`` it, or keep it when it
is at least as severe as the rule's ``min_level``. No rule matching: the
filter's own ``min_level`` decides. (Rejected: rsyslog's separate
selector/action syntax; a list of dicts reads the same in Python, TOML and
JSON.)
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from examples.system.log._syslog import (
    LEVELS,
    LogInputError,
    Record,
    facility_name,
    level_number,
)

#: The most records one query returns.
QUERY_LIMIT_MAX = 10_000
#: What a query returns without ``limit``.
QUERY_LIMIT_DEFAULT = 100

_RULE_KEYS = frozenset({"program", "facility", "min_level", "drop"})
_QUERY_KEYS = frozenset(
    {"op", "since", "until", "program", "level", "facility", "host", "uid", "grep", "limit"}
)


def _glob(value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise LogInputError(
            f"{where}: expected a program name or glob (1-256 chars), got {value!r}"
        )
    return re.compile(fnmatch.translate(value))


def _facilities(value: Any, where: str) -> frozenset[str]:
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise LogInputError(f"{where}: expected a facility or a non-empty list of them")
    return frozenset(facility_name(v, f"{where}[{i}]") for i, v in enumerate(items))


@dataclass(frozen=True)
class Rule:
    """One filter rule: selectors (``program`` glob, ``facility`` set), then a decision."""

    program: re.Pattern[str] | None
    facilities: frozenset[str] | None
    min_level: int
    drop: bool

    def selects(self, record: Record) -> bool:
        """Whether this rule's selectors match ``record`` (then it decides)."""
        if self.facilities is not None and record.facility not in self.facilities:
            return False
        return self.program is None or self.program.fullmatch(record.program or "") is not None


@dataclass(frozen=True)
class Filter:
    """The logger's filter: ``rules`` in order, then ``min_level`` for the rest."""

    rules: tuple[Rule, ...] = ()
    min_level: int = len(LEVELS) - 1

    @classmethod
    def from_options(cls, min_level: Any, rules: Iterable[Any]) -> Filter:
        """Check and build; :class:`LogInputError` naming ``rules[i].key`` when one is wrong.

        Example::

            Filter.from_options("info", [{"program": "cron*", "drop": True},
                                         {"facility": "auth", "min_level": "debug"}])
        """
        if isinstance(rules, str | bytes | Mapping):
            raise LogInputError("rules: expected a list of rules (dicts), not one value")
        built = []
        for i, rule in enumerate(rules):
            where = f"rules[{i}]"
            if not isinstance(rule, Mapping):
                raise LogInputError(f"{where}: expected a dict, got {rule!r}")
            unknown = set(rule) - _RULE_KEYS
            if unknown:
                raise LogInputError(
                    f"{where}: unknown key {sorted(unknown)[0]!r} (known: {sorted(_RULE_KEYS)})"
                )
            drop = rule.get("drop", False)
            if not isinstance(drop, bool):
                raise LogInputError(f"{where}.drop: expected true or false, got {drop!r}")
            if drop == ("min_level" in rule):
                raise LogInputError(f"{where}: give exactly one of 'drop': true or 'min_level'")
            built.append(
                Rule(
                    program=_glob(rule["program"], f"{where}.program")
                    if "program" in rule
                    else None,
                    facilities=_facilities(rule["facility"], f"{where}.facility")
                    if "facility" in rule
                    else None,
                    min_level=level_number(rule["min_level"], f"{where}.min_level")
                    if "min_level" in rule
                    else 0,
                    drop=drop,
                )
            )
        return cls(tuple(built), level_number(min_level, "min_level"))

    def accepts(self, record: Record) -> bool:
        """Whether the logger keeps ``record``."""
        for rule in self.rules:
            if rule.selects(record):
                return not rule.drop and record.severity <= rule.min_level
        return record.severity <= self.min_level


_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(value: Any, where: str, now: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (rel := _RELATIVE.fullmatch(value.strip())):
        return now - float(rel.group(1)) * _UNIT[rel.group(2)]
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return stamp.timestamp()  # naive: local time, as date(1) prints it
    raise LogInputError(
        f"{where}: expected seconds since the epoch, an ISO 8601 time "
        f"or an age such as -10m (s, m, h, d), got {value!r}"
    )


@dataclass(frozen=True)
class Query:
    """A query's conditions, all of which a record must meet.

    ``since``/``until`` bound ``time`` (inclusive), ``level`` is the least
    severe level returned, ``program`` a glob, ``grep`` a substring of the
    message, ``uid`` the sender's user as the kernel saw it (syslog datagrams
    only); ``limit`` the most records returned (the newest that match).
    """

    since: float | None = None
    until: float | None = None
    program: re.Pattern[str] | None = None
    level: int = len(LEVELS) - 1
    facilities: frozenset[str] | None = None
    host: str | None = None
    uid: int | None = None
    grep: str | None = None
    limit: int = QUERY_LIMIT_DEFAULT

    @classmethod
    def from_request(cls, request: Mapping[str, Any], now: float | None = None) -> Query:
        """Check a ``{"op": "query", ...}`` request; :class:`LogInputError` names the bad key.

        ``since`` and ``until`` may be ages (``"-10m"``: ten minutes before ``now``).
        """
        now = time.time() if now is None else now
        unknown = set(request) - _QUERY_KEYS
        if unknown:
            raise LogInputError(
                f"query: unknown key {sorted(unknown)[0]!r} (known: {sorted(_QUERY_KEYS - {'op'})})"
            )
        limit = request.get("limit", QUERY_LIMIT_DEFAULT)
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not 1 <= limit <= QUERY_LIMIT_MAX
        ):
            raise LogInputError(
                f"query.limit: expected an integer 1-{QUERY_LIMIT_MAX}, got {limit!r}"
            )
        host, grep = request.get("host"), request.get("grep")
        for key, value in (("host", host), ("grep", grep)):
            if value is not None and not isinstance(value, str):
                raise LogInputError(f"query.{key}: expected a string, got {value!r}")
        uid = request.get("uid")
        if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or uid < 0):
            raise LogInputError(f"query.uid: expected a user id (an integer >= 0), got {uid!r}")
        g = request.get
        return cls(
            since=_when(g("since"), "query.since", now) if g("since") is not None else None,
            until=_when(g("until"), "query.until", now) if g("until") is not None else None,
            program=_glob(g("program"), "query.program") if g("program") is not None else None,
            level=level_number(g("level"), "query.level") if g("level") is not None else 7,
            facilities=_facilities(g("facility"), "query.facility")
            if g("facility") is not None
            else None,
            host=host,
            uid=uid,
            grep=grep,
            limit=limit,
        )

    def matches(self, record: Record) -> bool:
        """Whether ``record`` meets every condition."""
        return (
            record.severity <= self.level
            and (self.since is None or record.time >= self.since)
            and (self.until is None or record.time <= self.until)
            and (self.program is None or self.program.fullmatch(record.program or "") is not None)
            and (self.facilities is None or record.facility in self.facilities)
            and (self.host is None or record.host == self.host)
            and (self.uid is None or (record.cred is not None and record.cred.uid == self.uid))
            and (self.grep is None or self.grep in record.msg)
        )


def newest_matches(query: Query, newest_first: Iterable[Record], found: list[Record]) -> bool:
    """Append to ``found`` the records of ``newest_first`` that match, up to the limit.

    Returns True once the limit is reached (the caller stops looking further back).
    """
    for record in newest_first:
        if query.matches(record):
            found.append(record)
            if len(found) >= query.limit:
                return True
    return False


def check_names(values: Sequence[Any], where: str) -> tuple[str, ...]:
    """A list of non-empty strings (forward targets), or :class:`LogInputError`."""
    if isinstance(values, str | bytes) or not all(isinstance(v, str) and v for v in values):
        raise LogInputError(f"{where}: expected a list of non-empty strings, got {values!r}")
    return tuple(values)
