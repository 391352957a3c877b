"""Actors as daemons: the spawner that starts, adopts and retires actor processes.

Every actor process is a fork of the fork server (``ikos.platform._forkserver``)
running :func:`ikos.actors._runtime.spawn_entry`. The manager, not the actor,
owns the actor's listening socket (``RUN/actors/NAME.sock``) and hands it to
every incarnation: while an actor restarts, clients that connect wait in the
socket's backlog (socket activation), and when it is stopped for good the
socket is closed and removed, so that a client fails at once instead of
waiting. Each incarnation reports ``ready`` and its exit reason on a status
pipe, and its stdout and stderr go to the daemon's log like an executable's.

Each incarnation also gets a fresh memfd for its counters
(:mod:`ikos.actors._stats`: mailbox depth, messages, ask durations), which
the manager maps read-only for the metrics; the mapping goes when the
incarnation ends, so a stopped or removed actor has no figures.

The descriptors only the manager holds (listener, status pipe, log pipes,
counters) are deposited with the descriptor keeper, so that a new ikosd can
adopt the actor after a crash of the old one, its counters included.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from ikos._codec import encode
from ikos._errors import SpawnError
from ikos.actors._actor import Actor
from ikos.actors._carried import CarriedActor
from ikos.actors._context import InstanceContext
from ikos.actors._runtime import ActorBoot
from ikos.actors._stats import ActorFigures, create_stats_fd, map_for_reading, read_figures
from ikos.manager._logs import DaemonLogs
from ikos.platform._fdstore import FdStore
from ikos.platform._forkserver import ForkServer
from ikos.platform._paths import InstancePaths
from ikos.platform._process import ProcessHandle
from ikos.platform._unix import bind_unix
from ikos.supervision._runtime import Running, WorkerNode
from ikos.supervision._spec import Child, resolve_actor_class

ACTOR_ENTRY = "ikos.actors._runtime:spawn_entry"
#: Connections an actor's listener queues while no incarnation accepts them.
LISTEN_BACKLOG = 1024


class ActorSpawner:
    """Starts actor processes for the manager; see the module docstring."""

    def __init__(
        self,
        paths: InstancePaths,
        forkserver: ForkServer,
        fdstore: FdStore,
        logs: DaemonLogs,
        context: Callable[[], InstanceContext],
        on_forked: Callable[[WorkerNode, int, bool], None],
    ) -> None:
        self.paths = paths
        self.forkserver = forkserver
        self.fdstore = fdstore
        self.logs = logs
        self._context = context
        self._on_forked = on_forked
        self.listeners: dict[str, socket.socket] = {}
        #: Messages to actors that were not there, by actor (``dead_letter`` verb, exits).
        self.dead_letters: Counter[str] = Counter()
        #: The counters of each running incarnation, mapped read-only. Entries are
        #: replaced or removed whole, never closed: a scrape in another thread that
        #: still holds a mapping keeps it valid until it lets go.
        self.counters: dict[str, mmap.mmap] = {}

    async def start(self) -> None:
        """Nothing to start: the fork server is the manager's."""

    def close(self) -> None:
        """Close and remove every listening socket and unmap the counters (ikosd is stopping)."""
        for name in list(self.listeners):
            self._close_listener(name)
        self.counters.clear()

    def _listener(self, name: str) -> socket.socket:
        sock = self.listeners.get(name)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bind_unix(sock, self.paths.actor_socket(name), 0o600)
            sock.listen(LISTEN_BACKLOG)
            self.listeners[name] = sock
            self.fdstore.put(name, "listener", sock.fileno())
        return sock

    def _close_listener(self, name: str) -> None:
        sock = self.listeners.pop(name, None)
        if sock is not None:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths.actor_socket(name).unlink()

    async def spawn(self, node: WorkerNode) -> Running:
        spec = node.spec
        assert isinstance(spec, Child)
        carried = spec.actor if isinstance(spec.actor, CarriedActor) else None
        if carried is not None:
            cls: type = Actor  # the actor process loads the real one: ikosd never unpickles it
        else:
            try:
                cls = resolve_actor_class(spec.actor)
            except (ImportError, AttributeError, ValueError) as exc:
                raise SpawnError(spec.name, "actor", f"cannot import {spec.actor!r}: {exc}")
        boot = ActorBoot(
            spec.name, cls, tuple(spec.args), dict(spec.kwargs), self._context(), spec.mailbox_size
        )
        boot.carried = carried
        try:
            payload = encode(boot)
        except Exception as exc:
            raise SpawnError(spec.name, "args", f"cannot be sent to the actor process: {exc}")
        modules = [] if carried or cls.__module__ == "__main__" else [cls.__module__]
        listener = self._listener(spec.name)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        stats = create_stats_fd()
        theirs = [status_w, out_w, err_w]
        try:
            pid = await self.forkserver.spawn(
                spec.name,
                ACTOR_ENTRY,
                payload,
                [listener.fileno(), status_w, stats, out_w, err_w],
                modules,
                on_forked=lambda pid: self._on_forked(node, pid, True),
            )
        except BaseException:
            for fd in (status_r, out_r, err_r, stats):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self._keep_counters(spec.name, stats)
        os.close(stats)
        self.fdstore.put(spec.name, "status", status_r)
        self.logs.capture(spec.name, "stdout", out_r)
        self.logs.capture(spec.name, "stderr", err_r)
        return ProcessHandle(pid, status_fd=status_r)

    def adopt(self, node: WorkerNode, pid: int, sid: int, fds: dict[str, int]) -> Running:
        """Take over an actor process that a previous ikosd started."""
        listener = fds.pop("listener", None)
        if listener is not None:
            self.listeners[node.name] = socket.socket(fileno=listener)
        for stream in ("stdout", "stderr"):
            fd = fds.pop(stream, None)
            if fd is not None:
                self.logs.capture(node.name, stream, fd)
        stats = fds.get("stats")  # the caller closes what the fds hold
        if stats is not None:
            self._keep_counters(node.name, stats)
        handle = ProcessHandle(pid, status_fd=fds.pop("status", None))
        if not handle.ready.done():
            handle.ready.set_result({"event": "ready", "pid": pid, "adopted": True})
        return handle

    def retire(self, node: WorkerNode) -> None:
        """The actor will not run again until started: close its mailbox socket."""
        if node.name in self.listeners:
            self._close_listener(node.name)
            self.fdstore.drop(node.name, ["listener"])

    def _keep_counters(self, name: str, fd: int) -> None:
        """Map an incarnation's counters for the metrics and deposit them with the keeper."""
        region = map_for_reading(fd)
        if region is None:
            self.counters.pop(name, None)
            return
        self.counters[name] = region
        self.fdstore.put(name, "stats", fd)

    def figures(self, name: str) -> ActorFigures | None:
        """The counters of actor ``name``'s running incarnation (any thread), if any."""
        region = self.counters.get(name)
        return read_figures(region) if region is not None else None

    def exited(self, node: WorkerNode) -> None:
        """An incarnation ended: its status pipe, log pipes and counters are no successor's
        business."""
        self.counters.pop(node.name, None)
        self.fdstore.drop(node.name, ["status", "stats"])
        self.logs.release(node.name)
        if node.last_exit is not None and node.last_exit.dead_letters:
            self.dead_letters[node.name] += node.last_exit.dead_letters

    def decorate_status(self, node: WorkerNode, status: dict[str, Any]) -> None:
        status["dead_letters"] = self.dead_letters.get(node.name, 0)
