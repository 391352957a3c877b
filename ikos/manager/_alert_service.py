"""The alert service: thresholds and events raise alerts; ``alerts`` and ``events`` verbs.

It feeds an :class:`~ikos.monitor._alerts.AlertEngine` (the pure rules) from
three sources, all on the loop: the sampler's passes (CPU, memory, open
files; the restart windows slide at the same pace), the daemons' transitions
(restarts, ``failed``, a supervisor that gave up) and the registry's health
changes. What the engine answers, an alert fired or resolved, becomes one
log line (logger ``ikos.alerts``), an event for the followers of ``ikosctl
events``, a message on the IPC topic ``ikos.alerts`` and the rule's action,
each *notification* passing a :class:`~ikos.monitor._alerts.NotificationLimiter`
first; the active set (``ikosctl alerts``) and the ``ikos_alert*`` metrics
are read from the engine and always tell the truth.

Nothing here blocks the loop: publishing goes through a bounded queue to a
thread of its own holding the one :class:`~ikos.ipc._client.BrokerClient`
(a publication that finds the queue full or the broker down is lost, counted
and logged once per outage); commands run with :func:`run_command` (no
shell fork of the threaded manager, reaped, killed at their timeout); each
follower of ``events`` has a bounded queue whose overflow is dropped and
announced to it.

Publications go out only while the broker runs (``ikos-broker`` is
``running``) and ikosd is not stopping: the broker is started on demand
(``ikos.platform._activation``), and an alert must neither start it (nobody can be
subscribed to a broker that does not run, so nothing is lost) nor wait on one
that stops. Stopping never waits for the publisher thread longer than
:data:`CLOSE_TIMEOUT`, and never through the default executor (which a busy
ikosd may have full, and whose shutdown Python 3.11 waits for without bound):
the client is aborted, which wakes a publication blocked on a broker that
accepted and does not answer.

Rejected: publishing from the loop with the synchronous
client (a broker that does not read stalls every daemon's supervision), and
one executor job per publication (no order, no bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from ikos._errors import IkosError, ManagerError
from ikos.manager._control_server import Stream
from ikos.manager._extension import Config, Extension, ExtensionHost, NodeView, Operations, TreeView
from ikos.manager._ipc_service import BROKER_NAME, SYSTEM_NAME
from ikos.manager._settings import AlertSettings, read_alert_settings
from ikos.monitor._alerts import Alert, AlertCollector, AlertEngine, Change, NotificationLimiter
from ikos.monitor._sampler import Usage
from ikos.platform._paths import InstancePaths
from ikos.platform._process import run_command
from ikos.supervision._runtime import State

log = logging.getLogger("ikos.alerts")

#: The IPC topic alerts are published on.
TOPIC: Final = "ikos.alerts"
#: Events queued for one follower of ``events`` before newer ones are dropped.
EVENTS_QUEUE: Final = 1000
#: Followers of ``events`` at once.
MAX_FOLLOWERS: Final = 64
#: Publications waiting for the publisher thread before newer ones are lost.
PUBLISH_QUEUE: Final = 256
#: Seconds between two summaries of the notifications held back.
SUMMARY_INTERVAL: Final = 10.0
#: Bytes of a command's output kept for the log.
COMMAND_OUTPUT: Final = 4096
#: Seconds a daemon must stay failed (not restarted by its supervisor) to raise ``failed``.
FAILED_GRACE: Final = 1.0
_GONE: Final = frozenset({State.STOPPED, State.BACKOFF, State.FAILED})
#: Seconds ikosd's stop waits for the publisher thread to end once its client is aborted.
CLOSE_TIMEOUT: Final = 2.0


class AlertService(Extension):
    """Raises and resolves alerts and tells about them; see the module docstring."""

    name = "alerts"

    def __init__(self, sampler: Any = None, metrics: Any = None, registry: Any = None) -> None:
        #: the SamplerService, MetricsService and RegistryService to hook into, if any
        self._sampler, self._metrics, self._registry = sampler, metrics, registry
        self.settings = AlertSettings()
        self.engine = AlertEngine(self.settings.rules)
        self.limiter = NotificationLimiter(
            self.settings.notify_interval, self.settings.max_per_minute
        )
        self._view: TreeView | None = None
        self._ops: Operations | None = None
        self._followers: set[_Follower] = set()
        self._restarts_seen: dict[str, int] = {}
        self._notified: set[tuple[str, str]] = set()
        self._acting: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: the pending check of each daemon that just failed (see FAILED_GRACE)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._summary_at = 0.0
        self._publisher: _Publisher | None = None
        #: (alerts, fired by kind, suppressed) for the scrape thread, replaced whole
        self._figures: tuple[list[Alert], dict[str, int], int] = ([], {}, 0)
        #: the engine's clock (see :meth:`_now`)
        self._epoch = time.time() - time.monotonic()

    def _now(self) -> float:
        """The engine's time: the Unix time at start plus the monotonic time since.

        Its ``for`` durations and restart windows must not jump with a step of
        the wall clock (a step of 14 s forward would fire a 10 s alert at
        once), and its ``since`` must still read as a date.
        """
        return self._epoch + time.monotonic()

    # -- life ---------------------------------------------------------------------------

    async def start(self, host: ExtensionHost) -> None:
        self._view, self._ops = host.view, host.ops
        self._apply(self._read(host.view.config))
        host.verbs.register("alerts", "private", self._verb_alerts)
        host.verbs.register("events", "private", self._verb_events)
        if self._sampler is not None:
            self._sampler.listeners.append(self._sampled)
        listeners = getattr(self._registry, "health_listeners", None)
        if listeners is not None:
            listeners.append(self._health)
        if self._metrics is not None:
            self._metrics.endpoint.add(AlertCollector(lambda: self._figures))
        self._publisher = _Publisher(host.view.paths)
        broker = host.view.find(BROKER_NAME)  # adopted from a previous ikosd, running
        self._publisher.open = broker is not None and broker.state is State.RUNNING

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for follower in list(self._followers):
            follower.close()
        if self._publisher is not None:
            await self._publisher.aclose(CLOSE_TIMEOUT)
            self._publisher = None

    async def on_reload(self, config: Config) -> None:
        try:
            self._apply(self._read(config))
        except IkosError as exc:  # load_config refused the file before this: not expected
            log.warning("alerts: settings kept as they were: %s", exc)
        assert self._view is not None
        names = {node.name for node in self._view.walk()}
        # what is kept per daemon goes with the daemon (a bound on memory)
        self._restarts_seen = {k: v for k, v in self._restarts_seen.items() if k in names}
        self._handle(self.engine.forget(names, self._now()))

    def _read(self, config: Config) -> AlertSettings:
        settings, _warnings = read_alert_settings(config.file)  # warnings: load_config's
        return settings

    def _apply(self, settings: AlertSettings) -> None:
        self.settings = settings
        self.engine.rules = settings.rules
        self.limiter.interval = settings.notify_interval
        self.limiter.per_minute = settings.max_per_minute

    # -- feeds ----------------------------------------------------------------------------

    def _sampled(self, latest: Mapping[str, Usage]) -> None:
        """A sampler pass ended: every running daemon's usage, then the sliding windows."""
        now = self._now()
        view = self._view
        assert view is not None
        changes: list[Change] = []
        for name, usage in latest.items():
            node = view.find(name)
            if node is None or node.pid != usage.pid or node.state is not State.RUNNING:
                continue  # a figure of a run that ended: nothing to say about the daemon now
            values: dict[str, float] = {"memory": usage.rss_bytes, "fds": usage.open_fds}
            if usage.cpu_percent is not None:
                values["cpu"] = usage.cpu_percent / 100.0
            changes += self.engine.observe(name, values, now)
        changes += self.engine.tick(now)
        # a daemon deleted at run time takes its alerts along
        changes += self.engine.forget({node.name for node in view.walk()}, now)
        self._handle(changes)
        self._summarize(now)

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        self._gate(node, new)
        now = self._now()
        self._broadcast(
            {
                "type": "transition",
                "time": now,
                "daemon": node.name,
                "kind": node.kind,
                "old": old.value,
                "new": new.value,
                "why": why,
            }
        )
        name = node.name
        changes: list[Change] = []
        if new is State.STARTING:
            seen = self._restarts_seen.setdefault(name, node.restarts)
            for _ in range(min(node.restarts - seen, 100)):
                changes += self.engine.restarted(name, now)
            self._restarts_seen[name] = node.restarts
        if new in _GONE and node.kind != "supervisor":
            changes += self.engine.stopped_running(name, now)
            changes += self.engine.clear_event(name, "health", now)
        if old is State.FAILED and new is not State.FAILED:
            changes += self.engine.clear_event(name, "failed", now)
            changes += self.engine.clear_event(name, "gave_up", now)
        if new is State.FAILED:
            message = f"{node.kind} {name}: {why}"
            if node.kind == "supervisor" and "restart intensity" in why:
                changes += self.engine.raise_event(name, "gave_up", now, message)
            else:
                # every crash passes through failed on its way to a restart: only a
                # daemon its supervisor leaves there is news (restarts has the rest)
                previous = self._timers.pop(name, None)
                if previous is not None:
                    previous.cancel()
                self._timers[name] = asyncio.get_running_loop().call_later(
                    FAILED_GRACE, self._still_failed, name, message
                )
        self._handle(changes)

    def _gate(self, node: NodeView, new: State) -> None:
        """Publish only to a running broker, and nothing once ikosd (or IPC) is stopping."""
        publisher = self._publisher
        if publisher is None:
            return
        if node.name == BROKER_NAME:
            publisher.open = new is State.RUNNING and not publisher.closing
        elif node.name == SYSTEM_NAME or node.parent is None:
            if new is State.STOPPING:
                publisher.closing, publisher.open = True, False
            elif new is State.STARTING:
                publisher.closing = False

    def _still_failed(self, name: str, message: str) -> None:
        self._timers.pop(name, None)
        node = self._view.find(name) if self._view is not None else None
        if node is not None and node.state is State.FAILED:
            self._handle(self.engine.raise_event(name, "failed", self._now(), message))

    def _health(self, daemon: str, old: str, new: str, why: str) -> None:
        """The registry's word: ``daemon``'s health went from ``old`` to ``new``."""
        now = self._now()
        if new == "critical":
            message = f"health of {daemon} is critical{why}"[:1000]
            self._handle(self.engine.raise_event(daemon, "health", now, message))
        else:
            self._handle(self.engine.clear_event(daemon, "health", now))

    # -- telling ----------------------------------------------------------------------------

    def _handle(self, changes: list[Change]) -> None:
        self._figures = (
            self.engine.active(),
            dict(self.engine.fired),
            self.limiter.suppressed,
        )
        for change in changes:
            try:
                self._notify(change)
            except Exception:  # one alert's bug must not hide the others
                log.exception("alerts: telling about %s failed", change.alert.alert)
        if changes:  # the limiter may have counted some
            self._figures = (self._figures[0], self._figures[1], self.limiter.suppressed)

    def _notify(self, change: Change) -> None:
        alert = change.alert
        who = (alert.alert, alert.daemon)
        if change.event == "resolved" and who not in self._notified:
            return  # nobody was told it fired: its end is no news (it was counted then)
        if not self.limiter.allow((change.event, *who), change.at):
            self._notified.discard(who)
            return
        if change.event == "fired":
            self._notified.add(who)
            level = logging.ERROR if alert.severity == "critical" else logging.WARNING
        else:
            self._notified.discard(who)
            level = logging.INFO
        log.log(
            level,
            "alert %s: %s on %s (%s): %s",
            change.event,
            alert.alert,
            alert.daemon,
            alert.severity,
            alert.message,
        )
        document = {"type": "alert", "event": change.event, "time": change.at, **alert.to_json()}
        self._broadcast(document)
        if self._publisher is not None:
            self._publisher.publish(document)
        if change.event == "fired" and change.rule.action is not None:
            self._act(change)

    def _summarize(self, now: float) -> None:
        if now - self._summary_at < SUMMARY_INTERVAL:
            return
        held = self.limiter.take_held()
        if held:
            self._summary_at = now
            detail = ", ".join(f"{key} x{count}" for key, count in sorted(held.items()))
            log.warning(
                "alerts: %d notifications held back by the rate limit "
                "([alerts] notify_interval, max_per_minute): %s",
                sum(held.values()),
                detail,
            )

    # -- actions -------------------------------------------------------------------------------

    def _act(self, change: Change) -> None:
        daemon = change.alert.daemon
        if daemon in self._acting:
            log.warning(
                "alerts: %s on %s: an action is still running, none started",
                change.alert.alert,
                daemon,
            )
            return
        self._acting.add(daemon)
        task = asyncio.get_running_loop().create_task(self._action(change), name=f"alert:{daemon}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _action(self, change: Change) -> None:
        alert, rule = change.alert, change.rule
        try:
            assert self._ops is not None
            if rule.action in ("restart", "stop"):
                log.warning("alerts: %s on %s: action %s", alert.alert, alert.daemon, rule.action)
                if rule.action == "restart":
                    await self._ops.restart(alert.daemon)
                else:
                    await self._ops.stop(alert.daemon)
            elif rule.action == "command" and rule.command:
                await self._command(alert, rule.command, rule.command_timeout, change.event)
        except IkosError as exc:
            log.error("alerts: action %s for %s failed: %s", rule.action, alert.daemon, exc)
        finally:
            self._acting.discard(alert.daemon)

    async def _command(self, alert: Alert, command: str, timeout: float, event: str) -> None:
        env = dict(os.environ)
        env.update(
            IKOS_ALERT=alert.alert,
            IKOS_DAEMON=alert.daemon,
            IKOS_SEVERITY=alert.severity,
            IKOS_EVENT=event,
            IKOS_VALUE="" if alert.value is None else f"{alert.value:g}",
            IKOS_THRESHOLD="" if alert.threshold is None else f"{alert.threshold:g}",
            IKOS_MESSAGE=alert.message,
        )
        try:
            result = await run_command(
                ["/bin/sh", "-c", command], env=env, timeout=timeout, output_limit=COMMAND_OUTPUT
            )
        except OSError as exc:
            log.error(
                "alerts: cannot run the command of %s on %s: %s", alert.alert, alert.daemon, exc
            )
            return
        output = result.output.decode("utf-8", "replace").strip()
        ended = f"killed after {timeout:g} s" if result.status is None else result.status.describe()
        log.info(
            "alerts: command of %s on %s %s%s",
            alert.alert,
            alert.daemon,
            ended,
            f": {output}" if output else "",
        )

    # -- verbs -----------------------------------------------------------------------------------

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        names = [a.alert for a in self._figures[0] if a.daemon == node.name]
        if names:
            status["alerts"] = names

    async def _verb_alerts(self, req: Any) -> Any:
        return [alert.to_json() for alert in self.engine.active()]

    async def _verb_events(self, req: Any) -> Any:
        if len(self._followers) >= MAX_FOLLOWERS:
            raise ManagerError(f"too many followers of 'events' (at most {MAX_FOLLOWERS})", "busy")
        follower = _Follower(self._followers)
        self._followers.add(follower)
        follower.put({"type": "subscribed", "time": time.time()})
        return Stream(follower)

    def _broadcast(self, event: dict[str, Any]) -> None:
        for follower in list(self._followers):
            follower.put(event)


class _Follower:
    """One follower of ``events``: a bounded queue, and the count of what it missed.

    An async iterator with ``aclose`` (the control server's :class:`Stream`
    contract); it ends when ikosd stops (:meth:`close`).
    """

    def __init__(self, followers: set[_Follower]) -> None:
        self._followers = followers
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= EVENTS_QUEUE:
            if not self.dropped:
                log.warning("alerts: a follower of 'events' is too slow: dropping its events")
            self.dropped += 1
            return
        if self.dropped:  # the marker goes where the gap is
            self._queue.append(self._gap())
        self._queue.append(event)
        self._wake.set()

    def _gap(self) -> dict[str, Any]:
        dropped, self.dropped = self.dropped, 0
        return {"type": "dropped", "time": time.time(), "count": dropped}

    def close(self) -> None:
        self._closed = True
        self._followers.discard(self)
        self._wake.set()

    def __aiter__(self) -> _Follower:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._queue:
            if self.dropped:  # the reader caught up with the gap
                return self._gap()
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        self.close()


class _Publisher:
    """Publishes on :data:`TOPIC` from a thread of its own, through a bounded queue.

    A publication is lost (and counted in :attr:`lost`) when the queue is full
    or the broker cannot take it; the first loss of an outage is logged.
    """

    def __init__(self, paths: InstancePaths) -> None:
        self._paths = paths
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(PUBLISH_QUEUE)
        self._thread: threading.Thread | None = None
        self._client: Any = None  # the thread's BrokerClient, for abort()
        self._down = False
        self._ended = False
        self.lost = 0
        #: publications go out (the broker runs); else they are skipped, not lost
        self.open = True
        #: ikosd or IPC is stopping: nothing opens the gate again until it starts
        self.closing = False
        self.skipped = 0

    def publish(self, document: dict[str, Any]) -> None:
        if not self.open or self._ended:
            self.skipped += 1  # no broker, so no subscriber: nobody misses it
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="ikos-alerts-publisher", daemon=True
            )
            self._thread.start()
        try:
            self._queue.put_nowait(document)
        except queue.Full:
            self._lose("the queue to the publisher is full")

    def _lose(self, why: str) -> None:
        self.lost += 1
        if not self._down:
            self._down = True
            log.warning("alerts: not published on %s (%s); %d lost so far", TOPIC, why, self.lost)

    def _run(self) -> None:
        from ikos.ipc._client import BrokerClient

        client: BrokerClient | None = None
        while (document := self._queue.get()) is not None and not self._ended:
            try:
                if client is None:
                    client = BrokerClient(self._paths, label="ikosd-alerts", reconnect_timeout=0.5)
                    self._client = client
                    if self._ended:  # aborted while the client was made
                        break
                client.publish(TOPIC, document, codec="json")
                if self._down:
                    self._down = False
                    log.info("alerts: publishing on %s again (%d lost)", TOPIC, self.lost)
            except (IkosError, OSError) as exc:
                self._lose(str(exc))
                if client is not None:
                    client.close()
                    client = self._client = None
        if client is not None:
            client.close()

    def close(self) -> None:
        """Stop publishing, without waiting: the thread ends on its own, soon.

        What is queued is dropped, and a publication under way is aborted (its
        broker may be stopping, or accept and never answer).
        """
        self._ended, self.open = True, False
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        client = self._client
        if client is not None:
            client.abort()

    async def aclose(self, timeout: float) -> None:
        """:meth:`close`, then wait up to ``timeout`` seconds for the thread, on the loop."""
        self.close()
        thread = self._thread
        deadline = time.monotonic() + timeout
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if thread is not None and thread.is_alive():
            log.warning("alerts: the publisher thread did not end within %g s", timeout)
