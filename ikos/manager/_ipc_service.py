"""The IPC service: runs the instance's broker as a daemon of the tree, and reports on it.

The broker (``ikos.ipc._broker``) is a process of its own, supervised like any
daemon: this extension inserts it as ``ikos-broker``, an ``ikos.Exec`` of type
``notify``, under a supervisor of its own, ``ikos-system``, the first child of the
root (``amend_tree``, at start and on every reload), so it starts before anything
that might talk to it and stops after everything else. ``ikos-system`` restarts
the broker with back-off and never gives up, so the broker's failures never count
against the root's restart intensity: a broker that keeps crashing leaves IPC
down (and visible as such), never the instance's daemons. The manager's loop
stays off the message path: all it does for IPC is write the broker's
configuration (``RUN/ipc/broker.json``, from the ``[ipc]`` table, atomically,
before the broker starts and on every reload, then SIGHUP), and read the
broker's figures for ``ikosctl status`` (the verb ``ipc_stats``) and for
Prometheus (``ikos_ipc_*``).

The broker is socket-activated (``ikos.platform._activation``): ikosd binds and
holds ``RUN/ipc/broker.sock`` from its start to its end, and starts the broker
(held, ``auto_start = false``) when that socket first becomes readable, unless
``[ipc] start = "eager"`` asks for it at once. The broker takes the listening
socket from ikosd; a connect is never refused, before the broker runs or while
it restarts, and an instance whose daemons never use IPC never pays for a second
interpreter. Until then ``ikosctl status`` shows the broker ``stopped``, with
``activation: waiting`` (waiting for its first connection), never failed.

Figures are fetched with the synchronous client in a worker thread (a scrape
runs in the HTTP server's thread already), at most once per :data:`STATS_TTL`,
so that neither a busy broker nor a scraper hammering ``/metrics`` can make the
manager wait: a broker that does not answer within :data:`STATS_TIMEOUT` is
reported as down.

Rejected: running the broker inside ikosd (every publication would cross the
manager's loop, and a flood of clients would compete with supervision), and
making the broker an actor (the actor runtime's one-message-at-a-time mailbox is
the wrong shape for a fan-out server holding thousands of connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ikos._errors import ConfigError, IkosError
from ikos.manager._extension import Config, Extension, ExtensionHost, NodeView, TreeView
from ikos.manager._settings import IpcSettings, read_ipc_settings
from ikos.platform._activation import ENV as ACTIVATION_ENV
from ikos.platform._activation import (
    Handoff,
    activation_socket,
    broker_socket,
    listening_socket,
    serves,
)
from ikos.platform._database import write_durably
from ikos.supervision._runtime import State
from ikos.supervision._spec import Backoff, Exec, Supervisor

if TYPE_CHECKING:
    from ikos.ipc._client import BrokerClient

log = logging.getLogger("ikos.ipc")

BROKER_NAME: Final = "ikos-broker"
#: The supervisor that holds the broker, the root's first child.
SYSTEM_NAME: Final = "ikos-system"
#: The broker is restarted with growing pauses, and its supervisor never gives up
#: (no window holds 1,000 restarts spaced by the back-off): a broker that keeps
#: failing leaves IPC down and says so, it never takes the instance's daemons down.
SYSTEM_BACKOFF: Final = Backoff(min=0.1, max=5.0, random_factor=0.2, reset_after=10.0)
#: How long fetched figures are reused, and how long a fetch may take.
STATS_TTL: Final = 1.0
STATS_TIMEOUT: Final = 2.0
#: Seconds between two looks for the broker's node when a client came before the tree.
REARM_DELAY: Final = 0.05
#: The ``activation`` of the broker's status while ikosd waits for its first client.
WAITING: Final = "waiting"


def broker_spec(
    paths_root: Path | None,
    environ: dict[str, str] | None = None,
    *,
    activation: Path | None = None,
    eager: bool = True,
) -> Exec:
    """The ``ikos-broker`` daemon of an instance (``paths_root`` None: the default instance).

    The broker must import the same ikos as ikosd, wherever ikosd found it (an
    editable checkout, ``PYTHONPATH``), so the package's parent directory goes
    first on the broker's ``PYTHONPATH``. ``activation``: where the broker takes
    its listening socket from ikosd; ``eager`` false: held until started (on demand).
    """
    env = os.environ if environ is None else environ
    package_parent = str(Path(__file__).resolve().parents[2])  # .../ikos/manager/this
    pythonpath = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    args = ["-m", "ikos.ipc._broker"]
    if paths_root is not None:
        args += ["--root", str(paths_root)]
    environment = {"PYTHONPATH": pythonpath}
    if activation is not None:
        environment[ACTIVATION_ENV] = str(activation)
    return Exec(
        BROKER_NAME,
        sys.executable,
        description="the IPC broker (ikos.ipc: publish/subscribe, queues, calls)",
        shutdown=10.0,
        fields={
            "args": args,
            "type": "notify",
            "environment": environment,
            "auto_start": eager,
        },
    )


class IpcService(Extension):
    """Runs ``ikos-broker`` with the ``[ipc]`` settings; answers ``ipc_stats``; exports metrics."""

    leading = (SYSTEM_NAME,)

    name = "ipc"

    def __init__(self, metrics: Any = None) -> None:
        #: the MetricsService whose endpoint gets the ``ikos_ipc_*`` collector, if any
        self._metrics = metrics
        self._view: TreeView | None = None
        self.settings = IpcSettings()
        self._pending: IpcSettings | None = None
        self._client: BrokerClient | None = None
        self._client_lock = threading.Lock()
        self._cache: tuple[float, dict[str, Any] | None, str] = (0.0, None, "")
        self._ops: Any = None
        #: the broker's listening socket, held by ikosd (None: disabled, or a broker
        #: adopted from a previous ikosd still holds its own until it next stops)
        self._listener: socket.socket | None = None
        self._handoff: Handoff | None = None
        self._watching = False  # the listener's readability starts the broker
        self._closing = False  # ikos-system (or the root) is stopping: start nothing
        self._starting: asyncio.Task[None] | None = None

    # -- life ---------------------------------------------------------------------------

    async def start(self, host: ExtensionHost) -> None:
        self._view, self._ops = host.view, host.ops
        self.settings = self._read(host.view.config)
        if self.settings.enabled:
            self._write_broker_json(self.settings)
            self._open_sockets()
        self._publish_threshold(self.settings)
        # public, so that anyone's ``ikosctl status`` may show the totals without a
        # refusal in the audit trail; the whole document (pids, names, topics) only
        # to readers
        host.verbs.register("ipc_stats", "public", self._verb_stats)
        if self._metrics is not None:
            self._metrics.endpoint.add(IpcCollector(self.figures, self._broker_waiting))

    async def stop(self) -> None:
        self._closing = True
        self._unwatch()
        if self._starting is not None:
            self._starting.cancel()
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        if self._handoff is not None:
            asyncio.get_running_loop().remove_reader(self._handoff.sock.fileno())
            self._handoff.close()
            self._handoff = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.broker_socket.unlink()

    # -- socket activation ----------------------------------------------------------------

    @property
    def broker_socket(self) -> Path:
        assert self._view is not None
        return broker_socket(self._view.paths)

    def _open_sockets(self) -> None:
        """Hold the broker's socket (unless an adopted broker serves it) and the handoff."""
        assert self._view is not None
        if serves(self.broker_socket):
            # a broker left running by a killed ikosd, about to be adopted, holds the
            # socket it took: keep it serving; ikosd binds a new one when it next stops
            log.info("ipc: a running broker serves %s; it keeps it", self.broker_socket)
        else:
            self._listener = listening_socket(self.broker_socket)
        self._handoff = Handoff(activation_socket(self._view.paths.run_dir))
        loop = asyncio.get_running_loop()
        loop.add_reader(self._handoff.sock.fileno(), self._hand_over)
        if self.settings.start == "on-demand":
            self._watch()

    def _ensure_listener(self) -> socket.socket:
        if self._listener is None:
            self._listener = listening_socket(self.broker_socket)
        return self._listener

    def _hand_over(self) -> None:
        assert self._handoff is not None
        try:
            listener = self._ensure_listener()
        except OSError as exc:
            log.error("ipc: cannot listen on %s: %s", self.broker_socket, exc)
            return
        self._handoff.give(listener)

    def _watch(self) -> None:
        if self._watching or self._closing or self._listener is None:
            return
        self._watching = True
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._wanted)

    def _unwatch(self) -> None:
        if self._watching and self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
        self._watching = False

    def _wanted(self) -> None:
        """A client waits on the broker's socket: start the broker if nobody else will."""
        self._unwatch()
        if self._closing:
            return
        node = self._view.find(BROKER_NAME) if self._view is not None else None
        loop = asyncio.get_running_loop()
        if node is None:  # a client came before the tree: look again in a moment
            loop.call_later(REARM_DELAY, self._watch)
            return
        if node.alive or node.state is not State.STOPPED:
            return  # running, or its supervisor restarts it: it accepts soon
        log.info("ipc: a client connected to %s: starting the broker", self.broker_socket)
        self._starting = loop.create_task(self._start_broker(), name="ipc:activate")

    async def _start_broker(self) -> None:
        try:
            await self._ops.start(BROKER_NAME)
        except IkosError as exc:  # its supervisor retries; the failure is in its status
            log.error("ipc: the broker did not start: %s", exc)
        finally:
            self._starting = None

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        if node.name == SYSTEM_NAME or node.parent is None:  # ikos-system or the root
            if new is State.STOPPING:
                self._closing = True
                self._unwatch()
            elif new in (State.STARTING, State.RUNNING) and node.name == SYSTEM_NAME:
                self._closing = False
        elif node.name == BROKER_NAME and new is State.STOPPED and self._listener is not None:
            self._watch()  # stopped for good (an operator's stop): the next client restarts it
        elif node.name == BROKER_NAME and new is State.STOPPED and not self._closing:
            # the adopted broker that held its own socket is gone: ikosd takes over
            with contextlib.suppress(OSError):
                self._ensure_listener()
                self._watch()

    def _read(self, config: Config) -> IpcSettings:
        settings, _warnings = read_ipc_settings(config.file)  # warnings: load_config's
        return settings

    @property
    def broker_json(self) -> Path:
        assert self._view is not None
        return self._view.paths.run_dir / "ipc" / "broker.json"

    def _publish_threshold(self, settings: IpcSettings) -> None:
        """Add ``shm_threshold`` to ``instance.json``, where every ActorRef reads it.

        Mailbox traffic between the owner's processes never meets the broker, but
        it follows the same threshold.
        """
        assert self._view is not None
        file = self._view.paths.instance_file
        try:
            published = json.loads(file.read_text())
        except (OSError, ValueError):
            published = {}
        if not isinstance(published, dict):
            published = {}
        published["shm_threshold"] = settings.shm_threshold
        write_durably(file, json.dumps(published))
        os.chmod(file, 0o644)  # other users read the frame limit here

    def _write_broker_json(self, settings: IpcSettings) -> None:
        assert self._view is not None
        paths = self._view.paths
        directory = self.broker_json.parent
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)  # other users connect to the socket in it
        document = settings.broker_config(os.geteuid(), str(paths.log_dir / "ipc-audit.log"))
        write_durably(self.broker_json, json.dumps(document, indent=2) + "\n")

    # -- the tree -----------------------------------------------------------------------

    def amend_tree(self, tree: Supervisor, *, at_start: bool) -> Supervisor:
        assert self._view is not None
        if not at_start:
            # A bad [ipc] table refuses the whole reload, before anything changed.
            self._pending = self._read(self._view.config)
        settings = self.settings if at_start else self._pending
        assert settings is not None
        for _, spec in tree.walk():
            if spec.name in (BROKER_NAME, SYSTEM_NAME):
                raise ConfigError(
                    str(self._view.config.file) if self._view.config.file else None,
                    None,
                    spec.name,
                    f"no daemon or supervisor may be named '{spec.name}': "
                    "ikosd runs the IPC broker under that name",
                )
        if not settings.enabled:
            return tree
        system = Supervisor(
            SYSTEM_NAME,
            "one_for_one",
            max_restarts=1000,
            within=60.0,
            children=[
                broker_spec(
                    self._view.paths.root,
                    activation=activation_socket(self._view.paths.run_dir),
                    eager=settings.start == "eager",
                )
            ],
            backoff=SYSTEM_BACKOFF,
            description="ikos's own daemons (the IPC broker)",
        )
        return Supervisor(
            tree.name,
            tree.strategy,
            tree.max_restarts,
            tree.within,
            [system, *tree.children],
            restart=tree.restart,
            shutdown=tree.shutdown,
            requires=tree.requires,
            after=tree.after,
            description=tree.description,
            backoff=tree.backoff,
        )

    async def on_reload(self, config: Config) -> None:
        settings = self._pending or self._read(config)
        self._pending = None
        changed = settings != self.settings
        self.settings = settings
        self._publish_threshold(settings)
        if not settings.enabled:
            return
        self._write_broker_json(settings)
        if self._handoff is None:  # enabled by this reload
            self._open_sockets()
        node = self._view.find(BROKER_NAME) if self._view is not None else None
        if changed and node is not None and node.pid is not None and node.alive:
            try:
                os.kill(node.pid, signal.SIGHUP)
                log.info("ipc: broker.json rewritten; the broker (pid %d) re-reads it", node.pid)
            except ProcessLookupError:
                pass  # it is restarting: it reads the new file when it starts

    # -- figures --------------------------------------------------------------------------

    def figures(self) -> tuple[dict[str, Any] | None, str]:
        """The broker's stats and why they are missing (cached for :data:`STATS_TTL`)."""
        fetched, stats, error = self._cache
        if time.monotonic() - fetched < STATS_TTL:
            return stats, error
        if not self.settings.enabled:
            self._cache = (time.monotonic(), None, "the IPC broker is disabled ([ipc] enabled)")
            return self._cache[1:]
        assert self._view is not None
        node = self._view.find(BROKER_NAME)
        if node is None or node.state is not State.RUNNING:
            # a connection would start a broker waiting for its first client
            why = "the IPC broker is not running" + (
                " (started at its first connection)" if self.waiting(node) else ""
            )
            self._cache = (time.monotonic(), None, why)
            return self._cache[1:]
        with self._client_lock:
            try:
                if self._client is None:
                    from ikos.ipc._client import BrokerClient  # at the first figures

                    self._client = BrokerClient(
                        self._view.paths, label="ikosd", reconnect_timeout=0.5
                    )
                stats, error = self._client.stats(timeout=STATS_TIMEOUT), ""
            except IkosError as exc:
                stats, error = None, str(exc)
                if self._client is not None:
                    self._client.close()
                    self._client = None
        self._cache = (time.monotonic(), stats, error)
        return stats, error

    async def _verb_stats(self, req: Any) -> Any:
        stats, error = await asyncio.get_running_loop().run_in_executor(None, self.figures)
        if stats is None:
            answer = {"enabled": self.settings.enabled, "up": False, "error": error}
            if self._broker_waiting():
                answer["activation"] = WAITING
            return answer
        answer = {"enabled": True, "up": True, **summarize(stats)}
        if getattr(req, "reader", False):
            answer["stats"] = stats
        return answer

    def _broker_waiting(self) -> bool:
        return self._view is not None and self.waiting(self._view.find(BROKER_NAME))

    def waiting(self, node: NodeView | None) -> bool:
        """Whether the broker is down and ikosd listens for its first client in its stead."""
        return (
            node is not None
            and node.state is State.STOPPED
            and not node.alive
            and self._watching
            and not self._closing
        )

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        if node.name != BROKER_NAME:
            return
        if self.waiting(node):
            status["activation"] = WAITING  # ikosd listens: the first client starts it
        fetched, stats, _error = self._cache
        if stats is not None and time.monotonic() - fetched < 30 * STATS_TTL:
            status["ipc"] = summarize(stats)


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures ``ikosctl status`` shows: totals over topics, subscribers and queues."""
    topics = stats.get("topics")
    topics = topics if isinstance(topics, dict) else {}

    def total(key: str) -> int:
        return sum(int(t.get(key, 0)) for t in _dicts(topics.values()))

    queues = list(_dicts(stats.get("queues") or []))
    return {
        "clients": int(stats.get("clients", 0) or 0),
        "subscriptions": int(stats.get("subscriptions", 0) or 0),
        "served": len(stats.get("served") or []),
        "published": total("published"),
        "delivered": total("delivered"),
        "dropped": total("dropped"),
        "undeliverable": total("undeliverable"),
        "queues": len(queues),
        "queued": sum(queue_depth(q) for q in queues),
        "dead": sum(_int(q, "dead") for q in queues),
    }


def queue_depth(queue: dict[str, Any]) -> int:
    """Messages a queue holds that are not dead: ready, delayed by a nack, or leased."""
    return _int(queue, "ready") + _int(queue, "delayed") + _int(queue, "leased")


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _dicts(items: Any) -> Iterator[dict[str, Any]]:
    if isinstance(items, Iterable) and not isinstance(items, str | bytes | dict):
        for item in items:
            if isinstance(item, dict):
                yield item


class IpcCollector:
    """``ikos_ipc_*``: the broker's clients, per-topic and per-subscriber counts, queues.

    Read at scrape time from :meth:`IpcService.figures` (cached, fetched in the
    scraping thread); ``ikos_ipc_broker_up`` is 0 when IPC is down: the broker
    did not answer, and ikosd is not waiting for a first connection to start it
    (a broker that was never needed is no outage: ``ikos_ipc_broker_waiting`` 1).
    """

    def __init__(
        self,
        figures: Callable[[], tuple[dict[str, Any] | None, str]],
        waiting: Callable[[], bool] = lambda: False,
    ) -> None:
        self.figures = figures
        self.waiting = waiting

    def collect(self) -> Iterator[Any]:
        # scraped only once the endpoint has loaded prometheus_client (never with metrics off)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, _error = self.figures()
        waiting = stats is None and self.waiting()
        up = GaugeMetricFamily(
            "ikos_ipc_broker_up",
            "1 when IPC is available: the broker answers, or starts at the first connection",
        )
        up.add_metric([], 1 if stats is not None or waiting else 0)
        yield up
        idle = GaugeMetricFamily(
            "ikos_ipc_broker_waiting",
            "1 while ikosd holds the broker's socket and waits for a first connection to start it",
        )
        idle.add_metric([], 1 if waiting else 0)
        yield idle
        if stats is None:
            return
        clients = GaugeMetricFamily("ikos_ipc_clients", "Connections to the IPC broker")
        clients.add_metric([], _int(stats, "clients"))
        yield clients
        subs = GaugeMetricFamily("ikos_ipc_subscriptions", "Topic subscriptions in the broker")
        subs.add_metric([], _int(stats, "subscriptions"))
        yield subs
        topics = stats.get("topics")
        topics = topics if isinstance(topics, dict) else {}
        for key, what in (
            ("published", "Messages published"),
            ("delivered", "Deliveries made to subscribers"),
            ("dropped", "Deliveries dropped for slow subscribers"),
            ("undeliverable", "Deliveries skipped (pickle to another uid)"),
        ):
            family = CounterMetricFamily(f"ikos_ipc_{key}", f"{what}, per topic", labels=["topic"])
            for topic, figures in topics.items():
                if isinstance(figures, dict):
                    family.add_metric([str(topic)], _int(figures, key))
            yield family
        dropped = CounterMetricFamily(
            "ikos_ipc_subscriber_dropped",
            "Deliveries dropped for one subscriber connection (drop-oldest)",
            labels=["subscriber", "pid"],
        )
        for sub in _dicts(stats.get("subscribers") or []):
            label = str(sub.get("name", "")) or f"client-{sub.get('client')}"
            dropped.add_metric([label, str(sub.get("pid", ""))], _int(sub, "dropped"))
        yield dropped
        queues = list(_dicts(stats.get("queues") or []))
        depth = GaugeMetricFamily(
            "ikos_ipc_queue_messages", "Messages in a durable queue, not dead", labels=["queue"]
        )
        leased = GaugeMetricFamily(
            "ikos_ipc_queue_leased_messages", "Messages handed out, not acked", labels=["queue"]
        )
        dead = GaugeMetricFamily(
            "ikos_ipc_queue_dead_messages", "Messages in a queue's dead letters", labels=["queue"]
        )
        size = GaugeMetricFamily(
            "ikos_ipc_queue_bytes", "Payload bytes held by a durable queue", labels=["queue"]
        )
        puts = CounterMetricFamily("ikos_ipc_queue_puts", "Durable puts", labels=["queue"])
        acks = CounterMetricFamily("ikos_ipc_queue_acks", "Acknowledged messages", labels=["queue"])
        for queue in queues:
            name = [str(queue.get("name", ""))]
            depth.add_metric(name, queue_depth(queue))
            leased.add_metric(name, _int(queue, "leased"))
            dead.add_metric(name, _int(queue, "dead"))
            size.add_metric(name, _int(queue, "bytes"))
            puts.add_metric(name, _int(queue, "puts"))
            acks.add_metric(name, _int(queue, "acks"))
        yield from (depth, leased, dead, size, puts, acks)
