"""Ray placement: the spawner of children placed on a Ray cluster (``placement=ikos.Ray``).

A child with a placement is still a node of ikos's tree, with its state
machine, restart type, strategy, intensity, back-off and escalation: only its
process is elsewhere. :class:`RaySpawner` is one more :class:`Spawner`
beside actors and executables. It hands every request to the Ray bridge
(``ikos/manager/_ray_bridge.py``), a child process of ikosd that is the Ray
driver, over a socket pair with one JSON object a line, read by the loop
(never blocking it). Each placed incarnation is a :class:`RayHandle`, which
satisfies the tree's ``Running`` protocol as a local process handle does:
``ready`` when the Ray actor ran ``on_start``, ``exited`` when the bridge
reports its end, ``send_signal(SIGTERM)`` an orderly stop (``on_stop``),
``kill()`` a ``ray.kill``. So the supervision runtime treats a Ray actor's
death exactly as a local child's exit: that is the whole point.

The exit reasons: the actor's own (``receive raised ...`` with the
traceback, ``normal``), ``killed`` (ikos killed it, or someone called
``ray.kill``), ``killed: its Ray worker process died`` (the process
vanished, e.g. SIGKILL or OOM) and ``node lost (NODE)``; none of the last
three is a normal exit, so every restart type but ``temporary`` restarts.

Where each actor runs is written to ``RUN/actors/NAME.ray`` (the Ray
namespace and actor name, the cluster address and the node) for the
``ActorRef`` of a local process (``ikos/actors/_ray_route.py``), and shown in
the status objects as ``node`` and ``placement``. Ray-placed actors are not
recorded in ``state.db``: they are owned by the bridge, so when ikosd dies
they die with it, and there is nothing to adopt.

Rejected: running the Ray driver inside ikosd (see the bridge's docstring)
and Ray's own restarts (``max_restarts > 0``), which would restart an actor
behind its supervisor's back: no intensity, no strategy, no escalation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from ikos._codec import encode
from ikos._errors import SpawnError
from ikos.platform._paths import InstancePaths
from ikos.platform._process import ExitStatus, ProcessHandle
from ikos.supervision._runtime import Running, WorkerNode
from ikos.supervision._spec import Child

log = logging.getLogger("ikos.manager")

#: How long the bridge gets to connect to the cluster (``ray.init``).
CONNECT_TIMEOUT = 120.0
#: How long a request to the bridge may take beyond its own timeout.
REQUEST_MARGIN = 30.0
#: Longest line the bridge may send (an exit event carries a traceback).
MAX_LINE = 1024 * 1024


class RayHandle:
    """One incarnation of a Ray-placed actor, as the supervision tree sees a process."""

    def __init__(self, spawner: RaySpawner, name: str, inc: int) -> None:
        loop = asyncio.get_running_loop()
        self.spawner, self.name, self.inc = spawner, name, inc
        self.pid = 0  # the Ray worker's pid, on its node, once started
        self.node_id = ""
        self.node_ip = ""
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self._event: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit_event(self) -> dict[str, Any] | None:
        return self._event

    def finish(self, event: dict[str, Any]) -> None:
        """The bridge reported this incarnation's end (or its start failed)."""
        if self.exited.done():
            return
        sig = event.get("signal")
        code = event.get("code")
        self._event = {
            "event": "exit",
            "reason": str(event.get("reason") or "ended"),
            "detail": str(event.get("detail") or ""),
            "override": True,  # the bridge's reason beats "killed by SIGKILL"
        }
        self.exited.set_result(
            ExitStatus(
                code if isinstance(code, int) else None,
                sig if isinstance(sig, int) else None,
                time.time(),
            )
        )
        if not self.ready.done():
            self.ready.cancel()

    def send_signal(self, sig: int) -> bool:
        """SIGTERM (and SIGINT) stop the actor in order; SIGKILL kills it; others do nothing
        (a Ray actor has no signals ikos can send across the cluster)."""
        if not self.alive:
            return False
        if sig == signal.SIGKILL:
            return self.kill()
        if sig in (signal.SIGTERM, signal.SIGINT):
            timeout = self.spawner.stop_timeout(self.name)
            self.spawner.post({"op": "stop", "name": self.name, "timeout": timeout})
            return True
        return False

    def kill(self) -> bool:
        if not self.alive:
            return False
        self.spawner.post({"op": "kill", "name": self.name})
        return True


class RaySpawner:
    """Starts children placed on Ray through the bridge; see the module docstring."""

    def __init__(self, paths: InstancePaths, address: str | None, namespace: str = "ikos") -> None:
        self.paths = paths
        self.address = address
        self.namespace = namespace
        self.handles: dict[str, RayHandle] = {}
        self.specs: dict[str, Child] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._bridge: ProcessHandle | None = None
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connected: asyncio.Future[None] | None = None
        self._log_file: int = -1
        self._tasks: set[asyncio.Future[None]] = set()
        self._starting: asyncio.Lock | None = None

    # -- the bridge --------------------------------------------------------------

    async def start(self) -> None:
        """Nothing yet: the bridge starts with the first placed child."""

    async def _ensure_bridge(self) -> None:
        """Start the bridge unless it runs; children starting together wait for one start."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._connected is not None and self._bridge is not None and self._bridge.alive:
                await self._connected
                return
            await self._start_bridge()

    async def _start_bridge(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._log_file = os.open(
            self.paths.log_dir / "ray-bridge.log",
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        argv = [sys.executable, "-m", "ikos.manager._ray_bridge", "3"]
        argv += [self.address or "", self.namespace]
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                    (os.POSIX_SPAWN_DUP2, self._log_file, 1),
                    (os.POSIX_SPAWN_DUP2, self._log_file, 2),
                ],
                setsigmask=(),
            )
        except OSError as exc:
            ours.close()
            raise SpawnError("ray", "bridge", f"cannot start the Ray bridge: {exc}")
        finally:
            theirs.close()
        self._bridge = ProcessHandle(pid)
        self._sock = ours
        reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE)
        self._connected = loop.create_future()
        self._reader_task = asyncio.ensure_future(self._read(reader, self._connected))
        try:
            await asyncio.wait_for(asyncio.shield(self._connected), CONNECT_TIMEOUT)
        except TimeoutError:
            self._stop_bridge()
            self._bridge.kill()
            raise SpawnError("ray", "address", "the Ray bridge did not connect in time")
        log.info("ray: bridge pid %d connected to %s", pid, self.address or "a local Ray")

    async def _read(self, reader: asyncio.StreamReader, connected: asyncio.Future[None]) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                self._dispatch(msg, connected)
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            log.error("ray: the bridge's line broke: %s", exc)
        # the bridge is gone: every placed actor went with it (Ray removes an owner's actors)
        if not connected.done():
            connected.set_exception(SpawnError("ray", "address", self._bridge_failure()))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result({"ok": False, "reason": "the Ray bridge ended"})
        self._pending.clear()
        for handle in list(self.handles.values()):
            handle.finish({"reason": "the Ray bridge ended", "code": None})

    def _bridge_failure(self) -> str:
        return f"the Ray bridge could not connect (see {self.paths.log_dir / 'ray-bridge.log'})"

    def _dispatch(self, msg: dict[str, Any], connected: asyncio.Future[None]) -> None:
        event = msg.get("event")
        if event == "ready":
            if not connected.done():
                connected.set_result(None)
        elif event == "failed":
            if not connected.done():
                reason = str(msg.get("reason") or self._bridge_failure())
                connected.set_exception(SpawnError("ray", "address", reason))
        elif event == "exit":
            handle = self.handles.get(str(msg.get("name")))
            if handle is not None and handle.inc == msg.get("inc"):
                if msg.get("cause") in ("node_lost", "worker_died"):
                    log.warning(
                        "ray: actor %s on %s: %s", handle.name, handle.node_ip, msg.get("reason")
                    )
                del self.handles[handle.name]
                self._remove_route(handle.name)
                handle.finish(msg)
        else:
            fut = self._pending.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def post(self, request: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send ``request`` to the bridge; the future of its answer."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        if self._writer is None or self._writer.is_closing():
            fut.set_result({"ok": False, "reason": "the Ray bridge is not running"})
            return fut
        rid = next(self._ids)
        self._pending[rid] = fut
        self._writer.write((json.dumps({**request, "id": rid}) + "\n").encode())
        return fut

    def stop_timeout(self, name: str) -> float:
        spec = self.specs.get(name)
        shutdown = spec.shutdown if spec is not None else 5.0
        return (
            3600.0
            if shutdown == "infinity"
            else float(shutdown)
            if shutdown != "brutal_kill"
            else 0.0
        )

    # -- Spawner -----------------------------------------------------------------

    async def spawn(self, node: WorkerNode) -> Running:
        spec = node.spec
        assert isinstance(spec, Child) and spec.placement is not None
        await self._ensure_bridge()
        try:
            boot = encode((tuple(spec.args), dict(spec.kwargs)))
        except Exception as exc:
            raise SpawnError(spec.name, "args", f"cannot be sent to the Ray actor: {exc}")
        handle = RayHandle(self, spec.name, node.incarnation)
        self.handles[spec.name] = handle
        self.specs[spec.name] = spec
        request = {
            "op": "spawn",
            "name": spec.name,
            "inc": node.incarnation,
            "actor": spec.actor_path,
            "boot": base64.b64encode(boot).decode(),
            "placement": spec.placement.to_json(),
            "timeout": spec.start_timeout,
        }
        task = asyncio.ensure_future(self._started(handle, self.post(request)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def _started(self, handle: RayHandle, answer: asyncio.Future[dict[str, Any]]) -> None:
        reply = await answer
        if not reply.get("ok"):
            if self.handles.get(handle.name) is handle:
                del self.handles[handle.name]
            reply.setdefault("code", 2)
            handle.finish(reply)
            return
        handle.pid = int(reply.get("pid") or 0)
        handle.node_id = str(reply.get("node_id") or "")
        handle.node_ip = str(reply.get("node_ip") or "")
        if not handle.alive:  # it ended before its start was answered: no route to it
            return
        self._write_route(handle)
        if not handle.ready.done():
            handle.ready.set_result({"event": "ready", "pid": handle.pid, "node": handle.node_id})

    def _write_route(self, handle: RayHandle) -> None:
        route = {
            "namespace": self.namespace,
            "actor": handle.name,
            "address": self.address or "auto",
            "node_id": handle.node_id,
            "node_ip": handle.node_ip,
            "pid": handle.pid,
        }
        path = self.paths.actor_socket(handle.name).with_suffix(".ray")
        tmp = path.with_suffix(".ray.tmp")
        tmp.write_text(json.dumps(route))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    def _remove_route(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths.actor_socket(name).with_suffix(".ray").unlink()

    def adopt(self, node: WorkerNode, pid: int, sid: int, fds: dict[str, int]) -> Running:
        raise SpawnError(node.name, "placement", "a Ray-placed actor cannot be adopted")

    def retire(self, node: WorkerNode) -> None:
        self._remove_route(node.name)
        self.specs.pop(node.name, None)

    def exited(self, node: WorkerNode) -> None:
        self._remove_route(node.name)

    def decorate_status(self, node: WorkerNode, status: dict[str, Any]) -> None:
        spec = node.spec
        status["placement"] = "ray"
        if isinstance(spec, Child) and spec.placement is not None:
            status["ray"] = spec.placement.to_json()
        handle = node.handle
        if isinstance(handle, RayHandle) and handle.alive:
            status["node"] = handle.node_ip or None
            status["node_id"] = handle.node_id or None
        else:
            status["node"] = None

    def _stop_bridge(self) -> None:
        """Close the line: the bridge kills what it still owns and leaves the cluster."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def aclose(self) -> None:
        """Stop the bridge (every placed actor has stopped): Ray removes what it owned."""
        self._stop_bridge()
        bridge = self._bridge
        if bridge is not None:
            try:
                await asyncio.wait_for(asyncio.shield(bridge.exited), 20.0)
            except TimeoutError:
                log.warning("ray: the bridge did not leave the cluster in 20 s: killing it")
                bridge.kill()
                await bridge.exited
        if self._reader_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader_task, 5.0)
        self.close()

    def close(self) -> None:
        if self._bridge is not None and self._bridge.alive:
            self._bridge.kill()
        if self._log_file >= 0:
            os.close(self._log_file)
            self._log_file = -1
        for name in list(self.handles):
            self._remove_route(name)
