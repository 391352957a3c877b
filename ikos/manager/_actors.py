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

**Hot code upgrade** (:meth:`ActorSpawner.upgrade`, the protocol in
:mod:`ikos.actors._handover`): the successor is forked like a restart, with
the same listener and pipes and counters of its own, but it re-reads the
class's module from disk. The manager is not on the handover's path: it
stops watching the old process's exit (``WorkerNode.detach``), waits for the
successor's ``ready`` (it took over: the old one exits 0, ``upgraded``) or
its exit (it did not: the old one serves on), and then watches whichever
runs (``WorkerNode.attach``). Neither outcome is a transition of the
daemon's state, a restart or a restart-intensity event. The successor's
status pipe, log pipes and counters replace the old one's in the keeper only
once it took over; until then its output waits in its pipes, and if it
fails it is copied into the daemon's log. Once an actor was upgraded, its
later restarts re-read the module from disk too: the fork server still has
the module as preloaded at start, and a crash must not bring the old code back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ikos._codec import encode
from ikos._errors import ManagerError, SpawnError
from ikos.actors._actor import Actor
from ikos.actors._carried import CarriedActor
from ikos.actors._context import InstanceContext
from ikos.actors._handover import handover_refusal
from ikos.actors._runtime import ActorBoot
from ikos.actors._stats import ActorFigures, create_stats_fd, map_for_reading, read_figures
from ikos.manager._logs import DaemonLogs
from ikos.platform._fdstore import FdStore
from ikos.platform._forkserver import ForkServer
from ikos.platform._paths import InstancePaths
from ikos.platform._process import ProcessHandle, own, read_available
from ikos.platform._unix import bind_unix
from ikos.supervision._runtime import Running, WorkerNode
from ikos.supervision._spec import Child, resolve_actor_class

log = logging.getLogger("ikos.manager")

ACTOR_ENTRY = "ikos.actors._runtime:spawn_entry"
UPGRADE_ENTRY = "ikos.actors._handover:upgrade_entry"
#: Seconds the old incarnation gets to exit once its successor took over.
UPGRADED_EXIT_WAIT = 10.0
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
        #: Actors upgraded since ikosd started: their restarts re-read their module too.
        self.upgraded: set[str] = set()  # actors whose code was upgraded: read anew

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
        if spec.name in self.upgraded and carried is None:  # never the fork server's older copy
            entry, payload = UPGRADE_ENTRY, self._fresh_code_payload(spec, cls, restart=True)
        else:
            entry, payload = ACTOR_ENTRY, self._payload(spec, cls, carried)
        modules = [] if carried or cls.__module__ == "__main__" else [cls.__module__]
        pipes = _Pipes()
        try:
            pid = await self.forkserver.spawn(
                spec.name,
                entry,
                payload,
                pipes.theirs(self._listener(spec.name)),
                modules,
                on_forked=lambda pid: self._on_forked(node, pid, True),
            )
        except BaseException:
            pipes.close_ours()
            raise
        finally:
            pipes.close_theirs()
        return self._commit(spec.name, pid, pipes)

    def _payload(self, spec: Child, cls: type, carried: CarriedActor | None = None) -> bytes:
        boot = ActorBoot(
            spec.name, cls, tuple(spec.args), dict(spec.kwargs), self._context(), spec.mailbox_size
        )
        boot.carried = carried
        try:
            return encode(boot)
        except Exception as exc:
            raise SpawnError(spec.name, "args", f"cannot be sent to the actor process: {exc}")

    @staticmethod
    def _successor_forked(node: WorkerNode, pid: int) -> None:
        own(pid)  # not recorded: a crash of ikosd now keeps the old one
        node.successor_pid = pid

    def _fresh_code_payload(self, spec: Child, cls: type, *, restart: bool = False) -> bytes:
        """What ``upgrade_entry`` takes: the class by path, the boot encoded apart."""
        boot = self._payload(spec, Actor)  # the class is found again in the new process
        return encode((cls.__module__, cls.__qualname__, boot, restart))

    def _commit(self, name: str, pid: int, pipes: _Pipes) -> ProcessHandle:
        """``pid`` is the actor's process now: its counters, status and logs are the ones."""
        self._keep_pipes(name, pipes, pipes.status_r)
        return ProcessHandle(pid, status_fd=pipes.status_r)

    def _keep_pipes(self, name: str, pipes: _Pipes, status_fd: int) -> None:
        self._keep_counters(name, pipes.stats)
        _close(pipes, "stats")
        if status_fd >= 0:
            self.fdstore.put(name, "status", status_fd)
        self.logs.capture(name, "stdout", pipes.out_r)
        self.logs.capture(name, "stderr", pipes.err_r)

    async def upgrade(self, node: WorkerNode) -> dict[str, Any]:
        """Replace the running incarnation of actor ``node`` by one running its class's
        current code, handing the state over; see the module docstring.

        Run it as a command of the node's supervisor. Returns what happened
        (old and new pid, whether a state was handed over); raises
        :class:`ManagerError` with code ``upgrade_failed`` (the first line of its
        message says why, the rest is the new code's traceback) when the old
        incarnation serves on, and code ``bad_request`` when the actor cannot be
        upgraded at all.
        """
        spec = node.spec
        old = node.handle
        assert isinstance(spec, Child) and isinstance(old, ProcessHandle)
        path = spec.actor_path
        module, _, qualname = path.partition(":")
        if isinstance(spec.actor, CarriedActor):
            raise ManagerError(
                f"actor '{node.name}' was started by ikos.spawn, with its class carried in the "
                "request: spawn it again to run new code",
                "bad_request",
            )
        if module == "__main__" or "<locals>" in qualname:
            raise ManagerError(
                f"actor '{node.name}': its class {path} cannot be imported by its path, "
                "and an upgrade reads the class's module again from disk",
                "bad_request",
            )
        try:
            cls = resolve_actor_class(spec.actor)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ManagerError(
                f"actor '{node.name}': cannot import {path}: {exc}", "bad_request"
            ) from None
        refusal = handover_refusal(cls)
        if refusal is not None:
            raise ManagerError(f"actor '{node.name}' cannot be upgraded: {refusal}", "bad_request")
        payload = self._fresh_code_payload(spec, cls)
        began = time.monotonic()
        pipes = _Pipes()
        node.detach()  # from here the old process's exit is the upgrade's business
        new: ProcessHandle | None = None
        node.successor_pid = 0  # forking
        try:
            pid = await self.forkserver.spawn(
                spec.name, UPGRADE_ENTRY, payload, pipes.theirs(self._listener(node.name)), [],
                on_forked=functools.partial(self._successor_forked, node),
            )  # fmt: skip
            pipes.close_theirs()
            status_fd, pipes.status_r = pipes.status_r, -1  # the handle's from now on
            new = ProcessHandle(pid, status_fd=status_fd)
            ready = await _outcome(new, old, spec.start_timeout)
        except BaseException as exc:
            pipes.close_theirs()
            await self._not_upgraded(node, old, new, pipes)
            if isinstance(exc, SpawnError):
                raise ManagerError(_not_upgraded_line(node.name, old, exc.reason), "upgrade_failed")
            raise
        if ready is None:
            why, detail = _why_not(new, old)
            await self._not_upgraded(node, old, new, pipes)
            log.error(
                "actor %s: upgrade failed: %s%s", node.name, why, f"\n{detail}" * bool(detail)
            )
            message = _not_upgraded_line(node.name, old, why)
            raise ManagerError(f"{message}\n{detail}".rstrip(), "upgrade_failed")
        try:  # the old one exits by itself once it handed over
            await asyncio.wait_for(asyncio.shield(old.exited), UPGRADED_EXIT_WAIT)
        except TimeoutError:
            old.kill()
            await old.exited
        # a handle whose process ended closed its status pipe: the number may be reused
        self._keep_pipes(node.name, pipes, status_fd if new.alive else -1)
        node.attach(new)
        node.started_at = time.time()
        self.upgraded.add(node.name)
        handed = bool(ready.get("state"))
        log.info(
            "actor %s: upgraded, pid %d -> %d, %s",
            node.name,
            old.pid,
            new.pid,
            "state handed over" if handed else "fresh state",
        )
        return {
            "name": node.name,
            "upgraded": True,
            "old_pid": old.pid,
            "pid": new.pid,
            "state": "handed over" if handed else "fresh",
            "seconds": round(time.monotonic() - began, 6),
        }

    async def _not_upgraded(
        self, node: WorkerNode, old: ProcessHandle, new: ProcessHandle | None, pipes: _Pipes
    ) -> None:
        """The successor did not take over: make sure it is gone, keep its output, and
        watch the old process again (its exit meanwhile, if any, is handled now)."""
        if new is not None and new.alive:
            new.kill()
            await new.exited
        rl = self.logs.log_for(node.name)
        for stream, fd in (("stdout", pipes.out_r), ("stderr", pipes.err_r)):
            chunks, _ = read_available(fd) if fd >= 0 else ([], True)
            text = b"".join(chunks).decode(errors="replace")
            if text:
                rl.write_lines(stream, text.splitlines())
        pipes.close_ours()
        node.attach(old)

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


class _Pipes:
    """The descriptors of one incarnation being started: ours (read ends, counters)
    and the child's (write ends), each closed once, whatever happens."""

    def __init__(self) -> None:
        self.status_r, self.status_w = os.pipe2(os.O_CLOEXEC)
        self.out_r, self.out_w = os.pipe2(os.O_CLOEXEC)
        self.err_r, self.err_w = os.pipe2(os.O_CLOEXEC)
        self.stats = create_stats_fd()

    def theirs(self, listener: socket.socket) -> list[int]:
        """The descriptors for the fork server, in ``spawn_entry``'s order."""
        return [listener.fileno(), self.status_w, self.stats, self.out_w, self.err_w]

    def close_theirs(self) -> None:
        for attr in ("status_w", "out_w", "err_w"):
            _close(self, attr)

    def close_ours(self) -> None:
        for attr in ("status_r", "out_r", "err_r", "stats"):
            _close(self, attr)


def _close(pipes: _Pipes, attr: str) -> None:
    fd = getattr(pipes, attr)
    if fd >= 0:
        setattr(pipes, attr, -1)
        with contextlib.suppress(OSError):
            os.close(fd)


async def _outcome(new: ProcessHandle, old: ProcessHandle, timeout: float) -> dict[str, Any] | None:
    """The successor's ready event once it took over, or None when it did not."""
    waiting: set[asyncio.Future[Any]] = {new.ready, new.exited, old.exited}
    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if old.exited in done and new.alive and not new.ready.done():
        # the old one exits as soon as the successor said taken: its ready follows
        reason = (old.exit_event() or {}).get("reason")
        if reason == "upgraded":
            rest: set[asyncio.Future[Any]] = {new.ready, new.exited}
            await asyncio.wait(rest, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if new.ready.done() and not new.exited.done():
        return new.ready.result()
    return None


def _why_not(new: ProcessHandle | None, old: ProcessHandle) -> tuple[str, str]:
    """Why the successor did not take over, and its traceback."""
    if new is None:
        return "the new process could not be started", ""
    ended = old.exit_event() or {}
    if not old.alive and ended.get("reason") != "upgraded":
        return f"the running incarnation ended during the handover ({ended.get('reason')})", ""
    event = new.exit_event()
    if event is not None:
        return str(event.get("reason") or "the new process failed"), str(event.get("detail") or "")
    if new.alive:
        return "the new process did not take over in time", ""
    status = new.exited.result() if new.exited.done() else None
    return f"the new process {status.describe() if status else 'ended'} before taking over", ""


def _not_upgraded_line(name: str, old: ProcessHandle, why: str) -> str:
    tail = f"pid {old.pid} serves on" if old.alive else "its old process ended too"
    return f"actor '{name}' was not upgraded: {why} ({tail})"
