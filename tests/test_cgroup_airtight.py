"""kill_mode = "control-group" is airtight on both start paths.

The fast path posix_spawns the compiled trampoline of ikos.platform._cgexec,
which joins the daemon's cgroup before exec; the fallback (no compiler,
or ``IKOS_SPAWN_HELPER=off``) forks through the fork server. Either way a
process that forks and leaves the daemon's session (setsid, double fork)
is in the daemon's cgroup from its first instruction, and is stopped with it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from ikos.platform import _cgexec
from ikos.platform._cgroups import CgroupManager

CAN_TRACK = CgroupManager("ikos-probe").describe()["tracking"] != "none"
pytestmark = pytest.mark.skipif(
    not CAN_TRACK, reason="no writable cgroup v2 here: control-group mode cannot track"
)

TREE = """
import ikos
tree = ikos.Supervisor("root", max_restarts=100, within=1, children=[
    ikos.Exec("escaper", "/bin/sh", args=["-c", {script!r}]),
    ikos.Exec("broken", {broken!r}, restart="temporary"),
])
"""
# the subshell forks a child that starts its own session, then exits at once: the
# escaped process is re-parented and belongs to no session of the daemon's
ESCAPE = (
    "(setsid sh -c 'echo $$ > {out}.tmp; mv {out}.tmp {out}; exec sleep 100006' &); "
    "exec sleep 100005"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(params=["cgexec-server", "cgexec", "fork-server"])
def spawn_path(request: pytest.FixtureRequest) -> str:
    if request.param != "fork-server" and _cgexec.build() is None:
        pytest.skip("no C compiler to build the spawn helper")
    return str(request.param)


def test_a_daemon_escaping_into_a_new_session_is_still_stopped(
    ikosd_factory: Any, tmp_path: Path, spawn_path: str
) -> None:
    out = tmp_path / "escaped.pid"
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    env = {
        "cgexec-server": {},
        "cgexec": {"IKOS_SPAWN_SERVER": "off"},
        "fork-server": {"IKOS_SPAWN_HELPER": "off"},
    }[spawn_path]
    inst = ikosd_factory(
        tree=TREE.format(script=ESCAPE.format(out=out), broken=str(broken)), env=env
    )
    st = inst.wait_state("escaper", "running")
    main = st["pid"]
    assert st["started_by"] == st_path(spawn_path)
    escaped = wait_for(lambda: out.exists() and int(out.read_text()), message="the escaped pid")
    assert os.getsid(escaped) == escaped != os.getsid(main)
    # in the daemon's cgroup, as the main process is: it never ran outside it
    cgroup = Path(f"/proc/{main}/cgroup").read_text().splitlines()[-1]
    assert cgroup.endswith("/escaper.service"), cgroup
    assert Path(f"/proc/{escaped}/cgroup").read_text().splitlines()[-1] == cgroup

    # a failed exec is reported on either path, naming the field and the file
    st = wait_for(
        lambda: (s := inst.status("broken"))["state"] in ("stopped", "failed") and s,
        message="the broken daemon to end",
    )
    reason = st["last_exit"]["reason"]
    assert "executable" in reason and f"No such file or directory: {broken}" in reason, st

    inst.ctl("stop", "escaper", check=True)
    inst.wait_state("escaper", "stopped")
    wait_for(lambda: not _alive(main) and not _alive(escaped), message="the whole daemon gone")

    # and a restart after SIGKILL takes the same path again
    inst.ctl("start", "escaper", check=True)
    first = inst.wait_state("escaper", "running")["pid"]
    os.kill(first, signal.SIGKILL)
    inst.wait_running_new_pid("escaper", first)
    assert inst.status("escaper")["started_by"] == st_path(spawn_path)
    assert inst.terminate() == 0
    assert inst.leftovers() == []


def st_path(spawn_path: str) -> str:
    return {"cgexec-server": "cgexec-server", "cgexec": "posix_spawn+cgexec"}.get(
        spawn_path, spawn_path
    )


def _cgroup_dir(pid: int) -> Path:
    relative = Path(f"/proc/{pid}/cgroup").read_text().splitlines()[-1].split("::", 1)[1]
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    root = next(m[1] for m in mounts if m[2] == "cgroup2")
    return Path(root + relative)


def test_a_daemon_keeps_its_cgroup_directory_until_it_is_removed(ikosd_factory: Any) -> None:
    if _cgexec.build() is None:
        pytest.skip("no C compiler to build the spawn helper")
    inst = ikosd_factory(config=CONFIG + PLAIN)
    first = inst.wait_state("plain", "running")["pid"]
    assert inst.status("plain")["started_by"] == "cgexec-server"
    directory = _cgroup_dir(first)
    assert directory.name == "plain.service"
    inode = directory.stat().st_ino
    os.kill(first, signal.SIGKILL)
    second = inst.wait_running_new_pid("plain", first)
    # the same directory (a new one would have a new inode): no rmdir and mkdir per start
    assert _cgroup_dir(second) == directory and directory.stat().st_ino == inode
    inst.ctl("stop", "plain", check=True)
    inst.wait_state("plain", "stopped")
    assert directory.stat().st_ino == inode  # kept for the next start
    inst.ctl("start", "plain", check=True)
    third = inst.wait_state("plain", "running")["pid"]
    assert _cgroup_dir(third) == directory and directory.stat().st_ino == inode
    # removed from the configuration: its directory goes with it
    (inst.root.parent / "ikos.toml").write_text(CONFIG)
    res = inst.ctl("reload-config")
    assert (res.returncode, res.stdout) == (0, "removed: plain\n"), res.stderr
    wait_for(lambda: not directory.exists(), message="the removed daemon's cgroup removed")
    assert inst.terminate() == 0
    assert inst.leftovers() == []


CONFIG = """
[ikosd]
metrics = false
[executables.other]
executable = "/bin/sleep"
args = ["100014"]
"""
PLAIN = """
[executables.plain]
executable = "/bin/sleep"
args = ["100007"]
"""
