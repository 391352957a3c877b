"""A supervised process as the manager's event loop sees it: a pidfd and a status pipe.

Exits arrive through the process's pidfd becoming readable, never through
SIGCHLD handlers or polling, and signals are sent through the same pidfd,
so a PID recycled after the process died can never be hit. The manager is a
child subreaper: daemons double-forked by the fork server are re-parented to
it, so ``waitid(P_PIDFD)`` yields their real exit status.

The optional status pipe carries JSON lines from the child (the actor
runtime writes ``ready`` and ``exit`` events); it is drained when the
process exits so that the exit's explanation is never lost to a race
between the two descriptors.

**Orphans.** A child subreaper inherits every orphan of the processes below
it: a daemon's shell that forks and exits leaves its children to ikosd.
Those must be reaped, or they pile up as zombies, but without stealing the
exit status of a process someone is watching. So every child the manager
watches or waits for is *owned* (:func:`own`; a :class:`ProcessHandle`
owns its process), and :func:`reap_orphans` collects only exited children
that nobody owns: it peeks at the next exited child with ``WNOWAIT`` and
reaps it only if it is not owned; an owned one is left to its owner, and
the caller tries again once the owner had its turn.

**Groups of processes.** A signal to a process group or session after its
leader was reaped may hit a stranger, once the group's number was recycled.
:func:`signal_group` therefore signals a session as a group only while its
leader is an unreaped child of ours, which pins the number, and otherwise
not at all; single processes are signalled through pidfds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

log = logging.getLogger("ikos.process")

PR_SET_CHILD_SUBREAPER = 36
MAX_STATUS_BYTES = 64 * 1024

_owned: set[int] = set()
_holds = 0
_guards: list[Callable[[], bool]] = []


def read_available(fd: int, max_reads: int = 16, size: int = 65536) -> tuple[list[bytes], bool]:
    """Read what a non-blocking pipe holds now: the chunks, and whether it reached EOF.

    At most ``max_reads`` reads, so that one chatty writer cannot hold the
    event loop; a read error counts as EOF.
    """
    chunks: list[bytes] = []
    for _ in range(max_reads):
        try:
            chunk = os.read(fd, size)
        except BlockingIOError:
            return chunks, False
        except OSError:
            return chunks, True
        if not chunk:
            return chunks, True
        chunks.append(chunk)
    return chunks, False


def own(pid: int) -> None:
    """Mark child ``pid`` as watched by someone: :func:`reap_orphans` leaves it alone."""
    _owned.add(pid)


def disown(pid: int) -> None:
    """``pid`` was collected by its owner (or never will be by anyone but the reaper)."""
    _owned.discard(pid)


def hold_reaping() -> None:
    """A child is being created whose PID its owner does not know yet: reap no orphan.

    The spawn server's daemons are the manager's children from their first
    instruction, before the reply naming them is read; one that died at once
    must not be reaped as an orphan. :func:`release_reaping` ends the hold.
    """
    global _holds
    _holds += 1


def release_reaping() -> None:
    """End one :func:`hold_reaping`."""
    global _holds
    _holds -= 1


def add_reap_guard(guard: Callable[[], bool]) -> None:
    """Call ``guard`` before each :func:`reap_orphans`: it reads the news of children
    created that their owner has not heard of yet (and owns them), and returns True
    while such a child may exist unnamed: no orphan is reaped then."""
    _guards.append(guard)


def remove_reap_guard(guard: Callable[[], bool]) -> None:
    """Undo :func:`add_reap_guard`."""
    with contextlib.suppress(ValueError):
        _guards.remove(guard)


def reap_orphans(limit: int = 10_000) -> tuple[list[int], bool]:
    """Reap every exited child nobody owns; return the PIDs reaped and whether to come back.

    The second value is True when an owned child that exited stands first in
    line (its owner will collect it on its next turn): call again after that.
    The reap guards run first: a child the spawn server started for an armed
    restart, not named yet, is held (not reaped) even if it died at once.
    """
    held = False
    for guard in tuple(_guards):
        held = guard() or held
    reaped: list[int] = []
    for _ in range(limit):
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped, False
        if info is None or info.si_pid == 0:
            return reaped, False
        pid = info.si_pid
        if pid in _owned or _holds or held:
            return reaped, True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        reaped.append(pid)
    return reaped, True


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc`` says of a process: parent, session and start time."""

    pid: int
    ppid: int
    sid: int
    start_ticks: int


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command, the state first (None if gone).

    After the command (which may hold spaces and parentheses): state ppid pgrp
    session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime
    cstime priority nice num_threads itrealvalue starttime vsize rss ...; so
    ``fields[3]`` is the session, ``fields[19]`` the start time in clock ticks.
    """
    data = read_small(f"/proc/{pid}/stat")
    return None if data is None else data.rpartition(b")")[2].split()


def read_small(path: str) -> bytes | None:
    """The whole content of a small kernel file (``/proc``, cgroupfs), or None if unreadable.

    Raw ``os`` calls (open, reads until EOF, close), where ``open()`` adds
    ``fstat``, ``ioctl(TCGETS)`` and ``lseek`` and builds a buffered file
    object: the resource sampler reads a few such files per daemon per pass.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def proc_info(pid: int, *, zombies: bool = False) -> ProcInfo | None:
    """``/proc/PID/stat`` of a live process (None when it is gone, or a zombie unless asked)."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    if fields[0] == b"X" or (fields[0] == b"Z" and not zombies):
        return None
    return ProcInfo(pid, int(fields[1]), int(fields[3]), int(fields[19]))


#: Which process a PID named when it was recorded, in a form that no change of
#: the wall clock can move: the boot (``/proc/sys/kernel/random/boot_id``) and
#: the process's start in clock ticks since that boot (``starttime`` of
#: ``/proc/PID/stat``). A PID with the same stamp is the same process.
#:
#: Rejected: the start as a Unix time (``psutil.Process.create_time()``), which
#: is the ticks plus the boot time of ``/proc/stat``, and the kernel computes
#: that one from the wall clock: a step of the clock (NTP at boot, a virtual
#: machine resumed and resynced) moves every process's "start time" by the
#: step, so a process recorded before it no longer matches itself after it. A
#: CI run saw the registry and the state store take live processes for dead
#: after a 14 s step; an ikosd restarted after such a step would not have
#: adopted its own daemons.
ProcessStamp: TypeAlias = tuple[str, int]


@functools.cache
def boot_id() -> str:
    """This boot's random id (``""`` where the kernel does not give one)."""
    data = read_small("/proc/sys/kernel/random/boot_id")
    return "" if data is None else data.decode("ascii", "replace").strip()


def process_stamp(pid: int) -> ProcessStamp | None:
    """The :data:`ProcessStamp` of live process ``pid`` (None when it is gone or a zombie)."""
    info = proc_info(pid)
    return None if info is None else (boot_id(), info.start_ticks)


def is_process(pid: int, stamp: ProcessStamp) -> bool:
    """Whether ``pid`` is still the process ``stamp`` recorded, alive and not a zombie."""
    if stamp[0] != boot_id():
        return False  # recorded in another boot: every process of it is gone
    info = proc_info(pid)
    return info is not None and info.start_ticks == stamp[1]


#: Clock ticks per second, the unit of ``starttime`` in ``/proc/PID/stat``.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stamp_time(stamp: ProcessStamp) -> float:
    """When the process of ``stamp`` started, as a Unix time, with the clock as it is now.

    For display only: two calls on either side of a step of the wall clock
    differ by the step. Identity is :func:`is_process`'s.
    """
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - stamp[1] / CLOCK_TICKS
    return round(time.time() - age, 2)


def all_pids() -> list[int]:
    """Every PID in ``/proc``."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid`` (a scan of ``/proc``)."""
    out = []
    for pid in all_pids():
        info = proc_info(pid)
        if info is not None and info.sid == sid:
            out.append(pid)
    return out


def environ_of(pid: int, *, containing: bytes = b"") -> dict[str, str] | None:
    """The environment process ``pid`` was started with (None if it cannot be read).

    With ``containing``, None too when those bytes are not in it: a scan of
    every process for one variable then decodes only the few that may have it.
    """
    raw = read_small(f"/proc/{pid}/environ")
    return None if raw is None else parse_environ(raw, containing=containing)


#: ``PF_KTHREAD`` in the flags of ``/proc/PID/stat``: a kernel thread.
_PF_KTHREAD = 0x00200000


def may_gain_environ(pid: int) -> bool:
    """Whether ``pid``, whose environment read empty, may show one a moment later.

    A process in the middle of ``execve``, between the switch to its new
    memory and the kernel's copy of its arguments and environment into it,
    reads empty for a moment, command line included. A kernel thread and a
    zombie, which have no memory of their own, read empty for good, and so
    does the environment of a process started with none (its command line
    does not). So a caller reads the environment again *after* this: a
    process past its execve by then shows both.
    """
    fields = stat_fields(pid)
    if fields is None or len(fields) < 7 or fields[0] in (b"Z", b"X"):
        return False
    if int(fields[6]) & _PF_KTHREAD:
        return False
    return read_small(f"/proc/{pid}/cmdline") == b""


def parse_environ(raw: bytes, *, containing: bytes = b"") -> dict[str, str] | None:
    """``/proc/PID/environ``'s bytes as a dict (an item without ``=`` is left out).

    None when ``containing`` is not in them (see :func:`environ_of`).
    """
    if containing not in raw:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def signal_pid(pid: int, sig: int, *, check: Callable[[], bool] | None = None) -> bool:
    """Signal ``pid`` through a pidfd; with ``check``, only if it says the process is still ours.

    The pidfd pins the process before ``check`` runs (it reads the session,
    the cgroup...), so a PID recycled between the check and the signal is
    never hit.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if check is not None and (not check() or not _pidfd_alive(pidfd)):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _pidfd_alive(pidfd: int) -> bool:
    """Whether the process a pidfd refers to is still alive (``Pid:`` in its fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1]) > 0
    except (OSError, ValueError):
        return False
    return True


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; True on success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except OSError:
        return False


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: ``code`` for an exit, ``signal`` for a kill."""

    code: int | None
    signal: int | None
    at: float

    def describe(self) -> str:
        return _describe(self.code, self.signal)


@functools.lru_cache(maxsize=256)  # one string per kind of end, not one per daemon's stop
def _describe(code: int | None, signum: int | None) -> str:
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    if code is None:
        return "exited (status unknown)"
    return "exited normally" if code == 0 else f"exited with status {code}"


#: The status buffer of a process without a status pipe (never written to).
_NO_STATUS = bytearray()


class ProcessHandle:
    """Watches one process from the running event loop."""

    #: What the process reported on its status pipe (an actor's events, a failed
    #: exec); a list made at the first, none for most executables.
    events: list[dict[str, Any]] | tuple[()] = ()

    def __init__(
        self,
        pid: int,
        status_fd: int | None = None,
        *,
        exec_pipe: bool = False,
        ready: asyncio.Future[dict[str, Any]] | None = None,
    ) -> None:
        """Watch ``pid``; ``ready``, a future already resolved, says its exec is done
        (it may be shared by many handles: one future less per spawned executable)."""
        self.pid = pid
        own(pid)
        self.started_at = time.time()
        self.loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[ExitStatus] = self.loop.create_future()
        self.ready: asyncio.Future[dict[str, Any]] = (
            self.loop.create_future() if ready is None else ready
        )
        #: Called once the process has exited and before it is reaped (children only).
        self.before_reap: Callable[[], None] | None = None
        self._status_fd = status_fd
        # a spawned or adopted executable has no status pipe, and no buffer for one
        self._status_buf = bytearray() if status_fd is not None else _NO_STATUS
        # exec_pipe: the status pipe is a CLOEXEC error pipe of an exec: EOF with
        # nothing written means the exec succeeded; text is the failure.
        self._exec_pipe = exec_pipe
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = None
        if status_fd is not None:
            os.set_blocking(status_fd, False)
            self.loop.add_reader(status_fd, self._read_status)
        if self.pidfd is None:
            self._finish(ExitStatus(None, None, time.time()))
        else:
            self.loop.add_reader(self.pidfd, self._on_exit)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit_event(self) -> dict[str, Any] | None:
        """The child's own ``exit`` event (reason, traceback), if it sent one."""
        for event in reversed(self.events):
            if event.get("event") == "exit":
                return dict(event)
        return None

    def _record(self, event: dict[str, Any]) -> None:
        if not isinstance(self.events, list):
            self.events = []
        self.events.append(event)

    def _read_status(self) -> None:
        fd = self._status_fd
        if fd is None:
            return
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                if self._exec_pipe:
                    self._exec_result()
                self._close_status()
                break
            self._status_buf += chunk
            if len(self._status_buf) > MAX_STATUS_BYTES:
                log.warning("pid %d: status pipe overflow, closing it", self.pid)
                self._close_status()
                break
        while not self._exec_pipe and b"\n" in self._status_buf:
            line, _, rest = bytes(self._status_buf).partition(b"\n")
            self._status_buf = bytearray(rest)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self._record(event)
            if event.get("event") == "ready" and not self.ready.done():
                self.ready.set_result(event)

    def _exec_result(self) -> None:
        text = bytes(self._status_buf).decode("utf-8", "replace").strip()
        self._status_buf.clear()
        if text:
            self._record({"event": "exit", "reason": f"exec failed: {text}"})
        elif not self.ready.done():
            self.ready.set_result({"event": "ready", "pid": self.pid})

    def _close_status(self) -> None:
        fd = self._status_fd
        if fd is not None:
            self._status_fd = None
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_exit(self) -> None:
        assert self.pidfd is not None
        try:
            res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if res is not None and self.before_reap is not None:
                # the process is a zombie, not yet reaped: its PID (and the number of
                # the group and session it leads) cannot have been recycled
                try:
                    self.before_reap()
                except Exception:
                    log.exception("pid %d: the hook before reaping failed", self.pid)
            if res is not None:
                res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            res = None
            status = ExitStatus(None, None, time.time())  # not our child (adopted)
        else:
            if res is None:
                # readable but not yet waitable: a non-child that exited, or spurious
                with contextlib.suppress(OSError):
                    os.kill(self.pid, 0)
                    return
                status = ExitStatus(None, None, time.time())
            elif res.si_code == os.CLD_EXITED:
                status = ExitStatus(res.si_status, None, time.time())
            else:
                status = ExitStatus(None, res.si_status, time.time())
        self._finish(status)

    def _finish(self, status: ExitStatus) -> None:
        disown(self.pid)
        # the hook is a bound method of the owner, which holds this handle: dropped once
        # the process is reaped, the pair is freed by its reference counts when its
        # owner lets go instead of waiting, with every object it holds, for a full
        # collection of the cyclic garbage (see docs/performance.md, "Memory")
        self.before_reap = None
        if self.pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self._read_status()
        self._close_status()
        if not self.exited.done():
            self.exited.set_result(status)

    def watch(self, on: bool) -> None:
        """Watch the pidfd for the exit (the default), or not while another process
        watches it for us (the spawn server's armed restart): an exit meanwhile is seen
        as soon as watching resumes. Not watching, ikosd's loop does not wake at the
        exit, and leaves the CPU to the one that restarts the daemon."""
        if self.pidfd is None or self.exited.done():
            return
        if on:
            self.loop.add_reader(self.pidfd, self._on_exit)
        else:
            self.loop.remove_reader(self.pidfd)

    def unreaped_child(self) -> bool:
        """Whether the process is our child and not reaped yet (alive, or a zombie)."""
        if self.pidfd is None or self.exited.done():
            return False
        try:
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except OSError:  # ChildProcessError: adopted, not ours
            return False
        return True

    def send_signal(self, sig: int) -> bool:
        """Signal the process through its pidfd; False if it is already gone."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)


def leads_session(pid: int) -> bool:
    """Whether process ``pid`` (alive or a zombie) is the leader of its session."""
    info = proc_info(pid, zombies=True)
    return info is not None and info.sid == pid


def signal_group(leader: ProcessHandle, sig: int) -> bool:
    """Signal the session ``leader`` leads, if that number is pinned now; True if sent.

    The number of a session (and of its process group) is its leader's PID,
    and it is pinned, so cannot name anyone else, only while the leader
    exists: alive, or a zombie its parent has not reaped. The manager is the
    parent of the processes it watches and reaps them only in
    :class:`ProcessHandle`, so an unreaped child of ours pins its session;
    anything else (a process adopted after a crash of the manager, no longer
    our child) does not, and then nothing is sent: the caller signals what it
    holds pidfds of instead.
    """
    if not leader.unreaped_child() or not leads_session(leader.pid):
        return False
    try:
        os.killpg(leader.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass(frozen=True)
class CommandResult:
    """How a command run by :func:`run_command` ended, and what it printed (bounded)."""

    status: ExitStatus | None  # None: killed at its timeout
    output: bytes
    truncated: bool


_ALL_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


async def run_command(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float,
    output_limit: int = 64 * 1024,
) -> CommandResult:
    """Run a short command from the manager (a reload command, a health probe).

    The command starts with ``posix_spawnp`` (no Python runs in the child, so
    it is safe from a threaded process) in a session of its own, stdin from
    ``/dev/null``, stdout and stderr into one pipe of which the first
    ``output_limit`` bytes are kept. It is watched like any daemon (a pidfd,
    owned, so :func:`reap_orphans` never steals its status); at ``timeout``,
    or when the caller is cancelled, its whole session is killed and the
    command reaped. Raises ``OSError`` when it cannot start.
    Rejected: asyncio's subprocesses, whose child watcher reaps by PID in a
    thread of its own, racing the manager's reaper of orphans.
    """
    loop = asyncio.get_running_loop()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawnp(
            argv[0],
            argv,
            os.environ if env is None else env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, w, 1),
                (os.POSIX_SPAWN_DUP2, w, 2),
            ],
            setsid=True,
            setsigmask=(),
            setsigdef=_ALL_SIGNALS,
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    handle = ProcessHandle(pid)
    kept = bytearray()
    truncated = False
    eof: asyncio.Future[None] = loop.create_future()
    os.set_blocking(r, False)

    def readable() -> None:
        nonlocal truncated
        chunks, at_eof = read_available(r)
        for chunk in chunks:
            room = output_limit - len(kept)
            truncated = truncated or len(chunk) > room
            kept.extend(chunk[: max(room, 0)])
        if at_eof:
            loop.remove_reader(r)
            if not eof.done():
                eof.set_result(None)

    loop.add_reader(r, readable)
    try:
        try:
            async with asyncio.timeout(timeout):
                status = await asyncio.shield(handle.exited)
        except TimeoutError:
            if handle.alive:
                signal_group(handle, signal.SIGKILL)  # it leads its own session (setsid)
                handle.kill()
                await handle.exited
            return CommandResult(None, bytes(kept), truncated)
        # what the command printed last; a helper it left behind may hold the pipe open
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await eof
        return CommandResult(status, bytes(kept), truncated)
    finally:
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_reader(r)
        os.close(r)
        if handle.alive:
            # cancelled: the command's whole session goes, and the command is reaped
            # before this returns (the caller's loop may end right after)
            signal_group(handle, signal.SIGKILL)
            handle.kill()
            await asyncio.shield(handle.exited)
