"""An actor's timers: messages it sends itself later, or periodically.

``Actor.send_after`` and ``Actor.send_interval`` land here. A timer lives in
the actor's process and belongs to the incarnation that set it: nothing of
it is written anywhere, so a restart (a crash, ``kill -9``, an upgrade)
starts with no timers. When a timer is due its message is appended to the
actor's mailbox, as a tell from the actor to itself: it is handled by
``receive``, in order with the messages already waiting, one at a time like
any other. The message object itself is delivered (it never leaves the
process, so it is neither encoded nor copied).

Two schedulers, one per runtime: the synchronous runtime keeps a heap of
deadlines that its loop consults for the epoll timeout
(:class:`HeapTimers`); the asyncio runtime uses ``loop.call_at``
(:class:`LoopTimers`). What they share is here in :class:`Timers`: the
validation of the arguments, the delivery into the mailbox and the
periodic timers' rule.

A periodic timer runs at a fixed rate with skipping: it is due at ``start +
k * interval``; a tick that finds the timer's previous message still waiting
in the mailbox (the actor is slower than the timer) is skipped, as are the
ticks missed while a long handler ran, so at most one message of a timer
waits at any time and a slow actor never faces a pile of them. Rejected: a
fixed delay (measured from each delivery), which drifts by the handling
time at every tick.

Cancelling takes back a message the timer already put in the mailbox and
that is still waiting: no message of a cancelled timer is received after
``cancel()`` returned (Akka gives the same guarantee). Finding it costs a
scan of the mailbox, paid by ``cancel`` and by a periodic tick, never by
the message loop: the runtime's hot path has no timer code at all.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ikos._errors import ActorError
from ikos.actors._stats import RECEIVED, TAKEN
from ikos.platform._memfd import SharedBuffer

if TYPE_CHECKING:
    import asyncio

#: The kind of a mailbox entry put there by a timer. Not a wire value: the loop
#: treats any kind but an ask as a tell, and a stopping actor does not count a
#: waiting timer message as a dead letter (nobody sent it).
TIMER = -1

#: The longest the synchronous loop sleeps in epoll for a timer (epoll takes
#: milliseconds in a C int): a timer further away just wakes it once an hour.
MAX_WAIT = 3600.0

Entry = tuple[Any, int, int, Any]  # (client, kind, corr, message), as the mailbox holds


class Mailbox(Protocol):
    """What timers need of the runtime (an ``ActorProcess`` is one): its mailbox, its
    counters, and how many mapped shared-memory messages wait in the mailbox."""

    mailbox: deque[Entry]
    stats: memoryview
    segments: int


class Timer:
    """A pending ``send_after`` or ``send_interval``; :meth:`cancel` stops it.

    Example::

        def on_start(self):
            self.tick = self.send_interval(1.0, "tick")

        def receive(self, message):
            if message == "quiet":
                self.tick.cancel()
    """

    __slots__ = ("_entry", "_handle", "_owner", "_seq", "interval", "message", "when")

    def __init__(self, owner: Timers, when: float, message: Any, interval: float | None) -> None:
        self._owner: Timers | None = owner  # None once it can fire no more
        #: when it is next due, on the ``time.monotonic()`` clock
        self.when = when
        self.message = message
        #: seconds between ticks for ``send_interval``; None for ``send_after``
        self.interval = interval
        self._entry: Entry | None = None  # its last message put in the mailbox
        self._seq = 0  # which heap entry is live (HeapTimers)
        self._handle: asyncio.TimerHandle | None = None  # (LoopTimers)

    def cancel(self) -> bool:
        """Stop the timer; True if it was pending: a tick still to come, or its message
        waiting in the mailbox, which is taken back (no message of the timer is
        received after this returns). False once a one-shot timer's message was
        received, or when already cancelled. Call it from the actor's own handlers."""
        owner = self._owner
        if owner is None:
            return False
        return owner.cancel(self)

    def __repr__(self) -> str:
        kind = f"every {self.interval:g} s" if self.interval is not None else "once"
        state = "" if self._owner is not None else " cancelled"
        return f"<Timer {kind} {self.message!r}{state}>"


def check_delay(actor: str, method: str, seconds: object, periodic: bool) -> float:
    """``seconds`` as a float, or a TypeError/ValueError naming the actor and argument."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(
            f"actor '{actor}': {method}(seconds=...): expected a number of seconds, "
            f"got {type(seconds).__name__} {seconds!r}"
        )
    value = float(seconds)
    if not math.isfinite(value) or value < 0 or (periodic and value == 0):
        expected = "a finite number > 0" if periodic else "a finite number >= 0"
        raise ValueError(
            f"actor '{actor}': {method}(seconds=...): expected {expected}, got {seconds!r}"
        )
    return value


class Timers:
    """The timers of one incarnation of an actor; a runtime makes one of the subclasses.

    ``owner`` is the runtime: a due timer appends its message to the owner's
    mailbox and counts it as the loop counts what it reads (received; a mapped
    shared-memory view, say a message kept from earlier, as a waiting segment).
    """

    def __init__(self, name: str, owner: Mailbox) -> None:
        self.name = name
        self.owner = owner
        self.mailbox = owner.mailbox
        self.stats = owner.stats
        self.closed = False
        self._owner_thread = threading.get_ident()

    def start(self, method: str, seconds: object, message: Any, periodic: bool) -> Timer:
        """A new timer (``method`` names the caller in errors)."""
        delay = check_delay(self.name, method, seconds, periodic)
        if threading.get_ident() != self._owner_thread:
            raise ActorError(
                self.name,
                f"{method} must be called from the actor's own handlers, not from another "
                "thread (tell the actor a message instead)",
            )
        timer = Timer(self, time.monotonic() + delay, message, delay if periodic else None)
        if self.closed:
            timer._owner = None  # set while stopping: it would never fire
        else:
            self._schedule(timer)
        return timer

    def cancel(self, timer: Timer) -> bool:
        """Cancel ``timer`` (see :meth:`Timer.cancel`)."""
        timer._owner = None
        scheduled = self._unschedule(timer)
        entry, timer._entry = timer._entry, None
        if entry is not None and self._withdraw(entry):
            self.stats[TAKEN] += 1  # out of the mailbox, so that its depth stays right
            if _mapped(entry[3]):
                self.owner.segments -= 1
            return True
        return scheduled

    def close(self) -> None:
        """Stop every timer: the actor is stopping (its process is about to end)."""
        self.closed = True

    def fire(self, timer: Timer, now: float) -> None:
        """``timer`` is due: deliver its message, and schedule its next tick if periodic."""
        if timer._owner is None or self.closed:
            return
        interval = timer.interval
        if interval is None:
            self._deliver(timer)  # cancel() may still take it back from the mailbox
            return
        entry = timer._entry
        if entry is None or not self._waiting(entry):
            self._deliver(timer)
        # fixed rate: the next multiple of the interval after now, missed ticks skipped
        timer.when += interval * max(1, math.floor((now - timer.when) / interval) + 1)
        self._schedule(timer)

    def _deliver(self, timer: Timer) -> None:
        entry = (None, TIMER, 0, timer.message)
        timer._entry = entry
        self.mailbox.append(entry)
        self.stats[RECEIVED] += 1
        if _mapped(timer.message):  # the loop counts it out again when it takes it
            self.owner.segments += 1

    def _waiting(self, entry: Entry) -> bool:
        """Whether ``entry`` is still in the mailbox (not yet taken by the loop)."""
        return any(e is entry for e in self.mailbox)

    def _withdraw(self, entry: Entry) -> bool:
        mailbox = self.mailbox
        for i, e in enumerate(mailbox):
            if e is entry:
                del mailbox[i]
                return True
        return False

    def _schedule(self, timer: Timer) -> None:
        raise NotImplementedError

    def _unschedule(self, timer: Timer) -> bool:
        """Forget ``timer``'s next tick; whether there was one."""
        raise NotImplementedError


class HeapTimers(Timers):
    """Timers of the synchronous runtime: a heap of deadlines its loop consults.

    The loop polls with :meth:`timeout` as epoll's timeout and calls
    :meth:`fire_due` after each poll. ``fast_until`` is the loop's one-element
    cell saying until when it may wait in its one-client fast path (a blocking
    ``recv`` of up to ``fast_idle`` seconds); a timer pulls it in so that the
    fast path never makes a timer late.
    """

    def __init__(
        self, name: str, owner: Mailbox, fast_until: list[float], fast_idle: float
    ) -> None:
        super().__init__(name, owner)
        #: (when, seq, timer); an entry is live while its seq is the timer's
        self.heap: list[tuple[float, int, Timer]] = []
        self._seqs = itertools.count(1)
        self._stale = 0  # dead entries in the heap (cancelled or rescheduled)
        self.fast_until = fast_until
        self.fast_idle = fast_idle

    def timeout(self, now: float) -> float | None:
        """Seconds until the next timer is due (None: no timer)."""
        heap = self.heap
        if not heap:
            return None
        return min(max(0.0, heap[0][0] - now), MAX_WAIT)

    def fire_due(self, now: float) -> float:
        """Deliver what is due at ``now``; returns until when the fast path may start."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, seq, timer = heapq.heappop(heap)
            if seq == timer._seq:
                timer._seq = 0
                self.fire(timer, now)
            else:
                self._stale -= 1
        if not heap:
            return now + self.fast_idle
        return min(now + self.fast_idle, heap[0][0] - self.fast_idle)

    def close(self) -> None:
        super().close()
        for _, _, timer in self.heap:
            timer._seq = 0
        self.heap.clear()
        self._stale = 0

    def _schedule(self, timer: Timer) -> None:
        timer._seq = seq = next(self._seqs)
        heapq.heappush(self.heap, (timer.when, seq, timer))
        cell = self.fast_until
        cell[0] = min(cell[0], timer.when - self.fast_idle)

    def _unschedule(self, timer: Timer) -> bool:
        if not timer._seq:
            return False
        timer._seq = 0
        self._stale += 1
        heap = self.heap
        # cancelled entries wait for their deadline; a program that keeps setting
        # and cancelling long timers must not grow the heap without bound
        if self._stale > 64 and self._stale * 2 > len(heap):
            heap[:] = [e for e in heap if e[1] == e[2]._seq]
            heapq.heapify(heap)
            self._stale = 0
        return True


class LoopTimers(Timers):
    """Timers of the asyncio runtime: one ``loop.call_at`` per pending tick;
    ``dispatch`` (the runtime's) runs after each delivery."""

    def __init__(
        self,
        name: str,
        owner: Mailbox,
        loop: asyncio.AbstractEventLoop,
        dispatch: Callable[[], None],
    ) -> None:
        super().__init__(name, owner)
        self.loop = loop
        self.dispatch = dispatch
        self.pending: set[Timer] = set()

    def _schedule(self, timer: Timer) -> None:
        # the loop's clock is time.monotonic(), the clock of ``when``
        timer._handle = self.loop.call_at(timer.when, self._due, timer)
        self.pending.add(timer)

    def _unschedule(self, timer: Timer) -> bool:
        handle, timer._handle = timer._handle, None
        self.pending.discard(timer)
        if handle is None:
            return False
        handle.cancel()
        return True

    def _due(self, timer: Timer) -> None:
        timer._handle = None
        self.pending.discard(timer)
        self.fire(timer, time.monotonic())
        self.dispatch()

    def close(self) -> None:
        super().close()
        for timer in list(self.pending):
            self._unschedule(timer)


def _mapped(message: Any) -> bool:
    """Whether ``message`` is a view of a received shared-memory segment, which the
    runtime counts apart while it waits in the mailbox."""
    return message.__class__ is memoryview and isinstance(message.obj, SharedBuffer)
