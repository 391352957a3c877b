"""ikos.ipc: messages between the processes of an instance.

Request/response to actors, served names and registered services
(:func:`connect`), publish/subscribe on dotted topics with ``*`` and ``#``
patterns (:func:`publish`, :func:`subscribe`), durable queues (:func:`queue`),
and serving a name from any process (:func:`serve`). Bytes-like payloads of at
least the instance's ``shm_threshold`` travel as sealed memfds and arrive as
read-only ``memoryview`` objects; :func:`shared_buffer` gives a writable one to
fill and send without any copy. To an actor, the owner's
processes talk directly over its mailbox; everything else goes through the
instance's broker (``ikos-broker``, docs/architecture.md). Errors are the
:class:`~ikos._errors.IpcError` family of ``ikos._errors``.

Example::

    import ikos.ipc

    with ikos.ipc.connect("echo") as conn:
        print(conn.request({"x": 1}).payload)

    sub = ikos.ipc.subscribe("net.*", lambda m: print(m.topic, m.payload))
    ikos.ipc.publish("net.eth0", {"up": True})
    ikos.ipc.unsubscribe(sub)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ikos._errors import (
    IpcBadRequest,
    IpcDenied,
    IpcError,
    IpcFull,
    IpcNoSuchTarget,
    IpcRemoteError,
    IpcTimeout,
    IpcTooLarge,
    IpcUnavailable,
)
from ikos.actors._actor import set_broadcast_source
from ikos.ipc._client import BrokerClient, shared_client
from ikos.ipc._connection import Connection
from ikos.ipc._durable import Queue, QueueMessage
from ikos.ipc._message import MESSAGE_TYPES, Codec, IpcMessage, MessageType
from ikos.ipc._server import Server
from ikos.ipc._shm import SharedBuffer, shared_buffer
from ikos.ipc._subscription import Subscription

__all__ = [
    "MESSAGE_TYPES",
    "BrokerClient",
    "Connection",
    "IpcBadRequest",
    "IpcDenied",
    "IpcError",
    "IpcFull",
    "IpcMessage",
    "IpcNoSuchTarget",
    "IpcRemoteError",
    "IpcTimeout",
    "IpcTooLarge",
    "IpcUnavailable",
    "Queue",
    "QueueMessage",
    "Server",
    "SharedBuffer",
    "Subscription",
    "connect",
    "disconnect",
    "publish",
    "queue",
    "queues",
    "receive_message",
    "send_message",
    "serve",
    "shared_buffer",
    "stats",
    "subscribe",
    "unsubscribe",
]

Root = str | os.PathLike[str] | None


def connect(
    name: str, timeout: float = 5.0, *, root: Root = None, codec: Codec | None = None
) -> Connection:
    """A connection to the actor, served name or registered service ``name``.

    ``timeout`` is the default of its requests. ``codec`` (``json``, ``pickle``
    or ``bytes``) fixes how data travels through the broker; by default bytes
    travel raw and other values as pickle between the owner's processes, else
    as JSON.
    """
    return Connection(name, timeout=timeout, root=root, codec=codec)


def disconnect(conn: Connection) -> None:
    """Close ``conn`` (the seed's form of ``conn.disconnect()``)."""
    conn.disconnect()


def send_message(
    conn: Connection, data: Any, type: MessageType = "request", timeout: float | None = None
) -> int:
    """Send ``data`` on ``conn``; returns the message id (see :meth:`Connection.send_message`)."""
    return conn.send_message(data, type=type, timeout=timeout)


def receive_message(conn: Connection, timeout: float | None = None) -> IpcMessage:
    """The next response on ``conn``; :class:`IpcTimeout` when none came within ``timeout`` s."""
    return conn.receive_message(timeout=timeout)


def subscribe(
    pattern: str, callback: Callable[[IpcMessage], Any] | None = None, *, root: Root = None
) -> Subscription:
    """Receive the broadcasts whose topic matches ``pattern`` (``net.*``, ``dev.#``).

    With ``callback``, it is called with each :class:`IpcMessage` in the
    subscription's own thread, in publication order; without, iterate over the
    returned :class:`Subscription` or call its ``get(timeout)``.
    """
    sub = Subscription(shared_client(root), pattern, callback)
    try:
        sub.client._add_subscription(sub)
    except BaseException:
        sub._end(None)
        raise
    return sub


def unsubscribe(sub: Subscription) -> None:
    """End ``sub`` (idempotent)."""
    sub.unsubscribe()


def publish(
    topic: str, data: Any, *, codec: Codec | None = None, ack: bool = False, root: Root = None
) -> None:
    """Publish ``data`` on ``topic`` to every matching subscriber.

    Returns once the message is written to the broker (with ``ack=True``: once
    the broker has taken it, so that an error such as :class:`IpcDenied` is
    raised here). One process's publications arrive in the order they were made.
    """
    shared_client(root).publish(topic, data, codec=codec, ack=ack)


def queue(name: str, *, root: Root = None) -> Queue:
    """The durable queue ``name`` (created by its first put)."""
    return Queue(shared_client(root), name)


def queues(*, root: Root = None) -> list[dict[str, Any]]:
    """The instance's durable queues with their figures (depth, in flight, dead)."""
    return shared_client(root).queues()


def serve(
    name: str, handler: Callable[[IpcMessage], Any], *, threads: int = 8, root: Root = None
) -> Server:
    """Answer requests for ``name`` with ``handler`` (run in up to ``threads`` threads)."""
    server = Server(shared_client(root), name, handler, threads)
    try:
        server.client._add_server(server)
    except BaseException:
        server._end()
        raise
    return server


def stats(*, root: Root = None) -> dict[str, Any]:
    """The broker's figures: clients, subscriptions, topics, drops, queues."""
    return shared_client(root).stats()


def _actor_subscribe(pattern: str, callback: Callable[[IpcMessage], Any]) -> Subscription:
    return subscribe(pattern, callback)


set_broadcast_source(_actor_subscribe)
