"""Serving a name: requests for it, forwarded by the broker, answered by a handler.

The reader thread hands each forwarded request to the server's thread pool, so
a slow handler never stalls the process's other traffic; the answer goes back
through the same broker connection in the requester's codec, and what the
handler raises goes back as a ``remote`` error (message and traceback cut to
fit a frame header). Rejected: running handlers in the reader thread, which
would serialise them behind every delivery and answer of the process.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from ikos._errors import (
    IpcError,
)
from ikos.ipc._client import (
    BrokerClient,
    frame_payload,
    log,
)
from ikos.ipc._frames import Frame
from ikos.ipc._message import (
    Codec,
    IpcMessage,
    decode_payload,
    encode_payload,
    now,
)

#: Threads that run one served name's handler by default.
SERVER_THREADS: Final = 8


class Server:
    """A served name: requests and notifications for it run ``handler`` in a thread pool.

    The handler gets an :class:`IpcMessage` (``type`` ``request`` or
    ``notification``); what it returns answers a request, in the requester's
    codec; what it raises reaches the requester as :class:`IpcRemoteError`.
    """

    def __init__(
        self,
        client: BrokerClient,
        name: str,
        handler: Callable[[IpcMessage], Any],
        threads: int = SERVER_THREADS,
    ) -> None:
        self.client, self.name, self.handler = client, name, handler
        self.handled = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"ikos-ipc-serve-{name}")
        self._ended = False

    def __repr__(self) -> str:
        return f"Server({self.name!r})"

    def _submit(self, frame: Frame) -> None:
        if self._ended:
            frame.close()
            return
        try:
            self._pool.submit(self._handle, frame)
        except RuntimeError:  # shut down meanwhile
            frame.close()

    def _handle(self, frame: Frame) -> None:
        header = frame.header
        is_request = frame.op == "request"
        codec = str(header.get("codec", "json"))
        rid = header.get("id")
        try:
            payload = frame_payload(frame)
            message = IpcMessage(
                message_id=rid if isinstance(rid, int) else 0,
                sender_pid=int(header.get("sender_pid") or 0),
                receiver_pid=os.getpid(),
                type="request" if is_request else "notification",
                payload_size=len(payload),
                timestamp=now(),
                payload=decode_payload(payload, codec, allow_pickle=self.client.trusted),
                codec=codec,  # type: ignore[arg-type]
                sender_uid=header.get("sender_uid"),
            )
            reply = self.handler(message)
        except Exception as exc:
            self.handled += 1
            if is_request:
                self.client._answer_error(
                    rid,
                    "remote",
                    f"{type(exc).__name__}: {exc}",
                    remote_type=type(exc).__name__,
                    traceback=traceback.format_exc(),
                )
            else:
                log.exception("ikos.ipc: the handler of '%s' raised on a notification", self.name)
            return
        self.handled += 1
        if not is_request:
            return
        out: Codec = "json" if codec == "bytes" else codec  # type: ignore[assignment]
        if codec == "bytes" and isinstance(reply, bytes | bytearray | memoryview):
            out = "bytes"
        try:
            data = encode_payload(reply, out)
        except IpcError as exc:
            self.client._answer_error(rid, "remote", f"the reply cannot be sent: {exc}")
            return
        try:
            self.client.send({"op": "response", "id": rid, "codec": out}, data)
        except IpcError as exc:
            log.warning("ikos.ipc: the reply for '%s' was not sent: %s", self.name, exc)

    def _end(self) -> None:
        self._ended = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """Stop serving the name (idempotent); requests being handled still get their replies."""
        if self._ended:
            return
        self.client._remove_server(self)
        self._end()

    close = stop

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
