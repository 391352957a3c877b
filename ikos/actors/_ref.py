"""ActorRef: how any process talks to an actor, directly over its mailbox socket.

The manager is not on the message path: a reference knows the mailbox
socket from the actor's name, connects once per thread, authenticates, and
then each ``tell`` is one ``sendall`` and each ``ask`` one ``sendall`` plus
the reply's ``recv``. One connection per (thread, actor) keeps per-sender
FIFO order and needs no locks; a pooled connection shared by threads was
rejected because it would need a reply dispatcher on the hot path.

Restarts are transparent where they can be: the manager keeps an actor's
listening socket open while it restarts it, so a reconnect made during the
restart waits in the socket's backlog and is served by the new
incarnation. A broken connection is re-made once per call.

A message (or a reply) that is a bytes-like value of at least the instance's
``shm_threshold`` bytes, or a :class:`~ikos.platform._memfd.SharedBuffer` of any
size, travels as a sealed memfd passed with the frame (SCM_RIGHTS) instead
of through the socket: the receiver gets a read-only ``memoryview`` of the
mapping. So both ends read with ``recvmsg_into``, and a connection keeps the
descriptors it received in a FIFO until the frames that announce them are
complete (the kernel hands a descriptor over with the first byte of its
frame, possibly in a read that also completes earlier frames).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import pickle
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Generic, cast

from ikos._codec import (
    SHM,
    decode,
    decode_out_of_band,
    encode,
    encode_out_of_band,
    out_of_band_size,
)
from ikos._errors import (
    ActorDeadError,
    ActorError,
    AskTimeout,
    AuthenticationError,
    MailboxFull,
    MessageTooLarge,
    MethodRefused,
)
from ikos.actors import _context
from ikos.actors._actor import Actor
from ikos.actors._ray_route import RayPlaced, RayRoute, find_ray_route
from ikos.platform._memfd import (
    ANCILLARY_SIZE,
    MAX_PENDING_FDS,
    MSG_CTRUNC,
    RECV_FLAGS,
    SharedBuffer,
    close_all,
    create_segment,
    fds_of,
    map_segment,
    segment_of,
    send_with_fds,
)
from ikos.platform._unix import connect_unix
from ikos.platform._wire import HEADER, client_handshake

if TYPE_CHECKING:
    # PEP 696's default: a bare ``ActorRef`` (``ActorRef("echo")``) is ``ActorRef[Any]``,
    # whose proxy is untyped; ``ActorRef[Counter]`` types ``proxy()`` as a Counter.
    from typing_extensions import TypeVar

    A = TypeVar("A", bound=Actor, default=Any)
else:
    from typing import TypeVar

    A = TypeVar("A", bound=Actor)

log = logging.getLogger("ikos.actors")

TELL, ASK, REPLY_OK, REPLY_ERR = 0, 1, 2, 3
#: A proxy's method call: an ask whose payload is ``(method, args, kwargs)``, which the
#: runtime turns into a :class:`~ikos.actors._call.MethodCall`. A plain tuple pickles
#: in a fraction of the time a class instance takes (the class's import check on
#: both ends), which is what keeps a proxy call as fast as an ask.
CALL = 4
DEFAULT_ASK_TIMEOUT = 5.0
DEFAULT_SEND_TIMEOUT = 5.0

_dead_letters = 0
_dead_lock = threading.Lock()


def dead_letter_count() -> int:
    """Dead letters this process recorded (messages to actors that were not there)."""
    return _dead_letters


def _record_dead_letter(ctx: _context.InstanceContext, name: str, reason: str) -> None:
    global _dead_letters
    with _dead_lock:
        _dead_letters += 1
    log.warning("dead letter to actor '%s': %s", name, reason)
    try:
        from ikos.platform._control import ControlClient

        # the reference's own instance: it may not be this process's default one
        with ControlClient(ctx.paths, timeout=1.0) as client:
            client.call("dead_letter", {"name": name, "reason": reason})
    except Exception:  # best effort: counting must never break the sender
        pass


_TIMEVAL = struct.Struct("@ll")

#: The classes of payload that may go by shared memory (checked before anything else,
#: so that every other message pays one set lookup for the feature).
SHM_TYPES = frozenset({bytes, bytearray, memoryview, SharedBuffer})


def by_shm(message: Any, threshold: int) -> bool:
    """Whether ``message`` (of a class in :data:`SHM_TYPES`) travels in a memfd."""
    if message.__class__ is memoryview:
        if not message.c_contiguous:
            return False  # cannot be encoded anyway: left to the ordinary error
        return message.nbytes >= threshold or segment_of(message) is not None
    if message.__class__ is SharedBuffer:
        return True  # any size: it was made to be sent without a copy
    return len(message) >= threshold


def encode_shm(kind: int, corr: int, message: Any) -> tuple[bytes, int, bool]:
    """``(body, fd, owned)`` for a frame whose payload goes in a memfd.

    A :class:`SharedBuffer`, or a whole received view of one, is passed by its own
    descriptor (``owned`` False: the caller must not close it); anything else is
    copied once into a new sealed memfd that the caller closes once sent.
    """
    body, raw = encode_out_of_band((kind, corr, pickle.PickleBuffer(message)))
    segment = segment_of(message)
    if segment is not None:
        return body, segment.fd, False
    return body, create_segment(raw), True


class ShmProtocolError(ValueError):
    """A peer's frames and descriptors do not match (or a descriptor is not a sealed memfd)."""


def decode_shm(body: bytes, fds: deque[int]) -> Any:
    """Decode an ``m`` frame with the oldest pending descriptor (consumed);
    :class:`ShmProtocolError` when there is none or it is not a fitting segment."""
    if not fds:
        raise ShmProtocolError("a frame announced a shared-memory segment but no descriptor came")
    try:
        view = map_segment(fds.popleft(), out_of_band_size(body))
    except ValueError as exc:
        raise ShmProtocolError(str(exc)) from None
    return decode_out_of_band(body, view)


def take_fds(fds: deque[int], received: Any) -> None:
    """Queue descriptors just received; :class:`ShmProtocolError` past the bound."""
    fds.extend(received)
    if len(fds) > MAX_PENDING_FDS:
        raise ShmProtocolError(f"more than {MAX_PENDING_FDS} descriptors without their frames")


class _Connection:
    """One authenticated mailbox connection, in blocking mode with kernel timeouts.

    Timeouts are SO_RCVTIMEO/SO_SNDTIMEO rather than Python's socket timeout,
    which would add a poll() before every send and recv; they are only
    re-set when the wanted timeout changes, so the hot path is one
    ``sendall`` and one ``recv_into``.
    """

    __slots__ = (
        "buf",
        "bufs",
        "fds",
        "ids",
        "max_frame",
        "rcv",
        "scratch",
        "snd",
        "sock",
        "view",
    )

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        sock.settimeout(None)
        self.sock = sock
        self.max_frame = max_frame  # the actor's limit, announced in the handshake
        self.buf = bytearray()
        self.fds: deque[int] = deque()  # received, not yet taken by their frame
        self.ids = itertools.count(1)
        self.rcv = self.snd = -1.0
        # recv_into a reused 64 KiB buffer: a fresh bytes object per recv would cost
        # an allocation per message; a larger buffer would cost every idle actor
        # (each holds one per connection) its pages.
        self.scratch = bytearray(65536)
        self.view = memoryview(self.scratch)
        self.bufs = (self.scratch,)  # recvmsg_into's argument, made once

    def close(self) -> None:
        close_all(self.fds)
        try:
            self.sock.close()
        except OSError:
            pass

    # A thread's pool dies with the thread, and the user has no handle on pooled
    # connections: close them here rather than leave a ResourceWarning to the GC.
    __del__ = close

    def _timeout(self, option: int, seconds: float) -> None:
        seconds = max(seconds, 0.001)
        sec = int(seconds)
        self.sock.setsockopt(
            socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, int((seconds - sec) * 1e6))
        )

    def send(self, packet: bytes, timeout: float, fd: int = -1) -> None:
        """Send a whole frame (with ``fd`` attached when >= 0); TimeoutError when the
        peer's buffer stays full."""
        if timeout != self.snd:
            self._timeout(socket.SO_SNDTIMEO, timeout)
            self.snd = timeout
        try:
            if fd < 0:
                self.sock.sendall(packet)
                return
            sent = send_with_fds(self.sock, packet, [fd])
            if sent < len(packet):
                self.sock.sendall(memoryview(packet)[sent:])
        except BlockingIOError:
            raise TimeoutError

    def read_frame(self, deadline: float) -> bytes | None:
        """The next frame's bytes, or None on EOF; TimeoutError past the deadline."""
        buf = self.buf
        while True:
            if len(buf) >= 4:
                (n,) = HEADER.unpack_from(buf)
                if len(buf) >= 4 + n:
                    data = bytes(buf[4 : 4 + n])
                    del buf[: 4 + n]
                    return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not (remaining * 0.5 <= self.rcv <= remaining):
                self._timeout(socket.SO_RCVTIMEO, remaining)
                self.rcv = remaining
            try:
                got, anc, flags, _ = self.sock.recvmsg_into(self.bufs, ANCILLARY_SIZE, RECV_FLAGS)
            except BlockingIOError:
                raise TimeoutError
            if anc or flags & MSG_CTRUNC:
                try:
                    take_fds(self.fds, fds_of(anc, flags))
                except ValueError:  # descriptors truncated: the stream cannot be trusted
                    return None
            if not got:
                return None
            buf += self.view[:got]


class _Pool(threading.local):
    def __init__(self) -> None:
        self.conns: dict[tuple[Any, str], _Connection] = {}


_pool = _Pool()


def _reset_pool() -> None:
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_reset_pool)


class ActorRef(Generic[A]):
    """A reference to an actor by name; picklable, so it can be sent in messages.

    Example::

        echo = ikos.ActorRef("echo")          # in a process of the instance
        echo.tell({"log": "hello"})
        assert echo.ask("ping", timeout=2) == "pong"

    The actor's class, as a type parameter, types its proxy (``A`` is only
    for the type checker; a reference is a name at run time)::

        counter: ikos.ActorRef[Counter] = ikos.ActorRef("counter")
        n: int = counter.proxy().incr(5)      # checked against Counter.incr
    """

    __slots__ = ("_ctx", "_ray", "_root", "name")

    def __init__(self, name: str, *, root: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self._root = os.fspath(root) if root is not None else None
        self._ctx: _context.InstanceContext | None = None
        #: The way to the actor when it runs on Ray (found where no local mailbox listened).
        self._ray: RayRoute | None = None

    def _context(self) -> _context.InstanceContext:
        ctx = self._ctx
        if ctx is None:
            try:
                ctx = self._ctx = _context.get(self._root)
            except AuthenticationError:  # no instance here: a Ray node? (issue 13)
                route = find_ray_route(self._root, self.name, None)
                if route is None:
                    raise
                raise RayPlaced(route) from None
        return ctx

    def __repr__(self) -> str:
        return f"ActorRef({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and (other.name, other._root) == (self.name, self._root)

    # -- proxies, futures and asyncio (the pipelined path: ikos.actors._pipeline) --

    def proxy(self, timeout: float = DEFAULT_ASK_TIMEOUT) -> A:
        """An object whose method calls are asks to the actor's public methods.

        ``ref.proxy().incr(5)`` asks the actor to run ``self.incr(5)`` and
        returns its result; an exception in the method is raised here as
        :class:`ActorCrashed` (remote type and traceback attached) and crashes
        the actor as one in ``receive`` would. Private names, the hooks and
        helpers of :class:`ikos.Actor`, missing methods and attributes that are
        not methods are refused with :class:`MethodRefused` (the actor is not
        affected). Attribute reads are not proxied: expose a method. Each call
        waits at most ``timeout`` seconds (:class:`AskTimeout`). Typed: the
        proxy of an ``ActorRef[Counter]`` is a ``Counter`` for mypy.

        ``p.incr.future(5)`` makes the same call without waiting (a
        :class:`concurrent.futures.Future`, as :meth:`ask_future`).

        Example::

            counter: ikos.ActorRef[Counter] = ikos.ActorRef("counter")
            c = counter.proxy(timeout=2)
            c.incr(5)                         # 5
            c.incr(k=2)                       # 7
        """
        from ikos.actors._proxy import Proxy

        return cast(A, Proxy(self, timeout))

    def future_proxy(self, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        """Like :meth:`proxy`, but every call returns a :class:`concurrent.futures.Future`
        at once (pipelined, as :meth:`ask_future`). Untyped: Python's types cannot say
        "the actor's methods, returning futures".

        Example::

            futures = [counter.future_proxy().incr(i) for i in range(100)]
            total = sum(f.result() for f in futures)
        """
        from ikos.actors._proxy import Proxy

        return Proxy(self, timeout, "future")

    def async_proxy(self, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        """Like :meth:`proxy` for asyncio code: every call is awaited
        (``await ref.async_proxy().incr(5)``), as :meth:`ask_async`. Untyped."""
        from ikos.actors._proxy import Proxy

        return Proxy(self, timeout, "call_async")

    def ask_future(self, message: Any, timeout: float = DEFAULT_ASK_TIMEOUT) -> Future[Any]:
        """Send ``message`` as an ask and return the reply's future without waiting.

        Many asks may be in flight at once: they share one connection per
        process and actor, and one reader thread completes their futures
        (``docs/actors.md``, "Futures and asyncio"). The future's exception is
        what :meth:`ask` would raise (:class:`AskTimeout` once ``timeout``
        seconds passed since this call, :class:`ActorDeadError` when the actor
        dies or restarts with the ask in flight, :class:`ActorCrashed`...);
        this call itself blocks only while the actor's mailbox and the socket
        buffers are full, at most ``timeout``.

        Order: the futures of one thread reach the actor in the order they were
        made, but they do not travel on the thread's ``ask``/``tell``
        connection: a :meth:`tell` made after ``ask_future`` may be handled
        first. Wait for the future first, or send the later message with
        ``ask_future`` too.

        Example::

            futures = [echo.ask_future(i) for i in range(10_000)]
            replies = [f.result() for f in futures]
            concurrent.futures.wait(futures, timeout=5)   # or as_completed
        """
        from ikos.actors._pipeline import submit

        return submit(self, message, timeout)

    async def ask_async(self, message: Any, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        """:meth:`ask` for asyncio code: ``await ref.ask_async(msg)``.

        Pipelined like :meth:`ask_future`, on the running loop's own connection
        to the actor (the loop does the I/O: no thread, no hand-off); many may
        be in flight (``asyncio.gather``). Raises what :meth:`ask` raises.

        Example::

            replies = await asyncio.gather(*(echo.ask_async(i) for i in range(100)))
        """
        from ikos.actors._loop_pipeline import ask_async

        return await ask_async(self, message, timeout)

    def __hash__(self) -> int:
        return hash((self.name, self._root))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_ref, (self.name, self._root))

    # -- connections -------------------------------------------------------

    def _connect(self, deadline: float) -> _Connection:
        ctx = self._context()
        path = ctx.paths.actor_socket(self.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            connect_unix(sock, path)
            max_frame = client_handshake(sock, ctx.secret, max(deadline - time.monotonic(), 0.001))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise self._not_listening(path)
        except TimeoutError:
            sock.close()
            raise
        except (ConnectionResetError, BrokenPipeError):
            sock.close()
            raise ActorDeadError(self.name, "closed the connection during the handshake")
        except AuthenticationError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise self._not_listening(path)
            raise ActorError(self.name, f"cannot connect: {exc}")
        return _Connection(sock, max_frame)

    def _not_listening(self, path: Any) -> Exception:
        """No mailbox at ``path``: the actor may be placed on Ray (``RayPlaced``, which
        ``ask``/``tell``/``_call`` catch), else it is not running."""
        route = find_ray_route(self._root, self.name, path.parent)
        if route is not None:
            return RayPlaced(route)
        return ActorDeadError(self.name, "not running (no mailbox is listening)")

    def _conn(self, deadline: float) -> _Connection:
        key = (self._root, self.name)
        conn = _pool.conns.get(key)
        if conn is None:
            conn = self._connect(deadline)
            _pool.conns[key] = conn
        return conn

    def _drop(self) -> None:
        conn = _pool.conns.pop((self._root, self.name), None)
        if conn is not None:
            conn.close()

    def _send(self, data: bytes, timeout: float, asking: bool = False, fd: int = -1) -> _Connection:
        """Send one frame; reconnect once if the connection broke since last use."""
        ctx = self._context()
        if len(data) > ctx.max_frame:
            raise MessageTooLarge(self.name, len(data), ctx.max_frame)
        packet = HEADER.pack(len(data)) + data
        deadline = time.monotonic() + timeout
        for attempt in (0, 1):
            try:
                conn = self._conn(deadline)
            except TimeoutError:
                # A busy actor takes new connections only between messages. For an
                # ask that is a timeout like any other: callers catch TimeoutError.
                if asking:
                    raise AskTimeout(
                        self.name, f"no reply within {timeout:g} s (the connection was not taken)"
                    )
                raise MailboxFull(self.name, "could not connect before the timeout")
            if len(data) > conn.max_frame:
                raise MessageTooLarge(self.name, len(data), conn.max_frame)
            try:
                conn.send(packet, timeout, fd)
                return conn
            except (BrokenPipeError, ConnectionResetError):
                self._drop()
                if attempt:
                    raise ActorDeadError(self.name, "the connection broke")
            except TimeoutError:
                # part of the frame may be in the socket: the stream is unusable
                self._drop()
                raise MailboxFull(self.name, "mailbox full: the send timed out")
        raise AssertionError("unreachable")

    # -- messaging ---------------------------------------------------------

    def tell(self, message: Any, timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        """Send ``message`` without waiting for an answer.

        Blocks while the actor's mailbox is full, up to ``timeout`` seconds,
        then raises :class:`MailboxFull`. A message to an actor that is not
        running becomes a dead letter: logged and counted, not raised.
        """
        if self._ray is not None:  # placed on Ray: see _via_ray
            self._tell_ray(message, timeout)
            return
        try:
            if message.__class__ in SHM_TYPES and by_shm(message, self._context().shm_threshold):
                self._send_shm(TELL, 0, message, timeout)
                return
            data = encode((TELL, 0, message))
            try:
                self._send(data, timeout)
            except ActorDeadError as exc:
                _record_dead_letter(self._context(), self.name, exc.message)
        except RayPlaced as placed:
            self._ray = placed.route
            self._tell_ray(message, timeout)

    def _tell_ray(self, message: Any, timeout: float) -> None:
        try:
            self._via_ray("tell", message, timeout)
        except ActorDeadError:
            pass  # a dead letter, as a local tell's (counted where the instance is known)

    def _send_shm(self, kind: int, corr: int, message: Any, timeout: float) -> _Connection | None:
        """Send ``message`` in a memfd; the connection (None: a tell became a dead letter)."""
        data, fd, owned = encode_shm(kind, corr, message)
        try:
            return self._send(data, timeout, asking=kind == ASK, fd=fd)
        except ActorDeadError as exc:
            if kind == ASK:
                raise
            _record_dead_letter(self._context(), self.name, exc.message)
            return None
        finally:
            if owned:
                os.close(fd)

    def ask(self, message: Any, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        """Send ``message`` and return the actor's reply (the value ``receive`` returned).

        Raises :class:`AskTimeout` when no reply comes within ``timeout``
        seconds, :class:`ActorDeadError` when the actor is not running or
        stops before answering, and :class:`ActorCrashed` when ``receive``
        raised while handling this message.

        A bytes-like message or reply of at least the shared-memory threshold
        travels in a memfd, and arrives as a read-only ``memoryview``.
        """
        if self._ray is not None:  # placed on Ray: see _via_ray
            return self._via_ray("ask", message, timeout)
        deadline = time.monotonic() + timeout
        key = (self._root, self.name)
        existing = _pool.conns.get(key)
        corr = next(existing.ids) if existing is not None else 1
        try:
            if message.__class__ in SHM_TYPES and by_shm(message, self._context().shm_threshold):
                sent = self._send_shm(ASK, corr, message, timeout)
                assert sent is not None  # an ask raises instead of dead-lettering
                conn = sent
            else:
                conn = self._send(encode((ASK, corr, message)), timeout, asking=True)
        except RayPlaced as placed:  # raised only where no local mailbox listens
            self._ray = placed.route
            return self._via_ray("ask", message, timeout)
        if conn is not existing:
            # a fresh connection numbers from 1: keep the id we sent consistent
            conn.ids = itertools.count(corr + 1)
        kind, value = self._reply(conn, corr, deadline, timeout)
        # raised from this frame, which holds no connection: a caller keeping the
        # exception (and so this frame) must not keep a socket alive with it
        del conn, existing
        if kind == REPLY_OK:
            return value
        raise value

    def _via_ray(self, verb: str, *args: Any) -> Any:
        """``ask``/``tell``/``call`` through this reference's Ray route (issue 13,
        ``ikos/actors/_ray_route.py``). Once a reference found its actor on Ray it goes
        there directly (no local connect tried first); after a dead-actor error it looks
        again, local mailbox first, so an actor moved back to a local process is found."""
        route = self._ray
        assert route is not None
        try:
            return getattr(route, verb)(*args)
        except ActorDeadError:
            self._ray = None
            raise

    def _call(self, target: tuple[str, float], *args: Any, **kwargs: Any) -> Any:
        """:meth:`ask`'s twin for a proxy's method call ``target`` = (method, timeout),
        sent as a ``CALL`` frame; apart, so that ``ask`` carries no branch for it.
        Raises the remote error, or the :class:`MethodRefused` the actor answered."""
        method, timeout = target
        if self._ray is not None:  # placed on Ray: see _via_ray
            return self._via_ray("call", method, args, kwargs, timeout)
        deadline = time.monotonic() + timeout
        existing = _pool.conns.get((self._root, self.name))
        corr = next(existing.ids) if existing is not None else 1
        try:
            conn = self._send(encode((CALL, corr, (method, args, kwargs))), timeout, asking=True)
        except RayPlaced as placed:
            self._ray = placed.route
            return self._via_ray("call", method, args, kwargs, timeout)
        if conn is not existing:
            conn.ids = itertools.count(corr + 1)
        kind, value = self._reply(conn, corr, deadline, timeout)
        del conn, existing  # as in ask: a kept exception must not keep the socket
        if kind == REPLY_OK and value.__class__ is not MethodRefused:
            return value
        raise value

    def _reply(self, conn: _Connection, corr: int, deadline: float, timeout: float) -> Any:
        """Read frames until the reply to ``corr``: ``(kind, value)``; errors raised here."""
        while True:
            try:
                raw = conn.read_frame(deadline)
                if raw is not None:
                    if raw[0] == SHM:
                        kind, rid, value = decode_shm(raw, conn.fds)
                    else:
                        kind, rid, value = decode(raw)
                    if conn.fds and not conn.buf:
                        raise ShmProtocolError("a descriptor came without a frame announcing it")
            except TimeoutError:
                raise AskTimeout(self.name, f"no reply within {timeout:g} s") from None
            except (ConnectionResetError, BrokenPipeError):
                raw = None
            except ShmProtocolError as exc:
                self._drop()
                raise ActorError(self.name, f"bad shared-memory reply: {exc}") from None
            if raw is None:
                self._drop()
                raise ActorDeadError(self.name, "stopped before answering") from None
            if rid != corr:
                continue  # a late reply to an ask that timed out earlier
            return kind, value


def _rebuild_ref(name: str, root: str | None) -> ActorRef[Any]:
    return ActorRef(name, root=root)
