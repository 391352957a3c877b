"""Starting an external executable through the fork server.

The plan (user, limits, stdio, environment...) is built and validated in
the manager by ``ikos.platform._spawn.build_exec_plan``, so that a bad field
is a clear error naming the daemon and the field before anything forks;
the fork server's child then only carries it out (``exec_in_child``) and
reports a failure on a CLOEXEC pipe, whose silent EOF means the exec
succeeded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NoReturn

from ikos.platform._process import ProcessHandle
from ikos.platform._spawn import ExecPlan, build_exec_plan, exec_in_child
from ikos.supervision._spec import Exec

if TYPE_CHECKING:
    from ikos.manager._manager import Manager

EXEC_ENTRY = "ikos.manager._execspawn:exec_entry"


def exec_entry(payload: tuple[ExecPlan, dict[int, int]], fds: list[int]) -> NoReturn:
    """Fork-server entry: ``fds[0]`` is the error pipe, the others the stdio targets."""
    plan, stdio_index = payload
    # descriptors received over SCM_RIGHTS are inheritable: the error pipe must
    # close on exec, or the manager would never see the EOF that means success
    os.set_inheritable(fds[0], False)
    stdio = {target: fds[index] for target, index in stdio_index.items()}
    exec_in_child(plan, stdio, (), fds[0])


async def spawn_exec(manager: Manager, spec: Exec) -> ProcessHandle:
    """Start ``spec``'s executable; the handle is ready once the exec succeeded."""
    plan = build_exec_plan(spec, manager.paths)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    fds = [err_w]
    stdio_index: dict[int, int] = {}
    opened: list[int] = []
    try:
        for target, std in ((1, plan.stdout), (2, plan.stderr)):
            if std.mode == "log":
                manager.paths.log_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(
                    manager.paths.log_dir / f"{spec.name}.log",
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                    0o640,
                )
                opened.append(fd)
                stdio_index[target] = len(fds)
                fds.append(fd)
        payload: Any = (plan, stdio_index)
        pid = await manager.forkserver.spawn(spec.name, EXEC_ENTRY, payload, fds)
    except BaseException:
        os.close(err_r)
        raise
    finally:
        os.close(err_w)
        for fd in opened:
            os.close(fd)
    return ProcessHandle(pid, status_fd=err_r, exec_pipe=True)
