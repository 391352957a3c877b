"""Alerts: thresholds on daemons' usage and events of their lives, as a pure state machine.

An :class:`AlertEngine` is fed observations (a daemon's CPU, memory and open
files from each sampler pass, its restarts, and events: it failed, its
supervisor gave up, its health went critical) and answers with
:class:`Change` values, an alert that fired or resolved. It keeps the
active set; it does nothing else: logging, the events stream, publishing,
metrics and actions are the manager's (``ikos.manager._alert_service``).

A threshold alert fires once its value has been at or above ``above`` for
``for`` seconds without a break, and resolves once the value has stayed
below ``resolve_below`` (default ``above``: no hysteresis) for
``resolve_for`` seconds (default ``for``). A daemon that stops running
resolves its usage alerts at once (its process is gone, and so is the
condition); its restarts alert follows the sliding window instead. Event
alerts (``failed``, ``gave_up``, ``health``) fire when the event happens
and resolve when the daemon leaves ``failed`` or its health is no longer
critical.

The main design choice, as in :mod:`ikos.supervision._intensity`, is that
time is passed in: every method takes ``now``, so the rules are tested with
a fake clock and never by sleeping. The :class:`NotificationLimiter` is pure
in the same way. Rejected: one timer per pending alert on the event loop,
which made ``for`` depend on the loop's scheduling and could not be tested
without waiting for real.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, cast

__all__ = [
    "ACTIONS",
    "EVENT_KINDS",
    "KINDS",
    "SEVERITIES",
    "THRESHOLD_KINDS",
    "Alert",
    "AlertCollector",
    "AlertEngine",
    "AlertRules",
    "Change",
    "NotificationLimiter",
    "Rule",
    "format_value",
    "parse_size",
]

AlertKind: TypeAlias = Literal["cpu", "memory", "fds", "restarts", "failed", "gave_up", "health"]
Severity: TypeAlias = Literal["warning", "critical"]
Action: TypeAlias = Literal["restart", "stop", "command"]

THRESHOLD_KINDS: Final = ("cpu", "memory", "fds", "restarts")
#: The kinds measured on a daemon's processes: resolved when the daemon stops running.
USAGE_KINDS: Final = ("cpu", "memory", "fds")
EVENT_KINDS: Final = ("failed", "gave_up", "health")
KINDS: Final = (*THRESHOLD_KINDS, *EVENT_KINDS)
SEVERITIES: Final = ("warning", "critical")
ACTIONS: Final = ("restart", "stop", "command")
#: Most restart times kept per daemon (a window holding more still counts this many).
MAX_RESTART_HISTORY: Final = 1024

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*")
_POWERS: Final = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: int | str) -> int:
    """A size in bytes: an integer, or text like ``"512MiB"``, ``"1.5G"``, ``"100kB"``.

    ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024, as are the bare
    letters ``K``/``M``/``G``/``T`` (what ``ps`` and ``top`` show); ``kB``,
    ``MB``... are powers of 1000. ValueError for anything else.

    >>> parse_size("512MiB"), parse_size("1G"), parse_size("2kB"), parse_size(42)
    (536870912, 1073741824, 2000, 42)
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"not a size: {value!r}")
        return value
    found = _SIZE.fullmatch(value)
    if found is None:
        raise ValueError(f"not a size: {value!r}")
    number, unit, binary, b = found.groups()
    power = _POWERS[unit.lower()]
    decimal = bool(b) and not binary and power > 0
    if binary and not unit:
        raise ValueError(f"not a size: {value!r}")
    return int(float(number) * (1000 if decimal else 1024) ** power)


def format_value(kind: str, value: float) -> str:
    """``value`` as a person reads it: bytes for memory, a percentage of a core for cpu.

    >>> format_value("memory", 3 * 1024 * 1024), format_value("cpu", 0.5), format_value("fds", 12)
    ('3.0MiB', '50%', '12')
    """
    if kind == "memory":
        size = float(value)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if size < 1024:
                return f"{size:.0f}B" if unit == "B" else f"{size:.1f}{unit}"
            size /= 1024
        return f"{size:.1f}TiB"
    if kind == "cpu":
        return f"{value * 100:.0f}%"
    return f"{value:g}"


@dataclass(frozen=True)
class Rule:
    """When one kind of alert fires and resolves, how loud it is, and what it does.

    ``above`` is the threshold (None for the event kinds): a fraction of one
    core for ``cpu`` (``1.5`` is one and a half cores busy over the sampling
    interval), bytes of RSS for ``memory``, open descriptors for ``fds``,
    restarts within ``window`` seconds for ``restarts``. ``action`` is done
    when the alert fires: restart or stop the daemon, or run ``command``
    (``/bin/sh -c``) with at most ``command_timeout`` seconds.
    """

    kind: AlertKind
    above: float | None = None
    for_: float = 0.0
    resolve_for: float | None = None
    resolve_below: float | None = None
    window: float = 60.0
    severity: Severity = "warning"
    action: Action | None = None
    command: str | None = None
    command_timeout: float = 30.0

    @property
    def resolve_after(self) -> float:
        """Seconds the value must stay below :attr:`resolve_threshold` to resolve."""
        return self.for_ if self.resolve_for is None else self.resolve_for

    @property
    def resolve_threshold(self) -> float:
        """The value below which the alert counts as resolving (hysteresis)."""
        assert self.above is not None
        return self.above if self.resolve_below is None else self.resolve_below


#: The event alerts every daemon has unless the configuration says otherwise.
DEFAULT_EVENT_RULES: Final[Mapping[str, Rule]] = {
    "failed": Rule("failed", severity="critical"),
    "gave_up": Rule("gave_up", severity="critical"),
    "health": Rule("health", severity="warning"),
}


@dataclass(frozen=True)
class AlertRules:
    """The rules of every daemon: ``defaults`` for all, ``daemons`` replacing them by kind.

    In ``defaults`` and ``daemons[name]``, a kind mapped to None turns that
    alert off (for all, for the daemon).

    >>> rules = AlertRules({"fds": Rule("fds", above=100)}, {"web": {"fds": None}})
    >>> sorted(rules.for_daemon("db")), sorted(rules.for_daemon("web"))
    (['failed', 'fds', 'gave_up', 'health'], ['failed', 'gave_up', 'health'])
    """

    defaults: Mapping[str, Rule | None] = field(default_factory=dict)
    daemons: Mapping[str, Mapping[str, Rule | None]] = field(default_factory=dict)

    def for_daemon(self, name: str) -> dict[str, Rule]:
        """The rules that apply to daemon ``name``, by kind.

        The event alerts of :data:`DEFAULT_EVENT_RULES` apply unless ``defaults``
        or the daemon's rules map them to None.
        """
        merged = {**DEFAULT_EVENT_RULES, **self.defaults, **self.daemons.get(name, {})}
        return {kind: rule for kind, rule in merged.items() if rule is not None}


# Alert and Change are plain slotted classes, not dataclasses: a dataclass compiles its
# methods at every start of ikosd (docs/performance.md, "Launch"). Nothing compares,
# hashes or changes them (the active set keeps them by (daemon, kind); a new value is
# a copy, :meth:`Alert.with_value`).


class Alert:
    """An alert as it is shown: ``since`` is when it fired (the engine's clock)."""

    __slots__ = ("alert", "daemon", "message", "severity", "since", "threshold", "value")

    def __init__(
        self,
        alert: str,
        daemon: str,
        severity: Severity,
        value: float | None,
        threshold: float | None,
        since: float,
        message: str,
    ) -> None:
        self.alert = alert
        self.daemon = daemon
        self.severity = severity
        self.value = value
        self.threshold = threshold
        self.since = since
        self.message = message

    def with_value(self, value: float | None, severity: Severity | None = None) -> Alert:
        """A copy showing ``value`` (and ``severity``): an alert once made is not changed."""
        return Alert(
            self.alert,
            self.daemon,
            self.severity if severity is None else severity,
            value,
            self.threshold,
            self.since,
            self.message,
        )

    def to_json(self) -> dict[str, Any]:
        """The object of ``ikosctl alerts --json`` (docs/protocol.md)."""
        return {
            "alert": self.alert,
            "daemon": self.daemon,
            "severity": self.severity,
            "value": self.value,
            "threshold": self.threshold,
            "since": self.since,
            "message": self.message,
        }


class Change:
    """An alert that fired or resolved at ``at``, and the rule it follows."""

    __slots__ = ("alert", "at", "event", "rule")

    def __init__(
        self, event: Literal["fired", "resolved"], alert: Alert, rule: Rule, at: float
    ) -> None:
        self.event = event
        self.alert = alert
        self.rule = rule
        self.at = at


class _Track:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """One (daemon, kind) under a threshold rule: since when its condition holds."""

    __slots__ = ("above_since", "below_since")

    def __init__(self) -> None:
        self.above_since: float | None = None
        self.below_since: float | None = None


def _message(rule: Rule, daemon: str, value: float) -> str:
    shown = format_value(rule.kind, value)
    assert rule.above is not None
    limit = format_value(rule.kind, rule.above)
    if rule.kind == "restarts":
        return f"{daemon} restarted {shown} times within {rule.window:g} s (limit {limit})"
    what = {"cpu": "CPU", "memory": "memory (RSS)", "fds": "open files"}[rule.kind]
    return f"{daemon} {what} at {shown}, threshold {limit} for {rule.for_:g} s"


def _bare_rule(alert: Alert) -> Rule:
    """A rule with no action, for an alert resolved after its rule was removed."""
    return Rule(cast(AlertKind, alert.alert), above=alert.threshold, severity=alert.severity)


class AlertEngine:
    """The active alerts of every daemon and the rules that raise and resolve them.

    Every method that can change the active set returns the :class:`Change`
    values it made, in order.

    Example::

        >>> engine = AlertEngine(AlertRules({"fds": Rule("fds", above=10, for_=5)}))
        >>> engine.observe("web", {"fds": 12}, now=100.0)
        []
        >>> [c.event for c in engine.observe("web", {"fds": 12}, now=105.0)]
        ['fired']
    """

    def __init__(self, rules: AlertRules | None = None) -> None:
        self.rules = rules or AlertRules()
        self._active: dict[tuple[str, str], Alert] = {}
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._restarts: dict[str, deque[float]] = {}
        #: alerts that fired since the engine started, by kind
        self.fired: Counter[str] = Counter()

    # -- reading -----------------------------------------------------------------------

    def active(self) -> list[Alert]:
        """The active alerts, oldest first."""
        return sorted(self._active.values(), key=lambda a: (a.since, a.daemon, a.alert))

    def is_active(self, daemon: str, kind: str) -> bool:
        return (daemon, kind) in self._active

    # -- thresholds --------------------------------------------------------------------

    def observe(self, daemon: str, values: Mapping[str, float], now: float) -> list[Change]:
        """One sample of ``daemon``'s usage (``cpu``, ``memory``, ``fds``; missing ones skipped)."""
        rules = self.rules.for_daemon(daemon)
        changes: list[Change] = []
        for kind in USAGE_KINDS:
            value = values.get(kind)
            rule = rules.get(kind)
            if rule is None:
                changes += self._drop(daemon, kind, now, "its rule was removed")
            elif value is not None:
                changes += self._threshold(daemon, rule, float(value), now)
        changes += self._restart_check(daemon, rules.get("restarts"), now)
        return changes

    def restarted(self, daemon: str, now: float) -> list[Change]:
        """``daemon`` was restarted by its supervisor at ``now``."""
        history = self._restarts.setdefault(daemon, deque(maxlen=MAX_RESTART_HISTORY))
        history.append(now)
        return self._restart_check(daemon, self.rules.for_daemon(daemon).get("restarts"), now)

    def tick(self, now: float) -> list[Change]:
        """Time passed: the restart windows slide (call it every sampling interval)."""
        changes: list[Change] = []
        daemons = set(self._restarts) | {d for d, k in self._active if k == "restarts"}
        for daemon in sorted(daemons):
            rule = self.rules.for_daemon(daemon).get("restarts")
            changes += self._restart_check(daemon, rule, now)
        return changes

    def _restart_check(self, daemon: str, rule: Rule | None, now: float) -> list[Change]:
        history = self._restarts.get(daemon)
        if rule is None:
            if history is not None and not history:
                del self._restarts[daemon]
            return self._drop(daemon, "restarts", now, "its rule was removed")
        if history is None and not self.is_active(daemon, "restarts"):
            return []
        count = 0
        if history is not None:
            while history and history[0] <= now - rule.window:
                history.popleft()
            count = len(history)
            if not history and not self.is_active(daemon, "restarts"):
                del self._restarts[daemon]
                self._tracks.pop((daemon, "restarts"), None)
                return []
        return self._threshold(daemon, rule, float(count), now)

    def _threshold(self, daemon: str, rule: Rule, value: float, now: float) -> list[Change]:
        assert rule.above is not None
        key = (daemon, rule.kind)
        track = self._tracks.setdefault(key, _Track())
        alert = self._active.get(key)
        if alert is None:
            if value < rule.above:
                track.above_since = None
                return []
            if track.above_since is None:
                track.above_since = now
            if now - track.above_since < rule.for_:
                return []
            track.above_since, track.below_since = None, None
            fired = Alert(
                rule.kind,
                daemon,
                rule.severity,
                value,
                rule.above,
                now,
                _message(rule, daemon, value),
            )
            return [self._fire(fired, rule, now)]
        # active: keep showing the latest value; resolve after resolve_for below the line
        self._active[key] = alert.with_value(value, rule.severity)
        if value >= rule.resolve_threshold:
            track.below_since = None
            return []
        if track.below_since is None:
            track.below_since = now
        if now - track.below_since < rule.resolve_after:
            return []
        track.below_since = None
        return [self._resolve(key, rule, now, value)]

    def stopped_running(self, daemon: str, now: float) -> list[Change]:
        """``daemon``'s process is gone: its usage alerts resolve, pending ones start over."""
        changes: list[Change] = []
        for kind in USAGE_KINDS:
            changes += self._drop(daemon, kind, now, None)
        return changes

    def _drop(self, daemon: str, kind: str, now: float, why: str | None) -> list[Change]:
        self._tracks.pop((daemon, kind), None)
        alert = self._active.get((daemon, kind))
        if alert is None:
            return []
        rule = self.rules.for_daemon(daemon).get(kind) or _bare_rule(alert)
        return [self._resolve((daemon, kind), rule, now, alert.value)]

    # -- events ------------------------------------------------------------------------

    def raise_event(
        self, daemon: str, kind: str, now: float, message: str, value: float | None = None
    ) -> list[Change]:
        """An event alert (``failed``, ``gave_up``, ``health``) happened to ``daemon``."""
        rule = self.rules.for_daemon(daemon).get(kind)
        if rule is None or (daemon, kind) in self._active:
            return []
        fired = Alert(rule.kind, daemon, rule.severity, value, None, now, message)
        return [self._fire(fired, rule, now)]

    def clear_event(self, daemon: str, kind: str, now: float) -> list[Change]:
        """The condition of an event alert ended (the daemon left failed, health recovered)."""
        alert = self._active.get((daemon, kind))
        if alert is None:
            return []
        rule = self.rules.for_daemon(daemon).get(kind) or _bare_rule(alert)
        return [self._resolve((daemon, kind), rule, now, alert.value)]

    def forget(self, keep: Iterable[str], now: float) -> list[Change]:
        """Resolve the alerts of daemons not in ``keep`` (removed from the tree) and forget them."""
        names = set(keep)
        changes: list[Change] = []
        for daemon, kind in [key for key in self._active if key[0] not in names]:
            alert = self._active[(daemon, kind)]
            rule = self.rules.for_daemon(daemon).get(kind) or _bare_rule(alert)
            changes.append(self._resolve((daemon, kind), rule, now, alert.value))
        for key in [key for key in self._tracks if key[0] not in names]:
            del self._tracks[key]
        for daemon in [d for d in self._restarts if d not in names]:
            del self._restarts[daemon]
        return changes

    def _fire(self, alert: Alert, rule: Rule, now: float) -> Change:
        self._active[(alert.daemon, alert.alert)] = alert
        self.fired[alert.alert] += 1
        return Change("fired", alert, rule, now)

    def _resolve(self, key: tuple[str, str], rule: Rule, now: float, value: float | None) -> Change:
        alert = self._active.pop(key).with_value(value)
        return Change("resolved", alert, rule, now)


class NotificationLimiter:
    """Who may be told now: one notification per key and ``interval``, ``per_minute`` in all.

    A key is (event, alert, daemon); what is held back is counted in
    :attr:`suppressed` (for ever) and in the figures :meth:`take_held`
    returns (since the last call), for a summary line.

    >>> limiter = NotificationLimiter(interval=60, per_minute=100)
    >>> limiter.allow(("fired", "fds", "web"), 0.0), limiter.allow(("fired", "fds", "web"), 30.0)
    (True, False)
    >>> limiter.allow(("fired", "fds", "web"), 61.0), limiter.suppressed
    (True, 1)
    """

    def __init__(self, interval: float, per_minute: int) -> None:
        self.interval, self.per_minute = interval, per_minute
        self._last: dict[tuple[str, ...], float] = {}
        self._recent: deque[float] = deque()
        self.suppressed = 0
        self._held: Counter[str] = Counter()

    def allow(self, key: tuple[str, ...], now: float) -> bool:
        """True if a notification for ``key`` may go out at ``now`` (and count it as sent)."""
        last = self._last.get(key)
        while self._recent and self._recent[0] <= now - 60.0:
            self._recent.popleft()
        if (last is not None and now - last < self.interval) or len(
            self._recent
        ) >= self.per_minute:
            self.suppressed += 1
            self._held[":".join(key[:2])] += 1
            return False
        if len(self._last) >= 4096:  # one entry per key seen: forget the expired ones
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._last[key] = now
        self._recent.append(now)
        return True

    def take_held(self) -> Counter[str]:
        """What was held back since the last call, by ``event:alert``."""
        held, self._held = self._held, Counter()
        return held


class AlertCollector:
    """The ``ikos_alert*`` series (docs/operations.md), read from the engine at scrape time.

    ``source`` returns the active alerts, the fired counts by kind and the
    number of suppressed notifications; it runs in the HTTP server's thread,
    so it must only read values the loop replaces whole.
    """

    def __init__(self, source: Callable[[], tuple[list[Alert], Mapping[str, int], int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        # scraped only when the metrics endpoint is on, which has loaded prometheus_client;
        # the engine itself never needs it (ikosd --metrics off does not load it)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        active, fired, suppressed = self._source()
        yield GaugeMetricFamily("ikos_alerts_active", "Active alerts", value=len(active))
        firing = GaugeMetricFamily(
            "ikos_alert_firing",
            "1 while this alert is active",
            labels=["alert", "daemon", "severity"],
        )
        for alert in active:
            firing.add_metric([alert.alert, alert.daemon, alert.severity], 1)
        yield firing
        total = CounterMetricFamily(
            "ikos_alerts_fired", "Alerts that fired, by kind", labels=["alert"]
        )
        for kind in KINDS:
            total.add_metric([kind], fired.get(kind, 0))
        yield total
        yield CounterMetricFamily(
            "ikos_alerts_suppressed",
            "Alert notifications held back by the rate limit",
            value=suppressed,
        )
