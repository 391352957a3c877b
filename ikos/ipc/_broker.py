"""The IPC broker: one process, one asyncio loop, every client of ``RUN/ipc/broker.sock``.

``python -m ikos.ipc._broker --root ROOT`` serves the broker wire (docs/protocol.md,
"The broker wire"): publish/subscribe with topic patterns, requests routed to served
names or to the instance's actors, durable queues, and payloads in sealed memfds
passed on unchanged. ikosd runs it as the supervised ``ikos-broker`` executable, so
the manager's loop is never on the message path.

Main design choice: the broker does its own socket I/O instead of asyncio's
transports. Transports cannot receive descriptors, and they copy and write every
frame separately; here each connection is read with ``recvmsg_into`` from one
readiness callback, and written by ``sendmsg`` of many frames at once (scatter
gather, one call per connection per loop turn), so a publish to N subscribers costs
one header encoding per matching pattern, N deque appends of the same ``bytes``,
and one system call per subscriber per turn, whatever the publish rate.

Everything a client can make the broker hold is bounded: a connection's read
buffer (one maximal frame, :class:`~ikos.ipc._frames.FrameReader`), its queue of
deliveries (``subscriber_queue`` frames and :data:`SUBSCRIBER_BYTES`; past it
drop-oldest or disconnect), its queue of other frames (past :data:`CONTROL_BYTES`
the broker stops reading from it until it reads its answers), its outstanding
requests, subscriptions and served names, the connections per uid, and the audit
lines per uid. A frame that breaks the protocol gets an ``error`` frame, the
connection is closed and counted; nothing a client sends is decoded but headers
(JSON), and pickles only for trusted peers calling actors.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikos.ipc._frames import (
    LENGTHS,
    MAX_FDS,
    MAX_HEADER,
    Frame,
    FrameError,
    FrameReader,
    FrameTooLarge,
    dumps_header,
    encode_frame,
)
from ikos.ipc._policy import Peer, Policy, Right, allowed, parse_policy, supplementary_groups
from ikos.ipc._queues import QueueError, QueueStore, check_queue_name
from ikos.ipc._topics import SubscriptionIndex, pattern_error, topic_error
from ikos.platform._activation import ENV as ACTIVATION_ENV
from ikos.platform._activation import listening_socket, take_listener
from ikos.platform._memfd import check_segment, create_segment
from ikos.platform._notify import notify
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import peer_credentials

log = logging.getLogger("ikos.broker")

VERSION = 1
#: Seconds a new connection has to send its ``hello``.
HELLO_TIMEOUT = 5.0
#: Bytes one ``recvmsg_into`` reads.
READ_CHUNK = 256 * 1024
#: Frames (iovecs) and bytes one ``sendmsg`` writes at most.
MAX_IOV = 512
SEND_BYTES = 4 * 1024 * 1024
#: Bytes of deliveries waiting for one subscriber at most (besides ``subscriber_queue``).
SUBSCRIBER_BYTES = 64 * 1024 * 1024
#: Bytes of other frames (answers, forwarded requests) waiting for one connection
#: before the broker stops reading from it (its own answers) or refuses to forward
#: to it (``full``).
CONTROL_BYTES = 16 * 1024 * 1024
#: Requests one connection may have outstanding (forwarded or at an actor).
MAX_OUTSTANDING = 1024
#: Subscriptions and served names per connection.
MAX_SUBSCRIPTIONS = 1024
MAX_SERVED = 256
#: Threads calling actors.
ACTOR_WORKERS = 8
#: The longest request timeout accepted, and the default.
MAX_TIMEOUT = 86400.0
DEFAULT_TIMEOUT = 30.0
#: Topics with their own counters in ``stats``; the rest are summed under "(other)".
MAX_TOPIC_STATS = 10000
#: Audit lines per uid and window, then one line with the count.
AUDIT_BURST = 20
AUDIT_WINDOW = 60.0
#: Seconds the listener is left alone after accept failed (out of descriptors).
ACCEPT_PAUSE = 0.1
#: Seconds SIGTERM waits for pending writes before closing the clients.
STOP_DRAIN = 2.0

CODECS = frozenset({"json", "bytes", "pickle"})
ERROR_TYPES = frozenset(
    {
        "bad_request",
        "denied",
        "no_such_target",
        "timeout",
        "too_large",
        "full",
        "unavailable",
        "remote",
    }
)
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: & on the IntFlag runs enum code per read
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@:.-")


class ConfigProblem(ValueError):
    """``broker.json`` is unreadable or wrong; the message names the key."""


@dataclass(frozen=True)
class BrokerConfig:
    """``RUN/ipc/broker.json``, checked (docs/protocol.md lists the keys)."""

    owner_uid: int
    subscriber_queue: int = 10000
    slow_subscriber: str = "drop-oldest"
    shm_threshold: int = 1 << 20
    max_frame: int = 64 << 20
    max_clients: int = 4096
    max_clients_per_uid: int = 256
    queues: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=lambda: Policy(os.getuid()))
    audit_log: str = ""

    @classmethod
    def parse(cls, raw: Any, log_dir: Path) -> BrokerConfig:
        """The configuration of the JSON object ``raw``; :class:`ConfigProblem` if wrong."""
        if not isinstance(raw, dict):
            raise ConfigProblem("broker.json must hold a JSON object")
        owner = raw.get("owner_uid", os.getuid())
        ints: dict[str, int] = {}
        for key, low in (
            ("subscriber_queue", 1),
            ("shm_threshold", 1),
            ("max_frame", 1024),
            ("max_clients", 1),
            ("max_clients_per_uid", 1),
        ):
            value = raw.get(key, getattr(cls, key))
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigProblem(
                    f"broker.json: {key} must be an integer >= {low}, got {value!r}"
                )
            ints[key] = value
        if not isinstance(owner, int) or isinstance(owner, bool) or owner < 0:
            raise ConfigProblem(f"broker.json: owner_uid must be a uid, got {owner!r}")
        slow = raw.get("slow_subscriber", "drop-oldest")
        if slow not in ("drop-oldest", "disconnect"):
            raise ConfigProblem(
                f'broker.json: slow_subscriber must be "drop-oldest" or "disconnect", got {slow!r}'
            )
        queues = raw.get("queues", {})
        if not isinstance(queues, dict):
            raise ConfigProblem("broker.json: queues must be an object")
        try:
            policy = parse_policy(owner, raw.get("policy", []))
        except ValueError as exc:
            raise ConfigProblem(f"broker.json: {exc}") from None
        audit = raw.get("audit_log", "")
        if not isinstance(audit, str):
            raise ConfigProblem("broker.json: audit_log must be a path")
        if audit.startswith("LOG/"):
            audit = str(log_dir / audit[4:])
        elif audit and not os.path.isabs(audit):
            audit = str(log_dir / audit)
        return cls(
            owner_uid=owner,
            slow_subscriber=slow,
            queues=dict(queues),
            policy=policy,
            audit_log=audit,
            **ints,
        )


def load_config(path: Path, log_dir: Path) -> BrokerConfig:
    """Read ``broker.json``; a missing file means the defaults (owner: this uid)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return BrokerConfig.parse({"audit_log": "LOG/ipc-audit.log"}, log_dir)
    except OSError as exc:
        raise ConfigProblem(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigProblem(f"{path} is not JSON: {exc}") from None
    return BrokerConfig.parse(raw, log_dir)


# -- outgoing frames -----------------------------------------------------------------


class SharedFd:
    """A received descriptor sent on to several connections; closed after the last send."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd, self.refs = fd, 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class Out:
    """One frame waiting to be written: its bytes, the descriptor it carries, its topic.

    A delivery's ``Out`` is shared by every subscriber of its pattern.
    """

    __slots__ = ("data", "pattern", "shm", "topic")

    def __init__(
        self,
        data: bytes,
        shm: SharedFd | None = None,
        topic: TopicStats | None = None,
        pattern: str = "",
    ) -> None:
        self.data, self.shm, self.topic, self.pattern = data, shm, topic, pattern


@dataclass(slots=True)
class TopicStats:
    published: int = 0
    delivered: int = 0
    dropped: int = 0
    undeliverable: int = 0


@dataclass(slots=True)
class Pending:
    """A request forwarded to a server, waiting for its response."""

    requester: Conn
    client_id: int
    server: Conn
    name: str
    timer: asyncio.TimerHandle


class Conn:
    """One client connection and everything the broker holds for it.

    Its life: *handshaking* (``hello`` false: only a ``hello`` is accepted, within
    :data:`HELLO_TIMEOUT`), then *open*; while open it may be *writing* (the socket
    is full: a writer callback waits for it to drain, deliveries pile up to their
    bound) and *paused* (its unread answers passed :data:`CONTROL_BYTES`: it is not
    read until they drain to half); *closed* is final, by either side, and releases
    everything at once (:meth:`Broker.close`).
    """

    def __init__(self, sock: socket.socket, number: int, peer: Peer, max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.number = number
        self.peer = peer
        self.name = ""
        self.hello = False
        self.closed = False
        self.trusted = False
        self.grants: dict[Right, tuple[str, ...]] = {}
        self.reader = FrameReader(max_frame, share_headers=True)
        self.ctl: deque[Out] = deque()
        self.ctl_bytes = 0
        self.dlv: deque[Out] = deque()
        self.dlv_bytes = 0
        self.partial: memoryview | None = None
        self.writing = False
        self.paused = False
        self.subs: set[str] = set()
        self.served: set[str] = set()
        self.outstanding = 0
        self.dropped_notice: Counter[str] = Counter()
        self.delivered = 0
        self.dropped = 0
        self.allowed_cache: dict[tuple[Right, str], bool] = {}
        #: Encoded delivery headers up to the message id, per (topic, pattern, codec).
        self.prefixes: dict[tuple[str, str, str], bytes] = {}
        self.hello_timer: asyncio.TimerHandle | None = None
        self.connected_at = time.time()

    def __repr__(self) -> str:
        return f"<conn {self.number} pid {self.peer.pid} uid {self.peer.uid}>"


# -- the audit log -------------------------------------------------------------------


class Burst:
    """At most ``burst`` events per key (a uid) and ``window`` seconds: a flood from one
    uid can neither flood a log nor hide another uid's lines."""

    def __init__(self, burst: int, window: float) -> None:
        self.burst, self.window = burst, window
        self._windows: dict[int, tuple[float, int, int]] = {}  # key: start, taken, held

    def take(self, key: int) -> tuple[bool, int]:
        """``(allowed, held)``: whether this event may be written, and how many were
        held back in the window that just closed (to be reported once, now)."""
        now = time.monotonic()
        if len(self._windows) > 4096:
            self._windows = {k: w for k, w in self._windows.items() if now - w[0] < self.window}
        start, taken, held = self._windows.get(key, (now, 0, 0))
        closed = 0
        if now - start >= self.window:
            start, taken, closed, held = now, 0, held, 0
        if taken < self.burst:
            self._windows[key] = (start, taken + 1, held)
            return True, closed
        self._windows[key] = (start, taken, held + 1)
        return False, closed


class AuditLog:
    """Audit lines (uid, pid, what, result) in a file, at most a burst per uid and window."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None
        self._burst = Burst(AUDIT_BURST, AUDIT_WINDOW)
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file, e.g. after logrotate moved it (SIGHUP)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if not self.path:
            return
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)
        except OSError as exc:
            log.error("cannot open the audit log %s: %s", self.path, exc.strerror)

    def write(self, peer: Peer, what: str, result: str) -> None:
        """Record ``what`` done by ``peer`` and its ``result`` ("allowed", "denied: why")."""
        ok, held = self._burst.take(peer.uid)
        if held:
            self._line(f"uid {peer.uid}: {held} more audit lines not written in the last minute")
        if ok:
            self._line(f"pid {peer.pid} uid {peer.uid}: {what}: {result}")

    def _line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp} {text}\n"
        if self._file is not None:
            try:
                self._file.write(line)
            except OSError as exc:
                log.error("cannot write the audit log: %s", exc.strerror)
        else:
            log.info("audit: %s", text)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class BadRequest(Exception):
    """A request the broker answers with an error frame (the connection stays)."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind, self.message, self.extra = kind, message, extra


class ProtocolViolation(Exception):
    """A frame after which the connection is closed (an error frame is sent first)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def _int(header: dict[str, Any], key: str) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest("bad_request", f'"{key}" must be an integer, got {value!r}')
    return value


def _str(header: dict[str, Any], key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str):
        raise BadRequest("bad_request", f'"{key}" must be a string, got {value!r}')
    return value


def _timeout(header: dict[str, Any]) -> float:
    value = header.get("timeout", DEFAULT_TIMEOUT)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0 < value <= MAX_TIMEOUT
    ):
        raise BadRequest("bad_request", f'"timeout" must be seconds in (0, {MAX_TIMEOUT:g}]')
    return float(value)


def _name(header: dict[str, Any], key: str) -> str:
    """A served name, actor name or queue name: topic syntax, which also keeps '/' out."""
    value = _str(header, key)
    err = topic_error(value)
    if err is not None:
        raise BadRequest("bad_request", f'"{key}": {err}')
    return value


def check_shm(fd: int, size: int) -> None:
    """Raise :class:`ProtocolViolation` unless ``fd`` is a sealed memfd of ``size`` bytes."""
    try:
        check_segment(fd, size)
    except ValueError as exc:
        raise ProtocolViolation("bad_request", f"bad shared-memory segment: {exc}") from None


# -- the broker ----------------------------------------------------------------------


class Broker:
    """The broker of one instance: listener, connections, subscriptions, routing."""

    def __init__(self, paths: InstancePaths, config_file: Path | None = None) -> None:
        self.paths = paths
        self.dir = paths.run_dir / "ipc"
        self.socket_path = self.dir / "broker.sock"
        self.config_file = config_file or self.dir / "broker.json"
        self.config = load_config(self.config_file, paths.log_dir)
        self.audit = AuditLog(self.config.audit_log)
        self.loop = asyncio.get_event_loop()
        self.conns: dict[int, Conn] = {}
        self.per_uid: Counter[int] = Counter()
        self.index: SubscriptionIndex[Conn] = SubscriptionIndex()
        self.servers: dict[str, Conn] = {}
        self.pending: dict[int, Pending] = {}
        self.topics: dict[str, TopicStats] = {}
        self.counters: Counter[str] = Counter()
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._dirty: dict[Conn, None] = {}
        self._flush_scheduled = False
        self._listener: socket.socket | None = None
        self._borrowed = False  # the listener is ikosd's (socket activation)
        self._stopping: asyncio.Event | None = None
        self._closing = False  # stopping: no connection is read again
        self._violations = Burst(AUDIT_BURST, AUDIT_WINDOW)
        self.actors = ActorCalls(self)
        self.queues = QueueOps(self)
        self._valid_topics: set[str] = set()

    # -- life ------------------------------------------------------------------

    def listen(self) -> None:
        """Take the listening socket from ikosd (socket activation), else bind it; accept.

        Under ikosd, ``$IKOS_BROKER_ACTIVATION`` names where ikosd hands over the
        socket it holds (ikos.platform._activation): connections made before this
        broker ran wait in its backlog and are accepted now. Started by hand, the
        broker binds the socket itself (0666 in a 0755 directory).
        """
        handoff = os.environ.get(ACTIVATION_ENV)
        if handoff:
            self._listener = take_listener(handoff)
            self._borrowed = True
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o755)
            self._listener = listening_socket(self.socket_path)
        sock = self._listener
        self.loop.add_reader(sock.fileno(), self._accept)

    async def run(self) -> None:
        """Serve until SIGTERM (or SIGINT); SIGHUP reloads broker.json."""
        self._stopping = asyncio.Event()
        self.loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        self.loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.queues.open()
        self.listen()
        log.info(
            "broker pid %d %s %s",
            os.getpid(),
            "accepting on ikosd's socket" if self._borrowed else "listening on",
            self.socket_path,
        )
        with contextlib.suppress(OSError, ValueError):
            notify("READY=1\nSTATUS=listening")
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, let pending writes drain a little, close everyone, remove the socket."""
        with contextlib.suppress(OSError, ValueError):
            notify("STOPPING=1")
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            if not self._borrowed:  # ikosd's socket stays: the next broker takes it
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
        self._closing = True
        for conn in self.conns.values():  # nothing new from anyone; what is under way ends
            if not conn.paused:
                self.loop.remove_reader(conn.fd)
        await self.queues.finish_commits(STOP_DRAIN * 5)
        deadline = time.monotonic() + STOP_DRAIN
        while time.monotonic() < deadline and any(
            c.ctl or c.partial is not None for c in self.conns.values()
        ):
            await asyncio.sleep(0.01)
        for conn in list(self.conns.values()):
            self.close(conn, "the broker is stopping")
        self.actors.shutdown()
        await self.queues.close()
        self.audit.close()

    def reload(self) -> None:
        """SIGHUP: re-read broker.json; grants recomputed, what is no longer granted undone."""
        try:
            config = load_config(self.config_file, self.paths.log_dir)
        except ConfigProblem as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        self.config = config
        self.audit.path = config.audit_log
        self.audit.reopen()
        for conn in list(self.conns.values()):
            if not conn.hello:
                continue
            conn.reader.max_payload = config.max_frame
            self._authorise(conn)
            for pattern in list(conn.subs):
                if not self._may(conn, "subscribe", pattern):
                    self._unsubscribe(conn, pattern)
                    self.audit.write(conn.peer, f"subscription {pattern!r}", "revoked by reload")
            for name in list(conn.served):
                if not self._may(conn, "serve", name):
                    self._unserve(conn, name)
                    self.audit.write(conn.peer, f"serve {name!r}", "revoked by reload")
        self.queues.configure()
        log.info("configuration reloaded from %s", self.config_file)

    def _authorise(self, conn: Conn) -> None:
        policy = self.config.policy
        conn.trusted = policy.trusted(conn.peer)
        conn.grants = policy.grants(conn.peer)
        conn.allowed_cache.clear()

    def _may(self, conn: Conn, right: Right, name: str) -> bool:
        if conn.trusted:
            return True
        key = (right, name)
        hit = conn.allowed_cache.get(key)
        if hit is None:
            if len(conn.allowed_cache) > 1024:
                conn.allowed_cache.clear()
            hit = conn.allowed_cache[key] = allowed(conn.grants.get(right, ()), name, right)
        return hit

    def _require(self, conn: Conn, right: Right, name: str, what: str) -> None:
        """Raise a ``denied`` error (and audit it) unless ``conn`` may ``right`` ``name``."""
        if self._may(conn, right, name):
            return
        self.counters["denied"] += 1
        self.audit.write(conn.peer, what, f"denied (no {right} grant)")
        raise BadRequest(
            "denied", f"uid {conn.peer.uid} may not {what}: the policy grants no {right!r} on it"
        )

    # -- accepting -------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving those connected
                self.counters["accept_failed"] += 1
                log.warning("accept failed: %s", exc.strerror)
                # the listener stays readable: stop polling it a moment, or the loop spins
                fd = self._listener.fileno()
                self.loop.remove_reader(fd)
                self.loop.call_later(ACCEPT_PAUSE, self._resume_accept, fd)
                return
            self._admit(sock)

    def _resume_accept(self, fd: int) -> None:
        if self._listener is not None and self._listener.fileno() == fd:
            self.loop.add_reader(fd, self._accept)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        peer = Peer(pid, uid, gid, supplementary_groups(pid, uid))
        trusted = self.config.policy.trusted(peer)
        refusal = ""
        if len(self.conns) >= self.config.max_clients:
            refusal = f"the broker serves its maximum of {self.config.max_clients} clients"
        elif not trusted and self.per_uid[uid] >= self.config.max_clients_per_uid:
            refusal = f"uid {uid} has its maximum of {self.config.max_clients_per_uid} connections"
        if refusal:
            self.counters["refused_connections"] += 1
            with contextlib.suppress(OSError):
                sock.send(
                    encode_frame({"op": "error", "error": {"type": "full", "message": refusal}})
                )
            sock.close()
            return
        conn = Conn(sock, next(self._numbers), peer, self.config.max_frame)
        self.conns[conn.fd] = conn
        self.per_uid[uid] += 1
        self.counters["connections"] += 1
        conn.hello_timer = self.loop.call_later(HELLO_TIMEOUT, self._hello_expired, conn)
        self.loop.add_reader(conn.fd, self._readable, conn)

    def _hello_expired(self, conn: Conn) -> None:
        if not conn.hello and not conn.closed:
            self.counters["handshake_timeouts"] += 1
            self._violation(conn, "bad_request", f"no hello within {HELLO_TIMEOUT:g} s")

    # -- reading ---------------------------------------------------------------

    def _readable(self, conn: Conn) -> None:
        try:
            n, anc, flags, _ = conn.sock.recvmsg_into([self._rbuf], _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn, "read failed")
            return
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
                fds.extend(arr)
        if flags & _MSG_CTRUNC:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._violation(conn, "bad_request", f"more than {MAX_FDS} descriptors at once")
            return
        if n == 0 and not fds:
            self.close(conn, "")
            return
        try:
            conn.reader.feed(self._rview[:n], fds)
            for frame in conn.reader.frames():
                try:
                    self._dispatch(conn, frame)
                finally:
                    frame.close()
                if conn.closed:
                    return
        except FrameTooLarge as exc:
            self._violation(conn, "too_large", str(exc))
        except FrameError as exc:
            self._violation(conn, "bad_request", str(exc))
        except ProtocolViolation as exc:
            self._violation(conn, exc.kind, exc.message)

    def _violation(self, conn: Conn, kind: str, message: str) -> None:
        """Answer a protocol violation with one error frame, then close the connection."""
        if conn.closed:
            return
        self.counters["protocol_errors"] += 1
        ok, held = self._violations.take(conn.peer.uid)
        if held:
            log.info("uid %d: %d more protocol errors not logged", conn.peer.uid, held)
        if ok:
            log.info("%r: %s: %s", conn, kind, message)
        if conn.partial is None:
            with contextlib.suppress(OSError):
                conn.sock.send(
                    encode_frame({"op": "error", "error": {"type": kind, "message": message}})
                )
        self.close(conn, message)

    def _dispatch(self, conn: Conn, frame: Frame) -> None:
        header = frame.header
        op = frame.op
        if not conn.hello:
            if op != "hello":
                raise ProtocolViolation(
                    "bad_request", f'the first frame must be "hello", not {op!r}'
                )
            self._hello(conn, header)
            return
        handler = self._ops.get(op)
        if handler is None:
            raise ProtocolViolation("bad_request", f"unknown op {op!r}")
        if "shm" in header:
            size = header["shm"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or frame.payload:
                raise ProtocolViolation(
                    "bad_request", '"shm" must be the segment size, with an empty payload'
                )
            if size > self.config.max_frame:
                raise ProtocolViolation("too_large", f"a segment of {size} bytes exceeds max_frame")
            assert frame.fd is not None
            check_shm(frame.fd, size)
        rid = header.get("id")
        try:
            handler(self, conn, frame)
        except BadRequest as exc:
            self._error(conn, rid, exc.kind, exc.message, **exc.extra)
        except ProtocolViolation:
            raise
        except Exception as exc:  # a bug: answered and logged, the broker goes on
            self.counters["internal_errors"] += 1
            log.exception("%r: %s failed", conn, op)
            self._error(conn, rid, "unavailable", f"the broker failed on {op!r}: {exc!r}")

    def _hello(self, conn: Conn, header: dict[str, Any]) -> None:
        if header.get("version") != VERSION:
            raise ProtocolViolation(
                "bad_request",
                f"unsupported version {header.get('version')!r} (this broker speaks {VERSION})",
            )
        name = header.get("name", "")
        conn.name = name[:100] if isinstance(name, str) else ""
        conn.hello = True
        if conn.hello_timer is not None:
            conn.hello_timer.cancel()
            conn.hello_timer = None
        self._authorise(conn)
        self.send(
            conn,
            {
                "op": "welcome",
                "version": VERSION,
                "broker_pid": os.getpid(),
                "uid": conn.peer.uid,
                "pid": conn.peer.pid,
                "trusted": conn.trusted,
                "max_frame": self.config.max_frame,
                "shm_threshold": self.config.shm_threshold,
            },
        )

    # -- writing ---------------------------------------------------------------

    def send(
        self, conn: Conn, header: dict[str, Any], payload: bytes = b"", shm: SharedFd | None = None
    ) -> None:
        """Queue a frame (not a delivery) for ``conn``."""
        if conn.closed:
            if shm is not None:
                shm.release()
            return
        data = encode_frame(header, payload)
        conn.ctl.append(Out(data, shm))
        conn.ctl_bytes += len(data)
        if conn.ctl_bytes > CONTROL_BYTES and not conn.paused:
            self._pause(conn)
        self._mark(conn)

    def _error(self, conn: Conn, rid: Any, kind: str, message: str, **extra: Any) -> None:
        header: dict[str, Any] = {"op": "error"}
        if isinstance(rid, int) and not isinstance(rid, bool):
            header["id"] = rid
        header["error"] = {"type": kind, "message": message, **extra}
        self.send(conn, header)

    def _ok(self, conn: Conn, rid: int, **fields: Any) -> None:
        self.send(conn, {"op": "ok", "id": rid, **fields})

    def _mark(self, conn: Conn) -> None:
        if conn.writing:
            return  # waiting for the socket to drain: the writer callback flushes it
        self._dirty[conn] = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            if not conn.closed:
                self._flush(conn)

    def _writable(self, conn: Conn) -> None:
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        """Write what ``conn`` has waiting, as far as the socket takes it, in few sendmsg calls."""
        sock = conn.sock
        while True:
            if conn.partial is not None:
                try:
                    n = sock.send(conn.partial)
                except (BlockingIOError, InterruptedError):
                    self._wait_writable(conn)
                    return
                except OSError:
                    self.close(conn, "write failed")
                    return
                if n < len(conn.partial):
                    conn.partial = conn.partial[n:]
                    self._wait_writable(conn)
                    return
                conn.partial = None
            queue = conn.ctl if conn.ctl else conn.dlv
            if not queue:
                break
            bufs: list[bytes] = []
            shm: SharedFd | None = None
            total = 0
            for out in queue:
                if out.shm is not None:
                    if bufs:
                        break  # a descriptor goes with the first byte of its own call
                    shm = out.shm
                bufs.append(out.data)
                total += len(out.data)
                if len(bufs) >= MAX_IOV or total >= SEND_BYTES:
                    break
            try:
                if shm is not None:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [shm.fd]))]
                    n = sock.sendmsg(bufs, anc)
                else:
                    n = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                self._wait_writable(conn)
                return
            except OSError:
                self.close(conn, "write failed")
                return
            is_dlv = queue is conn.dlv
            written = 0
            while n > 0:
                out = queue.popleft()
                size = len(out.data)
                written += size
                if out.shm is not None:
                    out.shm.release()  # sent with the call's first byte
                if is_dlv:
                    conn.delivered += 1
                    if out.topic is not None:
                        out.topic.delivered += 1
                if n < size:
                    conn.partial = memoryview(out.data)[n:]
                n -= size
            if is_dlv:
                conn.dlv_bytes -= written
            else:
                conn.ctl_bytes -= written
                if conn.paused and conn.ctl_bytes < CONTROL_BYTES // 2 and not self._closing:
                    conn.paused = False
                    self.loop.add_reader(conn.fd, self._readable, conn)
            if conn.dropped_notice and not conn.ctl:
                for pattern, count in conn.dropped_notice.items():
                    data = encode_frame({"op": "dropped", "pattern": pattern, "count": count})
                    conn.ctl.append(Out(data))
                    conn.ctl_bytes += len(data)
                conn.dropped_notice.clear()
        if conn.writing:
            conn.writing = False
            self.loop.remove_writer(conn.fd)
        if conn.ctl_bytes > CONTROL_BYTES and not conn.paused:
            self._pause(conn)

    def _wait_writable(self, conn: Conn) -> None:
        if not conn.writing:
            conn.writing = True
            self._dirty.pop(conn, None)
            self.loop.add_writer(conn.fd, self._writable, conn)
        if conn.ctl_bytes > CONTROL_BYTES and not conn.paused:
            self._pause(conn)

    def _pause(self, conn: Conn) -> None:
        # its own answers pile up: read nothing more from it until it reads them
        conn.paused = True
        self.loop.remove_reader(conn.fd)

    # -- closing ---------------------------------------------------------------

    def close(self, conn: Conn, reason: str) -> None:
        """Forget ``conn``: its subscriptions, names, requests, queue messages; close the socket."""
        if conn.closed:
            return
        conn.closed = True
        if reason:
            log.debug("%r closed: %s", conn, reason)
        self.loop.remove_reader(conn.fd)
        if conn.writing:
            self.loop.remove_writer(conn.fd)
        if conn.hello_timer is not None:
            conn.hello_timer.cancel()
        for pattern in list(conn.subs):
            self._unsubscribe(conn, pattern)
        for name in list(conn.served):
            self._unserve(conn, name)
        for bid, p in list(self.pending.items()):
            if p.requester is conn:
                p.timer.cancel()
                del self.pending[bid]
        self.actors.forget(conn)
        self.queues.consumer_gone(conn)
        for queue in (conn.ctl, conn.dlv):
            for out in queue:
                if out.shm is not None:
                    out.shm.release()
            queue.clear()
        conn.reader.close()
        self._dirty.pop(conn, None)
        del self.conns[conn.fd]
        self.per_uid[conn.peer.uid] -= 1
        if self.per_uid[conn.peer.uid] <= 0:
            del self.per_uid[conn.peer.uid]
        conn.sock.close()

    # -- publish/subscribe -----------------------------------------------------

    def _topic_stats(self, topic: str) -> TopicStats:
        stats = self.topics.get(topic)
        if stats is None:
            key = topic if len(self.topics) < MAX_TOPIC_STATS else "(other)"
            stats = self.topics.get(key)
            if stats is None:
                stats = self.topics[key] = TopicStats()
        return stats

    def op_publish(self, conn: Conn, frame: Frame) -> None:
        header = frame.header
        topic = header.get("topic")
        if topic not in self._valid_topics:
            err = topic_error(topic)
            if err is not None:
                raise BadRequest("bad_request", err)
            if len(self._valid_topics) > 65536:
                self._valid_topics.clear()
            self._valid_topics.add(topic)  # type: ignore[arg-type]
        assert isinstance(topic, str)
        codec = self._codec(conn, header)
        self._require(conn, "publish", topic, f"publish to {topic!r}")
        stats = self._topic_stats(topic)
        stats.published += 1
        self.counters["published"] += 1
        matched = self.index.match(topic)
        if matched:
            self._fan_out(conn, frame, topic, codec, stats, matched)
        if header.get("ack"):
            self._ok(conn, _int(header, "id"))

    def _fan_out(
        self,
        conn: Conn,
        frame: Frame,
        topic: str,
        codec: str,
        stats: TopicStats,
        matched: tuple[tuple[str, tuple[Conn, ...]], ...],
    ) -> None:
        # Topic and pattern are validated to [A-Za-z0-9_@:.*#-], codec is one of three
        # words: the header is formatted without json.dumps, once per matching pattern.
        size = frame.header.get("shm")
        shared = SharedFd(frame.fd) if frame.fd is not None else None
        if shared is not None:
            frame.fd = None  # owned by the deliveries now
            shared.refs = 0
            tail = f',"shm":{size}}}'
            payload = b""
        else:
            tail = "}"
            payload = frame.payload
        common = b'"message_id":%d,"timestamp":%r%s' % (
            next(self._message_ids),
            time.time(),
            tail.encode(),
        )
        bound = self.config.subscriber_queue
        drop_oldest = self.config.slow_subscriber == "drop-oldest"
        pickle = codec == "pickle"
        prefixes = conn.prefixes
        for pattern, subscribers in matched:
            key = (topic, pattern, codec)
            prefix = prefixes.get(key)
            if prefix is None:
                if len(prefixes) >= 1024:
                    prefixes.clear()
                prefix = prefixes[key] = (
                    f'{{"op":"message","topic":"{topic}","pattern":"{pattern}","codec":"{codec}",'
                    f'"sender_pid":{conn.peer.pid},"sender_uid":{conn.peer.uid},'
                ).encode()
            hlen = len(prefix) + len(common)
            data = b"".join((LENGTHS.pack(4 + hlen + len(payload), hlen), prefix, common, payload))
            out = Out(data, shared, stats, pattern)
            size_data = len(data)
            for sub in subscribers:
                if sub.closed:
                    continue  # disconnected as slow by an earlier pattern of this publish
                if pickle and not sub.trusted:
                    stats.undeliverable += 1
                    self.counters["undeliverable"] += 1
                    continue
                dlv = sub.dlv
                if len(dlv) >= bound or sub.dlv_bytes + size_data > SUBSCRIBER_BYTES:
                    if not drop_oldest:
                        self.counters["slow_disconnected"] += 1
                        self._violation(
                            sub, "full", f"more than {bound} deliveries waiting: disconnected"
                        )
                        continue
                    while dlv and (
                        len(dlv) >= bound or sub.dlv_bytes + size_data > SUBSCRIBER_BYTES
                    ):
                        old = dlv.popleft()
                        sub.dlv_bytes -= len(old.data)
                        sub.dropped += 1
                        self.counters["dropped"] += 1
                        if old.topic is not None:
                            old.topic.dropped += 1
                        if old.shm is not None:
                            old.shm.release()
                        sub.dropped_notice[old.pattern] += 1
                dlv.append(out)
                sub.dlv_bytes += size_data
                if shared is not None:
                    shared.refs += 1
                if not sub.writing and sub not in self._dirty:
                    self._mark(sub)
        if shared is not None and shared.refs == 0:
            shared.refs = 1
            shared.release()

    def _codec(self, conn: Conn, header: dict[str, Any]) -> str:
        codec = header.get("codec", "bytes")
        if codec not in CODECS:
            raise BadRequest(
                "bad_request", f'"codec" must be one of {sorted(CODECS)}, got {codec!r}'
            )
        if codec == "pickle" and not conn.trusted:
            self.counters["denied"] += 1
            self.audit.write(conn.peer, "send a pickle payload", "denied (not the owner or root)")
            raise BadRequest(
                "denied",
                f"uid {conn.peer.uid} may not send pickle payloads (only the owner and root)",
            )
        return str(codec)

    def op_subscribe(self, conn: Conn, frame: Frame) -> None:
        header = frame.header
        rid = _int(header, "id")
        pattern = header.get("pattern")
        err = pattern_error(pattern)
        if err is not None:
            raise BadRequest("bad_request", err)
        assert isinstance(pattern, str)
        self._require(conn, "subscribe", pattern, f"subscribe to {pattern!r}")
        if pattern not in conn.subs:
            if len(conn.subs) >= MAX_SUBSCRIPTIONS:
                raise BadRequest(
                    "full", f"a connection has at most {MAX_SUBSCRIPTIONS} subscriptions"
                )
            conn.subs.add(pattern)
            self.index.add(pattern, conn)
            if not conn.trusted:
                self.audit.write(conn.peer, f"subscribe to {pattern!r}", "allowed")
        self._ok(conn, rid)

    def op_unsubscribe(self, conn: Conn, frame: Frame) -> None:
        rid = _int(frame.header, "id")
        pattern = frame.header.get("pattern")
        if isinstance(pattern, str) and pattern in conn.subs:
            self._unsubscribe(conn, pattern)
        self._ok(conn, rid)

    def _unsubscribe(self, conn: Conn, pattern: str) -> None:
        conn.subs.discard(pattern)
        self.index.remove(pattern, conn)

    # -- requests to served names ----------------------------------------------

    def op_serve(self, conn: Conn, frame: Frame) -> None:
        rid = _int(frame.header, "id")
        name = _name(frame.header, "name")
        self._require(conn, "serve", name, f"serve {name!r}")
        holder = self.servers.get(name)
        if holder is not None and holder is not conn:
            raise BadRequest("bad_request", f"{name!r} is already served (pid {holder.peer.pid})")
        if holder is None:
            if len(conn.served) >= MAX_SERVED:
                raise BadRequest("full", f"a connection serves at most {MAX_SERVED} names")
            self.servers[name] = conn
            conn.served.add(name)
            self.audit.write(conn.peer, f"serve {name!r}", "allowed")
        self._ok(conn, rid)

    def op_unserve(self, conn: Conn, frame: Frame) -> None:
        rid = _int(frame.header, "id")
        name = frame.header.get("name")
        if isinstance(name, str) and name in conn.served:
            self._unserve(conn, name)
        self._ok(conn, rid)

    def _unserve(self, conn: Conn, name: str) -> None:
        conn.served.discard(name)
        if self.servers.get(name) is conn:
            del self.servers[name]
        for bid, p in list(self.pending.items()):
            if p.server is conn and p.name == name:
                self._finish(bid)
                self._error(
                    p.requester, p.client_id, "unavailable", f"the server of {name!r} went away"
                )

    def _finish(self, bid: int) -> Pending:
        p = self.pending.pop(bid)
        p.timer.cancel()
        p.requester.outstanding -= 1
        return p

    def op_request(self, conn: Conn, frame: Frame) -> None:
        self._route(conn, frame, one_way=False)

    def op_notify(self, conn: Conn, frame: Frame) -> None:
        self._route(conn, frame, one_way=True)

    def _route(self, conn: Conn, frame: Frame, *, one_way: bool) -> None:
        header = frame.header
        rid = 0 if one_way else _int(header, "id")
        to = _name(header, "to")
        codec = self._codec(conn, header)
        timeout = _timeout(header)
        verb = "notify" if one_way else "call"
        self._require(conn, "call", to, f"{verb} {to!r}")
        if not one_way and conn.outstanding >= MAX_OUTSTANDING:
            raise BadRequest("full", f"more than {MAX_OUTSTANDING} requests outstanding")
        server = self.servers.get(to)
        if server is not None:
            if codec == "pickle" and not server.trusted:
                raise BadRequest(
                    "denied", f"the server of {to!r} is not trusted with pickle payloads"
                )
            if server.ctl_bytes > CONTROL_BYTES:
                raise BadRequest("full", f"the server of {to!r} is not reading its requests")
            out: dict[str, Any] = {
                "op": "notify" if one_way else "request",
                "name": to,
                "codec": codec,
                "sender_pid": conn.peer.pid,
                "sender_uid": conn.peer.uid,
                "timeout": timeout,
            }
            shm = self._take_shm(frame, out)
            if not one_way:
                bid = next(self._ids)
                out["id"] = bid
                timer = self.loop.call_later(timeout, self._request_expired, bid)
                self.pending[bid] = Pending(conn, rid, server, to, timer)
                conn.outstanding += 1
            self.send(server, out, frame.payload, shm)
            self.counters["requests_forwarded"] += 1
            return
        if self.paths.actor_socket(to).exists():
            self.actors.submit(conn, rid, to, frame, codec, timeout, one_way)
            return
        if not one_way:
            raise BadRequest("no_such_target", f"nothing serves {to!r}: no server, no actor")
        self.counters["undeliverable"] += 1

    @staticmethod
    def _take_shm(frame: Frame, header: dict[str, Any]) -> SharedFd | None:
        if frame.fd is None:
            return None
        header["shm"] = frame.header["shm"]
        shm = SharedFd(frame.fd)
        frame.fd = None
        return shm

    def _request_expired(self, bid: int) -> None:
        if bid not in self.pending:
            return
        p = self._finish(bid)
        self.counters["request_timeouts"] += 1
        self._error(
            p.requester, p.client_id, "timeout", f"{p.name!r} did not answer within the timeout"
        )

    def op_response(self, conn: Conn, frame: Frame) -> None:
        header = frame.header
        bid = header.get("id")
        p = self.pending.get(bid) if isinstance(bid, int) else None
        if p is None or p.server is not conn:
            self.counters["late_responses"] += 1
            return  # timed out, or the requester left: nobody waits for it
        self._finish(bid)  # type: ignore[arg-type]
        error = header.get("error")
        if error is not None:
            if not isinstance(error, dict):
                error = {"type": "remote", "message": str(error)[:1000]}
            kind = error.get("type")
            if kind not in ERROR_TYPES:
                kind = "remote"
            fields = {
                k: v
                for k, v in error.items()
                if k in ("message", "remote_type", "traceback") and isinstance(v, str)
            }
            fields.setdefault("message", "")
            self.send(
                p.requester, {"op": "error", "id": p.client_id, "error": {"type": kind, **fields}}
            )
            return
        codec = header.get("codec", "bytes")
        if codec not in CODECS:
            self._error(
                p.requester, p.client_id, "remote", f"the server answered with codec {codec!r}"
            )
            return
        if codec == "pickle" and not (conn.trusted and p.requester.trusted):
            self._error(
                p.requester,
                p.client_id,
                "remote",
                "the server answered in pickle, refused across uids",
            )
            return
        out: dict[str, Any] = {
            "op": "response",
            "id": p.client_id,
            "codec": codec,
            "sender_pid": conn.peer.pid,  # the server's, as the kernel gave it
        }
        shm = self._take_shm(frame, out)
        self.send(p.requester, out, frame.payload, shm)

    # -- queues, stats ---------------------------------------------------------

    def op_queue(self, conn: Conn, frame: Frame) -> None:
        self.queues.handle(conn, frame)

    def op_stats(self, conn: Conn, frame: Frame) -> None:
        rid = _int(frame.header, "id")
        if not conn.trusted:
            # pids, names and topics of everyone's traffic: the owner's business only
            self.audit.write(conn.peer, "stats", "denied (not the owner or root)")
            raise BadRequest("denied", f"uid {conn.peer.uid} may not read the broker's stats")
        full = self.stats()
        payload = json.dumps(full).encode()
        self.send(conn, {"op": "ok", "id": rid, "codec": "json", "stats": cap_stats(full)}, payload)

    def stats(self) -> dict[str, Any]:
        """The figures of ``stats`` (and ``ikosctl status``)."""
        clients = [c for c in self.conns.values() if c.hello]
        return {
            "broker_pid": os.getpid(),
            "clients": len(clients),
            "connections": len(self.conns),
            "subscriptions": len(self.index),
            "patterns": self.index.patterns,
            "served": sorted(self.servers),
            "pending_requests": len(self.pending),
            "counters": dict(self.counters),
            "topics": {t: vars_of(s) for t, s in self.topics.items()},
            "subscribers": [
                {
                    "client": c.number,
                    "name": c.name,
                    "pid": c.peer.pid,
                    "uid": c.peer.uid,
                    "patterns": sorted(c.subs),
                    "queued": len(c.dlv),
                    "queued_bytes": c.dlv_bytes,
                    "delivered": c.delivered,
                    "dropped": c.dropped,
                }
                for c in clients
                if c.subs or c.dropped or c.delivered
            ],
            "queues": self.queues.infos(),
        }

    _ops: dict[str, Callable[[Broker, Conn, Frame], None]] = {}


#: Entries of each list or map kept in the ``stats`` of an answer's header.
STATS_HEADER_ENTRIES = 50


def cap_stats(full: dict[str, Any]) -> dict[str, Any]:
    """``full`` cut to fit a frame header: the busiest entries of each list and map.

    The whole document travels as the answer's JSON payload; the header keeps the
    totals and the entries an operator looks at first (most dropped, most published),
    with ``"truncated": true`` when anything was left out.
    """
    n = STATS_HEADER_ENTRIES
    out = dict(full)
    subs = sorted(full["subscribers"], key=lambda s: (-s["dropped"], -s["queued"], s["client"]))
    topics = sorted(full["topics"].items(), key=lambda kv: -kv[1]["published"])
    patterns = sorted(full["patterns"].items(), key=lambda kv: -kv[1])
    out["subscribers"] = subs[:n]
    out["topics"] = dict(topics[:n])
    out["patterns"] = dict(patterns[:n])
    out["served"] = full["served"][:n]
    out["queues"] = full["queues"][:n]
    out["truncated"] = any(
        len(out[k]) < len(full[k])
        for k in ("subscribers", "topics", "patterns", "served", "queues")
    )
    if len(dumps_header(out)) > MAX_HEADER // 2:  # long names: keep the totals only
        for key in ("subscribers", "topics", "patterns", "served", "queues"):
            out[key] = type(full[key])()
        out["truncated"] = True
    return out


def vars_of(stats: TopicStats) -> dict[str, int]:
    return {
        "published": stats.published,
        "delivered": stats.delivered,
        "dropped": stats.dropped,
        "undeliverable": stats.undeliverable,
    }


Broker._ops = {
    "publish": Broker.op_publish,
    "subscribe": Broker.op_subscribe,
    "unsubscribe": Broker.op_unsubscribe,
    "serve": Broker.op_serve,
    "unserve": Broker.op_unserve,
    "request": Broker.op_request,
    "notify": Broker.op_notify,
    "response": Broker.op_response,
    "put": Broker.op_queue,
    "get": Broker.op_queue,
    "ack": Broker.op_queue,
    "nack": Broker.op_queue,
    "queues": Broker.op_queue,
    "dead": Broker.op_queue,
    "stats": Broker.op_stats,
}


# -- actors --------------------------------------------------------------------------


class ActorCalls:
    """Requests to the instance's actors, made with ``ActorRef`` in a bounded thread pool.

    Calls from one connection to one actor run one after the other, in the order
    they came (a chain per (connection, actor)); chains run in parallel on
    :data:`ACTOR_WORKERS` threads. Results come back to the loop thread.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._pool: ThreadPoolExecutor | None = None
        self._chains: dict[tuple[int, str], deque[Callable[[], None]]] = {}

    def submit(
        self,
        conn: Conn,
        rid: int,
        name: str,
        frame: Frame,
        codec: str,
        timeout: float,
        one_way: bool,
    ) -> None:
        payload: bytes | memoryview = frame.payload
        if frame.fd is not None:
            payload = _read_segment(frame.fd, int(frame.header["shm"]))
        key = (conn.number, name)
        if not one_way:
            conn.outstanding += 1
        root = self.broker.paths.root

        def call() -> None:
            result = _call_actor(root, name, payload, codec, timeout, one_way)
            self.broker.loop.call_soon_threadsafe(self._done, conn, rid, key, result, one_way)

        chain = self._chains.get(key)
        if chain is not None:
            chain.append(call)
            return
        self._chains[key] = deque()
        self._run(call)

    def _run(self, call: Callable[[], None]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(ACTOR_WORKERS, thread_name_prefix="actor-call")
        self._pool.submit(call)

    def _done(
        self,
        conn: Conn,
        rid: int,
        key: tuple[int, str],
        result: tuple[dict[str, Any], bytes],
        one_way: bool,
    ) -> None:
        chain = self._chains.get(key)
        if chain:
            self._run(chain.popleft())
        else:
            self._chains.pop(key, None)
        if one_way or conn.closed:
            return
        conn.outstanding -= 1
        header, payload = result
        header["id"] = rid
        self.broker.send(conn, header, payload)

    def forget(self, conn: Conn) -> None:
        """Drop the calls of a closed connection not yet started."""
        for key, chain in self._chains.items():
            if key[0] == conn.number:
                chain.clear()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _read_segment(fd: int, size: int) -> bytes:
    return os.pread(fd, size, 0) if size else b""


def _call_actor(
    root: Path | None,
    name: str,
    payload: bytes | memoryview,
    codec: str,
    timeout: float,
    one_way: bool,
) -> tuple[dict[str, Any], bytes]:
    """Ask (or tell) actor ``name``: ``(answer header, payload)``, in a worker thread."""
    from ikos._codec import decode, encode
    from ikos._errors import (
        ActorCrashed,
        ActorDeadError,
        AskTimeout,
        MailboxFull,
        MessageTooLarge,
    )
    from ikos.actors._ref import ActorRef

    def error(kind: str, message: str, **extra: str) -> tuple[dict[str, Any], bytes]:
        return {"op": "error", "error": {"type": kind, "message": message, **extra}}, b""

    try:
        if codec == "json":
            message: Any = json.loads(bytes(payload))
        elif codec == "pickle":
            message = decode(payload)  # trusted callers only (checked by _codec)
        else:
            message = bytes(payload)
    except Exception as exc:
        return error("bad_request", f"the payload is not valid {codec}: {exc}")
    ref = ActorRef(name, root=root)
    try:
        if one_way:
            ref.tell(message, timeout=timeout)
            return {"op": "ok"}, b""
        reply = ref.ask(message, timeout=timeout)
    except ActorCrashed as exc:
        return error("remote", exc.message, remote_type=exc.exc_type, traceback=exc.traceback)
    except AskTimeout:
        return error("timeout", f"actor {name!r} did not answer within {timeout:g} s")
    except ActorDeadError as exc:
        return error("unavailable", f"actor {name!r}: {exc}")
    except MailboxFull:
        return error("full", f"the mailbox of actor {name!r} is full")
    except MessageTooLarge as exc:
        return error("too_large", exc.message)
    except Exception as exc:
        return error("unavailable", f"calling actor {name!r} failed: {exc!r}")
    try:
        if codec == "json":
            data = json.dumps(reply).encode()
        elif codec == "pickle":
            data = encode(reply)
        elif isinstance(reply, (bytes, bytearray, memoryview)):
            data = bytes(reply)
        else:
            return error(
                "remote", f"the reply cannot be represented as bytes: {type(reply).__name__}"
            )
    except (TypeError, ValueError) as exc:
        return error("remote", f"the reply cannot be represented in JSON: {exc}")
    return {"op": "response", "codec": codec}, data


# -- durable queues ------------------------------------------------------------------


#: The consumer of detached leases (see :meth:`QueueOps._consumer`).
DETACHED_LEASE = "detached"


class QueueOps:
    """The queue ops of the wire on the durable :class:`~ikos.ipc._queues.QueueStore`.

    Each op runs as a task on the loop (a put waits for its group commit, a get for a
    message) and answers when done, so one connection may have many in flight, up to
    :data:`MAX_OUTSTANDING`. The consumer of a lease is the connection's number: when
    the connection closes its tasks are cancelled and its leases returned at once
    (``consumer_gone``). A store that cannot be opened leaves the broker serving
    everything else, queue ops answering ``unavailable``.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.store: QueueStore | None = None
        self.problem = "the queue store is not open"
        self._tasks: dict[int, set[asyncio.Task[None]]] = {}
        self._commits: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        path = self.broker.paths.state_dir / "queues.db"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            store = QueueStore(path, **self._settings())
            await store.open()
        except Exception as exc:  # the broker still serves pub/sub and requests
            self.problem = f"the queue store {path} cannot be opened: {exc}"
            log.error("%s", self.problem)
            return
        if store.damage:
            log.error("%s", store.damage)
        self.store = store

    def _settings(self) -> dict[str, Any]:
        raw = self.broker.config.queues
        return {
            k: raw[k] for k in ("max_deliveries", "visibility_timeout", "max_messages") if k in raw
        }

    def configure(self) -> None:
        """Apply reloaded settings (checked by building a throwaway store with them)."""
        if self.store is None:
            return
        settings = self._settings()
        try:
            QueueStore(self.store.path, **settings)
        except (TypeError, ValueError) as exc:
            log.error("queue settings not applied: %s", exc)
            return
        for key, value in settings.items():
            setattr(self.store, key, float(value) if key == "visibility_timeout" else value)

    def handle(self, conn: Conn, frame: Frame) -> None:
        broker = self.broker
        header = frame.header
        rid = _int(header, "id")
        op = frame.op
        if op == "queues":
            infos = [i for i in self.infos() if broker._may(conn, "queues", i["name"])]
            broker._ok(conn, rid, queues=infos)
            return
        store = self._store()
        queue = header.get("queue")
        try:
            check_queue_name(queue)
        except QueueError as exc:
            raise BadRequest("bad_request", str(exc)) from None
        assert isinstance(queue, str)
        broker._require(conn, "queues", queue, f"use queue {queue!r}")
        if conn.outstanding >= MAX_OUTSTANDING:
            raise BadRequest("full", f"more than {MAX_OUTSTANDING} requests outstanding")
        if op == "put":
            codec = broker._codec(conn, header)
            payload: bytes | memoryview = frame.payload
            if frame.fd is not None:
                payload = _read_segment(frame.fd, int(header["shm"]))
            self._start(conn, rid, self._put(conn, rid, store, queue, payload, codec), commits=True)
        elif op == "get":
            timeout = header.get("timeout", 0)
            if (
                not isinstance(timeout, (int, float))
                or isinstance(timeout, bool)
                or not 0 <= timeout <= MAX_TIMEOUT
            ):
                raise BadRequest(
                    "bad_request", f'"timeout" must be seconds in [0, {MAX_TIMEOUT:g}]'
                )
            consumer = self._consumer(conn, header)
            self._start(conn, rid, self._get(conn, rid, store, queue, float(timeout), consumer))
        elif op in ("ack", "nack"):
            msg = _int(header, "msg")
            delay = header.get("delay", 0)
            if op == "nack" and (
                not isinstance(delay, (int, float))
                or isinstance(delay, bool)
                or not 0 <= delay <= MAX_TIMEOUT
            ):
                raise BadRequest("bad_request", f'"delay" must be seconds in [0, {MAX_TIMEOUT:g}]')
            consumer = self._consumer(conn, header)
            done = (
                store.ack(queue, msg, consumer)
                if op == "ack"
                else store.nack(queue, msg, consumer, float(delay))
            )
            self._start(conn, rid, self._answer_ok(conn, rid, done), commits=True)
        else:  # dead
            limit = header.get("limit", 100)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 1000:
                raise BadRequest("bad_request", '"limit" must be an integer in [0, 1000]')
            self._start(conn, rid, self._dead(conn, rid, store, queue, limit))

    def _store(self) -> QueueStore:
        if self.store is None:
            raise BadRequest("unavailable", self.problem)
        return self.store

    def _start(self, conn: Conn, rid: int, work: Any, *, commits: bool = False) -> None:
        conn.outstanding += 1
        task = self.broker.loop.create_task(self._guard(conn, rid, work))
        tasks = self._tasks.setdefault(conn.number, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if commits:
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)

    async def finish_commits(self, timeout: float) -> None:
        """Wait (a while) for the puts, acks and nacks under way, so that their answers go out."""
        if self._commits:
            await asyncio.wait(set(self._commits), timeout=timeout)

    async def _guard(self, conn: Conn, rid: int, work: Any) -> None:
        """Run one op; its store error becomes the error answer, any bug an ``unavailable``."""
        try:
            await work
        except QueueError as exc:
            self.broker._error(conn, rid, exc.error_type, str(exc))
        except BadRequest as exc:
            self.broker._error(conn, rid, exc.kind, exc.message, **exc.extra)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("queue op of %r failed", conn)
            self.broker._error(conn, rid, "unavailable", f"the queue op failed: {exc!r}")
        finally:
            conn.outstanding -= 1

    async def _answer_ok(self, conn: Conn, rid: int, done: Any) -> None:
        await done
        self.broker._ok(conn, rid)

    async def _put(
        self,
        conn: Conn,
        rid: int,
        store: QueueStore,
        queue: str,
        payload: bytes | memoryview,
        codec: str,
    ) -> None:
        msg_id = await store.put(queue, payload, codec)
        self.broker._ok(conn, rid, msg=msg_id)  # only now: the transaction is on disk

    def _consumer(self, conn: Conn, header: dict[str, Any]) -> Any:
        """Who a lease belongs to: the connection, or with ``"detach": true`` no connection.

        A detached lease (``ikosctl queue get``, whose process ends at once) outlives
        the connection that took it: it ends by an ack or nack with ``detach`` from
        any connection of the owner or root, or by the visibility timeout.
        """
        if header.get("detach") is True:
            if not conn.trusted:
                raise BadRequest("denied", "only the instance's owner and root detach leases")
            return DETACHED_LEASE
        return conn.number

    async def _get(
        self, conn: Conn, rid: int, store: QueueStore, queue: str, timeout: float, consumer: Any
    ) -> None:
        message = await store.get(queue, consumer, timeout)
        if message is None:
            self.broker.send(conn, {"op": "empty", "id": rid, "queue": queue})
            return
        if conn.closed:  # gone while the message was read: give it back
            if consumer == DETACHED_LEASE:
                await store.nack(queue, message.id, consumer)
            else:
                store.consumer_gone(conn.number)
            return
        if message.codec == "pickle" and not conn.trusted:
            await store.nack(queue, message.id, consumer)
            raise BadRequest(
                "denied",
                f"message {message.id} of queue {queue!r} is a pickle, "
                f"which uid {conn.peer.uid} may not receive",
            )
        header: dict[str, Any] = {
            "op": "message",
            "id": rid,
            "queue": queue,
            "msg": message.id,
            "deliveries": message.deliveries,
            "codec": message.codec,
            "enqueued_at": message.enqueued_at,
        }
        payload = message.payload
        shm = None
        if len(payload) >= self.broker.config.shm_threshold:
            shm = SharedFd(create_segment(payload))
            header["shm"] = len(payload)
            payload = b""
        self.broker.send(conn, header, payload, shm)

    async def _dead(self, conn: Conn, rid: int, store: QueueStore, queue: str, limit: int) -> None:
        messages = await store.dead(queue, limit)
        out = []
        budget = MAX_HEADER // 2
        for m in messages:
            entry = {
                "msg": m.id,
                "deliveries": m.deliveries,
                "codec": m.codec,
                "data": _data_of(m.codec, m.payload, conn.trusted),
            }
            budget -= len(dumps_header(entry))
            if budget < 0:
                break  # the answer is one header: the oldest that fit, ask again after requeueing
            out.append(entry)
        self.broker._ok(conn, rid, queue=queue, messages=out, truncated=len(out) < len(messages))

    def consumer_gone(self, conn: Conn) -> None:
        for task in self._tasks.pop(conn.number, ()):
            task.cancel()
        if self.store is not None:
            self.store.consumer_gone(conn.number)

    def infos(self) -> list[dict[str, Any]]:
        if self.store is None:
            return []
        return [
            {
                "name": i.name,
                "ready": i.ready,
                "delayed": i.delayed,
                "leased": i.leased,
                "dead": i.dead,
                "puts": i.puts,
                "acks": i.acks,
                "redeliveries": i.redeliveries,
                "dead_lettered": i.dead_lettered,
                "bytes": i.bytes,
            }
            for i in self.store.queues()
        ]

    async def close(self) -> None:
        for tasks in self._tasks.values():
            for task in tasks:
                task.cancel()
        self._tasks.clear()
        if self.store is not None:
            await self.store.close()  # pending commits finished first
            self.store = None


def _data_of(codec: str, payload: bytes, trusted: bool) -> Any:
    """A dead letter's payload as JSON: the value for json, else base64 (no pickle to others)."""
    if codec == "json":
        try:
            return json.loads(payload)
        except ValueError:
            pass
    if codec == "pickle" and not trusted:
        return None
    return base64.b64encode(payload).decode()


# -- the process ---------------------------------------------------------------------


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: one descriptor per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """``python -m ikos.ipc._broker [--root ROOT]``."""
    parser = argparse.ArgumentParser(prog="ikos-broker", description="the ikos IPC broker")
    parser.add_argument(
        "--root", help="the instance root (default: $IKOS_ROOT, else the default instance)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    raise_fd_limit()
    paths = InstancePaths.resolve(args.root)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        broker = Broker(paths)
    except ConfigProblem as exc:
        print(f"ikos-broker: {exc}", file=sys.stderr)
        return 2
    try:
        loop.run_until_complete(broker.run())
    except OSError as exc:
        print(f"ikos-broker: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
