"""Resource usage of daemons: one pass over their processes in /proc, and its Prometheus collector.

The :class:`Sampler` is given the daemons to look at as plain
:class:`Target` values (name and main pid, taken from the manager's own
table), finds each daemon's other processes and reads each process's few
files of ``/proc`` once per pass. It is synchronous and meant to run on a
worker thread: nothing here touches the event loop.

A daemon's processes are its cgroup's when it has one of its own (its
``cgroup.procs``, the set the manager kills and signals through; the path
comes from ``/proc/PID/cgroup`` once per run), else its session's (ikos starts every
daemon with ``setsid``): the session is found in one scan of ``/proc`` per
pass shared by every daemon that needs it, never one scan per daemon.
Rejected: ``psutil.Process.children(recursive=True)``, which scans ``/proc``
for each call and loses the processes a daemon double-forked away from its
main one.

The figures are read from ``/proc`` directly rather than through psutil:
``/proc/PID/stat`` alone has the session, start time, CPU times, threads and
resident size, and the scan above has read it already; the open fds are the
size of ``/proc/PID/fd`` (one ``stat``), the I/O counters ``/proc/PID/io``.
psutil, even under ``oneshot()``, opened about eight files per process
(``stat``, ``statm``, ``status``, ``io``, the fd directory, ``/proc/stat``
for the boot time...): over 500 ``sleep`` processes, 104 ms of CPU per pass
against 39 ms then; over the 500 daemons of bench/monitoring.py (half of them
Python actors, whose USS is dear), 89 ms against 63 ms, 1.3 % of a core at
the default 5 s interval (docs/performance.md). Each file is read with raw
``os`` calls (:func:`~ikos.platform._process.read_small`), half the system
calls of ``open()``: over 500 tiny executables in cgroups, 25 ms per pass
against 48 ms with ``open()`` and a ``/proc/PID/cgroup`` read every pass.

CPU seconds are counted per run of a daemon (its main pid and that process's
start time) and never go down within a run: a child that exits keeps its
last figure, so the exported ``ikos_daemon_cpu_seconds_total`` is a counter
(it restarts from zero when the daemon does, which ``rate()`` handles as any
counter reset). USS needs ``/proc/PID/smaps_rollup``, whose reading walks
every mapping of the process: it costs as much as all the other figures
together, so it is read every ``uss_every`` passes only (each process keeps
its last figure in between) and can be turned off (``[monitor] uss =
false``; docs/configuration.md). A process that vanishes in the middle of a
pass is skipped, and a figure the kernel refuses is left out (the I/O
counters and USS of another user's process when ikosd is not root; its
number of fds the kernel gives to anyone).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ikos.monitor._text import TextFamily
from ikos.platform._process import CLOCK_TICKS, all_pids, read_small, stat_fields

__all__ = ["Sampler", "Target", "Usage", "UsageCollector"]

_CGROUP_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Most processes read for one daemon in one pass (a fork bomb must not stall the sampler).
MAX_PROCESSES = 4096


# Target and Usage are plain slotted classes, not dataclasses: a dataclass compiles its
# methods at every start of ikosd (docs/performance.md, "Launch"). Nothing compares,
# hashes, copies or changes them.


class Target:
    """A daemon to sample: its name and its main process."""

    __slots__ = ("name", "pid")

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid


class Usage:  # one kept per running daemon: slotted, no __dict__
    """One daemon's resource usage at ``sampled_at`` (Unix time), summed over its processes.

    ``rss_bytes`` counts shared pages once per process (as ``ps`` does);
    ``uss_bytes`` (None when not sampled) is the memory that would be freed
    if the daemon exited. ``cpu_percent`` is over the last interval (None on
    a daemon's first sample), 100 per busy core. I/O figures are None when
    the kernel does not let ikosd read them.
    """

    __slots__ = (
        "cpu_percent",
        "cpu_seconds",
        "io_read_bytes",
        "io_write_bytes",
        "open_fds",
        "pid",
        "processes",
        "rss_bytes",
        "sampled_at",
        "threads",
        "uss_bytes",
    )

    def __init__(
        self,
        *,
        pid: int,
        cpu_seconds: float,
        cpu_percent: float | None,
        rss_bytes: int,
        uss_bytes: int | None,
        open_fds: int,
        threads: int,
        io_read_bytes: int | None,
        io_write_bytes: int | None,
        processes: int,
        sampled_at: float,
    ) -> None:
        self.pid = pid
        self.cpu_seconds = cpu_seconds
        self.cpu_percent = cpu_percent
        self.rss_bytes = rss_bytes
        self.uss_bytes = uss_bytes
        self.open_fds = open_fds
        self.threads = threads
        self.io_read_bytes = io_read_bytes
        self.io_write_bytes = io_write_bytes
        self.processes = processes
        self.sampled_at = sampled_at

    def to_json(self) -> dict[str, Any]:
        """The ``usage`` object of a daemon's status (docs/operations.md)."""
        return {
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_percent": None if self.cpu_percent is None else round(self.cpu_percent, 1),
            "rss_bytes": self.rss_bytes,
            "uss_bytes": self.uss_bytes,
            "open_fds": self.open_fds,
            "threads": self.threads,
            "io_read_bytes": self.io_read_bytes,
            "io_write_bytes": self.io_write_bytes,
            "processes": self.processes,
            "sampled_at": self.sampled_at,
        }


# The sampler's own records below are plain classes with slots, not dataclasses: ikosd
# imports this module at every start, and a dataclass compiles its generated methods
# then (docs/performance.md, "Launch"); nothing compares, hashes or prints them.


class _Figures:
    """One process's figures in one pass."""

    __slots__ = ("cpu", "fds", "io_read", "io_write", "rss", "threads", "uss")

    def __init__(
        self,
        *,
        cpu: float,
        rss: int,
        uss: int | None,
        fds: int,
        threads: int,
        io_read: int | None,
        io_write: int | None,
    ) -> None:
        self.cpu = cpu
        self.rss = rss
        self.uss = uss
        self.fds = fds
        self.threads = threads
        self.io_read = io_read
        self.io_write = io_write

    def with_uss(self, uss: int) -> _Figures:
        """The same figures with ``uss`` (a copy: the one read may be kept elsewhere)."""
        return _Figures(
            cpu=self.cpu,
            rss=self.rss,
            uss=uss,
            fds=self.fds,
            threads=self.threads,
            io_read=self.io_read,
            io_write=self.io_write,
        )


class _Run:  # one per running daemon
    """What the sampler remembers of one run of a daemon, between passes."""

    __slots__ = ("at", "cpu", "key", "retired", "total")

    def __init__(self, key: tuple[int, float]) -> None:
        self.key = key
        #: CPU seconds of the run's processes seen last pass, as ((pid, start time),
        #: seconds) pairs: a tuple of one pair for most daemons, a quarter of a
        #: one-entry dict's size
        self.cpu: tuple[tuple[tuple[int, float], float], ...] = ()
        #: CPU seconds of the run's processes that have exited
        self.retired = 0.0
        self.total = 0.0
        #: when it was seen last, in monotonic time: a step of the wall clock between
        #: two passes must not turn into a CPU percentage
        self.at = 0.0


class Sampler:
    """Samples daemons' processes; call :meth:`sample` once per interval, from one thread."""

    def __init__(self, *, uss: bool = True, uss_every: int = 1) -> None:
        self.uss = uss
        self.uss_every = uss_every
        self._runs: dict[str, _Run] = {}
        self._passes = 0
        #: the last USS read of each process, by (pid, start time), for the passes between
        self._uss: dict[tuple[int, float], int] = {}
        self._own_cgroup = _cgroup_of(os.getpid())
        #: each daemon's cgroup path, by main pid: read once per run, not once per pass
        self._cgroups: dict[int, str] = {}
        self._mounts = list(_CGROUP_MOUNTS)

    def sample(self, targets: Sequence[Target]) -> dict[str, Usage]:
        """The usage of each target whose main process still runs, by daemon name.

        Example::

            sampler = Sampler()
            sampler.sample([Target("web", 1234)])["web"].rss_bytes
        """
        scan: _Scan | None = None
        out: dict[str, Usage] = {}
        every_uss = self.uss and self._passes % max(self.uss_every, 1) == 0
        self._passes += 1
        uss_seen: dict[tuple[int, float], int] = {}

        def read_uss(key: tuple[int, float]) -> bool:  # a new process is read at once
            return every_uss or (self.uss and key not in self._uss)

        for target in targets:
            members = self._cgroup_members(target.pid)
            stats: dict[int, _Stat] = {}
            if members is None:
                if scan is None:
                    scan = _scan()
                main_stat = scan.stats.get(target.pid)
                if main_stat is None:
                    continue
                members = scan.sessions.get(main_stat.sid, [])
                stats = scan.stats
            main = _figures_and_key(target.pid, read_uss, stats.get(target.pid))
            if main is None:
                continue
            key, figures = main
            run = self._runs.get(target.name)
            if run is not None and run.key == key:
                key = run.key  # the one kept: not a new tuple and float per daemon a pass
            per_process = {key: figures}
            for pid in members[:MAX_PROCESSES]:
                if pid != target.pid:
                    read = _figures_and_key(pid, read_uss, stats.get(pid))
                    if read is not None:
                        per_process[read[0]] = read[1]
            if self.uss:
                per_process = self._with_uss(per_process, uss_seen)
            out[target.name] = self._usage(target, key, per_process)
        if self.uss:
            self._uss = uss_seen
        for name in set(self._runs) - set(out):
            del self._runs[name]
        if len(self._cgroups) > len(targets):
            live = {t.pid for t in targets}
            self._cgroups = {pid: path for pid, path in self._cgroups.items() if pid in live}
        return out

    def _with_uss(
        self,
        per_process: dict[tuple[int, float], _Figures],
        seen: dict[tuple[int, float], int],
    ) -> dict[tuple[int, float], _Figures]:
        """Each process's USS: read in this pass, else its last figure (if any)."""
        out = {}
        for key, figures in per_process.items():
            uss = figures.uss if figures.uss is not None else self._uss.get(key)
            if uss is not None:
                seen[key] = uss
                figures = figures.with_uss(uss)
            out[key] = figures
        return out

    def _usage(
        self,
        target: Target,
        key: tuple[int, float],
        per_process: dict[tuple[int, float], _Figures],
    ) -> Usage:
        now = time.monotonic()
        run = self._runs.get(target.name)
        if run is None or run.key != key:
            run = self._runs[target.name] = _Run(key)
            previous = None
        else:
            previous = (run.total, run.at)
        cpu = {k: f.cpu for k, f in per_process.items()}
        run.retired += sum(v for k, v in run.cpu if k not in cpu)
        run.cpu = tuple(cpu.items())
        run.total = max(run.total, run.retired + sum(cpu.values()))
        run.at = now
        percent = None
        if previous is not None and now > previous[1]:
            percent = 100.0 * (run.total - previous[0]) / (now - previous[1])
        figures = per_process.values()
        return Usage(
            pid=target.pid,
            cpu_seconds=run.total,
            cpu_percent=percent,
            rss_bytes=sum(f.rss for f in figures),
            uss_bytes=_sum_known(f.uss for f in figures),
            open_fds=sum(f.fds for f in figures),
            threads=sum(f.threads for f in figures),
            io_read_bytes=_sum_known(f.io_read for f in figures),
            io_write_bytes=_sum_known(f.io_write for f in figures),
            processes=len(per_process),
            sampled_at=time.time(),
        )

    def _cgroup_members(self, pid: int) -> list[int] | None:
        """The pids of ``pid``'s cgroup when it is not ikosd's own (None: use the session).

        The path is remembered for the run: a daemon is in its cgroup from its
        first instruction on. It is read again when the cgroup no longer holds
        the main pid (the daemon moved itself), and never remembered while it
        is ikosd's own (a start path that moves the child after the fork).
        """
        path = self._cgroups.get(pid)
        if path is not None:
            members = self._members(path)
            if members is not None and pid in members:
                return members
            del self._cgroups[pid]
        path = _cgroup_of(pid)
        if path is None or path == self._own_cgroup or path == "/":
            return None
        self._cgroups[pid] = path
        return self._members(path)

    def _members(self, path: str) -> list[int] | None:
        """The pids in cgroup ``path``, from the first mount that has it (tried first after)."""
        for mount in self._mounts:
            data = read_small(f"{mount}{path}/cgroup.procs")
            if data is not None:
                if mount != self._mounts[0]:
                    self._mounts.remove(mount)
                    self._mounts.insert(0, mount)
                with contextlib.suppress(ValueError):
                    return [int(line) for line in data.split()]
                return None
        return None


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _figures_and_key(
    pid: int, uss: Callable[[tuple[int, float]], bool], stat: _Stat | None = None
) -> tuple[tuple[int, float], _Figures] | None:
    """One process's figures, read from ``/proc``; None if it is gone, a zombie or unreadable.

    The key is the pid and the process's start time (clock ticks since boot);
    ``uss(key)`` says whether to read the USS too. ``stat`` is the process's
    ``/proc/PID/stat`` when this pass's scan of ``/proc`` has read it already.
    """
    if stat is None:
        stat = _read_stat(pid)
        if stat is None:
            return None
    key = (pid, float(stat.start))
    try:
        fds = _open_fds(pid)
    except OSError:  # gone (or, before Linux 6.2, another user's process)
        return None
    io_read = io_write = None
    with contextlib.suppress(ValueError):
        for line in (read_small(f"/proc/{pid}/io") or b"").splitlines():
            if line.startswith(b"read_bytes:"):
                io_read = int(line[11:])
            elif line.startswith(b"write_bytes:"):
                io_write = int(line[12:])
    return key, _Figures(
        cpu=stat.cpu,
        rss=stat.rss,
        uss=_uss_of(pid) if uss(key) else None,
        fds=fds,
        threads=stat.threads,
        io_read=io_read,
        io_write=io_write,
    )


class _Stat:
    """What the sampler takes from one ``/proc/PID/stat``."""

    __slots__ = ("cpu", "rss", "sid", "start", "threads")

    def __init__(self, *, sid: int, start: int, cpu: float, threads: int, rss: int) -> None:
        self.sid = sid
        #: start time, clock ticks after boot: with the pid, names one process for good
        self.start = start
        self.cpu = cpu
        self.threads = threads
        self.rss = rss


def _read_stat(pid: int) -> _Stat | None:
    """``/proc/PID/stat`` of a live process (None when it is gone or a zombie)."""
    fields = stat_fields(pid)  # utime stime: 11 12, num_threads 17, rss 21 (pages)
    if fields is None or len(fields) < 22 or fields[0] in (b"Z", b"X"):
        return None
    return _Stat(
        sid=int(fields[3]),
        start=int(fields[19]),
        cpu=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        threads=int(fields[17]),
        rss=int(fields[21]) * _PAGE_SIZE,
    )


def _open_fds(pid: int) -> int:
    """The number of open fds of ``pid`` (OSError when it is gone or not ours to read).

    Since Linux 6.2 the size of ``/proc/PID/fd`` is that number: one ``stat``
    instead of listing a directory of possibly thousands of entries. Older
    kernels give 0 there, and so does a process without fds: both are listed.
    """
    count = os.stat(f"/proc/{pid}/fd").st_size
    return count if count > 0 else len(os.listdir(f"/proc/{pid}/fd"))


def _uss_of(pid: int) -> int | None:
    """The unique set size of ``pid`` (its ``Private_*`` lines of smaps_rollup), if readable."""
    data = read_small(f"/proc/{pid}/smaps_rollup")
    if data is None:
        return None
    total = 0
    for line in data.splitlines():
        if line.startswith(b"Private_"):  # Private_Clean, Private_Dirty, Private_Hugetlb
            total += int(line.split()[1]) * 1024
    return total


def _cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` (the ``0::`` line of ``/proc/PID/cgroup``), or None."""
    for line in (read_small(f"/proc/{pid}/cgroup") or b"").splitlines():
        if line.startswith(b"0::"):
            return line[3:].strip().decode(errors="surrogateescape")
    return None


class _Scan:
    """One scan of ``/proc``: every live process's stat, and the pids of each session."""

    __slots__ = ("sessions", "stats")

    def __init__(self) -> None:
        self.stats: dict[int, _Stat] = {}
        self.sessions: dict[int, list[int]] = {}


def _scan() -> _Scan:
    """Read every live process's ``/proc/PID/stat`` once, for every daemon of the pass."""
    out = _Scan()
    for pid in all_pids():
        stat = _read_stat(pid)
        if stat is not None:
            out.stats[pid] = stat
            out.sessions.setdefault(stat.sid, []).append(pid)
    return out


class UsageCollector:
    """Per daemon: ``ikos_daemon_cpu_seconds_total``, ``_memory_bytes``, ``_open_fds``,
    ``_threads``, ``_processes``.

    ``usage`` returns the latest usage of the daemons that run now, so that a
    daemon that stopped or was removed has no series at the next scrape.
    """

    def __init__(self, usage: Callable[[], Iterable[tuple[str, Usage]]]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[Any]:
        cpu = TextFamily(
            "ikos_daemon_cpu_seconds",
            "counter",
            "CPU time (user and system) of the daemon's processes in its current run",
            ["daemon"],
        )
        memory = TextFamily(
            "ikos_daemon_memory_bytes",
            "gauge",
            "Memory of the daemon's processes: resident (rss) and unique (uss)",
            ["daemon", "kind"],
        )
        fds = TextFamily(
            "ikos_daemon_open_fds", "gauge", "Open file descriptors of the daemon", ["daemon"]
        )
        threads = TextFamily(
            "ikos_daemon_threads", "gauge", "Threads of the daemon's processes", ["daemon"]
        )
        processes = TextFamily(
            "ikos_daemon_processes", "gauge", "Processes of the daemon", ["daemon"]
        )
        for name, usage in self.usage():
            cpu.add([name], usage.cpu_seconds)
            memory.add([name, "rss"], float(usage.rss_bytes))
            if usage.uss_bytes is not None:
                memory.add([name, "uss"], float(usage.uss_bytes))
            fds.add([name], float(usage.open_fds))
            threads.add([name], float(usage.threads))
            processes.add([name], float(usage.processes))
        yield from (cpu, memory, fds, threads, processes)
