"""Durable queues as a client sees them: put, get with a lease, ack, nack, dead letters.

A put returns once the broker has the message on disk (it answers after the
group commit). A get leases the message to this process's broker connection:
the broker gives it out again after the visibility timeout, or at once if the
connection ends (a consumer that died). ``ikosctl``, whose process ends at
once, asks for detached leases instead, settled by a later invocation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ikos._errors import (
    IpcTimeout,
)
from ikos.ipc._client import (
    ANSWER_MARGIN,
    BrokerClient,
    frame_payload,
)
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
                    decode_payload(payload, codec),
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
