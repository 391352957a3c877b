"""The sd_notify protocol: the manager's socket and the daemon's side.

Daemons written for systemd report readiness and status by sending
datagrams of newline-separated ``KEY=VALUE`` lines (``READY=1``,
``STATUS=...``, ``MAINPID=...``, ``WATCHDOG=1``, ``RELOADING=1``,
``STOPPING=1``, ``EXTEND_TIMEOUT_USEC=...``) to the ``AF_UNIX`` datagram
socket named by ``$NOTIFY_SOCKET``. :class:`NotifySocket` is the manager's
end: one socket per instance, ``SO_PASSCRED`` on, so that every datagram
arrives with the sender's PID, UID and GID as vouched for by the kernel;
the manager attributes a message to a daemon by that PID, never by what the
message says. :func:`notify` is the daemon's end (``sd_notify(3)``).

Main design choice: one shared socket, as systemd's ``/run/systemd/notify``,
rather than one socket per daemon. Per-daemon sockets would attribute
messages by socket instead of by credentials, but they cost a descriptor
and a loop registration per daemon and still need credentials to reject a
grandchild that inherited the variable. Everything a sender controls is
bounded: datagrams above 4096 bytes, malformed ones, ones without
credentials or with descriptors attached are dropped and counted (the
descriptors closed; ``BARRIER=1`` is answered by that very close), and a
flood cannot starve the event loop because each :meth:`NotifySocket.recv`
skips at most ``max_skip`` bad datagrams.

Every sender is rate-limited before its datagram is parsed: a token bucket
per uid and one per pid (:class:`SenderLimits`). A datagram over either
budget costs one ``recvmsg`` and a look at its credentials, nothing more; it
is counted, and the count is logged once per window, so a flood from another
user can neither make the manager parse nor make it log at the flood's rate,
while the daemons keep their own budgets.

The credentials are the kernel's, with one caveat: a sender with
CAP_SYS_ADMIN may present another PID's (``systemd-notify --pid`` as root
does), so they prove who sent only for unprivileged daemons.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import re
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from ikos.platform._unix import short_path

log = logging.getLogger("ikos.notify")

#: The largest notification accepted, as systemd's limit.
MAX_NOTIFY_BYTES = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_MAX_FDS = 16
_ANCBUF = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(_MAX_FDS * 4)
_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")
#: How often (seconds) the dropped-datagram counts are logged, at most.
LOG_WINDOW = 10.0


class SenderLimits:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """Token buckets of notifications: ``rate`` per second, bursts of ``burst``.

    A daemon sends a handful of notifications in its life plus one
    ``WATCHDOG=1`` every few seconds; the defaults leave room for chatty
    ``STATUS=`` updates and for many daemons of one user, and stop a flood.
    Root and the manager's own user are not limited (``exempt_uids``, by
    default those two): what the limits guard against is *another* user's
    flood, and a daemon of the instance's owner that reports ``READY=1``
    after a burst of ``STATUS=`` lines must not lose it. Never changed, compared or
    hashed.
    """

    __slots__ = ("exempt_uids", "max_tracked", "pid_burst", "pid_rate", "uid_burst", "uid_rate")

    def __init__(
        self,
        pid_rate: float = 100.0,
        pid_burst: float = 200.0,
        uid_rate: float = 1000.0,
        uid_burst: float = 2000.0,
        max_tracked: int = 4096,
        exempt_uids: frozenset[int] = frozenset({0, os.getuid()}),
    ) -> None:
        self.pid_rate = pid_rate
        self.pid_burst = pid_burst
        self.uid_rate = uid_rate
        self.uid_burst = uid_burst
        #: Senders tracked at once; past it the idle buckets are forgotten (a full one is idle).
        self.max_tracked = max_tracked
        self.exempt_uids = exempt_uids


class _Buckets:
    """Token buckets by key (a pid or a uid), refilled by elapsed time."""

    def __init__(self, rate: float, burst: float, max_tracked: int) -> None:
        self.rate, self.burst, self.max_tracked = rate, burst, max_tracked
        self._state: dict[int, tuple[float, float]] = {}  # key: tokens, at

    def has(self, key: int, now: float) -> bool:
        """Whether ``key`` has a token now (without taking it)."""
        tokens, at = self._state.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate) >= 1.0

    def take(self, key: int, now: float) -> None:
        tokens, at = self._state.get(key, (self.burst, now))
        self._state[key] = (min(self.burst, tokens + (now - at) * self.rate) - 1.0, now)
        if len(self._state) > self.max_tracked:
            full = self.burst / self.rate  # seconds for an empty bucket to refill
            self._state = {k: v for k, v in self._state.items() if now - v[1] < full}
            if len(self._state) > self.max_tracked:  # a fork bomb of senders: start afresh
                self._state = {key: self._state[key]}


@dataclass(frozen=True, eq=True)
class NotifyMessage:
    """One notification: the sender's credentials (from the kernel) and its fields."""

    pid: int
    uid: int
    gid: int
    fields: dict[str, str]


def parse_notify(data: bytes) -> dict[str, str]:
    """Parse one sd_notify datagram into its fields; raise ValueError with the reason.

    >>> parse_notify(b"READY=1\\nSTATUS=serving\\n")
    {'READY': '1', 'STATUS': 'serving'}
    """
    if len(data) > MAX_NOTIFY_BYTES:
        raise ValueError(f"{len(data)} bytes, more than {MAX_NOTIFY_BYTES}")
    if b"\0" in data:
        raise ValueError("contains a NUL byte")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None
    fields: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"line {lineno} has no '=': {line[:40]!r}")
        if not _KEY_RE.match(key):
            raise ValueError(f"line {lineno}: invalid key {key[:40]!r}")
        fields[key] = value
    if not fields:
        raise ValueError("no KEY=VALUE line")
    return fields


def main_pid(
    fields: dict[str, str], *, owner_pgid: int, owner_pids: frozenset[int] = frozenset()
) -> int | None:
    """The ``MAINPID=`` of a message, checked; None if absent; ValueError if refused.

    Refused: anything but a positive decimal, PID 1, a PID that is not
    running, and a PID outside the process group/session ``owner_pgid``
    (the daemon's, which ikos created with ``setsid``) unless it is in
    ``owner_pids`` (e.g. the daemon's cgroup).
    """
    text = fields.get("MAINPID")
    if text is None:
        return None
    if not text.isdigit() or len(text) > 10 or int(text) <= 0:
        raise ValueError(f"MAINPID={text[:20]!r} is not a PID")
    pid = int(text)
    if pid == 1:
        raise ValueError("MAINPID=1 (init) is never a daemon's main process")
    if pid in owner_pids:
        return pid
    try:
        if owner_pgid in (os.getpgid(pid), os.getsid(pid)):
            return pid
    except ProcessLookupError:
        raise ValueError(f"MAINPID={pid} is not running") from None
    raise ValueError(f"MAINPID={pid} is outside the daemon's process group {owner_pgid}")


@contextlib.contextmanager
def _sockaddr(address: str) -> Iterator[str]:
    """A ``sun_path`` for ``address``: ``@name`` is abstract; long paths go through /proc."""
    if address.startswith("@"):
        yield "\0" + address[1:]
        return
    with short_path(address) as path:
        yield path


class NotifySocket:
    """The manager's notify socket at ``address`` (a path, or ``@name`` for abstract).

    Non-blocking; register :meth:`fileno` with the event loop and call
    :meth:`recv` (or :meth:`drain`) when it is readable. The socket file is
    made writable by every user (``mode``), since daemons may run as other
    users; the kernel's credentials, not the file mode, say who sent what.

    Example::

        sock = NotifySocket(paths.run_dir / "notify.sock")
        loop.add_reader(sock.fileno(), on_notify)
        ...
        msg = sock.recv()   # NotifyMessage(pid=4242, uid=33, gid=33, fields={'READY': '1'})
    """

    def __init__(
        self,
        address: str | os.PathLike[str],
        *,
        mode: int = 0o666,
        max_skip: int = 64,
        limits: SenderLimits | None = None,
    ) -> None:
        self.address = os.fspath(address)
        self.max_skip = max_skip
        self.limits = limits if limits is not None else SenderLimits()
        #: Datagrams dropped since creation (oversized, malformed, no credentials, fds,
        #: over a sender's rate limit).
        self.dropped = 0
        #: Of which over a sender's rate limit, by uid.
        self.rate_limited: Counter[int] = Counter()
        self._pids = _Buckets(self.limits.pid_rate, self.limits.pid_burst, self.limits.max_tracked)
        self._uids = _Buckets(self.limits.uid_rate, self.limits.uid_burst, self.limits.max_tracked)
        self._limited_window = 0.0
        self._limited_now: Counter[int] = Counter()
        self._log_window = 0.0
        self._logged = 0
        self._suppressed = 0
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if not self.address.startswith("@"):
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(self.address).st_mode):
                        os.unlink(self.address)  # left by a previous manager
            with _sockaddr(self.address) as sun_path:
                sock.bind(sun_path)
            if not self.address.startswith("@"):
                os.chmod(self.address, mode)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

    def fileno(self) -> int:
        """The socket's descriptor, for the event loop."""
        if self._sock is None:
            raise ValueError("notify socket is closed")
        return self._sock.fileno()

    def recv(self) -> NotifyMessage | None:
        """The next valid notification waiting, or None if none is waiting now.

        Invalid datagrams are dropped, counted in :attr:`dropped` and logged
        (rate-limited); at most ``max_skip`` of them are consumed per call,
        after which None is returned even if more wait (the socket stays
        readable, so the event loop calls again).
        """
        if self._sock is None:
            raise ValueError("notify socket is closed")
        for _ in range(self.max_skip + 1):
            try:
                data, ancdata, flags, _addr = self._sock.recvmsg(MAX_NOTIFY_BYTES + 1, _ANCBUF)
            except (BlockingIOError, InterruptedError):
                return None
            creds: tuple[int, int, int] | None = None
            fds = 0
            for level, kind, payload in ancdata:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid, uid, gid = _UCRED.unpack_from(payload)
                    creds = (pid, uid, gid)
                elif kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    for fd in received:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    fds += len(received)
            if creds is not None and creds[0] > 0 and not self._within_limits(creds[0], creds[1]):
                continue  # before anything else is looked at: a flood costs this much only
            sender = f"PID {creds[0]}" if creds else "an unknown sender"
            if flags & socket.MSG_TRUNC or len(data) > MAX_NOTIFY_BYTES:
                self._drop(f"oversized datagram from {sender} (more than {MAX_NOTIFY_BYTES} bytes)")
                continue
            if fds and not flags & socket.MSG_CTRUNC and fds == 1 and data.strip() == b"BARRIER=1":
                # sd_notify_barrier(3): closing the descriptor (done above) is
                # the answer, and tells the sender that everything it sent
                # before has been read. systemd-notify --ready waits for it.
                continue
            if flags & socket.MSG_CTRUNC or fds:
                self._drop(f"datagram from {sender} carried file descriptors (not supported)")
                continue
            if creds is None or creds[0] <= 0:
                self._drop("datagram without sender credentials (or from another PID namespace)")
                continue
            try:
                fields = parse_notify(data)
            except ValueError as exc:
                self._drop(f"malformed datagram from {sender}: {exc}")
                continue
            return NotifyMessage(creds[0], creds[1], creds[2], fields)
        return None

    def drain(self, limit: int = 1024) -> list[NotifyMessage]:
        """Up to ``limit`` valid notifications waiting now (see :meth:`recv`)."""
        out: list[NotifyMessage] = []
        while len(out) < limit:
            msg = self.recv()
            if msg is None:
                break
            out.append(msg)
        return out

    def _within_limits(self, pid: int, uid: int) -> bool:
        """Take a token of ``pid`` and of ``uid``; False (counted, logged per window) if none."""
        now = time.monotonic()
        if now - self._limited_window >= LOG_WINDOW:
            for who, count in self._limited_now.items():
                log.warning(
                    "notify socket: dropped %d datagrams of uid %d over its rate limit in %gs",
                    count,
                    who,
                    LOG_WINDOW,
                )
            self._limited_window = now
            self._limited_now.clear()
        if uid in self.limits.exempt_uids:
            return True
        if self._pids.has(pid, now) and self._uids.has(uid, now):
            self._pids.take(pid, now)
            self._uids.take(uid, now)
            return True
        self.dropped += 1
        self.rate_limited[uid] += 1
        if not self._limited_now[uid]:
            log.warning("notify socket: uid %d (pid %d) is over its rate limit: dropping", uid, pid)
        self._limited_now[uid] += 1
        return False

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._log_window >= 10.0:
            if self._suppressed:
                log.warning("notify socket: %d more datagrams dropped", self._suppressed)
            self._log_window, self._logged, self._suppressed = now, 0, 0
        if self._logged < 10:  # at most 10 lines per 10 s, whatever a flood sends
            self._logged += 1
            log.warning("notify socket: dropped %s", reason)
        else:
            self._suppressed += 1

    def close(self) -> None:
        """Close the socket and remove its file (no-op if already closed)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def notify(fields: str, socket_path: str | None = None, *, timeout: float = 5.0) -> bool:
    """Send ``fields`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the manager, like ``sd_notify(3)``.

    The socket is ``socket_path`` or ``$NOTIFY_SOCKET`` (a path, or
    ``@name`` for an abstract socket). Returns False when there is none
    (not started under a notify-aware manager), True once sent; raises
    ``OSError`` if sending fails and ``ValueError`` for an address that is
    neither a path nor ``@name``.
    """
    address = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if not (address.startswith("/") or address.startswith("@")):
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or @name, got {address!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        with _sockaddr(address) as sun_path:
            sock.sendto(fields.encode("utf-8"), sun_path)
    return True
