"""ikosd's core: one asyncio loop that owns the tree, the processes and the control socket.

The manager is the supervision tree's host: it spawns processes through the
fork server, watches them through pidfds, owns each actor's listening socket
(so that the mailbox address survives restarts) and records every state
transition. It never blocks its loop: spawns are requests to the fork
server, exits are pidfd readiness, asks made on behalf of ``ikosctl call``
run in a worker thread.

Shutdown is the root supervisor's orderly terminate (reverse start order,
each child's shutdown timeout, then SIGKILL); when the root gives up the
manager stops everything and exits with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ikos._codec import encode
from ikos._errors import IkosError, ManagerError, NoSuchDaemon, SpawnError
from ikos.actors._context import InstanceContext
from ikos.actors._runtime import ActorBoot
from ikos.manager._exec import ExecHandle, ExecRuntime
from ikos.manager._state import RunningRecord, StateStore
from ikos.platform._fdstore import FdStore
from ikos.platform._forkserver import ForkServer
from ikos.platform._paths import InstancePaths
from ikos.platform._process import ProcessHandle, become_subreaper
from ikos.platform._unix import bind_unix
from ikos.platform._wire import ensure_secret
from ikos.registry._graph import check_graph, start_order, start_waves
from ikos.supervision._runtime import Node, Running, State, SupervisorNode, WorkerNode
from ikos.supervision._spec import Child, Exec, Supervisor, resolve_actor_class, validate_tree

log = logging.getLogger("ikos.manager")
translog = logging.getLogger("ikos.daemon")

ACTOR_ENTRY = "ikos.actors._runtime:spawn_entry"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: Services that extend the manager, imported lazily: each has
#: ``async start(manager)``, ``async stop()`` and may define
#: ``on_transition(node, old, new, why)`` and ``decorate_status(node, status)``
#: (add fields to a status object). They register their control verbs with
#: ``manager.control.register``.
EXTENSIONS: list[str] = [
    "ikos.manager._registry_service:RegistryService",
    "ikos.manager._daemon_service:DaemonService",
]


class InstanceLocked(ManagerError):
    """Another ikosd already runs on this root."""


class Manager:
    """Runs one supervision tree until shutdown; see the module docstring."""

    def __init__(
        self,
        paths: InstancePaths,
        tree: Supervisor,
        *,
        config_file: Path | None = None,
        reload_tree: Callable[[], Supervisor] | None = None,
        mailbox_size: int = 1000,
        max_message_bytes: int = 64 * 1024 * 1024,
        shutdown_timeout: float = 30.0,
        ready_line: bool = True,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        self.paths = paths
        self.tree = validate_tree(tree)
        self.graph = check_graph(self.tree)
        self.config_file = config_file
        self.reload_tree = reload_tree
        self.mailbox_size = mailbox_size
        self.max_message_bytes = max_message_bytes
        self.shutdown_timeout = shutdown_timeout
        self.ready_line = ready_line
        self.metrics_address = metrics
        self._metrics: Any = None
        self.extensions: list[Any] = []
        self.execs = ExecRuntime(self)
        self.fdstore = FdStore(paths.run_dir / "fdstore.sock")
        self.state: StateStore | None = None
        self.adoptable: dict[str, RunningRecord] = {}
        self.held_fds: dict[str, dict[str, int]] = {}
        self.forkserver = ForkServer()
        self.nodes: dict[str, Node] = {}
        self.listeners: dict[str, socket.socket] = {}
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.exit_code = EXIT_OK
        self.started_at = time.time()
        self.root: SupervisorNode | None = None
        self.ctx: InstanceContext | None = None
        self._stop: asyncio.Event | None = None
        self._lock_fd: int | None = None
        self.control: Any = None
        self._shutting_down = False
        self._reload_lock = asyncio.Lock()

    # -- Host interface (used by the supervision runtime) -------------------

    def node_added(self, node: Node) -> None:
        self.nodes[node.name] = node

    def node_removed(self, node: Node) -> None:
        if self.nodes.get(node.name) is node:
            del self.nodes[node.name]
        if isinstance(node, SupervisorNode):
            for child in node.walk()[1:]:
                self.node_removed(child)

    def transition(self, node: Node, old: State, new: State, why: str) -> None:
        self.transitions[(node.name, new.value)] += 1
        if self.state is not None and isinstance(node, WorkerNode):
            handle = node.handle
            if new is State.RUNNING and handle is not None:
                sid = handle.sid if isinstance(handle, ExecHandle) else handle.pid
                self.state.running(
                    node.name,
                    node.kind,
                    handle.pid,
                    sid,
                    node.restarts,
                    node.started_at or time.time(),
                )
            elif old is State.RUNNING:
                self.state.gone(node.name)
        if new in (State.STOPPED, State.FAILED) and node.last_exit and node.last_exit.dead_letters:
            self.dead_letters[node.name] += node.last_exit.dead_letters
        level = logging.WARNING if new is State.FAILED else logging.INFO
        translog.log(level, "%s %s: %s -> %s (%s)", node.kind, node.name, old.value, new.value, why)
        for ext in self.extensions:
            hook = getattr(ext, "on_transition", None)
            if hook is not None:
                try:
                    hook(node, old, new, why)
                except Exception:  # an extension must never break the tree
                    log.exception("extension %s failed on a transition", type(ext).__name__)

    def root_failed(self, reason: str) -> None:
        log.critical("the root supervisor gave up (%s): stopping everything", reason)
        self.exit_code = EXIT_FAILED
        if self._stop is not None:
            self._stop.set()

    def retire(self, node: WorkerNode) -> None:
        sock = self.listeners.pop(node.name, None)
        if sock is not None:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths.actor_socket(node.name).unlink()
            self.fdstore.drop(node.name, ["listener"])

    async def spawn(self, node: WorkerNode) -> Running:
        spec = node.spec
        record = self.adoptable.pop(spec.name, None)
        if record is not None and record.kind == node.kind:
            return self._adopt(node, record)
        if record is not None:
            self._orphan(record)
        if isinstance(spec, Child):
            return await self._spawn_actor(spec)
        return await self.execs.spawn(spec)

    # -- spawning ----------------------------------------------------------

    def _listener(self, name: str) -> socket.socket:
        sock = self.listeners.get(name)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bind_unix(sock, self.paths.actor_socket(name), 0o600)
            sock.listen(1024)
            self.listeners[name] = sock
            self.fdstore.put(name, "listener", sock.fileno())
        return sock

    async def _spawn_actor(self, spec: Child) -> ProcessHandle:
        try:
            cls = resolve_actor_class(spec.actor)
        except (ImportError, AttributeError, ValueError) as exc:
            raise SpawnError(spec.name, "actor", f"cannot import {spec.actor!r}: {exc}")
        assert self.ctx is not None
        boot = ActorBoot(
            spec.name, cls, tuple(spec.args), dict(spec.kwargs), self.ctx, spec.mailbox_size
        )
        try:
            payload = encode(boot)
        except Exception as exc:
            raise SpawnError(spec.name, "args", f"cannot be sent to the actor process: {exc}")
        modules = [] if cls.__module__ == "__main__" else [cls.__module__]
        listener = self._listener(spec.name)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = await self.forkserver.spawn(
                spec.name, ACTOR_ENTRY, payload, [listener.fileno(), w], modules
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.fdstore.put(spec.name, "status", r)
        return ProcessHandle(pid, status_fd=r)

    # -- adoption after a crash of ikosd -----------------------------------

    def _adopt(self, node: WorkerNode, record: RunningRecord) -> Running:
        """Take over a daemon that kept running while no ikosd was there."""
        fds = self.held_fds.pop(node.name, {})
        node.restarts = record.restarts
        log.info("%s: adopting pid %d, left running by the previous ikosd", node.name, record.pid)
        if isinstance(node.spec, Child):
            listener = fds.pop("listener", None)
            if listener is not None:
                self.listeners[node.name] = socket.socket(fileno=listener)
            handle = ProcessHandle(record.pid, status_fd=fds.pop("status", None))
            if not handle.ready.done():
                handle.ready.set_result({"event": "ready", "pid": record.pid, "adopted": True})
            result: Running = handle
        else:
            result = self.execs.adopt(node.spec, record.pid, record.sid, fds)
        for fd in fds.values():
            os.close(fd)
        return result

    def _orphan(self, record: RunningRecord) -> None:
        """A daemon left running that the tree no longer has: stop it, never duplicate it."""
        log.warning(
            "%s (pid %d) was left running but is no longer in the tree: stopping it",
            record.name,
            record.pid,
        )
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(record.pid)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        for fd in self.held_fds.pop(record.name, {}).values():
            os.close(fd)
        self.fdstore.drop(record.name)

    # -- lifecycle ---------------------------------------------------------

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
        return start_waves(sup, self.graph)

    def preload_modules(self, tree: Supervisor) -> list[str]:
        mods: list[str] = []
        for _, spec in tree.walk():
            if isinstance(spec, Supervisor):
                for child in spec.children:
                    if isinstance(child, Child):
                        path = child.actor_path
                        mod = path.partition(":")[0]
                        if mod != "__main__" and mod not in mods:
                            mods.append(mod)
        return mods

    async def run(self) -> int:
        """Start the tree, serve until shutdown, stop everything; return the exit status."""
        from ikos.manager._control_server import ControlServer

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.paths.create()
        self._lock_instance()
        try:
            if not become_subreaper():
                log.warning("could not become a child subreaper: exit statuses may be lost")
            secret = ensure_secret(self.paths.secret_file)
            self.ctx = InstanceContext(self.paths, secret, self.max_message_bytes)
            # what clients outside the tree need to know of this instance (frame limit)
            _write_atomically(
                self.paths.instance_file,
                json.dumps({"pid": os.getpid(), "max_message_bytes": self.max_message_bytes}),
            )
            self._recover()
            failed = await self.forkserver.start(sys.path, self.preload_modules(self.tree))
            for mod, err in failed.items():
                log.warning("fork server could not preload %s: %s", mod, err)
            self.control = ControlServer(self)
            self.control.register("start_child", True, self._verb_start_child)
            self.control.register("terminate_child", True, self._verb_terminate_child)
            await self.control.start()
            await self.execs.start()
            if self.metrics_address is not None:
                from ikos.manager._metrics import serve_metrics

                self._metrics = serve_metrics(self, *self.metrics_address)
            for path in EXTENSIONS:
                from ikos.platform._forkserver import resolve_entry

                ext = resolve_entry(path)()
                await ext.start(self)
                self.extensions.append(ext)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self.root = SupervisorNode(self.tree, None, self, self._order, self._waves)
            self.node_added(self.root)
            starting = asyncio.ensure_future(self.root.start())
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                try:
                    starting.result()
                except IkosError as exc:
                    log.critical("the root supervisor failed to start: %s", exc)
                    self.exit_code = EXIT_FAILED
                    self._stop.set()
                for record in list(self.adoptable.values()):
                    self._orphan(record)
                self.adoptable.clear()
                if not self._stop.is_set():
                    self._announce_ready()
                await stopping
                await self._shutdown()
            else:
                # SIGTERM while daemons are still starting: do not wait for their
                # start timeouts; stop what runs, in reverse order, now
                starting.cancel()
                await self._stop_during_start()
        finally:
            for ext in reversed(self.extensions):
                try:
                    await ext.stop()
                except Exception:
                    log.exception("extension %s failed to stop", type(ext).__name__)
            if self.control is not None:
                await self.control.close()
            if self._metrics is not None:
                self._metrics.shutdown()
                self._metrics.server_close()
            self.forkserver.close()
            self.execs.close()
            if self.state is not None:
                if self.exit_code == EXIT_OK or self._shutting_down:
                    self.state.clear()
                self.state.close()
            self.fdstore.quit()
            for name in list(self.listeners):
                sock = self.listeners.pop(name)
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    self.paths.actor_socket(name).unlink()
            with contextlib.suppress(FileNotFoundError):
                self.paths.instance_file.unlink()
            self._unlock_instance()
            # a signal during or after the cleanup must not kill ikosd half-way: keep
            # the handlers, as no-ops (asyncio.run removes them when the loop closes)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.add_signal_handler(sig, _ignore_signal)
        log.info("ikosd stopped (exit status %d)", self.exit_code)
        return self.exit_code

    def _recover(self) -> None:
        """Read what a previous ikosd left running, and the descriptors it deposited."""
        try:
            self.held_fds = self.fdstore.open()
        except OSError as exc:
            log.warning("no descriptor keeper (%s): a crash of ikosd would break log pipes", exc)
        self.state = StateStore(self.paths.state_dir / "state.db")
        records = self.state.load()
        for name, record in records.items():
            if record.still_running():
                self.adoptable[name] = record
            else:
                log.info("%s (pid %d) ended while no ikosd was running", name, record.pid)
        for name in [n for n in self.held_fds if n not in self.adoptable]:
            for key, fd in self.held_fds.pop(name).items():
                os.close(fd)
                self.fdstore.drop(name, [key])
        self.state.clear()

    def _announce_ready(self) -> None:
        running = sum(
            1 for n in self.nodes.values() if n.kind != "supervisor" and n.state is State.RUNNING
        )
        if self.ready_line:
            metrics = ""
            if self._metrics is not None:
                host, port = self._metrics.server_address[:2]
                metrics = f", metrics http://{host}:{port}/metrics"
            print(
                f"ikosd ready: {running} daemons running, pid {os.getpid()}, "
                f"control socket {self.paths.control_socket}{metrics}",
                flush=True,
            )
        _sd_notify(f"READY=1\nSTATUS=running\nMAINPID={os.getpid()}")

    def request_shutdown(self) -> None:
        """Begin an orderly shutdown (SIGTERM, SIGINT, ``ikosctl shutdown``)."""
        if self._stop is not None:
            self._stop.set()

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
                    node.handle.kill()

    async def _wait_all_exited(self) -> None:
        for node in list(self.nodes.values()):
            if isinstance(node, WorkerNode) and node.handle is not None:
                await node.handle.exited

    def _on_sighup(self) -> None:
        asyncio.get_running_loop().create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            result = await self.reload_config()
            log.info("configuration reloaded: %s", json.dumps(result))
        except IkosError as exc:
            log.error("configuration reload refused: %s", exc)

    # -- operations (control protocol) -------------------------------------

    def node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise NoSuchDaemon(f"no daemon, actor or supervisor named '{name}'")
        return node

    async def start_node(self, name: str) -> dict[str, Any]:
        node = self.node(name)
        parent = node.parent
        if parent is None:
            assert isinstance(node, SupervisorNode)
            node.held = False
            await node.start()
        else:
            await parent.call(lambda: parent.start_child(node))
        return self.status_of(node)

    async def stop_node(self, name: str) -> dict[str, Any]:
        node = self.node(name)
        parent = node.parent
        if parent is None:
            node.held = True
            await node.terminate("stopped by request")
        else:
            await parent.call(lambda: parent.stop_child(node))
        return self.status_of(node)

    async def restart_node(self, name: str) -> dict[str, Any]:
        node = self.node(name)
        parent = node.parent
        if parent is None:
            await node.terminate("restart requested")
            node.held = False
            await node.start()
        else:
            await parent.call(lambda: parent.restart_child(node))
        return self.status_of(node)

    def kill_node(self, name: str, sig: int) -> dict[str, Any]:
        node = self.node(name)
        workers = node.walk() if isinstance(node, SupervisorNode) else [node]
        pids = []
        for w in workers:
            if isinstance(w, WorkerNode) and w.handle is not None and w.handle.send_signal(sig):
                pids.append(w.handle.pid)
        if not pids:
            raise ManagerError(f"'{name}' has no running process to signal")
        return {"name": name, "pid": pids[0] if len(pids) == 1 else pids, "signal": sig}

    def status_of(self, node: Node) -> dict[str, Any]:
        """A node's status object (docs/protocol.md), with the manager's counters."""
        out = node.status()
        if node.kind == "actor":
            out["dead_letters"] = self.dead_letters.get(node.name, 0)
        elif isinstance(node, WorkerNode) and isinstance(node.handle, ExecHandle):
            out["status_text"] = node.handle.status_text
        for ext in self.extensions:
            decorate = getattr(ext, "decorate_status", None)
            if decorate is not None:
                decorate(node, out)
        return out

    async def reload_node(self, name: str) -> dict[str, Any]:
        """Reload an executable (its reload command or signal; notify waits for READY=1)."""
        node = self.node(name)
        if not isinstance(node, WorkerNode) or not isinstance(node.spec, Exec):
            raise ManagerError(f"'{name}' is {node.kind}: only executables reload (use restart)")
        handle = node.handle
        if not isinstance(handle, ExecHandle) or not handle.alive:
            raise ManagerError(f"'{name}' is not running")
        await handle.reload()
        return self.status_of(node)

    async def start_child(self, supervisor: str, args: tuple[Any, ...]) -> dict[str, Any]:
        """simple_one_for_one: start a new instance of the supervisor's template."""
        sup = self.node(supervisor)
        if not isinstance(sup, SupervisorNode) or sup.template is None:
            raise ManagerError(f"'{supervisor}' is not a simple_one_for_one supervisor")
        node = await sup.call(functools.partial(sup.add_dynamic, args))
        return self.status_of(node)

    async def terminate_child(self, name: str) -> dict[str, Any]:
        """Stop a dynamic child and remove it from its supervisor."""
        node = self.node(name)
        sup = node.parent
        if sup is None or sup.template is None:
            raise ManagerError(f"'{name}' is not a dynamic child (simple_one_for_one)")
        await sup.call(functools.partial(sup.remove_child, node))
        return {"name": name, "removed": True}

    async def _verb_start_child(self, req: Any) -> Any:
        args = req.args.get("args", [])
        if not isinstance(args, list):
            raise ManagerError("'start_child': 'args' must be a list", "bad_request")
        return await self.start_child(req.text("supervisor"), tuple(args))

    async def _verb_terminate_child(self, req: Any) -> Any:
        return await self.terminate_child(req.text("name"))

    def tree_json(self, node: Node | None = None) -> dict[str, Any]:
        node = node or self.root
        assert node is not None
        out = self.status_of(node)
        if isinstance(node, SupervisorNode):
            out["children"] = [self.tree_json(c) for c in node.children]
        return out

    def list_json(self) -> list[dict[str, Any]]:
        assert self.root is not None
        return [self.status_of(n) for n in self.root.walk()]

    async def reload_config(self) -> dict[str, list[str]]:
        """Apply a re-read configuration: start added, stop removed, restart changed."""
        if self.reload_tree is None:
            raise ManagerError(
                "ikosd was started without a configuration file (-c): nothing to reload"
            )
        async with self._reload_lock:  # two reloads at once would split one diff in two
            return await self._reload_config()

    async def _reload_config(self) -> dict[str, list[str]]:
        assert self.reload_tree is not None
        new_tree = validate_tree(self.reload_tree())
        new_graph = check_graph(new_tree)
        if new_tree.name != self.tree.name:
            raise ManagerError(
                f"the root supervisor's name changed ({self.tree.name} -> {new_tree.name}): "
                "restart ikosd to apply that"
            )
        self.graph = new_graph
        result: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        assert self.root is not None
        await self._reconcile(self.root, new_tree, result)
        self.tree = new_tree
        return result

    async def _reconcile(
        self, sup: SupervisorNode, spec: Supervisor, result: dict[str, list[str]]
    ) -> None:
        """Bring a running supervisor in line with its new spec (children by name)."""
        by_name = {c.name: c for c in spec.children}
        for node in list(sup.children):
            if node.name not in by_name:
                await sup.call(functools.partial(sup.remove_child, node))
                result["removed"].append(node.name)
        sup.spec = spec
        dynamic = spec.strategy == "simple_one_for_one"
        order = [c.name for c in spec.children] if dynamic else start_order(spec, self.graph)
        for name in order:
            child_spec = by_name[name]
            current = next((n for n in sup.children if n.name == name), None)
            if current is None:
                if not dynamic:
                    await sup.call(functools.partial(sup.add_child, child_spec, None))
                    result["added"].append(name)
            elif isinstance(child_spec, Supervisor) and isinstance(current, SupervisorNode):
                if _own_fields(child_spec) != _own_fields(current.spec):
                    await sup.call(functools.partial(sup.replace_child, current, child_spec))
                    result["changed"].append(name)
                else:
                    await self._reconcile(current, child_spec, result)
            elif child_spec != current.spec:
                await sup.call(functools.partial(sup.replace_child, current, child_spec))
                result["changed"].append(name)
        if not dynamic:
            rank = {n: i for i, n in enumerate(order)}
            sup.children.sort(key=lambda n: rank.get(n.name, len(rank)))


def _own_fields(spec: Supervisor) -> tuple[Any, ...]:
    return (
        spec.strategy,
        spec.max_restarts,
        spec.within,
        spec.restart,
        spec.shutdown,
        spec.requires,
        spec.after,
        spec.backoff,
    )


def _ignore_signal() -> None:
    log.debug("signal ignored: ikosd is already stopping")


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
