"""Forwarding records in RFC 5424 to a remote collector, over UDP or TCP.

A target is ``udp://HOST:PORT`` (RFC 5426: one line per datagram, sent at
once, a failure counted and the line lost, as UDP syslog always is; the
name is resolved by a task that retries, so that a logger started before
the network still starts) or
``tcp://HOST:PORT`` (RFC 6587 octet counting: ``LEN SP LINE``). A TCP target
has a bounded queue (``queue_size`` lines and ``queue_bytes`` bytes; when
full the oldest line is dropped and counted: a collector that is down must
not grow the logger) and
a task on the logger's event loop that connects, writes the queue out and,
when the connection fails or the peer closes it, reconnects with a back-off
of 0.2 s doubling to 10 s. A line goes from the queue only once written to
the socket, so a collector that is down loses nothing until the queue
overflows; lines the kernel had taken when the peer vanished are lost (TCP
syslog has no acknowledgements).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from urllib.parse import urlsplit

from examples.system.log._syslog import LogInputError, octet_counted

CONNECT_TIMEOUT = 5.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0


def parse_target(url: str, where: str) -> tuple[str, str, int]:
    """``udp://host:port`` or ``tcp://host:port`` as ``(scheme, host, port)``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LogInputError(f"{where}: {url!r} is not udp://HOST:PORT or tcp://HOST:PORT ({exc})")
    if parts.scheme not in ("udp", "tcp") or not parts.hostname or port is None or parts.path:
        raise LogInputError(f"{where}: {url!r} is not udp://HOST:PORT or tcp://HOST:PORT")
    return parts.scheme, parts.hostname, port


class Forwarder:
    """One target: :meth:`submit` lines, :meth:`stats` says how it goes."""

    def __init__(self, url: str, queue_size: int, queue_bytes: int = 16 * 1024 * 1024) -> None:
        self.url = url
        self.scheme, self.host, self.port = parse_target(url, "forward")
        self.queue: deque[bytes] = deque()
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.queued_bytes = 0
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self.connects = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._udp: socket.socket | None = None

    async def start(self) -> None:
        """Start the task that opens a UDP socket or writes to TCP, on the running loop.

        Never fails: a name that does not resolve yet (the network comes up
        after the logger at boot) is retried with the back-off, and lines
        submitted meanwhile to a UDP target are dropped and counted.
        """
        run = self._open_udp() if self.scheme == "udp" else self._run_tcp()
        self._task = asyncio.get_running_loop().create_task(run)

    async def _open_udp(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            try:
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
                family, kind, proto, _, addr = infos[0]
                sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
                sock.setblocking(False)
                try:
                    sock.connect(addr)
                except OSError:
                    sock.close()
                    raise
            except OSError as exc:  # socket.gaierror included
                delay = await self._failed("resolve", exc, delay)
                continue
            self._udp = sock
            self.connects += 1
            return

    async def _failed(self, what: str, exc: BaseException, delay: float) -> float:
        """Count a failure, wait ``delay``, and return the next (doubled) delay."""
        self.errors += 1
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        await asyncio.sleep(delay)
        return min(delay * 2, BACKOFF_MAX)

    def submit(self, line: bytes) -> None:
        """Send (UDP) or queue (TCP) one RFC 5424 line; never blocks, never raises."""
        if self.scheme == "udp":
            if self._udp is None:  # not resolved yet
                self.dropped += 1
                return
            try:
                self._udp.send(line)
                self.sent += 1
            except OSError as exc:  # ECONNREFUSED from an earlier ICMP, EMSGSIZE, ENOBUFS
                self.errors += 1
                self.dropped += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            return
        frame = octet_counted(line)
        while self.queue and (
            len(self.queue) >= self.queue_size or self.queued_bytes + len(frame) > self.queue_bytes
        ):
            self.queued_bytes -= len(self.queue.popleft())
            self.dropped += 1
        self.queue.append(frame)
        self.queued_bytes += len(frame)
        self._wake.set()

    async def _run_tcp(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT
                )
            except (TimeoutError, OSError) as exc:
                delay = await self._failed("connect", exc, delay)
                continue
            self.connects += 1
            delay = BACKOFF_FIRST
            try:
                await self._write_queue(reader, writer)
            except (OSError, ConnectionError) as exc:
                self.errors += 1
                self.last_error = f"write: {type(exc).__name__}: {exc}"
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await asyncio.sleep(delay)

    async def _write_queue(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Write the queue out until the peer goes away (its EOF is watched)."""
        eof = asyncio.ensure_future(reader.read(4096))  # a collector says nothing; EOF means gone
        try:
            while True:
                while self.queue:
                    if eof.done():
                        raise ConnectionError("the collector closed the connection")
                    frame = self.queue[0]
                    writer.write(frame)
                    await writer.drain()
                    # written: only now does it leave the queue (it may have been
                    # dropped meanwhile by an overflow, hence the identity check)
                    if self.queue and self.queue[0] is frame:
                        self.queued_bytes -= len(self.queue.popleft())
                    self.sent += 1
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait({waiter, eof}, return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    waiter.cancel()
                    raise ConnectionError("the collector closed the connection")
        finally:
            eof.cancel()

    def stats(self) -> dict[str, object]:
        """Counters for ``stats``."""
        return {
            "target": self.url,
            "sent": self.sent,
            "queued": len(self.queue),
            "queued_bytes": self.queued_bytes,
            "dropped": self.dropped,
            "errors": self.errors,
            "connects": self.connects,
            "last_error": self.last_error,
        }

    async def close(self, grace: float = 1.0) -> None:
        """Give a TCP queue ``grace`` seconds to drain, then stop."""
        task = self._task
        if task is not None:
            deadline = asyncio.get_running_loop().time() + grace
            while self.queue and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._task = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
