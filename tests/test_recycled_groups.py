"""No signal to a recycled process group (issue 14, item 7).

A forking daemon's launcher exits at start (nginx's does), and the daemon's
main process calls ``setsid``: from then on no process has the launcher's
session number, and the kernel may give it to any new process. ikos used to
``killpg`` that number when the daemon stopped, killing whoever had it by
then. The test makes the recycling certain instead of unlikely: ikosd runs as
PID 1 of a PID namespace of its own, where PIDs are handed out in order and
``ns_last_pid`` says which comes next, and a bystander is started with the
launcher's old PID as the leader of its own session, before the daemon is
stopped. The bystander must survive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import IKOSCTL, IKOSD, REPO, alive, kill_marked, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, unshare and nsenter (a PID namespace of its own)",
)

TREE = """
import ikos

tree = ikos.Supervisor("root", children=[ikos.Exec(
    "forker",
    "/bin/sh",
    args=["-c", "echo $$ > {launcher}; setsid sleep 1000 </dev/null >/dev/null 2>&1 & "
                "echo $! > {pid_file}"],
    type="forking",
    pid_file="{pid_file}",
)])
"""

#: Run inside ikosd's PID namespace: start a bystander with PID ``argv[1]``.
BYSTANDER = """
import os, signal, sys, time
target, note = int(sys.argv[1]), sys.argv[2]
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(target - 1))
pid = os.fork()
if pid == 0:
    os.setsid()  # the leader of session and group number `target`
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    def hit(sig, frame):
        open(note, "w").write(f"got signal {sig}")
        os._exit(1)
    signal.signal(signal.SIGTERM, hit)
    signal.signal(signal.SIGHUP, hit)
    while True:
        time.sleep(1)
print(pid, flush=True)
"""


def test_a_stopped_forking_daemon_never_signals_its_launchers_recycled_session(
    tmp_path: Path,
) -> None:
    launcher, pid_file = tmp_path / "launcher.pid", tmp_path / "forker.pid"
    (tmp_path / "t.py").write_text(
        textwrap.dedent(TREE.format(launcher=launcher, pid_file=pid_file))
    )
    root = tmp_path / "root"
    mark = uuid.uuid4().hex
    env = {**os.environ, "IKOS_TEST_MARK": mark, "PYTHONPATH": str(REPO)}
    out = open(tmp_path / "ikosd.out", "wb")  # noqa: SIM115 - closed below
    ns = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", IKOSD,
         "--root", str(root), "--tree", f"{tmp_path / 't.py'}:tree", "--metrics", "off",
         "--log-level", "debug"],
        env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    out.close()

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [IKOSCTL, "--root", str(root), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def state() -> str:
        res = ctl("--json", "status", "forker")
        return str(json.loads(res.stdout)[0]["state"]) if res.returncode in (0, 3) else ""

    bystander = None
    try:
        wait_for(lambda: state() == "running", 60, message="the forking daemon running")
        session = int(launcher.read_text())  # the launcher's PID in the namespace: reaped
        (ikosd,) = [
            p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _ppid(p) == ns.pid
        ]
        note = tmp_path / "bystander.note"
        res = subprocess.run(
            ["nsenter", "-t", str(ikosd), "-p", "-m", "--", sys.executable, "-c", BYSTANDER,
             str(session), str(note)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert int(res.stdout) == session, "the bystander did not get the recycled number"
        bystander = _host_pid(ikosd, session)
        assert bystander is not None and alive(bystander)
        ctl("stop", "forker")
        wait_for(lambda: state() == "stopped", 30)
        ctl("kill", "-s", "HUP", "forker")  # nothing runs: must not reach the bystander either
        assert alive(bystander), "the bystander in the recycled session was killed"
        assert not note.exists(), note.read_text()
    finally:
        if bystander is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(bystander, signal.SIGKILL)
        if ns.poll() is None:
            ikosd_pids = [
                p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _ppid(p) == ns.pid
            ]
            for p in ikosd_pids:
                os.kill(p, signal.SIGTERM)
            try:
                ns.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ns.kill()
                ns.wait()
        kill_marked(mark)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _host_pid(ns_init: int, ns_pid: int) -> int | None:
    """The PID, as this namespace sees it, of process ``ns_pid`` of ``ns_init``'s namespace."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    ids = [int(x) for x in line.split()[1:]]
                    if len(ids) == 2 and ids[1] == ns_pid and _in_ns_of(int(entry), ns_init):
                        return int(entry)
    return None


def _in_ns_of(pid: int, other: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{other}/ns/pid")
    except OSError:
        return False
