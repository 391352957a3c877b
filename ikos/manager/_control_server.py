"""The control socket: JSON Lines requests from ikosctl and any other client.

Specified in ``docs/protocol.md``. Requests on one connection are answered
in order; every input is validated before use (line length, JSON shape,
argument types) and a bad request gets an error answer, never a crash of
the manager.

Access is decided per verb by the peer's credentials (SO_PEERCRED), in three
classes (:data:`Access`): *public* verbs are open to every local user but
their status objects are reduced to names, states and times for callers who
may not read more; *private* verbs (logs, a daemon's configuration) need
root, the instance's owner or the reader group; *control* verbs need root or
the owner. Every control action and every refused attempt is audited on the
``ikos.audit`` logger with the peer's pid, uid, the verb and the target name,
never the payload; refused attempts are rate-limited per uid.

Main design choice: the socket is served with the loop's low-level socket
calls (``sock_recv``/``sock_sendall``) and a buffer of our own, not
asyncio's streams. A StreamReader buffers up to twice its limit (2 MiB for
the protocol's 1 MiB lines) plus a 256 KiB read, and a transport queues
whatever is written to it; here a connection holds at most one 16 KiB read
past the line it is parsing and one answer in flight, so a client that
pipelines requests and never reads costs a few KiB, and it is dropped when
its answer is not taken within :data:`DRAIN_TIMEOUT`. Other users get their
own pool of connections, a per-uid cap, idle and slow-line deadlines and a
shared byte budget, so that they can neither lock out root and the owner
nor make the manager grow.

A handler may answer with a :class:`Stream` instead of a result: the
connection then carries ``{"id", "event"}`` lines until the stream ends with
one final answer, or until the client hangs up, and then closes (a
streaming connection carries nothing else, as the client expects).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from ikos._errors import IkosError, ManagerError, NoSuchDaemon, PermissionDenied
from ikos._version import __version__
from ikos.monitor._logfile import LogFollower, secure_log_dir
from ikos.platform._control import take_line
from ikos.platform._signals import parse_signal as _parse_signal
from ikos.platform._unix import bind_unix, peer_credentials, process_groups

if TYPE_CHECKING:
    from ikos.manager._manager import Manager

log = logging.getLogger("ikos.control")
audit = logging.getLogger("ikos.audit")

#: Who may use a verb: anyone (answers reduced for non-readers), readers, or controllers.
Access = Literal["public", "private", "control"]
ACCESS_CLASSES: tuple[Access, ...] = ("public", "private", "control")

#: The longest request line; a longer one closes the connection.
MAX_LINE = 1024 * 1024
#: Bytes read from a socket at a time: what a connection may hold beyond its current line.
READ_CHUNK = 16 * 1024
#: Connections of root and the instance's owner (a pool of their own: others never use it).
MAX_PRIVILEGED_CONNECTIONS = 256
#: Connections of every other uid together.
MAX_SHARED_CONNECTIONS = 128
#: Connections of one other uid: one user cannot take the whole shared pool.
MAX_CONNECTIONS_PER_UID = 16
#: Bytes buffered (partial request lines, answers not yet taken) by all other uids together.
SHARED_BUFFER_BUDGET = 32 * 1024 * 1024
#: Seconds another uid's connection may stay idle between requests.
IDLE_TIMEOUT = 10.0
#: Seconds a request line may take to arrive once its first byte has (slowloris).
LINE_TIMEOUT = 10.0
#: Seconds another uid has to take an answer (or a stream's event) before it is dropped.
DRAIN_TIMEOUT = 10.0
#: The largest number of seconds any duration argument (``timeout``) may ask for: one day.
MAX_SECONDS = 86400.0
#: Lines of ``logs -f`` queued for one follower before lines are dropped (with a marker).
FOLLOW_QUEUE_BYTES = 1024 * 1024
#: Refused attempts audited per uid and window; past it, one line with the count.
AUDIT_BURST = 10
AUDIT_WINDOW = 60.0
#: Fields of a status object that every local user may see (docs/protocol.md, Access).
PUBLIC_STATUS_FIELDS = frozenset(
    {
        "name",
        "kind",
        "state",
        "pid",
        "restarts",
        "started_at",
        "uptime_seconds",
        "supervisor",
        "health",
        "services",
        "requires",
        "after",
        # "waiting": a socket-activated broker's stopped state is no outage; without
        # it another user's `ikosctl status` would report one (exit 3)
        "activation",
    }
)

Handler = Callable[["Request"], Awaitable[Any]]


class BadRequest(ManagerError):
    code = "bad_request"


class UnknownVerb(ManagerError):
    code = "unknown_verb"


class Request:
    """One decoded request with its peer's credentials.

    ``reader`` says whether the peer may see private data (root, the owner
    or a member of the reader group): handlers of public verbs use it to
    decide what to show.
    """

    def __init__(
        self, verb: str, args: dict[str, Any], pid: int, uid: int, *, reader: bool = True
    ) -> None:
        self.verb, self.args, self.pid, self.uid = verb, args, pid, uid
        self.reader = reader

    def text(self, key: str) -> str:
        value = self.args.get(key)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"'{self.verb}' needs '{key}' as a non-empty string")
        return value

    def number(self, key: str, default: float, maximum: float = MAX_SECONDS) -> float:
        """A positive, finite number of at most ``maximum`` (default one day, in seconds)."""
        value = self.args.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'{self.verb}': '{key}' must be a positive number")
        # Only a float can be infinite or NaN; a huge int compares exactly below.
        if (isinstance(value, float) and not math.isfinite(value)) or value <= 0:
            raise BadRequest(f"'{self.verb}': '{key}' must be a positive number")
        if value > maximum:
            raise BadRequest(f"'{self.verb}': '{key}' must be at most {maximum:g}")
        return float(value)

    def flag(self, key: str) -> bool:
        """A boolean argument, false when absent."""
        value = self.args.get(key, False)
        if not isinstance(value, bool):
            raise BadRequest(f"'{self.verb}': '{key}' must be true or false")
        return value

    def names(self) -> list[str]:
        value = self.args.get("names", [])
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise BadRequest(f"'{self.verb}': 'names' must be a list of strings")
        return value


class Stream:
    """A streaming answer: each item of ``events`` as an event line, then ``result``.

    A handler returns one instead of its result. The server writes
    ``{"id": ID, "event": item}`` for every item as soon as it comes; when the
    iterator ends it writes ``{"id": ID, "ok": true, "result": result}``, and
    an error raised by the iterator becomes the final error answer. When the
    client hangs up (or sends anything: the stream owns the connection), the
    iterator is closed (``aclose``, also when it never started) and so is
    the connection. Writes wait for the client to read, so the producer is
    what must bound what it queues.
    """

    def __init__(self, events: AsyncIterator[Any], result: Any = None) -> None:
        self.events = events
        self.result = result
        self.rid: Any = None


def parse_signal(value: Any) -> int:
    """A signal number from ``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"`` (BadRequest if none)."""
    try:
        return int(_parse_signal(value))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def redact_status(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` (a status object or tree node) reduced to what every user may see.

    Kept: :data:`PUBLIC_STATUS_FIELDS` and a tree node's children (reduced
    too); everything else (target, description, last exit, health check
    output, status text, configuration) is left out, and ``"redacted":
    true`` says so.

    >>> redact_status({"name": "web", "state": "running", "target": "/usr/sbin/nginx"})
    {'name': 'web', 'state': 'running', 'redacted': True}
    """
    out = {k: v for k, v in status.items() if k in PUBLIC_STATUS_FIELDS}
    children = status.get("children")
    if isinstance(children, list):
        out["children"] = [redact_status(c) if isinstance(c, dict) else c for c in children]
    out["redacted"] = True
    return out


class _RateLimited:
    """At most ``burst`` log lines per key and ``window`` seconds, then one line with the count.

    A flood from one uid must not flood the log (nor hide another uid's
    lines): each key has its own allowance, and what was held back is
    reported once, when the window closes.
    """

    def __init__(self, logger: logging.Logger, burst: int, window: float) -> None:
        self.logger, self.burst, self.window = logger, burst, window
        self._windows: dict[int, tuple[float, int, int]] = {}  # key: start, logged, held

    def warning(self, key: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if len(self._windows) > 4096:  # one entry per uid seen: forget the closed windows
            self._windows = {
                k: w for k, w in self._windows.items() if now - w[0] < self.window or w[2]
            }
        start, logged, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self.window:
            self._report(key, held)
            start, logged, held = now, 0, 0
        if logged < self.burst:
            self.logger.warning(message, *args)
            logged += 1
        else:
            if held == 0:
                with contextlib.suppress(RuntimeError):  # no loop: reported at the next line
                    asyncio.get_running_loop().call_later(
                        start + self.window - now, self._close_window, key, start
                    )
            held += 1
        self._windows[key] = (start, logged, held)

    def _close_window(self, key: int, start: float) -> None:
        entry = self._windows.get(key)
        if entry is not None and entry[0] == start:
            self._report(key, entry[2])
            del self._windows[key]

    def _report(self, key: int, held: int) -> None:
        if held:
            self.logger.warning(
                "uid %d: %d more like the above in %gs, not logged one by one",
                key,
                held,
                self.window,
            )


class _Dropped(Exception):
    """The connection breaks a rule and is closed; the message says which."""


class _Budget:
    """Bytes buffered for connections of other uids, against :data:`SHARED_BUFFER_BUDGET`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def adjust(self, delta: int) -> None:
        if delta > 0 and self.used + delta > self.limit:
            raise _Dropped(f"the {self.limit}-byte buffer shared by other users is full")
        self.used += delta


class _Peer:
    """One accepted connection: its socket, credentials and the bytes read but not parsed."""

    def __init__(
        self, sock: socket.socket, pid: int, uid: int, gid: int, privileged: bool, budget: _Budget
    ) -> None:
        self.sock = sock
        self.pid, self.uid, self.gid = pid, uid, gid
        self.privileged = privileged
        self._budget = budget
        self._buffer = bytearray()
        self._charged = 0
        self._line_since: float | None = None
        self._groups: frozenset[int] | None = None

    def in_group(self, gid: int) -> bool:
        if self.gid == gid:
            return True
        if self._groups is None:
            self._groups = process_groups(self.pid) or frozenset()
        return gid in self._groups

    def _account(self, pending: int = 0) -> None:
        """Charge the shared budget with what this connection holds (other uids only)."""
        if self.privileged:
            return
        held = len(self._buffer) + pending
        self._budget.adjust(held - self._charged)
        self._charged = held

    def release(self) -> None:
        if not self.privileged:
            self._budget.adjust(-self._charged)
            self._charged = 0
        self._buffer.clear()

    async def read_line(self) -> bytes | None:
        """The next request line (without its newline); None when the peer hung up."""
        loop = asyncio.get_running_loop()
        scanned = 0  # the bytes before this hold no newline: never rescan them
        while True:
            line = take_line(self._buffer, scanned)
            if line is not None:
                self._line_since = None
                self._account()
                return line
            if len(self._buffer) > MAX_LINE:
                raise _Dropped(f"sent a line over {MAX_LINE} bytes")
            scanned = len(self._buffer)
            if self._buffer:
                # A line has begun: it must be complete within LINE_TIMEOUT.
                now = loop.time()
                if self._line_since is None:
                    self._line_since = now
                timeout: float | None = self._line_since + LINE_TIMEOUT - now
                why = f"did not finish a request line within {LINE_TIMEOUT:g}s"
            elif not self.privileged:
                timeout, why = IDLE_TIMEOUT, f"stayed idle for {IDLE_TIMEOUT:g}s"
            else:
                timeout, why = None, ""
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, READ_CHUNK), timeout)
            except TimeoutError:
                raise _Dropped(why)
            if not chunk:
                return None
            self._buffer += chunk
            self._account()

    async def send(self, data: bytes) -> None:
        """Write ``data``; other uids must take it within :data:`DRAIN_TIMEOUT`."""
        loop = asyncio.get_running_loop()
        self._account(len(data))
        try:
            timeout = None if self.privileged else DRAIN_TIMEOUT
            await asyncio.wait_for(loop.sock_sendall(self.sock, data), timeout)
        except TimeoutError:
            raise _Dropped(f"did not read its answer within {DRAIN_TIMEOUT:g}s")
        finally:
            with contextlib.suppress(_Dropped):  # a release never exceeds the budget
                self._account()


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, default=repr).encode() + b"\n"


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _target(args: dict[str, Any]) -> str:
    """The name a request acts on, for the audit line: never more of its payload."""
    candidates: list[Any] = [args.get("name"), args.get("supervisor")]
    for key in ("config", "service"):
        inner = args.get(key)
        if isinstance(inner, dict):
            candidates.append(inner.get("name"))
    for value in candidates:
        if isinstance(value, str) and value:
            text = "".join(c if c.isprintable() else "?" for c in value[:100])
            return " " + repr(text)
    return ""


class ControlServer:
    """Serves the control socket of one manager.

    ``reader_gid``: members of this group (primary or supplementary) may use
    the private verbs and see whole status objects, as root and the owner
    do; None (the default) means nobody else.
    """

    def __init__(self, manager: Manager, reader_gid: int | None = None) -> None:
        self.m = manager
        self.reader_gid = reader_gid
        self.owner_uid = os.getuid()
        self.connections: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._privileged = 0
        self._shared: Counter[int] = Counter()
        self._budget = _Budget(SHARED_BUFFER_BUDGET)
        self._refusals = _RateLimited(audit, AUDIT_BURST, AUDIT_WINDOW)
        self._drops = _RateLimited(log, AUDIT_BURST, AUDIT_WINDOW)
        self.verbs: dict[str, tuple[Access, Handler]] = {}
        own: tuple[tuple[str, Access, Handler], ...] = (
            ("hello", "public", self.hello),
            ("status", "public", self.status),
            ("list", "public", self.list),
            ("tree", "public", self.tree),
            ("logs", "private", self.logs),
            ("start", "control", self.start_),
            ("stop", "control", self.stop),
            ("restart", "control", self.restart),
            ("upgrade", "control", self.upgrade),
            ("kill", "control", self.kill),
            ("reload", "control", self.reload),
            ("call", "control", self.call),
            ("tell", "control", self.tell),
            ("reload_config", "control", self.reload_config),
            ("shutdown", "control", self.shutdown),
            ("dead_letter", "control", self.dead_letter),
        )
        for verb, access, handler in own:
            self.register(verb, access, handler)

    def register(self, verb: str, access: Access | bool, handler: Handler) -> None:
        """Add a verb (used by the layers that extend the protocol).

        ``access`` is an :data:`Access` class; for compatibility ``True``
        means ``"control"`` and ``False`` ``"public"``.
        """
        if isinstance(access, bool):
            access = "control" if access else "public"
        if access not in ACCESS_CLASSES:
            raise ValueError(f"verb '{verb}': access must be one of {ACCESS_CLASSES}")
        self.verbs[verb] = (access, handler)

    # -- who may do what ----------------------------------------------------------

    def is_privileged(self, uid: int) -> bool:
        """Root or the instance's owner: every verb, and connections of their own pool."""
        return uid in (0, self.owner_uid)

    def _is_reader(self, peer: _Peer) -> bool:
        if peer.privileged:
            return True
        return self.reader_gid is not None and peer.in_group(self.reader_gid)

    def _refuse(self, pid: int, uid: int, verb: str, target: str, why: str) -> None:
        self._refusals.warning(uid, "pid %d uid %d: refused %s%s (%s)", pid, uid, verb, target, why)

    def _admit(self, privileged: bool, uid: int) -> str | None:
        """Why a new connection of ``uid`` is refused, or None to take it."""
        if privileged:
            if self._privileged >= MAX_PRIVILEGED_CONNECTIONS:
                return f"root and the owner already have {MAX_PRIVILEGED_CONNECTIONS} connections"
            return None
        if self._shared[uid] >= MAX_CONNECTIONS_PER_UID:
            return f"uid {uid} already has {MAX_CONNECTIONS_PER_UID} connections"
        if self._shared.total() >= MAX_SHARED_CONNECTIONS:
            return f"other users already have {MAX_SHARED_CONNECTIONS} connections"
        return None

    # -- the socket ---------------------------------------------------------------------

    async def start(self) -> None:
        # Who may read the daemons' log files is this policy too: the
        # directory is the owner's alone, or the reader group's as well.
        with contextlib.suppress(OSError):
            secure_log_dir(Path(self.m.paths.log_dir), self.reader_gid)
        path = self.m.paths.control_socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            bind_unix(sock, path, 0o666)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._accepting = asyncio.ensure_future(self._accept_loop(sock))

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(BaseException):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        with contextlib.suppress(FileNotFoundError):
            self.m.paths.control_socket.unlink()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: let descriptors come back
                self._drops.warning(-1, "control socket: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            try:
                pid, uid, gid = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            privileged = self.is_privileged(uid)
            refusal = self._admit(privileged, uid)
            if refusal is not None:
                self._refuse(pid, uid, "connect", "", refusal)
                answer = {"id": None, "ok": False, "error": {"code": "limit", "message": refusal}}
                with contextlib.suppress(OSError):
                    sock.send(_encode(answer))  # best effort: the socket is new and empty
                sock.close()
                continue
            if privileged:
                self._privileged += 1
            else:
                self._shared[uid] += 1
            peer = _Peer(sock, pid, uid, gid, privileged, self._budget)
            task = asyncio.ensure_future(self._serve(peer))
            self.connections.add(task)

    async def _serve(self, peer: _Peer) -> None:
        try:
            while True:
                line = await peer.read_line()
                if line is None:
                    return
                answer = await self._answer(line, peer)
                if isinstance(answer, Stream):
                    await self._stream(answer, peer)
                    return
                await peer.send(_encode(answer))
        except _Dropped as exc:
            self._drops.warning(
                peer.uid,
                "control peer pid %d uid %d %s: connection closed",
                peer.pid,
                peer.uid,
                exc,
            )
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.connections.discard(task)
            if peer.privileged:
                self._privileged -= 1
            else:
                self._shared[peer.uid] -= 1
                if self._shared[peer.uid] <= 0:
                    del self._shared[peer.uid]
            peer.release()
            peer.sock.close()

    async def _stream(self, stream: Stream, peer: _Peer) -> None:
        """Write ``stream``'s events until it ends or the client hangs up."""
        loop = asyncio.get_running_loop()
        rid = stream.rid
        events = stream.events
        hangup = asyncio.ensure_future(loop.sock_recv(peer.sock, 1))
        final: dict[str, Any] | None = None
        try:
            while final is None:
                following = asyncio.ensure_future(anext(events))
                await asyncio.wait({following, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if hangup.done():
                    following.cancel()
                    with contextlib.suppress(BaseException):
                        await following
                    return
                try:
                    event = following.result()
                except StopAsyncIteration:
                    final = {"id": rid, "ok": True, "result": stream.result}
                    break
                except Exception as exc:
                    final = self._error_answer(rid, exc)
                    break
                await peer.send(_encode({"id": rid, "event": event}))
            await peer.send(_encode(final))
        finally:
            hangup.cancel()
            with contextlib.suppress(BaseException):
                await hangup
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _error_answer(self, rid: Any, exc: Exception) -> dict[str, Any]:
        if isinstance(exc, ManagerError):
            return {"id": rid, "ok": False, "error": {"code": exc.code, "message": str(exc)}}
        if isinstance(exc, IkosError):
            return {"id": rid, "ok": False, "error": {"code": "failed", "message": str(exc)}}
        log.error("control request failed", exc_info=exc)  # a bug must not take the manager down
        return {
            "id": rid,
            "ok": False,
            "error": {"code": "failed", "message": f"{type(exc).__name__}: {exc}"},
        }

    async def _answer(self, line: bytes, peer: _Peer) -> dict[str, Any] | Stream:
        rid: Any = None
        verb = "?"
        target = ""
        try:
            try:
                msg = json.loads(line, parse_constant=_refuse_constant)
            except RecursionError:
                raise BadRequest("not JSON: nested too deeply")
            except ValueError as exc:
                raise BadRequest(f"not JSON: {exc}")
            if not isinstance(msg, dict):
                raise BadRequest("a request must be a JSON object")
            rid = msg.get("id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
                rid = None
                raise BadRequest("'id' must be a string or an integer")
            verb_value = msg.get("verb")
            args = msg.get("args", {})
            if not isinstance(verb_value, str):
                raise BadRequest("'verb' must be a string")
            verb = verb_value
            if not isinstance(args, dict):
                raise BadRequest("'args' must be an object")
            entry = self.verbs.get(verb)
            if entry is None:
                raise UnknownVerb(f"unknown verb '{verb[:100]}'")
            access, handler = entry
            target = _target(args)
            reader = self._is_reader(peer)
            if access == "control" and not peer.privileged:
                raise PermissionDenied(
                    f"uid {peer.uid} may only read: '{verb}' needs root "
                    f"or the instance's owner (uid {self.owner_uid})"
                )
            if access == "private" and not reader:
                raise PermissionDenied(
                    f"uid {peer.uid} may not read '{verb}': it needs root, the instance's "
                    f"owner (uid {self.owner_uid}) or the reader group"
                )
            if access == "control" and verb != "dead_letter":
                audit.info("pid %d uid %d: %s%s", peer.pid, peer.uid, verb, target)
            result = await handler(Request(verb, args, peer.pid, peer.uid, reader=reader))
            if isinstance(result, Stream):
                result.rid = rid
                return result
            return {"id": rid, "ok": True, "result": result}
        except PermissionDenied as exc:
            self._refuse(peer.pid, peer.uid, verb, target, str(exc))
            return self._error_answer(rid, exc)
        except RecursionError:
            return self._error_answer(
                rid, BadRequest(f"'{verb}': an argument is nested too deeply")
            )
        except Exception as exc:
            return self._error_answer(rid, exc)

    # -- verbs ---------------------------------------------------------------

    async def hello(self, req: Request) -> Any:
        answer = {
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.m.paths.root) if self.m.paths.root else None,
            "uid": req.uid,
            "can_control": self.is_privileged(req.uid),
            "can_read": req.reader,
            "verbs": {verb: access for verb, (access, _) in sorted(self.verbs.items())},
        }
        if req.reader:  # ikosd's own health: its state store, fork server, reaper
            answer["health"] = self.m.health()
        return answer

    @staticmethod
    def _shown(req: Request, statuses: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(statuses) if req.reader else [redact_status(s) for s in statuses]

    async def status(self, req: Request) -> Any:
        names = req.names()
        if not names:
            return self._shown(req, self.m.list_json())
        return self._shown(req, (self.m.status_of(self.m.node(n)) for n in names))

    async def list(self, req: Request) -> Any:
        return self._shown(req, self.m.list_json())

    async def tree(self, req: Request) -> Any:
        root = self.m.tree_json()
        return root if req.reader else redact_status(root)

    async def start_(self, req: Request) -> Any:
        return await self.m.ops.start(req.text("name"))

    async def stop(self, req: Request) -> Any:
        return await self.m.ops.stop(req.text("name"))

    async def restart(self, req: Request) -> Any:
        return await self.m.ops.restart(req.text("name"))

    async def reload(self, req: Request) -> Any:
        return await self.m.ops.reload(req.text("name"))

    async def upgrade(self, req: Request) -> Any:
        return await self.m.ops.upgrade(req.text("name"))

    async def logs(self, req: Request) -> Any:
        name = req.text("name")
        self.m.node(name)
        lines = req.args.get("lines", 10)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 0 <= lines <= 100000:
            raise BadRequest("'logs': 'lines' must be an integer from 0 to 100000")
        if not req.flag("follow"):
            return {"name": name, "lines": self.m.logs.tail(name, lines)}
        # The backlog and the follower are taken in one step of the loop: no
        # line written in between is lost or shown twice.
        backlog = self.m.logs.tail(name, lines)
        follower = self.m.logs.log_for(name).follow(FOLLOW_QUEUE_BYTES)
        return Stream(_FollowEvents(backlog, follower))

    async def kill(self, req: Request) -> Any:
        return self.m.ops.kill(req.text("name"), parse_signal(req.args.get("signal", "SIGTERM")))

    def _actor(self, name: str) -> Any:
        from ikos.actors._ref import ActorRef

        node = self.m.node(name)
        if node.kind != "actor":
            raise ManagerError(f"'{name}' is {node.kind}, not an actor: it takes no messages")
        return ActorRef(name, root=self.m.paths.root)

    async def call(self, req: Request) -> Any:
        ref = self._actor(req.text("name"))
        timeout = req.number("timeout", 5.0)
        data = req.args.get("data")
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(None, lambda: ref.ask(data, timeout=timeout))
        except TimeoutError as exc:
            raise ManagerError(str(exc), "timeout")
        except IkosError as exc:
            raise ManagerError(str(exc))
        try:
            json.dumps(reply, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return {"reply_repr": repr(reply)[:MAX_LINE]}
        return {"reply": reply}

    async def tell(self, req: Request) -> Any:
        ref = self._actor(req.text("name"))
        data = req.args.get("data")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: ref.tell(data))
        except IkosError as exc:
            raise ManagerError(str(exc))
        return {}

    async def reload_config(self, req: Request) -> Any:
        return await self.m.reload_config()

    async def shutdown(self, req: Request) -> Any:
        asyncio.get_running_loop().call_soon(self.m.request_shutdown)
        return {}

    async def dead_letter(self, req: Request) -> Any:
        name = req.text("name")
        self.m.actors.dead_letters[name] += 1
        log.warning(
            "dead letter to '%s' from pid %d: %s",
            name,
            req.pid,
            str(req.args.get("reason", ""))[:200],
        )
        return {}


class _FollowEvents:
    """The events of ``logs -f``: the backlog, then each new line as it is written.

    An async iterator with ``aclose`` that detaches the follower even when
    the stream never started (a generator's ``finally`` would not run then).
    """

    def __init__(self, backlog: list[str], follower: LogFollower) -> None:
        self._pending = deque(backlog)
        self._follower = follower
        self._wake = asyncio.Event()
        follower.wake = self._wake.set

    def __aiter__(self) -> _FollowEvents:
        return self

    async def __anext__(self) -> str:
        while not self._pending:
            if self._follower.closed:
                raise StopAsyncIteration
            self._wake.clear()
            self._pending = deque(self._follower.take())
            if not self._pending:
                await self._wake.wait()
        return self._pending.popleft()

    async def aclose(self) -> None:
        self._follower.close()


__all__ = [
    "ACCESS_CLASSES",
    "Access",
    "ControlServer",
    "NoSuchDaemon",
    "Request",
    "Stream",
    "parse_signal",
    "redact_status",
]
