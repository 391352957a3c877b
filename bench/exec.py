"""Executable benchmark: ikos against supervisord, circus, runit and s6, in one run.

Run with ``python -m bench.exec`` (as root, for the Debian packages). Every
manager supervises the same tiny process: a 129-byte static x86-64 program,
written at run time and named ``run``, that loops on ``pause()`` (no libc,
no loader, 12 KiB of RSS), so that what is measured is the manager, not the
child. runit and s6 exec ``./run`` in each service directory (a hard link to
that program); the others exec it by path. All state directories live in one
temporary directory under /tmp.

Measured, each figure the median of ``--repeats`` runs unless said otherwise:

- **start N to running, manager up**: every process stopped, then one start
  request for all through the manager's own in-process client, until all N
  ``run`` processes exist (ikos: ``start`` of the supervisor through
  ``ControlClient``; supervisord: XML-RPC ``startAllProcesses``, what
  ``supervisorctl start all`` calls; circus: ``CircusClient`` ``start``;
  runit and s6: ``u`` written to every ``supervise/control`` FIFO, what
  ``sv up`` and ``s6-svc -u`` write);
- **launch to all running**: from the exec of the manager until all N run and
  the manager answers (ikos: its ready line; runit: ``runsvdir``; s6:
  ``s6-svscan``);
- **restart latency** after SIGKILL, from the kill to a new ``run`` process
  observed among the children of the process that supervises it (the
  manager, or that service's ``runsv``/``s6-supervise``), polled every
  ~0.1 ms the same way for every manager; once on a process that lived more
  than a second, and once more on its replacement at once (the quick second
  kill), ``--kills`` times over different services of the N=50 instance;
- **manager memory**: USS of the manager's processes (the manager's process
  tree minus the ``run`` processes: ikosd, its fork server and fd store;
  supervisord;
  circusd; ``runsvdir`` and every ``runsv``; ``s6-svscan`` and every
  ``s6-supervise``) with 500 running minus with 0 configured, per process;
- **idle CPU** of those processes over 10 s with 500 running.

Each manager gets the fastest restart it allows: ikos with no
``restart_delay``, no back-off and a restart intensity high enough never to
trip; supervisord ``startsecs=0``, ``autorestart=true``; circus
``respawn=true`` and a short ``check_delay`` (it respawns only when that
periodic check runs; ``--circus-check-delay``); runit as it comes (runsv
waits one second before restarting a process that lived under one second);
s6 with ``notification-fd`` and a variant of the tiny program that writes
its readiness newline (s6-supervise otherwise waits one second after every
death). Output: ikos and supervisord capture stdout/stderr to log files by
default, circus, runit and s6 let the child inherit theirs; each runs with
its default. A benchmark, never a test: figures go to
``bench/results/exec.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import selectors
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench._common import Table, percentile

TINY = "run"  # the comm of every managed process
BIN = Path(sys.executable).parent
PEER_NAMES = ("ikos-pg", "supervisord", "circus", "runit", "s6")


# -- the managed process ---------------------------------------------------------


def tiny_elf(notify_fd: int | None = None) -> bytes:
    """A static x86-64 ELF that loops on pause(2): no libc, no loader, 129 bytes.

    With ``notify_fd`` it first writes a newline to that descriptor: s6's
    readiness notification (``notification-fd``), which lets s6-supervise
    restart a process that was ready for over a second without its 1 s wait.
    """
    base, ehsize, phsize = 0x400000, 64, 56
    loop = bytes.fromhex("b8220000000f05ebf7")  # mov eax, 34 (pause); syscall; jmp back
    if notify_fd is None:
        code = loop
    else:
        code = (
            bytes.fromhex("b801000000")  # mov eax, 1 (write)
            + b"\xbf"
            + struct.pack("<I", notify_fd)  # mov edi, fd
            + bytes.fromhex("488d3510000000")  # lea rsi, [rip + 16]: the newline after loop
            + bytes.fromhex("ba010000000f05")  # mov edx, 1; syscall
            + loop
            + b"\n"
        )
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack(
        "<HHIQQQIHHHHHH",
        2,
        0x3E,
        1,
        base + ehsize + phsize,
        ehsize,
        0,
        0,
        ehsize,
        phsize,
        1,
        0,
        0,
        0,
    )
    total = ehsize + phsize + len(code)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return header + program + code


def write_tiny(directory: Path, notify_fd: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TINY
    if platform.machine() == "x86_64":
        path.write_bytes(tiny_elf(notify_fd))
        path.chmod(0o755)
        return path
    cc = shutil.which("cc")
    if cc is None:
        raise SystemExit("bench.exec: not x86-64 and no C compiler for the tiny process")
    src = directory / "tiny.c"
    notify = f'write({notify_fd}, "\\n", 1); ' if notify_fd is not None else ""
    src.write_text("#include <unistd.h>\nint main(void) { " + notify + "for (;;) pause(); }\n")
    subprocess.run([cc, "-O2", "-static", "-o", str(path), str(src)], check=True)
    return path


# -- processes, read from /proc the same way for every manager ----------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace")
    except OSError:
        return None


def managed(root: int) -> dict[int, int]:
    """Each ``run`` process under ``root`` (three levels deep) -> its parent."""
    found: dict[int, int] = {}
    frontier = [root]
    for _ in range(3):
        deeper = []
        for parent in frontier:
            for child in children(parent):
                name = comm(child)
                if name == TINY:
                    found[child] = parent
                elif name is not None:
                    deeper.append(child)
        frontier = deeper
    return found


def manager_processes(root: int) -> list[psutil.Process]:
    """The manager's process tree without the processes it manages."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if comm(p.pid) not in (TINY, None)]


def uss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().uss
    return total


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> None:
    """Poll ``cond``, sleeping at least as long as it took: the poller takes at most half a
    core from the managers on this 2-core machine, whatever the cost of a scan."""
    deadline = time.monotonic() + timeout
    while True:
        t = time.monotonic()
        if cond():
            return
        spent = time.monotonic() - t
        if t > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(max(interval, spent))


def become_subreaper() -> None:
    """Orphans of a manager killed in a hurry come back to us, to be killed and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def kill_tree(root: int) -> None:
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(OSError):
        os.killpg(root, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


# -- the managers ----------------------------------------------------------------------


class Manager:
    """One manager instance with N services, in its own directory and session."""

    name = ""

    def __init__(self, work: Path, tiny: Path, n: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-{n}-", dir=work))
        self.tiny = tiny
        self.n = n
        self.proc: subprocess.Popen[bytes] | None = None
        self.launch_started = 0.0
        self.configure()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def configure(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        out = open(self.dir / "manager.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=self.stdout(out),
                stderr=out,
                start_new_session=True,
            )
        finally:
            out.close()

    def stdout(self, out: Any) -> Any:
        return out

    def answers(self) -> bool:
        return True

    def launched(self) -> None:
        """Block until all N run and the manager answers."""
        wait_for(lambda: len(managed(self.pid)) >= self.n, 300, f"{self.name}: {self.n} running")
        wait_for(self.answers, 60, f"{self.name} to answer")

    def start_all(self) -> None:
        raise NotImplementedError

    def stop_all(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Orderly shutdown, then kill whatever is left of the process tree."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.shutdown()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=60)
        finally:
            kill_tree(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            reap_orphans()
            self.proc = None


IKOS_TREE = textwrap.dedent(
    """
    import ikos

    def tree():
        return ikos.Supervisor("root", max_restarts=10**9, within=1, children=[
            ikos.Supervisor("pool", max_restarts=10**9, within=1, children=[
                ikos.Exec(f"s{{i}}", {tiny!r}) for i in range({n})
            ]),
        ])
    """
)


class Ikos(Manager):
    name = "ikos"

    def configure(self) -> None:
        (self.dir / "benchtree.py").write_text(IKOS_TREE.format(tiny=str(self.tiny), n=self.n))
        self.root = self.dir / "root"
        self.client: Any = None

    def command(self) -> list[str]:
        ikosd = BIN / "ikosd"
        head = [str(ikosd)] if ikosd.exists() else [sys.executable, "-m", "ikos.manager._ikosd"]
        return [
            *head,
            "--root",
            str(self.root),
            "--tree",
            f"{self.dir / 'benchtree.py'}:tree",
            "--log-level",
            "warning",
            "--metrics",
            "off",
        ]

    def stdout(self, out: Any) -> Any:
        return subprocess.PIPE

    def answers(self) -> bool:
        try:
            self.control().call("status", {})
        except Exception:  # not up yet: the socket is not there, or refuses
            self.close_client()
            return False
        return True

    def close_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    def launched(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        if self.n == 0:
            # answering, as supervisord's XML-RPC or circus's endpoint: the control socket
            # serves a status request (the ready line also waits for the IPC broker)
            wait_for(self.answers, 300, "ikosd to answer", interval=0.001)
            self.answered_at = time.perf_counter()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=300):
                raise TimeoutError("ikosd: no ready line in 300 s")
        line = self.proc.stdout.readline().decode(errors="replace")
        if "ready" not in line:
            raise RuntimeError(f"ikosd did not start: {line!r}")
        self.ready_at = time.perf_counter()
        wait_for(lambda: len(managed(self.pid)) >= self.n, 60, f"ikos: {self.n} running")

    def control(self) -> Any:
        if self.client is None:
            from ikos.platform._control import ControlClient
            from ikos.platform._paths import InstancePaths

            self.client = ControlClient(InstancePaths.for_root(self.root), timeout=600)
        return self.client

    def start_all(self) -> None:
        self.control().call("start", {"name": "pool"})

    def stop_all(self) -> None:
        self.control().call("stop", {"name": "pool"})

    def close(self) -> None:
        self.close_client()
        super().close()


class IkosProcessGroup(Ikos):
    """ikos with kill_mode = "process-group": no tracking cgroup, posix_spawn starts.

    This is the closest to what runit, s6, supervisord and circus do by default
    (they track a process, not a cgroup): a daemon's child that leaves its
    session is not stopped with it. The default ikos column keeps the cgroup.
    """

    name = "ikos-pg"

    def configure(self) -> None:
        super().configure()
        tree = IKOS_TREE.format(tiny=str(self.tiny), n=self.n).replace(
            f"{str(self.tiny)!r})", f"{str(self.tiny)!r}, kill_mode='process-group')"
        )
        (self.dir / "benchtree.py").write_text(tree)


class Supervisord(Manager):
    name = "supervisord"

    def configure(self) -> None:
        self.sock = self.dir / "supervisor.sock"
        programs = "".join(
            f"\n[program:s{i}]\ncommand={self.tiny}\nautostart=true\nautorestart=true\n"
            "startsecs=0\nstartretries=1000000\nstopwaitsecs=10\n"
            for i in range(self.n)
        )
        (self.dir / "supervisord.conf").write_text(
            textwrap.dedent(
                f"""\
                [unix_http_server]
                file={self.sock}

                [supervisord]
                logfile={self.dir / "supervisord.log"}
                pidfile={self.dir / "supervisord.pid"}
                childlogdir={self.dir / "logs"}
                loglevel=warn
                nodaemon=true
                minfds=16384

                [rpcinterface:supervisor]
                supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

                [supervisorctl]
                serverurl=unix://{self.sock}
                """
            )
            + programs
        )
        (self.dir / "logs").mkdir()

    def command(self) -> list[str]:
        return [str(BIN / "supervisord"), "-n", "-c", str(self.dir / "supervisord.conf")]

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.sock}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def answers(self) -> bool:
        try:
            return bool(self.rpc().supervisor.getState()["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            return False

    def start_all(self) -> None:
        self.rpc().supervisor.startAllProcesses(True)

    def stop_all(self) -> None:
        self.rpc().supervisor.stopAllProcesses(True)


class Circus(Manager):
    name = "circus"
    check_delay = 0.01

    def configure(self) -> None:
        self.endpoint = f"ipc://{self.dir / 'circus.sock'}"
        watchers = "".join(
            f"\n[watcher:s{i}]\ncmd = {self.tiny}\nnumprocesses = 1\nrespawn = true\n"
            "warmup_delay = 0\nmax_retry = -1\n"
            for i in range(self.n)
        )
        (self.dir / "circus.ini").write_text(
            textwrap.dedent(
                f"""\
                [circus]
                check_delay = {self.check_delay}
                endpoint = {self.endpoint}
                pubsub_endpoint = ipc://{self.dir / "pubsub.sock"}
                statsd = false
                """
            )
            + watchers
        )

    def command(self) -> list[str]:
        return [
            str(BIN / "circusd"),
            "--log-level",
            "warning",
            "--log-output",
            str(self.dir / "circus.log"),
            str(self.dir / "circus.ini"),
        ]

    def call(self, command: str, **props: Any) -> Any:
        from circus.client import CircusClient

        client = CircusClient(endpoint=self.endpoint, timeout=600)
        try:
            answer = client.call({"command": command, "properties": props})
        finally:
            client.stop()
        if answer.get("status") != "ok":
            raise RuntimeError(f"circus {command}: {answer}")
        return answer

    def answers(self) -> bool:
        try:
            self.call("numwatchers")
            return True
        except Exception:
            return False

    def start_all(self) -> None:
        self.call("start", waiting=True)

    def stop_all(self) -> None:
        self.call("stop", waiting=True)


class Runit(Manager):
    """runsvdir on a directory of N services, one ``runsv`` each."""

    name = "runit"
    program = "runsvdir"

    def configure(self) -> None:
        self.services = self.dir / "service"
        self.services.mkdir()
        for i in range(self.n):
            svc = self.services / f"s{i}"
            svc.mkdir()
            os.link(self.program_file(), svc / "run")

    def program_file(self) -> Path:
        return self.tiny

    def command(self) -> list[str]:
        return [self.program, str(self.services)]

    def spawn(self) -> None:
        # runsvdir does not start a directory modified within the current second (it
        # waits for the next one to be sure to see later changes): a real service
        # directory is older than that, so make ours so
        past = time.time() - 60
        os.utime(self.services, (past, past))
        super().spawn()

    def control(self, letter: bytes) -> None:
        """What ``sv up``/``sv down`` (``s6-svc -u``/``-d``) do: one byte into each FIFO."""
        for i in range(self.n):
            fd = os.open(
                self.services / f"s{i}" / "supervise" / "control", os.O_WRONLY | os.O_NONBLOCK
            )
            try:
                os.write(fd, letter)
            finally:
                os.close(fd)

    def start_all(self) -> None:
        self.control(b"u")

    def stop_all(self) -> None:
        self.control(b"d")

    def shutdown(self) -> None:
        # runsvdir: SIGHUP sends TERM to every runsv, which stops its service and exits
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)


class S6(Runit):
    """s6-svscan on a scan directory of N services, one ``s6-supervise`` each.

    s6-supervise waits one second after a death before it restarts, unless the
    process notified readiness over a second before: so each service has
    ``notification-fd`` 3 and runs the tiny program variant that writes its
    newline there first.
    """

    name = "s6"
    program = "s6-svscan"

    def program_file(self) -> Path:
        path = self.tiny.parent / "s6" / TINY
        if not path.exists():
            write_tiny(path.parent, notify_fd=3)
        return path

    def configure(self) -> None:
        super().configure()
        for i in range(self.n):
            (self.services / f"s{i}" / "notification-fd").write_text("3\n")

    def shutdown(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)


# -- measurements -----------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def launch(cls: type[Manager], work: Path, tiny: Path, n: int) -> tuple[Manager, float]:
    m = cls(work, tiny, n)
    try:
        t = time.perf_counter()
        m.spawn()
        m.launched()
        done = time.perf_counter()
        m.launch_started = t
        return m, getattr(m, "answered_at", done) - t
    except BaseException:
        m.close()
        raise


def settle(m: Manager) -> None:
    """Let every process live over a second (runit and s6 throttle younger ones), then idle."""
    time.sleep(1.5)


def timed_start(m: Manager) -> float:
    settle(m)
    m.stop_all()
    wait_for(lambda: not managed(m.pid), 120, f"{m.name}: all stopped")
    time.sleep(0.2)
    t = time.perf_counter()
    m.start_all()
    wait_for(lambda: len(managed(m.pid)) >= m.n, 300, f"{m.name}: {m.n} running again")
    return time.perf_counter() - t


def kill_and_wait(victim: int, parent: int, timeout: float = 30.0) -> tuple[float, int | None]:
    """SIGKILL ``victim``; seconds until a new ``run`` child of ``parent`` is observed."""
    before = set(children(parent))
    t = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    deadline = t + timeout
    while True:
        for child in children(parent):
            if child not in before and comm(child) == TINY:
                return time.perf_counter() - t, child
        if time.perf_counter() > deadline:
            return float("inf"), None
        time.sleep(0.0001)


def restarts(m: Manager, kills: int) -> tuple[list[float], list[float]]:
    first: list[float] = []
    second: list[float] = []
    settle(m)
    for i in range(kills):
        procs = managed(m.pid)
        victim = sorted(procs)[i % len(procs)]
        dt, new = kill_and_wait(victim, procs[victim])
        first.append(dt)
        if new is None:
            continue
        dt2, _ = kill_and_wait(new, procs[victim])
        second.append(dt2)
        wait_for(lambda: len(managed(m.pid)) >= m.n, 60, f"{m.name}: back to {m.n}")
        time.sleep(0.05)
    return first, second


def measure(cls: type[Manager], work: Path, tiny: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # launched `repeats` times, as the other launches: the first launch of a run
    # alone (cold caches) differed from the next by up to 2x
    out["launch_0"], readies = [], []
    for r in range(args.repeats):
        m, dt = launch(cls, work, tiny, 0)
        out["launch_0"].append(dt)
        if hasattr(m, "ready_at"):
            readies.append(m.ready_at - m.launch_started)
        if r < args.repeats - 1:
            m.close()
    if readies:
        out["ready_0"] = median(readies)
    try:
        time.sleep(2.0)
        out["uss_0"] = uss(manager_processes(m.pid))
    finally:
        m.close()
    small, big = min(args.sizes), max(args.sizes)
    for n in sorted(args.sizes):
        launches: list[float] = []
        m = None
        try:
            for r in range(args.repeats):
                m, dt = launch(cls, work, tiny, n)
                launches.append(dt)
                print(f"  {cls.name}: launch {n}: {dt * 1e3:.0f} ms", flush=True)
                if r < args.repeats - 1:
                    m.close()
            assert m is not None
            starts = []
            for _ in range(args.repeats):
                starts.append(timed_start(m))
                print(f"  {cls.name}: start {n}: {starts[-1] * 1e3:.0f} ms", flush=True)
            out[f"launch_{n}"] = launches
            out[f"start_{n}"] = starts
            if n == small:
                first, second = restarts(m, args.kills)
                out["restart"], out["restart_quick"] = first, second
                print(
                    f"  {cls.name}: restart median {median(first) * 1e3:.2f} ms, "
                    f"quick second kill {median(second) * 1e3:.2f} ms",
                    flush=True,
                )
            if n == big:
                time.sleep(3.0)
                procs = manager_processes(m.pid)
                c0 = cpu_seconds(procs)
                time.sleep(args.idle)
                c1 = cpu_seconds(procs)
                used = sum(c1[p] - c0[p] for p in c1 if p in c0)
                out["idle_cpu_pct"] = used / args.idle * 100
                out["manager_procs"] = dict(Counter(comm(p.pid) for p in procs))
                out["uss_big"] = uss(procs)
                print(
                    f"  {cls.name}: idle CPU {out['idle_cpu_pct']:.2f} %, "
                    f"USS {out['uss_big'] / 2**20:.1f} MiB in {out['manager_procs']}",
                    flush=True,
                )
        finally:
            if m is not None:
                m.close()
    out["uss_per_process"] = (out["uss_big"] - out["uss_0"]) / big
    return out


def circus_default_idle(work: Path, tiny: Path, idle: float, n: int) -> float:
    """Idle CPU of circus with n watchers at its default check_delay (5 s)."""

    class CircusDefault(Circus):
        check_delay = 5.0

    m, _ = launch(CircusDefault, work, tiny, n)
    try:
        time.sleep(3.0)
        procs = manager_processes(m.pid)
        c0 = cpu_seconds(procs)
        time.sleep(idle)
        c1 = cpu_seconds(procs)
        return sum(c1[p] - c0[p] for p in c1 if p in c0) / idle * 100
    finally:
        m.close()


# -- set-up and report -----------------------------------------------------------------------


def install_peers(names: list[str]) -> None:
    """supervisor and circus from PyPI into this venv, runit and s6 from Debian."""
    missing_py = []
    if "supervisord" in names and not (BIN / "supervisord").exists():
        missing_py.append("supervisor")
    if "circus" in names and not (BIN / "circusd").exists():
        missing_py.append("circus")
    if missing_py:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing_py], check=True)
    debs = [
        d
        for d, exe in (("runit", "runsvdir"), ("s6", "s6-svscan"))
        if d in names and shutil.which(exe) is None
    ]
    if debs:
        if os.geteuid() != 0:
            raise SystemExit(f"bench.exec: install {' '.join(debs)} (apt-get) or run as root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *debs],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )


CLASSES: dict[str, type[Manager]] = {
    "ikos": Ikos,
    "ikos-pg": IkosProcessGroup,
    "supervisord": Supervisord,
    "circus": Circus,
    "runit": Runit,
    "s6": S6,
}


def report(results: dict[str, dict[str, Any]], extra: dict[str, Any], sizes: list[int]) -> Table:
    peers = [p for p in PEER_NAMES if p in results]
    cols = ["metric", "goal", "ikos"]
    for p in peers:
        cols += [p, f"{p} / ikos"]
    cols.append("goal met")
    table = Table("Executables: ikos against supervisord, circus, runit and s6", cols)
    ik = results["ikos"]

    def row(
        label: str,
        key: str,
        f: Callable[[Any], float],
        goal: str,
        met: Callable[[float, dict[str, float]], bool],
    ) -> None:
        mine = f(ik[key])
        theirs = {p: f(results[p][key]) for p in peers}
        cells: list[Any] = [label, goal, mine]
        for p in peers:
            cells += [theirs[p], theirs[p] / mine if mine else "-"]
        cells.append("yes" if met(mine, theirs) else "**no**")
        table.add(*cells)

    def ahead(v: float, t: dict[str, float]) -> bool:
        return all(v <= t[p] for p in ("supervisord", "circus") if p in t)

    ms = lambda xs: median(xs) * 1e3  # noqa: E731
    p99 = lambda xs: percentile(xs, 99) * 1e3  # noqa: E731

    def start_goal(v: float, t: dict[str, float]) -> bool:
        return ahead(v, t) and ("runit" not in t or v <= t["runit"])

    big = max(sizes)
    for n in sorted(sizes):
        row(
            f"start {n} to running, manager up (ms)",
            f"start_{n}",
            ms,
            "< supervisord, circus; <= runit",
            start_goal,
        )
    row(
        "launch manager with 0 to answering (ms)",
        "launch_0",
        ms,
        "< 150 ms",
        lambda v, t: v < 150,  # v in ms, as the row shows it
    )
    for n in sorted(sizes):
        row(
            f"launch manager with {n} to all running (ms)",
            f"launch_{n}",
            ms,
            "< supervisord, circus; <= runit",
            start_goal,
        )
    for key, what in (("restart", "lived > 1 s"), ("restart_quick", "quick second kill")):
        row(
            f"restart after SIGKILL, {what}: median (ms)",
            key,
            ms,
            "< 5 ms, <= runit",
            lambda v, t: v < 5 and ("runit" not in t or v <= t["runit"]),
        )
        row(
            f"restart after SIGKILL, {what}: p99 (ms)",
            key,
            p99,
            "-",
            lambda v, t: True,
        )
    row(
        "manager USS per managed process (KiB)",
        "uss_per_process",
        lambda v: v / 1024,
        "< supervisord, circus",
        ahead,
    )
    row(
        f"manager USS with {big} running (MiB)",
        "uss_big",
        lambda v: v / 2**20,
        "<= supervisord",
        lambda v, t: "supervisord" not in t or v <= t["supervisord"],
    )
    row(
        f"manager idle CPU, {big} running (% of a core)",
        "idle_cpu_pct",
        lambda v: v,
        "< supervisord, circus",
        ahead,
    )
    table.notes += [
        "Ratios are peer / ikos: above 1, ikos is ahead. Start and launch figures are medians "
        "of the repeats; restart figures are over the kills of one "
        f"N={min(sizes)} instance.",
        "Managed process: a 129-byte static program looping on pause(), comm 'run'.",
        "Memory counts every process of the manager that is not a managed process: ikosd, "
        "its fd keeper (C), its spawn server (C), and its IPC broker and fork server when "
        "they run (the broker starts at the first IPC client, the fork server for the first "
        "actor: neither runs for a tree of executables); supervisord; circusd; runsvdir "
        "plus one runsv "
        "per service; s6-svscan plus one s6-supervise per service. USS per process = "
        f"(USS with {big} - USS with 0) / {big}; idle CPU over --idle seconds.",
        f"circus runs with check_delay = {Circus.check_delay} s, its fastest useful respawn "
        "(it respawns only on that periodic check, not on SIGCHLD); at its default (5 s) "
        f"its idle CPU with {big} watchers is "
        + (
            f"{extra['circus_default_idle_cpu_pct']:.2f} %."
            if "circus_default_idle_cpu_pct" in extra
            else "not measured."
        ),
        "runit waits 1 s before restarting a process that lived under 1 s, s6 a process "
        "that was ready for under 1 s (s6 runs with notification-fd, without which it waits "
        "1 s after every death): the quick second kill shows it. supervisord restarts when "
        "it wakes from its 1 s poll. ikos restarts at once the first time, then waits 0.1 s "
        "(doubling to 5 s) after each run shorter than 1 s, as systemd's RestartSec=100ms: "
        "an executable whose exec keeps failing must not be restarted as fast as the "
        "machine forks.",
        "ikos and supervisord capture each child's stdout/stderr into log files by default "
        "(two pipes per child); circus, runit and s6 let it inherit theirs.",
        "ikos runs in its default kill_mode, control-group: every executable in a cgroup of "
        "its own, joined before its first instruction (clone3 into the cgroup by ikos's "
        'spawn server, ikos-cgexec serve); ikos-pg is kill_mode = "process-group" '
        "(posix_spawn, no cgroup), the closest to what the peers do.",
        "Answering: ikos's control socket serves a status request, supervisord's XML-RPC "
        "and circus's endpoint answer; runit and s6 have no server (their first scan). "
        + (
            f"ikos's ready line came after {results['ikos']['ready_0'] * 1e3:.0f} ms (median)."
            if "ready_0" in results["ikos"]
            else ""
        ),
    ]
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="launches and starts per N")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs for restart latency")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measure")
    ap.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[50, 500],
        help="N to start (restarts on the smallest, memory and idle CPU on the largest)",
    )
    ap.add_argument("--peers", default=",".join(PEER_NAMES), help="comma-separated peers")
    ap.add_argument("--circus-check-delay", type=float, default=Circus.check_delay)
    ap.add_argument("--no-install", action="store_true", help="do not install missing peers")
    args = ap.parse_args(argv)
    names = [p for p in args.peers.split(",") if p]
    for p in names:
        if p not in PEER_NAMES:
            ap.error(f"unknown peer {p!r}")
    Circus.check_delay = args.circus_check_delay
    if not args.no_install:
        install_peers(names)

    load_before = os.getloadavg()
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="ikos-bench-exec-", dir="/tmp"))
    results: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    try:
        tiny = write_tiny(work)
        for name in ["ikos", *names]:
            print(f"{name} ...", flush=True)
            try:
                results[name] = measure(CLASSES[name], work, tiny, args)
            except Exception as exc:  # a peer failing must not lose the others' figures
                if name == "ikos":
                    raise
                print(f"  {name} failed: {exc!r}", flush=True)
        if "circus" in results:
            print("circus at its default check_delay ...", flush=True)
            extra["circus_default_idle_cpu_pct"] = circus_default_idle(
                work, tiny, args.idle, max(args.sizes)
            )
    finally:
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        reap_orphans()
        shutil.rmtree(work, ignore_errors=True)

    table = report(results, extra, args.sizes)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    load_after = os.getloadavg()
    table.notes.append(
        f"ikos at {commit or 'unknown commit'}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} before the run, "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} after: the machine is shared."
    )
    table.raw = {
        "results": results,
        "extra": extra,
        "settings": {
            "repeats": args.repeats,
            "kills": args.kills,
            "idle_s": args.idle,
            "sizes": args.sizes,
            "circus_check_delay": Circus.check_delay,
        },
        "ikos_commit": commit,
        "loadavg": {"before": load_before, "after": load_after},
    }
    path = table.write("exec")
    print(table.markdown())
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
