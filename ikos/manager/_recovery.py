"""After a crash of ikosd: adopt what runs, stop what cannot be trusted, never start twice.

When ikosd dies (``kill -9``, a bug, the machine's OOM killer), its daemons
live on. The next ikosd on the same root must end up with exactly one
supervised copy of each. It learns what runs from three sources, none of
which it trusts alone:

1. ``state.db``: a row per daemon process, written before the process could
   run any user code (see the fork server's gate). A row in phase
   ``running`` whose process still lives (same PID *and* start time) is
   **adopted**: watched through a pidfd, its descriptors taken back from the
   keeper. A row in phase ``starting`` is a start this ikosd cannot finish
   (the readiness it waited for was addressed to the dead one): the process
   is **stopped**, and the tree starts the daemon afresh.
2. **The processes themselves.** Every process ikosd creates carries the
   instance's marker in its environment (``IKOS_INSTANCE``, and
   ``IKOS_DAEMON=NAME`` for executables; actors inherit it from the fork
   server), so they can be found in ``/proc`` even if ``state.db`` was lost,
   truncated or could not be written (a full disk). A marked process that is
   not an adopted daemon, one of its descendants, or in an adopted
   executable's session is stopped, and the log says what it was and why.
3. **The daemons' cgroups** (``kill_mode = "control-group"``): what is left
   in the cgroup of a daemon that is not adopted is killed.

The PID files ikos wrote for daemons that are not adopted (they ended, or
were stopped here: removed from the tree meanwhile, still starting, not
wanted) are removed, found through the links
:class:`~ikos.platform._pidfile.DaemonPidFile` leaves in ``RUN/pid-files``:
the new ikosd's tree may not name them any more.

What was stopped is said in the log, daemon by daemon, with the reason
("state.db did not record it", "it was still starting"...). The stray
processes are killed with SIGKILL through pidfds and waited for (bounded)
before the tree starts, so the old copy is gone before the new one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Collection, Iterable

from ikos.manager._state import RunningRecord, StateStore
from ikos.platform._cgroups import CgroupManager, instance_cgroup_name
from ikos.platform._digest import sha256
from ikos.platform._fdstore import FdStore
from ikos.platform._paths import InstancePaths
from ikos.platform._pidfile import PID_FILE_NOTES, remove_stale_pid_files
from ikos.platform._process import (
    ProcInfo,
    all_pids,
    may_gain_environ,
    parse_environ,
    proc_info,
    read_small,
)

log = logging.getLogger("ikos.recovery")

#: The environment variables that mark the processes of an instance.
MARK_INSTANCE = "IKOS_INSTANCE"
MARK_DAEMON = "IKOS_DAEMON"
#: How long the stray processes get to disappear after SIGKILL.
KILL_WAIT = 10.0
#: How often, and how far apart, the scan reads again the environment of a process
#: caught in the middle of its execve (see :func:`find_marked`): 0.5 s at most, and
#: only when there is such a process.
ENVIRON_RETRIES = 50
ENVIRON_RETRY_DELAY = 0.01


def instance_mark(paths: InstancePaths) -> str:
    """The value of ``IKOS_INSTANCE`` for this instance (stable across restarts of ikosd)."""
    return sha256(str(paths.run_dir).encode()).hexdigest()[:16]


# Plain slotted classes, not dataclasses: a dataclass compiles its methods at every
# start of ikosd (docs/performance.md, "Launch"). Nothing compares, hashes or copies them.


class Marked:
    """A live process carrying this instance's marker."""

    __slots__ = ("daemon", "info")

    def __init__(self, info: ProcInfo, daemon: str | None) -> None:
        self.info = info
        self.daemon = daemon


class Stray:
    """A process to stop: what it is, why, and its start time (to know it is still it)."""

    __slots__ = ("start_ticks", "unrecorded", "what", "why")

    def __init__(
        self, what: str, why: str, start_ticks: int | None, unrecorded: bool = False
    ) -> None:
        self.what = what
        self.why = why
        self.start_ticks = start_ticks
        #: Found by its marker with no row in state.db (the state was lost).
        self.unrecorded = unrecorded


class RecoveryPlan:
    """What a new ikosd found: daemons to adopt, processes to stop (by PID), and why."""

    __slots__ = ("adoptable", "ended", "strays")

    def __init__(self) -> None:
        self.adoptable: dict[str, RunningRecord] = {}
        self.strays: dict[int, Stray] = {}
        self.ended: list[RunningRecord] = []


def find_marked(mark: str) -> list[Marked]:
    """Every live process whose environment says it belongs to the instance ``mark``."""
    me = os.getpid()
    found = []
    # decoding every process's environment was most of this scan (11-32 ms before
    # ikosd answers, on a machine of 700 processes); only the marked are decoded
    needle = f"{MARK_INSTANCE}={mark}".encode()
    unsure = []

    def check(pid: int, raw: bytes) -> None:
        env = parse_environ(raw, containing=needle)
        if env is None or env.get(MARK_INSTANCE) != mark:
            return
        info = proc_info(pid)
        if info is not None:
            found.append(Marked(info, env.get(MARK_DAEMON) or None))

    for pid in all_pids():
        if pid == me:
            continue
        raw = read_small(f"/proc/{pid}/environ")
        if raw == b"":
            unsure.append(pid)
        elif raw is not None:
            check(pid, raw)
    # A process caught in the middle of its execve reads empty for a moment (a
    # daemon a crashed ikosd was starting); kernel threads, zombies and processes
    # started with no environment read empty for good. Each is read again, its
    # command line first (see may_gain_environ), until it shows which it is.
    for attempt in range(ENVIRON_RETRIES + 1):
        if not unsure:
            break
        if attempt:
            time.sleep(ENVIRON_RETRY_DELAY)
        still = []
        for pid in unsure:
            filling = may_gain_environ(pid)  # before the environment is read again
            raw = read_small(f"/proc/{pid}/environ")
            if raw:
                check(pid, raw)
            elif raw is not None and filling:
                still.append(pid)
        unsure = still
    if unsure:
        log.warning(
            "the scan for this instance's processes could not read the environment of"
            " %s: if one was a daemon of a crashed ikosd, it is not adopted nor stopped",
            ", ".join(map(str, unsure)),
        )
    found.sort(key=lambda m: m.info.pid)
    return found


def plan_recovery(
    records: dict[str, RunningRecord],
    tree_names: Collection[str],
    marked: Iterable[Marked],
    *,
    state_damage: str | None = None,
) -> RecoveryPlan:
    """Decide, from the state's records and the marked processes, what to adopt and stop.

    Pure apart from asking whether each recorded process still runs.
    """
    plan = RecoveryPlan()
    for name, record in records.items():
        if not record.still_running():
            plan.ended.append(record)
        elif name not in tree_names:
            plan.strays[record.pid] = Stray(name, "it is no longer in the tree", _ticks(record.pid))
        elif record.phase != "running":
            plan.strays[record.pid] = Stray(name, "it was still starting", _ticks(record.pid))
        else:
            plan.adoptable[name] = record
    adopted_pids = {r.pid for r in plan.adoptable.values()}
    adopted_sids = {r.sid for r in plan.adoptable.values() if r.kind == "exec"}
    adopted_names = set(plan.adoptable)
    marked = list(marked)
    by_pid = {m.info.pid: m for m in marked}

    def descends_from_adopted(m: Marked) -> bool:
        seen = set()
        pid = m.info.ppid
        while pid > 1 and pid not in seen:
            if pid in adopted_pids:
                return True
            seen.add(pid)
            parent = by_pid.get(pid)
            info = parent.info if parent is not None else proc_info(pid)
            if info is None:
                return False
            pid = info.ppid
        return False

    why = (
        f"state.db did not record it ({state_damage})"
        if state_damage
        else "state.db did not record it"
    )
    for m in marked:
        pid = m.info.pid
        if pid in adopted_pids or pid in plan.strays:
            continue
        if m.daemon is not None and m.daemon in adopted_names:
            continue  # a process of an adopted executable (its workers, its helpers)
        if m.info.sid in adopted_sids or descends_from_adopted(m):
            continue
        what = m.daemon or "an actor or helper process"
        plan.strays[pid] = Stray(what, why, m.info.start_ticks, unrecorded=True)
    return plan


def _ticks(pid: int) -> int | None:
    info = proc_info(pid)
    return info.start_ticks if info is not None else None


def stray_cgroups(paths: InstancePaths, keep: Collection[str]) -> dict[int, Stray]:
    """The processes in this instance's daemon cgroups whose daemon is not in ``keep``."""
    out: dict[int, Stray] = {}
    for name, cgroup in CgroupManager(instance_cgroup_name(paths)).existing().items():
        if name in keep:
            continue
        with contextlib.suppress(OSError):
            for pid in cgroup.pids():
                out[pid] = Stray(name, "it was left in the daemon's cgroup", _ticks(pid))
    return out


def kill_strays(strays: dict[int, Stray], timeout: float = KILL_WAIT) -> list[int]:
    """SIGKILL every stray through a pidfd and wait for them to go; return those that stayed.

    Each is pinned by its pidfd and checked to be the process that was found
    (same start time) before it is signalled: a PID recycled in between is
    left alone.
    """
    pidfds: dict[int, int] = {}
    for pid, stray in sorted(strays.items()):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        info = proc_info(pid)
        if info is None or (
            stray.start_ticks is not None and info.start_ticks != stray.start_ticks
        ):
            os.close(fd)
            continue
        log.warning("stopping pid %d (%s): %s", pid, stray.what, stray.why)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            os.close(fd)
            continue
        pidfds[pid] = fd
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in pidfds.values():
        poller.register(fd, select.POLLIN)
    by_fd = {fd: pid for pid, fd in pidfds.items()}
    left = set(pidfds)
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            left.discard(by_fd[fd])
    for fd in pidfds.values():
        os.close(fd)
    return sorted(left)


class Recovery:
    """A new ikosd's take-over of what the previous one left; see the module docstring.

    :meth:`run` (before the tree starts) stops what cannot be trusted and
    keeps the rest for adoption; :meth:`take` hands a daemon's record and
    descriptors to the spawn of its node; :meth:`finish` (once the tree has
    started) stops what no node took.
    """

    def __init__(self, paths: InstancePaths, state: StateStore, fdstore: FdStore) -> None:
        self.paths, self.state, self.fdstore = paths, state, fdstore
        self.adoptable: dict[str, RunningRecord] = {}
        self.held_fds: dict[str, dict[str, int]] = {}

    @staticmethod
    def scan_soon(paths: InstancePaths) -> asyncio.Future[list[Marked]]:
        """Begin the scan of ``/proc`` for the instance's processes, on a worker thread.

        It grows with the machine (15-18 ms at 1,079 processes, helper "launch"):
        begun before the extensions start, it runs while they do. Safe as long as
        ikosd starts no process with the instance's mark before :meth:`run`, which
        holds: the fork server, the first to carry it, is started after recovery.

        Handed to the executor here, not by a task of ``asyncio.to_thread``: such a task
        first runs when the loop next gets control, and the extensions' starts do not
        give it (the scan began at recovery's ``await``, 4-8 ms on its critical path).
        """
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, find_marked, instance_mark(paths))

    async def run(
        self, tree_names: Collection[str], scanning: asyncio.Future[list[Marked]]
    ) -> None:
        """Find what a previous ikosd left: adopt what can be, stop the rest, and say so.

        ``scanning`` is :meth:`scan_soon`'s scan for this instance, begun earlier.
        """
        try:
            self.held_fds = self.fdstore.open()
        except OSError as exc:
            log.warning("no descriptor keeper (%s): a crash of ikosd would break log pipes", exc)
        state = self.state
        if state.damage:
            log.error("%s", state.damage)
        records = state.load()
        marked = await scanning
        plan = plan_recovery(records, tree_names, marked, state_damage=state.damage)
        for pid, stray in stray_cgroups(self.paths, set(plan.adoptable)).items():
            plan.strays.setdefault(pid, stray)
        for record in plan.ended:
            log.info("%s (pid %d) ended while no ikosd was running", record.name, record.pid)
        if plan.strays:
            unrecorded = sorted({s.what for s in plan.strays.values() if s.unrecorded})
            if unrecorded and not state.damage:
                log.error(
                    "found processes of this instance that state.db does not record (it was "
                    "lost, truncated or could not be written): %s; stopping them so that no "
                    "daemon runs twice",
                    ", ".join(unrecorded),
                )
            left = await asyncio.to_thread(kill_strays, plan.strays)
            if left:
                log.error("processes that would not die after SIGKILL: %s", left)
        self.adoptable = plan.adoptable
        gone = {name: record.pid for name, record in records.items()}
        self._remove_pid_files(keep=self.adoptable, gone=gone)
        for name in [n for n in self.held_fds if n not in self.adoptable]:
            for key, fd in self.held_fds.pop(name).items():
                os.close(fd)
                self.fdstore.drop(name, [key])
        for name in records:
            if name not in self.adoptable:
                state.gone(name)

    def take(self, name: str, kind: str) -> tuple[RunningRecord, dict[str, int]] | None:
        """The record and descriptors of daemon ``name`` if it can be adopted as a ``kind``."""
        record = self.adoptable.pop(name, None)
        if record is None:
            return None
        if record.kind != kind:
            self._stop(record)
            return None
        log.info("%s: adopting pid %d, left running by the previous ikosd", name, record.pid)
        return record, self.held_fds.pop(name, {})

    def finish(self) -> None:
        """The tree has started: what no node adopted is not wanted (held, or gone)."""
        for record in list(self.adoptable.values()):
            self._stop(record)
        self.adoptable.clear()

    def _stop(self, record: RunningRecord) -> None:
        log.warning(
            "%s (pid %d) was left running but is not started by this tree: stopping it",
            record.name,
            record.pid,
        )
        kill_strays({record.pid: Stray(record.name, "not started", _ticks(record.pid))}, 0)
        for fd in self.held_fds.pop(record.name, {}).values():
            os.close(fd)
        self.fdstore.drop(record.name)
        self.state.gone(record.name)
        self._remove_pid_files(gone={record.name: record.pid}, only=(record.name,))

    def _remove_pid_files(
        self,
        *,
        gone: dict[str, int],
        keep: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> None:
        notes = self.paths.run_dir / PID_FILE_NOTES
        for path in remove_stale_pid_files(notes, keep, gone, only=only):
            log.info("removed %s, the PID file of a daemon that no longer runs", path)
