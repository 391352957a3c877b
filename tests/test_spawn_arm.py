"""Restarts armed in the spawn server (``ExecRuntime.arm_soon``), as runsv restarts.

Once a run has lived past the restart spacing and its supervisor foresees
that any end of it would be restarted at once and alone, ikosd hands the
spawn server the daemon's pidfd and its start: the server starts the
successor the moment the run ends, with no turn of ikosd's loop in between,
and ikosd takes it as a restart sent early (the supervisor still decides; a
start it does not take is killed). These tests run real processes in real
cgroups: the armed start is the one the supervisor takes; ikosd's own stop
disarms it before its signal, so no successor is ever started; a start the
supervisor does not take is killed; a cgroup with processes left is not
restarted into; an exec that fails is reported, its zombie kept from the
orphan reaper; the server refuses garbage and stays up. Nothing is left:
process, cgroup member, descriptor.
"""

from __future__ import annotations

import array
import asyncio
import functools
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
from test_early_restart import (
    RuntimeHost,
    _open_fds,
    _running,
    _until,
    _with_runtime,
    real,
    settle_queue,
)

from ikos.manager._exec import ARMED, EARLY, ExecHandle, ExecRuntime
from ikos.platform import _cgexec
from ikos.platform._process import reap_orphans
from ikos.supervision._runtime import State, SupervisorNode


async def _armed(handle: ExecHandle) -> int:
    """Wait until ``handle``'s restart is armed; the arm's number."""
    await _until(lambda: handle._armed is not None, "the arm")
    assert handle._armed is not None
    return handle._armed[1]


@real
def test_an_armed_restart_is_the_one_the_supervisor_takes(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        await _armed(handle)
        fds = _open_fds()
        os.kill(first, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, first), "the restart")
        second = d.handle
        assert isinstance(second, ExecHandle) and second.started_by == ARMED
        assert second.cgroup is cgroup and cgroup.pids() == {second.pid}
        assert d.restarts == 1 and rt._early == {} and rt._armed == {}
        assert host.log[-3:] == [("d", "failed"), ("d", "starting"), ("d", "running")]
        # the old run's pipes and pidfd closed, the two new pipes read
        await _until(lambda: len(_open_fds()) == len(fds), "the old run's descriptors closed")
        assert sorted(r.name for r in rt.logs._readers.values()) == ["d", "d"]
        # the successor is armed in its turn, once it has run long enough (the harness's
        # clock stands still: the run is made older), and restarted the same way
        d.backoff = d.backoff.started(-10.0)
        await _armed(second)
        os.kill(second.pid, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, second.pid), "the second restart")
        assert isinstance(d.handle, ExecHandle) and d.handle.started_by == ARMED
        assert d.restarts == 2

    _with_runtime(tmp_path, body)


@real
def test_a_stop_disarms_before_its_signal(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        await _armed(handle)
        assert handle._armed is not None
        ended = handle._armed[2]
        server = rt.spawn_server
        assert server is not None
        spawned: list[str] = []
        news = server._armed_news
        server._armed_news = lambda word, rest, fds: (spawned.append(word), news(word, rest, fds))  # type: ignore[method-assign, func-returns-value]
        await root.call(functools.partial(root.stop_child, d))
        assert d.state is State.STOPPED and d.handle is None
        assert ended.done() and ended.result() is None  # skipped: nothing started
        assert spawned == ["skip"] and cgroup.pids() == set() and rt._armed == {}

    _with_runtime(tmp_path, body)


@real
def test_an_armed_restart_the_supervisor_does_not_make_is_killed(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        await _armed(handle)
        fds = _open_fds() - set(rt.logs._readers) - {handle.proc.pidfd}
        taken: list[int] = []
        stopped: list[asyncio.Future[None]] = []
        take = rt.take_armed

        def take_armed(handle: ExecHandle, pid: int | None, error: str, got: list[int]) -> bool:
            # the daemon died on its own and the server restarted it; an operator's stop
            # queued now reaches the supervisor before the exit
            assert pid is not None
            taken.append(pid)
            stopped.append(asyncio.ensure_future(root.call(functools.partial(root.stop_child, d))))
            return take(handle, pid, error, got)

        rt.take_armed = take_armed  # type: ignore[method-assign]
        os.kill(first, signal.SIGKILL)
        await _until(lambda: stopped, "the armed start")
        await stopped[0]
        await settle_queue(root)
        # the exit reached the supervisor before the stop (failed), or after it (stopped)
        assert d.state in (State.STOPPED, State.FAILED) and d.handle is None
        assert rt._early == {}
        await _until(lambda: not os.path.exists(f"/proc/{taken[0]}"), "the armed start killed")
        assert cgroup.pids() == set()
        assert _open_fds() == fds  # nothing of either run left open
        assert ("d", "starting") not in host.log[-3:]

    _with_runtime(tmp_path, body)


@real
def test_no_armed_restart_into_a_cgroup_with_processes_left(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        await _armed(handle)
        # a process the daemon left behind (it joins the daemon's cgroup as a fork would)
        stray = await asyncio.create_subprocess_exec("/bin/sleep", "100022")
        with open(os.path.join(cgroup.v2_only or "", "cgroup.procs"), "w") as f:
            f.write(str(stray.pid))
        assert cgroup.pids() == {first, stray.pid}
        os.kill(first, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, first), "the restart")
        assert await stray.wait() == -signal.SIGKILL  # what it left was killed, then reaped
        assert isinstance(d.handle, ExecHandle) and d.handle.started_by not in (ARMED, EARLY)
        assert d.handle.cgroup is not None and d.handle.cgroup.pids() == {d.handle.pid}

    _with_runtime(tmp_path, body)


@real
def test_an_armed_restart_whose_exec_fails_is_reported_and_reaped(tmp_path: Path) -> None:
    program = tmp_path / "sleeper"
    shutil.copy("/bin/sleep", program)

    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        await _armed(handle)
        program.unlink()
        reaped: list[list[int]] = []
        take = rt.take_armed

        def take_armed(handle: ExecHandle, pid: int | None, error: str, got: list[int]) -> bool:
            assert pid is not None and "executable" in error
            # the failed successor is our child: the orphan reaper must leave its status
            reaped.append(reap_orphans()[0])
            return take(handle, pid, error, got)

        rt.take_armed = take_armed  # type: ignore[method-assign]
        os.kill(first, signal.SIGKILL)
        await _until(lambda: reaped, "the armed start")
        await _until(lambda: d.state is not State.RUNNING or d.pid != first, "the failed start")
        await settle_queue(root)
        assert reaped == [[]]
        assert cgroup.pids() == set()
        assert not [p for p in _children() if _state(p) == "Z"]  # no zombie left

    _with_runtime(tmp_path, body, program=str(program))


def _children() -> list[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return [int(p) for p in f.read().split()]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


@pytest.mark.parametrize(
    "message",
    [
        b"arm\0",
        b"arm\0x\0",
        b"arm\0 7\0 0\0 1\0 0\0",
        b"disarm\0",
        b"disarm\0 99\0",
    ],
)
def test_the_server_refuses_a_malformed_arm_and_serves_on(message: bytes) -> None:
    helper = _cgexec.build()
    if helper is None:
        pytest.skip("no C compiler to build the spawn helper")

    async def main() -> None:
        server = _cgexec.SpawnServer(helper)
        sock = server._sock or server._start()
        try:
            sock.send(message)
            # the server answers the next request as ever (no fd: a malformed request)
            sock.send(b"1\0/bin/true\0true\0")
            pid, error = await server.reply(server._sent())
            assert (pid, error) == (None, "request: malformed spawn request")
            assert server.usable and server._arms == {}
        finally:
            server.close()

    asyncio.run(main())


@real
def test_a_dead_server_ends_its_arms_and_the_restart_comes_from_ikosd(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        await _armed(handle)
        assert handle._armed is not None
        ended = handle._armed[2]
        server = rt.spawn_server
        assert server is not None and server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        # its socket's EOF: no restart will come from it, and ikosd watches the pidfd again
        await _until(lambda: not server.usable, "the server given up")
        assert ended.result() is None and handle._armed is None
        os.kill(first, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, first), "the restart")
        assert isinstance(d.handle, ExecHandle) and d.handle.started_by not in (ARMED, EARLY)
        assert cgroup.pids() == {d.handle.pid} and rt._armed == {}

    _with_runtime(tmp_path, body)


@real
def test_a_signal_that_does_not_end_the_daemon_disarms_until_it_is_armed_again(
    tmp_path: Path,
) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, _ = _running(host)
        first = await _armed(handle)
        assert handle.send_signal(signal.SIGCONT)  # ikosd's own signal: disarmed first
        await _until(lambda: handle._armed is None, "the disarm's skip")
        assert handle.alive and rt._armed == {}
        again = await _armed(handle)  # armed anew after the spacing
        assert again != first and handle._arms_sent == 2
        os.kill(handle.pid, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, handle.pid), "the restart")
        assert isinstance(d.handle, ExecHandle) and d.handle.started_by == ARMED

    _with_runtime(tmp_path, body)


def test_the_server_refuses_an_arm_whose_counts_exceed_the_message() -> None:
    helper = _cgexec.build()
    if helper is None:
        pytest.skip("no C compiler to build the spawn helper")

    async def main() -> None:
        server = _cgexec.SpawnServer(helper)
        sock = server._sock or server._start()
        pidfd = os.pidfd_open(os.getpid())
        root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            for number, argc, unique in ((8, 2**63 - 1, 1), (9, 1, 2**63 - 1), (10, 5, 0)):
                ended: asyncio.Future[_cgexec.Restarted] = (
                    asyncio.get_running_loop().create_future()
                )
                server._arms[number] = ended
                fields = ["arm", str(number), "3", str(argc), str(unique), "/bin/true", "true"]
                payload = "\0".join(fields).encode() + b"\0"
                rights = [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd, root, null]))
                ]
                sock.sendmsg([payload], rights)
                # refused ("skip"), not kept with a count that reads past its strings
                assert await asyncio.wait_for(ended, 10) is None
            assert (
                server.usable and server.pid is not None and os.path.exists(f"/proc/{server.pid}")
            )
        finally:
            for fd in (pidfd, root, null):
                os.close(fd)
            server.close()

    asyncio.run(main())
