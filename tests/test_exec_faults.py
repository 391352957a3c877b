"""Misbehaving executables under the real ikosd: the manager holds, the others carry on.

A daemon that forks and exits, a ``forking`` daemon that leaves several
processes and no PID file, a flood of notifications (garbage, oversized,
valid), spoofed notifications (``MAINPID=1``, another daemon's PID, a
sender outside every daemon), PID files naming PID 1 or a dead process.
Each test checks what a user sees (``ikosctl status``, ikosd's log) and
what the kernel shows (no process left behind).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import HANG, wait_for
from test_exec_live import (
    CAN_TRACK,
    SETSID,
    alive,
    gate,
    last_reason,
    needs_systemd_notify,
    read_pid,
    sh,
    start_ikosd,
    wait_dead,
)


def dead_pid() -> int:
    """The PID of a process that has just exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- forks ---------------------------------------------------------------------------------------


def test_simple_daemon_that_forks_and_exits_leaves_no_child(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {
            "forker": sh(
                f'sleep 1000 & echo $! > "{tmp_path}/child"; '
                f'({SETSID}sleep 1001 & echo $! > "{tmp_path}/escaped"); '
                f"{gate(tmp_path / 'go')}; exit 0",
                restart="transient",
            ),
            "bystander": sh("exec sleep 1000"),
        },
    )
    main = inst.wait_state("forker", "running")["pid"]
    child = wait_for(lambda: read_pid(tmp_path / "child"))
    escaped = wait_for(lambda: read_pid(tmp_path / "escaped"))
    assert alive(child) and alive(escaped)
    assert os.getsid(escaped) != main or not CAN_TRACK
    (tmp_path / "go").touch()
    st = inst.wait_state("forker", "stopped")
    assert st["last_exit"]["code"] == 0 and st["restarts"] == 0
    wait_dead(main, child, escaped)  # nothing outlives its daemon
    assert inst.state("bystander") == "running"


def test_forking_without_pid_file(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {
            # one process left: it is the main process, no PID file needed
            "one": sh(f'sleep 1000 & echo $! > "{tmp_path}/one"; exit 0', type="forking"),
            # several: which is the main one? ikos refuses to guess
            "many": sh(
                f'sleep 1000 & echo $! >> "{tmp_path}/many"; '
                f'sleep 1001 & echo $! >> "{tmp_path}/many"; exit 0',
                type="forking",
                auto_restart=False,
            ),
        },
    )
    st = inst.wait_state("one", "running")
    assert st["pid"] == read_pid(tmp_path / "one")
    st = inst.wait_state("many", "failed")
    assert "without pid_file left 2 processes: set pid_file" in last_reason(st), st
    wait_dead(*(int(p) for p in (tmp_path / "many").read_text().split()))


# -- the notify socket --------------------------------------------------------------------------

FLOODER = r"""
import os, socket, sys, time
path, stop, count_file = os.environ["NOTIFY_SOCKET"], sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"READY=1\nSTATUS=ready to flood", path)
junk = [b"", b"no equals sign", b"\xff\xfe not utf-8=1", b"A=1\0B=2", b"=empty key",
        b"X" * 5000, b"STATUS=" + b"y" * 70000, b"MAINPID=1", b"MAINPID=-5", b"MAINPID=abc"]
sent, deadline = 0, time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline and sent < 2_000_000:
    for data in junk + [b"STATUS=flood %d" % sent, b"WATCHDOG=1\nSTATUS=flood"]:
        try:
            s.sendto(data, path)
        except OSError:  # EMSGSIZE for the 70 KB one, ENOBUFS/timeout when full
            pass
        sent += 1
    if sent % 1200 == 0:
        with open(count_file + ".tmp", "w") as f:
            f.write(str(sent))
        os.replace(count_file + ".tmp", count_file)  # never seen half-written
"""


@needs_systemd_notify
def test_a_notify_flood_leaves_ikosd_responsive_and_others_unaffected(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    stop, count = tmp_path / "stop", tmp_path / "count"
    inst = start_ikosd(
        ikosd_factory,
        {
            "flood": {
                "executable": sys.executable,
                "args": ["-c", FLOODER, str(stop), str(count)],
                "type": "notify",
                "auto_restart": False,
            },
            "victim": sh(
                "trap 'systemd-notify --ready STATUS=pinged' USR1; "
                "systemd-notify --ready STATUS=fine; "
                "while :; do sleep 1000 & wait $!; done",
                type="notify",
                reload_signal="USR1",
            ),
        },
    )
    try:
        flooder = inst.wait_state("flood", "running")["pid"]
        wait_for(lambda: int(count.read_text() or 0) >= 20_000, 60, message="20000 datagrams")
        # ikosd answers while the flood goes on (bounds on a starved loop, not on speed)
        for _ in range(5):
            t0 = time.monotonic()
            st = inst.status("victim")
            assert time.monotonic() - t0 < HANG
        assert st["state"] == "running" and st["status_text"] == "fine"
        before = int(count.read_text())
        # another daemon still restarts, becomes ready and is heard
        old = st["pid"]
        t0 = time.monotonic()
        inst.ctl("restart", "victim", check=True)
        assert time.monotonic() - t0 < HANG
        new = inst.wait_running_new_pid("victim", old)
        inst.ctl("reload", "victim", check=True)  # SIGUSR1: it answers READY=1 STATUS=pinged
        wait_for(lambda: inst.status("victim")["status_text"] == "pinged")
        assert int(count.read_text()) > before, "the flood went on all along"
        # the flooder's valid STATUS= were heard, its MAINPID=1 and garbage were not
        st = inst.status("flood")
        assert st["state"] == "running" and st["pid"] == flooder
        assert st["status_text"].startswith("flood")
        assert inst.status("victim")["pid"] == new
    finally:
        stop.touch()
    sent = int(count.read_text())
    log = inst.log_text()
    assert "notify socket: dropped" in log
    assert "MAINPID=1 (init) is never a daemon's main process" in log
    # logged, but not once per datagram: a flood must not fill the disk through ikosd's log
    assert log.count("flood: ignored notification") < 200 < sent // 10, sent
    assert len(log) < 1 << 20


@needs_systemd_notify
def test_spoofed_notifications_are_ignored_and_logged(ikosd_factory: Any, tmp_path: Path) -> None:
    other_pid = tmp_path / "other.pid"
    inst = start_ikosd(
        ikosd_factory,
        {
            "other": sh("exec sleep 1000"),
            "liar": sh(
                f"systemd-notify --ready STATUS=honest; {gate(tmp_path / 'go1')}; "
                "systemd-notify MAINPID=1 STATUS=claimed-init; "
                f'{gate(other_pid)}; systemd-notify "MAINPID=$(cat {other_pid})" '
                "STATUS=claimed-other; exec sleep 1000",
                type="notify",
            ),
            "waiting": sh(
                f"{gate(tmp_path / 'never')}",
                type="notify",
                start_timeout=600.0,
                auto_restart=False,
            ),
        },
        wait_ready=False,
    )
    liar = inst.wait_state("liar", "running")["pid"]
    other = inst.wait_state("other", "running")["pid"]

    (tmp_path / "go1").touch()
    wait_for(lambda: inst.status("liar")["status_text"] == "claimed-init")
    assert inst.status("liar")["pid"] == liar  # STATUS= taken, MAINPID=1 not
    wait_for(lambda: "MAINPID=1 (init) is never a daemon's main process" in inst.log_text())

    other_pid.write_text(str(other))
    wait_for(lambda: inst.status("liar")["status_text"] == "claimed-other")
    st = inst.status("liar")
    assert st["pid"] == liar and st["state"] == "running"
    assert inst.status("other")["pid"] == other
    wait_for(lambda: f"MAINPID={other}" in inst.log_text(), message="the refusal logged")

    # a process outside every daemon (this test) cannot make one ready or set its status
    address = str(inst.root / "run" / "ikos" / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\nSTATUS=spoofed", address)
        s.sendto(f"READY=1\nMAINPID={inst.status('waiting')['pid']}".encode(), address)
    wait_for(
        lambda: f"sd_notify from pid {os.getpid()}, which belongs to no daemon" in inst.log_text()
    )
    st = inst.status("waiting")
    assert st["state"] == "starting" and st["status_text"] == ""
    assert all(s.get("status_text") != "spoofed" for s in inst.status())


# -- PID files ----------------------------------------------------------------------------------


def test_pid_file_naming_pid_1_is_refused(ikosd_factory: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "evil.pid"
    inst = start_ikosd(
        ikosd_factory,
        {
            "evil": sh(
                f'sleep 1000 & echo $! > "{tmp_path}/child"; echo 1 > "{pid_file}"; exit 0',
                type="forking",
                pid_file=str(pid_file),
                auto_restart=False,
            ),
            "fine": sh("exec sleep 1000"),
        },
    )
    st = inst.wait_state("evil", "failed")
    assert "names PID 1 (init)" in last_reason(st), st
    assert str(pid_file) in last_reason(st)
    wait_dead(int((tmp_path / "child").read_text()))
    assert alive(1) and inst.state("fine") == "running"


def test_stale_pid_file_is_not_taken_for_the_new_main_process(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    """A PID file left by a dead run: ikos waits for the daemon to write its own.

    The launcher exits before its child writes the PID file, as nginx does
    (``ngx_daemon`` forks and the parent exits at once); systemd waits for
    the file in that case, and so must ikos.
    """
    pid_file = tmp_path / "late.pid"
    never_file = tmp_path / "never.pid"
    stale = dead_pid()
    pid_file.write_text(f"{stale}\n")
    never_file.write_text(f"{stale}\n")
    go = tmp_path / "go"
    inst = start_ikosd(
        ikosd_factory,
        {
            "late": sh(
                f"sh -c '{gate(go)}; echo $$ > \"{pid_file}\"; exec sleep 1000' & exit 0",
                type="forking",
                pid_file=str(pid_file),
                start_timeout=120.0,
            ),
            "never": sh(
                "sleep 1000 & exit 0",
                type="forking",
                pid_file=str(never_file),
                start_timeout=2.0,
                auto_restart=False,
            ),
        },
        wait_ready=False,
    )
    st = inst.wait_state("never", "failed", timeout=60)
    assert str(never_file) in last_reason(st) and f"PID {stale}" in last_reason(st), st
    assert "not running" in last_reason(st)

    # the launcher of "late" has exited; the stale file is not its PID file
    assert inst.state("late") == "starting"
    go.touch()
    st = inst.wait_state("late", "running", timeout=60)
    assert st["pid"] == read_pid(pid_file) != stale
    assert Path(f"/proc/{st['pid']}/cmdline").read_bytes() == b"sleep\x001000\x00"
    wait_for(lambda: "ikosd ready" in inst.log_text())


TALKER = (
    "import os, socket, sys, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
    "[s.sendto(b'STATUS=%s %d' % (sys.argv[1].encode(), n), os.environ['NOTIFY_SOCKET']) "
    "for n in range(200)]; s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); time.sleep(1000)"
)


def test_many_daemons_notifying_at_once_are_each_heard(ikosd_factory: Any) -> None:
    """Twenty daemons whose child process sends 200 STATUS= then READY=1, all at once.

    The sender stays alive: a notification is attributed by its sender's PID,
    looked up when it is read, so a sender that has exited by then is
    nobody's (systemd before SCM_PIDFD had the same limit; systemd-notify
    waits with BARRIER=1 for that reason).
    """
    children = {
        f"talker{i}": sh(
            f'"{sys.executable}" -c "{TALKER}" talker{i} & exec sleep 1000', type="notify"
        )
        for i in range(20)
    }
    inst = start_ikosd(ikosd_factory, children)
    for st in inst.status():
        if st["name"].startswith("talker"):
            assert st["state"] == "running" and st["status_text"] == f"{st['name']} 199", st


@needs_systemd_notify
def test_ready_sent_at_once_after_exec_is_not_lost(ikosd_factory: Any) -> None:
    """Notify daemons whose first act is READY=1, many at once.

    Each may notify before the fork server has told ikosd its PID; such a
    READY=1 must wait for the daemon's handle, not be dropped as nobody's.
    """
    children = {
        f"quick{i}": sh(
            "systemd-notify --ready STATUS=quick; exec sleep 1000",
            type="notify",
            auto_restart=False,
            start_timeout=15.0,
        )
        for i in range(30)
    }
    inst = start_ikosd(ikosd_factory, children)
    states = {st["name"]: st for st in inst.status() if st["name"].startswith("quick")}
    lost = {n: last_reason(st) for n, st in states.items() if st["state"] != "running"}
    assert len(states) == 30 and not lost, lost
    assert "which belongs to no daemon" not in inst.log_text()
