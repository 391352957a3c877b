"""Resource usage of daemons: one psutil pass over their processes, and its Prometheus collector.

The :class:`Sampler` is given the daemons to look at as plain
:class:`Target` values (name and main pid, taken from the manager's own
table), finds each daemon's other processes and reads every process once
under ``psutil.Process.oneshot()``. It is synchronous and meant to run on a
worker thread: nothing here touches the event loop.

A daemon's processes are its cgroup's when it has one of its own (two small
reads: ``/proc/PID/cgroup`` and that cgroup's ``cgroup.procs``, the set the
manager kills and signals through), else its session's (ikos starts every
daemon with ``setsid``): the session is found in one scan of ``/proc`` per
pass shared by every daemon that needs it, never one scan per daemon.
Rejected: ``psutil.Process.children(recursive=True)``, which scans ``/proc``
for each call and loses the processes a daemon double-forked away from its
main one.

CPU seconds are counted per run of a daemon (its main pid and that process's
start time) and never go down within a run: a child that exits keeps its
last figure, so the exported ``ikos_daemon_cpu_seconds_total`` is a counter
(it restarts from zero when the daemon does, which ``rate()`` handles as any
counter reset). USS needs ``memory_full_info`` (``/proc/PID/smaps_rollup``),
as dear as all the other figures of a process together (measured: 0.2 ms
per daemon without it, 0.4 ms with it), so it is read every ``uss_every``
passes only (each process keeps its last figure in between) and can be
turned off (``[monitor] uss = false``; docs/configuration.md).
A process that vanishes in the middle of a pass is skipped, as is a figure
the kernel refuses (I/O counters of another user's process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ikos.platform._process import all_pids, proc_info

__all__ = ["Sampler", "Target", "Usage", "UsageCollector"]

_CGROUP_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
#: Most processes read for one daemon in one pass (a fork bomb must not stall the sampler).
MAX_PROCESSES = 4096


@dataclass(frozen=True)
class Target:
    """A daemon to sample: its name and its main process."""

    name: str
    pid: int


@dataclass(frozen=True)
class Usage:
    """One daemon's resource usage at ``sampled_at`` (Unix time), summed over its processes.

    ``rss_bytes`` counts shared pages once per process (as ``ps`` does);
    ``uss_bytes`` (None when not sampled) is the memory that would be freed
    if the daemon exited. ``cpu_percent`` is over the last interval (None on
    a daemon's first sample), 100 per busy core. I/O figures are None when
    the kernel does not let ikosd read them.
    """

    pid: int
    cpu_seconds: float
    cpu_percent: float | None
    rss_bytes: int
    uss_bytes: int | None
    open_fds: int
    threads: int
    io_read_bytes: int | None
    io_write_bytes: int | None
    processes: int
    sampled_at: float

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


@dataclass(frozen=True)
class _Figures:
    cpu: float
    rss: int
    uss: int | None
    fds: int
    threads: int
    io_read: int | None
    io_write: int | None


@dataclass
class _Run:
    """What the sampler remembers of one run of a daemon, between passes."""

    key: tuple[int, float]
    #: CPU seconds of the run's processes seen last pass, by (pid, start time)
    cpu: dict[tuple[int, float], float] = field(default_factory=dict)
    #: CPU seconds of the run's processes that have exited
    retired: float = 0.0
    total: float = 0.0
    at: float = 0.0


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

    def sample(self, targets: Sequence[Target]) -> dict[str, Usage]:
        """The usage of each target whose main process still runs, by daemon name.

        Example::

            sampler = Sampler()
            sampler.sample([Target("web", 1234)])["web"].rss_bytes
        """
        sessions: dict[int, list[int]] | None = None
        out: dict[str, Usage] = {}
        every_uss = self.uss and self._passes % max(self.uss_every, 1) == 0
        self._passes += 1
        uss_seen: dict[tuple[int, float], int] = {}

        def read_uss(key: tuple[int, float]) -> bool:  # a new process is read at once
            return every_uss or (self.uss and key not in self._uss)

        for target in targets:
            main = _figures_and_key(target.pid, read_uss)
            if main is None:
                continue
            key, figures = main
            members = self._cgroup_members(target.pid)
            if members is None:
                if sessions is None:
                    sessions = _sessions()
                info = proc_info(target.pid)
                members = sessions.get(info.sid, []) if info is not None else []
            per_process = {key: figures}
            for pid in members[:MAX_PROCESSES]:
                if pid != target.pid:
                    read = _figures_and_key(pid, read_uss)
                    if read is not None:
                        per_process[read[0]] = read[1]
            if self.uss:
                per_process = self._with_uss(per_process, uss_seen)
            out[target.name] = self._usage(target, key, per_process)
        if self.uss:
            self._uss = uss_seen
        for name in set(self._runs) - set(out):
            del self._runs[name]
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
                figures = dataclasses.replace(figures, uss=uss)
            out[key] = figures
        return out

    def _usage(
        self,
        target: Target,
        key: tuple[int, float],
        per_process: dict[tuple[int, float], _Figures],
    ) -> Usage:
        now = time.time()
        run = self._runs.get(target.name)
        if run is None or run.key != key:
            run = self._runs[target.name] = _Run(key)
            previous = None
        else:
            previous = (run.total, run.at)
        cpu = {k: f.cpu for k, f in per_process.items()}
        run.retired += sum(v for k, v in run.cpu.items() if k not in cpu)
        run.cpu = cpu
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
            sampled_at=now,
        )

    def _cgroup_members(self, pid: int) -> list[int] | None:
        """The pids of ``pid``'s cgroup when it is not ikosd's own (None: use the session)."""
        path = _cgroup_of(pid)
        if path is None or path == self._own_cgroup or path == "/":
            return None
        for mount in _CGROUP_MOUNTS:
            with contextlib.suppress(OSError, ValueError), open(f"{mount}{path}/cgroup.procs") as f:
                return [int(line) for line in f.read().split()]
        return None


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _figures_and_key(
    pid: int, uss: Callable[[tuple[int, float]], bool]
) -> tuple[tuple[int, float], _Figures] | None:
    """One process's figures, read in one ``oneshot``; None if it is gone or unreadable.

    The key is the pid and the process's start time; ``uss(key)`` says whether to
    read the USS too.
    """
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            key = (pid, proc.create_time())
            times = proc.cpu_times()
            unique: int | None = None
            memory: Any = None
            if uss(key):
                with contextlib.suppress(psutil.AccessDenied):
                    memory = proc.memory_full_info()
                    unique = int(memory.uss)
            if memory is None:
                memory = proc.memory_info()
            io_read = io_write = None
            with contextlib.suppress(psutil.AccessDenied, AttributeError):
                io = proc.io_counters()
                io_read, io_write = int(io.read_bytes), int(io.write_bytes)
            figures = _Figures(
                cpu=float(times.user + times.system),
                rss=int(memory.rss),
                uss=unique,
                fds=proc.num_fds(),
                threads=proc.num_threads(),
                io_read=io_read,
                io_write=io_write,
            )
            return key, figures
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def _cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` (the ``0::`` line of ``/proc/PID/cgroup``), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _sessions() -> dict[int, list[int]]:
    """Every live process by session, in one scan of ``/proc``."""
    out: dict[int, list[int]] = {}
    for pid in all_pids():
        info = proc_info(pid)
        if info is not None:
            out.setdefault(info.sid, []).append(pid)
    return out


class UsageCollector(Collector):
    """Per daemon: ``ikos_daemon_cpu_seconds_total``, ``_memory_bytes``, ``_open_fds``,
    ``_threads``, ``_processes``.

    ``usage`` returns the latest usage of the daemons that run now, so that a
    daemon that stopped or was removed has no series at the next scrape.
    """

    def __init__(self, usage: Callable[[], Iterable[tuple[str, Usage]]]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[Any]:
        cpu = CounterMetricFamily(
            "ikos_daemon_cpu_seconds",
            "CPU time (user and system) of the daemon's processes in its current run",
            labels=["daemon"],
        )
        memory = GaugeMetricFamily(
            "ikos_daemon_memory_bytes",
            "Memory of the daemon's processes: resident (rss) and unique (uss)",
            labels=["daemon", "kind"],
        )
        fds = GaugeMetricFamily(
            "ikos_daemon_open_fds", "Open file descriptors of the daemon", labels=["daemon"]
        )
        threads = GaugeMetricFamily(
            "ikos_daemon_threads", "Threads of the daemon's processes", labels=["daemon"]
        )
        processes = GaugeMetricFamily(
            "ikos_daemon_processes", "Processes of the daemon", labels=["daemon"]
        )
        for name, usage in self.usage():
            cpu.add_metric([name], usage.cpu_seconds)
            memory.add_metric([name, "rss"], float(usage.rss_bytes))
            if usage.uss_bytes is not None:
                memory.add_metric([name, "uss"], float(usage.uss_bytes))
            fds.add_metric([name], float(usage.open_fds))
            threads.add_metric([name], float(usage.threads))
            processes.add_metric([name], float(usage.processes))
        yield from (cpu, memory, fds, threads, processes)
