"""External executables as daemons: systemd's service types, sd_notify, logs, cgroups.

An :class:`ExecHandle` stands for one run of an executable and looks, to the
supervision tree, like any process handle (``pid``, ``ready``, ``exited``,
``send_signal``): readiness follows systemd's ``Type=``:

- ``simple``/``exec``: ready once the exec succeeded (the CLOEXEC error pipe
  closed without a word);
- ``notify``: ready on ``READY=1`` from one of the daemon's own processes,
  with ``STATUS=``, ``MAINPID=``, ``RELOADING=1``, ``STOPPING=1``,
  ``WATCHDOG=1``/``WATCHDOG=trigger`` and ``EXTEND_TIMEOUT_USEC=``;
- ``forking``: ready when the started process exits 0; the main process is
  read from the PID file (refused if it is PID 1, not running, or outside
  the daemon), else the one process left in the daemon's cgroup or session;
- ``oneshot``: ready when the process exited 0.

Notifications are accepted only from the daemon's processes (its cgroup, or
its session, which ikos created with ``setsid``); anything else is dropped
and logged. The daemon's stdout and stderr (mode ``log``) are pipes that the
manager splits into timestamped lines in ``LOG/NAME.log``, rotated by size.
When the main process ends, what is left of the daemon is killed: no
process outlives its daemon.

A ``pid_file`` on a daemon of a type other than ``forking`` is written by
ikos (:class:`~ikos.platform._pidfile.DaemonPidFile`) once the exec
succeeded, rewritten when ``MAINPID=`` moves the main process (and when a
new ikosd adopts the daemon), and removed when the daemon ends.

A restart its supervisor is sure to make is sent to the spawn server from
the exit's callback, before the exit is recorded, logged and told to the
extensions (:meth:`ExecRuntime.restart_early`, runsv's order): the tree's
own start then takes it, and a check queued behind the exit kills one it
did not take. Rejected: building each daemon's next request in advance
(its environment's bytes kept per daemon, for ~0.1 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any, NoReturn

from ikos._errors import IkosError, ManagerError, SpawnError
from ikos.manager._logs import DaemonLogs
from ikos.platform import _cgexec
from ikos.platform._cgroups import CgroupManager, DaemonCgroup, instance_cgroup_name
from ikos.platform._forkserver import ForkServer
from ikos.platform._memfd import close_all
from ikos.platform._notify import NotifyMessage, NotifySocket, main_pid
from ikos.platform._paths import InstancePaths
from ikos.platform._pidfile import (
    PID_FILE_NOTES,
    DaemonPidFile,
    PidFileError,
    read_pid_file,
)
from ikos.platform._process import (
    ExitStatus,
    ProcessHandle,
    disown,
    own,
    read_available,
    run_command,
    session_members,
    signal_group,
)
from ikos.platform._spawn import (
    DEFAULT_PATH,
    ExecPlan,
    StdioSpec,
    build_exec_plan,
    environ_generation,
    exec_in_child,
    in_root,
    notify_socket_address,
    shared_env,
    stdio_spec,
)
from ikos.platform._unit_command import UnitCommand, expand_variables, stop_post_environment
from ikos.supervision._runtime import ExitReason, State, SupervisorNode, WorkerNode
from ikos.supervision._spec import Exec

log = logging.getLogger("ikos.exec")

EXEC_ENTRY = "ikos.manager._exec:exec_entry"
#: ``started_by`` of a restart sent before its exit was recorded (ExecRuntime.restart_early).
EARLY = "cgexec-server (early restart)"
#: ``started_by`` of a restart the spawn server started at the exit (ExecRuntime.arm_soon).
ARMED = "cgexec-server (armed restart)"
#: When a run is armed: once it has lived past the default restart spacing's reset (a
#: later death is then restarted at once), then again if the forecast said no.
ARM_AFTER = (1.05, 2.0, 4.0, 8.0, 16.0)
#: How often a forking daemon's PID file is read again while it is not valid yet.
PID_FILE_POLL = 0.05


class NotifyLog:
    """Log lines caused by notifications: at most ``burst`` per ``window`` seconds.

    What a daemon sends must not make the manager write without bound: a flood
    of refused ``MAINPID=`` would otherwise cost a log line per datagram.
    Beyond the burst, lines are counted and the count logged when the next
    window opens (as :class:`~ikos.platform._notify.NotifySocket` does for
    the datagrams it drops).
    """

    __slots__ = ("burst", "logged", "opened", "suppressed", "window")  # one per daemon

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self.opened = -window
        self.logged = self.suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.opened >= self.window:
            if self.suppressed:
                log.warning("%d more log lines about notifications suppressed", self.suppressed)
            self.opened, self.logged, self.suppressed = now, 0, 0
        if self.logged < self.burst:
            self.logged += 1
            log.log(level, msg, *args)
        else:
            self.suppressed += 1


def _names_pid_1(pid_file: str) -> bool:
    try:
        with open(pid_file, "rb") as f:
            return f.read(64).strip() == b"1"
    except OSError:
        return False


_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def pid_file_owners(plan: ExecPlan) -> tuple[int, ...]:
    """Whose PID file ikos may replace besides its own: the daemon's user's (who may write it)."""
    return (plan.uid,) if plan.uid is not None else ()


def direct_spawn_possible(plan: ExecPlan) -> bool:
    """Whether posix_spawn can carry out ``plan`` (else the fork server must)."""
    return (
        plan.uid is None
        and plan.gid is None
        and plan.groups is None
        and plan.umask is None
        and plan.working_directory is None
        and not plan.limits.rlimits()
        and plan.root_directory is None  # chroot: only the fork server's child does it
    )


class _NotServed(Exception):
    """The spawn server cannot take this start (nothing was started)."""


def _stdio(plan: ExecPlan) -> tuple[tuple[int, StdioSpec, str], ...]:
    """(descriptor, what it is, its field name) of the three standard streams of ``plan``."""
    return ((0, plan.stdin, "stdin"), (1, plan.stdout, "stdout"), (2, plan.stderr, "stderr"))


def exec_entry(payload: tuple[ExecPlan, dict[int, int]], fds: list[int]) -> NoReturn:
    """Fork-server entry: ``fds[0]`` is the error pipe, the others the stdio targets."""
    plan, stdio_index = payload
    # descriptors received over SCM_RIGHTS are inheritable: the error pipe must
    # close on exec, or the manager would never see the EOF that means success
    os.set_inheritable(fds[0], False)
    stdio = {target: fds[index] for target, index in stdio_index.items()}
    exec_in_child(plan, stdio, (), fds[0])


#: Bytes of a unit command's output kept for the daemon's log.
COMMAND_OUTPUT_LIMIT = 64 * 1024


def unit_plan(spec: Exec, plan: ExecPlan) -> ExecPlan:
    """The plan with what a unit's ExecStart= asks beyond a plain argv: ``$VAR``, ``@``."""
    o = spec.options
    argv = list(plan.argv)
    if o.expand_environment:
        argv[1:] = expand_variables(argv[1:], plan.environ)
    if o.argv0 is not None:
        argv[0] = o.argv0
    if argv == list(plan.argv):
        return plan
    return dataclasses.replace(plan, argv=tuple(argv))


def command_cgroup(spec: Exec, cgroup: DaemonCgroup | None) -> DaemonCgroup | None:
    """Where a unit's commands run: the daemon's cgroup in ``control-group`` mode.

    In ``process-group`` mode a stop reaches the daemon's session only, and the
    commands keep their own fate, as before.
    """
    return cgroup if spec.options.kill_mode == "control-group" else None


def stop_timeout(spec: Exec) -> float:
    """Seconds a stop command may take: TimeoutStopSec= (``shutdown``), else 90 as systemd."""
    shutdown = spec.shutdown
    return float(shutdown) if isinstance(shutdown, int | float) else 90.0


def make_directories(spec: Exec, plan: ExecPlan) -> None:
    """Create the ``directories`` (RuntimeDirectory= and the like), owned by the daemon.

    As systemd does: missing parents are created root-owned with mode 0755,
    the directory itself gets the mode asked and, as root, the daemon's user
    and group (also when it existed already). Raises :class:`SpawnError`.
    """
    for path, mode in spec.options.directories.items():
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
            os.chmod(path, mode)
            if os.geteuid() == 0 and (plan.uid is not None or plan.gid is not None):
                os.chown(
                    path, -1 if plan.uid is None else plan.uid, -1 if plan.gid is None else plan.gid
                )
        except OSError as exc:
            raise SpawnError(
                spec.name, "directories", f"cannot create {path}: {exc.strerror or exc}"
            ) from None


#: The end an arm is forecast for: any end restarts a permanent executable alike.
_ANY_END = ExitReason("killed by SIGKILL", signal=signal.SIGKILL)


def _open_stream(std: StdioSpec, target: int) -> int:
    """A start's stdio descriptor ``target`` for a stream that is a file or the null device
    (``std``: a plan's stdin/stdout/stderr): created, appended to or truncated as it says."""
    path, flags = os.devnull, os.O_RDONLY if target == 0 else os.O_WRONLY
    if std.mode in ("file", "append"):
        assert std.path is not None
        path = std.path
        if target != 0:
            flags |= os.O_CREAT | (os.O_APPEND if std.mode == "append" else os.O_TRUNC)
    return os.open(path, flags | os.O_CLOEXEC, 0o644)


def _close_pipes(pipes: list[tuple[str, int]]) -> None:
    for _, r in pipes:
        os.close(r)


class _EarlyStart:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """A restart sent before its exit was recorded (:meth:`ExecRuntime.restart_early`)."""

    __slots__ = ("cgroup", "incarnation", "pipes", "plan", "reply", "spec", "started_by")

    def __init__(
        self,
        spec: Exec,
        incarnation: int,
        plan: ExecPlan,
        cgroup: DaemonCgroup,
        pipes: list[tuple[str, int]],
        reply: asyncio.Future[tuple[int | None, str]],
        started_by: str = EARLY,
    ) -> None:
        self.spec = spec
        self.started_by = started_by
        #: The incarnation of the node whose start takes it.
        self.incarnation = incarnation
        self.plan = plan
        self.cgroup = cgroup
        self.pipes = pipes
        self.reply = reply

    def discard(self) -> None:
        """ikosd is closing: nothing of it may be left (the cgroups are emptied next)."""
        _close_pipes(self.pipes)
        if self.reply.done():
            _cgexec.kill_and_reap(self.reply.result()[0])
        else:
            self.reply.cancel()  # the reply, if it comes, kills and reaps it


class ExecHandle:
    """One run of an executable daemon; see the module docstring."""

    manages_start_timeout = True
    # Class defaults, set on the instance only by a daemon that uses them (a unit's
    # commands): a running executable without commands pays nothing for them.
    #: True once a stop was asked for (before ExecStop=): $SERVICE_RESULT reads it.
    stop_requested = False
    #: Unit commands running now, and a future resolved when none is left.
    _commands_running = 0
    _commands_idle: asyncio.Future[None] | None = None
    #: Exits ikosd decided itself (a timeout, a failure), which override the process's
    #: own account; a tuple made for the few runs that have one.
    events: tuple[dict[str, Any], ...] = ()
    _notify_log: NotifyLog | None = None

    def __init__(
        self,
        runtime: ExecRuntime,
        spec: Exec,
        plan: ExecPlan,
        proc: ProcessHandle,
        cgroup: DaemonCgroup | None,
        *,
        sid: int | None = None,
        adopted: bool = False,
        node: WorkerNode | None = None,
    ) -> None:
        self.rt = runtime
        self.spec = spec
        #: ikosd's environment when the plan was built: the plan is reused for an early
        #: restart while it is the same (see ExecRuntime.restart_early).
        self.environ_generation = environ_generation(check=False)
        #: The tree's node this is a run of (None in unit tests of the handle alone).
        self.node = node
        self.plan = plan
        self.proc = proc
        self.main = proc
        # exec_in_child starts a new session: sid = pgid = the first pid
        self.sid = proc.pid if sid is None else sid
        self.adopted = adopted
        self.cgroup = cgroup
        self.loop = asyncio.get_running_loop()
        kind = "simple" if adopted else plan.type
        # ready at once (the exec is done, nothing runs before ready): the runtime's
        # shared resolved future, not one more per running executable
        at_once = proc.ready.done() and kind in ("simple", "exec")
        at_once = at_once and not spec.options.exec_start_post
        self.ready: asyncio.Future[dict[str, Any]] = (
            runtime.started() if at_once else self.loop.create_future()
        )
        self.exited: asyncio.Future[ExitStatus] = self.loop.create_future()
        self.status_text = ""
        # only a notify daemon waits for READY=1 (a future per handle is memory x N)
        self.notify_ready: asyncio.Future[None] | None = (
            self.loop.create_future() if plan.type == "notify" else None
        )
        self.reloading: asyncio.Future[None] | None = None
        self.deadline = time.monotonic() + spec.start_timeout
        self.watchdog_usec = int(spec.options.watchdog_sec * 1e6)
        self.watchdog: asyncio.TimerHandle | None = None
        #: How it was started: posix_spawn, posix_spawn+cgexec, fork-server or adopted.
        self.started_by = "fork-server"
        self._finishing = False
        # set here, not later (nor as class defaults overridden later), which would end
        # the instance dicts' key sharing: measured 1.3 KiB more per armed daemon
        #: The restart armed in the spawn server (ExecRuntime.arm_soon): the server, the
        #: arm's number, the future of its end; and the timer that will arm it.
        self._armed: tuple[_cgexec.SpawnServer, int, asyncio.Future[_cgexec.Restarted]] | None
        self._armed = None
        self._arm_timer: asyncio.TimerHandle | None = None
        #: Arms sent for this run (bounded: see ExecRuntime._arm_ended).
        self._arms_sent = 0
        # pid_file: read for forking, written by ikos for every other type
        self.pid_file = (
            DaemonPidFile(
                plan.pid_file,
                owners=pid_file_owners(plan),
                note=runtime.paths.run_dir / PID_FILE_NOTES / spec.name,
            )
            if plan.pid_file and plan.type != "forking"
            else None
        )
        if cgroup is None:  # else the cgroup, not the session, reaches what is left
            proc.before_reap = functools.partial(self._before_reap, proc)
        # A task lives until the daemon is ready; then a callback on the main
        # process's exit watches it (_watch_main): no task, coroutine frames or
        # asyncio.wait per running daemon (see docs/performance.md). When the exec
        # has succeeded already (posix_spawn, an adopted process) and nothing runs
        # between it and ready, there is no task at all, not even during the start.
        self.task: asyncio.Task[None] | None = None
        self._watching = False
        if at_once:
            self._write_pid_file()
            self._running()
        else:
            self.task = self.loop.create_task(self._run(), name=f"exec:{spec.name}")

    @property
    def pid(self) -> int:
        return self.main.pid

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    @property
    def notify_log(self) -> NotifyLog:
        """The bound on log lines about this run's notifications (made at the first)."""
        if self._notify_log is None:
            self._notify_log = NotifyLog()
        return self._notify_log

    def _override_exit(self, reason: str) -> None:
        """Record why ikosd ended this run: it takes the place of the process's own reason."""
        self.events = (*self.events, {"event": "exit", "reason": reason, "override": True})

    def exit_event(self) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event.get("event") == "exit":
                return dict(event)
        return self.proc.exit_event()

    # -- life --------------------------------------------------------------------

    async def _first(self, *futs: asyncio.Future[Any]) -> set[asyncio.Future[Any]]:
        done = {f for f in futs if f.done()}
        if done:  # asyncio.wait would still park for a turn, with its futures and closures
            return done
        remaining = self.deadline - time.monotonic()
        while remaining > 0:
            done, _ = await asyncio.wait(
                futs, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return done
            remaining = self.deadline - time.monotonic()  # EXTEND_TIMEOUT_USEC moves it
        return set()

    async def _run(self) -> None:
        try:
            await self._life()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave the tree waiting on a handle
            log.exception("%s: supervising the executable failed", self.spec.name)
            self._fail(f"internal error: {exc}")
        finally:
            self.task = None

    async def _life(self) -> None:
        kind = "simple" if self.adopted else self.plan.type
        done = await self._first(self.proc.ready, self.proc.exited)
        if not done:
            return self._timeout()
        if self.proc.exited in done and not self.proc.ready.done():
            return self._finish(self.proc.exited.result())
        self._write_pid_file()  # the exec succeeded: the daemon's own code runs
        if kind == "notify":
            assert self.notify_ready is not None
            done = await self._first(self.notify_ready, self.proc.exited)
            if not done:
                return self._timeout()
            if self.notify_ready not in done:
                return self._finish(self.proc.exited.result())
        elif kind == "forking":
            done = await self._first(self.proc.exited)
            if not done:
                return self._timeout()
            status = self.proc.exited.result()
            if status.code != 0:
                return self._finish(status)
            forked = await self._wait_forked_main()
            if forked is None:
                # no main process is a failure of the daemon, not the launcher's clean exit
                return self._finish(ExitStatus(None, None, status.at))
            self._adopt_main(forked)
        elif kind == "oneshot":
            done = await self._first(self.proc.exited)
            if not done:
                return self._timeout()
            status = self.proc.exited.result()
            if status.code == 0:
                if await self._start_post():
                    self._set_ready()
                    self.loop.call_soon(self._finish, status)
            else:
                self._finish(status)
            return
        if not await self._start_post():
            return
        self._running()

    def _running(self) -> None:
        """Ready: tell the tree, then watch the main process by a callback, not a task."""
        self._set_ready()
        self._watching = True
        self._watch_main()

    def _watch_main(self) -> None:
        """Finish when the current main process exits (MAINPID= moves it: watched again)."""
        self.main.exited.add_done_callback(self._main_exited)

    def _main_exited(self, exited: asyncio.Future[ExitStatus]) -> None:
        if exited is not self.main.exited or exited.cancelled():
            return  # a former main process: the daemon lives on in its successor
        try:
            self._finish(exited.result())
        except Exception as exc:  # never leave the tree waiting on a handle
            log.exception("%s: supervising the executable failed", self.spec.name)
            self._fail(f"internal error: {exc}")

    def _write_pid_file(self) -> None:
        if self.pid_file is None or self._finishing:
            return
        try:
            self.pid_file.write(self.main.pid)
        except PidFileError as exc:  # checked at spawn: only a race gets here
            log.error("%s: %s", self.spec.name, exc)

    async def _start_post(self) -> bool:
        """ExecStartPost= commands, once started and before ready; False if one failed."""
        commands = self.spec.options.exec_start_post
        if not commands:
            return True
        remaining = max(self.deadline - time.monotonic(), 0.1)
        try:
            await self.run_commands(commands, "exec_start_post", remaining)
        except (SpawnError, ManagerError) as exc:
            self._fail(str(exc))
            return False
        return True

    async def run_stop_commands(self) -> None:
        """ExecStop= commands, before the stop signal; failures are logged, as systemd does."""
        self.stop_requested = True
        self.disarm()
        commands = self.spec.options.exec_stop
        if not commands or not self.alive:
            return
        for command in commands:
            try:
                await self.run_commands((command,), "exec_stop", stop_timeout(self.spec))
            except (SpawnError, ManagerError) as exc:
                log.warning("%s", exc)

    async def run_commands(
        self, commands: tuple[UnitCommand, ...], field: str, timeout: float
    ) -> None:
        """:meth:`ExecRuntime.run_commands` for this run: its main PID, in its cgroup.

        Counted while they run: the daemon's end waits for them before it
        kills what is left (systemd lets a control process finish, within its
        timeout, when the main process exits meanwhile).
        """
        self._commands_running += 1
        try:
            await self.rt.run_commands(
                self.spec, self.plan, commands, field, timeout, self.pid,
                cgroup=command_cgroup(self.spec, self.cgroup),
            )  # fmt: skip
        finally:
            self._commands_running -= 1
            idle = self._commands_idle
            if not self._commands_running and idle is not None and not idle.done():
                idle.set_result(None)

    def service_result(self, status: ExitStatus) -> dict[str, str]:
        """ExecStopPost='s environment for this end (see :func:`stop_post_environment`)."""
        reason = next((str(e["reason"]) for e in reversed(self.events) if e.get("override")), "")
        clean_stop = {self.spec.options.stop_signal}
        if self.spec.shutdown == "brutal_kill":
            clean_stop.add(signal.SIGKILL)
        return stop_post_environment(
            status.code, status.signal, reason=reason, success=self.spec.success_exit_status,
            stop_signals=clean_stop if self.stop_requested else None,
        )  # fmt: skip

    def _set_ready(self) -> None:
        if not self.ready.done():
            # the process's own ready event when it is the main one (the dict is the
            # same, and read by no one: one of them less per running daemon)
            started = self.proc.ready
            if self.main is self.proc and started.done() and not started.cancelled():
                self.ready.set_result(started.result())
            else:
                self.ready.set_result({"event": "ready", "pid": self.pid})
        self._arm_watchdog()

    def _timeout(self) -> None:
        why = f"did not become ready within {self.spec.start_timeout:g} s"
        self._override_exit(why)
        self.kill()
        self.loop.create_task(self._finish_after_kill())

    async def _finish_after_kill(self) -> None:
        status = await self.main.exited
        self._finish(status)

    def _fail(self, why: str) -> None:
        self._override_exit(why)
        self.kill()
        self._finish(ExitStatus(None, signal.SIGKILL, time.time()))

    def _finish(self, status: ExitStatus) -> None:
        """The daemon is over: clean up what is left of it, then tell the tree."""
        if self._finishing:
            return
        self._finishing = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self._arm_timer is not None:
            self._arm_timer.cancel()
            self._arm_timer = None
        armed = self._armed
        if armed is not None:
            # the server may be starting the successor already: its word comes first
            self._armed = None
            done = armed[2]
            if done.done():
                self._after_arm(status, done)
            else:
                done.add_done_callback(functools.partial(self._after_arm, status))
            return
        self._finish_now(status)

    def _after_arm(self, status: ExitStatus, done: asyncio.Future[_cgexec.Restarted]) -> None:
        """The armed restart's end, once the run it watched is over: the successor the
        server started is taken as a restart sent early; else the exit goes on as usual."""
        outcome = None if done.cancelled() else done.result()
        if outcome is not None and self.rt.take_armed(self, *outcome):
            self._finished(status, True, True)
        else:
            self._finish_now(status)

    def _finish_now(self, status: ExitStatus) -> None:
        # unit commands still running, or ExecStopPost= to run, come before the tree hears
        # of the exit (in _clean_up), and so before any restart
        commands_after = bool(self._commands_running or self.spec.options.exec_stop_post)
        emptied = not commands_after and (self.cgroup is None or self._cgroup_emptied())
        # the successor's start goes out first when the supervisor is sure to want it
        # (runsv's order): what follows, and the exit's transition, come once it runs
        # (the server replies once its exec is done), so that the successor is not
        # kept waiting for a CPU by ikosd's bookkeeping
        reply = self.rt.restart_early(self, status) if self.cgroup is not None and emptied else None
        if reply is not None:
            reply.add_done_callback(functools.partial(self._finished, status, True, True))
        else:
            self._finished(status, emptied, False)

    def _finished(self, status: ExitStatus, emptied: bool, early: bool, _: object = None) -> None:
        if self.pid_file is not None:
            self.pid_file.remove()
        if not early:  # else the successor's pipes replace them in the keeper
            self.rt.logs.release(self.spec.name)
        self.rt.forget(self)
        if emptied:
            # nothing is left to kill (the session went in _before_reap, or the cgroup
            # is empty and gone): the tree hears of the exit now, not in a clean-up
            # task's turn later, on the restart's path
            if not self.exited.done():
                self.exited.set_result(status)
            if early and self.node is not None:
                # after the callbacks set_result just queued (the tree's, which posts
                # the exit to the supervisor): the check goes into its queue behind it
                self.loop.call_soon(self.rt.check_early, self.node)
            return
        self.loop.create_task(self._clean_up(status), name=f"exec-cleanup:{self.spec.name}")

    def _cgroup_emptied(self) -> bool:
        """Whether the daemon's cgroup holds no process (the usual end of a daemon that
        was one process): kept for its next run, or removed; else :meth:`_clean_up`
        kills what is left."""
        assert self.cgroup is not None
        try:
            if self.cgroup.pids():
                return False
        except OSError:
            return False
        # nothing can join an empty cgroup of ours: its members are its only way in.
        # Kept for the next run when it can be (a restart reuses it: no rmdir now, no
        # mkdir then); removed when the daemon leaves the tree (retire) or at close().
        return self.cgroup.reusable or self.cgroup.remove()

    async def _clean_up(self, status: ExitStatus) -> None:
        """Kill what is left, run ExecStopPost=, then tell the tree (which may restart it).

        A unit command still running (ExecStop= when the main process exits
        during it) is waited for first, within its own timeout. ExecStopPost=
        runs before the tree hears of the end, as systemd runs it before a
        restart; the commands' leftovers are killed after it.
        """
        try:
            if self._commands_running:
                self._commands_idle = self.loop.create_future()
                await self._commands_idle
            post = self.spec.options.exec_stop_post
            await self._kill_leftovers(keep=bool(post))
            if post:
                env = self.service_result(status)
                await self.rt.run_stop_post(self.spec, self.plan, self.cgroup, env)
                await self._kill_leftovers()
        except Exception:
            log.exception("%s: killing what is left of the daemon failed", self.spec.name)
        finally:
            if not self.exited.done():
                self.exited.set_result(status)

    def _before_reap(self, handle: ProcessHandle) -> None:
        """``handle`` exited and is not reaped yet: if it was the main process and led its
        session, kill what is left of the session now, while the zombie pins its number."""
        if handle is self.main and self.cgroup is None:
            signal_group(handle, signal.SIGKILL)

    async def _kill_leftovers(self, *, keep: bool = False) -> None:
        # Without a cgroup, the main process's session was killed before the main
        # process was reaped (_before_reap); a session whose leader is gone (a forking
        # daemon's launcher) is not signalled at all: its number may name a stranger.
        # The emptied cgroup directory is kept for the next run if it can be (a restart
        # reuses it: no mkdir/rmdir per start); removed when the daemon leaves the tree
        # (retire) or at close().
        # With ``keep``, the directory stays for ExecStopPost= to run in.
        if self.cgroup is None:
            return
        if not keep:
            await self.rt.empty_cgroup(self.spec.name, self.cgroup)
            return
        with contextlib.suppress(OSError, IkosError):
            await self.cgroup.kill_all_async(signal.SIGKILL, timeout=2.0)

    # -- forking ---------------------------------------------------------------------

    async def _wait_forked_main(self) -> int | None:
        """The main PID of a forking daemon whose launcher exited 0; None (and why) if none.

        As systemd does, a PID file that is missing, stale or not yet naming one of
        the daemon's processes is read again while the daemon has processes left,
        until the start deadline: nginx's launcher exits before the master, which
        has forked and called setsid, writes the file. PID 1 is refused at once.
        """
        while True:
            members = await self._members_async()
            try:
                return self._forked_main(members)
            except (PidFileError, OSError, ValueError) as exc:
                error = str(exc)
            pid_file = self.plan.pid_file
            expired = time.monotonic() >= self.deadline
            if pid_file is None or _names_pid_1(pid_file) or expired or not members:
                if expired:
                    error += f" (waited {self.spec.start_timeout:g} s for the daemon to write it)"
                self._override_exit(f"forking: {error}")
                return None
            await asyncio.sleep(PID_FILE_POLL)

    def _forked_main(self, members: set[int]) -> int:
        if self.plan.pid_file:
            return read_pid_file(
                self.plan.pid_file, owner_pgid=self.sid, owner_pids=frozenset(members) or None
            )
        alive = [p for p in members if p != self.proc.pid]
        if len(alive) == 1:
            return alive[0]
        raise ValueError(
            f"forking daemon without pid_file left {len(alive)} processes: set pid_file"
        )

    def _members(self) -> set[int]:
        """The daemon's processes: its cgroup's, else its session's (a scan of /proc)."""
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                return set(self.cgroup.pids())
        return set(session_members(self.sid))

    async def _members_async(self) -> set[int]:
        """:meth:`_members` without scanning /proc on the event loop."""
        if self.cgroup is not None:
            return self._members()
        return await asyncio.to_thread(self._members)

    def _adopt_main(self, pid: int) -> None:
        if pid == self.main.pid:
            return
        self.main = ProcessHandle(pid)
        if self.cgroup is None:
            self.main.before_reap = functools.partial(self._before_reap, self.main)
        self.notify_log.log(logging.INFO, "%s: main process is now %d", self.spec.name, pid)
        self.rt.index(self)
        if self.proc.ready.done():
            self._write_pid_file()
        if self._watching:
            self._watch_main()

    # -- sd_notify ---------------------------------------------------------------------

    def on_notify(self, msg: NotifyMessage) -> None:
        fields = msg.fields
        new_main = None
        if "MAINPID" in fields:  # the cgroup is read only when needed: floods are cheap
            try:
                # the cgroup's members, or the session checked for that one PID:
                # never a scan of /proc on the loop
                members = frozenset(self._members()) if self.cgroup is not None else frozenset()
                new_main = main_pid(fields, owner_pgid=self.sid, owner_pids=members)
            except ValueError as exc:
                self.notify_log.log(
                    logging.WARNING,
                    "%s: ignored notification from pid %d: %s",
                    self.spec.name,
                    msg.pid,
                    exc,
                )
        if new_main is not None:
            for other in self.rt.handles:
                if other is not self and new_main in (other.pid, other.sid):
                    self.notify_log.log(
                        logging.WARNING,
                        "%s: ignored MAINPID=%d of daemon %s",
                        self.spec.name,
                        new_main,
                        other.spec.name,
                    )
                    new_main = None
                    break
        if new_main is not None:
            self._adopt_main(new_main)
        if "STATUS" in fields:
            self.status_text = fields["STATUS"][:512]
        if "EXTEND_TIMEOUT_USEC" in fields and not self.ready.done():
            with contextlib.suppress(ValueError):
                extra = int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6
                self.deadline = max(self.deadline, time.monotonic() + min(extra, 3600.0))
        if fields.get("RELOADING") == "1" and (self.reloading is None or self.reloading.done()):
            self.reloading = self.loop.create_future()
        if fields.get("STOPPING") == "1":
            self.notify_log.log(logging.INFO, "%s: stopping", self.spec.name)
        if fields.get("READY") == "1":
            if self.notify_ready is not None and not self.notify_ready.done():
                self.notify_ready.set_result(None)
            if self.reloading is not None and not self.reloading.done():
                self.reloading.set_result(None)
        wd = fields.get("WATCHDOG")
        if wd == "1":
            self._arm_watchdog()
        elif wd == "trigger":
            self._watchdog_expired()

    def _arm_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.watchdog_usec > 0 and self.ready.done() and not self.exited.done():
            self.watchdog = self.loop.call_later(self.watchdog_usec / 1e6, self._watchdog_expired)

    def _watchdog_expired(self) -> None:
        log.error("%s: watchdog timeout: killing it", self.spec.name)
        self._override_exit("watchdog timeout")
        self.send_signal(signal.SIGABRT)
        self.loop.call_later(2.0, self.kill)

    # -- signals -------------------------------------------------------------------

    def disarm(self) -> None:
        """No restart by the spawn server from now on (a stop, or a signal from ikosd):
        said to the server before any signal, and read by it before the daemon's end."""
        if self._arm_timer is not None:
            self._arm_timer.cancel()
            self._arm_timer = None
        if self._armed is not None:
            server, number, _ = self._armed
            # unsent (the socket full): a restart that comes is killed by check_early
            server.disarm(number)

    def send_signal(self, sig: int) -> bool:
        """Signal the whole daemon: its cgroup (or session), main process included.

        Never through a group number that may have been recycled: the cgroup's
        members are pinned by pidfds before they are signalled, and a session
        is signalled as a group only while its leader (the main process, or
        the first process when it is still there) is our unreaped child.
        Otherwise the main process alone gets the signal, through its pidfd.
        Once the main process is over, nothing: :meth:`_clean_up` ends what is
        left, and a stop's SIGKILL must not cut short ExecStopPost=, which has
        its own timeout.
        """
        if self._finishing:
            return False
        self.disarm()
        sent = self.main.send_signal(sig)
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                for pid in self.cgroup.pids() - {self.main.pid}:
                    sent = self.cgroup.signal_member(pid, sig) or sent
            return sent
        return any(signal_group(leader, sig) for leader in (self.main, self.proc)) or sent

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)

    async def reload(self) -> None:
        """Reload: the reload command, else the reload signal; for notify, wait for READY=1."""
        if not self.spec.options.reloadable:
            raise ManagerError(
                f"'{self.spec.name}' cannot be reloaded: its unit has no ExecReload= "
                "(set reload_signal or reload_command to give it one)",
                "bad_request",
            )
        if self.spec.options.exec_reload:
            return await self._exec_reload()
        command = self.spec.options.reload_command
        if self.plan.type == "notify":
            self.reloading = self.loop.create_future()
        if command:
            argv = (
                [str(a) for a in command]
                if isinstance(command, list | tuple)
                else ["/bin/sh", "-c", str(command)]
            )
            try:
                result = await run_command(
                    argv,
                    env={**os.environ, "MAINPID": str(self.pid)},
                    timeout=self.spec.start_timeout,
                )
            except OSError as exc:
                raise ManagerError(
                    f"'{self.spec.name}': cannot run the reload command: {exc.strerror or exc}"
                ) from None
            if result.status is None:
                raise ManagerError(f"'{self.spec.name}': reload command timed out", "timeout")
            if result.status.code != 0:
                raise ManagerError(f"'{self.spec.name}': reload command {result.status.describe()}")
        else:
            # The main process only, as systemd's `kill -HUP $MAINPID`: helpers and
            # workers are the main process's business (nginx's workers must not see
            # HUP), and what the main process forks to handle the signal must not be
            # hit by it too, as a cgroup-wide send racing with that fork would.
            sig = self.plan.reload_signal or signal.SIGHUP
            if not self.main.send_signal(sig):
                raise ManagerError(f"'{self.spec.name}' is not running")
        await self._reloaded()

    async def _exec_reload(self) -> None:
        """A unit's ExecReload= commands, in order, as the daemon runs.

        As systemd for ``Type=notify``: the reload is over when the commands
        are, unless the daemon said ``RELOADING=1`` meanwhile; then it is
        over at its ``READY=1``.
        """
        self.reloading = None
        try:
            await self.run_commands(
                self.spec.options.exec_reload, "exec_reload", self.spec.start_timeout
            )
        except SpawnError as exc:
            raise ManagerError(str(exc)) from None
        await self._reloaded()

    async def _reloaded(self) -> None:
        """Wait for the READY=1 that ends a notify daemon's reload, if one is awaited."""
        if self.reloading is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.reloading), self.spec.start_timeout)
            except TimeoutError:
                raise ManagerError(
                    f"'{self.spec.name}' did not report READY=1 after the reload", "timeout"
                )


class ExecRuntime:
    """The spawner of executables: notify socket, cgroups, log capture, the two spawn paths."""

    def __init__(
        self,
        paths: InstancePaths,
        forkserver: ForkServer,
        logs: DaemonLogs,
        on_forked: Callable[[WorkerNode, int, bool], None],
        environ: dict[str, str] | None = None,
        daemon_variable: str | None = None,
    ) -> None:
        self.paths = paths
        self.forkserver = forkserver
        self.logs = logs
        self._on_forked = on_forked
        #: Added to every executable's environment (the instance's marker), with
        #: ``daemon_variable`` set to the daemon's name: how a later ikosd finds them.
        self.environ = dict(environ or {})
        self._environ_items = tuple(self.environ.items())
        self.daemon_variable = daemon_variable
        self.handles: list[ExecHandle] = []
        self._by_pid: dict[int, ExecHandle] = {}
        self.notify: NotifySocket | None = None
        self.cgroups: CgroupManager | None = None
        #: The cgroup of each daemon started, kept between its runs until it leaves the tree.
        self._kept_cgroups: dict[str, DaemonCgroup] = {}
        self.notify_log = NotifyLog()
        self._spawning_notify = 0
        self._started: asyncio.Future[dict[str, Any]] | None = None
        #: The compiled cgroup trampoline (see ikos.platform._cgexec), once there is one.
        self.spawn_helper: str | None = None
        #: The trampoline kept running to start daemons into cgroups, once one was.
        self.spawn_server: _cgexec.SpawnServer | None = None
        #: Restarts sent before their exit was recorded, until their start takes them.
        self._early: dict[WorkerNode, _EarlyStart] = {}
        #: Restarts armed in the spawn server, by supervisor (restarts foreseen).
        self._armed: dict[SupervisorNode, int] = {}

    async def start(self) -> None:
        self.spawn_helper = _cgexec.helper_path()
        if self.spawn_helper is None and _cgexec.compiler() is not None:
            # built once per machine, off the loop: until then the fork server starts them
            build = asyncio.get_running_loop().run_in_executor(None, _cgexec.build)
            build.add_done_callback(self._helper_built)
        address = notify_socket_address(self.paths)
        try:
            self.notify = NotifySocket(address)
        except OSError as exc:
            log.warning(
                "no sd_notify socket at %s: %s (Type=notify daemons cannot start)", address, exc
            )
            return
        asyncio.get_running_loop().add_reader(self.notify.fileno(), self._on_notify)

    def _helper_built(self, build: asyncio.Future[str | None]) -> None:
        if not build.cancelled() and build.exception() is None:
            self.spawn_helper = build.result()

    def close(self) -> None:
        for early in self._early.values():
            early.discard()
        self._early.clear()
        if self.spawn_server is not None:
            self.spawn_server.close()
        if self.notify is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.notify.fileno())
            self.notify.close()
            self.notify = None
        if self.cgroups is not None:
            with contextlib.suppress(Exception):
                self.cgroups.cleanup()

    def _hold_notify(self) -> None:
        """Stop reading notifications while a notify daemon is spawned without its handle.

        The daemon runs before the fork server has told the manager its PID; a
        READY=1 read in that window would belong to no daemon and be lost, and
        the start would time out. Held, it waits in the socket's queue (bounded
        by the kernel) until the handle is indexed and can claim it.
        """
        self._spawning_notify += 1
        if self._spawning_notify == 1 and self.notify is not None:
            asyncio.get_running_loop().remove_reader(self.notify.fileno())

    def _release_notify(self) -> None:
        self._spawning_notify -= 1
        if self._spawning_notify == 0 and self.notify is not None:
            asyncio.get_running_loop().add_reader(self.notify.fileno(), self._on_notify)

    def started(self) -> asyncio.Future[dict[str, Any]]:
        """A resolved ``ready`` future that the runs known to be ready at once share
        (an exec already done): a future and its result less per running executable.
        Its result says no more than ``ready``: nothing reads it (the pid is the run's)."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            self._started.set_result({"event": "ready"})
        return self._started

    def index(self, handle: ExecHandle) -> None:
        self._by_pid[handle.pid] = handle
        self._by_pid[handle.sid] = handle

    def forget(self, handle: ExecHandle) -> None:
        with contextlib.suppress(ValueError):
            self.handles.remove(handle)
        for pid in [p for p, h in self._by_pid.items() if h is handle]:
            del self._by_pid[pid]

    def _owner(self, pid: int) -> ExecHandle | None:
        handle = self._by_pid.get(pid)
        if handle is not None:
            return handle
        try:
            sid = os.getsid(pid)
        except OSError:
            sid = -1
        for h in self.handles:
            if sid == h.sid:
                return h
            if h.cgroup is not None:
                with contextlib.suppress(OSError):
                    if pid in h.cgroup.pids():
                        return h
        return None

    def _on_notify(self) -> None:
        assert self.notify is not None
        for msg in self.notify.drain():
            handle = self._owner(msg.pid)
            if handle is None:
                self.notify_log.log(
                    logging.WARNING,
                    "sd_notify from pid %d, which belongs to no daemon: ignored",
                    msg.pid,
                )
                continue
            handle.on_notify(msg)

    def _cgroup_manager(self) -> CgroupManager:
        if self.cgroups is None:
            self.cgroups = CgroupManager(instance_cgroup_name(self.paths))
        return self.cgroups

    def _cgroup_for(self, spec: Exec, plan: ExecPlan) -> DaemonCgroup | None:
        """The cgroup a start of ``spec`` goes into (made now if need be), if any.

        control-group (systemd's default KillMode): a tracking cgroup, joined by the
        child before exec, so no process of the daemon escapes its stop, setsid or
        not; process-group: no cgroup unless limits need one, signals go to the
        daemon's session, and the start can use the much faster posix_spawn.
        """
        if spec.options.kill_mode == "control-group" or plan.limits.needs_cgroup:
            return self._cgroup(spec, plan)
        return None

    def _cgroup(self, spec: Exec, plan: ExecPlan) -> DaemonCgroup | None:
        cgroups = self._cgroup_manager()
        cg = cgroups.create(spec.name, plan.limits, track=True)
        if cg is not None:
            self._kept_cgroups[spec.name] = cg
        for warning in cgroups.warnings:
            log.warning("%s", warning)
        cgroups.warnings.clear()
        return cg

    async def spawn(self, node: WorkerNode) -> ExecHandle:
        spec = node.spec
        assert isinstance(spec, Exec)
        early = self._early.pop(node, None)
        if early is not None:
            if early.spec is spec and early.incarnation == node.incarnation:
                return await self._take_early(node, early)
            await self._abandon_early(early)
        plan = unit_plan(spec, build_exec_plan(spec, self.paths))
        make_directories(spec, plan)
        cgroup = self._cgroup_for(spec, plan)
        if not (spec.options.exec_start_pre or spec.options.exec_stop_post):
            return await self._spawn_prepared(node, spec, plan, cgroup)
        # a unit's commands: ExecStartPre= runs in the cgroup the daemon will have, and
        # a start that fails runs ExecStopPost= then kills what its commands left there
        try:
            if spec.options.exec_start_pre:
                await self.run_commands(
                    spec, plan, spec.options.exec_start_pre, "exec_start_pre",
                    spec.start_timeout, cgroup=command_cgroup(spec, cgroup),
                )  # fmt: skip
            return await self._spawn_prepared(node, spec, plan, cgroup)
        except SpawnError as exc:
            await self.after_failed_start(spec, plan, cgroup, exc)
            raise
        except asyncio.CancelledError:  # ikosd stopping: what the commands left goes too
            if command_cgroup(spec, cgroup) is not None:
                assert cgroup is not None
                # no wait (being cancelled), and no cgroup.kill: the directory stays
                # reusable for a daemon cloned into it later (see DaemonCgroup.reusable)
                with contextlib.suppress(OSError):
                    for pid in cgroup.pids():
                        cgroup.signal_member(pid, signal.SIGKILL)
            raise

    async def after_failed_start(
        self, spec: Exec, plan: ExecPlan, cgroup: DaemonCgroup | None, exc: SpawnError
    ) -> None:
        """A start failed before the daemon ran: ExecStopPost=, then kill what was left.

        ``$SERVICE_RESULT`` is systemd's ``exit-code`` when a start command
        failed, ``resources`` when the daemon could not be started; there is
        no main process, so no ``$EXIT_CODE``/``$EXIT_STATUS``.
        """
        if spec.options.exec_stop_post:
            result = "exit-code" if exc.field == "exec_start_pre" else "resources"
            await self.run_stop_post(spec, plan, cgroup, {"SERVICE_RESULT": result})
        if cgroup is not None:
            await self.empty_cgroup(spec.name, cgroup)

    async def run_stop_post(
        self, spec: Exec, plan: ExecPlan, cgroup: DaemonCgroup | None, env: dict[str, str]
    ) -> None:
        """ExecStopPost= commands, all of them, failures logged; TimeoutStopSec= each."""
        if cgroup is not None and not all(os.path.isdir(d) for d in cgroup.dirs):
            cgroup = None  # removed meanwhile: run outside, nothing of the daemon is left
        for command in spec.options.exec_stop_post:
            try:
                await self.run_commands(
                    spec, plan, (command,), "exec_stop_post", stop_timeout(spec),
                    cgroup=command_cgroup(spec, cgroup), env=env,
                )  # fmt: skip
            except (SpawnError, ManagerError) as exc:
                log.warning("%s", exc)

    async def empty_cgroup(self, daemon: str, cgroup: DaemonCgroup) -> None:
        """Kill what is left in a daemon's cgroup; drop the directory if it is spent."""
        with contextlib.suppress(OSError, IkosError):
            await cgroup.kill_all_async(signal.SIGKILL, timeout=2.0)
            if not cgroup.reusable:
                if self._kept_cgroups.get(daemon) is cgroup:
                    del self._kept_cgroups[daemon]
                cgroup.remove()

    async def _spawn_prepared(
        self, node: WorkerNode, spec: Exec, plan: ExecPlan, cgroup: DaemonCgroup | None
    ) -> ExecHandle:
        if plan.type == "notify" and self.notify is None:
            raise SpawnError(spec.name, "type", "notify needs the sd_notify socket, which failed")
        if plan.pid_file and plan.type != "forking":
            try:
                DaemonPidFile(plan.pid_file, owners=pid_file_owners(plan)).check()
            except PidFileError as exc:
                raise SpawnError(spec.name, "pid_file", str(exc)) from None
        plan = self._placed(spec, plan, cgroup)
        if plan.type != "notify":
            return await self._spawn(node, spec, plan, cgroup)
        self._hold_notify()
        try:
            return await self._spawn(node, spec, plan, cgroup)
        finally:
            self._release_notify()

    def _placed(self, spec: Exec, plan: ExecPlan, cgroup: DaemonCgroup | None) -> ExecPlan:
        """The plan completed with the watchdog, ``cgroup`` and the instance's marks."""
        env = plan.env
        if self.watchdog_env(spec):
            env = (*env, ("WATCHDOG_USEC", str(int(spec.options.watchdog_sec * 1e6))))
        # the environment is one tuple shared by the daemons' plans (shared_env); the
        # daemon's own variable, the only one unique to it, is kept apart (ExecPlan.mark)
        env = shared_env((*env, *self._environ_items))
        mark = (self.daemon_variable, spec.name) if self.daemon_variable else None
        procs = plan.cgroup_procs if cgroup is None else tuple(cgroup.procs_files)
        return dataclasses.replace(plan, env=env, mark=mark, cgroup_procs=procs)

    async def _spawn(
        self, node: WorkerNode, spec: Exec, plan: ExecPlan, cgroup: DaemonCgroup | None
    ) -> ExecHandle:
        if direct_spawn_possible(plan):
            if cgroup is None:
                return await self._spawn_direct(node, spec, plan, None, None)
            if self.spawn_helper is not None:
                server = self._spawn_server(cgroup)
                if server is not None:
                    handle = await self._spawn_served(node, spec, plan, cgroup, server)
                    if handle is not None:
                        return handle
                return await self._spawn_direct(node, spec, plan, cgroup, self.spawn_helper)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds = [err_w]
        stdio_index: dict[int, int] = {}
        ours: list[int] = []
        theirs: list[int] = []
        try:
            for target, std, stream in ((1, plan.stdout, "stdout"), (2, plan.stderr, "stderr")):
                if std.mode == "log":
                    r, w = os.pipe2(os.O_CLOEXEC)
                    ours.append(r)
                    theirs.append(w)
                    stdio_index[target] = len(fds)
                    fds.append(w)
                    self.logs.capture(spec.name, stream, r)
            pid = await self.forkserver.spawn(
                spec.name,
                EXEC_ENTRY,
                (plan, stdio_index),
                fds,
                on_forked=lambda pid: self._on_forked(node, pid, True),
            )
        except BaseException:
            os.close(err_r)
            for r in ours:
                with contextlib.suppress(ValueError, RuntimeError):
                    asyncio.get_running_loop().remove_reader(r)
                with contextlib.suppress(OSError):
                    os.close(r)
            if cgroup is not None:
                with contextlib.suppress(Exception):
                    cgroup.remove()
            raise
        finally:
            os.close(err_w)
            for w in theirs:
                os.close(w)
        proc = ProcessHandle(pid, status_fd=err_r, exec_pipe=True)
        handle = ExecHandle(self, spec, plan, proc, cgroup, node=node)
        handle.started_by = "fork-server"
        self.handles.append(handle)
        self.index(handle)
        return handle

    def _spawn_server(self, cgroup: DaemonCgroup) -> _cgexec.SpawnServer | None:
        """The spawn server for a start into ``cgroup``, if it can do it (else the trampoline)."""
        if cgroup.v2_only is None or self.spawn_helper is None or not _cgexec.server_enabled():
            return None
        if self.spawn_server is None:
            self.spawn_server = _cgexec.SpawnServer(self.spawn_helper)
        return self.spawn_server if self.spawn_server.usable else None

    async def _spawn_served(
        self,
        node: WorkerNode,
        spec: Exec,
        plan: ExecPlan,
        cgroup: DaemonCgroup,
        server: _cgexec.SpawnServer,
    ) -> ExecHandle | None:
        """Start through the spawn server (see :class:`~ikos.platform._cgexec.SpawnServer`).

        The same start as :meth:`_spawn_direct` with the trampoline, without
        its exec: the stdio descriptors are opened here and passed along.
        None when the server cannot take the request (nothing was started):
        the caller uses the trampoline.
        """
        assert cgroup.v2_only is not None
        try:
            pipes, theirs, stdio = self._served_stdio(spec, plan)
        except _NotServed:
            return None
        except BaseException:
            with contextlib.suppress(Exception):
                cgroup.remove()
            raise
        try:
            try:
                pid, error = await server.spawn(
                    cgroup.v2_only, plan.executable, plan.argv, plan.environ, stdio
                )
            except OSError:
                raise _NotServed from None
        except _NotServed:  # nothing was started: the trampoline does it
            _close_pipes(pipes)
            return None
        except BaseException:
            _close_pipes(pipes)
            with contextlib.suppress(Exception):
                cgroup.remove()
            raise
        finally:
            for w in theirs:
                os.close(w)
        return await self._served(node, spec, plan, cgroup, pipes, pid, error)

    def _served_stdio(
        self, spec: Exec, plan: ExecPlan
    ) -> tuple[list[tuple[str, int]], list[int], list[int]]:
        """The three stdio descriptors of a start by the spawn server: (the log pipes'
        read ends by stream, the descriptors to close once sent, the three to send).
        Raises _NotServed (an inherited stream that is closed) or SpawnError, with
        nothing left open."""
        pipes: list[tuple[str, int]] = []
        theirs: list[int] = []  # closed once sent
        stdio: list[int] = []
        try:
            for target, std, stream in _stdio(plan):
                if std.mode == "inherit":  # ikosd's own, as posix_spawn would leave it
                    try:
                        fcntl.fcntl(target, fcntl.F_GETFD)
                    except OSError:  # closed: the trampoline leaves it closed too
                        raise _NotServed from None
                    stdio.append(target)
                    continue
                if std.mode == "log":
                    r, w = os.pipe2(os.O_CLOEXEC)
                    pipes.append((stream, r))
                    theirs.append(w)
                    stdio.append(w)
                    continue
                try:
                    theirs.append(_open_stream(std, target))
                except OSError as exc:
                    raise SpawnError(
                        spec.name, stream, f"cannot open {std.path or os.devnull}: {exc.strerror}"
                    ) from None
                stdio.append(theirs[-1])
        except BaseException:
            _close_pipes(pipes)
            for w in theirs:
                os.close(w)
            raise
        return pipes, theirs, stdio

    async def _served(
        self,
        node: WorkerNode,
        spec: Exec,
        plan: ExecPlan,
        cgroup: DaemonCgroup,
        pipes: list[tuple[str, int]],
        pid: int | None,
        error: str,
        started_by: str = "cgexec-server",
    ) -> ExecHandle:
        """The spawn server's reply to a start: the daemon's handle, or SpawnError."""
        if pid is None or error:
            _close_pipes(pipes)
            if pid is not None:  # its exec failed: our child (CLONE_PARENT), reaped here
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                disown(pid)
            else:  # the server died: a daemon it started may be in the cgroup, unnamed
                with contextlib.suppress(OSError, IkosError):
                    await cgroup.kill_all_async(signal.SIGKILL, timeout=2.0)
            with contextlib.suppress(Exception):
                cgroup.remove()
            where, sep, reason = error.partition(": ")
            raise SpawnError(spec.name, where if sep else None, reason if sep else error)
        for stream, r in pipes:
            self.logs.capture(spec.name, stream, r)
        return self._direct_handle(node, spec, plan, pid, cgroup, started_by)

    # -- restarts sent before the exit is recorded --------------------------------------

    def restart_early(
        self, handle: ExecHandle, status: ExitStatus
    ) -> asyncio.Future[tuple[int | None, str]] | None:
        """Send the start of ``handle``'s successor now, before the tree hears of the exit.

        Only when the supervisor foresees that it will restart the daemon at once
        and alone (:meth:`SupervisorNode.restarts_at_once`) and the start is a plain
        one through the spawn server (no ExecStartPre=, not notify, no PID file to
        check, an emptied cgroup of its own): the transition, the log line, the
        state store and the extensions then run while the daemon starts, as runsv
        restarts before it logs. The supervisor still decides: its start takes this
        one (:meth:`spawn`); if it decides otherwise, :meth:`check_early`, queued
        behind the exit, kills it. A crash of ikosd in between leaves an
        unrecorded process with the instance's marker, which the next ikosd stops
        before it starts the daemon again, as for any start not yet recorded.
        """
        node = handle.node
        if node is None or node.handle is not handle or node in self._early:
            return None
        spec = node.spec
        parent = node.parent
        if not isinstance(spec, Exec) or not isinstance(parent, SupervisorNode):
            return None
        if spec.options.exec_start_pre or spec.options.exec_stop_post:
            return None
        if self.spawn_helper is None or not _cgexec.server_enabled():
            return None
        reason = ExitReason.from_process(status, handle.exit_event())
        if not parent.restarts_at_once(node, reason, self._foreseen(parent)):
            return None
        try:
            # the plan of the run that ended, as spawn() would build it again (same spec,
            # same environment, the same emptied cgroup), unless a file is to be re-read
            plan, cgroup = handle.plan, handle.cgroup
            if (
                spec is not handle.spec
                or spec.options.environment_files
                or cgroup is None
                or not cgroup.reusable
                or handle.environ_generation != environ_generation()
            ):
                fresh = unit_plan(spec, build_exec_plan(spec, self.paths))
                cgroup = self._cgroup_for(spec, fresh)
                plan = self._placed(spec, fresh, cgroup)
            if plan.type == "notify" or plan.pid_file or not direct_spawn_possible(plan):
                return None
            make_directories(spec, plan)
            if cgroup is None or cgroup.v2_only is None:
                return None
            server = self._spawn_server(cgroup)
            if server is None:
                return None
            pipes, theirs, stdio = self._served_stdio(spec, plan)
        except (IkosError, OSError, _NotServed):
            return None  # the start the supervisor decides meets it again, and says so
        try:
            reply = server.spawn_now(
                cgroup.v2_only, plan.executable, plan.argv, plan.environ, stdio
            )
        except OSError:
            reply = None
        finally:
            for w in theirs:
                os.close(w)
        if reply is None:
            _close_pipes(pipes)
            return None
        self._early[node] = _EarlyStart(spec, node.incarnation + 1, plan, cgroup, pipes, reply)
        # the last run's pipes stay with the keeper until this run's replace them
        # (ExecHandle._finished); those no pipe of this run will replace go now
        logged = {stream for _, std, stream in _stdio(handle.plan) if std.mode == "log"}
        unmatched = tuple(logged - {stream for stream, _ in pipes})
        if unmatched:
            self.logs.release(spec.name, unmatched)
        return reply

    def _foreseen(self, parent: SupervisorNode) -> int:
        """The restarts of ``parent``'s children foreseen and not counted by it yet: sent
        early (their exits not handled) and armed in the spawn server."""
        return sum(1 for n in self._early if n.parent is parent) + self._armed.get(parent, 0)

    # -- restarts armed in the spawn server ---------------------------------------------

    def arm_soon(self, handle: ExecHandle, attempt: int = 0) -> None:
        """Arm ``handle``'s restart in the spawn server once it has run long enough.

        The server then starts the successor the moment the run ends, as
        runsv does, with no turn of ikosd's loop in between: ikosd hears of
        it with the exit and takes it as a restart sent early
        (:meth:`restart_early`), so the supervisor still decides and a start
        it does not take is killed. Armed only when the supervisor foresees
        that any end of the run would be restarted at once and alone (a
        permanent executable, restart intensity and back-off allowing, the
        arm counted as a restart foreseen), for a plain start (no unit
        commands, not notify, no PID file, the daemon's process the one
        started, an emptied cgroup of its own). ikosd disarms before every
        signal it sends (:meth:`ExecHandle.disarm`).
        """
        if attempt >= len(ARM_AFTER) or not _cgexec.armed_restarts_enabled():
            return
        if self._armable(handle) is not None:
            delay = ARM_AFTER[attempt] - (ARM_AFTER[attempt - 1] if attempt else 0.0)
            handle._arm_timer = handle.loop.call_later(delay, self._try_arm, handle, attempt)

    def _armable(self, handle: ExecHandle) -> SupervisorNode | None:
        """The supervisor of a run whose restart may be armed (see :meth:`arm_soon`)."""
        node, spec, plan, options = handle.node, handle.spec, handle.plan, handle.spec.options
        if node is None or node.spec is not spec:  # node.handle: the last run's, at first
            return None
        parent = node.parent
        if not isinstance(parent, SupervisorNode) or handle._finishing or handle.adopted:
            return None
        if handle.stop_requested:
            return None
        if spec.restart != "permanent" or not spec.auto_restart or spec.restart_prevent_exit_status:
            return None
        if spec.restart_on not in (None, "always"):
            return None
        if (
            options.exec_start_pre or options.exec_start_post or options.exec_stop
            or options.exec_stop_post or options.exec_reload or options.environment_files
        ):  # fmt: skip
            return None
        if plan.type not in ("simple", "exec") or plan.pid_file or handle.main is not handle.proc:
            return None
        if not direct_spawn_possible(plan):  # the server starts only what posix_spawn can
            return None
        if plan.stdout.mode == "file" or plan.stderr.mode == "file":
            return None  # truncated at each start: not a second before it
        cgroup = handle.cgroup
        if cgroup is None or not cgroup.reusable or cgroup.v2_only is None:
            return None
        return parent

    def _try_arm(self, handle: ExecHandle, attempt: int) -> None:
        handle._arm_timer = None
        parent = self._armable(handle)
        node, server, proc = handle.node, self.spawn_server, handle.proc
        if parent is None or node is None or node.handle is not handle or proc.pidfd is None:
            return
        if handle.exited.done():
            return
        if server is None or not server.usable or handle._armed is not None:
            return
        if handle.environ_generation != environ_generation():
            return  # the plan no longer holds ikosd's environment
        pending = self._foreseen(parent)
        if node.state is not State.RUNNING or not parent.restarts_at_once(node, _ANY_END, pending):
            self.arm_soon(handle, attempt + 1)  # a busy supervisor, a back-off: later
            return
        plan = handle.plan
        mark = plan.mark
        shared = [f"{k}={v}" for k, v in plan.env if mark is None or k != mark[0]]
        unique = [] if mark is None else [f"{mark[0]}={mark[1]}"]
        stdio: list[int | None] = []
        opened: list[int] = []
        try:
            for target, std, _ in _stdio(plan):
                if std.mode == "log":
                    stdio.append(None)  # a new pipe, made by the server
                elif std.mode == "inherit":
                    fcntl.fcntl(target, fcntl.F_GETFD)  # closed: not armed
                    stdio.append(target)
                else:
                    opened.append(_open_stream(std, target))
                    stdio.append(opened[-1])
            assert handle.cgroup is not None and handle.cgroup.v2_only is not None
            armed = server.arm(
                proc.pidfd, handle.cgroup.v2_only, plan.executable, plan.argv, shared, unique,
                stdio,
            )  # fmt: skip
        except OSError:
            armed = None
        finally:
            for fd in opened:
                os.close(fd)
        if armed is None:
            self.arm_soon(handle, attempt + 1)
            return
        handle._armed = (server, *armed)
        handle._arms_sent += 1
        self._armed[parent] = self._armed.get(parent, 0) + 1
        # the server watches the exit now: ikosd's loop sleeps through it (the successor
        # is started on a CPU ikosd does not compete for) and hears of it from the server
        proc.watch(False)
        armed[1].add_done_callback(functools.partial(self._arm_ended, parent, handle))

    def _arm_ended(
        self, parent: SupervisorNode, handle: ExecHandle, done: asyncio.Future[_cgexec.Restarted]
    ) -> None:
        handle.proc.watch(True)  # the exit, if it came, is handled on the next turn
        alive = not (handle._finishing or handle.exited.done() or handle.stop_requested)
        again = handle._arms_sent < len(ARM_AFTER)
        if alive and again and not done.cancelled() and done.result() is None:
            # disarmed by a signal that did not end it (or the server said no): again later
            handle._armed = None
            self.arm_soon(handle)
        left = self._armed.get(parent, 0) - 1
        if left > 0:
            self._armed[parent] = left
        else:
            self._armed.pop(parent, None)

    def take_armed(self, handle: ExecHandle, pid: int | None, error: str, fds: list[int]) -> bool:
        """The successor the spawn server started at ``handle``'s end (see :meth:`arm_soon`),
        kept as a restart sent early for the supervisor's start to take (else killed by
        :meth:`check_early`); False if there is none to keep (nothing started, or a
        start that cannot be the next run: killed)."""
        node = handle.node
        logged = [stream for _, std, stream in _stdio(handle.plan) if std.mode == "log"]
        if (
            pid is None or node is None or node.handle is not handle or node in self._early
            or node.spec is not handle.spec or handle.cgroup is None or len(fds) != len(logged)
            or handle.environ_generation != environ_generation()  # ikosd's changed since
        ):  # fmt: skip
            close_all(fds)
            _cgexec.kill_and_reap(pid)
            return False
        reply: asyncio.Future[tuple[int | None, str]] = handle.loop.create_future()
        reply.set_result((pid, error))
        self._early[node] = _EarlyStart(
            handle.spec, node.incarnation + 1, handle.plan, handle.cgroup,
            list(zip(logged, fds, strict=True)), reply, ARMED,
        )  # fmt: skip
        return True

    def check_early(self, node: WorkerNode) -> None:
        """Queue, behind the exit that the supervisor is to handle, the check that its
        decision took the start sent early; a start it did not take is killed."""
        if node not in self._early:
            return
        parent = node.parent
        if parent is None:
            asyncio.get_running_loop().create_task(self._early_taken(node))
            return
        parent.post(functools.partial(self._early_taken, node))

    async def _early_taken(self, node: WorkerNode) -> None:
        early = self._early.pop(node, None)
        if early is not None:
            await self._abandon_early(early)

    async def _take_early(self, node: WorkerNode, early: _EarlyStart) -> ExecHandle:
        # the last run's pipes were left with the keeper for this run's to replace: a
        # start that fails drops them
        try:
            pid, error = await _cgexec.SpawnServer.reply(early.reply)
        except BaseException:
            _close_pipes(early.pipes)
            self.logs.release(early.spec.name)
            raise
        try:
            return await self._served(
                node, early.spec, early.plan, early.cgroup, early.pipes, pid, error,
                early.started_by,
            )  # fmt: skip
        except BaseException:
            self.logs.release(early.spec.name)
            raise

    async def _abandon_early(self, early: _EarlyStart) -> None:
        """Kill a start sent early that the supervisor did not take, and all it forked."""
        name = early.spec.name
        _close_pipes(early.pipes)
        self.logs.release(name)  # the last run's pipes, left with the keeper for this one's
        pid, _ = await _cgexec.SpawnServer.reply(early.reply)
        _cgexec.kill_and_reap(pid)
        log.info("%s: the restart sent before its exit was handled was not taken: killed", name)
        await self.empty_cgroup(name, early.cgroup)  # what it forked before it died

    async def _spawn_direct(
        self,
        node: WorkerNode,
        spec: Exec,
        plan: ExecPlan,
        cgroup: DaemonCgroup | None,
        helper: str | None,
    ) -> ExecHandle:
        """Start with posix_spawn: no fork of a large interpreter, no second fork.

        glibc's posix_spawn is clone(CLONE_VM | CLONE_VFORK) then exec: the child
        runs no Python and takes no lock, so doing it from the threaded manager
        is as safe as the fork server, and it is several times faster. It only
        does what posix_spawn can express (session, stdio, signals, environment);
        a plan needing a user, umask, working directory or rlimits goes through
        the fork server instead. A cgroup must be joined before the daemon's
        first instruction, or a quick fork could escape it: with ``cgroup``,
        posix_spawn runs ``helper``, the compiled trampoline of
        :mod:`ikos.platform._cgexec`, which joins it and execs the daemon, and
        starts the daemon straight into its cgroup and reports its PID (or a
        failure, naming the field) on an error pipe, read here before returning.
        """
        actions: list[tuple[Any, ...]] = []
        pipes: list[tuple[str, int, int]] = []
        err_r = err_w = -1
        executable, argv = plan.executable, list(plan.argv)
        if cgroup is not None:
            assert helper is not None
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            if err_w == _cgexec.ERROR_FD:  # dup2 onto itself would keep its CLOEXEC flag
                err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, _cgexec.ERROR_FD + 1)
                os.close(_cgexec.ERROR_FD)
            executable = helper
            argv = _cgexec.argv(helper, cgroup.dirs, plan.executable, plan.argv)
        try:
            for target, std, stream in _stdio(plan):
                if std.mode == "log":
                    r, w = os.pipe2(os.O_CLOEXEC)
                    pipes.append((stream, r, w))
                    actions.append((os.POSIX_SPAWN_DUP2, w, target))
                elif std.mode == "null":
                    flags = os.O_RDONLY if target == 0 else os.O_WRONLY
                    actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, flags, 0))
                elif std.mode in ("file", "append"):
                    assert std.path is not None
                    if target == 0:
                        flags = os.O_RDONLY
                    else:
                        flags = os.O_WRONLY | os.O_CREAT
                        flags |= os.O_APPEND if std.mode == "append" else os.O_TRUNC
                    actions.append((os.POSIX_SPAWN_OPEN, target, std.path, flags, 0o644))
            if err_w >= 0:  # last: a stdio pipe's own number may be ERROR_FD
                actions.append((os.POSIX_SPAWN_DUP2, err_w, _cgexec.ERROR_FD))
            try:
                pid = os.posix_spawn(
                    executable,
                    argv,
                    plan.environ,
                    file_actions=actions,
                    setsid=cgroup is None,  # else the trampoline's child calls setsid
                    setsigmask=(),
                    setsigdef=_DEFAULT_SIGNALS,
                )
            except OSError as exc:
                raise SpawnError(
                    spec.name,
                    "executable",
                    f"cannot start {executable}: {exc.strerror or exc}",
                ) from None
            if cgroup is not None:
                os.close(err_w)
                err_w = -1
                pid = await self._trampoline_report(spec.name, pid, err_r)
        except BaseException:
            for _, r, _w in pipes:
                os.close(r)
            if cgroup is not None:
                with contextlib.suppress(Exception):
                    cgroup.remove()
            raise
        finally:
            for _, _r, w in pipes:
                os.close(w)
            if err_w >= 0:
                os.close(err_w)
            if err_r >= 0:
                os.close(err_r)
        for stream, r, _ in pipes:
            self.logs.capture(spec.name, stream, r)
        started_by = "posix_spawn" if cgroup is None else "posix_spawn+cgexec"
        return self._direct_handle(node, spec, plan, pid, cgroup, started_by)

    def _direct_handle(
        self,
        node: WorkerNode,
        spec: Exec,
        plan: ExecPlan,
        pid: int,
        cgroup: DaemonCgroup | None,
        started_by: str,
    ) -> ExecHandle:
        # posix_spawn has no gate: the row joins the loop turn's batch (the instance's
        # marker in the environment lets a later ikosd find it should this one die now)
        self._on_forked(node, pid, False)
        # posix_spawn (and the trampoline's or the server's vfork) return only once the
        # exec succeeded (or fail): ready as Type=exec
        proc = ProcessHandle(pid, ready=self.started())
        handle = ExecHandle(self, spec, plan, proc, cgroup, node=node)
        handle.started_by = started_by
        self.handles.append(handle)
        self.index(handle)
        if cgroup is not None:
            self.arm_soon(handle)
        return handle

    @staticmethod
    async def _trampoline_report(daemon: str, helper_pid: int, err_r: int) -> int:
        """The daemon's PID from the trampoline's report; SpawnError naming the field if it failed.

        The trampoline writes once its vfork child has exec'd (or died), then
        exits. The report is read from the loop, so that the starts of a wave
        overlap; the daemon's PID is owned as soon as it is read (the orphan
        reaper must leave it to its handle), and reaping the trampoline makes
        sure the daemon has been re-parented to us before it is watched.
        """
        loop = asyncio.get_running_loop()
        own(helper_pid)  # reaped here, not by the orphan reaper
        data = bytearray()
        done: asyncio.Future[bool] = loop.create_future()

        def readable() -> None:
            try:
                chunk = os.read(err_r, 4096)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if chunk and len(data) < 8192:
                data.extend(chunk)
                pid, _ = _cgexec.parse_report(bytes(data))
                if pid is not None:
                    own(pid)
            elif not chunk and not done.done():
                done.set_result(True)

        os.set_blocking(err_r, False)
        loop.add_reader(err_r, readable)
        eof = False
        try:
            try:
                async with asyncio.timeout(10.0):
                    eof = await done
            except TimeoutError:
                pass
        finally:  # cancelled too: nothing of this start may be left running or unreaped
            loop.remove_reader(err_r)
            pid, error = _cgexec.parse_report(bytes(data))
            if not eof:
                for victim in (helper_pid, pid):
                    if victim is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(victim, signal.SIGKILL)
            if pid != helper_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(helper_pid, 0)
                disown(helper_pid)
            if pid is not None and (not eof or error):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                disown(pid)
        if not eof:
            raise SpawnError(daemon, None, "the spawn helper did not exec within 10 s")
        if pid is None or error:
            where, sep, reason = error.partition(": ")
            if not sep:
                raise SpawnError(daemon, None, error or "the spawn helper failed")
            raise SpawnError(daemon, where, reason)
        return pid

    def adopt(self, node: WorkerNode, pid: int, sid: int, fds: dict[str, int]) -> ExecHandle:
        """Watch an executable that a previous ikosd started; resume its log capture."""
        spec = node.spec
        assert isinstance(spec, Exec)
        plan = build_exec_plan(spec, self.paths)
        proc = ProcessHandle(pid)
        if not proc.ready.done():
            proc.ready.set_result({"event": "ready", "pid": pid, "adopted": True})
        for stream in ("stdout", "stderr"):
            fd = fds.pop(stream, None)
            if fd is not None:
                self.logs.capture(spec.name, stream, fd)
        # its cgroup, if it has one, is how its processes are reached from now on: an
        # adopted process is no longer our child, so nothing pins its session's number
        cgroup = self._cgroup_manager().existing().get(spec.name)
        handle = ExecHandle(self, spec, plan, proc, cgroup, sid=sid, adopted=True, node=node)
        handle.started_by = "adopted"
        self.handles.append(handle)
        self.index(handle)
        return handle

    async def run_commands(
        self,
        spec: Exec,
        plan: ExecPlan,
        commands: tuple[UnitCommand, ...],
        field: str,
        timeout: float,
        main_pid: int | None = None,
        *,
        cgroup: DaemonCgroup | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Run a unit's commands in order, as the daemon runs (user, directory, environment).

        Each gets ``$MAINPID`` when the daemon has one, ``env`` (ExecStopPost='s
        ``$SERVICE_RESULT``...), its ``$VAR`` expanded (unless written with
        ``:``), its output in the daemon's log, and ``timeout`` seconds before
        its session is killed. With ``cgroup`` it joins the daemon's cgroup
        before exec, as systemd runs a unit's commands in the unit's cgroup:
        what it leaves running is the daemon's, stopped with it. A failure
        stops the sequence with :class:`SpawnError` naming the daemon,
        ``field`` and the command, unless the command was written with ``-``
        (then it is logged).
        """
        for command in commands:
            status, why = await self._run_command(
                spec, plan, command, timeout, main_pid, cgroup, env
            )
            if status is not None and status.code == 0:
                continue
            text = f"{command.text()}: {why}"
            if command.ignore_failure:
                log.info("%s: %s failed (ignored, '-'): %s", spec.name, field, text)
                continue
            raise SpawnError(spec.name, field, text)

    async def _run_command(
        self,
        spec: Exec,
        plan: ExecPlan,
        command: UnitCommand,
        timeout: float,
        main_pid: int | None,
        cgroup: DaemonCgroup | None,
        extra_env: dict[str, str] | None,
    ) -> tuple[ExitStatus | None, str]:
        """One command through the fork server: its status (None: timed out) and what happened."""
        env = plan.environ
        env.pop("NOTIFY_SOCKET", None)  # only the daemon speaks sd_notify (NotifyAccess=main)
        # the instance's marks, as the daemon has them (a plan not yet placed has none):
        # after a crash of ikosd, the next one finds a command still running by them
        env.update(self._environ_items)
        if self.daemon_variable:
            env[self.daemon_variable] = spec.name
        if main_pid is not None:
            env["MAINPID"] = str(main_pid)
        env.update(extra_env or {})
        argv = list(command.argv)
        if command.expand:
            argv[1:] = expand_variables(argv[1:], env)
        root = None if command.privileged else plan.root_directory  # '+': not in the chroot
        program = argv[0]
        if "/" not in program:
            search = [in_root(root, d) for d in env.get("PATH", DEFAULT_PATH).split(os.pathsep)]
            found = shutil.which(program, path=os.pathsep.join(search))
            if found is None:
                return None, f"{argv[0]} not found in PATH"
            program = found if root is None else "/" + os.path.relpath(found, root)
        if command.argv0 is not None:
            argv[0] = command.argv0
        run = dataclasses.replace(
            plan,
            executable=program,
            argv=tuple(argv),
            env=tuple(env.items()),
            type="simple",
            pid_file=None,
            # joined by writing cgroup.procs, not cloned into it: a directory that had
            # cgroup.kill written (Linux 6.18 kills what is cloned into it) still works
            cgroup_procs=() if cgroup is None else cgroup.procs_files,
            stdin=stdio_spec("null"),
            stdout=stdio_spec("log"),
            stderr=stdio_spec("log"),
        )
        if command.privileged:  # '+': with ikosd's own privileges
            cwd = plan.working_directory
            run = dataclasses.replace(
                run, user=None, group=None, uid=None, gid=None, groups=None, root_directory=None,
                working_directory=None if cwd is None else in_root(plan.root_directory, cwd),
            )  # fmt: skip
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = await self.forkserver.spawn(
                spec.name, EXEC_ENTRY, (run, {1: 1, 2: 1}), [err_w, out_w]
            )
        except BaseException:
            os.close(err_r)
            os.close(out_r)
            raise
        finally:
            os.close(err_w)
            os.close(out_w)
        proc = ProcessHandle(pid, status_fd=err_r, exec_pipe=True)
        try:
            return await self._watch_command(spec, command, proc, out_r, timeout)
        except BaseException:  # cancelled (ikosd stopping): the command must not outlive it
            signal_group(proc, signal.SIGKILL)
            raise

    async def _watch_command(
        self, spec: Exec, command: UnitCommand, proc: ProcessHandle, out_r: int, timeout: float
    ) -> tuple[ExitStatus | None, str]:
        """Wait for a command, its output into the daemon's log; kill its session at timeout."""
        output = bytearray()
        loop = asyncio.get_running_loop()
        os.set_blocking(out_r, False)

        def keep(chunks: list[bytes]) -> None:
            for chunk in chunks:
                output.extend(chunk[: max(COMMAND_OUTPUT_LIMIT - len(output), 0)])

        def readable() -> None:
            chunks, eof = read_available(out_r)
            keep(chunks)
            if eof:
                loop.remove_reader(out_r)

        loop.add_reader(out_r, readable)
        try:
            try:
                status: ExitStatus | None = await asyncio.wait_for(
                    asyncio.shield(proc.exited), timeout
                )
            except TimeoutError:
                signal_group(proc, signal.SIGKILL)
                await proc.exited
                status = None
        finally:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_reader(out_r)
            with contextlib.suppress(OSError):
                keep(read_available(out_r)[0])  # what came between the last read and the exit
            os.close(out_r)
        lines = output.decode(errors="replace").splitlines()
        if lines:
            self.logs.log_for(spec.name).write_lines(command.argv[0].rpartition("/")[2], lines)
        if status is None:
            return None, f"timed out after {timeout:g} s"
        event = proc.exit_event()
        if not proc.ready.done() and event is not None and event.get("reason"):
            return status, str(event["reason"])  # the exec itself failed
        return status, status.describe()

    @staticmethod
    def watchdog_env(spec: Exec) -> bool:
        return spec.options.watchdog_sec > 0

    def retire(self, node: WorkerNode) -> None:
        """If the daemon is being removed from the tree, remove its cgroup directory.

        A stopped daemon keeps it for its next start (a wave of starts makes
        no directories); close() removes them all. Removal from the tree
        follows retire() in the same step, so it is looked at on the next turn.
        """
        try:
            asyncio.get_running_loop().call_soon(self._drop_cgroup, node)
        except RuntimeError:  # no loop (a synchronous teardown): close() removes it
            pass

    def _drop_cgroup(self, node: WorkerNode) -> None:
        parent = node.parent
        if parent is not None and any(child is node for child in parent.children):
            return  # stopped, not removed
        cgroup = self._kept_cgroups.get(node.spec.name)
        if cgroup is not None and not any(h.spec.name == node.spec.name for h in self.handles):
            del self._kept_cgroups[node.spec.name]
            cgroup.remove(busy_ok=True)

    def exited(self, node: WorkerNode) -> None:
        """An incarnation ended (its handle already released its pipes)."""

    def decorate_status(self, node: WorkerNode, status: dict[str, Any]) -> None:
        handle = node.handle
        status["status_text"] = handle.status_text if isinstance(handle, ExecHandle) else ""
        if isinstance(handle, ExecHandle):
            status["started_by"] = handle.started_by
