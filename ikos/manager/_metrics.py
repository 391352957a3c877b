"""The metrics service: ikosd's Prometheus endpoint, as an extension of the manager.

It counts the daemons' state transitions as they happen and, at scrape
time, takes a :class:`~ikos.monitor._metrics.Snapshot` of the tree through
the extension API's read-only view; the collector and the HTTP server live
in :mod:`ikos.monitor._metrics`. A scrape runs in the HTTP server's thread
and only reads: each node's attributes are replaced whole by the loop, so
the worst a race can give is a value one event old.

The address: several instances run on one machine, so only the system
instance (root's, without ``--root``) has a fixed default port (9464); every
other one lets the kernel pick a free port. Wherever it listens, the address
actually bound goes to ``RUN/metrics.json``, a Prometheus ``file_sd`` target
file (so a Prometheus can follow an instance whose port changes), to the root
supervisor's status (``ikosctl status``) and to the ready line. An address
given explicitly that cannot be bound stops ikosd with a clear error; the
system default that is taken falls back to a free port with a warning, as a
manager must not fail to start over a port of its own monitoring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ikos._errors import ManagerError
from ikos.actors._stats import ASK_BUCKETS
from ikos.manager._extension import Config, Extension, ExtensionHost, NodeView, TreeView
from ikos.manager._ray import RayHandle
from ikos.monitor._metrics import (
    ActorRow,
    DaemonCollector,
    DaemonRow,
    MetricsEndpoint,
    Snapshot,
    SupervisorRow,
)
from ikos.platform._database import write_durably
from ikos.platform._paths import InstancePaths
from ikos.supervision._runtime import State, SupervisorNode

log = logging.getLogger("ikos.metrics")

#: Where the bound address is published, under the instance's run directory.
METRICS_FILE = "metrics.json"
_BOUNDS = (*ASK_BUCKETS, float("inf"))


def metrics_file(paths: InstancePaths) -> Path:
    """``RUN/metrics.json``: the address an instance's ``/metrics`` is served at."""
    return paths.run_dir / METRICS_FILE


class MetricsService(Extension):
    """Serves ``/metrics`` on ``host:port`` for as long as ikosd runs."""

    name = "metrics"

    def __init__(self, host: str, port: int, fallback: bool = False) -> None:
        #: ``fallback``: a taken ``host:port`` means any free port (the default
        #: address) rather than a refusal to start (an address given explicitly)
        self.host, self.port, self.fallback = host, port, fallback
        self.endpoint = MetricsEndpoint()
        self.transitions: Counter[tuple[str, str]] = Counter()
        self._view: TreeView | None = None
        self._file: Path | None = None
        #: forget the counts of removed daemons once the counter holds this many
        self._prune_at = 256

    @property
    def url(self) -> str | None:
        """Where the metrics are served (None when the address could not be bound)."""
        return self.endpoint.url

    def ready_note(self) -> str | None:
        return f"metrics {self.url}" if self.url else None

    async def start(self, host: ExtensionHost) -> None:
        self._view = host.view
        self.endpoint.add(DaemonCollector(self.snapshot))
        try:
            self.endpoint.serve(self.host, self.port)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if not self.fallback:
                raise ManagerError(
                    f"cannot serve metrics on {self.host}:{self.port}: {why} "
                    "(the address of --metrics or [ikosd] metrics; 'off' or false disables them)"
                ) from None
            log.warning(
                "metrics: cannot listen on %s:%d (%s): serving on a free port instead",
                self.host,
                self.port,
                why,
            )
            try:
                self.endpoint.serve(self.host, 0)
            except OSError as again:
                raise ManagerError(
                    f"cannot serve metrics on {self.host}: {again.strerror or again}"
                ) from None
        self._publish(host.view.paths)

    def _publish(self, paths: InstancePaths) -> None:
        """Write ``RUN/metrics.json``, readable by all (an address is no secret)."""
        file = metrics_file(paths)
        labels = {"ikos_root": str(paths.root)} if paths.root is not None else {}
        document = [{"targets": [self.endpoint.address], "labels": labels}]
        write_durably(file, json.dumps(document) + "\n")
        os.chmod(file, 0o644)
        self._file = file

    async def stop(self) -> None:
        self.endpoint.close()
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._file.unlink()
            self._file = None

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        # ikosd's own facts go with the root supervisor, which ikosd runs itself
        if node.parent is None:
            status["metrics"] = self.url

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        self.transitions[(node.name, new.value)] += 1
        if len(self.transitions) > self._prune_at:  # daemons created and deleted at run time
            self._prune()

    async def on_reload(self, config: Config) -> None:
        self._prune()

    def _prune(self) -> None:
        """Drop the transition counts of daemons no longer in the tree (a bound on memory)."""
        assert self._view is not None
        names = {node.name for node in self._view.walk()}
        for key in [key for key in self.transitions if key[0] not in names]:
            del self.transitions[key]
        self._prune_at = 2 * len(self.transitions) + 256

    def snapshot(self) -> Snapshot:
        view = self._view
        assert view is not None, "the metrics service has not started"
        rows = []
        supervisors, actors = [], []
        dead = view.dead_letters
        for node in list(view.walk()):
            parent = node.parent
            if isinstance(node, SupervisorNode):
                supervisors.append(
                    SupervisorRow(node.name, node.restarts_performed, node.intensity_left())
                )
            elif node.kind == "actor" and node.state is State.RUNNING:
                figures = view.actor_figures(node.name)
                if figures is not None:
                    actors.append(
                        ActorRow(
                            node.name,
                            figures.mailbox_depth,
                            figures.messages,
                            figures.ask_sum_seconds,
                            tuple(zip(_BOUNDS, figures.ask_buckets, strict=True)),
                        )
                    )
            rows.append(
                DaemonRow(
                    node.name,
                    node.kind,
                    parent.name if parent is not None else "",
                    node.state.value,
                    node.restarts,
                    node.started_at,
                    dead.get(node.name, 0),
                    _ray_node(node),
                )
            )
        health = view.health()
        store = health.get("state_store") or {}
        # Only the daemons in the tree: a removed one's series must disappear, not
        # linger as a flat line (``list`` copies in one step, the loop may be counting).
        names = {row.name for row in rows}
        transitions = {k: v for k, v in list(self.transitions.items()) if k[0] in names}
        return Snapshot(
            rows,
            transitions,
            view.started_at,
            time.time(),
            int(store.get("failures", 0)),
            int(store.get("pending", 0)),
            int(health.get("fork_server_restarts", 0)),
            int(health.get("orphans_reaped", 0)),
            supervisors=supervisors,
            actors=actors,
        )


def _ray_node(node: NodeView) -> str:
    """The Ray node (address) a Ray-placed daemon runs on, else ""."""
    handle = getattr(node, "handle", None)
    if isinstance(handle, RayHandle) and handle.alive:
        return handle.node_ip or handle.node_id
    return ""
