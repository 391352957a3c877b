"""``ask_async`` on the event loop's own I/O: one connection per (loop, actor).

The threaded pipeline (``ikos.actors._pipeline``) serves asyncio too, through
``asyncio.wrap_future``, but every reply then crosses from its thread to the
loop (``call_soon_threadsafe``: a write to the loop's wake-up pipe and a
thread switch per completion). Here the loop does the I/O itself: a reader
callback (``loop.add_reader``) decodes the replies and completes the loop's
futures by correlation id, frames queued during one turn of the loop go out
in one ``send`` at its end (``call_soon``), a write the socket does not take
at once waits for ``add_writer``, and each ask's timeout is a ``call_at``
timer. The connect and handshake, which block, run in the loop's default
executor. Measured against ``wrap_future`` in ``docs/actors.md``.

Bounds, failure and order are those of the threaded pipeline: at most
``MAX_IN_FLIGHT`` asks waiting and ``MAX_UNSENT_BYTES`` unwritten per
connection (past them an ask waits, at most its timeout, then
:class:`MailboxFull`); a lost connection fails every pending ask with
:class:`ActorDeadError`; an idle connection is closed after ``IDLE_CLOSE``
seconds; the asks of one task reach the actor in the order made. A
connection belongs to its loop; a forked child closes its copies of the
sockets and leaves the loops alone (their epoll instance is the parent's
too). The connections of a loop that closed are closed at the next connect
of any loop, and at exit (``_prune``).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ikos._errors import (
    ActorDeadError,
    ActorError,
    AskTimeout,
    MailboxFull,
    MessageTooLarge,
    MethodRefused,
)
from ikos.actors._pipeline import (
    IDLE_CLOSE,
    MAX_IN_FLIGHT,
    MAX_UNSENT_BYTES,
    _ids,
    as_ask_error,
    encode_frame,
    join_frames,
    read_replies,
    write_some,
)
from ikos.actors._ray_route import RayPlaced
from ikos.actors._ref import REPLY_OK, _Connection
from ikos.platform._memfd import close_all

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef

#: Each loop's connections by (root, actor), or the task making one. Not weak: a
#: connection's callbacks and timers hold its loop, so a weak key would never go;
#: the connections of closed loops are closed when a connection is next made
#: (``_prune``: ``asyncio.run`` closes its loop with no hook to tell us), and at exit.
_by_loop: dict[
    asyncio.AbstractEventLoop,
    dict[tuple[str | None, str], LoopPipeline | asyncio.Task[LoopPipeline]],
] = {}


class LoopPipeline:
    """One connection of one event loop to one actor (used from that loop only)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        key: tuple[str | None, str],
        conn: _Connection,
    ) -> None:
        self.loop = loop
        self.name = name
        self.key = key
        self.conn = conn
        self.fd = conn.sock.fileno()
        conn.sock.setblocking(False)
        self.pending: dict[int, tuple[asyncio.Future[Any], asyncio.TimerHandle, float]] = {}
        self.out: deque[tuple[bytes, int]] = deque()
        self.writing: deque[tuple[Any, int]] = deque()
        self.unsent = 0
        self.flush_scheduled = False
        self.writer_added = False
        self.idle: asyncio.TimerHandle | None = None
        self.room: asyncio.Event | None = None  # made when someone waits for room
        self.closed = False
        loop.add_reader(self.fd, self._on_readable)

    async def ask(self, corr: int, frame: bytes, fd: int, timeout: float, deadline: float) -> Any:
        """Queue the frame (``fd`` becomes the queue's) and wait for its reply."""
        while self.unsent > MAX_UNSENT_BYTES or len(self.pending) >= MAX_IN_FLIGHT:
            if self.room is None:
                self.room = asyncio.Event()
            try:
                await asyncio.wait_for(self.room.wait(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                if fd >= 0:
                    os.close(fd)
                raise MailboxFull(
                    self.name, "too many asks in flight on the pipelined connection"
                ) from None
        if self.closed:
            if fd >= 0:
                os.close(fd)
            raise ActorDeadError(self.name, "the connection broke")
        future = self.loop.create_future()
        timer = self.loop.call_later(max(deadline - time.monotonic(), 0), self._expire, corr)
        self.pending[corr] = (future, timer, timeout)
        self.out.append((frame, fd))
        self.unsent += len(frame)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return await future

    def _expire(self, corr: int) -> None:
        entry = self.pending.pop(corr, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(AskTimeout(self.name, f"no reply within {entry[2]:g} s"))
        self._maybe_idle()

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.closed:
            return
        join_frames(self.out, self.writing)
        self.out.clear()
        written, ok = write_some(self.conn.sock, self.writing)
        self._wrote(written)
        if not ok:
            self.fail(ActorDeadError(self.name, "stopped before answering"))
        elif self.writing and not self.writer_added:
            self.writer_added = True
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        written, ok = write_some(self.conn.sock, self.writing)
        self._wrote(written)
        if not ok:
            self.fail(ActorDeadError(self.name, "stopped before answering"))
        elif not self.writing:
            self.writer_added = False
            self.loop.remove_writer(self.fd)

    def _wrote(self, written: int) -> None:
        self.unsent -= written
        if self.room is not None and self.unsent <= MAX_UNSENT_BYTES:
            self.room.set()
            self.room = None

    def _on_readable(self) -> None:
        try:
            replies = read_replies(self.conn, self.name)
        except ActorError as exc:
            self.fail(exc)
            return
        if replies is None:
            self.fail(ActorDeadError(self.name, "stopped before answering"))
            return
        pending = self.pending
        for kind, rid, value in replies:
            entry = pending.pop(rid, None)  # None: it timed out already
            if entry is None:
                continue
            future, timer, _ = entry
            timer.cancel()
            if future.done():  # its task was cancelled
                continue
            if kind == REPLY_OK and value.__class__ is not MethodRefused:
                future.set_result(value)
            else:
                future.set_exception(value)
        if self.room is not None and len(pending) < MAX_IN_FLIGHT:
            self.room.set()
            self.room = None
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.pending and not self.out and not self.writing and self.idle is None:
            self.idle = self.loop.call_later(IDLE_CLOSE, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self.idle = None
        if not self.pending and not self.out and not self.writing:
            self.fail(ActorDeadError(self.name, "closed"))

    def fail(self, error: BaseException) -> None:
        """Close for good: every pending ask gets ``error``."""
        if self.closed:
            return
        self.closed = True
        pipes = _by_loop.get(self.loop)
        if pipes is not None and pipes.get(self.key) is self:
            del pipes[self.key]
            if not pipes:
                del _by_loop[self.loop]
        self.loop.remove_reader(self.fd)
        if self.writer_added:
            self.loop.remove_writer(self.fd)
        if self.idle is not None:
            self.idle.cancel()
        pending, self.pending = self.pending, {}
        for future, timer, _ in pending.values():
            timer.cancel()
            if not future.done() and not self.loop.is_closed():
                future.set_exception(error)
        close_all([fd for _, fd in self.out if fd >= 0])
        close_all([fd for _, fd in self.writing if fd >= 0])
        self.conn.close()
        if self.room is not None:
            self.room.set()


async def ask_async(ref: ActorRef[Any], message: Any, timeout: float) -> Any:
    """``ref.ask(message)`` awaited on the running loop's own connection."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    corr = next(_ids)
    frame, fd = encode_frame(ref, corr, message)
    try:
        for _ in (0, 1):
            pipe = await _pipeline(loop, ref, deadline, timeout)
            if len(frame) - 4 > pipe.conn.max_frame:
                raise MessageTooLarge(ref.name, len(frame) - 4, pipe.conn.max_frame)
            if not pipe.closed:
                owned, fd = fd, -1  # the pipeline's from here
                return await pipe.ask(corr, frame, owned, timeout, deadline)
        raise ActorDeadError(ref.name, "the connection broke")
    except RayPlaced as placed:  # no local mailbox: the actor runs on Ray (issue 13)
        return await asyncio.wrap_future(placed.route.future(message, timeout))
    finally:
        if fd >= 0:
            os.close(fd)


async def _pipeline(
    loop: asyncio.AbstractEventLoop, ref: ActorRef[Any], deadline: float, timeout: float
) -> LoopPipeline:
    """The loop's connection to ``ref``'s actor; the first asker connects (in the
    executor), the others that come meanwhile wait for that one connect."""
    pipes = _by_loop.setdefault(loop, {})
    key = (ref._root, ref.name)
    entry = pipes.get(key)
    if isinstance(entry, LoopPipeline) and not entry.closed:
        return entry
    if entry is None or isinstance(entry, LoopPipeline):
        _prune(loop)
        entry = pipes[key] = loop.create_task(_open(loop, ref, key, deadline))
    try:
        # shielded: one asker's cancellation must not cancel the others' connect
        return await asyncio.shield(entry)
    except BaseException as exc:
        raise as_ask_error(ref, exc, timeout) from None


async def _open(
    loop: asyncio.AbstractEventLoop,
    ref: ActorRef[Any],
    key: tuple[str | None, str],
    deadline: float,
) -> LoopPipeline:
    pipes = _by_loop.setdefault(loop, {})
    try:
        conn = await loop.run_in_executor(None, ref._connect, deadline)
    except BaseException:
        if pipes.get(key) is asyncio.current_task():
            del pipes[key]
        raise
    pipe = pipes[key] = LoopPipeline(loop, ref.name, key, conn)
    return pipe


def _prune(current: asyncio.AbstractEventLoop | None) -> None:
    """Close the connections of every loop that is closed (all but ``current`` at exit)."""
    for loop in [
        lp for lp in _by_loop if lp is not current and (current is None or lp.is_closed())
    ]:
        for entry in _by_loop.pop(loop).values():
            if isinstance(entry, LoopPipeline):
                entry.fail(ActorDeadError(entry.name, "its event loop closed"))


def _forget_in_child() -> None:
    """A forked child does not run its parent's loops: close its copies of their
    sockets, without touching the loops (their epoll instance is the parent's too)."""
    for pipes in _by_loop.values():
        for entry in pipes.values():
            if isinstance(entry, LoopPipeline):
                entry.closed = True
                entry.conn.close()
    _by_loop.clear()


atexit.register(_prune, None)
os.register_at_fork(after_in_child=_forget_in_child)
