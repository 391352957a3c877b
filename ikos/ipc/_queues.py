"""Durable named queues in SQLite, with group commit, leases and dead letters.

The broker holds one :class:`QueueStore` and calls it from its asyncio loop. A
put is acknowledged only once its transaction is on disk (WAL,
``synchronous=FULL``), and the loop never waits on the disk: every write goes
to **one committer thread** with its own connection, which takes everything
that arrived while its previous commit ran and writes it as the next single
transaction (**group commit**): a hundred producers cost one fsync, not a
hundred. Completions come back to the loop with ``call_soon_threadsafe``, in
one callback per transaction. Payloads are read by id, when a message is
handed out, in a second thread with its own read connection (WAL lets it read
beside the committer).

What lives in memory is bounded by ``max_messages`` per queue and holds no
payload: per queue a heap of ready ids (lowest id first, so a message that
comes back is the next handed out), the messages delayed by a ``nack``, and
the leases (id → consumer, deadline, size). The database is the truth for
what exists; memory is the truth for who holds what: leases are not written,
so after a restart everything not acked is ready again.

Delivery counts: the increment of a delivery is written in the next group
commit but not waited for (``get`` would otherwise cost an fsync). So after a
crash a message's count is at least the one of the last commit before the
crash, short by at most the deliveries made in the last commit window; a
message whose lease was lost to the crash while it was on its last allowed
delivery is dead-lettered when the store opens again (the lost lease counts
as a failed delivery).

Rejected: one transaction per put (the fsync rate of the disk is then the put
rate: the benchmark compares it); commits from the loop's thread (the loop
would stall for every fsync); keeping payloads in memory (a queue of a
million messages would hold them all); persisting leases (a lease outliving
the broker's connections has no holder to return it).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ikos._errors import IkosError
from ikos.platform._database import DatabaseUnavailable, close_quietly, open_database

T = TypeVar("T")

CODECS = frozenset({"json", "bytes", "pickle"})
MAX_NAME = 255
_SEGMENT = re.compile(r"[A-Za-z0-9_@:-]+")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    -- AUTOINCREMENT: an id is never given twice, even after the newest is acked,
    -- so a late ack of an old id can never hit a newer message
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    codec TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, dead, id);
"""


class QueueError(IkosError):
    """A durable queue refused a request; ``queue`` names it, the message says why.

    ``error_type`` is the broker wire's error type for it (``bad_request`` here).
    """

    error_type = "bad_request"

    def __init__(self, queue: str, message: str) -> None:
        super().__init__(queue, message)
        self.queue, self.message = queue, message

    def __str__(self) -> str:
        return f"queue {self.queue!r}: {self.message}"


class QueueFull(QueueError):
    """The queue holds ``max_messages`` messages: the put is refused (wire: ``full``)."""

    error_type = "full"


class NotLeased(QueueError):
    """An ack or nack names a message that is not leased to this consumer."""


class QueueUnavailable(QueueError):
    """The store cannot write (full disk, I/O error) or is closed (wire: ``unavailable``)."""

    error_type = "unavailable"


def check_queue_name(name: object) -> str:
    """Return ``name`` if it is a valid queue name, else raise :class:`QueueError`.

    Queue names follow the topic syntax: dot-separated segments of
    ``[A-Za-z0-9_@:-]+``, at most 255 bytes, no wildcards (``jobs``,
    ``mail.outgoing``).
    """
    if not isinstance(name, str):
        raise QueueError(repr(name), f"a queue name must be a string, got {type(name).__name__}")
    if not name or len(name.encode()) > MAX_NAME:
        raise QueueError(name, f"a queue name must be 1 to {MAX_NAME} bytes long")
    for segment in name.split("."):
        if not _SEGMENT.fullmatch(segment):
            raise QueueError(
                name,
                f"bad segment {segment!r}: a queue name is dot-separated segments of "
                "letters, digits and _ @ : - (no wildcards, no empty segment)",
            )
    return name


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message as handed out by :meth:`QueueStore.get` or listed by :meth:`QueueStore.dead`."""

    id: int
    queue: str
    payload: bytes
    codec: str
    deliveries: int
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """One queue's figures. Counters (puts...) count since the store was opened.

    ``ready`` can be handed out now, ``delayed`` waits for a nack's delay,
    ``leased`` is held by consumers, ``dead`` sits in the dead letters;
    ``bytes`` is the payload size of the ready, delayed and leased messages.
    """

    name: str
    ready: int
    delayed: int
    leased: int
    dead: int
    puts: int
    acks: int
    redeliveries: int
    dead_lettered: int
    bytes: int


@dataclass(slots=True)
class _Lease:
    queue: str
    consumer: Hashable
    deadline: float
    size: int
    seq: int


@dataclass(slots=True)
class _Waiter:
    consumer: Hashable
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Queue:
    name: str
    ready: list[int] = field(default_factory=list)  # heap of ids
    delayed: int = 0
    leased: int = 0
    dead: int = 0
    pending: int = 0  # puts waiting for their commit
    bytes: int = 0
    puts: int = 0
    acks: int = 0
    redeliveries: int = 0
    dead_lettered: int = 0
    waiters: deque[_Waiter] = field(default_factory=deque)

    def live(self) -> int:
        return len(self.ready) + self.delayed + self.leased + self.pending

    def pristine(self) -> bool:
        """Nothing in it and nothing ever done with it: safe to forget."""
        return not (
            self.live() or self.dead or self.waiters or self.puts or self.acks or self.bytes
        )


# -- the committer's work items --------------------------------------------------------


@dataclass(slots=True)
class _Put:
    id: int
    queue: _Queue
    codec: str
    enqueued_at: float
    payload: bytes | bytearray | memoryview
    size: int
    future: asyncio.Future[int]


#: Run on the loop once a write's transaction ended: its rows, or the error.
_Then = Callable[[list[Any], BaseException | None], None]


@dataclass(slots=True)
class _Write:
    """A statement in the next transaction.

    ``then`` runs on the loop when the transaction ended, even if the caller
    waiting on ``future`` was cancelled meanwhile (memory must follow the disk);
    then ``future`` gets the rows or the error.
    """

    sql: str
    args: tuple[Any, ...]
    future: asyncio.Future[list[Any]] | None = None
    then: _Then | None = None


@dataclass(slots=True)
class _Read:
    """A query run by the committer after everything queued before it (sees those writes)."""

    sql: str
    args: tuple[Any, ...]
    future: asyncio.Future[list[Any]]


_Item = _Put | _Write | _Read
_STOP = object()


class _Committer(threading.Thread):
    """The one thread that writes: it commits whatever arrived during its last commit."""

    def __init__(
        self,
        db: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        settle: Callable[[list[_Put | _Write], list[list[Any]], BaseException | None], None],
    ) -> None:
        super().__init__(name="ikos-queue-committer", daemon=True)
        self.db, self.loop, self.settle = db, loop, settle
        self.items: deque[object] = deque()
        self.wake = threading.Condition()
        self.commits = 0
        self.stopped: asyncio.Future[None] = loop.create_future()

    def submit(self, item: object) -> None:
        with self.wake:
            self.items.append(item)
            self.wake.notify()

    def run(self) -> None:
        try:
            while True:
                with self.wake:
                    while not self.items:
                        self.wake.wait()
                    batch = list(self.items)
                    self.items.clear()
                stop = any(item is _STOP for item in batch)
                work = [item for item in batch if item is not _STOP]
                if work:
                    self._commit(work)  # type: ignore[arg-type]
                if stop:
                    return
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(_resolve, self.stopped, None, None)

    def _commit(self, work: list[_Item]) -> None:
        writes = [item for item in work if not isinstance(item, _Read)]
        reads = [item for item in work if isinstance(item, _Read)]
        results: list[list[Any]] = [[] for _ in writes]
        error: BaseException | None = None
        if writes:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                puts: list[tuple[Any, ...]] = []
                for i, write in enumerate(writes):
                    if isinstance(write, _Put):
                        puts.append(
                            (
                                write.id,
                                write.queue.name,
                                write.codec,
                                write.enqueued_at,
                                write.payload,
                            )
                        )
                        continue
                    self._insert(puts)
                    results[i] = self.db.execute(write.sql, write.args).fetchall()
                self._insert(puts)
                self.db.execute("COMMIT")
                self.commits += 1
            except Exception as exc:  # the thread must outlive any failure: it is reported
                error = exc
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
        answers: list[tuple[_Read, list[Any], BaseException | None]] = []
        for read in reads:
            try:
                answers.append((read, self.db.execute(read.sql, read.args).fetchall(), None))
            except Exception as exc:
                answers.append((read, [], exc))
        with contextlib.suppress(RuntimeError):
            if writes:
                self.loop.call_soon_threadsafe(self.settle, writes, results, error)
            for read, rows, read_error in answers:
                self.loop.call_soon_threadsafe(_resolve, read.future, rows, read_error)

    def _insert(self, puts: list[tuple[Any, ...]]) -> None:
        """Insert a run of puts in one call, and empty the run."""
        if puts:
            self.db.executemany(
                "INSERT INTO messages (id, queue, codec, enqueued_at, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                puts,
            )
            puts.clear()


def _resolve(future: asyncio.Future[T], value: T, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled: nobody is waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class QueueStore:
    """Named durable queues in one SQLite database; see the module docstring.

    Every method is called from the thread of the loop that ran :meth:`open`.
    Example::

        store = QueueStore(paths.state_dir / "queues.db")
        await store.open()
        msg_id = await store.put("jobs", b'{"n": 1}', "json")   # on disk now
        m = await store.get("jobs", consumer=conn, timeout=5.0)
        await store.ack("jobs", m.id, conn)                     # gone, durably
    """

    def __init__(
        self,
        path: Path,
        *,
        max_deliveries: int = 5,
        visibility_timeout: float = 30.0,
        max_messages: int = 1_000_000,
    ) -> None:
        if not isinstance(max_deliveries, int) or max_deliveries < 1:
            raise ValueError(f"max_deliveries must be an integer >= 1, got {max_deliveries!r}")
        if not _positive(visibility_timeout):
            raise ValueError(
                f"visibility_timeout must be a positive number of seconds, "
                f"got {visibility_timeout!r}"
            )
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be an integer >= 1, got {max_messages!r}")
        self.path = Path(path)
        self.max_deliveries = max_deliveries
        self.visibility_timeout = float(visibility_timeout)
        self.max_messages = max_messages
        #: A sentence when the database was damaged and replaced (for the broker to log).
        self.damage: str | None = None
        self._queues: dict[str, _Queue] = {}
        self._leases: dict[int, _Lease] = {}
        self._by_consumer: dict[Hashable, set[int]] = {}
        self._deliveries: dict[int, int] = {}  # ids delivered at least once
        self._lease_heap: list[tuple[float, int, int]] = []  # (deadline, seq, id)
        self._delayed: list[tuple[float, int, str]] = []  # (due, id, queue)
        self._seq = itertools.count()
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committer: _Committer | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_db: sqlite3.Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- life ------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the database and load what it holds: all of it is ready.

        Raises :class:`~ikos.platform._database.DatabaseUnavailable` when the file
        cannot be used; a damaged file is moved aside (``self.damage`` says so).
        """
        loop = asyncio.get_running_loop()
        db, self.damage = await asyncio.to_thread(
            open_database, self.path, SCHEMA, synchronous="FULL"
        )
        try:
            rows, seq = await asyncio.to_thread(self._load, db)
            self._read_db = await asyncio.to_thread(self._connect_reader)
        except (sqlite3.Error, OSError) as exc:
            close_quietly(db)
            raise DatabaseUnavailable(str(self.path), str(exc)) from None
        except BaseException:
            close_quietly(db)
            raise
        self._loop = loop
        for msg_id, queue, deliveries, dead, size in rows:
            q = self._queue(queue)
            if dead:
                q.dead += 1
                continue
            q.ready.append(msg_id)
            q.bytes += size
            if deliveries:
                self._deliveries[msg_id] = deliveries
        for q in self._queues.values():
            heapq.heapify(q.ready)
        self._next_id = seq + 1
        self._committer = _Committer(db, loop, self._settle)
        self._committer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ikos-queue-reader")

    def _load(self, db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
        # A lease lost to the crash counts as a failed delivery: a message that was
        # on its last allowed one goes to the dead letters now, not once more.
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "UPDATE messages SET dead = 1 WHERE dead = 0 AND deliveries >= ?",
                (self.max_deliveries,),
            )
        rows = db.execute(
            "SELECT id, queue, deliveries, dead, length(payload) FROM messages ORDER BY id"
        ).fetchall()
        found = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return rows, int(found[0]) if found else 0

    def _connect_reader(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA query_only = 1")
        return db

    async def close(self) -> None:
        """Finish the pending commits, answer waiting gets with ``None``, close the files."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for q in self._queues.values():
            while q.waiters:
                waiter = q.waiters.popleft()
                if not waiter.future.done():
                    waiter.future.cancel()
        if self._committer is not None:
            self._committer.submit(_STOP)
            await self._committer.stopped
            close_quietly(self._committer.db)
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        if self._read_db is not None:
            close_quietly(self._read_db)

    # -- producing ---------------------------------------------------------------------

    async def put(self, queue: str, payload: bytes | bytearray | memoryview, codec: str) -> int:
        """Append a message; return its id once its transaction is on disk.

        Raises :class:`QueueFull` at ``max_messages`` live messages,
        :class:`QueueUnavailable` when the commit fails (the put is then not
        acknowledged; it may still appear after a restart if the disk kept it),
        :class:`QueueError` for a bad name or codec.
        """
        committer = self._running(queue)
        q = self._queue(queue)
        if codec not in CODECS:
            raise QueueError(queue, f"unknown codec {codec!r}: expected one of {sorted(CODECS)}")
        if q.live() >= self.max_messages:
            raise QueueFull(queue, f"the queue holds its limit of {self.max_messages} messages")
        size = memoryview(payload).nbytes  # a bytes-like object, or TypeError now
        msg_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[int] = self._future()
        q.pending += 1
        committer.submit(_Put(msg_id, q, codec, time.time(), payload, size, future))
        result: int = await self._committed(future, queue, "put")
        return result

    def _settle(
        self, writes: list[_Put | _Write], results: list[list[Any]], error: BaseException | None
    ) -> None:
        """On the loop: a transaction ended. Memory follows the disk, then callers learn."""
        for item, rows in zip(writes, results, strict=True):
            if isinstance(item, _Put):
                q = item.queue
                q.pending -= 1
                if error is None:
                    # Only now, committed, may it be handed out (in memory from here).
                    q.puts += 1
                    q.bytes += item.size
                    heapq.heappush(q.ready, item.id)
                    self._dispatch(q)
                _resolve(item.future, item.id, error)
                continue
            if item.then is not None:
                item.then(rows, error)
            if item.future is not None:
                _resolve(item.future, rows, error)

    # -- consuming ---------------------------------------------------------------------

    async def get(self, queue: str, consumer: Hashable, timeout: float) -> QueuedMessage | None:
        """The oldest ready message of ``queue``, leased to ``consumer``; None after ``timeout``.

        Gets waiting on one queue are served in the order they came. The lease
        lasts until :meth:`ack`, :meth:`nack`, :meth:`consumer_gone` or the
        visibility timeout; ``deliveries`` counts this delivery.
        """
        self._running(queue)
        check_queue_name(queue)
        if not (_positive(timeout) or timeout == 0):
            raise QueueError(queue, f"timeout must be a number of seconds >= 0, got {timeout!r}")
        q = self._queue(queue)
        while True:
            if q.ready and not q.waiters:
                first = heapq.heappop(q.ready)
                self._lease(q, first, consumer)
                msg_id: int | None = first
            else:
                msg_id = await self._wait(q, consumer, timeout)
            if msg_id is None:
                return None
            message = await self._fetch(q, msg_id, consumer)
            if message is not None:
                return message
            # The row vanished under us (the file was changed behind the store's
            # back): try the next message.

    async def _wait(self, q: _Queue, consumer: Hashable, timeout: float) -> int | None:
        """Queue up behind the other waiting gets; the id leased to us, or None."""
        waiter = _Waiter(consumer, self._future())
        q.waiters.append(waiter)
        self._dispatch(q)
        try:
            await asyncio.wait({waiter.future}, timeout=timeout)
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                # Handed a message just as our caller was cancelled: give it back.
                self._unlease(waiter.future.result(), consumer, failed=False)
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
                with contextlib.suppress(ValueError):
                    q.waiters.remove(waiter)
            self._forget_if_pristine(q)
        return None if waiter.future.cancelled() else waiter.future.result()

    async def _fetch(self, q: _Queue, msg_id: int, consumer: Hashable) -> QueuedMessage | None:
        assert self._loop is not None and self._reader is not None
        try:
            row = await self._loop.run_in_executor(self._reader, self._read_row, msg_id)
        except BaseException as exc:
            # Cancelled or failed while reading: the message goes back, not counted.
            self._unlease(msg_id, consumer, failed=False)
            if isinstance(exc, sqlite3.Error | OSError):
                raise QueueUnavailable(q.name, f"cannot read {self.path}: {exc}") from None
            raise
        lease = self._leases.get(msg_id)
        if row is None:
            if lease is not None and lease.consumer == consumer:
                self._drop_lease(msg_id)
                self._deliveries.pop(msg_id, None)
                q.leased -= 1
            return None
        codec, enqueued_at, payload = row
        if lease is not None:
            lease.size = len(payload)
        return QueuedMessage(
            msg_id, q.name, payload, codec, self._deliveries.get(msg_id, 1), enqueued_at
        )

    def _read_row(self, msg_id: int) -> tuple[str, float, bytes] | None:
        assert self._read_db is not None
        row = self._read_db.execute(
            "SELECT codec, enqueued_at, payload FROM messages WHERE id = ?", (msg_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], bytes(row[2]))

    async def ack(self, queue: str, msg_id: int, consumer: Hashable) -> None:
        """Delete a message leased to ``consumer``; return once that is on disk.

        Raises :class:`NotLeased` if it is not leased to ``consumer`` (never
        handed out, acked already, returned by timeout, or another's), and
        :class:`QueueUnavailable` if the delete cannot be committed (the
        message is then ready again).
        """
        committer = self._running(queue)
        q, lease = self._own_lease(queue, msg_id, consumer, "ack")
        self._drop_lease(msg_id)
        q.leased -= 1
        q.bytes -= lease.size
        count = self._deliveries.pop(msg_id, 0)

        def then(_: list[Any], error: BaseException | None) -> None:
            if error is None:
                q.acks += 1
                return
            # The row is still there: memory follows the disk, and it is delivered again.
            q.bytes += lease.size
            if count:
                self._deliveries[msg_id] = count
            heapq.heappush(q.ready, msg_id)
            self._dispatch(q)

        future = self._future()
        committer.submit(_Write("DELETE FROM messages WHERE id = ?", (msg_id,), future, then))
        await self._committed(future, queue, "ack")

    async def nack(self, queue: str, msg_id: int, consumer: Hashable, delay: float = 0.0) -> None:
        """Give a leased message back: ready again after ``delay`` seconds, or dead.

        A nack is a failed delivery: the message's ``max_deliveries``-th one
        sends it to the dead letters instead.
        """
        self._running(queue)
        if not (_positive(delay) or delay == 0):
            raise QueueError(queue, f"delay must be a number of seconds >= 0, got {delay!r}")
        self._own_lease(queue, msg_id, consumer, "nack")
        self._unlease(msg_id, consumer, failed=True, delay=delay)

    def consumer_gone(self, consumer: Hashable) -> None:
        """Return every message leased to ``consumer`` at once, and drop its waiting gets.

        Each return is a failed delivery (it may dead-letter the message).
        """
        for q in list(self._queues.values()):
            for waiter in [w for w in q.waiters if w.consumer == consumer]:
                q.waiters.remove(waiter)
                waiter.future.cancel()
        for msg_id in sorted(self._by_consumer.get(consumer, ())):
            self._unlease(msg_id, consumer, failed=True)

    # -- leases, timers --------------------------------------------------------------

    def _lease(self, q: _Queue, msg_id: int, consumer: Hashable) -> None:
        assert self._committer is not None
        deadline = time.monotonic() + self.visibility_timeout
        seq = next(self._seq)
        self._leases[msg_id] = _Lease(q.name, consumer, deadline, 0, seq)
        self._by_consumer.setdefault(consumer, set()).add(msg_id)
        q.leased += 1
        count = self._deliveries.get(msg_id, 0) + 1
        self._deliveries[msg_id] = count
        if count > 1:
            q.redeliveries += 1
        # Written with the next group commit, not waited for (see the module docstring).
        self._committer.submit(
            _Write("UPDATE messages SET deliveries = ? WHERE id = ?", (count, msg_id))
        )
        heapq.heappush(self._lease_heap, (deadline, seq, msg_id))
        self._arm(deadline)

    def _drop_lease(self, msg_id: int) -> _Lease:
        lease = self._leases.pop(msg_id)
        held = self._by_consumer.get(lease.consumer)
        if held is not None:
            held.discard(msg_id)
            if not held:
                del self._by_consumer[lease.consumer]
        return lease

    def _own_lease(
        self, queue: str, msg_id: int, consumer: Hashable, what: str
    ) -> tuple[_Queue, _Lease]:
        check_queue_name(queue)
        lease = self._leases.get(msg_id)
        if lease is None or lease.queue != queue or lease.consumer != consumer:
            raise NotLeased(
                queue,
                f"cannot {what} message {msg_id!r}: it is not leased to this consumer "
                "(never handed out, already acked, returned after its visibility "
                "timeout, or another consumer's)",
            )
        return self._queues[queue], lease

    def _unlease(self, msg_id: int, consumer: Hashable, *, failed: bool, delay: float = 0) -> None:
        """End a lease without an ack: back to ready (or delayed), or dead if it failed enough."""
        lease = self._leases.get(msg_id)
        if lease is None or lease.consumer != consumer:
            return
        self._drop_lease(msg_id)
        q = self._queues[lease.queue]
        q.leased -= 1
        if not failed:
            count = self._deliveries.get(msg_id, 1) - 1
            if count:
                self._deliveries[msg_id] = count
            else:
                self._deliveries.pop(msg_id, None)
            if count:  # the delivery undone was a redelivery
                q.redeliveries -= 1
            assert self._committer is not None
            self._committer.submit(
                _Write("UPDATE messages SET deliveries = ? WHERE id = ?", (count, msg_id))
            )
        elif self._deliveries.get(msg_id, 0) >= self.max_deliveries:
            self._deliveries.pop(msg_id, None)
            q.bytes -= lease.size
            q.dead += 1
            q.dead_lettered += 1
            assert self._committer is not None
            self._committer.submit(_Write("UPDATE messages SET dead = 1 WHERE id = ?", (msg_id,)))
            return
        if delay > 0:
            due = time.monotonic() + delay
            q.delayed += 1
            heapq.heappush(self._delayed, (due, msg_id, q.name))
            self._arm(due)
            return
        heapq.heappush(q.ready, msg_id)
        self._dispatch(q)

    def sweep(self) -> int:
        """Return the leases whose visibility timeout has passed, release due delayed messages.

        Runs on a timer of the loop; returns how many leases expired. Each
        expiry is a failed delivery.
        """
        now = time.monotonic()
        expired = 0
        while self._lease_heap and self._lease_heap[0][0] <= now:
            _, seq, msg_id = heapq.heappop(self._lease_heap)
            lease = self._leases.get(msg_id)
            if lease is not None and lease.seq == seq:
                self._unlease(msg_id, lease.consumer, failed=True)
                expired += 1
        while self._delayed and self._delayed[0][0] <= now:
            _, msg_id, name = heapq.heappop(self._delayed)
            q = self._queues[name]
            q.delayed -= 1
            heapq.heappush(q.ready, msg_id)
            self._dispatch(q)
        # Entries of leases that ended early stay until their deadline; past twice
        # the live leases, rebuild the heap so that it stays bounded by them.
        if len(self._lease_heap) > 2 * len(self._leases) + 64:
            self._lease_heap = [(lease.deadline, lease.seq, i) for i, lease in self._leases.items()]
            heapq.heapify(self._lease_heap)
        return expired

    def _arm(self, when: float) -> None:
        """Have :meth:`sweep` run at ``when`` (monotonic) at the latest."""
        if self._loop is None or self._closed:
            return
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        # The loop's clock is monotonic too; a little late rather than early.
        self._timer = self._loop.call_at(
            self._loop.time() + max(0.0, when - time.monotonic()) + 0.001, self._tick
        )

    def _tick(self) -> None:
        self._timer = None
        self.sweep()
        heads = [h[0][0] for h in (self._lease_heap, self._delayed) if h]
        if heads:
            self._arm(min(heads))

    def _dispatch(self, q: _Queue) -> None:
        """Hand ready messages to waiting gets, first come first served."""
        while q.ready and q.waiters:
            waiter = q.waiters.popleft()
            if waiter.future.done():
                continue
            msg_id = heapq.heappop(q.ready)
            self._lease(q, msg_id, waiter.consumer)
            waiter.future.set_result(msg_id)

    # -- looking -----------------------------------------------------------------------

    def queues(self) -> list[QueueInfo]:
        """Every known queue's figures, by name."""
        return [
            QueueInfo(
                q.name,
                len(q.ready),
                q.delayed,
                q.leased,
                q.dead,
                q.puts,
                q.acks,
                q.redeliveries,
                q.dead_lettered,
                q.bytes,
            )
            for q in sorted(self._queues.values(), key=lambda q: q.name)
            if not q.pristine()
        ]

    async def dead(self, queue: str, limit: int = 100) -> list[QueuedMessage]:
        """Up to ``limit`` dead letters of ``queue``, oldest first (read from disk)."""
        check_queue_name(queue)
        if not isinstance(limit, int) or limit < 0:
            raise QueueError(queue, f"limit must be an integer >= 0, got {limit!r}")
        rows = await self._read(
            queue,
            "SELECT id, payload, codec, deliveries, enqueued_at FROM messages"
            " WHERE queue = ? AND dead = 1 ORDER BY id LIMIT ?",
            (queue, limit),
        )
        return [QueuedMessage(r[0], queue, bytes(r[1]), r[2], r[3], r[4]) for r in rows]

    async def requeue_dead(self, queue: str) -> int:
        """Make every dead letter of ``queue`` ready again with its count reset; how many."""
        committer = self._running(queue)
        check_queue_name(queue)
        q = self._queue(queue)
        q.pending += 1  # not forgotten meanwhile

        def then(rows: list[Any], error: BaseException | None) -> None:
            q.pending -= 1
            if error is not None:
                return
            for msg_id, size in rows:
                q.dead -= 1
                q.bytes += size
                heapq.heappush(q.ready, msg_id)
            self._dispatch(q)

        future = self._future()
        committer.submit(
            _Write(
                "UPDATE messages SET dead = 0, deliveries = 0 WHERE queue = ? AND dead = 1"
                " RETURNING id, length(payload)",
                (queue,),
                future,
                then,
            )
        )
        rows = await self._committed(future, queue, "requeue")
        return len(rows)

    @property
    def commits(self) -> int:
        """Transactions committed since :meth:`open` (each one fsync)."""
        return self._committer.commits if self._committer else 0

    # -- helpers -----------------------------------------------------------------------

    async def _read(self, queue: str, sql: str, args: tuple[Any, ...]) -> list[Any]:
        committer = self._running(queue)
        future = self._future()
        committer.submit(_Read(sql, args, future))
        result: list[Any] = await self._committed(future, queue, "read")
        return result

    async def _committed(self, future: asyncio.Future[Any], queue: str, what: str) -> Any:
        """Wait for the committer's answer; a database error becomes :class:`QueueUnavailable`.

        A cancelled caller cancels only its wait: the item is committed (or not)
        all the same, and its ``then`` keeps memory in step.
        """
        try:
            return await future
        except Exception as exc:
            raise QueueUnavailable(
                queue, f"the {what} could not be committed to {self.path}: {exc}"
            ) from None

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def _running(self, queue: str) -> _Committer:
        if self._committer is None or self._closed:
            raise QueueUnavailable(queue, "the queue store is not open")
        return self._committer

    def _queue(self, name: str) -> _Queue:
        """The queue called ``name``, created (once its name is checked) if unknown."""
        q = self._queues.get(name) if isinstance(name, str) else None
        if q is None:
            q = self._queues[check_queue_name(name)] = _Queue(name)
        return q

    def _forget_if_pristine(self, q: _Queue) -> None:
        # A get on a name nobody uses must not leave a queue behind (a client
        # could otherwise grow memory with gets on made-up names).
        if q.pristine() and self._queues.get(q.name) is q:
            del self._queues[q.name]


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
