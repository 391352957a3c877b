"""The control socket: JSON Lines requests from ikosctl and any other client.

Specified in ``docs/protocol.md``. Requests on one connection are answered
in order; every input is validated before use (line length, JSON shape,
argument types) and a bad request gets an error answer, never a crash of
the manager. Authorization is by the peer's uid (SO_PEERCRED): root and the
instance's owner may control, anyone else may only read. Every control
action is logged with the peer's pid and uid (the audit trail).

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
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ikos._errors import IkosError, ManagerError, NoSuchDaemon, PermissionDenied
from ikos._version import __version__
from ikos.platform._signals import parse_signal as _parse_signal
from ikos.platform._unix import bind_unix, peer_credentials

if TYPE_CHECKING:
    from ikos.manager._manager import Manager

log = logging.getLogger("ikos.control")
audit = logging.getLogger("ikos.audit")

MAX_LINE = 1024 * 1024
MAX_CONNECTIONS = 256

Handler = Callable[["Request"], Awaitable[Any]]


class BadRequest(ManagerError):
    code = "bad_request"


class UnknownVerb(ManagerError):
    code = "unknown_verb"


class Request:
    """One decoded request with its peer's credentials."""

    def __init__(self, verb: str, args: dict[str, Any], pid: int, uid: int) -> None:
        self.verb, self.args, self.pid, self.uid = verb, args, pid, uid

    def text(self, key: str) -> str:
        value = self.args.get(key)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"'{self.verb}' needs '{key}' as a non-empty string")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.args.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise BadRequest(f"'{self.verb}': '{key}' must be a positive number")
        return float(value)

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
    iterator is closed and so is the connection. Writes wait for the client
    to read (``drain``), so the producer is what must bound what it queues.
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


class ControlServer:
    """Serves the control socket of one manager."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.owner_uid = os.getuid()
        self.verbs: dict[str, tuple[bool, Handler]] = {
            "hello": (False, self.hello),
            "status": (False, self.status),
            "list": (False, self.list),
            "tree": (False, self.tree),
            "start": (True, self.start_),
            "stop": (True, self.stop),
            "restart": (True, self.restart),
            "kill": (True, self.kill),
            "reload": (True, self.reload),
            "logs": (False, self.logs),
            "call": (True, self.call),
            "tell": (True, self.tell),
            "reload_config": (True, self.reload_config),
            "shutdown": (True, self.shutdown),
            "dead_letter": (True, self.dead_letter),
        }

    def register(self, verb: str, access: bool | str, handler: Handler) -> None:
        """Add a verb (used by the layers that extend the protocol)."""
        self.verbs[verb] = (access in (True, "control"), handler)

    async def start(self) -> None:
        path = self.m.paths.control_socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_unix(sock, path, 0o666)
        sock.listen(128)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None
        for task in list(self.connections):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.m.paths.control_socket.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            if len(self.connections) > MAX_CONNECTIONS:
                return
            sock = writer.get_extra_info("socket")
            pid, uid, _ = peer_credentials(sock)
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    log.warning(
                        "control peer pid %d sent a line over %d bytes: closing", pid, MAX_LINE
                    )
                    return
                except (ConnectionError, OSError):
                    return
                if not line:
                    return
                answer = await self._answer(line, pid, uid)
                if isinstance(answer, Stream):
                    await self._stream(answer, reader, writer)
                    return
                writer.write(json.dumps(answer, default=repr).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self.connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _stream(
        self, stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Write ``stream``'s events until it ends or the client hangs up."""
        rid = stream.rid
        events = stream.events
        hangup = asyncio.ensure_future(reader.read(1))
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
                writer.write(json.dumps({"id": rid, "event": event}, default=repr).encode() + b"\n")
                await writer.drain()
            writer.write(json.dumps(final, default=repr).encode() + b"\n")
            await writer.drain()
        finally:
            hangup.cancel()
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

    async def _answer(self, line: bytes, pid: int, uid: int) -> dict[str, Any] | Stream:
        rid: Any = None
        try:
            try:
                msg = json.loads(line)
            except ValueError as exc:
                raise BadRequest(f"not JSON: {exc}")
            if not isinstance(msg, dict):
                raise BadRequest("a request must be a JSON object")
            rid = msg.get("id")
            if rid is not None and not isinstance(rid, str | int):
                rid = None
                raise BadRequest("'id' must be a string or an integer")
            verb = msg.get("verb")
            args = msg.get("args", {})
            if not isinstance(verb, str):
                raise BadRequest("'verb' must be a string")
            if not isinstance(args, dict):
                raise BadRequest("'args' must be an object")
            entry = self.verbs.get(verb)
            if entry is None:
                raise UnknownVerb(f"unknown verb '{verb}'")
            control, handler = entry
            if control and uid not in (0, self.owner_uid):
                raise PermissionDenied(
                    f"uid {uid} may only read: '{verb}' needs root "
                    f"or the instance's owner (uid {self.owner_uid})"
                )
            if control and verb != "dead_letter":
                audit.info("pid %d uid %d: %s %s", pid, uid, verb, json.dumps(args)[:500])
            result = await handler(Request(verb, args, pid, uid))
            if isinstance(result, Stream):
                result.rid = rid
                return result
            return {"id": rid, "ok": True, "result": result}
        except Exception as exc:
            return self._error_answer(rid, exc)

    # -- verbs ---------------------------------------------------------------

    async def hello(self, req: Request) -> Any:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.m.paths.root) if self.m.paths.root else None,
            "uid": req.uid,
            "can_control": req.uid in (0, self.owner_uid),
        }

    async def status(self, req: Request) -> Any:
        names = req.names()
        if not names:
            return self.m.list_json()
        return [self.m.status_of(self.m.node(n)) for n in names]

    async def list(self, req: Request) -> Any:
        return self.m.list_json()

    async def tree(self, req: Request) -> Any:
        return self.m.tree_json()

    async def start_(self, req: Request) -> Any:
        return await self.m.ops.start(req.text("name"))

    async def stop(self, req: Request) -> Any:
        return await self.m.ops.stop(req.text("name"))

    async def restart(self, req: Request) -> Any:
        return await self.m.ops.restart(req.text("name"))

    async def reload(self, req: Request) -> Any:
        return await self.m.ops.reload(req.text("name"))

    async def logs(self, req: Request) -> Any:
        name = req.text("name")
        self.m.node(name)
        lines = req.args.get("lines", 10)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 0 <= lines <= 100000:
            raise BadRequest("'logs': 'lines' must be an integer from 0 to 100000")
        return {"name": name, "lines": self.m.logs.tail(name, lines)}

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
            json.dumps(reply)
        except (TypeError, ValueError):
            return {"reply_repr": repr(reply)}
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


__all__ = ["ControlServer", "NoSuchDaemon", "Request", "Stream", "parse_signal"]
