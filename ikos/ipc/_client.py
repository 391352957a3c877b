"""The broker connection of ``ikos.ipc``: one per process and instance, shared by its threads.

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

What users hold is built on this connection in the sibling modules:
``_connection`` (a target, and the choice of path), ``_subscription``,
``_server`` (a served name) and ``_durable`` (a queue).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ikos._errors import (
    IPC_ERRORS,
    IkosError,
    IpcBadRequest,
    IpcError,
    IpcRemoteError,
    IpcTimeout,
    IpcTooLarge,
    IpcUnavailable,
)
from ikos.ipc._frames import Frame, FrameError, FrameReader, dumps_header, encode_frame
from ikos.ipc._message import (
    Codec,
    IpcMessage,
    decode_payload,
    default_codec,
    encode_payload,
    now,
)
from ikos.platform._activation import broker_socket
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
from ikos.platform._unix import connect_unix, peer_credentials

if TYPE_CHECKING:
    from ikos.ipc._server import Server
    from ikos.ipc._subscription import Subscription

log = logging.getLogger("ikos.ipc")

PROTOCOL_VERSION: Final = 1
#: How long a client keeps trying to reach a broker that went away.
RECONNECT_TIMEOUT: Final = 15.0
HELLO_TIMEOUT: Final = 5.0
DEFAULT_TIMEOUT: Final = 5.0
#: Added to a request's own timeout while waiting for the broker's answer, which
#: carries the broker's ``timeout`` error when the target was too slow.
ANSWER_MARGIN: Final = 2.0
#: The largest frame accepted before the broker says its own limit.
INITIAL_MAX_FRAME: Final = 64 * 1024 * 1024
#: Characters of an error message sent back (a traceback: eight times as many).
ERROR_TEXT: Final = 1000
#: Bytes one read of the broker's socket takes at most.
READ_CHUNK: Final = 256 * 1024


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


def frame_payload(frame: Frame) -> bytes | memoryview:
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


#: In-flight ``put_async`` puts per process (see ``BrokerClient.async_puts``).
ASYNC_PUTS = 512


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
        self.trusted = False  # may send and decode pickle (see _open)
        self.broker_uid = -1
        self.broker_pid = 0
        self.max_frame = INITIAL_MAX_FRAME
        self.shm_threshold = 0
        self._sock: socket.socket | None = None
        #: the socket of a connection being opened (its hello unanswered): abort() ends it
        self._opening: socket.socket | None = None
        self._generation = 0
        self._lock = threading.Lock()  # state: pending, subscriptions, servers
        self._wlock = threading.Lock()  # one frame at a time on the socket
        self._connect_lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        #: Unanswered ``Queue.put_async`` puts of this process, bounded below the
        #: broker's limit of outstanding requests per connection (1,024) so that
        #: the other threads' calls keep room: a fast producer waits, it is not refused.
        self.async_puts = threading.BoundedSemaphore(ASYNC_PUTS)
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
                    if self._closed or time.monotonic() + delay > deadline:
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
        self._opening = sock
        try:
            if self._closed:  # aborted between two attempts
                raise IpcUnavailable(f"the connection to the IPC broker at {self.path} is closed")
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
        finally:
            self._opening = None
        sock.settimeout(None)
        # Pickle crosses only where unpickling cannot raise anyone's privileges: the
        # broker must say this process is trusted (the owner, root) AND run as this
        # process's own uid or as root. Root talking to a user's instance (the broker
        # trusts root) would otherwise unpickle what that user's processes published.
        _, broker_uid, _ = peer_credentials(sock)
        self.broker_uid = broker_uid
        self.trusted = bool(welcome.get("trusted")) and broker_uid in (0, os.geteuid())
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

    def abort(self) -> None:
        """End the client now, from any thread, without waiting for a thread using it.

        :meth:`close` waits for a connection being opened (up to the hello's
        timeout, against a broker that accepts and never answers); this shuts the
        sockets down under the feet of whoever blocks on them, which then fails
        with :class:`IpcUnavailable`. Call :meth:`close` afterwards to release the rest.
        """
        self._closed = True
        for sock in (self._opening, self._sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

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
        payload = frame_payload(frame)
        try:
            value = decode_payload(payload, codec, allow_pickle=self.trusted)
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
        payload = frame_payload(frame)
        answered = str(frame.header.get("codec", chosen))
        return decode_payload(payload, answered, allow_pickle=self.trusted), frame

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
            stats = decode_payload(frame_payload(frame), "json")
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
    paths = instance_paths(root)
    key = broker_socket(paths)
    with _shared_lock:
        client = _shared.get(key)
        if client is None or client._closed:
            client = _shared[key] = BrokerClient(paths)
        return client


def instance_paths(root: str | os.PathLike[str] | None) -> InstancePaths:
    """The instance a call without ``root`` means (``ikos.actors._context``)."""
    from ikos.actors import _context

    return _context.instance_paths(root)


def _forget_after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()  # the parent's sockets and threads are not ours


os.register_at_fork(after_in_child=_forget_after_fork)
