"""Prometheus metrics of an ikos instance: the collector and the ``/metrics`` endpoint.

A collector reads the instance's state at scrape time instead of updating
gauges on every event: the tree is the source of truth, nothing can drift,
and the event loop pays nothing between scrapes. It knows nothing of the
manager: it is given a function returning a :class:`Snapshot`, plain data
taken from the tree, and turns it into metric families. Other parts add
collectors of their own to the same :class:`MetricsEndpoint` (the registry,
with :class:`RegistryCollector`, the resource sampler). The HTTP server and
the text writer are :mod:`ikos.monitor._exposition` (prometheus_client's
writer was most of a scrape's time with a large tree). Names follow the
contract: ``ikos_`` prefix, base units, ``_total`` for counters, labels for
daemon and supervisor.

prometheus_client and the HTTP server are imported by :class:`MetricsEndpoint`
and by the collectors' ``collect``, never by this module: the registry's
rows are imported by every ikosd, metrics on or off, and the library is a
seventh of ikosd's launch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ikos.monitor._text import TextFamily

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from ikos.monitor._exposition import MetricsServer

log = logging.getLogger("ikos.metrics")

STATES = ("stopped", "starting", "running", "stopping", "backoff", "failed")


@dataclass(frozen=True)
class DaemonRow:
    """One node of the tree at scrape time."""

    name: str
    kind: str
    supervisor: str
    state: str
    restarts: int
    started_at: float | None
    dead_letters: int = 0
    #: The Ray node a Ray-placed actor runs on ("" for a local process).
    node: str = ""


@dataclass(frozen=True)
class SupervisorRow:
    """A supervisor's restarts and what is left of its restart intensity."""

    name: str
    restarts: int
    intensity_left: int


@dataclass(frozen=True)
class ActorRow:
    """A running actor's own counters (read from its process's shared page)."""

    name: str
    mailbox_depth: int
    messages: int
    ask_sum_seconds: float
    #: ``(upper bound, cumulative count)`` per bucket, the last one's bound ``inf``
    ask_buckets: tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class Snapshot:
    """What the daemon collector exports, taken at scrape time."""

    daemons: list[DaemonRow]
    transitions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    manager_started_at: float = 0.0
    now: float = 0.0
    state_write_failures: int = 0
    state_pending_writes: int = 0
    fork_server_restarts: int = 0
    orphans_reaped: int = 0
    supervisors: list[SupervisorRow] = field(default_factory=list)
    actors: list[ActorRow] = field(default_factory=list)


class DaemonCollector:
    """Daemon states, restarts, transitions, dead letters, and the manager's own health."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        labels = ["daemon", "kind", "supervisor"]
        state = TextFamily(
            "ikos_daemon_state",
            "gauge",
            "1 for the daemon's current state, 0 otherwise",
            [*labels, "state"],
        )
        up = TextFamily("ikos_daemon_up", "gauge", "1 when the daemon runs", labels)
        restarts = TextFamily("ikos_daemon_restarts", "counter", "Restarts of the daemon", labels)
        started = TextFamily(
            "ikos_daemon_start_time_seconds",
            "gauge",
            "Unix time the daemon's current run started",
            labels,
        )
        dead = TextFamily(
            "ikos_dead_letters", "counter", "Messages to actors that were not there", ["daemon"]
        )
        # An info series per Ray-placed daemon (docs/scaling.md): its node as a label, to
        # join on ``daemon``; the daemon series keep their labels, so local-only
        # instances and the dashboards' queries are unchanged.
        placed = TextFamily(
            "ikos_daemon_node_info",
            "gauge",
            "1 for each daemon placed on a Ray cluster, labelled with its node",
            ["daemon", "supervisor", "node"],
        )
        for row in snap.daemons:
            values = [row.name, row.kind, row.supervisor]
            for s in STATES:
                state.add([*values, s], 1.0 if row.state == s else 0.0)
            up.add(values, 1.0 if row.state == "running" else 0.0)
            restarts.add(values, float(row.restarts))
            if row.started_at is not None and row.state == "running":
                started.add(values, row.started_at)
            if row.kind == "actor":
                dead.add([row.name], float(row.dead_letters))
            if row.node:
                placed.add([row.name, row.supervisor, row.node], 1.0)
        yield state
        yield up
        yield restarts
        yield started
        yield dead
        if any(row.node for row in snap.daemons):  # a local-only instance's page is unchanged
            yield placed
        trans = TextFamily(
            "ikos_state_transitions",
            "counter",
            "State transitions of daemons",
            ["daemon", "state"],
        )
        for (name, new), count in snap.transitions.items():
            trans.add([name, new], float(count))
        yield trans
        yield from _supervisor_families(snap.supervisors)
        yield from _actor_families(snap.actors)
        yield GaugeMetricFamily(
            "ikos_manager_start_time_seconds",
            "Unix time ikosd started",
            value=snap.manager_started_at,
        )
        yield GaugeMetricFamily(
            "ikos_manager_uptime_seconds",
            "Seconds since ikosd started",
            value=snap.now - snap.manager_started_at,
        )
        yield CounterMetricFamily(
            "ikos_state_write_failures",
            "Failed writes of the crash-recovery state (state.db)",
            value=snap.state_write_failures,
        )
        yield GaugeMetricFamily(
            "ikos_state_pending_writes",
            "Daemon records not yet written to state.db (non-zero while writes fail)",
            value=snap.state_pending_writes,
        )
        yield CounterMetricFamily(
            "ikos_fork_server_restarts",
            "Times the fork server died or hung and was replaced",
            value=snap.fork_server_restarts,
        )
        yield CounterMetricFamily(
            "ikos_orphans_reaped",
            "Orphaned processes re-parented to ikosd and reaped by it",
            value=snap.orphans_reaped,
        )


def _supervisor_families(rows: list[SupervisorRow]) -> Iterator[Any]:
    restarts = TextFamily(
        "ikos_supervisor_restarts",
        "counter",
        "Restarts the supervisor performed (one per restart decision, counted in its intensity)",
        ["supervisor"],
    )
    left = TextFamily(
        "ikos_supervisor_intensity_left",
        "gauge",
        "Restarts the supervisor still allows in its current window before it gives up",
        ["supervisor"],
    )
    for row in rows:
        restarts.add([row.name], float(row.restarts))
        left.add([row.name], float(row.intensity_left))
    yield restarts
    yield left


def _actor_families(rows: list[ActorRow]) -> Iterator[Any]:
    depth = TextFamily(
        "ikos_actor_mailbox_depth",
        "gauge",
        "Messages waiting in the actor's mailbox (read from its sockets, not yet handled)",
        ["daemon"],
    )
    messages = TextFamily(
        "ikos_actor_messages",
        "counter",
        "Messages the actor's current process handled (tells and asks)",
        ["daemon"],
    )
    asks = TextFamily(
        "ikos_actor_ask_duration_seconds",
        "histogram",
        "Time the actor took to answer an ask, from taking it off its mailbox to sending the reply",
        ["daemon"],
    )
    for row in rows:
        depth.add([row.name], float(row.mailbox_depth))
        messages.add([row.name], float(row.messages))
        asks.add_histogram(
            [row.name],
            [(_le(bound), float(count)) for bound, count in row.ask_buckets],
            row.ask_sum_seconds,
        )
    yield depth
    yield messages
    yield asks


def _le(bound: float) -> str:
    """A bucket's ``le`` label as Prometheus writes it (``+Inf``, ``0.005``, ``1.0``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass(frozen=True)
class ServiceRow:
    """A registered service: its owning daemon ("" for a plain process) and whether it is up."""

    service: str
    daemon: str
    up: bool
    #: False: counted among the services, no ``ikos_service_up`` (its daemon was removed)
    shown: bool = True


@dataclass(frozen=True)
class CheckRow:
    """A health check of a daemon: its last result (None before the first) and its counts."""

    daemon: str
    check: str
    last_passed: bool | None
    passes: int
    failures: int


@dataclass(frozen=True)
class RegistrySnapshot:
    """What the registry collector exports, taken at scrape time."""

    services: list[ServiceRow]
    checks: list[CheckRow]


class RegistryCollector:
    """Registered services, whether each is up, and the daemons' health-check results."""

    def __init__(self, snapshot: Callable[[], RegistrySnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        yield GaugeMetricFamily(
            "ikos_registry_services",
            "Services registered (active or not)",
            value=float(len(snap.services)),
        )
        up = GaugeMetricFamily(
            "ikos_service_up",
            "1 when the service is active and its provider is healthy (passing or warning)",
            labels=["service", "daemon"],
        )
        for service in snap.services:
            if service.shown:
                up.add_metric([service.service, service.daemon], 1.0 if service.up else 0.0)
        yield up
        check_up = GaugeMetricFamily(
            "ikos_health_check_up",
            "1 when the check's last result passed, 0 when it failed",
            labels=["daemon", "check"],
        )
        results = CounterMetricFamily(
            "ikos_health_checks",
            "Health-check results, by result",
            labels=["daemon", "check", "result"],
        )
        for check in snap.checks:
            if check.last_passed is not None:
                check_up.add_metric([check.daemon, check.check], 1.0 if check.last_passed else 0.0)
            results.add_metric([check.daemon, check.check, "pass"], float(check.passes))
            results.add_metric([check.daemon, check.check, "fail"], float(check.failures))
        yield check_up
        yield results


class MetricsEndpoint:
    """A Prometheus registry served over HTTP at ``/metrics``."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.server: MetricsServer | None = None

    def add(self, collector: Collector) -> None:
        """Export ``collector``'s metrics too."""
        self.registry.register(collector)

    def serve(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port); OSError if it cannot."""
        from ikos.monitor._exposition import MetricsServer

        self.server = MetricsServer(host, port, self.registry)
        log.info("metrics at %s", self.url)

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` actually bound (IPv6 in brackets), once serving."""
        if self.server is None:
            return None
        host, port = self.server.server_address[:2]
        if isinstance(host, bytes):  # an AF_UNIX path: never for an HTTP server
            host = host.decode()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str | None:
        """``http://HOST:PORT/metrics`` once serving."""
        address = self.address
        return f"http://{address}/metrics" if address else None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
