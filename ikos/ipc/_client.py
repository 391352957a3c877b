"""The Python side of ``ikos.ipc``: one broker connection per process, and the API on it.

Two paths, chosen per target. To an actor, a trusted process (the instance's owner
or root, which can read the instance secret) talks directly over the actor's
mailbox through :class:`~ikos.actors._ref.ActorRef`: request/response then costs
what ``ask`` costs, at the pipe floor, and the broker is not involved. Everything
else goes through the broker (``RUN/ipc/broker.sock``, docs/protocol.md): calls to
served names, calls from other users (who cannot read the secret), publish and
subscribe, durable queues.

:class:`BrokerClient` is one connection with one reader thread: writes are
serialised by a lock (so one process's publications keep their order), answers
are matched to their requests by id, deliveries go to the subscriptions of their
pattern, and requests for a served name to its handler threads. A process shares
one client per instance (:func:`shared_client`). When the broker restarts, the
client reconnects with bounded retries and subscribes and serves again; calls in
flight at that moment fail with :class:`~ikos._errors.IpcUnavailable` (a put that
failed so was not acknowledged), and a broker that stays down past the retry
window is reported by the same error, naming the socket.

Rejected: one broker connection per call or per subscription (a connect and a
handshake per message, and no order across a process's publications), and
running subscribers' callbacks in the reader thread (a slow callback would stall
every answer of the process): each callback subscription has its own thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue as _queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ikos._errors import (
    IPC_ERRORS,
    ActorCrashed,
    ActorDeadError,
    ActorError,
    AskTimeout,
    AuthenticationError,
    IkosError,
    IpcBadRequest,
    IpcError,
    IpcNoSuchTarget,
    IpcRemoteError,
    IpcTimeout,
    IpcTooLarge,
    IpcUnavailable,
    MessageTooLarge,
)
from ikos.ipc._frames import Frame, FrameError, FrameReader, dumps_header, encode_frame
from ikos.ipc._message import (
    Codec,
    IpcMessage,
    MessageType,
    decode_payload,
    default_codec,
    encode_payload,
    now,
)
from ikos.platform._memfd import (
    ANCILLARY_SIZE,
    close_all,
    create_segment,
    map_segment,
    recv_with_fds,
    segment_of,
    send_with_fds,
)
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import connect_unix

log = logging.getLogger("ikos.ipc")

PROTOCOL_VERSION: Final = 1
#: How long a client keeps trying to reach a broker that went away.
RECONNECT_TIMEOUT: Final = 15.0
HELLO_TIMEOUT: Final = 5.0
DEFAULT_TIMEOUT: Final = 5.0
#: Added to a request's own timeout while waiting for the broker's answer, which
#: carries the broker's ``timeout`` error when the target was too slow.
ANSWER_MARGIN: Final = 2.0
#: Deliveries one subscription holds before the oldest is dropped (counted).
LOCAL_QUEUE: Final = 10000
#: The largest frame accepted before the broker says its own limit.
INITIAL_MAX_FRAME: Final = 64 * 1024 * 1024
SERVER_THREADS: Final = 8
#: Characters of an error message sent back (a traceback: eight times as many).
ERROR_TEXT: Final = 1000
#: Bytes one read of the broker's socket takes at most.
READ_CHUNK: Final = 256 * 1024


def broker_socket(paths: InstancePaths) -> Path:
    """Where the broker of the instance ``paths`` listens."""
    return paths.run_dir / "ipc" / "broker.sock"


def raise_error(header: dict[str, Any], context: str = "") -> None:
    """Raise the exception of an ``error`` answer (or of a ``response`` carrying one)."""
    error = header.get("error")
    if not isinstance(error, dict):
        error = {"type": "bad_request", "message": f"malformed error answer: {header!r}"}
    kind = str(error.get("type", ""))
    message = str(error.get("message", "")) or kind
    if context:
        message = f"{context}: {message}"
    cls = IPC_ERRORS.get(kind, IpcError)
    if cls is IpcRemoteError:
        raise IpcRemoteError(
            message, str(error.get("remote_type", "")), str(error.get("traceback", ""))
        )
    raise cls(message)


def _cut(text: str, limit: int) -> str:
    """``text``, its middle cut out when longer than ``limit`` (both ends say the most)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters cut ...] {text[-half:]}"


def _payload(frame: Frame) -> bytes | memoryview:
    """A frame's payload: its bytes, or a read-only view of the shared memory it carried.

    The segment is checked (a memfd of the announced size, sealed) and mapped
    read-only; the view keeps the mapping alive, and the kernel frees the memory
    once the last view and descriptor are gone, whoever dies first.
    """
    fd, frame.fd = frame.fd, None
    if fd is None:
        return frame.payload
    size = frame.header.get("shm")
    try:
        return map_segment(fd, size if isinstance(size, int) else -1)  # consumes fd
    except ValueError as exc:
        raise IpcBadRequest(f"a shared-memory payload from the broker is unusable: {exc}") from None


class _Pending:
    """One request waiting for its answer (or a callback to hand the answer to).

    The waiter blocks on a bare lock that the reader releases: an Event would
    build a Condition and a lock per wait, on the path of every call.
    """

    __slots__ = ("callback", "done", "exc", "frame")

    def __init__(self, callback: Callable[[Frame | None, BaseException | None], None] | None):
        self.done = threading.Lock()
        self.done.acquire()
        self.frame: Frame | None = None
        self.exc: BaseException | None = None
        self.callback = callback

    def finish(self, frame: Frame | None, exc: BaseException | None) -> None:
        self.frame, self.exc = frame, exc
        if self.callback is not None:
            try:
                self.callback(frame, exc)
            except Exception:
                log.exception("ikos.ipc: an answer's callback failed")
        self.done.release()

    def wait(self, timeout: float) -> bool:
        """True once finished, False if ``timeout`` seconds passed first."""
        return self.done.acquire(timeout=max(timeout, 0.0))


class BrokerClient:
    """One connection to an instance's broker, shared by the threads of a process.

    Example::

        client = BrokerClient(InstancePaths.resolve(None))
        client.publish("net.eth0.up", {"mtu": 1500})
        client.close()
    """

    def __init__(
        self,
        paths: InstancePaths,
        *,
        label: str | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        self.paths = paths
        self.path = broker_socket(paths)
        self.label = label or f"python:{os.getpid()}"
        self.reconnect_timeout = reconnect_timeout
        self.trusted = False
        self.broker_pid = 0
        self.max_frame = INITIAL_MAX_FRAME
        self.shm_threshold = 0
        self._sock: socket.socket | None = None
        self._generation = 0
        self._lock = threading.Lock()  # state: pending, subscriptions, servers
        self._wlock = threading.Lock()  # one frame at a time on the socket
        self._connect_lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[str, list[Subscription]] = {}
        self._servers: dict[str, Server] = {}
        self._closed = False
        self.reconnects = 0

    # -- the connection --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Connect now (a call connects on demand; this only surfaces errors early)."""
        self._ensure()

    def _ensure(self) -> socket.socket:
        sock = self._sock
        if sock is not None:
            return sock
        with self._connect_lock:
            if self._closed:
                raise IpcUnavailable(f"the connection to the IPC broker at {self.path} is closed")
            if self._sock is not None:
                return self._sock
            deadline = time.monotonic() + self.reconnect_timeout
            delay = 0.02
            while True:
                try:
                    sock = self._open()
                    break
                except IpcUnavailable:
                    if time.monotonic() + delay > deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            self._generation += 1
            self._sock = sock
            reader = threading.Thread(
                target=self._read_loop,
                args=(sock, self._generation),
                name=f"ikos-ipc-reader-{self._generation}",
                daemon=True,
            )
            reader.start()
            if self._generation > 1:
                self.reconnects += 1
                self._restore()
            return sock

    def _open(self) -> socket.socket:
        """A connected socket past the handshake; IpcUnavailable naming the socket if not."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HELLO_TIMEOUT)
            connect_unix(sock, self.path)
            sock.sendall(
                encode_frame({"op": "hello", "version": PROTOCOL_VERSION, "name": self.label})
            )
            reader = FrameReader(INITIAL_MAX_FRAME)
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the broker closed the connection during the hello")
                reader.feed(data)
                frames = list(reader.frames())
                if frames:
                    break
            welcome = frames[0].header
            if welcome.get("op") == "error":
                raise_error(welcome, f"the IPC broker at {self.path} refused the hello")
            if welcome.get("op") != "welcome":
                raise FrameError(f"expected a welcome, got {welcome.get('op')!r}")
        except IpcError as exc:
            sock.close()
            if isinstance(exc, IpcUnavailable):
                raise
            raise IpcUnavailable(str(exc)) from None
        except (OSError, FrameError) as exc:
            sock.close()
            raise IpcUnavailable(f"the IPC broker does not answer on {self.path}: {exc}") from None
        sock.settimeout(None)
        self.trusted = bool(welcome.get("trusted"))
        self.broker_pid = int(welcome.get("broker_pid") or 0)
        self.max_frame = int(welcome.get("max_frame") or INITIAL_MAX_FRAME)
        self.shm_threshold = int(welcome.get("shm_threshold") or 0)
        return sock

    def _restore(self) -> None:
        """After a reconnect: subscribe and serve again what this process had."""
        with self._lock:
            patterns = list(self._subs)
            names = list(self._servers)
        for pattern in patterns:
            try:
                self.call({"op": "subscribe", "pattern": pattern}, timeout=DEFAULT_TIMEOUT)
            except IkosError as exc:
                log.warning("ikos.ipc: could not subscribe to %r again: %s", pattern, exc)
        for name in names:
            try:
                self.call({"op": "serve", "name": name}, timeout=DEFAULT_TIMEOUT)
            except IkosError as exc:
                log.warning("ikos.ipc: could not serve %r again: %s", name, exc)

    def _lost(self, generation: int, why: str) -> bool:
        """The connection ``generation`` broke: fail what waited on it. True if it was current."""
        with self._connect_lock:
            if generation != self._generation or self._sock is None:
                return False
            sock, self._sock = self._sock, None
            with self._lock:
                pending, self._pending = self._pending, {}
        try:
            sock.close()
        except OSError:
            pass
        error = IpcUnavailable(f"the connection to the IPC broker at {self.path} was lost: {why}")
        for waiter in pending.values():
            waiter.finish(None, error)
        return True

    def close(self) -> None:
        """Close the connection; subscriptions and servers of this client end."""
        with self._connect_lock:
            self._closed = True
            sock, self._sock = self._sock, None
            with self._lock:
                pending, self._pending = self._pending, {}
                subs = [s for group in self._subs.values() for s in group]
                servers = list(self._servers.values())
                self._subs.clear()
                self._servers.clear()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        error = IpcUnavailable("the IPC client was closed")
        for waiter in pending.values():
            waiter.finish(None, error)
        for sub in subs:
            sub._end(None)
        for server in servers:
            server._end()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------

    def _read_loop(self, sock: socket.socket, generation: int) -> None:
        reader = FrameReader(max(self.max_frame, INITIAL_MAX_FRAME))
        # one reused buffer: recvmsg(262144) would allocate (and shrink) 256 KiB per read
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        why = "the broker closed it"
        try:
            while True:
                try:
                    got, fds = recv_with_fds(sock, buffer, ANCILLARY_SIZE)
                except (OSError, ValueError) as exc:
                    why = str(exc)
                    break
                if not got:
                    close_all(fds)
                    break
                reader.feed(view[:got], fds)
                for frame in reader.frames():
                    self._dispatch(frame)
        except FrameError as exc:
            why = f"a bad frame from the broker: {exc}"
            log.error("ikos.ipc: %s", why)
        finally:
            reader.close()
        if self._lost(generation, why) and not self._closed:
            self._reconnect_in_background()

    def _reconnect_in_background(self) -> None:
        with self._lock:
            wanted = bool(self._subs or self._servers)
        if not wanted:
            return  # the next call reconnects
        try:
            self._ensure()
        except IpcUnavailable as exc:
            log.error("ikos.ipc: %s; subscriptions and served names are lost", exc)
            with self._lock:
                subs = [s for group in self._subs.values() for s in group]
                servers = list(self._servers.values())
                self._subs.clear()
                self._servers.clear()
            for sub in subs:
                sub._end(exc)
            for server in servers:
                server._end()

    def _dispatch(self, frame: Frame) -> None:
        header = frame.header
        op = frame.op
        if op == "message" and "topic" in header and "queue" not in header:
            self._deliver(frame)
            return
        if op in ("request", "notify"):
            with self._lock:
                server = self._servers.get(str(header.get("name")))
            if server is None:
                frame.close()
                if op == "request":
                    self._answer_error(header.get("id"), "no_such_target", "not served here")
                return
            server._submit(frame)
            return
        if op == "dropped":
            with self._lock:
                subs = list(self._subs.get(str(header.get("pattern")), ()))
            count = header.get("count")
            for sub in subs:
                sub.dropped += count if isinstance(count, int) else 0
            return
        rid = header.get("id")
        with self._lock:
            waiter = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if waiter is None:
            frame.close()
            if op == "error":
                log.warning("ikos.ipc: the broker says: %s", header.get("error"))
            return
        waiter.finish(frame, None)

    def _deliver(self, frame: Frame) -> None:
        header = frame.header
        with self._lock:
            subs = list(self._subs.get(str(header.get("pattern")), ()))
        if not subs:
            frame.close()
            return
        codec = str(header.get("codec", "bytes"))
        payload = _payload(frame)
        try:
            value = decode_payload(payload, codec)
        except Exception as exc:  # a bad payload must not kill the reader
            log.warning(
                "ikos.ipc: undecodable %s delivery on %r: %s", codec, header.get("topic"), exc
            )
            return
        message = IpcMessage(
            message_id=int(header.get("message_id") or 0),
            sender_pid=int(header.get("sender_pid") or 0),
            receiver_pid=os.getpid(),
            type="broadcast",
            payload_size=len(payload),
            timestamp=float(header.get("timestamp") or now()),
            payload=value,
            topic=str(header.get("topic")),
            codec=codec,  # type: ignore[arg-type]
            sender_uid=header.get("sender_uid"),
        )
        for sub in subs:
            sub._put(message)

    # -- writing ---------------------------------------------------------------------

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        """Send one frame; reconnect once if the connection broke since it was last used.

        A payload of at least the broker's ``shm_threshold`` travels as a sealed
        memfd instead (a ``shared_buffer`` by its own descriptor, without a copy).
        """
        size = len(payload) if isinstance(payload, bytes) else memoryview(payload).nbytes
        self._ensure()  # the thresholds are the broker's, known once connected
        if size > self.max_frame:
            raise IpcTooLarge(
                f"a payload of {size} bytes exceeds the broker's limit of {self.max_frame} bytes"
            )
        if self.shm_threshold and size >= self.shm_threshold:
            self._send_shm(header, payload, size)
            return
        data = encode_frame(dumps_header(header), payload)
        for attempt in (0, 1):
            sock = self._ensure()
            generation = self._generation
            try:
                with self._wlock:
                    sock.sendall(data)
                return
            except OSError as exc:
                self._lost(generation, str(exc))
                if attempt:
                    raise IpcUnavailable(
                        f"the connection to the IPC broker at {self.path} broke: {exc}"
                    ) from None

    def _send_shm(self, header: dict[str, Any], payload: bytes | memoryview, size: int) -> None:
        segment = segment_of(payload)
        fd = segment.fd if segment is not None else create_segment(payload)
        try:
            data = encode_frame({**header, "shm": size})
            sock = self._ensure()
            generation = self._generation
            try:
                with self._wlock:
                    sent = send_with_fds(sock, data, [fd])
                    if sent < len(data):
                        sock.sendall(data[sent:])
            except OSError as exc:
                # not retried: the descriptor may have reached the broker already
                self._lost(generation, str(exc))
                raise IpcUnavailable(
                    f"the connection to the IPC broker at {self.path} broke: {exc}"
                ) from None
        finally:
            if segment is None:
                os.close(fd)  # the broker holds its own reference now

    def submit(
        self,
        header: dict[str, Any],
        payload: bytes | memoryview = b"",
        callback: Callable[[Frame | None, BaseException | None], None] | None = None,
    ) -> tuple[int, _Pending]:
        """Send a request frame (an ``id`` is added) and return what will hold its answer."""
        rid = next(self._ids)
        waiter = _Pending(callback)
        with self._lock:
            self._pending[rid] = waiter
        try:
            self.send({**header, "id": rid}, payload)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        return rid, waiter

    def call(
        self,
        header: dict[str, Any],
        payload: bytes | memoryview = b"",
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Frame:
        """Send a request and wait for its answer; an ``error`` answer is raised."""
        rid, waiter = self.submit(header, payload)
        if not waiter.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
            raise IpcTimeout(
                f"the IPC broker did not answer '{header.get('op')}' within {timeout:g} s"
            )
        if waiter.exc is not None:
            raise waiter.exc
        frame = waiter.frame
        assert frame is not None
        if frame.op == "error" or (frame.op == "response" and "error" in frame.header):
            frame.close()
            raise_error(frame.header)
        return frame

    def _answer_error(self, rid: Any, kind: str, message: str, **extra: str) -> None:
        """Answer a forwarded request with an error; texts cut so the header stays small."""
        error = {"type": kind, "message": _cut(message, ERROR_TEXT)}
        error.update({key: _cut(value, ERROR_TEXT * 8) for key, value in extra.items()})
        try:
            self.send({"op": "response", "id": rid, "error": error})
        except IpcError:
            pass

    # -- the operations ---------------------------------------------------------------

    def codec_for(self, data: Any, codec: Codec | None) -> Codec:
        """The codec to send ``data`` with (see :func:`~ikos.ipc._message.default_codec`)."""
        if codec is None:
            self._ensure()  # trust is known once connected
            return default_codec(data, self.trusted)
        return codec

    def publish(
        self, topic: str, data: Any, *, codec: Codec | None = None, ack: bool = False
    ) -> None:
        """Publish ``data`` on ``topic``; with ``ack`` wait until the broker took it."""
        chosen = self.codec_for(data, codec)
        payload = encode_payload(data, chosen)
        header = {"op": "publish", "topic": topic, "codec": chosen}
        if ack:
            self.call({**header, "ack": True}, payload).close()
        else:
            self.send(header, payload)

    def request(
        self, to: str, data: Any, *, timeout: float = DEFAULT_TIMEOUT, codec: Codec | None = None
    ) -> tuple[Any, Frame]:
        """Call ``to`` through the broker: ``(reply value, answer frame)``."""
        chosen = self.codec_for(data, codec)
        header = {"op": "request", "to": to, "codec": chosen, "timeout": timeout}
        frame = self.call(header, encode_payload(data, chosen), timeout=timeout + ANSWER_MARGIN)
        payload = _payload(frame)
        return decode_payload(payload, str(frame.header.get("codec", chosen))), frame

    def notify(self, to: str, data: Any, *, codec: Codec | None = None) -> None:
        """A one-way message to an actor or a served name, through the broker."""
        chosen = self.codec_for(data, codec)
        self.send({"op": "notify", "to": to, "codec": chosen}, encode_payload(data, chosen))

    def stats(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The broker's figures (clients, subscriptions, topics, queues).

        The whole document is the answer's JSON payload; the header holds a
        version cut to fit, used only if the payload is missing.
        """
        frame = self.call({"op": "stats"}, timeout=timeout)
        stats: Any = None
        if frame.header.get("codec") == "json":
            stats = decode_payload(_payload(frame), "json")
        if not isinstance(stats, dict):
            stats = frame.header.get("stats")
        return stats if isinstance(stats, dict) else {}

    def queues(self, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """The durable queues and their depths."""
        found = self.call({"op": "queues"}, timeout=timeout).header.get("queues")
        return [q for q in found if isinstance(q, dict)] if isinstance(found, list) else []

    # -- subscriptions and servers (called by Subscription and Server) ---------------

    def _add_subscription(self, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.setdefault(sub.pattern, [])
            first = not group
            group.append(sub)
        if not first:
            return
        try:
            self.call({"op": "subscribe", "pattern": sub.pattern}).close()
        except BaseException:
            with self._lock:
                self._remove_locked(sub)
            raise

    def _remove_locked(self, sub: Subscription) -> bool:
        group = self._subs.get(sub.pattern, [])
        if sub in group:
            group.remove(sub)
        if group:
            return False
        self._subs.pop(sub.pattern, None)
        return True

    def _remove_subscription(self, sub: Subscription) -> None:
        with self._lock:
            last = self._remove_locked(sub)
        if last and self._sock is not None:
            try:
                self.call({"op": "unsubscribe", "pattern": sub.pattern}).close()
            except IpcError as exc:
                log.debug("ikos.ipc: unsubscribe %r: %s", sub.pattern, exc)

    def _add_server(self, server: Server) -> None:
        with self._lock:
            if server.name in self._servers:
                raise IpcBadRequest(f"this process already serves '{server.name}'")
            self._servers[server.name] = server
        try:
            self.call({"op": "serve", "name": server.name}).close()
        except BaseException:
            with self._lock:
                self._servers.pop(server.name, None)
            raise

    def _remove_server(self, server: Server) -> None:
        with self._lock:
            if self._servers.get(server.name) is not server:
                return
            del self._servers[server.name]
        if self._sock is not None:
            try:
                self.call({"op": "unserve", "name": server.name}).close()
            except IpcError as exc:
                log.debug("ikos.ipc: unserve %r: %s", server.name, exc)


# --- one client per process and instance --------------------------------------------

_shared_lock = threading.Lock()
_shared: dict[Path, BrokerClient] = {}


def shared_client(root: str | os.PathLike[str] | None = None) -> BrokerClient:
    """This process's connection to the broker of ``root`` (default: this process's instance)."""
    paths = _instance_paths(root)
    key = broker_socket(paths)
    with _shared_lock:
        client = _shared.get(key)
        if client is None or client._closed:
            client = _shared[key] = BrokerClient(paths)
        return client


def _instance_paths(root: str | os.PathLike[str] | None) -> InstancePaths:
    if root is None:
        # An actor's instance is the one that started it, whatever $IKOS_ROOT says.
        from ikos.actors import _context

        default = _context._default
        if default is not None:
            return default.paths
    return InstancePaths.resolve(root)


def _forget_after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()  # the parent's sockets and threads are not ours


os.register_at_fork(after_in_child=_forget_after_fork)


# --- subscriptions ---------------------------------------------------------------------


class Subscription:
    """Deliveries of one topic pattern: to a callback (in its own thread) or to be taken.

    Without a callback, take messages with :meth:`get` or by iterating; at most
    :data:`LOCAL_QUEUE` wait here, past that the oldest is dropped. ``dropped``
    counts the deliveries lost, here and in the broker (its ``dropped`` notices).

    Example::

        with ikos.ipc.subscribe("net.*") as sub:
            for message in sub:
                print(message.topic, message.payload)
    """

    def __init__(
        self,
        client: BrokerClient,
        pattern: str,
        callback: Callable[[IpcMessage], Any] | None = None,
        maxsize: int = LOCAL_QUEUE,
    ) -> None:
        self.client, self.pattern, self.callback = client, pattern, callback
        self.dropped = 0
        self.received = 0
        self._items: collections.deque[IpcMessage] = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(
                target=self._run_callbacks, name=f"ikos-ipc-sub-{pattern}", daemon=True
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"Subscription({self.pattern!r})"

    @property
    def active(self) -> bool:
        return not self._ended

    def _put(self, message: IpcMessage) -> None:
        with self._cond:
            if self._ended:
                return
            if len(self._items) >= self._maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(message)
            self.received += 1
            self._cond.notify()

    def _end(self, error: BaseException | None) -> None:
        with self._cond:
            self._ended = True
            self._error = error
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> IpcMessage:
        """The next delivery; :class:`IpcTimeout` when none came within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    raise IpcUnavailable(f"the subscription to {self.pattern!r} has ended")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise IpcTimeout(f"no message on {self.pattern!r} within {timeout:g} s")
                self._cond.wait(remaining)
            return self._items.popleft()

    def __iter__(self) -> Iterator[IpcMessage]:
        while True:
            try:
                yield self.get()
            except IpcUnavailable:
                if self._error is not None:
                    raise
                return

    def _run_callbacks(self) -> None:
        callback = self.callback
        assert callback is not None
        while True:
            try:
                message = self.get()
            except IpcError:
                return
            try:
                callback(message)
            except Exception:
                log.exception(
                    "ikos.ipc: the callback of the subscription to %r raised", self.pattern
                )

    def unsubscribe(self) -> None:
        """Stop the deliveries (idempotent); a callback thread ends after the current call."""
        if self._ended:
            return
        self._end(None)
        self.client._remove_subscription(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    close = unsubscribe

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


# --- servers ---------------------------------------------------------------------------


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
            payload = _payload(frame)
            message = IpcMessage(
                message_id=rid if isinstance(rid, int) else 0,
                sender_pid=int(header.get("sender_pid") or 0),
                receiver_pid=os.getpid(),
                type="request" if is_request else "notification",
                payload_size=len(payload),
                timestamp=now(),
                payload=decode_payload(payload, codec),
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


# --- durable queues ----------------------------------------------------------------------


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
                payload = _payload(frame)
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


# --- connections to a target -------------------------------------------------------------


def _trusted_context(root: str | os.PathLike[str] | None) -> Any:
    """The instance context with its secret, or None where the secret is not readable."""
    from ikos.actors import _context

    try:
        return _context.get(root)
    except (AuthenticationError, OSError):
        return None


def _service_target(paths: InstancePaths, name: str) -> str | None:
    """The daemon or name that answers for the registered service ``name``, if one does.

    An ``endpoint`` of ``ipc://NAME`` or ``actor://NAME`` names it; otherwise the
    service's owner (the daemon that declared it) does. Asked of ikosd's registry
    over the control socket (the registry layer sits above this one).
    """
    from ikos.platform._control import ControlClient

    try:
        with ControlClient(paths, timeout=DEFAULT_TIMEOUT) as control:
            found = control.call("discover", {"name": name})
    except (IkosError, OSError):
        return None
    info = found[0] if isinstance(found, list) and found and isinstance(found[0], dict) else {}
    endpoint = str(info.get("endpoint") or "")
    for scheme in ("ipc://", "actor://"):
        if endpoint.startswith(scheme) and endpoint[len(scheme) :]:
            return endpoint[len(scheme) :]
    owner = info.get("owner")
    return owner if isinstance(owner, str) and owner else None


def _resolve(name: str, root: str | os.PathLike[str] | None) -> tuple[str, bool]:
    """``(target, direct)``: the actor or broker name to talk to, and whether directly.

    An actor of the instance first, then a registered service (by its daemon),
    then whatever the broker routes ``name`` to (a served name, or an actor for a
    process that cannot reach mailboxes).
    """
    ctx = _trusted_context(root)
    paths = ctx.paths if ctx is not None else _instance_paths(root)
    if ctx is not None and paths.actor_socket(name).exists():
        return name, True
    target = _service_target(paths, name) or name
    if ctx is not None and paths.actor_socket(target).exists():
        return target, True
    return target, False


def _actor_error(name: str, exc: ActorError) -> IpcError:
    """An actor's error as the IPC error a caller of ikos.ipc catches."""
    if isinstance(exc, AskTimeout):
        return IpcTimeout(f"'{name}' did not answer: {exc.message}")
    if isinstance(exc, ActorCrashed):
        return IpcRemoteError(f"'{name}' raised: {exc.message}", exc.exc_type, exc.traceback)
    if isinstance(exc, ActorDeadError):
        return IpcNoSuchTarget(f"'{name}' is not running: {exc.message}")
    if isinstance(exc, MessageTooLarge):
        return IpcTooLarge(str(exc))
    return IpcError(str(exc))


class Connection:
    """A connection to one target: an actor, a served name, or a registered service.

    :meth:`request` sends and waits for the reply; :meth:`send_message` sends and
    returns the message id at once, the reply (for a ``request``) arriving later
    through :meth:`receive_message`. Replies are :class:`IpcMessage` values of
    type ``response`` whose ``correlation_id`` is the request's id.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        root: str | os.PathLike[str] | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.codec = codec
        self.target, self.direct = _resolve(name, root)
        self._root = root
        self._ref: Any = None
        self._client: BrokerClient | None = None
        if self.direct:
            from ikos.actors._ref import ActorRef

            self._ref = ActorRef(self.target, root=root)
        else:
            self._client = shared_client(root)
            self._client.connect()
        self._ids = itertools.count(1)
        self._inbox: _queue.Queue[IpcMessage | BaseException] = _queue.Queue()
        self._worker: ThreadPoolExecutor | None = None
        self._closed = False

    def __repr__(self) -> str:
        via = "mailbox" if self.direct else "broker"
        return f"Connection({self.name!r}, via={via})"

    def _check(self) -> None:
        if self._closed:
            raise IpcUnavailable(f"the connection to '{self.name}' is closed")

    def _message(self, value: Any, corr: int, size: int, codec: str) -> IpcMessage:
        return IpcMessage(
            message_id=next(self._ids),
            sender_pid=0,
            receiver_pid=os.getpid(),
            type="response",
            payload_size=size,
            timestamp=now(),
            payload=value,
            correlation_id=corr,
            codec=codec,  # type: ignore[arg-type]
        )

    def _ask(self, data: Any, timeout: float, corr: int) -> IpcMessage:
        if self.direct:
            try:
                value = self._ref.ask(data, timeout=timeout)
            except ActorError as exc:
                raise _actor_error(self.name, exc) from None
            return self._message(value, corr, 0, "pickle")
        assert self._client is not None
        value, frame = self._client.request(self.target, data, timeout=timeout, codec=self.codec)
        return self._message(value, corr, len(frame.payload), str(frame.header.get("codec")))

    def request(self, data: Any, timeout: float | None = None) -> IpcMessage:
        """Send ``data`` as a request and return the response (its payload: the reply).

        Raises :class:`IpcTimeout`, :class:`IpcNoSuchTarget`, :class:`IpcDenied`,
        :class:`IpcRemoteError` (the target raised) and the other IPC errors.
        """
        self._check()
        return self._ask(data, self.timeout if timeout is None else timeout, next(self._ids))

    def send_message(
        self, data: Any, type: MessageType = "request", timeout: float | None = None
    ) -> int:
        """Send ``data`` and return its message id at once.

        A ``request``'s reply comes later by :meth:`receive_message`; a
        ``notification`` is one way (no reply).
        """
        self._check()
        mid = next(self._ids)
        wait = self.timeout if timeout is None else timeout
        if type == "notification":
            if self.direct:
                self._ref.tell(data)
            else:
                assert self._client is not None
                self._client.notify(self.target, data, codec=self.codec)
            return mid
        if type != "request":
            raise IpcBadRequest(f"send_message sends a request or a notification, not a {type}")
        if self._worker is None:
            # one thread: the mailbox connection is per thread, so replies keep their order
            self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"ikos-ipc-{self.name}")

        def ask() -> None:
            try:
                self._inbox.put(self._ask(data, wait, mid))
            except IkosError as exc:
                self._inbox.put(exc)

        self._worker.submit(ask)
        return mid

    def receive_message(self, timeout: float | None = None) -> IpcMessage:
        """The next response; :class:`IpcTimeout` when none came within ``timeout`` s."""
        self._check()
        try:
            item = self._inbox.get(timeout=timeout)
        except _queue.Empty:
            raise IpcTimeout(f"no message from '{self.name}' within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def disconnect(self) -> None:
        """Close the connection (idempotent); replies not yet received are discarded."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    close = disconnect

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
