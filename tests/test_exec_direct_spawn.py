"""kill_mode = "process-group": executables started by posix_spawn, stopped by session."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from conftest import wait_for

TREE = """
import ikos
tree = ikos.Supervisor("root", max_restarts=100, within=1, children=[
    ikos.Exec("fast", "/bin/sleep", args=["100000"], kill_mode="process-group"),
    ikos.Exec("family", "/bin/sh", kill_mode="process-group",
              args=["-c", "sleep 100001 & sleep 100002 & wait"]),
])
"""


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_direct_spawn_restart_and_group_stop(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = ikosd_factory(tree=TREE)
    fast = inst.wait_state("fast", "running")["pid"]
    # started by ikosd itself (posix_spawn), not through the fork server's double fork
    assert _ppid(fast) == inst.pid
    assert os.getsid(fast) == fast
    os.kill(fast, signal.SIGKILL)
    new = inst.wait_running_new_pid("fast", fast)
    assert _ppid(new) == inst.pid
    family = inst.wait_state("family", "running")["pid"]
    kids = wait_for(
        lambda: (
            [
                int(p)
                for p in os.listdir("/proc")
                if p.isdigit() and int(p) != family and _safe_sid(int(p)) == family
            ]
            if len([p for p in os.listdir("/proc") if p.isdigit() and _safe_sid(int(p)) == family])
            >= 3
            else None
        ),
        message="the family's two children",
    )
    inst.ctl("stop", "family", check=True)
    inst.wait_state("family", "stopped")
    wait_for(lambda: not any(_alive(p) for p in [family, *kids]), message="the whole session gone")
    # (a bad kill_mode is refused by ikos.Exec itself: tests/test_spawn.py BAD_VALUES)
    assert inst.terminate() == 0
    assert inst.leftovers() == []


def _safe_sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1
