"""Restarts sent before their exit is recorded (``ExecRuntime.restart_early``).

When a supervisor is sure to restart an executable at once and alone
(``SupervisorNode.restarts_at_once``), ikosd sends the successor's start to
the spawn server first, and records the exit, logs and tells the extensions
while it starts, as runsv does. These tests pin the two halves: the forecast
never promises a restart the supervisor does not make (against the fake host
of ``test_supervisor_host``, over the OTP matrix), and, on real processes in a
real cgroup, the supervisor's start takes the early one, while a start it does
not make is killed, with nothing left (process, cgroup member, descriptor).
The crash-safety half is ``test_crash_recovery``'s kill -9 just after a
restart, run in both kill modes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from test_otp_matrix import EXIT_OF, REASONS, RESTARTS
from test_spawn_server import _fds
from test_supervisor_host import FakeHost, ManualClock, build, run, settle

from ikos.manager._exec import EARLY, ExecHandle, ExecRuntime
from ikos.manager._logs import DaemonLogs
from ikos.platform import _cgexec
from ikos.platform._cgroups import CgroupManager, DaemonCgroup
from ikos.platform._fdstore import FdStore
from ikos.platform._paths import InstancePaths
from ikos.platform._process import ExitStatus
from ikos.supervision._runtime import ExitReason, Node, State, SupervisorNode, WorkerNode
from ikos.supervision._spec import Exec, Supervisor

# -- the forecast, against the supervisor's own decision ---------------------------------


def _reason(reason: str) -> ExitReason:
    exit_of = EXIT_OF["receive" if reason == "on_start" else reason]
    return ExitReason.from_process(ExitStatus(exit_of["code"], exit_of["signal"], 0.0), None)


@pytest.mark.parametrize("reason", REASONS)
@pytest.mark.parametrize("restart", RESTARTS)
@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
def test_the_forecast_is_the_supervisors_decision(strategy: str, restart: str, reason: str) -> None:
    """A forecast of "restarted at once, alone" holds exactly when the supervisor,
    handling the exit, starts the child again with no delay and nothing else."""
    kids = [Exec("a", "/bin/true"), Exec("b", "/bin/true", restart=restart), Exec("c", "/bin/true")]
    spec = Supervisor("sup", strategy, max_restarts=50, within=60, children=kids)

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        b = host.nodes["b"]
        why = _reason(reason)
        forecast = root.restarts_at_once(b, why)
        before = {n: host.starts(n) for n in "abc"}
        exit_of = EXIT_OF["receive" if reason == "on_start" else reason]
        host.current("b").end(exit_of["code"], signal=exit_of["signal"])
        await settle(host, root, timers=False)
        at_once = (
            host.starts("b") == before["b"] + 1
            and host.starts("a") == before["a"]
            and host.starts("c") == before["c"]
            and not root.timers
        )
        assert forecast == at_once
        if (strategy, restart, reason) == ("one_for_one", "permanent", "kill"):
            assert forecast  # not a vacuous match

    run(spec, body)


def test_the_forecast_counts_restarts_foreseen_and_waits_for_the_queue() -> None:
    kids = [Exec("a", "/bin/true"), Exec("b", "/bin/true")]
    spec = Supervisor("sup", "one_for_one", max_restarts=1, within=60, children=kids)
    clock = ManualClock()

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        a, why = host.nodes["a"], _reason("kill")
        assert root.restarts_at_once(a, why)
        # one restart already foreseen (b's) and max_restarts=1: a's would exceed it
        assert not root.restarts_at_once(a, why, pending=1)
        # a command before the exit in the queue may change everything: no forecast
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def blocked() -> None:
            await gate

        root.post(blocked)
        await asyncio.sleep(0)
        assert not root.restarts_at_once(a, why)  # busy with a command
        gate.set_result(None)
        await settle(host, root)
        assert root.restarts_at_once(a, why)
        # after a quick death, the back-off (0.1 s after a run under 1 s) is due
        host.current("a").end(signal=signal.SIGKILL)
        await settle(host, root, timers=False)
        assert host.nodes["a"].state is State.RUNNING
        assert not root.restarts_at_once(a, why)

    run(spec, body, clock)


# -- real processes ----------------------------------------------------------------------

CAN_TRACK = CgroupManager("ikos-probe").describe()["tracking"] != "none"
real = pytest.mark.skipif(not CAN_TRACK, reason="no writable cgroup v2 here")


class RuntimeHost:
    """The manager as the tree sees it, with the real executable runtime."""

    def __init__(self, rt: ExecRuntime) -> None:
        self.rt = rt
        self.log: list[tuple[str, str]] = []
        self.nodes: dict[str, Node] = {}

    async def spawn(self, node: WorkerNode) -> ExecHandle:
        return await self.rt.spawn(node)

    def retire(self, node: WorkerNode) -> None:
        self.rt.retire(node)

    def transition(self, node: Node, old: State, new: State, why: str) -> None:
        self.log.append((node.name, new.value))

    async def before_stop(self, node: WorkerNode) -> None:
        pass

    def root_failed(self, reason: str) -> None:
        pass

    def node_added(self, node: Node) -> None:
        self.nodes[node.name] = node

    def node_removed(self, node: Node) -> None:
        self.nodes.pop(node.name, None)


def _open_fds() -> set[int]:
    return _fds(os.getpid())


def _running(host: RuntimeHost) -> tuple[WorkerNode, ExecHandle, DaemonCgroup]:
    """The daemon's node, its handle and its cgroup, while it runs."""
    d = host.nodes["d"]
    assert isinstance(d, WorkerNode) and isinstance(d.handle, ExecHandle)
    assert d.handle.cgroup is not None
    return d, d.handle, d.handle.cgroup


async def _until(condition: Callable[[], object], what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _with_runtime(
    tmp_path: Path,
    body: Callable[[RuntimeHost, SupervisorNode, ExecRuntime], Awaitable[None]],
    program: str = "/bin/sleep",
) -> None:
    helper = _cgexec.build()
    if helper is None:
        pytest.skip("no C compiler to build the spawn helper")

    async def main() -> None:
        paths = InstancePaths.for_root(tmp_path / "root")
        # an FdStore never opened deposits nothing: no keeper process for this test
        logs = DaemonLogs(paths.log_dir, FdStore(tmp_path / "keeper.sock"))
        rt = ExecRuntime(paths, None, logs, lambda node, pid, gated: None)  # type: ignore[arg-type]
        rt.spawn_helper = helper
        host = RuntimeHost(rt)
        spec = Supervisor(
            "sup",
            "one_for_one",
            max_restarts=100,
            within=1,
            children=[Exec("d", program, args=["100021"])],
        )
        root = build(spec, host)  # type: ignore[arg-type]  # any Host will do
        try:
            await root.start()
            await body(host, root, rt)
        finally:
            await root.call(functools.partial(root.stop_child, host.nodes["d"]))
            root.close()
            rt.close()
            logs.close()

    asyncio.run(main())


@real
def test_an_early_restart_is_the_one_the_supervisor_starts(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        assert cgroup.pids() == {first}
        fds = _open_fds()
        os.kill(first, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, first), "the restart")
        handle = d.handle
        assert isinstance(handle, ExecHandle)
        assert handle.started_by == EARLY
        assert handle.cgroup is cgroup and cgroup.pids() == {handle.pid}  # its emptied cgroup
        assert d.restarts == 1 and rt._early == {}
        # the exit is recorded before the start, as the supervisor decided them
        assert host.log[-3:] == [("d", "failed"), ("d", "starting"), ("d", "running")]
        # the old pipes closed at their EOF, the two new ones read
        assert len(_open_fds()) == len(fds)
        assert sorted(r.name for r in rt.logs._readers.values()) == ["d", "d"]
        # a second death within a second: the back-off is due, no early start
        os.kill(handle.pid, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, handle.pid), "the delayed restart")
        assert isinstance(d.handle, ExecHandle) and d.handle.started_by == "cgexec-server"

    _with_runtime(tmp_path, body)


@real
def test_an_early_restart_the_supervisor_does_not_make_is_killed(tmp_path: Path) -> None:
    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        d, handle, cgroup = _running(host)
        first = handle.pid
        # without the pipes and the pidfd of the run that ends
        fds = _open_fds() - set(rt.logs._readers) - {handle.proc.pidfd}
        sent: list[asyncio.Future[tuple[int | None, str]]] = []
        stopped: list[asyncio.Future[None]] = []
        send = rt.restart_early

        def restart_early(
            handle: ExecHandle, status: ExitStatus
        ) -> asyncio.Future[tuple[int | None, str]] | None:
            # the early start is sent from the exit's callback, before the tree hears of
            # it; an operator's stop queued now reaches the supervisor before the exit
            reply = send(handle, status)
            assert reply is not None
            sent.append(reply)
            stop = functools.partial(root.stop_child, d)
            stopped.append(asyncio.ensure_future(root.call(stop)))
            return reply

        rt.restart_early = restart_early  # type: ignore[method-assign]
        os.kill(first, signal.SIGKILL)
        await _until(lambda: stopped, "the early start")
        pid, _ = await asyncio.shield(sent[0])
        assert pid is not None and pid != first
        await stopped[0]
        await settle_queue(root)
        assert d.state is State.STOPPED and d.handle is None and rt._early == {}
        await _until(lambda: not os.path.exists(f"/proc/{pid}"), "the early start killed")
        assert cgroup.pids() == set()
        assert _open_fds() == fds  # nothing of either run left open
        assert ("d", "starting") not in host.log[-3:]

    _with_runtime(tmp_path, body)


async def settle_queue(root: SupervisorNode) -> None:
    async def noop() -> None:
        return None

    for _ in range(3):  # the exit, then the check queued behind it
        await root.call(noop)


@real
def test_the_keeper_keeps_the_old_pipes_only_for_the_successors_to_replace(
    tmp_path: Path,
) -> None:
    """The keeper's `put` replaces a stream's pipe: an early restart drops nothing of the
    run that ended, except a stream the successor has no pipe for."""

    async def body(host: RuntimeHost, root: SupervisorNode, rt: ExecRuntime) -> None:
        released: list[tuple[str, tuple[str, ...]]] = []
        rt.logs.release = lambda name, streams=("stdout", "stderr"): released.append(  # type: ignore[method-assign]
            (name, tuple(streams))
        )
        d, handle, _ = _running(host)
        os.kill(handle.pid, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, handle.pid), "the restart")
        second = d.handle
        assert isinstance(second, ExecHandle) and second.started_by == EARLY
        assert released == []  # both streams replaced by the successor's pipes
        # the spec changes (a reload would): stdout no longer goes to the log
        d.spec = dataclasses.replace(d.spec, stdout="null")
        host.nodes["d"].backoff = host.nodes["d"].backoff.started(-10.0)  # ran long enough
        os.kill(second.pid, signal.SIGKILL)
        await _until(lambda: d.pid not in (None, second.pid), "the second restart")
        assert isinstance(d.handle, ExecHandle) and d.handle.started_by == EARLY
        assert released == [("d", ("stdout",))]
        assert [r.name for r in rt.logs._readers.values()] == ["d"]  # stderr only

    _with_runtime(tmp_path, body)
