"""Prometheus metrics of one ikosd, served over HTTP at ``/metrics``.

A custom collector reads the manager's state at scrape time instead of
updating gauges on every event: the tree is the source of truth, nothing
can drift, and the event loop pays nothing between scrapes. The HTTP server
is prometheus_client's (a daemon thread); a scrape reads plain attributes,
which is safe under the GIL since the loop only replaces them wholesale.
Names follow the contract: ``ikos_`` prefix, base units, ``_total`` for
counters, labels for daemon and supervisor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ikos.manager._manager import Manager

log = logging.getLogger("ikos.metrics")

STATES = ("stopped", "starting", "running", "stopping", "backoff", "failed")


class ManagerCollector(Collector):
    """Collects the daemon states, restarts, transitions and dead letters of a manager."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager

    def collect(self) -> Iterator[Any]:
        m = self.m
        nodes = list(m.nodes.values())
        state = GaugeMetricFamily(
            "ikos_daemon_state",
            "1 for the daemon's current state, 0 otherwise",
            labels=["daemon", "kind", "supervisor", "state"],
        )
        up = GaugeMetricFamily(
            "ikos_daemon_up", "1 when the daemon runs", labels=["daemon", "kind", "supervisor"]
        )
        restarts = CounterMetricFamily(
            "ikos_daemon_restarts",
            "Restarts of the daemon",
            labels=["daemon", "kind", "supervisor"],
        )
        started = GaugeMetricFamily(
            "ikos_daemon_start_time_seconds",
            "Unix time the daemon's current run started",
            labels=["daemon", "kind", "supervisor"],
        )
        for node in nodes:
            sup = node.parent.name if node.parent else ""
            labels = [node.name, node.kind, sup]
            for s in STATES:
                state.add_metric([*labels, s], 1.0 if node.state.value == s else 0.0)
            up.add_metric(labels, 1.0 if node.state.value == "running" else 0.0)
            restarts.add_metric(labels, float(node.restarts))
            if node.started_at is not None and node.state.value == "running":
                started.add_metric(labels, node.started_at)
        yield state
        yield up
        yield restarts
        yield started
        trans = CounterMetricFamily(
            "ikos_state_transitions", "State transitions of daemons", labels=["daemon", "state"]
        )
        for (name, new), count in list(m.transitions.items()):
            trans.add_metric([name, new], float(count))
        yield trans
        dead = CounterMetricFamily(
            "ikos_dead_letters", "Messages to actors that were not there", labels=["daemon"]
        )
        for name, count in list(m.dead_letters.items()):
            dead.add_metric([name], float(count))
        yield dead
        yield GaugeMetricFamily(
            "ikos_manager_start_time_seconds", "Unix time ikosd started", value=m.started_at
        )
        yield GaugeMetricFamily(
            "ikos_manager_uptime_seconds",
            "Seconds since ikosd started",
            value=time.time() - m.started_at,
        )


def serve_metrics(manager: Manager, host: str, port: int) -> Any:
    """Start the /metrics HTTP server; returns the server (or None when it cannot bind)."""
    registry = CollectorRegistry()
    registry.register(ManagerCollector(manager))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("metrics not served: cannot listen on %s:%d: %s", host, port, exc)
        return None
    log.info("metrics at http://%s:%d/metrics", host, server.server_address[1])
    return server
