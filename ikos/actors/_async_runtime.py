"""The asyncio runtime: the actor process of an actor whose handlers are ``async def``.

An actor whose ``receive``, ``on_start``, ``on_stop`` or any public method is
a coroutine function gets this runtime instead of the synchronous loop
(chosen once, at start, by :func:`ikos.actors._runtime.runtime_for`). It is
the same process otherwise: :class:`AsyncActorProcess` subclasses
:class:`~ikos.actors._runtime.ActorProcess` and keeps its sockets, epoll set,
handshakes, framing, shared-memory messages, counters and replies; only the
driving loop differs. The epoll set's own descriptor is registered with the
event loop (``loop.add_reader``), so the loop wakes when any connection has
bytes, and the base class's ``_poll`` moves complete frames into the same
bounded mailbox. Rejected: registering every connection with the event loop
and reading through asyncio streams, which would duplicate the framing,
descriptor passing and back-pressure that the base class already gets right.

Each mailbox entry's handler is called by :meth:`AsyncActorProcess._dispatch`:
a plain value answers at once; a coroutine (``async def receive`` or an async
method called through a proxy) becomes a task, and the next entry is taken
only while fewer than ``max_concurrency`` tasks run (1 by default: one
message at a time, even across awaits, as actor semantics want). A running
handler counts toward the mailbox's bound: an actor holds at most
``mailbox_size + 1`` messages, waiting or being handled, as the synchronous
one does (``mailbox_size`` waiting, one in ``receive``); past it the runtime
stops reading and senders block.

Stopping (SIGTERM, or ``self.stop()``): no new message is taken, running
handlers get :data:`STOP_GRACE` seconds to finish, then are cancelled (their
asks answered with :class:`ActorDeadError`), queued asks are answered with
:class:`ActorDeadError` and queued tells counted as dead letters as in the
synchronous runtime, then ``on_stop`` runs (awaited if async) and the process
exits 0. A handler that raises answers its ask with :class:`ActorCrashed`,
the other running handlers' asks get :class:`ActorDeadError`, and the process
exits 1, as the synchronous runtime does.

Timers are ``loop.call_at`` callbacks (``ikos.actors._timers.LoopTimers``)
that append to the mailbox like a message read from a socket.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import socket
import time
import traceback
from bisect import bisect_left
from collections.abc import Awaitable, Coroutine
from typing import Any, NoReturn

from ikos._errors import ActorDeadError
from ikos.actors._actor import Actor
from ikos.actors._call import MethodCall
from ikos.actors._ref import ASK, REPLY_ERR, REPLY_OK
from ikos.actors._runtime import (
    EXIT_CRASH,
    EXIT_NORMAL,
    EXIT_START_FAILED,
    ActorBoot,
    ActorProcess,
    _Client,
    _describe,
    handler_name,
)
from ikos.actors._stats import ASK_BUCKETS_NS, ASK_SUM_NS, FIRST_BUCKET, TAKEN
from ikos.actors._timers import LoopTimers
from ikos.platform._memfd import SharedBuffer

#: Seconds that running handlers get to finish once the actor is asked to stop;
#: then they are cancelled. Below a Child's default ``shutdown`` (5 s), after which
#: the manager kills the process.
STOP_GRACE = 2.0
#: Seconds that cancelled handlers get to unwind (``finally`` blocks) before the
#: actor answers their asks itself and moves on.
CANCEL_GRACE = 1.0


def check_concurrency(cls: type[Actor]) -> int:
    """``cls.max_concurrency``, or a ValueError naming the class and the value."""
    value = getattr(cls, "max_concurrency", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{cls.__qualname__}.max_concurrency: expected an integer >= 1, got {value!r}"
        )
    return value


#: What a running handler holds: its coroutine and whom to answer.
_Handler = tuple[Coroutine[Any, Any, Any], _Client, int, int]


class AsyncActorProcess(ActorProcess):
    """Drives one async actor on an asyncio event loop; see the module docstring."""

    def __init__(
        self,
        boot: ActorBoot,
        listener: socket.socket,
        status_fd: int,
        stats: memoryview | None = None,
    ) -> None:
        super().__init__(boot, listener, status_fd, stats)
        self.loop = asyncio.new_event_loop()
        self.mailbox_size = boot.mailbox_size
        # ``capacity`` is what ``_pump`` checks: the room left for waiting messages,
        # which every running handler takes one of (see the module docstring)
        self.capacity = self.mailbox_size + 1
        self.max_concurrency = 1
        self.running: dict[asyncio.Task[None], _Handler] = {}
        self.timers = LoopTimers(self.name, self, self.loop, self._dispatch)
        self._stop: asyncio.Future[None] = self.loop.create_future()
        self._handshake_check: asyncio.TimerHandle | None = None
        # no handler runs before on_start has returned, though a timer it set may
        # already have delivered its message while it awaited
        self._ready = False

    # -- main --------------------------------------------------------------

    def run(self) -> NoReturn:
        self._prepare_process()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self._exit(EXIT_CRASH, f"runtime error {_describe(exc)}", traceback.format_exc())
        self._exit(EXIT_CRASH, "runtime error: the event loop ended")

    async def _main(self) -> None:
        try:
            self.max_concurrency = check_concurrency(self.boot.cls)
        except ValueError as exc:
            self._exit(EXIT_START_FAILED, str(exc))
        try:
            actor = self._create_actor()
            await _maybe_await(actor.on_start())
        except BaseException as exc:
            self._exit(
                EXIT_START_FAILED, f"on_start raised {_describe(exc)}", traceback.format_exc()
            )
        self.listener.setblocking(False)
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.ep.register(self._wake_r.fileno(), select.EPOLLIN)
        self.loop.add_reader(self.ep.fileno(), self._on_ready)
        self._status(event="ready", pid=os.getpid())
        self._ready = True
        self._dispatch()  # what timers set by on_start may have delivered already
        await self._stop
        await self._stop_handlers()
        self.timers.close()
        self._drain()
        try:
            await _maybe_await(actor.on_stop())
        except BaseException as exc:
            self._exit(EXIT_CRASH, f"on_stop raised {_describe(exc)}", traceback.format_exc())
        self._exit(EXIT_NORMAL, "normal")

    def _on_ready(self) -> None:
        """The epoll set has events (or a handshake deadline passed): read, then dispatch."""
        try:
            self._poll(0.0)
            self._dispatch()
            if self.handshaking and self._handshake_check is None:
                timeout = self._next_timeout() or 0.0
                self._handshake_check = self.loop.call_later(timeout + 0.001, self._recheck)
        except BaseException as exc:  # a bug in the runtime itself: still report it
            self._exit(EXIT_CRASH, f"runtime error {_describe(exc)}", traceback.format_exc())

    def _recheck(self) -> None:
        self._handshake_check = None
        if not self._stop.done():
            self._on_ready()

    # -- handlers ----------------------------------------------------------

    def _dispatch(self) -> None:
        """Start handlers for waiting messages, in order, while fewer than
        ``max_concurrency`` run; resume reading once there is room again."""
        actor = self.actor
        if actor is None or not self._ready:
            return
        mailbox = self.mailbox
        while True:
            if self.stopping or getattr(actor, "_ikos_stop_requested", False):
                self._begin_stop()
                return
            if mailbox and len(self.running) < self.max_concurrency:
                self._take(actor)
                continue
            if self.paused and not self._full():
                self._resume()
                self._pump_buffers()
                continue
            return

    def _take(self, actor: Actor) -> None:
        # the same steps as ActorProcess._loop's, which inlines them: the synchronous
        # hot path cannot afford a method call per message
        client, kind, corr, message = self.mailbox.popleft()
        self.stats[TAKEN] += 1
        started = time.perf_counter_ns()
        if message.__class__ is memoryview and isinstance(message.obj, SharedBuffer):
            self.segments -= 1
        try:
            if message.__class__ is MethodCall:
                result = message.apply(actor)
            else:
                result = actor.receive(message)
        except BaseException as exc:
            self._handler_raised(client, kind, corr, exc, handler_name(message))
        if inspect.isawaitable(result):
            # a Future or another awaitable from a plain method is awaited the same way
            coro = result if inspect.iscoroutine(result) else _await(result)
            task = self.loop.create_task(self._handle(coro, client, kind, corr, started))
            self.running[task] = (coro, client, kind, corr)
            self.capacity -= 1
        else:
            self._answer(client, kind, corr, result, started)

    async def _handle(
        self, coro: Coroutine[Any, Any, Any], client: _Client, kind: int, corr: int, started: int
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            try:
                result = await coro
            except asyncio.CancelledError as exc:
                if not task.cancelling():  # raised by the handler's own code: a failure
                    self._handler_raised(client, kind, corr, exc, _coroutine_name(coro))
                if kind == ASK:  # cancelled by the stop
                    self._reply(
                        client,
                        REPLY_ERR,
                        corr,
                        ActorDeadError(self.name, "stopped before answering"),
                    )
                return
            except BaseException as exc:
                self._handler_raised(client, kind, corr, exc, _coroutine_name(coro))
            self._answer(client, kind, corr, result, started)
            del result  # a mapped reply must not stay mapped until the task is collected
        except BaseException as exc:  # a bug in the runtime itself: still report it
            self._exit(EXIT_CRASH, f"runtime error {_describe(exc)}", traceback.format_exc())
        finally:
            if self.running.pop(task, None) is not None:
                self.capacity += 1
        if not self._stop.done():
            self._dispatch()

    def _answer(self, client: _Client, kind: int, corr: int, result: Any, started: int) -> None:
        if kind != ASK:
            return
        self._reply(client, REPLY_OK, corr, result)
        elapsed = time.perf_counter_ns() - started
        stats = self.stats
        stats[ASK_SUM_NS] += elapsed
        stats[FIRST_BUCKET + bisect_left(ASK_BUCKETS_NS, elapsed)] += 1

    # -- endings -----------------------------------------------------------

    def _begin_stop(self) -> None:
        """Take no more messages and let ``_main`` stop the actor (once)."""
        if self._stop.done():
            return
        self.stopping = True
        self.loop.remove_reader(self.ep.fileno())
        if self._handshake_check is not None:
            self._handshake_check.cancel()
        self.timers.close()
        self._stop.set_result(None)

    async def _stop_handlers(self) -> None:
        """Let running handlers finish for STOP_GRACE, then cancel them; answer the
        asks of any that did not end."""
        if self.running:
            _, pending = await asyncio.wait(list(self.running), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CANCEL_GRACE)
        for coro, client, kind, corr in self.running.values():
            # never started (cancelled before its first step) or would not end
            try:
                coro.close()
            except BaseException:
                pass
            if kind == ASK:
                self._reply(
                    client, REPLY_ERR, corr, ActorDeadError(self.name, "stopped before answering")
                )
        self.running.clear()

    def _crash(self, exc: BaseException, handler: str = "receive") -> NoReturn:
        """As the base's, after answering the asks of the other running handlers."""
        current = asyncio.current_task(self.loop)
        for task, (_, client, kind, corr) in list(self.running.items()):
            if task is not current and kind == ASK:
                self._reply(
                    client, REPLY_ERR, corr, ActorDeadError(self.name, "stopped before answering")
                )
        self.running.clear()
        super()._crash(exc, handler)


def _coroutine_name(coro: Any) -> str:
    """The handler a coroutine came from, for a crash's reason (``receive``, ``fetch()``)."""
    name = getattr(coro, "__name__", "receive")
    return "receive" if name in ("receive", "_await") else f"{name}()"


async def _maybe_await(value: Any) -> Any:
    """``value``, awaited if it is awaitable: hooks may be plain or ``async def``."""
    if inspect.isawaitable(value):
        return await value
    return value


def _await(awaitable: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
    async def wrapper() -> Any:
        return await awaitable

    return wrapper()
