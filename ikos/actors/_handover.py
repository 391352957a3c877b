"""Hot code upgrade: one incarnation of an actor hands its state and its clients to the next.

An upgrade (``ikosctl upgrade NAME``) starts a new process, the *successor*,
from the fork server with the actor's listening socket, like a restart, but
running :func:`upgrade_entry`: it re-reads the actor class's module from
disk (the fork server's copy is the one preloaded at start), constructs the
actor and runs ``on_start``. Only then, with the slow part done while the old
incarnation still serves, it connects to the old one's mailbox as an
authenticated client and sends one *handover frame* (codec byte ``h``, which
no ``ActorRef`` ever sends). The old incarnation then:

1. stops reading (every connection and the listener leave its epoll set) and
   handles what its mailbox already holds, answering as usual;
2. calls ``get_state()`` (if the class has it) and sends, over the same
   connection, a header (the encoded state, the class's ``version``, how many
   clients follow) and then every accepted connection in batches: the socket
   itself (SCM_RIGHTS), the bytes read from it that form no complete frame
   yet, the memfds that came with them and, for a connection still in its
   handshake, the handshake's state;
3. waits for the verdict: ``taken`` and it exits 0 with the reason
   ``upgraded``; anything else (a failure the successor reports, its death,
   no verdict within :data:`VERDICT_TIMEOUT`) and it takes up serving where
   it stopped, with every descriptor it had (it kept them: the successor got
   duplicates). A successor that did not say why is killed, and waited for,
   before the old one reads again, so that two processes never read one
   connection.

The successor decodes the state with the *new* classes, calls
``code_change(old_version, state)`` when the new class has it, then
``set_state(state)``; it adopts the connections (nothing read from them yet)
and only after ``taken`` is sent does it read anything, accept anything or
answer anyone. So no message is lost or reordered: what the old one had
decoded it handled, what it had read but not framed travels as bytes, what
the kernel holds stays in the same sockets, and unaccepted connections wait
in the listener's backlog, as during a restart.

Rejected: the manager relaying the handover (it would carry client sockets
and user state through ikosd's loop) and a socket pair given by the manager
(the old incarnation has no channel to receive it on but its own mailbox,
which the successor can reach directly).

Both halves run in the actor runtime (:class:`ikos.actors._runtime.ActorProcess`):
:func:`asked`/:func:`due`/:func:`hand_over` in the old one, :func:`take_over`
in the successor.
"""

from __future__ import annotations

import collections
import importlib
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from ikos._codec import decode, encode
from ikos.platform._memfd import RECV_FLAGS, close_all, fds_of, send_with_fds
from ikos.platform._unix import peer_credentials
from ikos.platform._wire import HEADER, client_handshake

if TYPE_CHECKING:
    from ikos.actors._runtime import ActorProcess, _Client

#: The codec byte of a handover frame (``decode`` refuses it: only the runtime reads it).
HANDOVER = 0x68  # b"h"
#: The successor's verdict, the last frame of a handover.
TAKEN = b"taken"
#: Seconds the old incarnation waits for the verdict once it sent everything.
VERDICT_TIMEOUT = 30.0
#: Seconds the successor waits for the old incarnation to finish its mailbox and send.
SEND_TIMEOUT = 120.0
#: Descriptors per message (SCM_MAX_FD is 253): a batch of connections stops below it.
MAX_FDS_PER_BATCH = 192
#: How long the old incarnation waits for a silent successor it killed to be gone.
KILL_WAIT = 5.0
#: Exit code of a successor that did not take over (the old incarnation still serves).
EXIT_NOT_TAKEN = 2
_ANCILLARY = socket.CMSG_SPACE(253 * 4)


class HandoverFailed(Exception):
    """The handover could not complete: ``reason`` in one line, ``detail`` a traceback."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return self.reason


# -- the old incarnation ---------------------------------------------------------------


def asked(proc: ActorProcess, client: _Client) -> None:
    """A successor sent the handover frame: stop reading, let the mailbox run dry."""
    from ikos.actors._runtime import ActorProcess

    why = None
    if proc.successor is not None:
        why = "a second successor while a handover is under way"
    elif type(proc).run is not ActorProcess.run:
        # a runtime that drives its own loop (the asyncio one) never reaches
        # hand_over: closing tells the successor, and this incarnation serves on
        why = "this actor's runtime does not hand over (only synchronous actors do)"
    if why is not None:
        proc._refuse(client, why)
        proc._close(client)
        return
    proc.successor = client
    proc.handover_capacity = proc.capacity
    proc.capacity = 0  # nothing more goes into the mailbox, and the loop never resumes reading
    proc._pause()
    try:
        proc.ep.unregister(proc.listener.fileno())
    except (KeyError, ValueError, OSError):
        pass
    _wake(proc)


def due(proc: ActorProcess) -> None:
    """The loop woke for the handover: leave it once the mailbox is empty."""
    if proc.mailbox:
        _wake(proc)  # polled again before the next message: look again then
    else:
        proc.stopping = True


def _wake(proc: ActorProcess) -> None:
    try:
        proc._wake_w.send(b"h")
    except OSError:
        pass


def hand_over(proc: ActorProcess) -> None:
    """Send the state and every connection to the successor; exit if it took them.

    Returns only when the successor did not take over: the caller serves on.
    """
    succ = proc.successor
    assert succ is not None
    sock = succ.sock
    try:
        peer = peer_credentials(sock)[0]
    except OSError:
        peer = 0
    verdict: bytes | None = None
    why = "the successor did not take over"
    try:
        sock.setblocking(True)
        sock.settimeout(VERDICT_TIMEOUT)
        header = _header(proc)
        clients = [c for c in proc.clients.values() if c is not succ]
        header["clients"] = len(clients)
        _send(sock, encode(header))
        if "abort" in header:
            # it got nothing to take over: let it exit and report why by itself
            verdict, why = b"failed", str(header["abort"])
        else:
            for records, fds in _batches(clients):
                _send(sock, encode(records), fds)
            verdict = _Reader(sock).frame(time.monotonic() + VERDICT_TIMEOUT)
    except (OSError, ValueError) as exc:
        verdict, why = None, f"the handover failed: {_describe(exc)}"
    if verdict == TAKEN:
        proc._exit(0, "upgraded")
    if verdict is None and peer > 0:
        _stop(peer)  # it may hold our connections: gone before we read them again
    cancel(proc, why)


def _header(proc: ActorProcess) -> dict[str, Any]:
    actor = proc.actor
    get_state = getattr(actor, "get_state", None)
    header: dict[str, Any] = {
        "pid": os.getpid(),
        "version": getattr(type(actor), "version", None),
        "has_state": get_state is not None,
        "state": b"",
    }
    if get_state is None:
        return header
    try:
        state = get_state()
    except BaseException as exc:
        header["abort"] = f"get_state raised {_describe(exc)}"
        header["traceback"] = traceback.format_exc()
        return header
    try:
        header["state"] = encode(state)
    except Exception as exc:
        header["abort"] = f"the value of get_state cannot be pickled: {_describe(exc)}"
        header["traceback"] = traceback.format_exc()
    return header


def _batches(clients: list[_Client]) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """The connections as records with their descriptors, at most MAX_FDS_PER_BATCH each."""
    records: list[dict[str, Any]] = []
    fds: list[int] = []
    for c in clients:
        # ours again on a rollback: no socket is left in the fast path's blocking mode
        c.sock.setblocking(False)
        c.blocking = False
        if len(fds) + 1 + len(c.fds) > MAX_FDS_PER_BATCH:
            yield records, fds
            records, fds = [], []
        records.append({"buf": bytes(c.buf), "fds": len(c.fds), "hs": c.hs, "deadline": c.deadline})
        fds.append(c.sock.fileno())
        fds.extend(c.fds)
    if records:
        yield records, fds


def _stop(pid: int) -> None:
    """SIGKILL the successor through a pidfd and wait (bounded) until it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], KILL_WAIT)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def cancel(proc: ActorProcess, why: str) -> None:
    """No handover: read and accept again, where the old incarnation stopped."""
    succ = proc.successor
    proc.successor = None
    proc.capacity = proc.handover_capacity
    if succ is not None:
        proc._close(succ)  # the successor reads EOF: the old incarnation did not hand over
    proc.stopping = proc.stop_wanted()
    proc.ep.register(proc.listener.fileno(), select.EPOLLIN)
    proc._resume()
    proc._pump_buffers()
    sys.stderr.write(f"ikos: actor '{proc.name}' did not hand over: {why}\n")


# -- the successor ------------------------------------------------------------------


def handover_refusal(cls: type) -> str | None:
    """Why actors of ``cls`` cannot be upgraded, or None: an async actor runs on the
    asyncio runtime, which has no handover."""
    from ikos.actors._runtime import is_async_actor  # it imports this module

    if is_async_actor(cls):
        return "it is an async actor, and only synchronous actors can be upgraded in this version"
    return None


def reload_class(module_name: str, qualname: str) -> type:
    """The class ``module_name:qualname`` as its source file on disk defines it now.

    The module is executed again from its source in its existing namespace (as
    ``importlib.reload`` does), compiled from the ``.py`` file rather than a
    cached ``.pyc``: a file rewritten within the same second with the same size
    would pass the bytecode cache's check and run the old code.
    """
    module = sys.modules.get(module_name)
    if module is None:
        module = importlib.import_module(module_name)
    else:
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py"):
            with open(path, "rb") as f:
                source = f.read()
            importlib.invalidate_caches()
            exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)
        else:
            module = importlib.reload(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{module_name}:{qualname} is not a class")
    return obj


def take_over(proc: ActorProcess) -> tuple[int, bool]:
    """Ask the running incarnation for its state and connections; adopt them.

    ``proc.actor`` is constructed and started. Returns the old incarnation's
    pid and whether a state was handed over. Raises :class:`HandoverFailed`
    (after telling the old incarnation, which then serves on) when it cannot
    take over; nothing was read from any client then.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(proc.listener.getsockname())
        client_handshake(sock, proc.secret, SEND_TIMEOUT)
        _send(sock, bytes([HANDOVER]) + encode({"pid": os.getpid()}))
        reader = _Reader(sock)
        deadline = time.monotonic() + SEND_TIMEOUT
        header = decode(_need(reader.frame(deadline)))
        if "abort" in header:
            raise HandoverFailed(str(header["abort"]), str(header.get("traceback", "")))
        clients = _receive_clients(proc, reader, int(header["clients"]), deadline)
    except (OSError, ValueError, EOFError) as exc:  # TimeoutError included
        sock.close()
        raise HandoverFailed(
            f"the handover with the running incarnation failed: {_describe(exc)}",
            traceback.format_exc(),
        ) from None
    except BaseException:
        sock.close()
        raise
    try:
        handed = _restore(proc, header)
    except BaseException:
        for c in clients:
            close_all(c.fds)
            c.sock.close()
        try:
            _send(sock, b"failed")  # the old one serves on at once
        except OSError:
            pass
        sock.close()
        raise
    for c in clients:
        proc.clients[c.sock.fileno()] = c
        if c.hs is not None:
            proc.handshaking += 1
        proc.ep.register(c.sock.fileno(), select.EPOLLIN)
    try:
        _send(sock, TAKEN)
    finally:
        sock.close()
    return int(header["pid"]), handed


def _need(frame: bytes | None) -> bytes:
    if frame is None:
        raise HandoverFailed("the running incarnation closed the connection during the handover")
    return frame


def _receive_clients(
    proc: ActorProcess, reader: _Reader, count: int, deadline: float
) -> list[_Client]:
    from ikos.actors._runtime import _Client

    clients: list[_Client] = []
    try:
        while len(clients) < count:
            for record in decode(_need(reader.frame(deadline))):
                fd = reader.fds.popleft()
                c = _Client(socket.socket(fileno=fd), proc.secret, proc.max_frame)
                c.sock.setblocking(False)
                c.buf += record["buf"]
                for _ in range(int(record["fds"])):
                    c.fds.append(reader.fds.popleft())
                c.hs = record["hs"]
                c.deadline = record["deadline"]
                clients.append(c)
    except BaseException:
        for c in clients:
            close_all(c.fds)
            c.sock.close()
        close_all(reader.fds)
        raise
    if reader.fds:
        close_all(reader.fds)
        raise HandoverFailed("descriptors came without the connections they belong to")
    return clients


def _restore(proc: ActorProcess, header: dict[str, Any]) -> bool:
    """Give the old state to the new actor; whether one was handed over."""
    actor = proc.actor
    set_state = getattr(actor, "set_state", None)
    if not header["has_state"] or set_state is None:
        return False
    step = "the old state could not be decoded by the new code:"
    try:
        state = decode(header["state"])
        code_change = getattr(actor, "code_change", None)
        if code_change is not None:
            step = "code_change raised"
            state = code_change(header["version"], state)
        step = "set_state raised"
        set_state(state)
    except BaseException as exc:
        raise HandoverFailed(f"{step} {_describe(exc)}", traceback.format_exc()) from None
    return True


def _send(sock: socket.socket, payload: bytes, fds: list[int] | None = None) -> None:
    data = HEADER.pack(len(payload)) + payload
    sent = send_with_fds(sock, data, fds) if fds else 0
    if sent < len(data):  # sendall always sends once: b"" to a closed peer is EPIPE
        sock.sendall(memoryview(data)[sent:])


class _Reader:
    """Frames from a blocking socket, with the descriptors that came along in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: collections.deque[int] = collections.deque()

    def frame(self, deadline: float) -> bytes | None:
        """The next frame, or None at EOF; TimeoutError past ``deadline``."""
        while True:
            if len(self.buf) >= 4:
                (n,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 4 + n:
                    data = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return data
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the handover timed out")
            self.sock.settimeout(left)
            chunk = bytearray(1 << 16)
            n, anc, flags, _ = self.sock.recvmsg_into([chunk], _ANCILLARY, RECV_FLAGS)
            if anc or flags & socket.MSG_CTRUNC:
                self.fds.extend(fds_of(anc, flags))
            if not n:
                return None
            self.buf += chunk[:n]


def upgrade_entry(payload: bytes, fds: list[int]) -> NoReturn:
    """The fork server's entry point for a successor (see the module docstring).

    ``payload`` is ``encode((module, qualname, boot, restart))`` with ``boot``
    the encoded :class:`~ikos.actors._runtime.ActorBoot` (its class a
    placeholder): decoded only after the module was read again, so that its
    arguments are rebuilt with the new classes too; ``restart`` for a plain
    start of an actor upgraded before (no handover). ``fds`` as for
    ``spawn_entry``.
    """
    from ikos.actors import _runtime
    from ikos.actors._stats import map_for_writing

    _runtime.take_stdio(fds)
    os.setsid()
    module_name, qualname, boot_bytes, restart = decode(payload)
    status_fd = fds[1]
    try:
        cls = reload_class(module_name, qualname)
        boot = decode(boot_bytes)
        boot.cls = cls
    except BaseException as exc:
        _runtime.report_exit(
            status_fd,
            EXIT_NOT_TAKEN,
            f"the new code of {module_name}:{qualname} failed to load: {_describe(exc)}",
            traceback.format_exc(),
        )
    listener = socket.socket(fileno=fds[0])
    stats = map_for_writing(fds[2])
    if restart:  # a restart of an upgraded actor: its current code, nothing to take over
        _runtime.runtime_for(boot.cls)(boot, listener, status_fd, stats).run()
    # a handover: async actors are refused before this (they have no handover yet)
    _runtime.ActorProcess(boot, listener, status_fd, stats).upgrade()


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
