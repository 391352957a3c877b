"""The base class users subclass to write an actor.

An actor runs in its own OS process, owns one mailbox and handles one
message at a time: ``receive`` is called for every message, and its return
value answers an ask. ``on_start`` runs before the first message (the actor
counts as ready once it returns) and ``on_stop`` after the last. An
exception escaping ``receive`` or ``on_start`` crashes the actor; its
supervisor decides what happens next. The process runtime that drives these
hooks lives in ``ikos.actors._runtime``; an actor whose handlers or hooks are
``async def`` is driven by the asyncio one, ``ikos.actors._async_runtime``.
An actor's timers (``send_after``, ``send_interval``) are in
``ikos.actors._timers``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ikos._errors import ActorError

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef
    from ikos.actors._timers import Timer, Timers
    from ikos.platform._paths import InstancePaths

#: How an actor subscribes to broadcasts: ``ikos.ipc`` (a layer above this one)
#: registers its ``subscribe`` here when it is imported, as ``import ikos`` does.
_subscribe: Callable[[str, Callable[[Any], Any]], Any] | None = None

#: Seconds :meth:`Actor.monitor` waits for the manager's answer.
MONITOR_CALL_TIMEOUT = 10.0


def set_broadcast_source(subscribe: Callable[[str, Callable[[Any], Any]], Any]) -> None:
    """Install what :meth:`Actor.subscribe` calls (done by ``ikos.ipc``)."""
    global _subscribe
    _subscribe = subscribe


class Actor:
    """Subclass and define :meth:`receive`.

    Example::

        class Counter(ikos.Actor):
            def on_start(self) -> None:
                self.count = 0

            def receive(self, message):
                if message == "incr":
                    self.count += 1
                return self.count
    """

    #: The actor's name in the tree, set before ``on_start`` runs.
    name: str = ""

    #: How many ``async def`` handlers may run at once (Ray's name). 1, the default,
    #: keeps actor semantics: the next message's handler starts only when the
    #: previous one has finished, even across its awaits. Above 1, up to that many
    #: run concurrently on the actor's event loop, taken in mailbox order (replies
    #: may then leave in another order). Synchronous handlers always run alone.
    max_concurrency: int = 1

    #: The incarnation's timers, given by the runtime before ``on_start``.
    _ikos_timers: Timers | None = None

    # The hooks are typed to allow an ``async def`` override (a coroutine is an
    # Awaitable[None]); a plain one returns None.
    def on_start(self) -> Awaitable[None] | None:
        """Called once in the actor's process before the first message (may be async)."""

    def receive(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to an ask."""
        raise NotImplementedError(f"{type(self).__name__} must define receive(self, message)")

    def on_stop(self) -> Awaitable[None] | None:
        """Called once when the actor stops in an orderly way (may be async)."""

    def stop(self) -> None:
        """Stop after the current message, as a normal exit (not restarted if transient)."""
        self._ikos_stop_requested = True

    def send_after(self, seconds: float, message: Any) -> Timer:
        """Tell this actor ``message`` once, ``seconds`` from now; returns the timer.

        The message joins the mailbox when due, behind what already waits, and
        ``receive`` gets it like any tell (the object itself, not a copy). Never
        before ``seconds`` have passed; late by the handler running at that time,
        if any. The timer belongs to this incarnation: a restart starts without
        it. Call it from ``on_start`` or a handler (not ``__init__``).

        Example::

            def receive(self, message):
                if message == "connect":
                    self.retry = self.send_after(2.5, "connect-timeout")
                elif message == "connected":
                    self.retry.cancel()
        """
        return self._timers("send_after").start("send_after", seconds, message, periodic=False)

    def send_interval(self, seconds: float, message: Any) -> Timer:
        """Tell this actor ``message`` every ``seconds`` (> 0); returns the timer.

        A fixed rate with skipping: the ticks are due at ``k * seconds`` after
        this call, and a tick is skipped when the previous one's message still
        waits in the mailbox, or passed while a long handler ran, so a slow
        actor never gets a backlog of ticks. ``cancel()`` stops it.

        Example::

            def on_start(self):
                self.heartbeat = self.send_interval(1.0, "beat")

            def receive(self, message):
                if message == "beat":
                    self.check_peers()
        """
        return self._timers("send_interval").start("send_interval", seconds, message, periodic=True)

    def _timers(self, method: str) -> Timers:
        timers = self._ikos_timers
        if timers is None:
            raise ActorError(
                self.name or type(self).__name__,
                f"{method} works in the actor's own process, once its runtime started it "
                "(from on_start on, not in __init__)",
            )
        return timers

    def actor(self, name: str) -> ActorRef:
        """A reference to another actor of the same instance, by name."""
        from ikos.actors._ref import ActorRef

        return ActorRef(name)

    def subscribe(self, pattern: str) -> None:
        """Receive the broadcasts on topics matching ``pattern`` in :meth:`receive`.

        Each arrives as an :class:`~ikos.ipc.IpcMessage` (``type`` "broadcast",
        ``topic`` set), in publication order, among the actor's other messages:
        the subscription's thread tells them to the actor's own mailbox, so
        ``receive`` still handles one message at a time. Subscribing twice to
        one pattern is one subscription.

        Example::

            def on_start(self):
                self.subscribe("net.*")

            def receive(self, message):
                if isinstance(message, ikos.ipc.IpcMessage):
                    self.links[message.topic] = message.payload
        """
        if _subscribe is None:
            raise ActorError(self.name, "subscribe needs ikos.ipc: import ikos.ipc")
        subscriptions = self.__dict__.setdefault("_ikos_subscriptions", {})
        if pattern not in subscriptions:
            subscriptions[pattern] = _subscribe(pattern, self.ref.tell)

    def unsubscribe(self, pattern: str) -> None:
        """Stop the broadcasts of an earlier :meth:`subscribe` (nothing if there was none)."""
        sub = self.__dict__.get("_ikos_subscriptions", {}).pop(pattern, None)
        if sub is not None:
            sub.unsubscribe()

    # -- monitors (ikos.actors._monitor; served by ikos.manager._monitor_service) --------

    def monitor(self, name: str) -> None:
        """Get an :class:`~ikos.Down` in :meth:`receive` each time the daemon ``name`` stops.

        ``name`` is any actor or executable of the tree (not this actor
        itself). If it is not running now, ``Down(name, "noproc")`` comes at
        once. Unlike an OTP monitor, which fires once for one process, the
        monitor is on the *name*: it stays armed across the watched daemon's
        restarts, one ``Down`` per stop, in order, until :meth:`demonitor`.
        It belongs to this incarnation: after a restart of this actor it is
        gone, so set monitors in :meth:`on_start`. Monitoring a name twice is
        one monitor. :class:`~ikos.NoSuchDaemon` if the tree has no such
        daemon.

        Example::

            def on_start(self):
                self.monitor("db")

            def receive(self, message):
                if isinstance(message, ikos.Down):
                    self.db_up = False  # message.reason: "crashed", "killed"...
        """
        self._ikos_monitor_call("monitor", name)

    def demonitor(self, name: str) -> None:
        """Remove the monitor on ``name``: no ``Down`` comes for a stop after this returns.

        Downs the manager has not yet handed over are dropped; one already in
        this actor's mailbox (its stop came before the call) is still
        received, as OTP's ``demonitor`` without ``flush``. Removing a monitor
        that was not set does nothing.
        """
        self._ikos_monitor_call("demonitor", name)

    def _ikos_monitor_call(self, verb: str, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ActorError(
                self.name, f"{verb}: a daemon's name is a non-empty string, not {name!r}"
            )
        from ikos.actors import _context
        from ikos.platform._control import ControlClient

        # the manager knows this process by its pid (SO_PEERCRED) and checks
        # that it is the actor called self.name: a monitor cannot be set for another
        with ControlClient(_context.get().paths, timeout=MONITOR_CALL_TIMEOUT) as client:
            client.call(verb, {"name": name, "watcher": self.name})

    @property
    def paths(self) -> InstancePaths:
        """The directories of the ikos instance this actor runs in.

        ``root`` (``None`` for the system instance), ``run_dir``, ``state_dir``
        and ``log_dir``: with ``ikosd --root R`` they are under ``R``, so an
        actor that keeps files should put them here rather than under a
        fixed ``/var`` path, and several instances never share them. Valid in
        ``on_start`` and after (and in ``__init__``, which runs in the
        actor's process).
        """
        from ikos.actors import _context

        return _context.instance_paths(None)

    @property
    def ref(self) -> ActorRef:
        """A reference to this actor, to hand to others."""
        from ikos.actors._ref import ActorRef

        return ActorRef(self.name)
