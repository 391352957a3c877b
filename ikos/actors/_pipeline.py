"""Pipelined asks: many replies in flight on one connection, completed as futures.

(``ask_async`` has the same design on the event loop's own I/O, in
``ikos.actors._loop_pipeline``, and shares this module's framing helpers.)

``ActorRef.ask_future`` (and the future proxies) queue the ask for a
connection of their own, one per (process, instance, actor), and
return a :class:`concurrent.futures.Future` at once. One thread per such
connection does all its I/O: it writes the queued frames (those queued since
its last write go out in one ``send``), reads the replies and completes the
futures by correlation id. The actor answers a connection's asks in the
order they came, so the replies come back in order and each is matched with
a dictionary pop.

Why a thread, and why per process: the blocking ``ask`` keeps its own
per-thread connection and reads its reply itself, at the pipe floor, with no
lock and no hand-off (a reply handed from another thread to the caller costs
a thread switch, more than the whole round trip); so the pipelined path is a
separate one and the plain ``ask``/``tell`` do not pay for it. Futures are
for having many asks in flight, and one connection carries them all: one
socket and one actor-side client per process instead of one per thread,
which matters because an actor serves a single client on a faster path
(``docs/architecture.md``). The thread writes as well as reads because a
caller writing for itself would block as soon as the actor is busy: a Unix
socket's buffer holds only a few hundred small frames (it counts each
``send``'s bookkeeping, not just its bytes), and a future that blocks its
caller is no future. So callers only queue, bounded (:data:`MAX_UNSENT_BYTES`
not yet written, :data:`MAX_IN_FLIGHT` futures waiting: past either a caller
waits, at most its timeout, then gets :class:`MailboxFull`), and one thread
writing batches also lets a single caller's futures travel many to a
``send``, which is where the pipelined rate comes from.

Time: each future has a deadline (its ``timeout``), kept in a heap the
thread also waits on, so a future fails with :class:`AskTimeout` when its
time is up even while the actor stays silent. A connection with nothing in
flight for :data:`IDLE_CLOSE` seconds is closed and its thread ends: an idle
process holds no thread and no actor-side client. Losing the connection (the
actor died, or restarts) fails every future in flight with
:class:`ActorDeadError`; none is left hanging. At fork the child drops the
parent's connections (the thread does not exist in the child), and at
interpreter exit the connections are closed, failing what is still in
flight.

Order: the asks queued here by one thread reach the actor in the order they
were made. This path is a different connection from the thread's ``ask``
and ``tell``, so a ``tell`` made after an ``ask_future`` may be handled
first: wait for the future, or send the later message through this path too.
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
from collections import deque
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
from ikos.actors._ray_route import RayPlaced
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
from ikos.platform._memfd import (
    ANCILLARY_SIZE,
    MSG_CTRUNC,
    RECV_FLAGS,
    close_all,
    fds_of,
    send_with_fds,
)
from ikos.platform._wire import HEADER

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef

#: Seconds a connection stays open with nothing in flight before it is closed.
IDLE_CLOSE = 2.0
#: Bytes queued on one connection and not yet written, past which callers wait.
MAX_UNSENT_BYTES = 8 << 20
#: Futures waiting on one connection, past which callers wait.
MAX_IN_FLIGHT = 100_000
#: Queued frames are joined into writes of at most about this many bytes.
WRITE_BATCH = 1 << 20

#: Correlation ids, unique in the process: a message encoded once can be queued
#: on a fresh connection when the first one turned out to be closed.
_ids = itertools.count(1)

_registry_lock = threading.Lock()
_pipelines: dict[tuple[str | None, str], Pipeline] = {}


class Pipeline:
    """One pipelined connection to one actor, the frames queued for it and the
    futures waiting on it; its thread (:meth:`_run`) does all the I/O."""

    def __init__(self, name: str, key: tuple[str | None, str], conn: _Connection) -> None:
        self.name = name
        self.key = key
        self.conn = conn
        # everything below but ``writing`` is shared with callers: under ``lock``,
        # which is never held for I/O (``room``: callers waiting for the bounds)
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.pending: dict[int, tuple[Future[Any], float, float]] = {}
        self.heap: list[tuple[float, int]] = []  # (deadline, corr); stale entries skipped
        self.out: deque[tuple[bytes, int]] = deque()  # (frame, descriptor it owns or -1)
        self.unsent = 0  # bytes queued or taken, not yet written
        self.wake_asked = False
        self.wake_at = float("inf")  # when the thread looks at the heap next
        self.closed = False
        #: taken from ``out``, being written (the thread's own)
        self.writing: deque[tuple[bytes | memoryview, int]] = deque()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._run, name=f"ikos-pipeline-{name}", daemon=True)

    def release(self) -> None:
        """Close every descriptor (the thread's last act, or a pipeline never started)."""
        self.conn.close()
        self.wake_r.close()
        self.wake_w.close()
        close_all([fd for _, fd in self.out if fd >= 0])
        close_all([fd for _, fd in self.writing if fd >= 0])
        self.out.clear()
        self.writing.clear()

    # -- the calling side -----------------------------------------------------

    def enqueue(
        self, corr: int, future: Future[Any], deadline: float, timeout: float, frame: bytes, fd: int
    ) -> bool:
        """Queue ``frame`` (and the descriptor ``fd``, now the queue's) for ``future``;
        False if the connection closed. Waits while the bounds are reached, at most
        until ``deadline`` (:class:`MailboxFull`)."""
        with self.room:
            while not self.closed and (
                self.unsent > MAX_UNSENT_BYTES or len(self.pending) >= MAX_IN_FLIGHT
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MailboxFull(
                        self.name, "too many asks in flight on the pipelined connection"
                    )
                self.room.wait(left)
            if self.closed:
                return False
            self.pending[corr] = (future, deadline, timeout)
            heapq.heappush(self.heap, (deadline, corr))
            self.out.append((frame, fd))
            self.unsent += len(frame)
            if not self.wake_asked or deadline < self.wake_at:
                self.wake_asked = True
                self.wake_at = min(self.wake_at, deadline)
                try:
                    self.wake_w.send(b"\0")
                except OSError:  # full: the thread is awake already
                    pass
        return True

    # -- the connection's thread ------------------------------------------------

    def _run(self) -> None:
        sock = self.conn.sock
        sock.setblocking(False)  # this thread is its only user now
        poller = select.poll()
        sfd, wfd = sock.fileno(), self.wake_r.fileno()
        poller.register(wfd, select.POLLIN)
        poller.register(sfd, select.POLLIN)
        polling_out = False
        idle_since = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                for future, timeout in self._expire(now):
                    _settle(future, AskTimeout(self.name, f"no reply within {timeout:g} s"))
                if self.pending or self.out or self.writing:
                    idle_since = now
                elif now - idle_since >= IDLE_CLOSE and self._detach_if_idle():
                    return
                with self.lock:
                    nxt = self.heap[0][0] if self.heap else idle_since + IDLE_CLOSE
                    self.wake_at = nxt
                if bool(self.writing) != polling_out:
                    polling_out = not polling_out
                    poller.modify(sfd, select.POLLIN | (select.POLLOUT if polling_out else 0))
                timeout_ms = max(0, int((nxt - time.monotonic()) * 1000) + 1)
                for fd, _ in poller.poll(timeout_ms):
                    if fd == wfd:
                        try:
                            while self.wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    elif not self._read():
                        self._fail(ActorDeadError(self.name, "stopped before answering"))
                        return
                if self.out:
                    self._take()
                if self.writing and not self._write(sock):
                    self._fail(ActorDeadError(self.name, "stopped before answering"))
                    return
        except BaseException as exc:  # a bug here must not leave futures hanging
            self._fail(ActorError(self.name, f"the pipelined connection failed: {exc!r}"))
            raise
        finally:
            with self.lock:
                self.release()

    def _expire(self, now: float) -> list[tuple[Future[Any], float]]:
        """Take the futures whose deadline passed; compact the heap of stale entries."""
        expired = []
        with self.lock:
            heap, pending = self.heap, self.pending
            while heap and heap[0][0] <= now:
                deadline, corr = heapq.heappop(heap)
                entry = pending.get(corr)
                if entry is not None and entry[1] == deadline:
                    del pending[corr]
                    expired.append((entry[0], entry[2]))
            # entries of answered futures stay until their deadline: rebuild when
            # they dominate, so the heap is bounded by what is in flight (and the
            # thread does not sleep until a stale deadline when nothing is left)
            if not pending:
                heap.clear()
            elif len(heap) > 1024 and len(heap) > 2 * len(pending):
                self.heap = [(entry[1], corr) for corr, entry in pending.items()]
                heapq.heapify(self.heap)
            if expired:
                self.room.notify_all()
        return expired

    def _take(self) -> None:
        """Move the queued frames to ``writing``."""
        with self.lock:
            out, self.out = self.out, deque()
            self.wake_asked = False
        join_frames(out, self.writing)

    def _write(self, sock: socket.socket) -> bool:
        """Write what the socket takes now; False when the connection is gone."""
        written, ok = write_some(sock, self.writing)
        if written:
            with self.room:
                self.unsent -= written
                self.room.notify_all()
        return ok

    def _read(self) -> bool:
        """Read what arrived and complete the futures it answers; False on EOF."""
        try:
            replies = read_replies(self.conn, self.name)
        except ActorError as exc:
            self._fail(exc)
            return False
        if replies is None:
            return False
        pending = self.pending
        for kind, rid, value in replies:
            entry = pending.pop(rid, None)  # None: it timed out already
            if entry is not None:
                if kind == REPLY_OK and value.__class__ is not MethodRefused:
                    _settle(entry[0], None, value)
                else:
                    _settle(entry[0], value)
        if replies and len(pending) >= MAX_IN_FLIGHT - len(replies):
            with self.room:
                self.room.notify_all()
        return True

    def _detach_if_idle(self) -> bool:
        """Leave the registry if nothing is in flight (the thread then ends and
        closes the connection)."""
        with self.lock:
            if self.pending or self.out:
                return False
            self._detach()
            return True

    def _detach(self) -> None:
        """Mark closed and leave the registry (under ``lock``)."""
        self.closed = True
        self.room.notify_all()
        with _registry_lock:
            if _pipelines.get(self.key) is self:
                del _pipelines[self.key]

    def _fail(self, error: ActorError) -> None:
        """Close for good and fail every future in flight with ``error``."""
        with self.lock:
            self._detach()
            pending, self.pending = self.pending, {}
            self.heap = []
            if self.conn.sock.fileno() >= 0:
                try:  # ends the thread's wait when called from elsewhere (exit)
                    self.conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for future, _, _ in pending.values():
            _settle(future, error)


def join_frames(out: deque[tuple[bytes, int]], writing: deque[tuple[Any, int]]) -> None:
    """Append ``out``'s frames to ``writing``, runs without a descriptor joined into
    writes of about :data:`WRITE_BATCH` bytes (a frame with one goes alone)."""
    run: list[bytes] = []
    size = 0
    for frame, fd in out:
        if run and (fd >= 0 or size >= WRITE_BATCH):
            writing.append((b"".join(run), -1))
            run, size = [], 0
        if fd >= 0:
            writing.append((frame, fd))
        else:
            run.append(frame)
            size += len(frame)
    if run:
        writing.append((b"".join(run), -1))


def write_some(sock: socket.socket, writing: deque[tuple[Any, int]]) -> tuple[int, bool]:
    """Write from ``writing`` what the non-blocking ``sock`` takes now: (bytes written,
    False when the connection is gone). A descriptor is closed once passed."""
    written = 0
    while writing:
        data, fd = writing[0]
        try:
            n = sock.send(data) if fd < 0 else send_with_fds(sock, bytes(data), [fd])
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            return written, False
        if fd >= 0:
            os.close(fd)  # passed: the kernel holds its own reference
        written += n
        if n < len(data):
            writing[0] = (memoryview(data)[n:], -1)
            break
        writing.popleft()
    return written, True


def read_replies(conn: _Connection, name: str) -> list[tuple[int, int, Any]] | None:
    """Read once from the non-blocking connection and decode every complete reply
    ``(kind, corr, value)``; None at EOF; :class:`ActorError` when the stream cannot
    be trusted any more (bad descriptors, a reply that does not decode)."""
    try:
        got, anc, flags, _ = conn.sock.recvmsg_into(conn.bufs, ANCILLARY_SIZE, RECV_FLAGS)
    except (BlockingIOError, InterruptedError):
        return []
    except OSError:
        return None
    replies = []
    try:
        if anc or flags & MSG_CTRUNC:
            take_fds(conn.fds, fds_of(anc, flags))
        if not got:
            return None
        buf = conn.buf
        buf += conn.view[:got]
        while len(buf) >= 4:
            (n,) = HEADER.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            raw = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            replies.append(decode_shm(raw, conn.fds) if raw[0] == SHM else decode(raw))
        if conn.fds and not buf:
            raise ShmProtocolError("a descriptor came without a frame announcing it")
    except ValueError as exc:  # ShmProtocolError, truncated descriptors
        raise ActorError(name, f"bad shared-memory reply: {exc}") from None
    except Exception as exc:  # a reply this process cannot decode: the stream is lost
        raise ActorError(name, f"could not decode a reply: {exc!r}") from None
    return replies


def encode_frame(ref: ActorRef[Any], corr: int, message: Any) -> tuple[bytes, int]:
    """The frame of an ask (a future proxy's call as a ``CALL``) and the descriptor
    it carries (-1: none; else the caller's to pass or close)."""
    ctx = ref._context()
    if message.__class__ in SHM_TYPES and by_shm(message, ctx.shm_threshold):
        data, fd, owned = encode_shm(ASK, corr, message)
        # a SharedBuffer's own descriptor: the queue needs one of its own
        return HEADER.pack(len(data)) + data, fd if owned else os.dup(fd)
    if message.__class__ is MethodCall:  # a future proxy's call: see CALL
        data = encode((CALL, corr, (message.method, message.args, message.kwargs)))
    else:
        data = encode((ASK, corr, message))
    if len(data) > ctx.max_frame:
        raise MessageTooLarge(ref.name, len(data), ctx.max_frame)
    return HEADER.pack(len(data)) + data, -1


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
        fresh.thread.start()
    else:  # another thread made one meanwhile
        fresh.release()
    return pipe


def submit(ref: ActorRef[Any], message: Any, timeout: float) -> Future[Any]:
    """Queue ``message`` as an ask on the pipelined connection; its reply's future.

    Every failure, from encoding to the actor's death, is the future's
    exception. This waits only to connect (when there is no connection yet)
    and while the bounds of what is queued are reached, at most ``timeout``.
    """
    future: Future[Any] = Future()
    deadline = time.monotonic() + timeout
    corr = next(_ids)
    fd = -1
    try:
        frame, fd = encode_frame(ref, corr, message)
        for _ in (0, 1):
            pipe = _pipeline(ref, deadline)
            if len(frame) - 4 > pipe.conn.max_frame:
                raise MessageTooLarge(ref.name, len(frame) - 4, pipe.conn.max_frame)
            if pipe.enqueue(corr, future, deadline, timeout, frame, fd):
                fd = -1  # the queue's now
                return future
            # closed between lookup and queueing (the actor restarted): a new one
        raise ActorDeadError(ref.name, "the connection broke")
    except RayPlaced as placed:  # no local mailbox: the actor runs on Ray (issue 13)
        return placed.route.future(message, timeout)
    except BaseException as exc:
        _settle(future, as_ask_error(ref, exc, timeout))
        if not isinstance(exc, Exception):
            raise
    finally:
        if fd >= 0:
            os.close(fd)
    return future


def as_ask_error(ref: ActorRef[Any], exc: BaseException, timeout: float) -> BaseException:
    """A connect's plain timeout as the :class:`AskTimeout` an ask raises."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, ActorError):
        return AskTimeout(ref.name, f"no reply within {timeout:g} s (could not connect)")
    return exc


def _close_all(reason: str) -> None:
    with _registry_lock:
        pipes = list(_pipelines.values())
    for pipe in pipes:
        pipe._fail(ActorDeadError(pipe.name, reason))


def _after_fork_in_child() -> None:
    """The connections' threads do not exist in a child: drop what it inherited."""
    global _registry_lock, _pipelines
    pipes = list(_pipelines.values())
    _registry_lock = threading.Lock()
    _pipelines = {}
    for pipe in pipes:
        pipe.closed = True
        pipe.release()  # this process's copies of the descriptors only


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all, "the calling process is exiting")
