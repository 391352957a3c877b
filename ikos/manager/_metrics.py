"""The metrics service: ikosd's Prometheus endpoint, as an extension of the manager.

It counts the daemons' state transitions as they happen and, at scrape
time, takes a :class:`~ikos.monitor._metrics.Snapshot` of the tree through
the extension API's read-only view; the collector and the HTTP server live
in :mod:`ikos.monitor._metrics`. A scrape runs in the HTTP server's thread
and only reads: each node's attributes are replaced whole by the loop, so
the worst a race can give is a value one event old.
"""

from __future__ import annotations

import time
from collections import Counter

from ikos.manager._extension import Extension, ExtensionHost, NodeView, TreeView
from ikos.monitor._metrics import DaemonCollector, DaemonRow, MetricsEndpoint, Snapshot
from ikos.supervision._runtime import State


class MetricsService(Extension):
    """Serves ``/metrics`` on ``host:port`` for as long as ikosd runs."""

    name = "metrics"

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.endpoint = MetricsEndpoint()
        self.transitions: Counter[tuple[str, str]] = Counter()
        self._view: TreeView | None = None

    @property
    def url(self) -> str | None:
        """Where the metrics are served (None when the address could not be bound)."""
        return self.endpoint.url

    def ready_note(self) -> str | None:
        return f"metrics {self.url}" if self.url else None

    async def start(self, host: ExtensionHost) -> None:
        self._view = host.view
        self.endpoint.add(DaemonCollector(self.snapshot))
        self.endpoint.serve(self.host, self.port)

    async def stop(self) -> None:
        self.endpoint.close()

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        self.transitions[(node.name, new.value)] += 1

    def snapshot(self) -> Snapshot:
        view = self._view
        assert view is not None, "the metrics service has not started"
        rows = []
        dead = view.dead_letters
        for node in list(view.walk()):
            parent = node.parent
            rows.append(
                DaemonRow(
                    node.name,
                    node.kind,
                    parent.name if parent is not None else "",
                    node.state.value,
                    node.restarts,
                    node.started_at,
                    dead.get(node.name, 0),
                )
            )
        health = view.health()
        store = health.get("state_store") or {}
        return Snapshot(
            rows,
            dict(self.transitions),
            view.started_at,
            time.time(),
            int(store.get("failures", 0)),
            int(store.get("pending", 0)),
            int(health.get("fork_server_restarts", 0)),
            int(health.get("orphans_reaped", 0)),
        )
