"""The values ``ikos.ipc`` hands to its users: messages, and how payloads are encoded.

:class:`IpcMessage` is the seed's ``ipc_message_t`` as a dataclass, plus ``topic``
(for a broadcast) and ``correlation_id`` (the request a response answers). The
payload is already decoded: a Python value for the ``json`` and ``pickle`` codecs,
``bytes`` (or a read-only ``memoryview`` of a shared-memory segment) for
``bytes``.

Codecs are the broker wire's (docs/protocol.md): ``json`` so that programs in
other languages can take part, ``pickle`` (``ikos._codec``) between the owner's
own Python processes, which can then send any Python value, and ``bytes`` for
raw payloads. :func:`encode_payload` picks one when the caller does not: bytes-like
data travels raw, anything else as pickle to a broker that trusts us, else as
JSON. Decoding a pickle payload is safe only because the broker delivers pickle
to and from the owner's (and root's) processes alone.
"""

from __future__ import annotations

import json
import mmap
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ikos import _codec
from ikos._errors import IpcBadRequest

MessageType = Literal["request", "response", "notification", "broadcast"]
Codec = Literal["json", "pickle", "bytes"]

#: What travels raw by default (``shared_buffer`` objects are mmaps).
BYTES_LIKE: Final = (bytes, bytearray, memoryview, mmap.mmap)
#: Message types of the seed's API, in its order.
MESSAGE_TYPES: Final = ("request", "response", "notification", "broadcast")
CODECS: Final = ("json", "pickle", "bytes")


@dataclass
class IpcMessage:
    """One message as received (or sent) through ``ikos.ipc``.

    ``message_id`` numbers the message (per sender); ``type`` is one of
    ``request``, ``response``, ``notification``, ``broadcast``; ``payload`` the
    decoded data and ``payload_size`` its encoded size in bytes; ``timestamp``
    Unix time when it was sent (or received, where the sender did not say).
    ``topic`` is set for a broadcast, ``correlation_id`` for a response (the
    ``message_id`` of the request it answers); ``codec`` says how the payload
    travelled. ``sender_pid`` and ``payload_size`` are 0 where the path does
    not carry them: a response straight from an actor's mailbox (the ask path
    sends the reply alone, to stay at the pipe floor).

    Example::

        with ikos.ipc.connect("echo") as conn:
            reply = conn.request({"x": 1})
            reply.type, reply.payload      # ("response", {"x": 1})
    """

    message_id: int
    sender_pid: int
    receiver_pid: int
    type: MessageType
    payload_size: int
    timestamp: float
    payload: Any
    topic: str | None = None
    correlation_id: int | None = None
    codec: Codec = "pickle"
    #: The sender's uid, when the broker told it (requests to a served name, broadcasts).
    sender_uid: int | None = field(default=None, repr=False)

    @property
    def data(self) -> Any:
        """The payload (the name queues and most users reach for)."""
        return self.payload

    def __reduce__(self) -> tuple[Any, ...]:
        # A memoryview of shared memory cannot be pickled: a message forwarded
        # to an actor carries a copy of its bytes instead.
        payload = self.payload
        if isinstance(payload, memoryview):
            payload = payload.tobytes()
        return (
            IpcMessage,
            (
                self.message_id,
                self.sender_pid,
                self.receiver_pid,
                self.type,
                self.payload_size,
                self.timestamp,
                payload,
                self.topic,
                self.correlation_id,
                self.codec,
                self.sender_uid,
            ),
        )


def default_codec(data: Any, trusted: bool) -> Codec:
    """The codec for ``data`` when the caller names none (see the module docstring)."""
    if isinstance(data, BYTES_LIKE):
        return "bytes"
    return "pickle" if trusted else "json"


def encode_payload(data: Any, codec: Codec) -> bytes | memoryview:
    """``data`` encoded with ``codec``; :class:`IpcBadRequest` if it cannot be."""
    if codec == "bytes":
        if isinstance(data, mmap.mmap):  # a shared_buffer: sent by its descriptor
            return memoryview(data)
        if isinstance(data, memoryview):
            return data.cast("B") if data.contiguous else data.tobytes()
        if isinstance(data, bytes):
            return data
        if isinstance(data, bytearray):
            return memoryview(data)
        raise IpcBadRequest(f"the bytes codec needs bytes-like data, got {type(data).__name__}")
    if codec == "json":
        try:
            return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise IpcBadRequest(f"the data cannot be sent as JSON: {exc}") from None
    if codec == "pickle":
        return _codec.encode(data)
    raise IpcBadRequest(f"unknown codec {codec!r}: expected one of {', '.join(CODECS)}")


def decode_payload(payload: bytes | memoryview, codec: str, *, allow_pickle: bool = True) -> Any:
    """The value of a received payload.

    The broker delivers pickle only between trusted peers; ``allow_pickle``
    False (a client that is not trusted, or whose broker runs as another
    non-root uid) refuses it here as well, so no path unpickles another uid's
    data.
    """
    if codec == "json":
        try:
            return json.loads(bytes(payload)) if payload else None
        except ValueError as exc:
            raise IpcBadRequest(f"a JSON payload did not parse: {exc}") from None
    if codec == "pickle":
        if not allow_pickle:
            raise IpcBadRequest(
                "refused a pickled payload: pickle is only decoded between the instance "
                "owner's processes and root, under a broker of the same uid or root"
            )
        return _codec.decode(payload)
    return payload


def now() -> float:
    """The timestamp of a message made here."""
    return time.time()
