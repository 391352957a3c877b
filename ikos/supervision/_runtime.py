"""The running supervision tree: OTP supervisors as event-driven objects in the manager.

Each daemon's life, and each supervisor's, is one explicit state machine in
:class:`Node`. These are all of its transitions, with the events that cause
them; :data:`TRANSITIONS` is the same table, :meth:`Node.set_state` refuses
any other pair as a bug (:class:`IllegalTransition`), and a test checks that
this list, the table and ``docs/architecture.md`` agree::

    stopped  -> starting   start: boot, a restart, an operator's start
    stopped  -> backoff    a restart after a delay (the child exited with status 0)
    stopped  -> failed     an executable's max_restarts reached (after an exit 0)
    failed   -> starting   a restart, an operator's start
    failed   -> backoff    a restart after a delay
    backoff  -> starting   the delay is over
    backoff  -> stopped    terminated while waiting (stop, shutdown, a sibling's restart)
    starting -> running    ready
    starting -> stopped    exited with status 0 before ready; terminated before spawned
    starting -> failed     the start failed; a supervisor gave up while starting
    starting -> stopping   terminated while starting
    running  -> stopping   terminated (stop, restart, shutdown) or failed (a health check)
    running  -> stopped    exited with status 0
    running  -> failed     crashed; a supervisor reached its restart intensity
    stopping -> stopped    exited after being terminated
    stopping -> failed     exited after being failed (a health check)

Every transition goes through :meth:`Node.set_state`, which checks it,
logs it and tells the host (the manager counts it).

Supervisors are not processes here, unlike in OTP: the manager sees every
exit through pidfds, so a supervisor is an object with its own command
queue, processed by one asyncio task, one command at a time, exactly like
an OTP supervisor's mailbox. Child exits, restart timers and operator
requests (start, stop, restart, shutdown) are all commands, so a restart
in progress is never interleaved with another event of the same
supervisor. Work propagates through these queues, never by recursion: a
child that fails to start posts its failure back to its supervisor's
queue, where it counts against restart intensity like any crash.

A failure the manager learns of from outside the process (a health check
gone critical) goes through the same path: :meth:`WorkerNode.fail` stops the
process as a shutdown would and hands its supervisor an abnormal exit, so
restart type, strategy, restart intensity and back-off apply as to a crash.

A supervisor that reaches its restart intensity exits, as OTP's does, with
reason ``shutdown``: it shows ``failed`` (with why), but for its parent the
exit is normal, so a ``transient`` or ``temporary`` child supervisor is not
restarted; a ``permanent`` one is, and that restart counts against the
parent's intensity.

Two deliberate differences from OTP. A child whose start fails at boot does
not abort its supervisor's start; the failure is handled by the child's
restart type and the restart intensity, as a crash would be. A daemon
manager should boot what it can; a child that keeps failing still exhausts
the intensity and fails the supervisor, as OTP would. And a child stopped
by an operator stays stopped (``held``) when a ``one_for_all`` or
``rest_for_one`` restart takes its siblings along, where OTP's
``terminate_child`` child would be restarted with them: an operator who
stops a daemon means it to stay down until they start it again.

``restarts`` counts automatic restarts only, as systemd's ``NRestarts``: an
operator's start or restart is not one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ikos._errors import IkosError
from ikos.platform._process import ExitStatus
from ikos.platform._signals import signal_name
from ikos.supervision._backoff import BackoffState
from ikos.supervision._intensity import RestartIntensity
from ikos.supervision._spec import AnySpec, Backoff, Child, Exec, Supervisor

log = logging.getLogger("ikos.supervision")


class State(enum.Enum):
    """The states of a daemon (and of a supervisor)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


#: Every legal state transition of a node, with the events that cause it: the
#: table of the module docstring (a test keeps the two, and the architecture
#: document, in agreement).
TRANSITIONS: Mapping[tuple[State, State], str] = {
    (State.STOPPED, State.STARTING): "start: boot, a restart, an operator's start",
    (State.STOPPED, State.BACKOFF): "a restart after a delay (the child exited with status 0)",
    (State.STOPPED, State.FAILED): "an executable's max_restarts reached (after an exit 0)",
    (State.FAILED, State.STARTING): "a restart, an operator's start",
    (State.FAILED, State.BACKOFF): "a restart after a delay",
    (State.BACKOFF, State.STARTING): "the delay is over",
    (State.BACKOFF, State.STOPPED): (
        "terminated while waiting (stop, shutdown, a sibling's restart)"
    ),
    (State.STARTING, State.RUNNING): "ready",
    (State.STARTING, State.STOPPED): (
        "exited with status 0 before ready; terminated before spawned"
    ),
    (State.STARTING, State.FAILED): "the start failed; a supervisor gave up while starting",
    (State.STARTING, State.STOPPING): "terminated while starting",
    (State.RUNNING, State.STOPPING): (
        "terminated (stop, restart, shutdown) or failed (a health check)"
    ),
    (State.RUNNING, State.STOPPED): "exited with status 0",
    (State.RUNNING, State.FAILED): "crashed; a supervisor reached its restart intensity",
    (State.STOPPING, State.STOPPED): "exited after being terminated",
    (State.STOPPING, State.FAILED): "exited after being failed (a health check)",
}


class IllegalTransition(IkosError):
    """A node was asked to make a transition the state diagram does not have: a bug of ikos."""

    def __init__(self, name: str, old: str, new: str, why: str) -> None:
        super().__init__(name, old, new, why)
        self.name, self.old, self.new, self.why = name, old, new, why

    def __str__(self) -> str:
        return f"'{self.name}': illegal state transition {self.old} -> {self.new} ({self.why})"


@dataclass(frozen=True)
class ExitReason:
    """Why a child stopped; ``normal`` decides whether a transient child restarts."""

    reason: str
    code: int | None = None
    signal: int | None = None
    detail: str = ""
    shutdown: bool = False
    at: float = 0.0
    dead_letters: int = 0  # queued tells the process never handled
    # Stopped by its supervisor because it failed (a health check): abnormal
    # whatever status the process exited with after its SIGTERM.
    failure: bool = False

    @property
    def normal(self) -> bool:
        """Normal exits (status 0, or stopped by its supervisor) do not restart transients.

        A child stopped because it failed (:meth:`WorkerNode.fail`) is never a
        normal exit, even when it answered its SIGTERM with status 0.
        """
        return not self.failure and (self.shutdown or self.code == 0)

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "code": self.code, "signal": self.signal, "at": self.at}

    @classmethod
    def from_process(cls, status: ExitStatus, event: dict[str, Any] | None) -> ExitReason:
        """Combine the kernel's exit status with the child's own explanation, if any."""
        reason = status.describe()
        detail = ""
        dead = 0
        if event is not None and (status.signal is None or event.get("override")):
            reason = str(event.get("reason") or reason)
            detail = str(event.get("detail") or "")
            raw = event.get("dead_letters", 0)
            dead = raw if isinstance(raw, int) and raw > 0 else 0
        return cls(reason, status.code, status.signal, detail, False, status.at, dead)


class StartFailed(IkosError):
    """A child could not be started; ``reason`` says why."""

    def __init__(self, name: str, reason: ExitReason) -> None:
        super().__init__(name, reason)
        self.name, self.reason = name, reason

    def __str__(self) -> str:
        return f"'{self.name}' failed to start: {self.reason.reason}"


class Running(Protocol):
    """A running daemon as the tree sees it (``ProcessHandle`` or an executable's handle)."""

    @property
    def pid(self) -> int: ...

    ready: asyncio.Future[dict[str, Any]]
    exited: asyncio.Future[ExitStatus]

    @property
    def alive(self) -> bool: ...

    def send_signal(self, sig: int) -> bool: ...

    def kill(self) -> bool: ...

    def exit_event(self) -> dict[str, Any] | None: ...


class Host(Protocol):
    """What the supervision tree needs from the manager that runs it."""

    async def spawn(self, node: WorkerNode) -> Running:
        """Start the node's process; the handle's ``ready`` resolves when it is ready."""

    def retire(self, node: WorkerNode) -> None:
        """The node will not run again until started explicitly: release its resources."""

    def transition(self, node: Node, old: State, new: State, why: str) -> None:
        """Record a state transition (log it, count it)."""

    async def before_stop(self, node: WorkerNode) -> None:
        """The node is stopping and about to get its stop signal; the stop waits for this
        (bounded by the host: monitors' Downs reach a watcher before it stops)."""

    def root_failed(self, reason: str) -> None:
        """The root supervisor gave up: the manager stops and exits 1."""

    def node_added(self, node: Node) -> None:
        """A node joined the tree (dynamic children, reloads)."""

    def node_removed(self, node: Node) -> None:
        """A node left the tree."""


def should_restart(restart: str, reason: ExitReason) -> bool:
    """OTP's restart types: permanent always, transient on abnormal exits, temporary never."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return not reason.normal
    return False


def should_restart_spec(spec: AnySpec, reason: ExitReason) -> bool:
    """The restart decision for any child: OTP's restart type, refined for executables.

    An executable may say ``auto_restart = false`` (never) or ``restart_on`` with
    systemd's ``Restart=`` semantics; both narrow the OTP restart type. A
    failure found from outside (a health check, :meth:`WorkerNode.fail`)
    counts as systemd's watchdog timeout: unclean, whatever the exit status.
    """
    if not isinstance(spec, Exec):
        return should_restart(spec.restart, reason)
    if not spec.auto_restart or spec.restart == "temporary":
        return False
    if _exit_in(spec.restart_prevent_exit_status, reason):
        return False  # systemd's RestartPreventExitStatus=
    mode = spec.restart_on
    if mode is None:
        return should_restart(spec.restart, reason)
    clean = not reason.failure and (
        reason.code == 0
        or reason.signal in _CLEAN_SIGNALS
        or _exit_in(spec.success_exit_status, reason)  # systemd's SuccessExitStatus=
    )
    watchdog = reason.failure or reason.reason == "watchdog timeout"
    return {
        "no": False,
        "always": True,
        "on-success": clean,
        "on-failure": not clean,
        "on-abnormal": reason.signal is not None or watchdog,
        "on-abort": reason.signal is not None and reason.signal not in _CLEAN_SIGNALS,
        "on-watchdog": watchdog,
    }.get(str(mode), should_restart(spec.restart, reason))


_CLEAN_SIGNALS = frozenset({1, 2, 13, 15})  # SIGHUP, SIGINT, SIGPIPE, SIGTERM (systemd)


def _exit_in(statuses: tuple[int | str, ...], reason: ExitReason) -> bool:
    """Whether the exit is one of ``statuses`` (exit codes, and signal names like 'SIGTERM')."""
    if not statuses or reason.failure:
        return False
    if reason.signal is not None:
        return signal_name(reason.signal) in statuses
    return reason.code is not None and reason.code in statuses


class Node:
    """One node of the running tree: a worker (actor or executable) or a supervisor."""

    kind = "node"
    #: during a hot code upgrade of an actor, the successor's pid (0 until it is
    #: forked): the process that may speak for the actor before it takes over
    successor_pid: int | None = None

    def __init__(self, spec: AnySpec, parent: SupervisorNode | None, host: Host) -> None:
        self.spec = spec
        self.parent = parent
        self.host = host
        self.state = State.STOPPED
        self.restarts = 0
        self.started_at: float | None = None
        self.last_exit: ExitReason | None = None
        self.incarnation = 0
        self.held = False  # stopped by an operator: not restarted until started again
        self.backoff = BackoffState()
        # monotonic seconds for restart intensity and back-off; the whole tree
        # shares its root's clock, which tests replace to skip time
        self.clock: Callable[[], float] = parent.clock if parent is not None else time.monotonic

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None

    def set_state(self, new: State, why: str = "") -> None:
        """Move to ``new`` (logged and counted by the host); staying put is a no-op.

        A pair missing from :data:`TRANSITIONS` is a bug in ikos: it is logged
        at ERROR and raised as :class:`IllegalTransition`, the state unchanged.
        """
        old = self.state
        if old is new:
            return
        if (old, new) not in TRANSITIONS:
            log.error(
                "%s %s: illegal state transition %s -> %s (%s)",
                self.kind,
                self.name,
                old.value,
                new.value,
                why,
            )
            raise IllegalTransition(self.name, old.value, new.value, why)
        self.state = new
        self.host.transition(self, old, new, why)

    async def start(self) -> None:
        raise NotImplementedError

    async def terminate(self, why: str = "shutdown") -> None:
        raise NotImplementedError

    async def fail(self, reason: str) -> bool:
        """Fail this node for ``reason``; only a daemon can be (see :meth:`WorkerNode.fail`)."""
        raise IkosError(f"'{self.name}' is a {self.kind}: only a daemon can be failed")

    def status(self) -> dict[str, Any]:
        now = time.time()
        running = self.state is State.RUNNING and self.started_at is not None
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "started_at": self.started_at if running else None,
            "uptime_seconds": round(now - self.started_at, 3)
            if running and self.started_at
            else None,
            "supervisor": self.parent.name if self.parent else None,
            "restart": self.spec.restart,
            "last_exit": self.last_exit.to_json() if self.last_exit else None,
            "description": self.spec.description,
            "requires": list(self.spec.requires),
            "after": list(self.spec.after),
        }


class _ExitWatch:
    """``node._exited(inc, fut)``, the callback on a running incarnation's exit: a slotted
    object of 64 bytes where a ``functools.partial`` of the bound method, with its
    arguments tuple and keywords dict, is ~0.3 KiB (one per running daemon)."""

    __slots__ = ("inc", "node")

    def __init__(self, node: WorkerNode, inc: int) -> None:
        self.node, self.inc = node, inc

    def __call__(self, fut: asyncio.Future[ExitStatus]) -> None:
        self.node._exited(self.inc, fut)


class WorkerNode(Node):
    """An actor or an executable: one OS process per incarnation."""

    def __init__(self, spec: Child | Exec, parent: SupervisorNode | None, host: Host) -> None:
        super().__init__(spec, parent, host)
        self.kind = "actor" if isinstance(spec, Child) else "exec"
        self.handle: Running | None = None
        # auto_start = false: part of the tree, but started only when asked to
        self.held = isinstance(spec, Exec) and not spec.auto_start
        self.spec: Child | Exec = spec

    @property
    def alive(self) -> bool:
        return self.handle is not None and self.handle.alive

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.alive and self.handle is not None else None

    def status(self) -> dict[str, Any]:
        st = super().status()
        spec = self.spec
        st["target"] = spec.actor_path if isinstance(spec, Child) else spec.executable
        return st

    async def start(self, spawned: Callable[[], None] | None = None) -> None:
        """Spawn and wait for readiness; raise :class:`StartFailed` otherwise.

        ``spawned`` is called once the process is spawned (or its spawn failed),
        before the wait for readiness."""
        if self.alive:
            return
        if self.state is State.RUNNING and self.handle is not None:
            # The process is gone but the loop has not run our exit callback yet:
            # record that exit first (the restart it posts will be stale).
            self._exited(self.incarnation, self.handle.exited)
        self.incarnation += 1
        inc = self.incarnation
        self.set_state(State.STARTING, "starting")
        try:
            handle = await self.host.spawn(self)
        except IkosError as exc:
            reason = ExitReason(str(exc), at=time.time())
            self._stopped(reason)
            raise StartFailed(self.name, reason)
        finally:
            if spawned is not None:
                spawned()
        self.handle = handle
        waiters: set[asyncio.Future[Any]] = {handle.ready, handle.exited}
        # an executable's handle enforces its own start timeout (EXTEND_TIMEOUT_USEC)
        own = getattr(handle, "manages_start_timeout", False)
        # an executable started by posix_spawn is often ready at once: then no
        # asyncio.wait (a turn, a waiter and callbacks, x N in a wave of starts)
        done = {f for f in waiters if f.done()}
        if not done:
            done, _ = await asyncio.wait(
                waiters,
                timeout=None if own else self.spec.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if handle.ready in done and not handle.exited.done():
            self.started_at = time.time()
            self.backoff = self.backoff.started(self.clock())
            self.set_state(State.RUNNING, f"ready (pid {handle.pid})")
            handle.exited.add_done_callback(_ExitWatch(self, inc))
            return
        if not done:
            log.warning("%s: not ready within %gs: killing it", self.name, self.spec.start_timeout)
            handle.kill()
            await handle.exited
            reason = ExitReason(
                f"did not become ready within {self.spec.start_timeout:g} s", at=time.time()
            )
        else:
            status = await handle.exited
            reason = ExitReason.from_process(status, handle.exit_event())
        self.handle = None
        self._stopped(reason)
        raise StartFailed(self.name, reason)

    def _stopped(self, reason: ExitReason) -> None:
        self.last_exit = reason
        self.started_at = None
        self.set_state(State.STOPPED if reason.normal else State.FAILED, reason.reason)

    def _exited(self, inc: int, fut: asyncio.Future[ExitStatus]) -> None:
        if inc != self.incarnation or self.state is not State.RUNNING:
            return  # an orderly stop (terminate is waiting) or a stale incarnation
        handle = self.handle
        reason = ExitReason.from_process(fut.result(), handle.exit_event() if handle else None)
        if reason.detail:
            log.error("%s: %s\n%s", self.name, reason.reason, reason.detail.rstrip())
        self.handle = None
        self._stopped(reason)
        if self.parent is not None:
            self.parent.post(functools.partial(self.parent.child_exited, self, inc, reason))

    def detach(self) -> None:
        """Stop treating the running process's exit as this daemon's (a hot code upgrade
        is replacing it, through its supervisor's queue); :meth:`attach` ends that."""
        self.incarnation += 1

    def attach(self, handle: Running) -> None:
        """Watch ``handle`` as the running process, after :meth:`detach`: the successor of
        an upgrade, or the same process kept when the upgrade failed. No transition: the
        daemon never stopped running; an exit that came meanwhile is handled now."""
        self.handle = handle
        self.successor_pid = None
        handle.exited.add_done_callback(_ExitWatch(self, self.incarnation))

    async def terminate(self, why: str = "shutdown") -> None:
        """OTP's shutdown: SIGTERM, wait the shutdown timeout, then SIGKILL."""
        reason = await self._halt(why)
        if reason is not None:
            self.last_exit = replace(reason, shutdown=True)
            self.set_state(State.STOPPED, f"{why}: {reason.reason}")

    async def fail(self, reason: str) -> bool:
        """Fail this daemon for ``reason``, as if it had crashed; False if it was not running.

        For failures found from outside the process, such as a health check
        gone critical (``reason`` then reads ``"health check failed: ..."``).
        Runs :meth:`SupervisorNode.fail_child` through the parent's command
        queue (so never call it from a command of that queue) and returns once
        the parent has applied restart type, strategy, restart intensity and
        back-off. Only the incarnation running now is failed: if it has been
        replaced by the time the command runs, nothing happens.
        """
        parent = self.parent
        if parent is None:
            raise IkosError(f"'{self.name}' has no supervisor to fail to")
        inc = self.incarnation
        return bool(await parent.call(functools.partial(parent.fail_child, self, inc, reason)))

    async def _stop_failed(self, reason: str) -> ExitReason:
        """Stop the process as a shutdown does, but record the exit as the failure ``reason``."""
        stopped = await self._halt(reason)
        failed = replace(
            stopped or ExitReason(reason, at=time.time()), reason=reason, detail="", failure=True
        )
        self.last_exit = failed
        self.set_state(State.FAILED, f"{reason}: {stopped.reason if stopped else 'not running'}")
        return failed

    async def _halt(self, why: str) -> ExitReason | None:
        """Stop the process: signal, wait, kill; its exit, or None if none was running."""
        handle = self.handle
        if handle is None or not handle.alive:
            self.handle = None
            if self.state in (State.BACKOFF, State.STARTING, State.RUNNING):
                self.set_state(State.STOPPED, why)
            return None
        self.set_state(State.STOPPING, why)
        await self.host.before_stop(self)
        shutdown = self.spec.shutdown
        if shutdown == "brutal_kill":
            handle.kill()
        else:
            sig: int = signal.SIGTERM
            if isinstance(self.spec, Exec):
                sig = self.spec.options.stop_signal
            handle.send_signal(sig)
            timeout = None if shutdown == "infinity" else float(shutdown)
            try:
                await asyncio.wait_for(asyncio.shield(handle.exited), timeout)
            except TimeoutError:
                log.warning("%s: did not stop within %gs: sending SIGKILL", self.name, timeout)
                handle.kill()
        status = await handle.exited
        self.handle = None
        self.started_at = None
        return ExitReason.from_process(status, handle.exit_event())


#: The spacing of restarts of an executable that sets no back-off and no
#: ``restart_delay``: the first restart of a series is immediate, then each one
#: that follows a run shorter than a second waits 0.1 s, 0.2 s, 0.4 s... up to
#: 5 s. An executable whose exec keeps failing would otherwise be restarted as
#: fast as the machine forks (systemd waits RestartSec=100ms every time).
#: Spawns in flight at once within a wave (see SupervisorNode._start_wave).
WAVE_CONCURRENCY = 32


class _Place:
    """A place in a wave's semaphore, given back once however often it is released."""

    __slots__ = ("_places",)

    def __init__(self, places: asyncio.Semaphore) -> None:
        self._places: asyncio.Semaphore | None = places

    def release(self) -> None:
        if self._places is not None:
            self._places.release()
            self._places = None


EXEC_RESTART_SPACING = Backoff(min=0.1, max=5.0, random_factor=0.0, reset_after=1.0)


def _fixed_delay(spec: AnySpec) -> Backoff | None:
    """An executable's ``restart_delay`` as a constant back-off (min = max, no jitter)."""
    if not isinstance(spec, Exec):
        return None
    delay = spec.restart_delay
    if delay > 0:
        return Backoff(
            min=float(delay), max=float(delay), random_factor=0.0, reset_after=float(delay)
        )
    return None


Command = Callable[[], Awaitable[Any]]


class SupervisorNode(Node):
    """An OTP supervisor: strategy, restart intensity, ordered start and stop."""

    kind = "supervisor"

    def __init__(
        self,
        spec: Supervisor,
        parent: SupervisorNode | None,
        host: Host,
        order: Callable[[Supervisor], list[str]] | None = None,
        waves: Callable[[Supervisor], list[list[str]]] | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(spec, parent, host)
        if clock is not None:
            self.clock = clock
        self.spec: Supervisor = spec
        self.order = order or (lambda s: [c.name for c in s.children])
        self.waves = waves
        self.children: list[Node] = []
        self.template: Child | Exec | None = None
        self._dynamic = 0
        self.intensity = RestartIntensity(spec.max_restarts, spec.within)
        #: restarts this supervisor decided (each counted against its intensity; a
        #: one_for_all restart is one, however many children it takes along)
        self.restarts_performed = 0
        self.queue: asyncio.Queue[tuple[Command, asyncio.Future[Any] | None]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.timers: dict[Node, asyncio.TimerHandle] = {}  # pending back-off restarts
        #: the recent restarts of each executable with a ``restart_window`` (a unit's
        #: StartLimitIntervalSec=): its own intensity, forgotten once it gave up
        self.restart_windows: dict[Node, RestartIntensity] = {}
        self._busy = False  # a command is running (see restarts_at_once)
        self._build_children()

    def _build_children(self) -> None:
        spec = self.spec
        if spec.strategy == "simple_one_for_one":
            first = spec.children[0]
            assert not isinstance(first, Supervisor)
            self.template = first
            return
        by_name = {c.name: c for c in spec.children}
        for name in self.order(spec):
            self.children.append(self._make(by_name[name]))

    def _make(self, spec: AnySpec) -> Node:
        node: Node
        if isinstance(spec, Supervisor):
            node = SupervisorNode(spec, self, self.host, self.order, self.waves)
        else:
            node = WorkerNode(spec, self, self.host)
        self.host.node_added(node)
        return node

    # -- the command queue -------------------------------------------------

    def _ensure_task(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self._run(), name=f"supervisor:{self.name}"
            )

    async def _run(self) -> None:
        while True:
            command, fut = await self.queue.get()
            self._busy = True
            try:
                result = await command()
            except Exception as exc:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                else:
                    log.exception("supervisor %s: command failed", self.name)
            else:
                if fut is not None and not fut.done():
                    fut.set_result(result)
            finally:
                self._busy = False

    def post(self, command: Command) -> None:
        """Queue a command without waiting for it."""
        self._ensure_task()
        self.queue.put_nowait((command, None))

    async def call(self, command: Command) -> Any:
        """Queue a command and wait for its result."""
        self._ensure_task()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((command, fut))
        return await fut

    def close(self) -> None:
        """Cancel this supervisor's task and timers, and its descendants' (final teardown)."""
        self._cancel_timers()
        for child in self.children:
            if isinstance(child, SupervisorNode):
                child.close()
        if self.task is not None:
            self.task.cancel()

    # -- Node interface ----------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.state in (State.STARTING, State.RUNNING)

    def intensity_left(self) -> int:
        """Restarts still allowed in the current window before this supervisor gives up.

        ``max_restarts`` minus the restarts of the last ``within`` seconds; 0
        once it gave up (until it is started again, with a fresh window).
        """
        if self.state is State.FAILED:
            return 0
        used = self.intensity.restarts_within(self.clock())
        return max(0, self.spec.max_restarts - used)

    def status(self) -> dict[str, Any]:
        st = super().status()
        st.update(
            strategy=self.spec.strategy,
            max_restarts=self.spec.max_restarts,
            within=self.spec.within,
            children=[c.name for c in self.children],
            target=self.spec.strategy,
        )
        return st

    async def start(self) -> None:
        await self.call(self._do_start)

    async def terminate(self, why: str = "shutdown") -> None:
        shutdown = self.spec.shutdown
        if shutdown in ("infinity", "brutal_kill") or self.state in (State.STOPPED, State.FAILED):
            await self.call(functools.partial(self._do_terminate, why))
            return
        try:
            await asyncio.wait_for(
                self.call(functools.partial(self._do_terminate, why)), float(shutdown)
            )
        except TimeoutError:
            log.warning(
                "supervisor %s: subtree not stopped within %gs: killing", self.name, float(shutdown)
            )
            self.kill_subtree()
            await self.call(functools.partial(self._do_terminate, why))

    def kill_subtree(self) -> None:
        for child in self.children:
            if isinstance(child, SupervisorNode):
                child.kill_subtree()
            elif isinstance(child, WorkerNode) and child.handle is not None:
                child.handle.kill()

    # -- commands ----------------------------------------------------------

    async def _do_start(self) -> None:
        if self.alive:
            return
        self.incarnation += 1
        self.intensity = RestartIntensity(self.spec.max_restarts, self.spec.within)
        self.set_state(State.STARTING, "starting children")
        by_name = {c.name: c for c in self.children}
        if self.waves is not None and self.template is None:
            groups = self.waves(self.spec)
            grouped = {n for g in groups for n in g}
            groups.extend([c.name] for c in self.children if c.name not in grouped)
        else:
            groups = [[c.name] for c in self.children]
        for group in groups:
            # a wave's members need nothing from each other: start them together,
            # each waiting for its own readiness; the next wave waits for all
            nodes = [by_name[n] for n in group if n in by_name and not by_name[n].held]
            if len(nodes) == 1:
                await self._start_one(nodes[0])
            elif nodes:
                await self._start_wave(nodes)
            if self.state is State.FAILED:
                assert self.last_exit is not None
                raise StartFailed(self.name, self.last_exit)
        if self.state is State.STARTING:
            self.started_at = time.time()
            self.set_state(State.RUNNING, "children started")

    async def _start_wave(self, nodes: list[Node]) -> None:
        """Start ``nodes`` together, with at most :data:`WAVE_CONCURRENCY` spawns in flight.

        A spawn in flight holds a task, its coroutines' frames and its spawn
        request; with all of a wave's members in flight at once, a wave of 500
        executables raised the heap by that much, and the long-lived records
        allocated during the wave (handles, futures) then pinned the arenas the
        transient objects had filled: each stop/start cycle of 500 left ~1.5 MiB
        more in ikosd. A member gives its place back once spawned, not once
        ready: members slow to be ready (notify daemons, actors' ``on_start``)
        still wait for readiness all together, and a nested supervisor takes
        no place. The spawn requests stay pipelined (the spawn server answers
        them one after the other anyway), in list order."""
        loop = asyncio.get_running_loop()
        places = asyncio.Semaphore(WAVE_CONCURRENCY)
        running: set[asyncio.Task[bool]] = set()

        def finished(task: asyncio.Task[bool]) -> None:
            # a start that raised (a bug: failures are StartFailed, posted back) stays
            # for the gather below to raise, as a gather of every member did
            if task.cancelled() or task.exception() is None:
                running.discard(task)

        try:
            for child in nodes:
                await places.acquire()
                task = loop.create_task(self._start_one(child, _Place(places)))
                running.add(task)
                task.add_done_callback(finished)
            if running:
                await asyncio.gather(*running)
        except BaseException:
            # cancelled (a shutdown during the wave): the starts go with it, as a
            # gather's members would
            for task in list(running):
                task.cancel()
            raise

    async def _start_one(self, child: Node, place: _Place | None = None) -> bool:
        """Start a child; a failure is posted back as an exit to count against intensity.

        ``place``: the wave's place this start holds, given back once the child's
        process is spawned (:meth:`_start_wave`)."""
        try:
            if isinstance(child, WorkerNode):
                await child.start(place.release if place is not None else None)
            else:
                if place is not None:
                    place.release()
                await child.start()
            return True
        except StartFailed as exc:
            self.post(functools.partial(self.child_exited, child, child.incarnation, exc.reason))
            return False
        finally:
            if place is not None:
                place.release()

    async def _do_terminate(self, why: str) -> None:
        self._cancel_timers()
        if self.state in (State.STOPPED, State.FAILED) and not any(
            c.alive or c.state is State.BACKOFF for c in self.children
        ):
            return
        if self.state in (State.STARTING, State.RUNNING):
            self.set_state(State.STOPPING, why)
        # A stopped or failed supervisor may still have children an operator
        # started one by one: stop them, and let the supervisor keep its state.
        await self._terminate_children(why)
        self.started_at = None
        if self.state in (State.STOPPING, State.BACKOFF):
            self.set_state(State.STOPPED, why)

    async def _terminate_children(self, why: str) -> None:
        for child in reversed(self.children):
            if child.alive or child.state in (State.BACKOFF, State.STARTING):
                await child.terminate(why)
            if isinstance(child, WorkerNode):
                self.host.retire(child)

    def _cancel_timers(self, child: Node | None = None) -> None:
        """Cancel the pending back-off restart of ``child``, or every one."""
        for key in list(self.timers) if child is None else [child]:
            timer = self.timers.pop(key, None)
            if timer is not None:
                timer.cancel()

    async def child_exited(self, child: Node, inc: int, reason: ExitReason) -> None:
        """A child died (or failed to start): apply restart type, intensity and strategy."""
        if inc != child.incarnation or child.alive or child not in self.children:
            return  # stale: restarted or removed since
        if self.state not in (State.RUNNING, State.STARTING):
            return  # we are stopping or failed: nothing restarts
        if child.held:
            return
        limit = child.spec.max_restarts if isinstance(child.spec, Exec) else None
        if (
            limit is not None
            and should_restart_spec(child.spec, reason)
            and not self._restart_allowed(child, limit)
        ):
            window = child.spec.restart_window if isinstance(child.spec, Exec) else None
            within = "" if window is None else f" within {window:g} s: start-limit-hit"
            why = f"restart limit reached ({limit} restarts{within}); last: {reason.reason}"
            child.last_exit = replace(reason, reason=why)
            child.set_state(State.FAILED, why)
            if isinstance(child, WorkerNode):
                self.host.retire(child)
            return
        if not should_restart_spec(child.spec, reason):
            if isinstance(child, WorkerNode):
                self.host.retire(child)
            if self.template is not None:
                self._remove(child)
            return
        self.intensity, allowed = self.intensity.add(self.clock())
        if not allowed:
            await self._give_up(child, reason)
            return
        self.restarts_performed += 1
        group = self._restart_group(child)
        for other in reversed(group):
            if other is not child and (other.alive or other.state is State.BACKOFF):
                self._cancel_timers(other)
                await other.terminate(f"restarting with {child.name} ({self.spec.strategy})")
        backoff = child.spec.backoff or self.spec.backoff or _fixed_delay(child.spec)
        first_free = False
        if backoff is None and isinstance(child.spec, Exec):
            backoff, first_free = EXEC_RESTART_SPACING, True
        if backoff is not None:
            child.backoff, delay = child.backoff.next_delay(
                backoff, self.clock(), random.random(), first_free=first_free
            )
            if delay > 0:
                child.set_state(State.BACKOFF, f"restarting in {delay:.3f} s")
                loop = asyncio.get_running_loop()
                timer: asyncio.TimerHandle | None = None

                def due() -> None:
                    if self.timers.get(child) is timer:
                        del self.timers[child]
                    self.post(functools.partial(self._restart_due, group, child, inc))

                timer = loop.call_later(delay, due)
                self.timers[child] = timer
                return
        await self._start_group(group, child)

    def _restart_allowed(self, child: Node, limit: int) -> bool:
        """Whether an executable may restart once more: ``max_restarts`` over its life,
        or over a sliding ``restart_window`` (OTP's intensity rule, per child)."""
        recent = self._restart_window(child, limit)
        if recent is None:
            return child.restarts < limit
        recent, allowed = recent.add(self.clock())
        if allowed:
            self.restart_windows[child] = recent
        else:  # it fails: a start by an operator begins a new window (systemd's reset-failed)
            self.restart_windows.pop(child, None)
        return allowed

    def _restart_foreseen(self, child: Node, limit: int, now: float) -> bool:
        """:meth:`_restart_allowed`'s answer for a restart now, without counting it."""
        recent = self._restart_window(child, limit)
        return child.restarts < limit if recent is None else recent.add(now)[1]

    def _restart_window(self, child: Node, limit: int) -> RestartIntensity | None:
        """The recent restarts of a child with a ``restart_window`` (None: no window)."""
        window = child.spec.restart_window if isinstance(child.spec, Exec) else None
        if window is None:
            return None
        return self.restart_windows.get(child) or RestartIntensity(limit, window)

    def restarts_at_once(self, child: Node, reason: ExitReason, pending: int = 0) -> bool:
        """Whether :meth:`child_exited` for this exit of ``child`` would, run now, only start
        ``child`` again at once: the child is running, this supervisor runs and has no
        command before it, the strategy restarts the child alone, its restart type, limit
        and restart intensity allow it (with ``pending`` restarts of this supervisor
        already foreseen and not counted yet) and no back-off delay is due.

        A forecast for the spawner, which may then send the start before the exit is
        recorded, as runsv does (see ``ExecRuntime.restart_early``); the decision stays
        :meth:`child_exited`'s, and a start it does not take is killed. It is never
        wrong the other way for the time-dependent parts: intensity and back-off only
        allow more as time passes.
        """
        if self._busy or not self.queue.empty() or self.state is not State.RUNNING:
            return False
        if child.state is not State.RUNNING or child.held or child not in self.children:
            return False
        if self._restart_group(child) != [child]:
            return False
        if not should_restart_spec(child.spec, reason):
            return False
        now = self.clock()
        limit = child.spec.max_restarts if isinstance(child.spec, Exec) else None
        if limit is not None and not self._restart_foreseen(child, limit, now):
            return False
        # the restarts foreseen, then this one (an arm per daemon of a wave of 500)
        if not self.intensity.allows(now, pending + 1):
            return False
        backoff = child.spec.backoff or self.spec.backoff or _fixed_delay(child.spec)
        first_free = False
        if backoff is None and isinstance(child.spec, Exec):
            backoff, first_free = EXEC_RESTART_SPACING, True
        if backoff is not None:
            # u = 0: a delay that is 0 without jitter is 0 with any
            _, delay = child.backoff.next_delay(backoff, now, 0.0, first_free=first_free)
            if delay > 0:
                return False
        return True

    async def _restart_due(self, group: list[Node], child: Node, inc: int) -> None:
        if child.state is not State.BACKOFF or child.incarnation != inc:
            return
        if self.state not in (State.RUNNING, State.STARTING):
            return
        await self._start_group(group, child)

    def _restart_group(self, child: Node) -> list[Node]:
        strategy = self.spec.strategy
        if strategy == "one_for_all":
            return list(self.children)
        if strategy == "rest_for_one":
            return self.children[self.children.index(child) :]
        return [child]

    async def _start_group(self, group: list[Node], failed: Node) -> None:
        for node in group:
            if node not in self.children or node.held or node.alive:
                continue
            if node is not failed and node.spec.restart == "temporary":
                if isinstance(node, WorkerNode):
                    self.host.retire(node)
                continue  # OTP: a temporary sibling terminated by the strategy stays down
            node.restarts += 1
            if not await self._start_one(node):
                return  # the failure is queued; it will restart the group again

    async def _give_up(self, child: Node, reason: ExitReason) -> None:
        why = (
            f"reached max restart intensity ({self.spec.max_restarts} in {self.spec.within:g} s)"
            f" after '{child.name}' {reason.reason}"
        )
        log.error("supervisor %s: %s: stopping its children", self.name, why)
        self._cancel_timers()
        await self._terminate_children("supervisor giving up")
        # OTP's supervisor exits with reason `shutdown` here: a normal exit for
        # its parent, which restarts it only if it is permanent.
        self.last_exit = ExitReason(why, at=time.time(), shutdown=True)
        self.started_at = None
        self.set_state(State.FAILED, why)
        parent = self.parent
        if parent is not None:
            parent.post(
                functools.partial(parent.child_exited, self, self.incarnation, self.last_exit)
            )
        else:
            self.host.root_failed(why)

    # -- operator requests (run through the queue of the node's parent) ----

    async def stop_child(self, node: Node) -> None:
        """An operator's stop: the child stays down (``held``) until started again."""
        node.held = True
        self._cancel_timers(node)
        await node.terminate("stopped by request")
        if isinstance(node, WorkerNode):
            self.host.retire(node)

    async def start_child(self, node: Node) -> None:
        """An operator's start: not a restart, so ``restarts`` stays as it is."""
        node.held = False
        self._cancel_timers(node)
        if node.alive:
            return
        await self._operator_start(node)

    async def restart_child(self, node: Node) -> None:
        """An operator's restart: not counted in ``restarts`` (systemd's NRestarts neither)."""
        self._cancel_timers(node)
        await node.terminate("restart requested")
        node.held = False
        await self._operator_start(node)

    async def _operator_start(self, node: Node) -> None:
        """Start ``node`` for an operator; a failure is the operator's error *and* a crash.

        The caller hears why the start failed, and the supervisor handles the
        failure as it handles any failed start (restart type, intensity,
        back-off), so that a daemon an operator restarted is not left down
        by a transient failure (the fork server dying, say).
        """
        try:
            await node.start()
        except StartFailed as exc:
            self.post(functools.partial(self.child_exited, node, node.incarnation, exc.reason))
            raise

    async def fail_child(self, child: WorkerNode, inc: int, reason: str) -> bool:
        """Fail a running child for ``reason``: stop it, then handle its exit as a crash's.

        The child is stopped as OTP's shutdown does (its stop signal, its
        ``shutdown`` timeout, SIGKILL) and its exit is abnormal whatever its
        status, so ``child_exited`` applies restart type, strategy, restart
        intensity and back-off as to any crash. Nothing happens (False) when
        ``inc`` is no longer the running incarnation of the child.
        """
        if child not in self.children or child.incarnation != inc:
            return False
        if child.state is not State.RUNNING:
            return False
        log.warning("%s: %s: stopping it as failed", child.name, reason)
        failed = await child._stop_failed(reason)
        await self.child_exited(child, inc, failed)
        return True

    async def add_dynamic(self, args: tuple[Any, ...]) -> Node:
        """simple_one_for_one: start one more instance of the template with extra args."""
        if self.template is None:
            raise IkosError(f"supervisor '{self.name}' is not simple_one_for_one")
        self._dynamic += 1
        spec: Child | Exec
        if isinstance(self.template, Child):
            spec = replace(
                self.template,
                name=f"{self.template.name}.{self._dynamic}",
                args=(*self.template.args, *args),
            )
        else:
            spec = replace(self.template, name=f"{self.template.name}.{self._dynamic}")
        node = self._make(spec)
        self.children.append(node)
        await self._start_or_drop(node)
        return node

    async def _start_or_drop(self, node: Node) -> None:
        """OTP's ``start_child``: a child that fails to start is not added (raises).

        Kept, it would stay ``failed`` for ever (nothing restarts it) and hold
        its resources (an actor's socket).
        """
        try:
            await node.start()
        except StartFailed:
            if isinstance(node, WorkerNode):
                self.host.retire(node)
            self._remove(node)
            raise

    async def remove_child(self, node: Node) -> None:
        """Stop a child and drop it from the tree (dynamic children, reloads)."""
        self._cancel_timers(node)
        if node.alive or node.state is State.BACKOFF:
            await node.terminate("removed")
        if isinstance(node, WorkerNode):
            self.host.retire(node)
        self._remove(node)

    def _remove(self, node: Node) -> None:
        with contextlib.suppress(ValueError):
            self.children.remove(node)
        if isinstance(node, SupervisorNode):
            node.close()
        self.host.node_removed(node)

    async def add_child(
        self, spec: AnySpec, index: int | None = None, *, start: bool = True, strict: bool = False
    ) -> Node:
        """Add a child and start it, unless ``start`` is false (it then joins held).

        With ``strict`` (OTP's ``start_child``, for children added at run time)
        a child that fails to start is removed again and the failure raised;
        otherwise (a configuration reload) the failure is handled like a crash.
        """
        node = self._make(spec)
        if not start:
            node.held = True
        if index is None:
            self.children.append(node)
        else:
            self.children.insert(index, node)
        if node.held or not (start and self.alive):
            return node
        if strict:
            await self._start_or_drop(node)
        else:
            await self._start_one(node)
        return node

    async def update_child(self, node: WorkerNode, spec: Child | Exec, *, restart: bool) -> None:
        """Give ``node`` a new spec; if ``restart`` and it is active, restart it to apply it."""
        active = node.alive or node.state in (State.STARTING, State.BACKOFF)
        if not (restart and active):
            node.spec = spec
            return
        await node.terminate("configuration changed")
        node.spec = spec
        node.held = False
        await node.start()

    async def replace_child(self, node: Node, spec: AnySpec) -> Node:
        """Restart a changed child with its new spec, keeping its place in the order."""
        index = self.children.index(node)
        await self.remove_child(node)
        return await self.add_child(spec, index)

    def walk(self) -> list[Node]:
        """This supervisor and every descendant, in start order (depth first)."""
        out: list[Node] = [self]
        for child in self.children:
            if isinstance(child, SupervisorNode):
                out.extend(child.walk())
            else:
                out.append(child)
        return out
