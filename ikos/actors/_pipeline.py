"""Pipelined asks: many replies in flight on one connection, completed as futures.

``ActorRef.ask_future`` (and ``ask_async``, and the future proxy) send the ask
on a connection of their own, one per (process, instance, actor), and return
a :class:`concurrent.futures.Future` at once; one reader thread per such
connection reads the replies and completes the futures by correlation id.
The actor answers a connection's asks in the order they came, so the replies
come back in order and each is matched with a dictionary pop.

Why a reader thread, and why per process: the blocking ``ask`` keeps its own
per-thread connection and reads its reply itself, at the pipe floor, with no
lock and no hand-off (a reply handed from a reader thread to the caller costs
a thread switch, more than the whole round trip); so the pipelined path is a
separate one and the plain ``ask``/``tell`` do not pay for it. Futures are
for having many asks in flight, and one connection carries them all: one
socket and one actor-side client per process instead of one per thread,
which matters because an actor serves a single client on a faster path
(``docs/architecture.md``). Writers take a lock to send a whole frame; the
reader never takes it for a reply.

Time: each future has a deadline (its ``timeout``), kept in a heap the
reader also waits on, so a future fails with :class:`AskTimeout` when its
time is up even while the actor stays silent; a new future whose deadline is
earlier than the reader's next wake-up writes a byte to a wake-up pipe. A
connection with nothing in flight for :data:`IDLE_CLOSE` seconds is closed
and its reader ends: an idle process holds no thread and no actor-side
client. Losing the connection (the actor died, or restarts) fails every
future in flight with :class:`ActorDeadError`; none is left hanging. At fork
the child drops the parent's connections (the reader thread does not exist
in the child), and at interpreter exit the connections are closed, failing
what is still in flight.

Order: the asks made through this path by one thread reach the actor in the
order they were made (each is sent, under the writer lock, before the call
returns). This path is a different connection from the thread's ``ask`` and
``tell``, so a ``tell`` made after an ``ask_future`` may be handled first:
wait for the future, or send the later message through this path too.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import os
import select
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from ikos._codec import SHM, decode, encode
from ikos._errors import (
    ActorDeadError,
    ActorError,
    AskTimeout,
    MailboxFull,
    MessageTooLarge,
    MethodRefused,
)
from ikos.actors._call import MethodCall
from ikos.actors._ref import (
    ASK,
    CALL,
    REPLY_OK,
    SHM_TYPES,
    ShmProtocolError,
    _Connection,
    by_shm,
    decode_shm,
    encode_shm,
    take_fds,
)
from ikos.platform._memfd import ANCILLARY_SIZE, MSG_CTRUNC, RECV_FLAGS, fds_of
from ikos.platform._wire import HEADER

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef

#: Seconds a connection stays open with nothing in flight before it is closed.
IDLE_CLOSE = 2.0

#: Correlation ids, unique in the process: a message encoded once can be re-sent
#: on a fresh connection when the first one turned out to be closed.
_ids = itertools.count(1)

_registry_lock = threading.Lock()
_pipelines: dict[tuple[str | None, str], Pipeline] = {}


class Pipeline:
    """One pipelined connection to one actor, and the futures waiting on it."""

    def __init__(self, name: str, key: tuple[str | None, str], conn: _Connection) -> None:
        self.name = name
        self.key = key
        self.conn = conn
        self.send_lock = threading.Lock()  # a whole frame at a time; then state_lock
        self.state_lock = threading.Lock()  # pending, heap, closed: never held for I/O
        self.pending: dict[int, tuple[Future[Any], float, float]] = {}
        self.heap: list[tuple[float, int]] = []  # (deadline, corr); stale entries skipped
        self.closed = False
        self.wake_at = float("inf")  # when the reader will look at the heap next
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.reader = threading.Thread(
            target=self._read_loop, name=f"ikos-pipeline-{name}", daemon=True
        )

    def release(self) -> None:
        """Close the descriptors (the reader's last act, or a pipeline never started)."""
        self.conn.close()
        self.wake_r.close()
        self.wake_w.close()

    # -- the calling side -----------------------------------------------------

    def register(self, corr: int, future: Future[Any], deadline: float, timeout: float) -> bool:
        """Make ``future`` wait for the reply ``corr``; False if the connection closed."""
        with self.state_lock:
            if self.closed:
                return False
            self.pending[corr] = (future, deadline, timeout)
            heapq.heappush(self.heap, (deadline, corr))
            if deadline < self.wake_at:  # rare: the reader sleeps past this deadline
                self.wake_at = deadline
                try:
                    self.wake_w.send(b"\0")
                except OSError:  # full: the reader is awake already
                    pass
        return True

    def forget(self, corr: int) -> None:
        """Stop waiting for ``corr`` (its ask was not sent)."""
        with self.state_lock:
            self.pending.pop(corr, None)

    # -- the reader -----------------------------------------------------------

    def _read_loop(self) -> None:
        conn = self.conn
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r.fileno(), select.POLLIN)
        idle_since = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                for future, timeout in self._expire(now):
                    _settle(future, AskTimeout(self.name, f"no reply within {timeout:g} s"))
                if self.pending:
                    idle_since = now
                elif now - idle_since >= IDLE_CLOSE and self._detach_if_idle():
                    return
                with self.state_lock:
                    nxt = self.heap[0][0] if self.heap else idle_since + IDLE_CLOSE
                    self.wake_at = nxt
                for fd, _ in poller.poll(max(0, int((nxt - time.monotonic()) * 1000) + 1)):
                    if fd == self.wake_r.fileno():
                        try:
                            while self.wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    elif not self._read(conn):
                        self._fail(ActorDeadError(self.name, "stopped before answering"))
                        return
        except BaseException as exc:  # a bug here must not leave futures hanging
            self._fail(ActorError(self.name, f"the pipelined connection failed: {exc!r}"))
            raise
        finally:
            # the reader owns the descriptors: closed once no sender can be using them
            with self.send_lock, self.state_lock:
                self.release()

    def _expire(self, now: float) -> list[tuple[Future[Any], float]]:
        """Take the futures whose deadline passed; compact the heap of stale entries."""
        expired = []
        with self.state_lock:
            heap, pending = self.heap, self.pending
            while heap and heap[0][0] <= now:
                deadline, corr = heapq.heappop(heap)
                entry = pending.get(corr)
                if entry is not None and entry[1] == deadline:
                    del pending[corr]
                    expired.append((entry[0], entry[2]))
            # entries of answered futures stay until their deadline: rebuild when
            # they dominate, so the heap is bounded by what is in flight
            if len(heap) > 1024 and len(heap) > 2 * len(pending):
                self.heap = [(entry[1], corr) for corr, entry in pending.items()]
                heapq.heapify(self.heap)
        return expired

    def _read(self, conn: _Connection) -> bool:
        """Read what arrived and complete the futures it answers; False on EOF."""
        try:
            got, anc, flags, _ = conn.sock.recvmsg_into(
                conn.bufs, ANCILLARY_SIZE, RECV_FLAGS | socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        try:
            if anc or flags & MSG_CTRUNC:
                take_fds(conn.fds, fds_of(anc, flags))
            if not got:
                return False
            buf = conn.buf
            buf += conn.view[:got]
            pending = self.pending
            while len(buf) >= 4:
                (n,) = HEADER.unpack_from(buf)
                if len(buf) < 4 + n:
                    break
                raw = bytes(buf[4 : 4 + n])
                del buf[: 4 + n]
                kind, rid, value = decode_shm(raw, conn.fds) if raw[0] == SHM else decode(raw)
                entry = pending.pop(rid, None)  # None: it timed out already
                if entry is None:
                    continue
                if kind == REPLY_OK and value.__class__ is not MethodRefused:
                    _settle(entry[0], None, value)
                else:
                    _settle(entry[0], value)
            if conn.fds and not buf:
                raise ShmProtocolError("a descriptor came without a frame announcing it")
        except ValueError as exc:  # ShmProtocolError, truncated descriptors
            self._fail(ActorError(self.name, f"bad shared-memory reply: {exc}"))
            return False
        except Exception as exc:  # a reply this process cannot decode: the stream is lost
            self._fail(ActorError(self.name, f"could not decode a reply: {exc!r}"))
            return False
        return True

    def _detach_if_idle(self) -> bool:
        """Leave the registry if nothing is in flight and nobody is sending (the
        reader then ends and closes the connection)."""
        if not self.send_lock.acquire(blocking=False):
            return False
        try:
            with self.state_lock:
                if self.pending:
                    return False
                self._detach()
                return True
        finally:
            self.send_lock.release()

    def _detach(self) -> None:
        """Mark closed and leave the registry (under state_lock)."""
        self.closed = True
        with _registry_lock:
            if _pipelines.get(self.key) is self:
                del _pipelines[self.key]

    def _fail(self, error: ActorError) -> None:
        """Close for good and fail every future in flight with ``error``."""
        with self.state_lock:
            self._detach()
            pending, self.pending = self.pending, {}
            self.heap = []
            if self.conn.sock.fileno() >= 0:
                try:  # ends the reader's wait, and a sender's blocked sendall
                    self.conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for future, _, _ in pending.values():
            _settle(future, error)


def _settle(future: Future[Any], error: BaseException | None, value: Any = None) -> None:
    """Complete ``future`` unless its caller cancelled it meanwhile."""
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


def _pipeline(ref: ActorRef[Any], deadline: float) -> Pipeline:
    """The process's pipelined connection to ``ref``'s actor, made if needed."""
    key = (ref._root, ref.name)
    pipe = _pipelines.get(key)
    if pipe is not None and not pipe.closed:
        return pipe
    conn = ref._connect(deadline)  # outside the lock: a connect may wait
    fresh = Pipeline(ref.name, key, conn)
    with _registry_lock:
        pipe = _pipelines.get(key)
        if pipe is None or pipe.closed:
            _pipelines[key] = pipe = fresh
    if pipe is fresh:
        fresh.reader.start()
    else:  # another thread made one meanwhile
        fresh.release()
    return pipe


def submit(ref: ActorRef[Any], message: Any, timeout: float) -> Future[Any]:
    """Send ``message`` as an ask on the pipelined connection; its reply's future.

    Every failure, from encoding to the actor's death, is the future's
    exception; this only blocks while the actor's mailbox and the socket's
    buffers are full (at most ``timeout``).
    """
    future: Future[Any] = Future()
    deadline = time.monotonic() + timeout
    corr = next(_ids)
    fd, owned = -1, False
    try:
        ctx = ref._context()
        if message.__class__ in SHM_TYPES and by_shm(message, ctx.shm_threshold):
            data, fd, owned = encode_shm(ASK, corr, message)
        else:
            if message.__class__ is MethodCall:  # a future proxy's call: see CALL
                data = encode((CALL, corr, (message.method, message.args, message.kwargs)))
            else:
                data = encode((ASK, corr, message))
            if len(data) > ctx.max_frame:
                raise MessageTooLarge(ref.name, len(data), ctx.max_frame)
        _send(ref, HEADER.pack(len(data)) + data, len(data), corr, future, deadline, timeout, fd)
    except BaseException as exc:
        if isinstance(exc, TimeoutError) and not isinstance(exc, ActorError):
            exc = AskTimeout(ref.name, f"no reply within {timeout:g} s (could not connect)")
        _settle(future, exc)
        if not isinstance(exc, Exception):
            raise
    finally:
        if owned:
            os.close(fd)
    return future


def _send(
    ref: ActorRef[Any],
    packet: bytes,
    size: int,
    corr: int,
    future: Future[Any],
    deadline: float,
    timeout: float,
    fd: int,
) -> None:
    """Register ``future`` and send its frame, on a fresh connection if the first
    one turned out closed (the actor restarted since it was made)."""
    for attempt in (0, 1):
        pipe = _pipeline(ref, deadline)
        if size > pipe.conn.max_frame:
            raise MessageTooLarge(ref.name, size, pipe.conn.max_frame)
        lock = pipe.send_lock
        if not lock.acquire(False) and not lock.acquire(
            timeout=max(deadline - time.monotonic(), 0)
        ):
            raise MailboxFull(ref.name, "the pipelined connection stayed busy until the timeout")
        try:
            if not pipe.register(corr, future, deadline, timeout):
                continue  # closed between lookup and lock: make a new one
            try:
                # the ask's whole timeout, not what is left of it: the socket option is
                # then set once per connection, not before every send
                pipe.conn.send(packet, timeout, fd)
                return
            except (BrokenPipeError, ConnectionResetError):
                pipe.forget(corr)
                if attempt:
                    raise ActorDeadError(ref.name, "the connection broke")
            except TimeoutError:
                # part of the frame may be in the socket: the stream is unusable
                pipe.forget(corr)
                pipe._fail(MailboxFull(ref.name, "mailbox full: a pipelined send timed out"))
                raise MailboxFull(ref.name, "mailbox full: the send timed out") from None
        finally:
            lock.release()
    raise ActorDeadError(ref.name, "the connection broke")


def _close_all(reason: str) -> None:
    with _registry_lock:
        pipes = list(_pipelines.values())
    for pipe in pipes:
        pipe._fail(ActorDeadError(pipe.name, reason))


def _after_fork_in_child() -> None:
    """The reader threads do not exist in a child: drop the inherited connections."""
    global _registry_lock, _pipelines
    pipes = list(_pipelines.values())
    _registry_lock = threading.Lock()
    _pipelines = {}
    for pipe in pipes:
        pipe.closed = True
        pipe.release()  # this process's copies of the descriptors only


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all, "the calling process is exiting")
