"""The actor process: one mailbox, one message at a time, one thread.

This is what runs in every actor's process after the fork server forked it.
The manager created the listening socket and passed it in (socket
activation), so the mailbox address outlives any one incarnation. A single
thread multiplexes the listener and every client connection with epoll and
calls ``receive`` for one message at a time; there is no I/O thread, because
handing each message from one thread to another would cost more than the
whole round trip it serves.

The mailbox is bounded: once ``mailbox_size`` messages wait, the runtime
stops reading from its connections, their kernel buffers fill, and senders
block (up to their timeout, then :class:`MailboxFull`).

Life cycle, reported to the manager as JSON lines on a status pipe:
``{"event": "ready"}`` once ``on_start`` returned, ``{"event": "exit", ...}``
with the reason before the process ends. SIGTERM asks for an orderly stop:
the current message finishes, queued asks are answered with
:class:`ActorDeadError`, queued tells are counted as dead letters, then
``on_stop`` runs and the process exits 0. Exit codes: 0 normal, 1 crash in
``receive``, 2 crash in ``on_start``.

Timers (``Actor.send_after``, ``Actor.send_interval``; ``ikos.actors._timers``)
are a heap of deadlines in this process: the nearest is epoll's timeout, and
what is due joins the mailbox after each poll, as a tell from the actor to
itself. The one-client fast path (a blocking ``recv``, see ``_fast_read``) is
entered only until ``fast_until``, which a timer pulls in, so a client that
keeps talking does not make a timer late. The per-message loop has no timer
code: an actor without timers pays nothing for them.

An actor with an ``async def`` handler or hook is driven by the subclass in
``ikos.actors._async_runtime`` instead (:func:`runtime_for` chooses once, at
start): the same sockets and mailbox, an asyncio loop instead of ``_loop``.

The runtime counts what ikosd's metrics show (``ikos.actors._stats``): messages
put in and taken out of the mailbox, and each ask's service time, in a page of
shared memory the manager reads at scrape time; an update is an increment or
two, never a message or a system call.

Large bytes-like messages and replies travel as sealed memfds (see
``ikos.actors._ref``): every read is a ``recvmsg_into`` that may bring a
descriptor, kept per connection until its frame is complete and then mapped
(``receive`` gets a read-only ``memoryview``). A connection whose frames and
descriptors do not match, or that passes anything but a sealed memfd of the
announced size, is closed, its descriptors with it. Mapped messages waiting in
the mailbox are bounded apart (:data:`MAX_QUEUED_SEGMENTS`), since each holds
descriptors: past it the runtime stops reading, as for a full mailbox.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, NoReturn

from ikos._codec import SHM, SHM_HEAD, decode, encode
from ikos._errors import ActorCrashed, ActorDeadError, ActorError, AuthenticationError
from ikos.actors import _context, _handover
from ikos.actors._actor import Actor
from ikos.actors._call import MethodCall
from ikos.actors._carried import CarriedActor
from ikos.actors._ref import (
    ASK,
    CALL,
    REPLY_ERR,
    REPLY_OK,
    SHM_TYPES,
    TELL,
    ShmProtocolError,
    by_shm,
    decode_shm,
    encode_shm,
    take_fds,
)
from ikos.actors._stats import (
    ASK_BUCKETS_NS,
    ASK_SUM_NS,
    FIRST_BUCKET,
    RECEIVED,
    TAKEN,
    map_for_writing,
    private_counters,
)
from ikos.actors._timers import HeapTimers, Timers
from ikos.platform._memfd import (
    ANCILLARY_SIZE,
    MSG_CTRUNC,
    RECV_FLAGS,
    SharedBuffer,
    close_all,
    fds_of,
    send_with_fds,
)
from ikos.platform._wire import HEADER, ServerHandshake

EXIT_NORMAL, EXIT_CRASH, EXIT_START_FAILED = 0, 1, 2
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING_HANDSHAKES = 64
REPLY_TIMEOUT = 10.0
FAST_IDLE = 0.02  # seconds the one-client fast path waits in recv before epoll
READ_CHUNK = 65536  # per recv; larger frames arrive over several reads
MAX_QUEUED_SEGMENTS = 64  # mapped messages waiting in the mailbox (each holds 2 fds)


@dataclass
class ActorBoot:
    """Everything an actor process needs, sent by the manager through the fork server."""

    name: str
    cls: type[Actor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    context: _context.InstanceContext
    mailbox_size: int
    #: A class sent by value (``ikos.spawn``): ``cls``, ``args`` and ``kwargs`` are
    #: placeholders until the actor process loads it, ikosd never does.
    carried: CarriedActor | None = None


class _Client:
    __slots__ = ("blocking", "buf", "deadline", "fds", "hs", "sock")

    def __init__(self, sock: socket.socket, secret: bytes, max_frame: int) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: collections.deque[int] = collections.deque()  # not yet taken by a frame
        self.blocking = False  # in blocking mode for the one-client fast path
        self.hs: ServerHandshake | None = ServerHandshake(secret, max_frame)
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT


class ActorProcess:
    """Drives one actor instance; see the module docstring."""

    def __init__(
        self,
        boot: ActorBoot,
        listener: socket.socket,
        status_fd: int,
        stats: memoryview | None = None,
    ) -> None:
        self.boot = boot
        #: the counters the manager reads (``ikos.actors._stats``), one store per update
        self.stats = stats if stats is not None else private_counters()
        self.name = boot.name
        self.listener = listener
        self.status_fd = status_fd
        self.secret = boot.context.secret
        self.max_frame = boot.context.max_frame
        self.capacity = boot.mailbox_size
        self.shm_threshold = boot.context.shm_threshold
        self.segments = 0  # mapped messages in the mailbox
        self.ep = select.epoll()
        self.clients: dict[int, _Client] = {}
        self.mailbox: collections.deque[tuple[_Client, int, int, Any]] = collections.deque()
        self.paused = False
        self.handshaking = 0  # connections still in the handshake
        self.stopping = False
        self.dead_letters = 0
        self.actor: Actor | None = None
        #: until when the loop may enter the one-client fast path (timers pull it in)
        self.fast_until = [0.0]
        self.heap_timers = HeapTimers(self.name, self, self.fast_until, FAST_IDLE)
        #: the timers the actor's send_after/send_interval set (the async runtime's differ)
        self.timers: Timers = self.heap_timers
        #: a hot code upgrade's successor waiting for the handover (``_handover``)
        self.successor: _Client | None = None
        self.handover_capacity = 0
        self.terminated = False  # SIGTERM came: a handover under way gives way to it
        self._wake_r, self._wake_w = socket.socketpair()
        self._scratch = bytearray(READ_CHUNK)
        self._view = memoryview(self._scratch)
        self._bufs = (self._scratch,)

    # -- status pipe ---------------------------------------------------------

    def _status(self, **event: Any) -> None:
        try:
            os.write(self.status_fd, (json.dumps(event) + "\n").encode())
        except OSError:
            pass

    def _exit(self, code: int, reason: str, detail: str = "") -> NoReturn:
        report_exit(self.status_fd, code, reason, detail, self.dead_letters)

    # -- main --------------------------------------------------------------

    def run(self) -> NoReturn:
        self._prepare_process()
        self._start_actor()
        self._serve({"event": "ready", "pid": os.getpid()})

    def upgrade(self) -> NoReturn:
        """Run as the successor of a hot code upgrade: start, take over, serve."""
        self._prepare_process()
        self._start_actor()
        try:
            old, handed = _handover.take_over(self)
        except _handover.HandoverFailed as exc:
            self._exit(_handover.EXIT_NOT_TAKEN, exc.reason, exc.detail)
        except BaseException as exc:
            self._exit(
                _handover.EXIT_NOT_TAKEN,
                f"the handover failed: {_describe(exc)}",
                traceback.format_exc(),
            )
        self._pump_buffers()  # frames the old incarnation had read but not framed yet
        self._serve({"event": "ready", "pid": os.getpid(), "upgraded_from": old, "state": handed})

    def _prepare_process(self) -> None:
        """Signals (SIGTERM sets ``stopping`` and wakes epoll) and this process's instance."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _context.set_default(self.boot.context)

    def _create_actor(self) -> Actor:
        """The actor instance, named and given its timers, before ``on_start`` runs."""
        actor = self.boot.cls(*self.boot.args, **self.boot.kwargs)
        actor.name = self.name
        actor._ikos_timers = self.timers
        self.actor = actor
        return actor

    def _start_actor(self) -> None:
        """Construct the actor and run ``on_start``; exit 2 with the reason if either fails."""
        try:
            self._create_actor().on_start()
        except BaseException as exc:
            self._exit(
                EXIT_START_FAILED, f"on_start raised {_describe(exc)}", traceback.format_exc()
            )

    def _serve(self, ready: dict[str, Any]) -> NoReturn:
        self.listener.setblocking(False)
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.ep.register(self._wake_r.fileno(), select.EPOLLIN)
        self._status(**ready)
        try:
            self._loop()
            # the loop left for a successor's handover: hand over (and exit), or serve on
            while self.successor is not None:
                if self.stop_wanted():
                    _handover.cancel(self, "it is stopping")
                    break
                _handover.hand_over(self)
                self._loop()
        except BaseException as exc:  # a bug in the runtime itself: still report it
            self._exit(EXIT_CRASH, f"runtime error {_describe(exc)}", traceback.format_exc())
        self._shutdown()

    def stop_wanted(self) -> bool:
        """Whether the actor was asked to stop (SIGTERM, or ``self.stop()`` in the actor)."""
        return self.terminated or bool(getattr(self.actor, "_ikos_stop_requested", False))

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stopping = True
        self.terminated = True

    def _loop(self) -> None:
        actor = self.actor
        assert actor is not None
        mailbox = self.mailbox
        clients = self.clients
        stats = self.stats
        clock = time.perf_counter_ns
        started = 0
        fast_until = self.fast_until  # set by every _poll; pulled in by timers
        while not self.stopping:
            if mailbox:
                self._poll(0.0)
            elif (
                len(clients) == 1
                and not self.handshaking
                and not self.paused
                and time.monotonic() < fast_until[0]
                and self._fast_read()
            ):
                pass  # a busy peer still lets epoll look at the listener every FAST_IDLE
            else:
                self._poll(self._next_timeout())
            while mailbox and not self.stopping:
                client, kind, corr, message = mailbox.popleft()
                stats[TAKEN] += 1
                if kind == ASK:
                    started = clock()
                if message.__class__ is memoryview and isinstance(message.obj, SharedBuffer):
                    self.segments -= 1
                try:
                    if message.__class__ is MethodCall:
                        result = message.apply(actor)
                    else:
                        result = actor.receive(message)
                except BaseException as exc:
                    self._handler_raised(client, kind, corr, exc, handler_name(message))
                if kind == ASK:
                    self._reply(client, REPLY_OK, corr, result)
                    # the actor's service time: off the mailbox to the reply sent
                    elapsed = clock() - started
                    stats[ASK_SUM_NS] += elapsed
                    stats[FIRST_BUCKET + bisect_left(ASK_BUCKETS_NS, elapsed)] += 1
                # a mapped payload (or reply) must not stay mapped, with its descriptors,
                # until the next message comes: these names would keep it alive
                message = result = None
                if getattr(actor, "_ikos_stop_requested", False):
                    self.stopping = True
                if self.paused and not self._full():
                    self._resume()
                    self._pump_buffers()

    def _fast_read(self) -> bool:
        """Wait for the only client's next message in ``recv`` itself; False to use epoll.

        A conversation with one peer (the common case: one caller asking) costs
        an epoll_wait per message on top of the recv, and waking from epoll is
        the slow part on some machines. So while exactly one client talks, the
        actor blocks in its recv, for at most FAST_IDLE: then it falls back to
        epoll, so an idle actor costs nothing, a new client waits at most that
        long to be accepted, and a SIGTERM (which only sets a flag; the recv is
        resumed after it) is acted on within that time too. The loop enters it
        only until ``fast_until``, which a timer due sooner than FAST_IDLE pulls
        in: a recv that may last FAST_IDLE never makes a timer late.
        """
        client = next(iter(self.clients.values()))
        sock = client.sock
        if not client.blocking:
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(FAST_IDLE))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(REPLY_TIMEOUT))
            client.blocking = True
        try:  # inlined (not self._recv): this is the hot path
            n, anc, flags, _ = sock.recvmsg_into(self._bufs, ANCILLARY_SIZE, RECV_FLAGS)
        except BlockingIOError:  # FAST_IDLE passed without a message
            sock.setblocking(False)
            client.blocking = False
            return False
        except OSError:
            n = 0
        else:
            if (anc or flags & MSG_CTRUNC) and not self._take_fds(client, anc, flags):
                n = 0
        if not n:
            self._close(client)
            return True
        client.buf += self._view[:n]
        self._pump(client)
        return True

    def _recv(self, client: _Client) -> int:
        """One ``recvmsg_into`` into the scratch buffer, descriptors queued on the client;
        0 when the connection is over (EOF, error, or descriptors it may not send)."""
        try:
            n, anc, flags, _ = client.sock.recvmsg_into(self._bufs, ANCILLARY_SIZE, RECV_FLAGS)
        except (BlockingIOError, InterruptedError, TimeoutError):
            raise
        except OSError:
            return 0
        if (anc or flags & MSG_CTRUNC) and not self._take_fds(client, anc, flags):
            return 0
        return n

    def _take_fds(self, client: _Client, anc: list[tuple[int, int, bytes]], flags: int) -> bool:
        """Queue the descriptors a read brought; False (all closed) when the peer broke
        the rules. Kept even before the handshake is done: a client's first frame may
        come in the same read as its proof. Nothing is mapped before the proof checks,
        and the bound holds for unauthenticated peers too."""
        try:
            take_fds(client.fds, fds_of(anc, flags))
        except ValueError as exc:  # ShmProtocolError included
            self._refuse(client, str(exc))
            return False
        return True

    def _refuse(self, client: _Client, why: str) -> None:
        """Say in the actor's log why a connection is being closed (the caller closes it)."""
        sys.stderr.write(f"ikos: actor '{self.name}' closed a connection: {why}\n")

    def _full(self) -> bool:
        return len(self.mailbox) >= self.capacity or self.segments >= MAX_QUEUED_SEGMENTS

    def _next_timeout(self) -> float | None:
        timers = self.heap_timers
        if not self.handshaking:
            return timers.timeout(time.monotonic()) if timers.heap else None
        now = time.monotonic()
        timeout = timers.timeout(now)
        pending = [c.deadline for c in self.clients.values() if c.hs is not None]
        if not pending:
            return timeout
        handshake = max(0.0, min(pending) - now)
        return handshake if timeout is None else min(handshake, timeout)

    def _poll(self, timeout: float | None) -> None:
        clients = self.clients
        for fd, _ in self.ep.poll(-1 if timeout is None else timeout):
            client = clients.get(fd)
            if client is not None:
                # paused by an earlier client of this batch: reading on would pile up
                # bytes and descriptors outside the mailbox's bound
                if not self.paused:
                    self._read(client)
            elif fd == self.listener.fileno():
                self._accept()
            elif fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(512):
                        pass
                except BlockingIOError:
                    pass
                if self.successor is not None:
                    _handover.due(self)
        now = time.monotonic()
        if self.handshaking:
            for client in [c for c in self.clients.values() if c.hs is not None]:
                if now > client.deadline:
                    self._close(client)
        if self.heap_timers.heap:  # due timers join the mailbox behind what was read
            self.fast_until[0] = self.heap_timers.fire_due(now)
        else:
            self.fast_until[0] = now + FAST_IDLE

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self.handshaking >= MAX_PENDING_HANDSHAKES:
                # Evict the oldest pending handshake rather than refuse the newcomer:
                # refusing would let idle peers lock every legitimate client out
                # until their handshake timeout, while a real client completes
                # its handshake in one round trip and is rarely the oldest.
                self._close(next(c for c in self.clients.values() if c.hs is not None))
            sock.setblocking(False)
            client = _Client(sock, self.secret, self.max_frame)
            self.handshaking += 1
            self.clients[sock.fileno()] = client
            if not self.paused:
                self.ep.register(sock.fileno(), select.EPOLLIN)

    def _close(self, client: _Client) -> None:
        close_all(client.fds)
        fd = client.sock.fileno()
        if client.hs is not None:
            client.hs = None
            self.handshaking -= 1
        if fd >= 0 and self.clients.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
        try:
            client.sock.close()
        except OSError:
            pass

    def _read(self, client: _Client) -> None:
        try:
            n = self._recv(client)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        if not n:
            self._close(client)
            return
        if client.hs is None:
            client.buf += self._view[:n]
            self._pump(client)
            return
        data = bytes(self._view[:n])
        if client.hs is not None:
            try:
                out = client.hs.feed(data)
                if out:
                    client.sock.sendall(out)
                    # The peer's time to prove starts now: time spent in receive()
                    # since the accept must not count against it (the deadline is
                    # checked right after this read, before the proof can arrive).
                    client.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            except (AuthenticationError, OSError):
                self._close(client)
                return
            if not client.hs.done:
                return
            data = client.hs.leftover
            client.hs = None
            self.handshaking -= 1
        client.buf += data
        self._pump(client)

    def _pump(self, client: _Client) -> None:
        """Move complete frames from the client's buffer into the mailbox, while room."""
        buf = client.buf
        mailbox = self.mailbox
        stats = self.stats
        while len(buf) >= 4:
            (n,) = HEADER.unpack_from(buf)
            if n > self.max_frame or n == 0:
                self._close(client)  # oversized or empty frame: a broken or hostile peer
                return
            if len(buf) < 4 + n:
                return
            if len(mailbox) >= self.capacity or self.segments >= MAX_QUEUED_SEGMENTS:
                self._pause()
                return
            raw = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            try:
                if raw[0] == SHM:
                    kind, corr, message = decode_shm(raw, client.fds)
                    self.segments += 1
                else:
                    kind, corr, message = decode(raw)
                    if kind == CALL:  # a proxy's call, sent as a tuple (ikos.actors._call)
                        kind, message = ASK, MethodCall.from_wire(message)
            except ShmProtocolError as exc:
                self._refuse(client, str(exc))
                self._close(client)
                return
            except Exception as exc:
                self._undecodable(client, raw, exc)
                continue
            mailbox.append((client, kind, corr, message))
            stats[RECEIVED] += 1
        if client.fds and not buf:
            self._refuse(client, "a descriptor came without a frame announcing it")
            self._close(client)

    def _undecodable(self, client: _Client, raw: bytes, exc: Exception) -> None:
        """An authenticated peer sent what this process cannot decode (say, an instance
        of a class it cannot import): answer the ask it belongs to, or drop the tell
        as a dead letter. Replying under any other correlation id would leave the
        asker waiting for its whole timeout."""
        if raw[0] == _handover.HANDOVER:  # not a message: a successor asks for the handover
            _handover.asked(self, client)
            return
        why = f"could not decode the message: {_describe(exc)}"
        # an "m" frame: its pickle stream starts after the segment's size
        header = _frame_header(raw[SHM_HEAD.size - 1 :] if raw[0] == SHM else raw)
        if header is not None and header[0] in (ASK, CALL):
            self._reply(client, REPLY_ERR, header[1], ActorError(self.name, why))
            return
        self.dead_letters += 1
        sys.stderr.write(f"ikos: actor '{self.name}' dropped a message: {why}\n")

    def _pump_buffers(self) -> None:
        for client in list(self.clients.values()):
            if client.buf:
                self._pump(client)

    def _pause(self) -> None:
        if self.paused:
            return
        self.paused = True
        for fd in self.clients:
            try:
                self.ep.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def _resume(self) -> None:
        self.paused = False
        for client in self.clients.values():
            self.ep.register(client.sock.fileno(), select.EPOLLIN)

    def _reply(self, client: _Client, kind: int, corr: int, value: Any) -> None:
        fd, owned = -1, False
        try:
            if value.__class__ in SHM_TYPES and by_shm(value, self.shm_threshold):
                payload, fd, owned = encode_shm(kind, corr, value)
            else:
                payload = encode((kind, corr, value))
        except Exception as exc:
            payload = encode(
                (
                    REPLY_ERR,
                    corr,
                    ActorCrashed(
                        self.name,
                        f"the reply could not be encoded: {_describe(exc)}",
                        type(exc).__name__,
                    ),
                )
            )
        packet = HEADER.pack(len(payload)) + payload
        try:
            self._send(client, packet, fd)
        finally:
            if owned:
                os.close(fd)

    def _send(self, client: _Client, packet: bytes, fd: int) -> None:
        """Send one frame (with ``fd`` attached when >= 0); a peer that does not take
        it within REPLY_TIMEOUT is closed."""
        sock = client.sock
        try:
            try:  # non-blocking: almost always all of it
                sent = sock.send(packet) if fd < 0 else send_with_fds(sock, packet, [fd])
            except BlockingIOError:
                sent = -1  # nothing went, the descriptor neither
            if sent < len(packet):
                sock.settimeout(REPLY_TIMEOUT)
                try:
                    if sent < 0:
                        sent = sock.send(packet) if fd < 0 else send_with_fds(sock, packet, [fd])
                    sock.sendall(memoryview(packet)[sent:])
                finally:
                    sock.setblocking(False)
        except OSError:
            self._close(client)

    # -- endings -----------------------------------------------------------

    def _drain(self) -> None:
        """Answer every queued ask with a dead-actor error; count tells as dead letters."""
        for client in list(self.clients.values()):
            if client.hs is None:
                self.capacity = sys.maxsize
                self.segments = -sys.maxsize  # every waiting message gets its answer
                try:
                    client.sock.setblocking(False)
                    # read and pump in turns: the descriptors of waiting frames stay
                    # within the connection's bound, and none is left unclosed
                    while client.sock.fileno() >= 0:
                        n = self._recv(client)
                        if not n:
                            break
                        client.buf += self._view[:n]
                        self._pump(client)
                except OSError:
                    pass
                if client.sock.fileno() >= 0:
                    self._pump(client)
        while self.mailbox:
            client, kind, corr, _ = self.mailbox.popleft()
            if kind == ASK:
                self._reply(
                    client, REPLY_ERR, corr, ActorDeadError(self.name, "stopped before answering")
                )
            elif kind == TELL:
                self.dead_letters += 1

    def _handler_raised(
        self, client: _Client, kind: int, corr: int, exc: BaseException, handler: str = "receive"
    ) -> NoReturn:
        """The handler ``handler`` raised ``exc`` (being handled): answer its ask, then
        crash (the reason names the method a proxy called, else ``receive``)."""
        if kind == ASK:
            err = ActorCrashed(
                self.name,
                f"{handler} raised {_describe(exc)}",
                type(exc).__name__,
                traceback.format_exc(),
            )
            self._reply(client, REPLY_ERR, corr, err)
        self._crash(exc, handler)

    def _crash(self, exc: BaseException, handler: str = "receive") -> NoReturn:
        detail = traceback.format_exc()
        self._drain()
        self._exit(EXIT_CRASH, f"{handler} raised {_describe(exc)}", detail)

    def _shutdown(self) -> NoReturn:
        self.timers.close()  # none fires while the actor stops, on_stop included
        self._drain()
        try:
            if self.actor is not None:
                self.actor.on_stop()
        except BaseException as exc:
            self._exit(EXIT_CRASH, f"on_stop raised {_describe(exc)}", traceback.format_exc())
        self._exit(EXIT_NORMAL, "normal")


def _frame_header(raw: bytes) -> tuple[int, int] | None:
    """``(kind, corr)`` of an encoded ``(kind, corr, message)``, read from the pickle's
    opcodes without executing any: for frames whose message failed to decode."""
    import pickletools  # the error path only

    ints: list[int] = []
    try:
        for op, arg, _ in pickletools.genops(raw[1:]):
            if op.name in ("PROTO", "FRAME"):
                continue
            if op.name not in ("BININT1", "BININT2", "BININT", "LONG1") or not isinstance(arg, int):
                return None
            ints.append(arg)
            if len(ints) == 2:
                return ints[0], ints[1]
    except Exception:
        return None
    return None


def handler_name(message: Any) -> str:
    """What handled ``message``, for a crash's reason: ``receive``, or the proxied
    method (``incr()``)."""
    return f"{message.method}()" if message.__class__ is MethodCall else "receive"


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_async_actor(cls: type[Actor]) -> bool:
    """Whether ``cls`` needs the asyncio runtime: its ``receive``, ``on_start``,
    ``on_stop`` or a public method is ``async def``."""
    names = {"receive", "on_start", "on_stop"} | {n for n in dir(cls) if not n.startswith("_")}
    return any(inspect.iscoroutinefunction(getattr(cls, n, None)) for n in names)


def runtime_for(cls: type[Actor]) -> type[ActorProcess]:
    """The runtime that drives actors of ``cls``: :class:`ActorProcess`, or the asyncio
    one (``ikos.actors._async_runtime``, imported only then) when
    :func:`is_async_actor`. Chosen once, at start."""
    if is_async_actor(cls):
        from ikos.actors._async_runtime import AsyncActorProcess

        return AsyncActorProcess
    if getattr(cls, "max_concurrency", 1) != 1:
        sys.stderr.write(
            f"ikos: {cls.__qualname__}.max_concurrency is ignored: it applies to async def "
            "handlers, and this actor has none\n"
        )
    return ActorProcess


def report_exit(
    status_fd: int, code: int, reason: str, detail: str = "", dead_letters: int = 0
) -> NoReturn:
    """Tell the manager why this actor process ends (its status pipe), then end it."""
    event = {
        "event": "exit",
        "code": code,
        "reason": reason,
        "detail": detail[-4000:],
        "dead_letters": dead_letters,
    }
    try:
        os.write(status_fd, (json.dumps(event) + "\n").encode())
    except OSError:
        pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_actor(boot: ActorBoot, listener_fd: int, status_fd: int, stats_fd: int) -> NoReturn:
    """Entry point in the forked actor process; never returns."""
    os.setsid()  # its own session: terminal signals to ikosd's group never reach it
    listener = socket.socket(fileno=listener_fd)
    runtime_for(boot.cls)(boot, listener, status_fd, map_for_writing(stats_fd)).run()


def spawn_entry(payload: bytes, fds: list[int]) -> NoReturn:
    """The fork server's entry point for actors.

    ``fds`` is ``[listener, status pipe, counters]`` (the memfd of
    ``ikos.actors._stats``), then optionally the write ends of the pipes that
    become the actor's stdout and stderr (the manager puts them in the
    daemon's log). Output is line-buffered, so that a ``print``
    reaches the log when it is made, not when a buffer fills.
    """
    take_stdio(fds)
    boot = decode(payload)
    if boot.carried is not None:
        try:
            boot.cls, boot.args, boot.kwargs = boot.carried.load()
        except BaseException as exc:
            reason = f"could not load {boot.carried.class_path}: {_describe(exc)}"
            detail = traceback.format_exc()
            sys.stderr.write(f"ikos: {reason}\n{detail}")  # the daemon's log
            report_exit(fds[1], EXIT_START_FAILED, reason, detail)
    run_actor(boot, fds[0], fds[1], fds[2])


def take_stdio(fds: list[int]) -> None:
    """Make ``fds[3]`` and ``fds[4]``, when given, this process's stdout and stderr."""
    if len(fds) >= 5:
        for target, fd in ((1, fds[3]), (2, fds[4])):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(line_buffering=True)
