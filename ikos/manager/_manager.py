"""ikosd's core: the supervision tree's host, its lifecycle, and the index of its nodes.

The manager runs one asyncio loop. It is the :class:`~ikos.supervision._runtime.Host`
of the tree: it starts each worker's process through the spawner of its kind
(actors, executables), records every state transition (in the log, in the
state that survives a crash, and to the extensions), and keeps the index of
the nodes by name. Everything else ikosd offers is an extension
(:mod:`ikos.manager._extension`): the registry, run-time daemons, metrics.
Changes to the tree go through :class:`~ikos.manager._operations.TreeOperations`.

Its lifecycle, in order: take the instance's lock; recover what a previous
ikosd left (adopt, or stop what cannot be trusted: :mod:`ikos.manager._recovery`);
start the fork server, the control socket, the spawners and the extensions;
start the root supervisor; print the ready line; serve until SIGTERM,
``ikosctl shutdown`` or the root's failure; stop every daemon in reverse
order; stop the extensions; release everything. The loop never blocks:
spawns are requests to the fork server, exits are pidfd readiness, slow
work runs in threads.

If the manager's own code fails unexpectedly, it neither abandons its
daemons nor kills them: it keeps their records and the descriptor keeper,
exits 1, and the next ikosd on the root adopts them, exactly as after
``kill -9``.

**Signals.** SIGTERM, SIGINT and SIGPWR begin the orderly shutdown, which
gets ``shutdown_timeout`` seconds (the grace period) before what is left is
killed and the exit status becomes 3 instead of 0; SIGHUP reloads the
configuration; SIGUSR1 logs the status of every daemon; SIGUSR2 reopens the
daemons' log files (after an outside rotation). As PID 1 of a PID namespace
(a container's entry point, ``init=True``) the kernel drops every signal
that has no handler, so the handlers are installed before anything else
runs, and the orphans of the whole namespace, re-parented to ikosd, are
reaped as the subreaper's always are (:func:`~ikos.platform._process.reap_orphans`,
which never takes the exit status of a process ikos watches).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ikos._errors import IkosError, ManagerError, NoSuchDaemon
from ikos.actors._context import InstanceContext
from ikos.manager._exec import ExecHandle, ExecRuntime
from ikos.manager._extension import (
    Config,
    ConfigSource,
    Extension,
    ExtensionHost,
    NodeView,
    Spawner,
)
from ikos.manager._logs import DaemonLogs, OutputForwarder
from ikos.manager._operations import TreeOperations
from ikos.manager._ray import RayHandle, RaySpawner
from ikos.manager._recovery import MARK_DAEMON, MARK_INSTANCE, Marked, Recovery, instance_mark
from ikos.manager._state import StateStore
from ikos.platform._database import DatabaseUnavailable
from ikos.platform._fdstore import FdStore
from ikos.platform._forkserver import ForkServer
from ikos.platform._gc import release_gc
from ikos.platform._heap import HeapTrimmer
from ikos.platform._paths import InstancePaths
from ikos.platform._process import become_subreaper, own, reap_orphans
from ikos.platform._wire import ensure_secret
from ikos.registry._graph import check_graph, start_order, start_waves
from ikos.supervision._runtime import Node, Running, State, SupervisorNode, WorkerNode
from ikos.supervision._spec import Supervisor, validate_tree

if TYPE_CHECKING:  # imported with the first actor (docs/performance.md, "Launch")
    from ikos.actors._stats import ActorFigures
    from ikos.manager._actors import ActorSpawner

log = logging.getLogger("ikos.manager")
translog = logging.getLogger("ikos.daemon")

EXIT_OK, EXIT_FAILED = 0, 1
#: Stopped on request, but not cleanly: the grace period ran out and what was left was killed.
EXIT_UNCLEAN = 3
#: The signals that end ikosd in order (SIGPWR: what a container runtime or UPS sends PID 1).
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGPWR)
#: Every signal ikosd handles, ignored once it is done.
HANDLED_SIGNALS = (*SHUTDOWN_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
#: How long one step of the release after the tree stopped may take: an extension's
#: stop, the control socket's close, the Ray bridge's. Past it ikosd logs an error
#: naming the step and goes on, so that an unbounded wait in one of them never keeps
#: it from releasing the rest and exiting (twice a test saw ikosd stop its whole
#: tree and then never exit, its descriptor keeper still running).
RELEASE_STEP_TIMEOUT = 10.0
#: States in which a worker has a process: leaving them for stopped or failed ends it.
_WITH_PROCESS = frozenset({State.STARTING, State.RUNNING, State.STOPPING})


class InstanceLocked(ManagerError):
    """Another ikosd already runs on this root."""


def default_extensions(
    metrics: tuple[str, int] | tuple[str, int, bool] | None,
) -> list[Extension]:
    """The services every ikosd runs: the registry, run-time daemons, metrics, the IPC
    broker, the resource sampler, alerts, monitors."""
    from ikos.manager._alert_service import AlertService
    from ikos.manager._daemon_service import DaemonService
    from ikos.manager._ipc_service import IpcService
    from ikos.manager._monitor_service import MonitorService
    from ikos.manager._registry_service import RegistryService
    from ikos.manager._sampler_service import SamplerService
    from ikos.manager._spawn_service import SpawnService

    service = None
    if metrics is not None:  # prometheus_client and the HTTP server come with it, never else
        from ikos.manager._metrics import MetricsService

        service = MetricsService(*metrics)
    registry = RegistryService(service)
    extensions: list[Extension] = [registry, DaemonService()]
    if service is not None:
        extensions.append(service)
    extensions.append(IpcService(service))
    sampler = SamplerService(service)
    extensions.append(sampler)
    extensions.append(AlertService(sampler, service, registry))
    extensions.append(SpawnService())
    extensions.append(MonitorService())
    return extensions


class Manager:
    """Runs one supervision tree until shutdown; see the module docstring."""

    def __init__(
        self,
        paths: InstancePaths,
        config: Config | Supervisor,
        *,
        reload: ConfigSource | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        shutdown_timeout: float = 30.0,
        ready_line: bool = True,
        metrics: tuple[str, int] | tuple[str, int, bool] | None = None,
        extensions: Sequence[Extension] | None = None,
        reader_gid: int | None = None,
        init: bool = False,
        log_to_stdout: bool = False,
        ray: tuple[str | None, str] | None = None,
    ) -> None:
        if isinstance(config, Supervisor):
            config = Config(config)
        self.paths = paths
        self._config = config
        self._tree = validate_tree(config.tree)
        self.graph = check_graph(self._tree)
        self.reload_source = reload
        self.max_message_bytes = max_message_bytes
        self.shutdown_timeout = shutdown_timeout
        self.ready_line = ready_line
        #: The group whose members may read private verbs (``[ikosd] readers``).
        self.reader_gid = reader_gid
        #: PID 1 of a PID namespace: signals handled from the first moment.
        self.init = init
        #: Daemons' lines also on ikosd's stdout and stderr (``[ikosd] log_to_stdout``).
        self.log_to_stdout = log_to_stdout
        self.mark = instance_mark(paths)
        self.fdstore = FdStore(paths.run_dir / "fdstore.sock")
        self.forkserver = ForkServer({MARK_INSTANCE: self.mark})
        self.logs = DaemonLogs(paths.log_dir, self.fdstore)
        # the actors' spawner, and the actor runtime it imports, come with the first
        # actor (in the tree, a reload or ikosctl): a tree of executables does without
        self._actors: ActorSpawner | None = None
        self.execs = ExecRuntime(
            paths,
            self.forkserver,
            self.logs,
            self._forked,
            environ={MARK_INSTANCE: self.mark},
            daemon_variable=MARK_DAEMON,
        )
        # issue 13: children placed on Ray; the bridge (and Ray) start with the first one
        self.ray = RaySpawner(paths, *(ray or (None, "ikos")))
        #: The spawners by kind; the actors' is added by :attr:`actors` when first needed.
        self.spawners: dict[str, Spawner] = {"exec": self.execs, "ray": self.ray}
        self.extensions: list[Extension] = (
            list(extensions) if extensions is not None else default_extensions(metrics)
        )
        self._started: list[Extension] = []
        #: gives the heap's free pages back after a burst of transitions (a wave)
        self.heap = HeapTrimmer()
        self.ops = TreeOperations(self)
        self.state: StateStore | None = None
        self.recovery: Recovery | None = None
        self.nodes: dict[str, Node] = {}
        self.root: SupervisorNode | None = None
        self.ctx: InstanceContext | None = None
        self.exit_code = EXIT_OK
        self.started_at = time.time()
        self.control: Any = None
        self.orphans_reaped = 0
        self._stop: asyncio.Event | None = None
        self._lock_fd: int | None = None
        self._shutting_down = False
        self._abandoned = False
        self._reload_lock = asyncio.Lock()
        self._reap_retry: asyncio.TimerHandle | None = None
        self._signals_handled = False
        #: the error with which a service refused to start, ending ikosd before recovery
        self._refusal: IkosError | None = None

    # -- the tree and its index (TreeView) -------------------------------------------------

    @property
    def tree(self) -> Supervisor:
        """The tree's current specification (configuration, extensions, run-time changes)."""
        return self._tree

    @property
    def config(self) -> Config:
        return self._config

    def set_tree(self, tree: Supervisor, graph: Any) -> None:
        """Replace the tree's specification and dependency graph (by the operations only)."""
        self._tree, self.graph = tree, graph

    def node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise NoSuchDaemon(f"no daemon, actor or supervisor named '{name}'")
        return node

    def find(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def walk(self) -> Iterator[Node]:
        return iter(self.root.walk() if self.root is not None else ())

    def worker_of_pid(self, pid: int) -> WorkerNode | None:
        for node in self.nodes.values():
            if not isinstance(node, WorkerNode) or node.handle is None:
                continue
            if node.handle.pid == pid and node.handle.alive:
                return node
        return None

    def status_of(self, node: NodeView) -> dict[str, Any]:
        """A node's status object (docs/protocol.md), decorated by its spawner and extensions."""
        assert isinstance(node, Node)
        out = node.status()
        if isinstance(node, WorkerNode):
            self._spawner(node).decorate_status(node, out)
            if self.state is not None and not self.state.saved(node.name):
                out["state_saved"] = False
        for ext in self._started:
            try:
                ext.decorate_status(node, out)
            except Exception:
                log.exception("extension %s failed to decorate a status", ext.name)
        return out

    def tree_json(self, node: Node | None = None) -> dict[str, Any]:
        node = node or self.root
        assert node is not None
        out = self.status_of(node)
        if isinstance(node, SupervisorNode):
            out["children"] = [self.tree_json(c) for c in node.children]
        return out

    def list_json(self) -> list[dict[str, Any]]:
        return [self.status_of(n) for n in self.walk()]

    @property
    def actors(self) -> ActorSpawner:
        """The actors' spawner, made (and its modules imported) on first use."""
        if self._actors is None:
            from ikos.manager._actors import ActorSpawner

            self._actors = ActorSpawner(
                self.paths, self.forkserver, self.fdstore, self.logs, self._context, self._forked
            )
            # ActorSpawner.start() has nothing to start: no await needed to add it late
            self.spawners["actor"] = self._actors
        return self._actors

    @property
    def dead_letters(self) -> Mapping[str, int]:
        return self._actors.dead_letters if self._actors is not None else {}

    def actor_figures(self, name: str) -> ActorFigures | None:
        return self._actors.figures(name) if self._actors is not None else None

    def health(self) -> dict[str, Any]:
        """How ikosd itself is doing: its state store, fork server and reaper."""
        return {
            "state_store": self.state.health() if self.state is not None else None,
            "fork_server_restarts": self.forkserver.restarts,
            "orphans_reaped": self.orphans_reaped,
        }

    # -- Host interface (used by the supervision runtime) -------------------------------

    def node_added(self, node: Node) -> None:
        self.nodes[node.name] = node

    def node_removed(self, node: Node) -> None:
        if self.nodes.get(node.name) is node:
            del self.nodes[node.name]
        if isinstance(node, SupervisorNode):
            for child in node.walk()[1:]:
                self.node_removed(child)

    def transition(self, node: Node, old: State, new: State, why: str) -> None:
        if isinstance(node, WorkerNode):
            self._journal(node, old, new)
        level = logging.WARNING if new is State.FAILED else logging.INFO
        translog.log(level, "%s %s: %s -> %s (%s)", node.kind, node.name, old.value, new.value, why)
        for ext in self._started:
            try:
                ext.on_transition(node, old, new, why)
            except Exception:  # an extension must never break the tree
                log.exception("extension %s failed on a transition", ext.name)
        self.heap.poke()

    def _journal(self, node: WorkerNode, old: State, new: State) -> None:
        handle = node.handle
        if new is State.RUNNING and handle is not None:
            if self.state is not None and not isinstance(handle, RayHandle):
                sid = handle.sid if isinstance(handle, ExecHandle) else handle.pid
                started = node.started_at or time.time()
                self.state.running(node.name, node.kind, handle.pid, sid, node.restarts, started)
        elif new in (State.STOPPED, State.FAILED) and old in _WITH_PROCESS:
            if self.state is not None:
                self.state.gone(node.name)
            self._spawner(node).exited(node)

    async def before_stop(self, node: WorkerNode) -> None:
        if isinstance(node.handle, ExecHandle):  # a unit's ExecStop= runs before the signal
            await node.handle.run_stop_commands()
        for ext in self._started:
            try:
                await ext.before_stop(node)
            except Exception:  # an extension must never break the tree
                log.exception("extension %s failed before a stop", ext.name)

    def upgraded(self, node: WorkerNode, old_pid: int) -> None:
        """A hot code upgrade gave ``node`` a new process: record it, tell the extensions."""
        handle = node.handle
        if handle is not None and self.state is not None:
            started = node.started_at or time.time()
            self.state.running(node.name, node.kind, handle.pid, handle.pid, node.restarts, started)
        for ext in self._started:
            try:
                ext.on_upgrade(node, old_pid)
            except Exception:  # an extension must never break the tree
                log.exception("extension %s failed on an upgrade", ext.name)

    def root_failed(self, reason: str) -> None:
        log.critical("the root supervisor gave up (%s): stopping everything", reason)
        self.exit_code = EXIT_FAILED
        if self._stop is not None:
            self._stop.set()

    def retire(self, node: WorkerNode) -> None:
        self._spawner(node).retire(node)

    def _spawner(self, node: WorkerNode) -> Spawner:
        """The spawner of ``node``: by its kind, or Ray's for a child placed on Ray."""
        if getattr(node.spec, "placement", None) is not None:
            return self.ray
        return self._kind(node.kind)

    def _kind(self, kind: str) -> Spawner:
        """The spawner of the children of ``kind`` (the actors' made on first use)."""
        return self.actors if kind == "actor" else self.spawners[kind]

    async def spawn(self, node: WorkerNode) -> Running:
        if getattr(node.spec, "placement", None) is not None:
            return await self.ray.spawn(node)  # owned by the Ray bridge: never adopted
        found = self.recovery.take(node.name, node.kind) if self.recovery is not None else None
        if found is None:
            return await self._kind(node.kind).spawn(node)
        record, fds = found
        node.restarts = record.restarts
        try:
            return self._kind(node.kind).adopt(node, record.pid, record.sid, fds)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _forked(self, node: WorkerNode, pid: int, gated: bool) -> None:
        """A process exists for ``node``: record it (if ``gated``, before it runs user code)."""
        own(pid)
        if self.state is not None:
            self.state.starting(node.name, node.kind, pid, pid, node.restarts, now=gated)

    def _context(self) -> InstanceContext:
        assert self.ctx is not None, "the manager has not started"
        return self.ctx

    # -- lifecycle ----------------------------------------------------------------------

    def _lock_instance(self) -> None:
        pid_file = self.paths.pid_file
        fd = os.open(pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InstanceLocked(
                f"another ikosd (pid {holder}) already runs on {self.paths.run_dir}; "
                "stop it first or use another --root"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock_instance(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.paths.pid_file.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def _order(self, sup: Supervisor) -> list[str]:
        return start_order(sup, self.graph)

    def _waves(self, sup: Supervisor) -> list[list[str]]:
        waves = start_waves(sup, self.graph)
        # The extensions' leading subtrees (the IPC broker's) need nothing and may be
        # needed by anything: a wave of their own, first. Names are unique in a tree, so
        # only the root can hold them.
        leading = {n for ext in self._started for n in ext.leading}
        first = [n for wave in waves for n in wave if n in leading]
        if not first:
            return waves
        rest = ([n for n in wave if n not in leading] for wave in waves)
        return [first, *(wave for wave in rest if wave)]

    def preload_modules(self, tree: Supervisor) -> list[str]:
        """The modules of the tree's actor classes, imported once by the fork server.

        With ``ikos.ipc`` first: ``import ikos`` no longer imports it (ikosd does
        without it), and the actors, forked from the server, would each import it
        again at their first publish or subscribe instead of sharing its pages.
        """
        mods: list[str] = []
        for _, spec in tree.walk():
            if isinstance(spec, Supervisor):
                for child in spec.children:
                    actor_path = getattr(child, "actor_path", None)
                    if isinstance(actor_path, str):
                        mod = actor_path.partition(":")[0]
                        if mod != "__main__" and mod not in mods:
                            mods.append(mod)
        return ["ikos.ipc", *mods] if mods else mods

    def _prepare(self) -> None:
        """Directories, lock, secret, state: one clear error when the disk says no."""
        try:
            self.paths.create()
            self._lock_instance()
            secret = ensure_secret(self.paths.secret_file)
            self.ctx = InstanceContext(self.paths, secret, self.max_message_bytes)
            # what clients outside the tree need to know of this instance (frame limit)
            _write_atomically(
                self.paths.instance_file,
                json.dumps({"pid": os.getpid(), "max_message_bytes": self.max_message_bytes}),
            )
            self.state = StateStore(self.paths.state_dir / "state.db")
        except DatabaseUnavailable as exc:
            self._unlock_instance()
            raise ManagerError(str(exc)) from None
        except OSError as exc:
            self._unlock_instance()
            where = f" {exc.filename}" if exc.filename else ""
            raise ManagerError(
                f"cannot use the instance's files under {self.paths.root or self.paths.run_dir}:"
                f"{where}: {exc.strerror or exc}"
            ) from None

    async def run(self) -> int:
        """Start the tree, serve until shutdown, stop everything; return the exit status."""
        self._stop = asyncio.Event()
        if self.init:
            # PID 1: a SIGTERM without a handler is dropped by the kernel, and
            # `docker stop` would wait its timeout and kill the whole container
            self._handle_signals()
        self._prepare()
        if self.log_to_stdout:
            self.logs.forwarder = OutputForwarder()
        try:
            await self._serve()
        except Exception as exc:
            self._abandoned = True
            self.exit_code = EXIT_FAILED
            if exc is self._refusal:
                # A service refused to start (its metrics address is taken), before
                # recovery: a crashed predecessor's daemons and their records stay
                # as they are, for the next ikosd; main() prints the one line.
                raise
            # A bug of the manager's own: keep the daemons adoptable rather than
            # abandoning or killing them, and let the next ikosd take over.
            log.critical(
                "ikosd failed unexpectedly; its daemons keep running and the next ikosd "
                "on this root adopts them",
                exc_info=True,
            )
        finally:
            await self._release()
        log.info("ikosd stopped (exit status %d)", self.exit_code)
        return self.exit_code

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        if not become_subreaper():
            log.warning("could not become a child subreaper: exit statuses may be lost")
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self._reap()  # what exited before the handler was there (PID 1: from the start)
        # asyncio's wake-up descriptor, without the warning for every signal that
        # finds it full: under a storm of signals, printing that warning with its
        # traceback took all of the main thread's time (the loop never drained it)
        signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
        scanning = Recovery.scan_soon(self.paths)  # while the extensions start
        try:
            await self._serve_scanned(scanning)
        finally:
            if not scanning.done():
                scanning.cancel()  # a refusal before recovery: the thread ends on its own

    async def _serve_scanned(self, scanning: asyncio.Future[list[Marked]]) -> None:
        from ikos.manager._control_server import ControlServer

        assert self._stop is not None
        self.control = ControlServer(self, reader_gid=self.reader_gid)
        self.control.register("start_child", "control", self._verb_start_child)
        self.control.register("terminate_child", "control", self._verb_terminate_child)
        for spawner in list(self.spawners.values()):
            await spawner.start()
        host = ExtensionHost(self, self.ops, self.control)
        for ext in self.extensions:
            try:
                await ext.start(host)
            except IkosError as exc:  # a refusal, named by the service (an OSError is a bug)
                self._refusal = exc
                raise
            self._started.append(ext)
        tree = self._tree
        for ext in self._started:
            tree = ext.amend_tree(tree, at_start=True)
        if tree is not self._tree:
            self.set_tree(validate_tree(tree), check_graph(tree))
        # Recovery decides on the tree as it will run (created daemons included), and
        # before the fork server exists: it carries the instance's marker too.
        assert self.state is not None
        self.recovery = Recovery(self.paths, self.state, self.fdstore)
        await self.recovery.run({spec.name for _, spec in self._tree.walk()}, scanning)
        # launched in the background for a tree of actors, else by the first spawn that
        # needs it (an executable posix_spawn cannot start): ikosd answers without
        # waiting for its preload, and a tree of executables never starts it
        failed = await self.forkserver.start(
            sys.path, self.preload_modules(self._tree), lazily=True
        )
        if any(isinstance(getattr(s, "actor_path", None), str) for _, s in self._tree.walk()):
            self.forkserver.launch_soon()  # actors will need it: ready it, without waiting
        for mod, err in failed.items():
            log.warning("fork server could not preload %s: %s", mod, err)
        await self.control.start()  # listening once there is something to answer about
        release_gc()  # held by ikosd's main() through its start
        self._handle_signals()
        self.root = SupervisorNode(self._tree, None, self, self._order, self._waves)
        self.node_added(self.root)
        starting = asyncio.ensure_future(self.root.start())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # SIGTERM while daemons are still starting: do not wait for their
            # start timeouts; stop what runs, in reverse order, now
            starting.cancel()
            await self._stop_during_start()
            return
        try:
            starting.result()
        except IkosError as exc:
            log.critical("the root supervisor failed to start: %s", exc)
            self.exit_code = EXIT_FAILED
            self._stop.set()
        self.recovery.finish()
        if not self._stop.is_set():
            self._announce_ready()
        await stopping
        await self._shutdown()

    async def _release(self) -> None:
        """Stop the extensions and release every resource; keep the daemons' if abandoned."""
        loop = asyncio.get_running_loop()
        self.heap.close()
        for ext in reversed(self._started):
            log.debug("stopping the %s extension", ext.name)  # names the step a hang is in
            await _release_step(ext.stop(), f"the {ext.name} extension's stop")
        self._started.clear()
        log.debug("extensions stopped; closing the control socket and the stores")
        if self.control is not None:
            await _release_step(self.control.close(), "the control socket's close")
        if self._reap_retry is not None:
            self._reap_retry.cancel()
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(signal.SIGCHLD)
        # every placed actor has stopped: the bridge leaves
        # (which may wait 20 s for the bridge to leave the cluster, then kill it)
        await _release_step(self.ray.aclose(), "the Ray bridge's close", 40.0)
        self.forkserver.close()
        self.execs.close()
        self.logs.close()
        if self.state is not None:
            orderly = not self._abandoned and (self.exit_code == EXIT_OK or self._shutting_down)
            if orderly:
                self.state.clear()
            self.state.close()
        if self._abandoned:
            self.fdstore.close()  # the keeper stays, holding the daemons' descriptors
            if self._actors is not None:
                self._actors.listeners.clear()  # the keeper has them; the files stay
        else:
            self.fdstore.quit()
            for spawner in list(self.spawners.values()):
                spawner.close()
        with contextlib.suppress(FileNotFoundError):
            self.paths.instance_file.unlink()
        self._unlock_instance()
        # a signal during or after the cleanup must not kill ikosd half-way: the
        # handlers become SIG_IGN, in one step each (never SIG_DFL in between;
        # ikos.run puts the caller's back)
        if self._signals_handled:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        if self.init:
            reap_orphans()  # PID 1 leaves no zombie behind, its own helpers included

    def _handle_signals(self) -> None:
        """Install ikosd's signal handlers (once: a second time would undo the SIG_IGN
        that :meth:`request_shutdown` leaves)."""
        if self._signals_handled:
            return
        loop = asyncio.get_running_loop()
        for sig in SHUTDOWN_SIGNALS:
            _handle_signal(loop, sig, self.request_shutdown)
        _handle_signal(loop, signal.SIGHUP, self._on_sighup)
        _handle_signal(loop, signal.SIGUSR1, self._log_status)
        _handle_signal(loop, signal.SIGUSR2, self.logs.reopen)
        self._signals_handled = True

    def _log_status(self) -> None:
        """SIGUSR1: one log line per daemon and supervisor, for a look from outside."""
        for node in self.walk():
            handle = node.handle if isinstance(node, WorkerNode) else None
            log.info(
                "status: %s %s %s pid %s restarts %d",
                node.kind,
                node.name,
                node.state.value,
                handle.pid if handle is not None and handle.alive else "-",
                node.restarts,
            )

    def _reap(self) -> None:
        """SIGCHLD: reap the orphans re-parented to ikosd (never a watched process)."""
        self._reap_retry = None
        reaped, again = reap_orphans()
        if reaped:
            self.orphans_reaped += len(reaped)
            log.debug("reaped %d orphaned processes: %s", len(reaped), reaped[:20])
        if again and self._reap_retry is None:
            # a watched child stands first in line: its owner collects it on its turn
            self._reap_retry = asyncio.get_running_loop().call_later(0.05, self._reap)

    def _announce_ready(self) -> None:
        running = sum(
            1 for n in self.nodes.values() if n.kind != "supervisor" and n.state is State.RUNNING
        )
        if self.ready_line:
            notes = "".join(f", {note}" for ext in self._started if (note := ext.ready_note()))
            line = (
                f"ikosd ready: {running} daemon{'' if running == 1 else 's'} running, "
                f"pid {os.getpid()}, "
                f"control socket {self.paths.control_socket}{notes}"
            )
            if not _write_line(sys.stdout, line):
                log.warning("stdout is closed: %s", line)
        log.info("all daemons started: %d running", running)
        _sd_notify(f"READY=1\nSTATUS=running\nMAINPID={os.getpid()}")

    def request_shutdown(self) -> None:
        """Begin an orderly shutdown (SIGTERM, SIGINT, ``ikosctl shutdown``)."""
        if self._stop is not None:
            self._stop.set()
        if self._signals_handled and threading.current_thread() is threading.main_thread():
            # From now on another SIGTERM or SIGINT adds nothing: let the kernel
            # drop them. Handled one by one, a storm of them (a service manager's
            # loop, a user's `kill` in a loop) kept ikosd's main thread from ever
            # finishing the shutdown. One ``signal.signal`` each: never SIG_DFL.
            for sig in SHUTDOWN_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    async def _shutdown(self) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        _sd_notify("STOPPING=1")
        root = self.root
        if root is None:
            return
        log.info("stopping all daemons in reverse start order")
        try:
            await asyncio.wait_for(root.terminate("ikosd shutting down"), self.shutdown_timeout)
        except TimeoutError:
            log.error(
                "shutdown did not finish within %gs: killing what is left", self.shutdown_timeout
            )
            if self.exit_code == EXIT_OK:
                self.exit_code = EXIT_UNCLEAN
            root.kill_subtree()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_all_exited(), 10)
        root.close()

    async def _stop_during_start(self) -> None:
        self._shutting_down = True
        _sd_notify("STOPPING=1")
        root = self.root
        if root is None:
            return
        log.info("shutdown requested while starting: stopping what runs")
        root.close()  # cancels the supervisors' command queues, start included
        for node in reversed(root.walk()):
            if isinstance(node, WorkerNode) and node.handle is not None and node.handle.alive:
                try:
                    await asyncio.wait_for(
                        node.terminate("ikosd shutting down"), self.shutdown_timeout
                    )
                except TimeoutError:
                    if self.exit_code == EXIT_OK:
                        self.exit_code = EXIT_UNCLEAN
                    node.handle.kill()

    async def _wait_all_exited(self) -> None:
        for node in list(self.nodes.values()):
            if isinstance(node, WorkerNode) and node.handle is not None:
                await node.handle.exited

    def _on_sighup(self) -> None:
        if self.root is None:  # PID 1's handlers come before the tree does
            log.warning("SIGHUP before the tree started: nothing to reload yet")
            return
        asyncio.get_running_loop().create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            result = await self.reload_config()
            log.info("configuration reloaded: %s", json.dumps(result))
        except IkosError as exc:
            log.error("configuration reload refused: %s", exc)

    async def reload_config(self) -> dict[str, list[str]]:
        """Apply a re-read configuration: start added, stop removed, restart changed.

        The result lists the daemons ``added``, ``removed`` and ``changed``, and
        the configuration's ``warnings`` (unknown keys), also logged.
        """
        if self.reload_source is None:
            raise ManagerError(
                "ikosd was started without a configuration file (-c): nothing to reload"
            )
        async with self._reload_lock:  # two reloads at once would split one diff in two
            config = self.reload_source()
            tree = validate_tree(config.tree)
            for ext in self._started:
                tree = ext.amend_tree(tree, at_start=False)
            tree = validate_tree(tree)
            result = await self.ops.reconcile(tree)
            self._config = config
            for ext in self._started:
                try:
                    await ext.on_reload(config)
                except Exception:
                    log.exception("extension %s failed to take the reload", ext.name)
            for warning in config.warnings:
                log.warning("%s", warning)
            result["warnings"] = list(config.warnings)
            return result

    # -- the manager's own control verbs ------------------------------------------------

    async def _verb_start_child(self, req: Any) -> Any:
        args = req.args.get("args", [])
        if not isinstance(args, list):
            raise ManagerError("'start_child': 'args' must be a list", "bad_request")
        return await self.ops.start_child(req.text("supervisor"), tuple(args))

    async def _verb_terminate_child(self, req: Any) -> Any:
        return await self.ops.terminate_child(req.text("name"))


async def _release_step(
    step: Coroutine[Any, Any, None], what: str, timeout: float | None = None
) -> None:
    """Run one step of the release, within ``timeout`` (default :data:`RELEASE_STEP_TIMEOUT`).

    What goes wrong is logged, never raised.

    A step that overruns is cancelled and not waited for: a step that would
    not end would not end its cancellation either.
    """
    limit = RELEASE_STEP_TIMEOUT if timeout is None else timeout
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait((task,), timeout=limit)
    if not done:
        task.cancel()
        log.error("%s did not end within %g s: cancelled, ikosd releases the rest", what, limit)
        return
    exc = task.exception()
    if exc is not None:
        log.error("%s failed", what, exc_info=exc)


def _handle_signal(
    loop: asyncio.AbstractEventLoop, sig: int, callback: Callable[[], object]
) -> None:
    """Have ``callback`` run on ``loop`` whenever ``sig`` arrives.

    A Python-level handler rather than ``loop.add_signal_handler``: Python runs
    it in the main thread whichever thread the kernel delivers the signal to,
    and asyncio's wake-up descriptor (set for SIGCHLD) wakes the loop. The
    difference matters at the end: taking a handler off the loop puts back
    SIG_DFL, and a SIGTERM that lands on another of ikosd's threads in that
    moment (the sampler's, the metrics server's) killed it after a clean
    shutdown (status -15). Replacing a Python handler never leaves SIG_DFL.

    Signals are coalesced: while one call is pending, more of the same signal
    add nothing, so a burst of them cannot grow the loop's ready queue faster
    than it drains (one callback each starved the shutdown under a storm).
    """
    pending = False

    def run() -> None:
        nonlocal pending
        pending = False
        callback()

    def handler(signum: int, frame: object) -> None:
        nonlocal pending
        if not pending:
            pending = True
            loop.call_soon_threadsafe(run)

    signal.signal(sig, handler)


def _write_line(stream: Any, line: str) -> bool:
    """Write one line to ikosd's stdout; False (and stdout silenced) if it is closed."""
    try:
        stream.write(line + "\n")
        stream.flush()
        return True
    except (OSError, ValueError):
        # a reader that went away (`ikosd | head -3`) must not take ikosd down, now
        # or when the interpreter flushes stdout at exit
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        return False


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sd_notify(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify %s: %s", address, exc)
