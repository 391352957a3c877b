"""Durable queues as a client sees them: put, get with a lease, ack, nack, dead letters.

A put returns once the broker has the message on disk (it answers after the
group commit). A get leases the message to this process's broker connection:
the broker gives it out again after the visibility timeout, or at once if the
connection ends (a consumer that died). ``ikosctl``, whose process ends at
once, asks for detached leases instead, settled by a later invocation.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ikos._errors import (
    IkosError,
    IpcTimeout,
)
from ikos.ipc._client import (
    ANSWER_MARGIN,
    BrokerClient,
    frame_payload,
    raise_error,
)
from ikos.ipc._frames import Frame
from ikos.ipc._message import (
    Codec,
    decode_payload,
    encode_payload,
)


@dataclass
class QueueMessage:
    """A message taken from a durable queue, leased to this process until acked or nacked.

    ``id`` is the queue's message id, ``deliveries`` how many times it has been
    handed out (this one included). Until :meth:`ack`, the broker gives it out
    again after the visibility timeout, or at once if this process's connection
    ends (a consumer that dies).
    """

    queue: Queue
    id: int
    deliveries: int
    data: Any
    codec: str = "json"
    payload_size: int = 0
    done: bool = field(default=False, repr=False)

    def ack(self) -> None:
        """The message was handled: the broker forgets it (returns once that is durable)."""
        self.queue.ack(self.id)
        self.done = True

    def nack(self, delay: float = 0.0) -> None:
        """The message was not handled: deliver it again (after ``delay`` s)."""
        self.queue.nack(self.id, delay=delay)
        self.done = True


class Queue:
    """A named durable queue of the instance (SQLite in the broker; docs/operations.md).

    Example::

        jobs = ikos.ipc.queue("jobs")
        jobs.put({"resize": "a.png"})          # returns once the put is on disk
        m = jobs.get(timeout=5)
        handle(m.data)
        m.ack()
    """

    def __init__(self, client: BrokerClient, name: str) -> None:
        self.client, self.name = client, name

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    def put(self, data: Any, *, codec: Codec | None = None, timeout: float = 30.0) -> int:
        """Append ``data``; returns its message id once the broker has it on disk."""
        chosen = self.client.codec_for(data, codec)
        frame = self.client.call(
            {"op": "put", "queue": self.name, "codec": chosen},
            encode_payload(data, chosen),
            timeout=timeout,
        )
        return int(frame.header.get("msg") or 0)

    def put_async(self, data: Any, *, codec: Codec | None = None) -> Future[int]:
        """Append ``data`` without waiting: a future of its message id, set once on disk.

        Puts sent this way are pipelined on the process's one broker connection,
        in order, and the broker commits whatever arrived together in one
        transaction: one thread streaming puts gets the group commit that many
        waiting producers would. While 512 of the process's puts are unanswered
        it waits for one to be (back-pressure). The future fails with the IPC error (a full
        queue, a lost connection) instead; a put whose future failed may still
        be on disk if the broker died after its commit (at-least-once).

        Example::

            futures = [jobs.put_async(item) for item in batch]
            ids = [f.result(timeout=30) for f in futures]   # all on disk now
        """
        chosen = self.client.codec_for(data, codec)
        payload = encode_payload(data, chosen)
        future: Future[int] = Future()
        future.set_running_or_notify_cancel()
        slots = self.client.async_puts

        def answered(frame: Frame | None, exc: BaseException | None) -> None:
            slots.release()
            if exc is not None:
                future.set_exception(exc)
                return
            assert frame is not None
            if frame.op == "error":
                try:
                    raise_error(frame.header)
                except IkosError as error:
                    future.set_exception(error)
                return
            future.set_result(int(frame.header.get("msg") or 0))

        slots.acquire()  # back-pressure: at most ASYNC_PUTS unanswered
        try:
            self.client.submit(
                {"op": "put", "queue": self.name, "codec": chosen}, payload, callback=answered
            )
        except BaseException:
            slots.release()
            raise
        return future

    def get(self, timeout: float | None = None) -> QueueMessage:
        """The next message, leased to this process; :class:`IpcTimeout` if none came in time.

        ``timeout=None`` waits as long as it takes; ``0`` only takes what is there.
        """
        return self.get_leased(timeout)

    def get_leased(self, timeout: float | None = None, *, detach: bool = False) -> QueueMessage:
        """:meth:`get`; with ``detach`` the lease outlives this connection.

        A detached lease ends only by ack, nack or the visibility timeout, not
        when this process's connection does: ``ikosctl queue get`` and a later
        ``ikosctl queue ack`` are two connections.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 60.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            header: dict[str, Any] = {"op": "get", "queue": self.name, "timeout": wait}
            if detach:
                header["detach"] = True
            frame = self.client.call(header, timeout=wait + ANSWER_MARGIN)
            if frame.op == "message":
                payload = frame_payload(frame)
                header = frame.header
                codec = str(header.get("codec", "json"))
                return QueueMessage(
                    self,
                    int(header.get("msg") or 0),
                    int(header.get("deliveries") or 1),
                    decode_payload(payload, codec, allow_pickle=self.client.trusted),
                    codec,
                    len(payload),
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise IpcTimeout(f"queue '{self.name}' stayed empty for {timeout:g} s")

    def ack(self, msg: int, *, detached: bool = False) -> None:
        """Acknowledge message ``msg``, leased to this process (or detached, for the owner)."""
        header: dict[str, Any] = {"op": "ack", "queue": self.name, "msg": msg}
        if detached:
            header["detach"] = True
        self.client.call(header, timeout=30.0).close()

    def nack(self, msg: int, delay: float = 0.0, *, detached: bool = False) -> None:
        """Give message ``msg`` back for another delivery, after ``delay`` seconds."""
        header: dict[str, Any] = {"op": "nack", "queue": self.name, "msg": msg}
        if delay:
            header["delay"] = delay
        if detached:
            header["detach"] = True
        self.client.call(header, timeout=30.0).close()

    def dead(self, limit: int = 100) -> list[dict[str, Any]]:
        """The dead-lettered messages (``msg``, ``deliveries``, ``codec``, ``data``)."""
        frame = self.client.call({"op": "dead", "queue": self.name, "limit": limit})
        found = frame.header.get("messages")
        return [m for m in found if isinstance(m, dict)] if isinstance(found, list) else []
