"""Executables under the real ikosd, checked as a user would: ``ikosctl`` and ``/proc``.

Every test starts ``ikosd`` on a tree of ``ikos.Exec`` children (shell
scripts, ``systemd-notify``), drives it with ``ikosctl`` and looks at the
real processes in ``/proc``: isolation fields, systemd's ``Type=``
readiness, start timeouts, the watchdog, stop escalation, reload, logs and
restart policies. The unit tests of the parts (``test_spawn``,
``test_notify``, ``test_logfile``, ``test_pidfile``, ``test_cgroups``)
are not repeated here; these go through ikosd.

Scripts never make the test wait on time: a daemon that must hold still
waits for a *gate* file that the test creates when it has seen what it
wanted to see. The helpers at the top are shared with
``test_exec_faults.py`` and ``test_real_daemons.py``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, IKOSCTL, Instance, ignored_signals, wait_for

from ikos.platform._cgroups import CgroupManager

ROOT = os.geteuid() == 0
SYSTEMD_NOTIFY = shutil.which("systemd-notify", path="/usr/bin:/bin:/usr/sbin:/sbin")
needs_root = pytest.mark.skipif(not ROOT, reason="setting user and groups needs root")
needs_systemd_notify = pytest.mark.skipif(
    SYSTEMD_NOTIFY is None,
    reason="systemd-notify is missing: run scripts/test-deps.sh as root (apt-get install systemd)",
)

# -- helpers (shared with test_exec_faults.py and test_real_daemons.py) -------------------------

#: Whether ikosd can track a daemon's processes by cgroup (a writable cgroup v2). Without
#: it, as systemd without cgroups, a process that leaves the daemon's session with setsid
#: is out of sight: the tests then keep their extra processes inside the session.
CAN_TRACK = CgroupManager("ikos-probe").describe()["tracking"] != "none"
SETSID = "setsid " if CAN_TRACK else ""


def sh(script: str, **fields: Any) -> dict[str, Any]:
    """The fields of an Exec running ``/bin/sh -c SCRIPT``."""
    return {"executable": "/bin/sh", "args": ["-c", script], **fields}


def gate(path: Path) -> str:
    """Shell: wait (in the daemon) until the test creates ``path``."""
    return f'while [ ! -e "{path}" ]; do sleep 0.02; done'


def tree_source(children: dict[str, dict[str, Any]], **supervisor: Any) -> str:
    """A tree module: one root supervisor (generous intensity) over these executables."""
    sup = {"max_restarts": 50, "within": 60.0, **supervisor}
    lines = ["from ikos import Exec, Supervisor", "", "tree = Supervisor("]
    lines.append(f"    'root', **{sup!r}, children=[")
    for name, fields in children.items():
        fields = dict(fields)
        executable = fields.pop("executable")
        lines.append(f"        Exec({name!r}, {executable!r}, **{fields!r}),")
    lines.append("    ],")
    lines.append(")")
    return "\n".join(lines) + "\n"


def start_ikosd(
    factory: Callable[..., Instance], children: dict[str, dict[str, Any]], **kw: Any
) -> Instance:
    """Run the real ikosd on these executables; metrics off so instances never collide."""
    supervisor = kw.pop("supervisor", {})
    return factory(  # type: ignore[no-any-return]
        tree=tree_source(children, **supervisor), args=["--metrics", "off"], **kw
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it is dead, only not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_dead(*pids: int, timeout: float = 20.0) -> None:
    wait_for(lambda: not any(alive(p) for p in pids), timeout, message=f"pids {pids} to be gone")


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        parts = re.split(r"\s{2,}", line.strip())
        out[parts[0]] = (parts[1], parts[2])
    return out


def proc_fds(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_files(pid: int) -> dict[str, str]:
    """Every limit file of ``pid``'s cgroups (v1 and v2), read back from the kernel."""
    mounts: list[tuple[str, str, str, set[str]]] = []  # (root, mount point, fstype, controllers)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if rest and rest[0] in ("cgroup", "cgroup2"):
            mounts.append((fields[3], fields[4], rest[0], set(rest[2].split(","))))
    names = ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max", "cpu.cfs_quota_us")
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        for root, point, fstype, opts in mounts:
            if (fstype == "cgroup2") != (hid == "0"):
                continue
            if fstype == "cgroup" and not set(controllers.split(",")) & opts:
                continue
            rel = path[len(root) :] if root != "/" and path.startswith(root) else path
            directory = Path(point + rel)
            for name in names:
                with_file = directory / name
                if with_file.is_file() and directory != Path(point):
                    out[name] = with_file.read_text().strip()
    return out


def shutdown_clean(inst: Instance, *pids: int) -> None:
    """SIGTERM to ikosd: exit 0, and no process of the instance (nor ``pids``) left."""
    assert inst.terminate() == 0, inst.log_text()[-3000:]
    wait_for(lambda: not inst.leftovers(), message="no process left behind")
    wait_dead(*pids)


def last_reason(st: dict[str, Any]) -> str:
    return str((st.get("last_exit") or {}).get("reason", ""))


def daemon_log(inst: Instance, name: str) -> str:
    path = inst.root / "var" / "log" / "ikos" / f"{name}.log"
    return path.read_text() if path.exists() else ""


# -- isolation: what the real process has --------------------------------------------------------


def test_isolation_fields_seen_in_proc(ikosd_factory: Any, tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    env_file = tmp_path / "svc.env"
    env_file.write_text('# comment\nFROM_FILE="quoted value"\nOVERRIDDEN=by-file\n')
    limits: dict[str, Any] = {"nofile": [100, 200], "core": 0, "memory_max": "64M", "tasks_max": 16}
    inst = start_ikosd(
        ikosd_factory,
        {
            "iso": sh(
                "exec sleep 1000",
                umask="027",
                working_directory=str(workdir),
                environment={"GREETING": "hello world", "OVERRIDDEN": "by-table"},
                environment_files=[str(env_file)],
                limits=limits,
            )
        },
    )
    st = inst.wait_state("iso", "running")
    pid = st["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
    status = proc_status(pid)
    assert status["Umask"] == "0027"
    assert os.readlink(f"/proc/{pid}/cwd") == str(workdir)
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # a session of its own
    assert int(status["SigBlk"], 16) == 0 and ignored_signals(status) == set()

    env = proc_environ(pid)
    assert env["GREETING"] == "hello world"
    assert env["FROM_FILE"] == "quoted value"
    assert env["OVERRIDDEN"] == "by-file"  # systemd's order: files after the table
    assert "NOTIFY_SOCKET" not in env  # only Type=notify gets it

    lim = proc_limits(pid)
    assert lim["Max open files"] == ("100", "200")
    assert lim["Max core file size"] == ("0", "0")

    available = CgroupManager("ikos-probe").available()
    files = cgroup_files(pid)
    if available["memory_max"]:
        assert files.get("memory.max", files.get("memory.limit_in_bytes")) == str(64 << 20)
    if available["tasks_max"]:
        assert files["pids.max"] == "16"
    if not (available["memory_max"] and available["tasks_max"]):
        # never a silent no-op: ikosd says which limit it could not apply
        wait_for(lambda: "iso" in inst.log_text() and "tasks_max" in inst.log_text())


@needs_root
def test_user_group_and_supplementary_groups_seen_in_proc(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {
            "who": sh(
                "id; exec sleep 1000",  # nobody cannot write in tmp_path: id goes to the log
                user="nobody",
                group="nogroup",
                supplementary_groups=["users"],
                stdout="log",
            ),
            "root-only": sh("exec sleep 1000"),
        },
    )
    pid = inst.wait_state("who", "running")["pid"]
    status = proc_status(pid)
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert set(status["Groups"].split()) == {"65534", "100"}
    env = proc_environ(pid)
    assert env["USER"] == env["LOGNAME"] == "nobody"
    assert env["HOME"] == "/nonexistent"
    text = wait_for(lambda: daemon_log(inst, "who"))
    assert "uid=65534(nobody)" in text and "100(users)" in text
    # the daemon without user= keeps the manager's
    assert proc_status(inst.wait_state("root-only", "running")["pid"])["Uid"].split()[0] == "0"


def test_stdio_modes(ikosd_factory: Any, tmp_path: Path) -> None:
    stdin_file = tmp_path / "input.txt"
    stdin_file.write_text("line from stdin\n")
    out = tmp_path / "out.txt"
    out.write_text("old content, truncated by file:\n")
    err = tmp_path / "err.txt"
    err.write_text("kept by append:\n")
    inst = start_ikosd(
        ikosd_factory,
        {
            "io-log": sh("echo to-stdout; echo to-stderr >&2; exec sleep 1000"),
            "io-file": sh(
                "cat; echo to-err >&2; exec sleep 1000",
                stdin=f"file:{stdin_file}",
                stdout=f"file:{out}",
                stderr=f"append:{err}",
            ),
            "io-null": sh("echo lost; exec sleep 1000", stdout="null", stderr="null"),
            "io-inherit": sh(
                "echo inherited-marker-line; exec sleep 1000", stdout="inherit", stderr="inherit"
            ),
        },
    )
    pids = {n: inst.wait_state(n, "running")["pid"] for n in ("io-log", "io-file", "io-null")}
    pids["io-inherit"] = inst.wait_state("io-inherit", "running")["pid"]

    fds = proc_fds(pids["io-log"])
    assert fds[0] == "/dev/null"
    assert fds[1].startswith("pipe:") and fds[2].startswith("pipe:")
    text = wait_for(lambda: (t := daemon_log(inst, "io-log")).count("\n") >= 2 and t)
    assert re.search(r" stdout to-stdout$", text, re.M)
    assert re.search(r" stderr to-stderr$", text, re.M)

    fds = proc_fds(pids["io-file"])
    assert (fds[0], fds[1], fds[2]) == (str(stdin_file), str(out), str(err))
    flags = Path(f"/proc/{pids['io-file']}/fdinfo/2").read_text()
    assert int(flags.split("flags:")[1].split()[0], 8) & os.O_APPEND
    wait_for(lambda: out.read_text() == "line from stdin\n", message="stdin copied to file:")
    wait_for(lambda: err.read_text() == "kept by append:\nto-err\n", message="append: kept")

    fds = proc_fds(pids["io-null"])
    assert fds[0] == fds[1] == fds[2] == "/dev/null"
    assert not daemon_log(inst, "io-null")

    fds = proc_fds(pids["io-inherit"])
    assert fds[1] == fds[2] == str(inst.log)  # ikosd's own stdout
    wait_for(lambda: "inherited-marker-line" in inst.log_text())


# -- types and readiness ------------------------------------------------------------------------


def _in_background(inst: Instance, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=inst.env,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_simple_and_exec_are_ready_once_executed(ikosd_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "bad-interpreter"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    inst = start_ikosd(
        ikosd_factory,
        {
            "simple": sh("exec sleep 1000"),
            "exec": sh("exec sleep 1000", type="exec"),
            "missing": {
                "executable": "/nonexistent/daemon",
                "type": "exec",
                "auto_restart": False,
            },
            "no-interp": {"executable": str(script), "type": "exec", "auto_restart": False},
        },
    )
    for name in ("simple", "exec"):
        st = inst.wait_state(name, "running")
        assert Path(f"/proc/{st['pid']}/cmdline").read_bytes().startswith(b"sleep\x00")
    # a missing executable is refused before anything is forked, naming daemon and field
    st = inst.wait_state("missing", "failed")
    assert "field 'executable'" in last_reason(st) and "/nonexistent/daemon" in last_reason(st)
    assert st["pid"] is None and st["restarts"] == 0
    # an exec that fails in the child (ENOENT for the interpreter) is reported the same way
    st = inst.wait_state("no-interp", "failed")
    assert "executable" in last_reason(st) and "No such file" in last_reason(st), st
    # the others carried on
    assert inst.state("simple") == "running"
    res = inst.ctl("start", "missing")
    assert res.returncode == 1 and "/nonexistent/daemon" in res.stderr


def test_forking_ready_when_the_parent_exits_main_pid_from_pid_file(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "fork.pid"
    go = tmp_path / "go"
    go.touch()
    inst = start_ikosd(
        ikosd_factory,
        {
            "forking": sh(
                f'sleep 1000 & echo $! > "{pid_file}"; {gate(go)}; exit 0',
                type="forking",
                pid_file=str(pid_file),
            )
        },
    )
    first = inst.wait_state("forking", "running")["pid"]
    assert read_pid(pid_file) == first
    assert Path(f"/proc/{first}/cmdline").read_bytes() == b"sleep\x001000\x00"

    # while the parent runs, the daemon is starting, its pid the parent's
    go.unlink()
    pid_file.unlink()
    restart = _in_background(inst, "restart", "forking")
    try:
        st = wait_for(
            lambda: (
                (s := inst.status("forking"))["state"] == "starting"
                and s["pid"] not in (None, first)
                and s
            )
        )
        parent = st["pid"]
        assert Path(f"/proc/{parent}/cmdline").read_bytes().startswith(b"/bin/sh\x00")
        forked = wait_for(lambda: read_pid(pid_file))
        assert inst.state("forking") == "starting"
        go.touch()
        code, _, err = _finish(restart)
    finally:
        go.touch()
        _finish(restart)
    assert code == 0, err
    st = inst.wait_state("forking", "running")
    assert st["pid"] == forked != parent
    wait_dead(first, parent)


@needs_systemd_notify
def test_notify_ready_only_after_ready_status_and_mainpid(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    child_file = tmp_path / "child.pid"
    inst = start_ikosd(
        ikosd_factory,
        {
            "notify": sh(
                f"systemd-notify STATUS=warming-up; {gate(go)}; "
                "systemd-notify --ready 'STATUS=serving requests'; exec sleep 1000",
                type="notify",
            ),
            "mainpid": sh(
                f'sleep 1000 & echo $! > "{child_file}"; '
                'systemd-notify --ready "MAINPID=$!" STATUS=handed-over; '
                f'echo $$ > "{tmp_path}/first-main.pid"; exec sleep 1001',
                type="notify",
            ),
        },
        wait_ready=False,
    )
    st = wait_for(
        lambda: (s := inst.status("notify"))["status_text"] == "warming-up" and s,
        60,
        message="STATUS=warming-up",
    )
    assert st["state"] == "starting"  # STATUS= is not READY=1
    assert "NOTIFY_SOCKET" in proc_environ(st["pid"])
    go.touch()
    st = inst.wait_state("notify", "running")
    assert st["status_text"] == "serving requests"
    wait_for(lambda: "ikosd ready" in inst.log_text())

    # ikosctl status --json shows it too, as a user reads it
    res = inst.ctl("--json", "status", "notify", check=True)
    assert '"status_text": "serving requests"' in res.stdout

    st = inst.wait_state("mainpid", "running")
    child = read_pid(child_file)
    assert st["pid"] == child, "MAINPID= names the main process"
    assert st["status_text"] == "handed-over"
    # the first main process (now sleep 1001) is still part of the daemon; stop takes both
    first = wait_for(lambda: read_pid(tmp_path / "first-main.pid"))
    wait_for(lambda: Path(f"/proc/{first}/cmdline").read_bytes() == b"sleep\x001001\x00")
    inst.ctl("stop", "mainpid", check=True)
    wait_dead(child, first)


def test_oneshot_is_ready_when_it_exited_zero(ikosd_factory: Any, tmp_path: Path) -> None:
    marker = tmp_path / "setup-done"
    inst = start_ikosd(
        ikosd_factory,
        {
            "setup": sh(f'sleep 0.3; echo done > "{marker}"', type="oneshot", restart="transient"),
            # requires: starts once setup is ready, that is, once it has exited 0
            "web": sh(f'test -e "{marker}" || exit 3; exec sleep 1000', requires=["setup"]),
            "broken-setup": sh("exit 4", type="oneshot", auto_restart=False),
        },
    )
    st = inst.wait_state("web", "running")
    assert st["restarts"] == 0
    st = inst.wait_state("setup", "stopped")
    assert st["last_exit"]["code"] == 0 and st["restarts"] == 0
    st = inst.wait_state("broken-setup", "failed")
    assert st["last_exit"]["code"] == 4 and "status 4" in last_reason(st)


@needs_systemd_notify
def test_start_timeout_kills_a_notify_daemon_that_never_says_ready(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    inst = start_ikosd(
        ikosd_factory,
        {
            "mute": sh(
                f'echo $$ > "{pid_file}"; sleep 1000 & exec sleep 1001',
                type="notify",
                start_timeout=1.5,
                auto_restart=False,
            ),
            "fine": sh("exec sleep 1000"),
        },
    )
    st = inst.wait_state("mute", "failed", timeout=30)
    assert "did not become ready within 1.5 s" in last_reason(st)
    pid = read_pid(pid_file)
    assert pid is not None
    wait_dead(pid)
    assert inst.state("fine") == "running"
    assert "mute" in inst.log_text() and "did not become ready" in inst.log_text()


@needs_systemd_notify
def test_extend_timeout_usec_keeps_a_slow_start_alive(ikosd_factory: Any, tmp_path: Path) -> None:
    go = tmp_path / "go"
    extended = tmp_path / "extended"
    inst = start_ikosd(
        ikosd_factory,
        {
            "slow": sh(
                f"systemd-notify EXTEND_TIMEOUT_USEC=60000000 && touch {extended}; "
                f"{gate(go)}; systemd-notify --ready; exec sleep 1000",
                type="notify",
                start_timeout=1.0,
                auto_restart=False,
            )
        },
        wait_ready=False,
    )
    wait_for(extended.exists, 60, message="the daemon to extend its timeout")
    pid = inst.status("slow")["pid"]
    # past the 1 s start timeout, with margin: still starting, same process
    past = time.monotonic() + 2.5
    while time.monotonic() < past:
        st = inst.status("slow")
        assert st["state"] == "starting" and st["pid"] == pid, st
        time.sleep(0.1)
    go.touch()
    st = inst.wait_state("slow", "running")
    assert st["pid"] == pid


@needs_systemd_notify
def test_watchdog_restarts_a_daemon_that_stops_pinging(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {
            "dog": sh(
                "systemd-notify --ready; "
                f'while [ ! -e "{tmp_path}/stop.$$" ]; do '
                "systemd-notify WATCHDOG=1; sleep 0.1; done; "
                "exec sleep 1000",
                type="notify",
                watchdog_sec=1.0,
                limits={"core": 0},
            )
        },
    )
    first = inst.wait_state("dog", "running")["pid"]
    assert proc_environ(first)["WATCHDOG_USEC"] == "1000000"
    # pinging: several watchdog periods pass without a restart
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        st = inst.status("dog")
        assert st["pid"] == first and st["restarts"] == 0, st
        time.sleep(0.2)
    (tmp_path / f"stop.{first}").touch()
    second = inst.wait_running_new_pid("dog", first, timeout=30)
    st = inst.status("dog")
    assert st["restarts"] == 1
    assert last_reason(st) == "watchdog timeout"
    assert st["last_exit"]["signal"] in (signal.SIGABRT, signal.SIGKILL)
    wait_dead(first)
    assert "watchdog timeout" in inst.log_text()
    assert second != first


# -- stopping -----------------------------------------------------------------------------------


def test_stop_escalates_to_sigkill_for_a_daemon_ignoring_sigterm(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {
            "stubborn": sh(
                f"trap '' TERM; echo $$ > {tmp_path}/ready; exec sleep 1000", shutdown=2.0
            ),
            "polite": sh("exec sleep 1000", shutdown=10 * HANG),
        },
    )
    wait_for((tmp_path / "ready").exists)
    pid = inst.wait_state("stubborn", "running")["pid"]
    assert int(proc_status(pid)["SigIgn"], 16) & (1 << (signal.SIGTERM - 1))
    t0 = time.monotonic()
    inst.ctl("stop", "stubborn", check=True)
    took = time.monotonic() - t0
    st = inst.wait_state("stubborn", "stopped")
    assert st["last_exit"]["signal"] == signal.SIGKILL
    # waited its shutdown timeout, then killed; the upper bound is on hangs, not on speed
    assert 1.9 <= took < HANG, took
    wait_dead(pid)
    assert "stubborn: did not stop within 2s: sending SIGKILL" in inst.log_text()

    pid = inst.wait_state("polite", "running")["pid"]
    t0 = time.monotonic()
    inst.ctl("stop", "polite", check=True)
    # SIGTERM was enough: no wait for its shutdown timeout (a bound on hangs, not on speed)
    assert time.monotonic() - t0 < HANG
    st = inst.wait_state("polite", "stopped")
    assert st["last_exit"]["signal"] == signal.SIGTERM
    wait_dead(pid)


def test_stop_reaches_every_process_of_the_daemon(ikosd_factory: Any, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    inst = start_ikosd(
        ikosd_factory,
        {
            "family": sh(
                f'sleep 1001 & echo $! >> "{pids}"; '
                f'(trap "" TERM; exec sleep 1002) & echo $! >> "{pids}"; '
                f"{SETSID}sh -c 'echo $$ >> \"{pids}\"; exec sleep 1003' & "
                f'sh -c \'sleep 1004 & echo $! >> "{pids}"; wait\' & echo $! >> "{pids}"; '
                "wait",
                shutdown=3.0,
            )
        },
    )
    main = inst.wait_state("family", "running")["pid"]
    procs = wait_for(lambda: len(t := pids.read_text().split()) == 5 and [int(p) for p in t])
    assert all(alive(p) for p in procs)
    inst.ctl("stop", "family", check=True)
    inst.wait_state("family", "stopped")
    wait_dead(main, *procs)
    shutdown_clean(inst)


# -- reload ------------------------------------------------------------------------------------


def test_reload_sends_the_reload_signal(ikosd_factory: Any, tmp_path: Path) -> None:
    count = tmp_path / "reloads"
    helper = tmp_path / "helper.pid"
    inst = start_ikosd(
        ikosd_factory,
        {
            "hup": sh(
                f'sleep 1000 & echo $! > "{helper}"; '
                f"trap 'echo hup >> \"{count}\"' HUP; "
                "while :; do sleep 1000 & wait $!; done"
            ),
            "usr1": sh(
                f"trap 'echo usr1 >> \"{count}.usr1\"' USR1; "
                "while :; do sleep 1000 & wait $!; done",
                reload_signal="SIGUSR1",
            ),
        },
    )
    pid = inst.wait_state("hup", "running")["pid"]
    inst.ctl("reload", "hup", check=True)
    wait_for(lambda: count.exists() and count.read_text() == "hup\n")
    inst.ctl("reload", "hup", check=True)
    wait_for(lambda: count.read_text() == "hup\nhup\n")
    st = inst.status("hup")
    assert st["state"] == "running" and st["pid"] == pid and st["restarts"] == 0
    # the signal goes to the main process only (systemd's `kill -HUP $MAINPID`): a helper
    # child, which would die of SIGHUP, is not hit
    helper_pid = read_pid(helper)
    assert helper_pid is not None and alive(helper_pid)

    pid = inst.wait_state("usr1", "running")["pid"]
    inst.ctl("reload", "usr1", check=True)
    wait_for(lambda: Path(f"{count}.usr1").exists())
    assert inst.status("usr1")["pid"] == pid


@needs_systemd_notify
def test_reload_of_a_notify_daemon_waits_for_ready_again(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    reloading = tmp_path / "reloading"
    on_hup = (
        f'systemd-notify RELOADING=1 STATUS=reloading; touch "{reloading}"; {gate(go)}; '
        'rm -f "$GO"; systemd-notify --ready STATUS=reloaded'
    )
    inst = start_ikosd(
        ikosd_factory,
        {
            "nd": sh(
                f"trap '{on_hup}' HUP; systemd-notify --ready STATUS=first; "
                "while :; do sleep 1000 & wait $!; done",
                type="notify",
                environment={"GO": str(go)},
            )
        },
    )
    pid = inst.wait_state("nd", "running")["pid"]
    reload = _in_background(inst, "reload", "nd")
    try:
        wait_for(reloading.exists, message="the daemon to receive SIGHUP")
        wait_for(
            lambda: inst.status("nd")["status_text"] == "reloading",
            message="STATUS=reloading in ikosctl status",
        )
        assert reload.poll() is None, "ikosctl reload returned before READY=1"
        go.touch()
        code, _, err = _finish(reload)
    finally:
        go.touch()
        _finish(reload)
    assert code == 0, err
    st = inst.status("nd")
    assert st["status_text"] == "reloaded" and st["pid"] == pid and st["state"] == "running"
    shutdown_clean(inst, pid)


# -- logs ---------------------------------------------------------------------------------------

ISO_TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def test_logs_are_timestamped_per_stream_and_tailed(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {
            "chatty": sh(
                "i=1; while [ $i -le 20 ]; do echo out-$i; i=$((i+1)); done; "
                "echo err-line >&2; printf 'no newline at exit'; exec sleep 1000 >/dev/null"
            )
        },
    )
    inst.wait_state("chatty", "running")
    text = wait_for(lambda: "no newline at exit" in (t := daemon_log(inst, "chatty")) and t)
    lines = text.splitlines()
    assert len(lines) == 22
    for line in lines:
        assert re.fullmatch(rf"{ISO_TS} (stdout|stderr) .+", line), line
    assert re.search(r" stderr err-line$", text, re.M)
    out_lines = [line.split(" ", 2)[2] for line in lines if " stdout " in line]
    assert out_lines[:20] == [f"out-{i}" for i in range(1, 21)]

    res = inst.ctl("logs", "-n", "3", "chatty", check=True)
    assert res.stdout.splitlines() == lines[-3:]
    assert inst.ctl("logs", "-n", "0", "chatty", check=True).stdout == ""
    res = inst.ctl("--json", "logs", "-n", "2", "chatty", check=True)
    assert '"no newline at exit' in res.stdout or "no newline at exit" in res.stdout
    res = inst.ctl("logs", "nosuchdaemon")
    assert res.returncode == 4


# -- restart policies ---------------------------------------------------------------------------


def _counter(path: Path, fail_until: int, code: int = 1) -> str:
    """Shell: count runs in ``path`` (with their times); exit ``code`` until run ``fail_until``."""
    return (
        f'n=$(($(wc -l < "{path}" 2>/dev/null || echo 0) + 1)); '
        f'date +%s.%N >> "{path}"; '
        f'[ "$n" -gt {fail_until} ] && exec sleep 1000; exit {code}'
    )


def _runs(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def test_restart_policies(ikosd_factory: Any, tmp_path: Path) -> None:
    c = {n: tmp_path / f"{n}.runs" for n in ("no-auto", "onf-ok", "onf-fail", "delay", "limit")}
    inst = start_ikosd(
        ikosd_factory,
        {
            "no-auto": sh(_counter(c["no-auto"], 5), auto_restart=False),
            "onf-ok": sh(_counter(c["onf-ok"], 5, code=0), restart_on="on-failure"),
            "onf-fail": sh(_counter(c["onf-fail"], 2), restart_on="on-failure"),
            "delay": sh(_counter(c["delay"], 2), restart_delay=1.0),
            "limit": sh(_counter(c["limit"], 100), max_restarts=2),
        },
    )
    # auto_restart=false: exit 1 is final
    st = inst.wait_state("no-auto", "failed")
    assert st["last_exit"]["code"] == 1 and st["restarts"] == 0

    # on-failure: exit 0 is not restarted ...
    st = inst.wait_state("onf-ok", "stopped")
    assert st["last_exit"]["code"] == 0 and st["restarts"] == 0
    # ... exit 1 is, until it runs
    st = inst.wait_state("onf-fail", "running")
    wait_for(lambda: len(_runs(c["onf-fail"])) == 3)
    assert inst.status("onf-fail")["restarts"] == 2

    # restart_delay: each restart waited its delay
    # (each failing run is `running` for a moment too: wait for the third, which stays)
    wait_for(lambda: len(_runs(c["delay"])) == 3, 30, message="the third run of delay")
    st = inst.wait_state("delay", "running", timeout=30)
    times = _runs(c["delay"])
    assert len(times) == 3 and st["restarts"] == 2
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    assert "delay: failed -> backoff (restarting in 1.000 s)" in inst.log_text()

    # max_restarts: failed, with the reason
    st = inst.wait_gave_up("limit", timeout=30)
    assert len(_runs(c["limit"])) == 3 and st["restarts"] == 2
    assert "restart limit reached (2 restarts)" in last_reason(st)
    assert "exited with status 1" in last_reason(st) or "status 1" in last_reason(st)
    # nothing runs it again by itself; an operator may
    assert inst.state("limit") == "failed"
    assert inst.status("root")["state"] == "running"


def test_auto_start_false_waits_for_an_operator(ikosd_factory: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    inst = start_ikosd(
        ikosd_factory,
        {
            "manual": sh(f'touch "{marker}"; exec sleep 1000', auto_start=False),
            "auto": sh("exec sleep 1000"),
        },
    )
    inst.wait_state("auto", "running")
    st = inst.status("manual")
    assert st["state"] == "stopped" and st["pid"] is None and not marker.exists()
    inst.ctl("start", "manual", check=True)
    st = inst.wait_state("manual", "running")
    assert marker.exists() and alive(st["pid"])


@needs_systemd_notify
def test_sigterm_to_ikosd_while_a_daemon_is_still_starting(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    inst = start_ikosd(
        ikosd_factory,
        {
            "slow": sh(
                f'echo $$ > "{pid_file}"; exec sleep 1000',
                type="notify",
                start_timeout=300,
                auto_restart=False,
            )
        },
        wait_ready=False,
    )
    daemon = wait_for(lambda: read_pid(pid_file), 60)
    try:
        inst.wait_state("slow", "starting")
        inst.proc.send_signal(signal.SIGTERM)
        # an orderly shutdown does not wait 300 s (a bound on hangs, not on speed)
        assert inst.proc.wait(timeout=HANG) == 0
        wait_dead(daemon)
    finally:
        # unblock the start so that the fixture's own shutdown is quick
        if alive(daemon):
            os.kill(daemon, signal.SIGKILL)
