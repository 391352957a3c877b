"""What ikosd keeps per running executable: structural facts, not timings.

A manager of 500 daemons pays every per-daemon object 500 times (issue 12,
docs/performance.md): these tests pin the shape of that bookkeeping. A
running executable is watched by a callback on its main process's exit, not
by a task of its own, and a daemon without a cgroup is reported gone in the turn its exit is seen.
The state store's start time of a process is psutil's, read more cheaply.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

import ikos
from ikos.manager._exec import ExecRuntime
from ikos.manager._logs import DaemonLogs
from ikos.manager._state import _create_time
from ikos.platform._fdstore import FdStore
from ikos.platform._paths import InstancePaths
from ikos.platform._process import process_stamp


def _exec_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("exec")]


async def _run_one(tmp_path: Path) -> None:
    paths = InstancePaths.for_root(tmp_path / "root")
    # an FdStore never opened deposits nothing: no keeper process for this test
    logs = DaemonLogs(paths.log_dir, FdStore(tmp_path / "keeper.sock"))
    forked: list[int] = []
    runtime = ExecRuntime(
        paths,
        None,  # type: ignore[arg-type]  # posix_spawn: the fork server is not used
        logs,
        lambda node, pid, gated: forked.append(pid),
    )
    spec = ikos.Exec("tick", "/bin/sleep", args=["100000"], kill_mode="process-group")
    handle = await runtime.spawn(SimpleNamespace(spec=spec))  # type: ignore[arg-type]
    try:
        # started by posix_spawn, whose return means the exec succeeded: ready at once,
        # with no task at all, not even for the start
        assert handle.ready.done()
        assert handle.task is None
        await asyncio.sleep(0.01)
        # running: no task, no per-daemon asyncio.wait; a callback watches the exit
        assert handle.task is None
        assert _exec_tasks() == []
        assert handle.alive
        assert forked == [handle.pid]
        # a notify future exists only for notify daemons
        assert handle.notify_ready is None
        # its stdout and stderr are read (the readers are slotted objects: _logs)
        assert sorted(r.name for r in logs._readers.values()) == ["tick", "tick"]
        # by one epoll that the loop watches, not by a reader (handle, key) of the loop each
        watched = asyncio.get_running_loop()._selector.get_map()  # type: ignore[attr-defined]
        assert logs._epoll is not None and logs._epoll.fileno() in watched
        assert not set(logs._readers) & set(watched)

        os.kill(handle.pid, signal.SIGKILL)
        status = await asyncio.wait_for(asyncio.shield(handle.exited), 30)
        assert status.signal == signal.SIGKILL
        # no cgroup to empty: no clean-up task was needed to report the exit
        assert _exec_tasks() == []
    finally:
        if handle.alive:
            handle.kill()
            await asyncio.wait_for(asyncio.shield(handle.exited), 30)
        logs.close()


def test_a_running_executable_has_no_task_of_its_own(tmp_path: Path) -> None:
    asyncio.run(_run_one(tmp_path))


def test_the_create_time_written_for_an_earlier_ikos_is_psutils() -> None:
    for pid in (1, os.getpid(), os.getppid()):
        stamp = process_stamp(pid)
        assert stamp is not None
        assert _create_time(stamp) == psutil.Process(pid).create_time()
    assert process_stamp(2**22 + 12345) is None  # above pid_max: no such process
