"""The registry inside ikosd: the store, owners' lives, health monitors, the verbs.

:class:`RegistryService` is a manager extension
(:mod:`ikos.manager._extension`). It owns the :class:`RegistryStore` under the
state directory and serves the registry's control verbs (``register``,
``discover``, ``wait_service``, ``watch``... in ``docs/protocol.md``). It also
ties the registry to the tree: services a daemon declares in the configuration
are registered when it runs, every service of a daemon turns inactive when it
stops running, and each daemon with health checks gets a
:class:`HealthMonitor` while it runs, whose status shows in ``status``, in the
services' ``health`` and as events, and which may restart the daemon.

Ownership: a registration belongs to the process that sent it, as the kernel
says (``SO_PEERCRED``), never as the request says. The manager watches every
owner through a pidfd, the way it watches its own children: the exit of an
owner turns its services inactive at once, with no polling, whether it is a
daemon or a plain process. At start, owners that died while ikosd was down are
found by the store's reconciliation.

Writes are batched: every change leaves the store's transaction open and
schedules one commit for the next turn of the loop (``call_soon``), and a
request that changed the registry is answered only after that commit (a group
commit), so an acknowledged registration survives a ``kill -9`` of ikosd while
a burst of them still costs one commit. Waiters (``wait_service``) and
watchers (``watch``) are fed from the store's change events, never by polling;
both are bounded, and a watcher that falls too far behind is dropped rather
than allowed to grow the manager's memory.

Metrics: with ikosd's metrics service, the registry exports the services, each
one's ``ikos_service_up`` and every health check's last result and counts of
results (:class:`~ikos.monitor._metrics.RegistryCollector`). A scrape reads
the in-memory index from the HTTP server's thread, never the store. The
counts of a daemon's checks go on across its restarts; the series of a daemon
no longer in the tree, or of a check no longer configured, disappear.

Rejected: running the health probes or SQLite in a worker thread. The probes
are asyncio coroutines already and the store's statements are a few indexed
lookups, so the loop never waits on them; only the ``method`` probe, a
blocking actor ask, goes to the default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ikos._errors import IkosError, ManagerError, PermissionDenied
from ikos.manager._control_server import BadRequest, Request, Stream
from ikos.manager._extension import Config, Extension, ExtensionHost, NodeView, Operations, TreeView
from ikos.platform._process import process_stamp
from ikos.registry._graph import DependencyCycle
from ikos.registry._service import (
    InvalidService,
    RegistryFull,
    ServiceConflict,
    ServiceInfo,
    check_service_name,
)
from ikos.registry._store import (
    PATTERN_MAX,
    RegistryEvent,
    RegistryStore,
    process_alive,
)
from ikos.supervision._runtime import State

if TYPE_CHECKING:  # the checks themselves are imported by the first daemon that has some
    from ikos.monitor._metrics import RegistrySnapshot
    from ikos.registry._health import HealthCheck, HealthMonitor, HealthState

log = logging.getLogger("ikos.registry")
audit = logging.getLogger("ikos.audit")

DB_NAME = "registry.db"
#: Processes that may own services at once (each costs the manager a pidfd).
MAX_OWNER_PROCESSES = 4096
#: Services one process may own: a per-peer quota under the store's global bound.
MAX_SERVICES_PER_OWNER = 25_000
#: Requests blocked in ``wait_service`` at once.
MAX_WAITERS = 1024
#: Watch streams at once, and the events one may have queued before it is dropped.
MAX_WATCHERS = 128
WATCH_QUEUE_MAX = 10_000
#: Longest ``wait_service`` timeout accepted, and the default.
WAIT_TIMEOUT_MAX = 86_400.0
WAIT_TIMEOUT_DEFAULT = 30.0
#: Largest answer of ``discover``/``services`` a ``limit`` may ask for.
LIST_LIMIT_MAX = 1_000_000


def _registry_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give the registry's exceptions the protocol error codes clients map back."""

    @functools.wraps(fn)
    async def wrapper(self: RegistryService, req: Request) -> Any:
        try:
            return await fn(self, req)
        except ServiceConflict as exc:
            raise ManagerError(str(exc), "service_conflict") from None
        except RegistryFull as exc:
            raise ManagerError(str(exc), "registry_full") from None
        except InvalidService as exc:
            raise ManagerError(str(exc), "invalid_service") from None
        except DependencyCycle as exc:
            raise ManagerError(str(exc), "dependency_cycle") from None

    return wrapper


# The records below are plain slotted classes, not dataclasses: a dataclass compiles its
# methods at every start of ikosd (docs/performance.md, "Launch"). Nothing compares,
# hashes or copies them (a watcher is removed from its list by identity).


class _Criteria:
    """What a waiter or watcher wants to hear about (every given field must match)."""

    __slots__ = ("capability", "name", "pattern", "type")

    def __init__(
        self,
        name: str | None = None,
        pattern: str | None = None,
        capability: str | None = None,
        type: str | None = None,
    ) -> None:
        self.name = name
        self.pattern = pattern
        self.capability = capability
        self.type = type

    def __repr__(self) -> str:  # the debug log of a waiter
        given = ", ".join(f"{k}={v!r}" for k, v in self.store_args().items() if v is not None)
        return f"_Criteria({given})"

    @classmethod
    def from_request(cls, req: Request) -> _Criteria:
        values: dict[str, str] = {}
        for key in ("name", "pattern", "capability", "type"):
            value = req.args.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise BadRequest(f"'{req.verb}': '{key}' must be a non-empty string")
            values[key] = value
        if "name" in values:
            check_service_name(values["name"])
        if len(values.get("pattern", "")) > PATTERN_MAX:
            raise InvalidService("pattern", f"expected a glob of at most {PATTERN_MAX} characters")
        return cls(**values)

    @property
    def empty(self) -> bool:
        return self.name is self.pattern is self.capability is self.type is None

    def matches(self, info: ServiceInfo) -> bool:
        return (
            (self.name is None or info.name == self.name)
            and (self.pattern is None or fnmatch.fnmatchcase(info.name, self.pattern))
            and (self.capability is None or self.capability in info.capabilities)
            and (self.type is None or info.type == self.type)
        )

    def matches_daemon(self, daemon: str) -> bool:
        """For daemon health events: only name and pattern can say anything about a daemon."""
        return (
            self.capability is None
            and self.type is None
            and (self.name is None or self.name == daemon)
            and (self.pattern is None or fnmatch.fnmatchcase(daemon, self.pattern))
        )

    def store_args(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pattern": self.pattern,
            "capability": self.capability,
            "type": self.type,
        }


class _Watcher:
    """One ``watch`` stream: what it wants, its queue, and whether the queue overflowed."""

    __slots__ = ("criteria", "overflowed", "queue")

    def __init__(self, criteria: _Criteria) -> None:
        self.criteria = criteria
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WATCH_QUEUE_MAX)
        self.overflowed = False


class _Service:
    """What the service keeps in memory about one registered service."""

    __slots__ = ("active", "health", "owner", "pid")

    def __init__(
        self, owner: str | None, pid: int | None, active: bool, health: str = "unknown"
    ) -> None:
        self.owner = owner
        self.pid = pid
        self.active = active
        self.health = health


class _Daemon:
    """One worker of the tree as the registry follows it."""

    __slots__ = ("early_heartbeat", "monitor", "name", "pid", "restarting", "task")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = None
        self.monitor: HealthMonitor | None = None
        self.task: asyncio.Task[None] | None = None
        self.restarting = False
        self.early_heartbeat: str | None = None


class RegistryService(Extension):
    """The manager's registry extension; see the module docstring."""

    name = "registry"

    def __init__(self, metrics: Any = None) -> None:
        #: the MetricsService whose endpoint gets the registry's collector, if any
        self._metrics = metrics
        #: called on the loop with (daemon, old health, new health, why) (the alert service)
        self.health_listeners: list[Callable[[str, str, str, str], None]] = []
        #: health-check results by (daemon, check, "pass"|"fail"), across incarnations
        self._check_results: Counter[tuple[str, str, str]] = Counter()
        #: the last result of each (daemon, check) of the running incarnations
        self._check_last: dict[tuple[str, str], bool] = {}
        self._view: TreeView | None = None
        self._ops: Operations | None = None
        self.store: RegistryStore | None = None
        self._services: dict[str, _Service] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._by_pid: dict[int, set[str]] = {}
        self._pidfds: dict[int, int] = {}
        self._daemons: dict[str, _Daemon] = {}
        self._declared: dict[str, tuple[ServiceInfo, ...]] = {}
        self._checks: dict[str, tuple[HealthCheck, ...]] = {}
        self._waiters: list[tuple[_Criteria, asyncio.Future[ServiceInfo]]] = []
        self._watchers: list[_Watcher] = []
        self._commit: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- life cycle ----------------------------------------------------------

    async def start(self, host: ExtensionHost) -> None:
        self._view, self._ops = host.view, host.ops
        self._loop = asyncio.get_running_loop()
        store = self.store = RegistryStore(host.view.paths.state_dir / DB_NAME)
        if store.damage:
            log.error("registry: %s", store.damage)
        dead = store.reconcile_dead_owners()
        if dead:
            log.info(
                "%d services turned inactive: their owners died while ikosd was down", len(dead)
            )
        self._index()
        store.commit()
        store.add_listener(self._on_event)
        self._declarations(host.view.config)
        for verb, handler in (
            ("register", self.register),
            ("unregister", self.unregister),
            ("services", self.services),
            ("discover", self.discover),
            ("wait_service", self.wait_service),
            ("watch", self.watch),
            ("add_dependency", self.add_dependency),
            ("remove_dependency", self.remove_dependency),
            ("get_dependencies", self.get_dependencies),
            ("heartbeat", self.heartbeat),
        ):
            # Writers are public verbs for the server: they authorize themselves
            # (_authorize), because a daemon running as another user must reach them.
            host.verbs.register(verb, "public", handler)
        if self._metrics is not None:
            from ikos.monitor._metrics import RegistryCollector  # with the metrics only

            self._metrics.endpoint.add(RegistryCollector(self.figures))
        log.info(
            "registry: %d services (%d active) in %s", store.count(), store.count(True), store.path
        )

    async def stop(self) -> None:
        self._closed = True
        for daemon in self._daemons.values():
            self._stop_monitor(daemon)
        for task in list(self._tasks):
            task.cancel()
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(ManagerError("ikosd is shutting down", "unavailable"))
        self._waiters.clear()
        for watcher in list(self._watchers):
            self._end_watcher(watcher)
        for pid in list(self._pidfds):
            self._unwatch(pid)
        if self.store is not None:
            self.store.remove_listener(self._on_event)
            try:
                self.store.close()
            except Exception:
                log.exception("registry: could not close %s", self.store.path)
        if self._commit is not None and not self._commit.done():
            self._commit.set_result(None)

    def _index(self) -> None:
        """Load what the service keeps in memory, and watch every living owner."""
        store = self._store
        for info in store.list():
            self._remember(info)
            if info.active:
                pid, start = store.owner_of(info.name)
                if pid is not None and pid not in self._pidfds and process_alive(pid, start):
                    self._watch(pid)
        # An owner may have died between the reconciliation and its pidfd.
        for pid in [p for p in self._by_pid if p not in self._pidfds]:
            store.mark_owner_dead(pid)
            self._forget_pid(pid)

    @property
    def _store(self) -> RegistryStore:
        assert self.store is not None, "the registry is not started"
        return self.store

    @property
    def _tree(self) -> TreeView:
        assert self._view is not None, "the registry is not started"
        return self._view

    # -- batched commits -------------------------------------------------------

    def _changed(self) -> asyncio.Future[None]:
        """Schedule the one commit of this loop turn; the future resolves once it is done."""
        if self._commit is None:
            assert self._loop is not None
            self._commit = self._loop.create_future()
            self._loop.call_soon(self._do_commit)
        return self._commit

    def _do_commit(self) -> None:
        future, self._commit = self._commit, None
        if self._closed:  # close() committed
            if future is not None and not future.done():
                future.set_result(None)
            return
        try:
            self._store.commit()
        except Exception as exc:
            log.exception("registry: commit to %s failed", self._store.path)
            if future is not None and not future.done():
                future.set_exception(ManagerError(f"the registry could not be saved: {exc}"))
            return
        if future is not None and not future.done():
            future.set_result(None)

    async def _durable(self) -> None:
        """Wait for the commit of what this request changed (the group commit)."""
        await asyncio.shield(self._changed())

    # -- the in-memory index, fed by the store's events ---------------------------

    def _remember(self, info: ServiceInfo) -> None:
        self._services[info.name] = _Service(info.owner, info.pid, info.active, info.health)
        if info.owner is not None:
            self._by_owner.setdefault(info.owner, set()).add(info.name)
        if info.active and info.pid is not None:
            self._by_pid.setdefault(info.pid, set()).add(info.name)

    def _forget(self, name: str) -> None:
        old = self._services.pop(name, None)
        if old is None:
            return
        if old.owner is not None:
            names = self._by_owner.get(old.owner)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._by_owner[old.owner]
        if old.pid is not None:
            names = self._by_pid.get(old.pid)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._by_pid[old.pid]

    def _forget_pid(self, pid: int) -> None:
        for name in list(self._by_pid.get(pid, ())):
            service = self._services.get(name)
            if service is not None:
                service.active = False
        self._by_pid.pop(pid, None)
        self._unwatch(pid)

    def _on_event(self, event: RegistryEvent) -> None:
        info = event.info
        old = self._services.get(info.name)
        self._forget(info.name)
        if event.kind != "unregistered":
            self._remember(info)
        if old is not None and old.pid is not None and old.pid not in self._by_pid:
            self._unwatch(old.pid)  # it owns nothing active any more
        self._changed()
        if event.kind in ("registered", "active") and info.active:
            for criteria, future in self._waiters:
                if not future.done() and criteria.matches(info):
                    future.set_result(info)
        if self._watchers:
            payload: dict[str, Any] = {"kind": event.kind, "service": info.to_json()}
            self._publish(payload, lambda c: c.matches(info))

    def _publish(self, event: dict[str, Any], wanted: Callable[[_Criteria], bool]) -> None:
        event["at"] = time.time()
        for watcher in list(self._watchers):
            if watcher.overflowed or not wanted(watcher.criteria):
                continue
            try:
                watcher.queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning(
                    "registry: a watcher fell %d events behind: dropping it", WATCH_QUEUE_MAX
                )
                self._end_watcher(watcher)

    # -- owners' lives ---------------------------------------------------------

    def _watch(self, pid: int) -> bool:
        """Follow process ``pid`` through a pidfd; False when it is already gone."""
        if pid in self._pidfds:
            return True
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._pidfds[pid] = fd
        assert self._loop is not None
        self._loop.add_reader(fd, self._owner_exited, pid)
        return True

    def _unwatch(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            assert self._loop is not None
            self._loop.remove_reader(fd)
            os.close(fd)

    def _owner_exited(self, pid: int) -> None:
        self._unwatch(pid)
        names = self._store.mark_owner_dead(pid)
        if names:
            log.info("registry: owner pid %d exited: %s inactive", pid, ", ".join(names))
        self._forget_pid(pid)

    def _daemon_of_pid(self, pid: int) -> str | None:
        """The worker of the tree that process ``pid`` is (starting or running), if any."""
        node = self._tree.worker_of_pid(pid)
        return node.name if node is not None else None

    def _authorize(self, req: Request) -> str | None:
        """Let root, the instance's owner and the tree's own daemons write; return the daemon."""
        daemon = self._daemon_of_pid(req.pid)
        if daemon is None and req.uid not in (0, os.getuid()):
            raise PermissionDenied(
                f"uid {req.uid} may only read the registry: '{req.verb}' needs root, "
                f"the instance's owner (uid {os.getuid()}) or a daemon of this instance"
            )
        return daemon

    # -- the tree --------------------------------------------------------------

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        if node.kind == "supervisor" or self.store is None:
            return
        daemon = self._daemons.setdefault(node.name, _Daemon(node.name))
        if new is State.RUNNING:
            self._daemon_running(node, daemon)
        elif old is State.RUNNING:
            self._daemon_left_running(daemon)
        elif new is State.STARTING:
            daemon.early_heartbeat = None

    def on_upgrade(self, node: NodeView, old_pid: int) -> None:
        """A hot code upgrade: the old process left (its services inactive) and the new
        one runs (declared services registered for it, its checks started afresh)."""
        if node.kind == "supervisor" or self.store is None:
            return
        daemon = self._daemons.setdefault(node.name, _Daemon(node.name))
        self._daemon_left_running(daemon)
        self._daemon_running(node, daemon)

    def _daemon_running(self, node: NodeView, daemon: _Daemon) -> None:
        pid = node.pid
        daemon.pid = pid
        daemon.restarting = False
        if pid is None:
            return
        checks = self._checks.get(node.name, ())
        if checks:
            self._start_monitor(node, daemon, checks)
        store = self._store
        # Registrations this process made before the manager knew its pid.
        for name in sorted(self._by_pid.get(pid, ())):
            service = self._services.get(name)
            if service is not None and service.owner is None:
                info = store.get(name)
                store.register(replace(info, owner=node.name), pid, process_stamp(pid))
        declared = self._declared.get(node.name, ())
        if declared and self._watch(pid):
            for info in declared:
                self._register_declared(node.name, info, pid)
        self._sync_health(daemon.name, self._health_of(daemon.name, State.RUNNING))

    def _sync_health(self, daemon: str, health: str) -> None:
        """Give the daemon's active services its health (a ``health`` event for each change)."""
        for name in sorted(self._by_owner.get(daemon, ())):
            record = self._services.get(name)
            if record is not None and record.active:
                self._store.set_health(name, health)

    def _register_declared(self, daemon: str, info: ServiceInfo, pid: int) -> None:
        store = self._store
        current = self._services.get(info.name)
        if current is not None and current.active and current.pid == pid:
            return  # the daemon registered it itself while starting: its own entry wins
        stored = replace(info, owner=daemon, health=self._health_of(daemon, State.RUNNING))
        start = process_stamp(pid)
        try:
            try:
                store.register(stored, pid, start)
            except ServiceConflict as exc:
                # The configuration is the authority on its own names: take it over.
                log.warning("registry: %s; the configuration gives it to %s", exc, daemon)
                store.set_active(info.name, False)
                store.register(stored, pid, start)
        except IkosError as exc:
            log.error("registry: cannot register %s for %s: %s", info.name, daemon, exc)

    def _daemon_left_running(self, daemon: _Daemon) -> None:
        self._stop_monitor(daemon)
        store = self._store
        for name in sorted(self._by_owner.get(daemon.name, ())):
            service = self._services.get(name)
            if service is not None and service.active:
                store.set_active(name, False)
        if daemon.pid is not None:
            store.mark_owner_dead(daemon.pid)
            self._forget_pid(daemon.pid)
        daemon.pid = None

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        names = self._by_owner.get(node.name)
        checks = self._checks.get(node.name, ())
        if not names and not checks:
            return
        if names:
            status["services"] = sorted(names)
        daemon = self._daemons.get(node.name)
        status["health"] = self._health_of(node.name, node.state)
        if daemon is not None and daemon.monitor is not None:
            snapshot = daemon.monitor.snapshot()
            status["health_checks"] = [
                {
                    "check": c.check.describe(),
                    "status": c.status,
                    "on_failure": c.check.on_failure,
                    "output": c.last.output if c.last is not None else None,
                }
                for c in snapshot.checks
            ]

    def _health_of(self, daemon: str, state: State | None = None) -> HealthState:
        """A daemon's health: its checks' while it runs, passing without checks, else critical."""
        if state is None:
            node = self._tree.find(daemon)
            state = node.state if node is not None else State.RUNNING
        if state is not State.RUNNING:
            return "critical"
        record = self._daemons.get(daemon)
        if record is not None and record.monitor is not None:
            return record.monitor.status
        return "passing"

    # -- configuration ---------------------------------------------------------

    def _declarations(self, config: Config) -> None:
        """Take the services and health checks the configuration declares, by daemon."""
        self._declared = dict(config.services)
        self._checks = dict(config.health)

    async def on_reload(self, config: Config) -> None:
        # Declarations apply when a daemon (re)starts, as they always did.
        self._declarations(config)
        # the counts of checks no longer declared are never exported again: forget them
        declared = {(d, c.describe()) for d, checks in self._checks.items() for c in checks}
        for key in [k for k in self._check_results if k[:2] not in declared]:
            del self._check_results[key]

    # -- health ----------------------------------------------------------------

    def _start_monitor(
        self, node: NodeView, daemon: _Daemon, checks: tuple[HealthCheck, ...]
    ) -> None:
        self._stop_monitor(daemon)
        caller = None
        if node.kind == "actor":
            timeout = max((c.timeout for c in checks if c.kind == "method"), default=1.0)
            caller = self._method_caller(node.name, timeout)
        for key in [k for k in self._check_last if k[0] == node.name]:
            del self._check_last[key]  # a new incarnation: no result yet
        from ikos.registry._health import HealthMonitor

        try:
            monitor = HealthMonitor(
                node.name,
                checks,
                call_method=caller,
                on_result=functools.partial(self._check_result, node.name),
            )
        except IkosError as exc:
            log.error("registry: health checks of %s: %s", node.name, exc)
            return
        if daemon.early_heartbeat is not None:
            monitor.heartbeat(daemon.early_heartbeat)
            daemon.early_heartbeat = None
        daemon.monitor = monitor
        daemon.task = asyncio.get_running_loop().create_task(
            monitor.run(functools.partial(self._health_changed, daemon)),
            name=f"health:{node.name}",
        )

    def _check_result(self, daemon: str, check: HealthCheck, ok: bool) -> None:
        label = check.describe()
        self._check_results[(daemon, label, "pass" if ok else "fail")] += 1
        self._check_last[(daemon, label)] = ok

    def figures(self) -> RegistrySnapshot:
        """The services and health checks for the metrics (from the HTTP server's thread).

        Reads only: dictionaries the loop changes are copied in one step each
        (``list``), values are replaced whole.
        """
        from ikos.monitor._metrics import CheckRow, RegistrySnapshot, ServiceRow

        tree = self._view
        services = [
            ServiceRow(
                name,
                s.owner or "",
                s.active and s.health in ("passing", "warning"),
                # a removed daemon's service stays registered (inactive), but series
                # labelled with that daemon must go with it
                shown=s.owner is None or tree is None or tree.find(s.owner) is not None,
            )
            for name, s in list(self._services.items())
        ]
        results = dict(list(self._check_results.items()))
        last = dict(list(self._check_last.items()))
        checks: dict[tuple[str, str], CheckRow] = {}
        for daemon, declared in list(self._checks.items()):
            node = tree.find(daemon) if tree is not None else None
            if node is None:
                continue  # removed: its series go with it
            running = node.state is State.RUNNING
            for check in declared:
                label = check.describe()
                checks[(daemon, label)] = CheckRow(
                    daemon,
                    label,
                    last.get((daemon, label)) if running else None,
                    results.get((daemon, label, "pass"), 0),
                    results.get((daemon, label, "fail"), 0),
                )
        return RegistrySnapshot(services, list(checks.values()))

    def _stop_monitor(self, daemon: _Daemon) -> None:
        if daemon.task is not None:
            daemon.task.cancel()
        daemon.task = None
        daemon.monitor = None

    def _method_caller(self, name: str, timeout: float) -> Callable[[str], Any]:
        from ikos.actors._ref import ActorRef

        ref = ActorRef(name, root=self._tree.paths.root)

        async def call(method: str) -> object:
            loop = asyncio.get_running_loop()
            from ikos.registry._client import HEALTH_REQUEST_KEY  # an actor's method check

            ask = functools.partial(ref.ask, {HEALTH_REQUEST_KEY: method}, timeout=timeout)
            return await loop.run_in_executor(None, ask)

        return call

    def _health_changed(self, daemon: _Daemon, service: str, old: str, new: str) -> None:
        if daemon.monitor is None:
            return  # a stopped monitor's last word
        level = logging.WARNING if new == "critical" else logging.INFO
        failing = [
            f"{c.check.describe()}: {c.last.output}"
            for c in daemon.monitor.snapshot().checks
            if c.status != "passing" and c.last is not None and not c.last.ok
        ]
        why = f" ({'; '.join(failing)})" if failing else ""
        log.log(level, "health of %s: %s -> %s%s", daemon.name, old, new, why[:1000])
        self._sync_health(daemon.name, new)
        for listener in list(self.health_listeners):
            try:
                listener(daemon.name, old, new, why)
            except Exception:  # a listener's bug must not stop health checking
                log.exception("registry: a health listener failed")
        self._publish(
            {"kind": "daemon_health", "daemon": daemon.name, "old_health": old, "health": new},
            lambda c: c.matches_daemon(daemon.name),
        )
        restart = new == "critical" and daemon.monitor.snapshot().restart_requested
        if restart and not daemon.restarting:
            daemon.restarting = True
            log.warning("health of %s is critical: failing it for its supervisor", daemon.name)
            self._spawn(self._fail(daemon.name, f"health check failed{why}"[:500]))

    async def _fail(self, name: str, reason: str) -> None:
        # A failure like any other: restart type, intensity and back-off decide.
        assert self._ops is not None
        try:
            await self._ops.fail(name, reason)
        except IkosError as exc:
            log.error("registry: failing unhealthy %s failed: %s", name, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- verbs -----------------------------------------------------------------

    @_registry_errors
    async def register(self, req: Request) -> Any:
        """``register {"service": ServiceInfo}``: owned by the peer process."""
        daemon = self._authorize(req)
        data = req.args.get("service")
        if not isinstance(data, dict):
            raise BadRequest("'register' needs 'service' as an object (a ServiceInfo)")
        data = {k: v for k, v in data.items() if k not in ("pid", "owner", "active", "health")}
        info = ServiceInfo.from_json(data)
        pid = req.pid
        start = process_stamp(pid)
        if start is None:
            raise ManagerError(f"process {pid} exited before its registration was handled")
        owned = self._by_pid.get(pid, set())
        if info.name not in owned and len(owned) >= MAX_SERVICES_PER_OWNER:
            raise ManagerError(
                f"process {pid} already owns the limit of {MAX_SERVICES_PER_OWNER} services",
                "registry_full",
            )
        new_owner = pid not in self._pidfds
        if new_owner and len(self._pidfds) >= MAX_OWNER_PROCESSES:
            raise ManagerError(
                f"the registry follows the limit of {MAX_OWNER_PROCESSES} owner processes",
                "registry_full",
            )
        if not self._watch(pid):
            raise ManagerError(f"process {pid} exited before its registration was handled")
        if daemon is not None:
            self._release_stale(info.name, daemon)
        try:
            # A daemon registering while it starts is alive: its checks have not spoken yet.
            health = self._health_of(daemon, State.RUNNING) if daemon else "passing"
            stored = self._store.register(
                replace(info, pid=pid, owner=daemon, health=health), pid, start
            )
        except BaseException:
            if new_owner and pid not in self._by_pid:
                self._unwatch(pid)
            raise
        audit.info("pid %d uid %d: register %s", req.pid, req.uid, info.name)
        await self._durable()
        return stored.to_json()

    def _release_stale(self, name: str, daemon: str) -> None:
        """Free ``name`` when a former incarnation of ``daemon`` holds it.

        After a ``kill -9`` of ikosd its daemons may live on, orphaned, still
        holding their names; the new ikosd starts the daemon again, and its
        registrations must not fail against its own ghost. The holder is
        stale when it claims the same daemon but is not the process this
        ikosd runs for it.
        """
        current = self._services.get(name)
        if current is None or not current.active or current.owner != daemon:
            return
        node = self._tree.find(daemon)
        if current.pid is None or (node is not None and node.pid == current.pid):
            return
        log.warning(
            "registry: %s is held by pid %d, a former %s this ikosd does not run: taking it over",
            name,
            current.pid,
            daemon,
        )
        self._store.set_active(name, False)

    @_registry_errors
    async def unregister(self, req: Request) -> Any:
        """``unregister {"name", "force"?}``: by the owner, or anyone once the owner is dead."""
        self._authorize(req)
        name = check_service_name(req.text("name"))
        store = self._store
        holder, started = store.owner_of(name)
        force = req.args.get("force") is True and req.uid in (0, os.getuid())
        if holder is None or force or holder == req.pid or not process_alive(holder, started):
            info = store.unregister(name, None)
        else:
            info = store.unregister(name, req.pid)  # raises NotServiceOwner
        audit.info("pid %d uid %d: unregister %s", req.pid, req.uid, name)
        await self._durable()
        return info.to_json()

    @_registry_errors
    async def services(self, req: Request) -> Any:
        """``services {criteria?, "active_only"?, "limit"?}``: every service, sorted by name."""
        return self._find(req, exact_required=False)

    @_registry_errors
    async def discover(self, req: Request) -> Any:
        """``discover {"name"|"pattern"|"capability"|"type", "active_only"?}``."""
        return self._find(req, exact_required=True)

    def _find(self, req: Request, exact_required: bool) -> list[dict[str, Any]]:
        criteria = _Criteria.from_request(req)
        active_only = req.args.get("active_only", False)
        if not isinstance(active_only, bool):
            raise BadRequest(f"'{req.verb}': 'active_only' must be true or false")
        limit = req.args.get("limit")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= LIST_LIMIT_MAX
        ):
            raise BadRequest(f"'{req.verb}': 'limit' must be an integer from 1 to {LIST_LIMIT_MAX}")
        found = self._store.discover(active_only=active_only, **criteria.store_args())
        if exact_required and criteria.name is not None and not found:
            # NoSuchService: ikosctl exits 4. An inactive entry still exists.
            self._store.get(criteria.name)
        if limit is not None:
            found = found[:limit]
        return [info.to_json() for info in found]

    @_registry_errors
    async def wait_service(self, req: Request) -> Any:
        """``wait_service {criteria, "timeout"}``: the first active match, waiting for one."""
        criteria = _Criteria.from_request(req)
        if criteria.empty:
            raise BadRequest("'wait_service' needs a name, pattern, capability or type")
        timeout = req.number("timeout", WAIT_TIMEOUT_DEFAULT)
        if timeout > WAIT_TIMEOUT_MAX:
            raise BadRequest(f"'wait_service': 'timeout' must be at most {WAIT_TIMEOUT_MAX:g}s")
        found = self._store.discover(active_only=True, **criteria.store_args())
        if found:
            return found[0].to_json()
        if len(self._waiters) >= MAX_WAITERS:
            raise ManagerError(f"the registry already has {MAX_WAITERS} waiting requests")
        assert self._loop is not None
        future: asyncio.Future[ServiceInfo] = self._loop.create_future()
        entry = (criteria, future)
        self._waiters.append(entry)
        log.debug("registry: waiting for %s (timeout %gs)", criteria, timeout)
        try:
            async with asyncio.timeout(timeout):
                info = await future
        except TimeoutError:
            what = criteria.name or criteria.pattern or criteria.capability or criteria.type
            raise ManagerError(
                f"no service matching {what!r} became active within {timeout:g}s", "timeout"
            ) from None
        finally:
            self._waiters.remove(entry)
        return info.to_json()

    @_registry_errors
    async def watch(self, req: Request) -> Any:
        """``watch {criteria?}``: a stream of registry events until the client hangs up."""
        criteria = _Criteria.from_request(req)
        if len(self._watchers) >= MAX_WATCHERS:
            raise ManagerError(f"the registry already has {MAX_WATCHERS} watchers")
        watcher = _Watcher(criteria)
        self._watchers.append(watcher)
        return Stream(self._watch_events(watcher))

    async def _watch_events(self, watcher: _Watcher) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"kind": "watching", "at": time.time()}
            while True:
                event = await watcher.queue.get()
                if not event:
                    if watcher.overflowed:
                        raise ManagerError(
                            f"the watcher fell {WATCH_QUEUE_MAX} events behind and was dropped"
                        )
                    return
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._watchers.remove(watcher)

    def _end_watcher(self, watcher: _Watcher) -> None:
        """Make the watcher's stream end after what it has queued (an empty event ends it)."""
        watcher.overflowed = watcher.queue.full()
        with contextlib.suppress(ValueError):
            self._watchers.remove(watcher)
        if watcher.overflowed:
            # Its backlog is dropped: the end must not wait behind it.
            while not watcher.queue.empty():
                watcher.queue.get_nowait()
        watcher.queue.put_nowait({})

    @_registry_errors
    async def add_dependency(self, req: Request) -> Any:
        """``add_dependency {"name", "depends_on"}``: the service's dependencies after it."""
        self._authorize(req)
        name, target = req.text("name"), req.text("depends_on")
        self._store.add_dependency(name, target)
        audit.info("pid %d uid %d: add_dependency %s -> %s", req.pid, req.uid, name, target)
        await self._durable()
        return self._store.get_dependencies(name)

    @_registry_errors
    async def remove_dependency(self, req: Request) -> Any:
        """``remove_dependency {"name", "depends_on"}``: ``{"removed": bool}``."""
        self._authorize(req)
        name, target = req.text("name"), req.text("depends_on")
        removed = self._store.remove_dependency(name, target)
        audit.info("pid %d uid %d: remove_dependency %s -> %s", req.pid, req.uid, name, target)
        await self._durable()
        return {"removed": removed}

    @_registry_errors
    async def get_dependencies(self, req: Request) -> Any:
        """``get_dependencies {"name"}``: the names it directly depends on."""
        return self._store.get_dependencies(check_service_name(req.text("name")))

    async def heartbeat(self, req: Request) -> Any:
        """``heartbeat {"name"?, "note"?}``: feed a daemon's ``ttl`` checks."""
        caller = self._authorize(req)
        name = req.args.get("name", caller)
        if name is None:
            raise BadRequest("'heartbeat' needs 'name' unless a daemon of the tree sends it")
        if not isinstance(name, str) or not name:
            raise BadRequest("'heartbeat': 'name' must be a non-empty string")
        note = req.args.get("note", "")
        if not isinstance(note, str):
            raise BadRequest("'heartbeat': 'note' must be a string")
        daemon: str = name
        service = self._services.get(name)
        if name not in self._checks and service is not None and service.owner is not None:
            daemon = service.owner  # a service's name stands for its daemon
        checks = self._checks.get(daemon, ())
        if not any(c.kind == "ttl" for c in checks):
            self._tree.node(daemon)  # no_such_daemon for an unknown name
            raise ManagerError(f"'{daemon}' has no ttl health check to feed")
        record = self._daemons.setdefault(daemon, _Daemon(daemon))
        if record.monitor is not None:
            record.monitor.heartbeat(note)
        else:
            record.early_heartbeat = note  # still starting: applied when it runs
        return {}
