"""The supervisor's logic against a fake, in-process Host: fast and deterministic.

The real-process tests (``test_otp_matrix.py``, ``test_escalation.py``,
``test_shutdown.py``) show that the tree works with the kernel; these show
the tree's rules on their own. :class:`FakeHost` is the manager as the tree
sees it: ``spawn`` returns a :class:`FakeProcess` (a ``Running`` handle whose
``ready`` and ``exited`` futures the test resolves) and every transition,
signal, retirement and root failure is recorded. Nothing forks.

Waiting is through the supervisors' own command queues: :func:`settle`
queues a no-op on every supervisor until a whole pass changes nothing, so
every exit, restart and escalation posted before it has been handled.
Restart intensity runs on a :class:`ManualClock` the test advances. The only
real time is the loop's, for back-off delays and shutdown timeouts, kept to
a few milliseconds and only ever checked from below.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from test_otp_matrix import EXIT_OF, REASONS, RESTARTS, STRATEGIES, expected

import ikos.supervision._runtime as runtime
from ikos._errors import IkosError, SpawnError
from ikos.platform._process import ExitStatus
from ikos.registry._graph import check_graph, start_order, start_waves
from ikos.supervision._runtime import (
    TRANSITIONS,
    ExitReason,
    IllegalTransition,
    Node,
    StartFailed,
    State,
    SupervisorNode,
    WorkerNode,
    should_restart_spec,
)
from ikos.supervision._spec import AnySpec, Backoff, Child, Exec, Supervisor

ACTOR = "fake:Actor"  # never imported: the fake host spawns nothing
REPO = Path(__file__).resolve().parent.parent
#: The states a child goes through from boot to its first crash and restart.
CRASHED_AND_RESTARTED = ["stopped", "starting", "running", "failed", "starting", "running"]


class ManualClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """A ``Running`` handle whose life the test decides.

    A SIGTERM (or any signal but SIGKILL) ends it as the signal would, or
    with ``term_code`` when given (a daemon that exits cleanly on SIGTERM);
    a ``stubborn`` one ignores everything but SIGKILL.
    """

    def __init__(
        self, host: FakeHost, name: str, pid: int, *, stubborn: bool, term_code: int | None
    ) -> None:
        loop = asyncio.get_running_loop()
        self.host, self.name, self.pid = host, name, pid
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self.stubborn, self.term_code = stubborn, term_code
        self.event: dict[str, Any] | None = None
        self.spawned_at = loop.time()

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def send_signal(self, sig: int) -> bool:
        if not self.alive:
            return False
        self.host.signals.append((self.name, signal.Signals(sig).name))
        if sig == signal.SIGKILL:
            self.end(signal=sig)
        elif not self.stubborn:
            self.end(self.term_code, signal=None if self.term_code is not None else sig)
        return True

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)

    def exit_event(self) -> dict[str, Any] | None:
        return self.event

    def end(self, code: int | None = None, *, signal: int | None = None) -> None:
        """The process exits (``code``) or dies of ``signal``."""
        self.exited.set_result(ExitStatus(code, signal, time.time()))


class FakeHost:
    """The manager as the tree sees it, recording everything.

    ``scripts[name]`` lists what the next spawns of ``name`` do: ``"ready"``
    (the default), ``"crash"`` (exits with status 2 before ready, as an
    ``on_start`` that raises), ``"refuse"`` (spawn raises), ``"hang"`` (never
    ready until the test resolves it), ``"stubborn"`` (ready, ignores
    SIGTERM) or ``"clean"`` (ready, exits 0 on SIGTERM).
    """

    def __init__(self) -> None:
        self.procs: defaultdict[str, list[FakeProcess]] = defaultdict(list)
        self.log: list[tuple[str, str, str, str]] = []
        self.signals: list[tuple[str, str]] = []
        self.retired: list[str] = []
        self.root_failures: list[str] = []
        self.nodes: dict[str, Node] = {}
        self.scripts: dict[str, list[str]] = {}
        self._pid = 1000
        #: When set, spawns wait for it (counted in ``spawning``, its peak in ``most_spawning``).
        self.spawn_gate: asyncio.Event | None = None
        self.spawning = self.most_spawning = 0

    async def spawn(self, node: WorkerNode) -> FakeProcess:
        if self.spawn_gate is not None:
            self.spawning += 1
            self.most_spawning = max(self.most_spawning, self.spawning)
            try:
                await self.spawn_gate.wait()
            finally:
                self.spawning -= 1
        plan = self.scripts.get(node.name)
        outcome = plan.pop(0) if plan else "ready"
        if outcome == "refuse":
            raise SpawnError(node.name, None, "refused by the test")
        if outcome == "bug":
            raise RuntimeError(f"{node.name}: a bug in the host")
        self._pid += 1
        proc = FakeProcess(
            self,
            node.name,
            self._pid,
            stubborn=outcome == "stubborn",
            term_code=0 if outcome == "clean" else None,
        )
        self.procs[node.name].append(proc)
        if outcome == "crash":
            proc.event = {"event": "exit", "reason": "on_start failed"}
            proc.end(2)
        elif outcome != "hang":
            proc.ready.set_result({"event": "ready", "pid": proc.pid})
        return proc

    def retire(self, node: WorkerNode) -> None:
        self.retired.append(node.name)

    async def before_stop(self, node: WorkerNode) -> None:
        pass

    def transition(self, node: Node, old: State, new: State, why: str) -> None:
        self.log.append((node.name, old.value, new.value, why))

    def root_failed(self, reason: str) -> None:
        self.root_failures.append(reason)

    def node_added(self, node: Node) -> None:
        self.nodes[node.name] = node

    def node_removed(self, node: Node) -> None:
        self.nodes.pop(node.name, None)

    # -- reading what happened --------------------------------------------------

    def starts(self, name: str) -> int:
        return len(self.procs[name])

    def current(self, name: str) -> FakeProcess:
        return self.procs[name][-1]

    def states(self, name: str) -> list[str]:
        """``name``'s states in order, from its first transition's old state."""
        moves = [(old, new) for n, old, new, _ in self.log if n == name]
        return [moves[0][0], *(new for _, new in moves)] if moves else []


def build(spec: Supervisor, host: FakeHost, clock: ManualClock | None = None) -> SupervisorNode:
    """The running tree of ``spec``, ordered by the dependency graph as ikosd orders it."""
    graph = check_graph(spec)
    root = SupervisorNode(
        spec,
        None,
        host,
        lambda s: start_order(s, graph),
        lambda s: start_waves(s, graph),
        clock=clock or ManualClock(),
    )
    host.node_added(root)
    return root


def run(
    spec: Supervisor,
    body: Callable[[FakeHost, SupervisorNode], Awaitable[None]],
    clock: ManualClock | None = None,
) -> FakeHost:
    """Run ``body(host, root)`` in a fresh loop; the root is built but not started."""
    host = FakeHost()

    async def main() -> None:
        root = build(spec, host, clock)
        try:
            await body(host, root)
        finally:
            root.close()

    asyncio.run(main())
    return host


async def _noop() -> None:
    return None


def supervisors(root: SupervisorNode) -> list[SupervisorNode]:
    return [n for n in root.walk() if isinstance(n, SupervisorNode)]


async def settle(host: FakeHost, root: SupervisorNode, *, timers: bool = True) -> None:
    """Wait until every posted exit, command and (with ``timers``) back-off restart is handled.

    A no-op through each supervisor's queue returns once everything queued
    before it has run; two quiet passes in a row (no transition, empty
    queues, and no pending timer when ``timers``) mean nothing is left.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    quiet = 0
    while quiet < 2:
        assert loop.time() < deadline, f"the tree never settled: {host.log[-5:]}"
        seen = len(host.log)
        await asyncio.sleep(0)  # exit callbacks scheduled by the fake processes
        for sup in supervisors(root):
            await sup.call(_noop)
        if timers and any(sup.timers for sup in supervisors(root)):
            await asyncio.sleep(0.002)  # a back-off delay is running: real loop time
            quiet = 0
            continue
        idle = all(sup.queue.empty() for sup in supervisors(root))
        quiet = quiet + 1 if idle and len(host.log) == seen else 0


async def spin(condition: Callable[[], bool], turns: int = 200) -> None:
    """Let the loop run until ``condition`` holds (for work in progress in a queue)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def node(root: SupervisorNode, name: str) -> Node:
    return next(n for n in root.walk() if n.name == name)


def worker(root: SupervisorNode, name: str) -> WorkerNode:
    found = node(root, name)
    assert isinstance(found, WorkerNode)
    return found


async def operator(root: SupervisorNode, verb: str, name: str) -> None:
    """What ikosd does for ``ikosctl VERB NAME``: the request, through the parent's queue."""
    target = node(root, name)
    parent = target.parent
    assert parent is not None
    method = {"stop": parent.stop_child, "start": parent.start_child}.get(verb)
    await parent.call(functools.partial(method or parent.restart_child, target))


def children(*names: str, **kw: Any) -> list[AnySpec]:
    return [Child(n, ACTOR, **kw) for n in names]


# -- the OTP matrix, in-process ------------------------------------------------------


def end_for(proc: FakeProcess, reason: str) -> None:
    """Make a running fake process exit as the real matrix's actor does for ``reason``."""
    if reason == "normal":
        proc.end(0)
    elif reason == "receive":
        proc.end(1)
    else:
        proc.end(signal=signal.SIGKILL)


@pytest.mark.parametrize("reason", REASONS)
@pytest.mark.parametrize("restart", RESTARTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_otp_matrix(strategy: str, restart: str, reason: str) -> None:
    """The real-process matrix's cases and expectations (``test_otp_matrix.expected``)."""
    dynamic = strategy == "simple_one_for_one"
    if dynamic:
        kids: list[AnySpec] = [Child("w", ACTOR, restart=restart)]
        names = ("w.1", "w.2", "w.3")
    else:
        kids = [Child("a", ACTOR), Child("b", ACTOR, restart=restart), Child("c", ACTOR)]
        names = ("a", "b", "c")
    spec = Supervisor("sup", strategy, max_restarts=50, within=60, children=kids)
    target = names[1]
    group, final = expected(strategy, restart, reason)

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        if reason == "on_start":
            host.scripts[target] = ["crash"]
        await root.start()
        if dynamic:
            for name in names:
                add = functools.partial(root.add_dynamic, ())
                if name == target and reason == "on_start":
                    with pytest.raises(StartFailed, match="on_start failed"):
                        await root.call(add)
                else:
                    assert (await root.call(add)).name == name
        if reason != "on_start":
            end_for(host.current(target), reason)
        await settle(host, root)
        for i, name in enumerate(names):
            if i == 1 and final != "running":
                continue
            n = node(root, name)
            assert n.state is State.RUNNING, (name, host.log)
            assert host.starts(name) == (2 if i in group else 1), name
            assert n.restarts == (1 if i in group else 0), name
            assert n.pid == host.current(name).pid
        if final == "removed":
            assert target not in host.nodes and target in host.retired
            assert all(c.name != target for c in root.children)
            return
        b = node(root, target)
        assert b.state.value == final
        assert b.last_exit is not None
        assert {"code": b.last_exit.code, "signal": b.last_exit.signal} == EXIT_OF[reason]
        if final != "running":
            assert b.pid is None and host.starts(target) == 1

    run(spec, body)


# -- restart intensity and escalation -----------------------------------------------


def test_intensity_escalates_through_two_levels_to_root_failed() -> None:
    spec = Supervisor(
        "root",
        max_restarts=1,
        within=60,
        children=[
            Supervisor("mid", max_restarts=1, within=60, children=children("w")),
            *children("side"),
        ],
    )

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        mid = node(root, "mid")
        for _ in range(2):  # mid absorbs one crash, gives up at the second
            host.current("w").end(signal=signal.SIGKILL)
            await settle(host, root)
        assert host.starts("w") == 3  # restarted once by mid, then with mid by root
        assert mid.state is State.RUNNING and mid.restarts == 1
        assert host.states("mid") == CRASHED_AND_RESTARTED
        assert host.starts("side") == 1 and not host.root_failures
        for _ in range(2):  # the same again: mid fails a second time within root's window
            host.current("w").end(signal=signal.SIGKILL)
            await settle(host, root)
        assert host.root_failures == [
            "reached max restart intensity (1 in 60 s) after 'mid' reached max restart "
            "intensity (1 in 60 s) after 'w' killed by SIGKILL"
        ]
        assert root.state is State.FAILED
        assert host.starts("w") == 4 and host.starts("side") == 1
        assert not any(p.alive for procs in host.procs.values() for p in procs)
        assert host.signals == [("side", "SIGTERM")]  # w was dead: only side was stopped

    run(spec, body)


def test_one_failure_counts_once_even_when_several_children_restart() -> None:
    spec = Supervisor("root", "one_for_all", 1, 60, children("a", "b", "c"))

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        host.current("b").end(1)
        await settle(host, root)
        assert [host.starts(n) for n in "abc"] == [2, 2, 2]
        assert root.state is State.RUNNING and len(root.intensity.history) == 1
        host.current("b").end(1)
        await settle(host, root)
        assert root.state is State.FAILED and len(host.root_failures) == 1

    run(spec, body)


def test_max_restarts_zero_gives_up_at_the_first_crash() -> None:
    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        host.current("b").end(signal=signal.SIGKILL)
        await settle(host, root)
        assert host.root_failures == [
            "reached max restart intensity (0 in 60 s) after 'b' killed by SIGKILL"
        ]
        assert host.starts("a") == host.starts("b") == 1

    run(Supervisor("root", max_restarts=0, within=60, children=children("a", "b")), body)


def test_crashes_spaced_wider_than_the_window_never_escalate() -> None:
    clock = ManualClock()

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        for _ in range(5):
            host.current("w").end(1)
            await settle(host, root)
            clock.advance(1.01)
        assert host.starts("w") == 6 and not host.root_failures
        host.current("w").end(1)
        await settle(host, root)
        host.current("w").end(1)  # the second inside one second
        await settle(host, root)
        assert len(host.root_failures) == 1

    run(Supervisor("root", max_restarts=1, within=1.0, children=children("w")), body, clock)


@pytest.mark.parametrize("restart", RESTARTS)
def test_a_supervisor_that_gives_up_exits_shutdown_for_its_parent(restart: str) -> None:
    """OTP: a supervisor reaching its intensity exits with reason ``shutdown``.

    That is a normal exit for its parent: a transient or temporary child
    supervisor stays down (``failed``, with why), a permanent one is
    restarted and that restart counts against the parent's intensity.
    """
    sub = Supervisor("sub", max_restarts=1, within=30, children=children("x", "y"), restart=restart)
    spec = Supervisor("root", max_restarts=5, within=60, children=[sub, *children("z")])

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        for _ in range(2):
            host.current("x").end(signal=signal.SIGKILL)
            await settle(host, root)
        s = node(root, "sub")
        assert s.last_exit is not None and s.last_exit.reason.startswith(
            "reached max restart intensity (1 in 30 s) after 'x' killed by SIGKILL"
        )
        assert host.starts("z") == 1 and root.state is State.RUNNING
        if restart == "permanent":
            assert s.state is State.RUNNING and s.restarts == 1
            assert (host.starts("x"), host.starts("y")) == (3, 2)
            assert len(root.intensity.history) == 1
        else:
            assert s.state is State.FAILED and s.restarts == 0
            assert (host.starts("x"), host.starts("y")) == (2, 1)
            assert root.intensity.history == ()
            assert (worker(root, "x").state, worker(root, "y").state) == (
                State.FAILED,  # its own crash
                State.STOPPED,  # stopped by sub as it gave up
            )
        assert not host.root_failures

    run(spec, body)


# -- back-off ---------------------------------------------------------------------


def test_backoff_delays_restarts_exponentially_and_resets_after_a_stable_run() -> None:
    clock = ManualClock()
    delays = Backoff(min=0.02, max=0.05, random_factor=0.0, reset_after=10.0)
    spec = Supervisor("root", max_restarts=100, within=60, children=children("w", backoff=delays))

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        w = worker(root, "w")
        loop = asyncio.get_running_loop()
        for expected_delay in (0.02, 0.04, 0.05, 0.05):  # doubling, capped at max
            crashed = loop.time()
            host.current("w").end(1)
            await settle(host, root, timers=False)
            assert w.state is State.BACKOFF and host.starts("w") == len(host.procs["w"])
            assert host.log[-1][3] == f"restarting in {expected_delay:.3f} s"
            await settle(host, root)
            assert w.state is State.RUNNING
            assert host.current("w").spawned_at - crashed >= expected_delay
        clock.advance(10.0)  # ran for reset_after: the next delay is min again
        host.current("w").end(1)
        await settle(host, root, timers=False)
        assert host.log[-1][3] == "restarting in 0.020 s"
        await settle(host, root)
        assert w.restarts == 5 and host.starts("w") == 6

    run(spec, body, clock)


def test_a_stop_during_backoff_cancels_the_restart() -> None:
    spec = Supervisor("root", children=children("w", backoff=Backoff(min=30.0, max=30.0)))

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        host.current("w").end(1)
        await settle(host, root, timers=False)
        assert worker(root, "w").state is State.BACKOFF and root.timers
        await operator(root, "stop", "w")
        assert worker(root, "w").state is State.STOPPED and not root.timers
        await settle(host, root)
        assert host.starts("w") == 1

    run(spec, body)


def test_an_executables_restart_delay_is_a_fixed_backoff() -> None:
    spec = Supervisor(
        "root", max_restarts=10, within=60, children=[Exec("e", "/bin/e", restart_delay=0.01)]
    )

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        for _ in range(3):
            host.current("e").end(1)
            await settle(host, root, timers=False)
            assert host.log[-1][3] == "restarting in 0.010 s"
            await settle(host, root)
        assert host.starts("e") == 4

    run(spec, body)


# -- start waves ------------------------------------------------------------------


def test_children_start_in_waves_each_waiting_for_its_dependencies() -> None:
    spec = Supervisor(
        "root",
        children=[
            Child("api", ACTOR, requires=["db"]),
            Child("db", ACTOR),
            Child("web", ACTOR, requires=["api"]),
            Child("side", ACTOR),
        ],
    )

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        host.scripts = {"db": ["hang"], "api": ["hang"]}
        starting = asyncio.ensure_future(root.start())
        await spin(lambda: host.starts("db") == 1)
        await spin(lambda: host.starts("side") == 1)  # same wave as db: started together
        for _ in range(20):
            await asyncio.sleep(0)
        assert host.starts("api") == host.starts("web") == 0
        host.current("db").ready.set_result({})
        await spin(lambda: host.starts("api") == 1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert host.starts("web") == 0 and not starting.done()
        host.current("api").ready.set_result({})
        await starting
        assert root.state is State.RUNNING
        assert [c.name for c in root.children] == ["db", "api", "web", "side"]
        # and stopping is one at a time, in reverse start order
        await root.terminate()
        assert host.signals == [(n, "SIGTERM") for n in ("side", "web", "api", "db")]

    run(spec, body)


def wave_of_eight(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Supervisor]:
    """Eight children in one wave, at most three spawns of it in flight."""
    monkeypatch.setattr(runtime, "WAVE_CONCURRENCY", 3)
    names = [f"w{i}" for i in range(8)]
    return names, Supervisor("root", max_restarts=100, within=60, children=children(*names))


def test_a_wave_keeps_a_bounded_number_of_spawns_in_flight_and_waits_for_readiness_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # all of a wave's members in flight at once made a wave of 500 raise the heap by 500
    # starts' frames and requests, and what the wave left pinned those arenas
    # (docs/performance.md, "Memory after stop/start cycles"); members slow to be ready
    # must still wait for readiness together, not a few at a time
    names, spec = wave_of_eight(monkeypatch)

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        host.spawn_gate = asyncio.Event()
        host.scripts = {n: ["hang"] for n in names}
        host.scripts["w1"] = ["refuse"]  # a failed spawn gives its place back too
        starting = asyncio.ensure_future(root.start())
        await spin(lambda: host.spawning == 3)
        for _ in range(20):
            await asyncio.sleep(0)
        assert host.spawning == 3 and not any(host.starts(n) for n in names)
        host.spawn_gate.set()
        hanging = [n for n in names if n != "w1"]
        await spin(lambda: all(host.starts(n) == 1 for n in hanging))
        assert host.most_spawning == 3
        for _ in range(20):
            await asyncio.sleep(0)
        assert not starting.done()  # seven waiting for readiness at once
        for n in hanging:
            host.current(n).ready.set_result({})
        await starting
        await settle(host, root)
        assert all(worker(root, n).state is State.RUNNING for n in names)  # w1 restarted

    run(spec, body)


def test_a_wave_cancelled_midway_cancels_the_spawns_in_flight_and_starts_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names, spec = wave_of_eight(monkeypatch)

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        gate = host.spawn_gate = asyncio.Event()
        starting = asyncio.ensure_future(root.start())
        await spin(lambda: host.spawning == 3)
        root.close()  # ikosd's final teardown cancels the supervisor's command
        await spin(lambda: host.spawning == 0)
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not any(host.starts(n) for n in names)
        starting.cancel()

    run(spec, body)


def test_a_bug_in_one_start_of_a_wave_is_raised_once_the_wave_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as a gather of every member did: not lost with its finished task
    names, spec = wave_of_eight(monkeypatch)

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        host.scripts = {"w1": ["bug"]}
        with pytest.raises(RuntimeError, match="w1: a bug in the host"):
            await root.start()
        assert all(host.starts(n) == 1 for n in names if n != "w1")

    run(spec, body)


# -- operator requests --------------------------------------------------------------


def test_an_operators_stop_holds_a_child_when_one_for_all_restarts_its_siblings() -> None:
    """A deliberate difference from OTP (docs/architecture.md): the held child stays down."""
    spec = Supervisor("root", "one_for_all", 10, 60, children("a", "b", "c"))

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        await operator(root, "stop", "b")
        assert worker(root, "b").state is State.STOPPED and worker(root, "b").held
        host.current("a").end(signal=signal.SIGKILL)
        await settle(host, root)
        assert [host.starts(n) for n in "abc"] == [2, 1, 2]
        assert worker(root, "b").state is State.STOPPED
        await operator(root, "start", "b")
        assert worker(root, "b").state is State.RUNNING and host.starts("b") == 2
        # an operator's stop and start are not restarts; a's crash restarted a and c
        assert [worker(root, n).restarts for n in "abc"] == [1, 0, 1]

    run(spec, body)


def test_an_operators_start_and_restart_are_not_counted_as_restarts() -> None:
    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        w = worker(root, "w")
        await operator(root, "stop", "w")
        await operator(root, "start", "w")
        await operator(root, "restart", "w")
        assert host.starts("w") == 3 and w.state is State.RUNNING
        assert w.restarts == 0 and w.incarnation == 3
        assert host.signals == [("w", "SIGTERM"), ("w", "SIGTERM")]
        assert root.intensity.history == ()  # nor do they count against intensity
        host.current("w").end(1)  # a crash is a restart
        await settle(host, root)
        assert w.restarts == 1

    run(Supervisor("root", children=children("w")), body)


def test_a_start_right_after_an_undelivered_exit_records_that_exit_first() -> None:
    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        w = worker(root, "w")
        host.current("w").end(1)  # the exit callback is scheduled, not yet run
        assert w.state is State.RUNNING and not w.alive
        await w.start()  # no illegal running -> starting
        await settle(host, root)
        assert host.states("w") == CRASHED_AND_RESTARTED
        assert host.starts("w") == 2 and w.restarts == 0  # the queued restart was stale

    run(Supervisor("root", children=children("w")), body)


# -- simple_one_for_one ------------------------------------------------------------


def test_simple_one_for_one_adds_and_removes_instances() -> None:
    spec = Supervisor(
        "pool", "simple_one_for_one", children=[Child("w", ACTOR, restart="transient")]
    )

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        assert root.children == []
        for _ in range(3):
            await root.call(functools.partial(root.add_dynamic, ()))
        assert [c.name for c in root.children] == ["w.1", "w.2", "w.3"]
        await root.call(functools.partial(root.remove_child, node(root, "w.2")))
        assert [c.name for c in root.children] == ["w.1", "w.3"]
        assert host.signals == [("w.2", "SIGTERM")] and "w.2" not in host.nodes
        host.current("w.3").end(0)  # a transient instance's normal exit: deleted
        await settle(host, root)
        assert [c.name for c in root.children] == ["w.1"]
        assert host.retired[-2:] == ["w.2", "w.3"]
        with pytest.raises(IkosError, match="not simple_one_for_one"):
            plain = build(Supervisor("plain", children=children("x")), host)
            await plain.add_dynamic(())

    run(spec, body)


# -- stopping ---------------------------------------------------------------------


def test_shutdown_is_terminate_wait_kill_per_child_in_reverse_order() -> None:
    spec = Supervisor(
        "root",
        children=[
            Child("a", ACTOR),
            Supervisor("sub", children=[Child("b", ACTOR, shutdown=0.01), Child("c", ACTOR)]),
            Child("d", ACTOR, shutdown="brutal_kill"),
            Exec("e", "/bin/e", stop_signal="SIGINT"),
        ],
    )

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        host.scripts = {"b": ["stubborn"]}
        await root.start()
        await root.terminate("ikosd shutting down")
        assert host.signals == [
            ("e", "SIGINT"),
            ("d", "SIGKILL"),
            ("c", "SIGTERM"),
            ("b", "SIGTERM"),
            ("b", "SIGKILL"),  # after its 0.01 s
            ("a", "SIGTERM"),
        ]
        assert all(n.state is State.STOPPED for n in root.walk())
        b = worker(root, "b")
        assert b.last_exit is not None and b.last_exit.shutdown and b.last_exit.normal
        assert host.states("sub") == ["stopped", "starting", "running", "stopping", "stopped"]

    run(spec, body)


# -- failing a child from outside (health checks) ------------------------------------


def test_fail_stops_the_child_and_handles_it_as_a_crash() -> None:
    """Even a transient child that exits 0 on SIGTERM is restarted: a failure is abnormal."""
    spec = Supervisor("root", children=[Child("w", ACTOR, restart="transient")])

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        host.scripts = {"w": ["clean"]}
        await root.start()
        w = worker(root, "w")
        assert await w.fail("health check failed: http://x/health: HTTP/1.0 404") is True
        assert host.signals == [("w", "SIGTERM")]
        assert host.states("w") == [
            "stopped",
            "starting",
            "running",
            "stopping",
            "failed",
            "starting",
            "running",
        ]
        assert w.restarts == 1 and host.starts("w") == 2
        assert w.last_exit is not None
        assert w.last_exit.reason == "health check failed: http://x/health: HTTP/1.0 404"
        assert (w.last_exit.code, w.last_exit.failure, w.last_exit.normal) == (0, True, False)
        assert len(root.intensity.history) == 1

    run(spec, body)


def test_health_failures_count_against_intensity_until_the_supervisor_gives_up() -> None:
    sub = Supervisor("sub", max_restarts=2, within=60, children=children("w"), restart="transient")
    spec = Supervisor("root", children=[sub, *children("z")])

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        w = worker(root, "w")
        for _ in range(3):
            assert await w.fail("health check failed: 404") is True
        await settle(host, root)
        s = node(root, "sub")
        assert host.starts("w") == 3 and s.state is State.FAILED
        assert s.last_exit is not None
        assert s.last_exit.reason == (
            "reached max restart intensity (2 in 60 s) after 'w' health check failed: 404"
        )
        assert host.starts("z") == 1 and root.state is State.RUNNING
        assert await w.fail("health check failed: 404") is False  # nothing left to fail

    run(spec, body)


def test_health_failures_honour_backoff() -> None:
    delays = Backoff(min=0.02, max=1.0, random_factor=0.0)
    spec = Supervisor("root", max_restarts=10, within=60, children=children("w", backoff=delays))

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        w = worker(root, "w")
        await w.fail("health check failed: 404")
        assert w.state is State.BACKOFF and host.log[-1][3] == "restarting in 0.020 s"
        await settle(host, root)
        await w.fail("health check failed: 404")
        assert host.log[-1][3] == "restarting in 0.040 s"
        await settle(host, root)
        assert host.starts("w") == 3 and w.state is State.RUNNING

    run(spec, body)


def test_fail_waits_the_shutdown_timeout_then_kills() -> None:
    spec = Supervisor("root", children=[Child("w", ACTOR, shutdown=0.01)])

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        host.scripts = {"w": ["stubborn"]}
        await root.start()
        await worker(root, "w").fail("health check failed: timeout")
        assert host.signals == [("w", "SIGTERM"), ("w", "SIGKILL")]
        assert worker(root, "w").state is State.RUNNING and host.starts("w") == 2

    run(spec, body)


def test_fail_of_an_incarnation_already_replaced_does_nothing() -> None:
    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        w = worker(root, "w")
        old = w.incarnation
        host.current("w").end(1)
        await settle(host, root)
        assert await root.call(functools.partial(root.fail_child, w, old, "stale")) is False
        assert host.signals == [] and host.starts("w") == 2
        with pytest.raises(IkosError, match="only a daemon can be failed"):
            await root.fail("no")

    run(Supervisor("root", children=children("w")), body)


def test_a_failure_is_unclean_for_systemds_restart_on() -> None:
    failed = ExitReason("health check failed: x", code=0, failure=True)
    clean = ExitReason("exited normally", code=0)
    for mode, restarts in {
        "on-failure": True,
        "on-abnormal": True,
        "on-watchdog": True,
        "on-success": False,
        "always": True,
    }.items():
        spec = Exec("e", "/bin/e", restart_on=mode)
        assert should_restart_spec(spec, failed) is restarts, mode
    assert not should_restart_spec(Exec("e", "/bin/e", restart_on="on-failure"), clean)


# -- the state machine ----------------------------------------------------------------

_ROW = re.compile(r"^\s*(\w+)\s+->\s+(\w+)\s+(\S.*)$")


def diagram_rows(text: str) -> dict[tuple[State, State], str]:
    """The ``old -> new   event`` rows of a diagram in ``text``."""
    rows = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m[1] in State._value2member_map_ and m[2] in State._value2member_map_:
            rows[(State(m[1]), State(m[2]))] = m[3].strip()
    return rows


def test_the_documented_diagrams_are_the_transition_table() -> None:
    assert runtime.__doc__ is not None
    assert diagram_rows(runtime.__doc__) == dict(TRANSITIONS)
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert diagram_rows(doc) == dict(TRANSITIONS)


def test_an_illegal_transition_is_logged_and_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def body(host: FakeHost, root: SupervisorNode) -> None:
        w = worker(root, "w")
        with (
            caplog.at_level(logging.ERROR, "ikos.supervision"),
            pytest.raises(IllegalTransition, match="'w': illegal state transition"),
        ):
            w.set_state(State.RUNNING, "out of nowhere")
        assert w.state is State.STOPPED and host.log == []
        assert "actor w: illegal state transition stopped -> running (out of nowhere)" in (
            caplog.text
        )

    run(Supervisor("root", children=children("w")), body)


def test_a_supervisor_waiting_in_backoff_stops_without_passing_through_stopping() -> None:
    sub = Supervisor("sub", max_restarts=0, within=60, children=children("x"))
    spec = Supervisor("root", children=[sub], backoff=Backoff(min=30.0, max=30.0))

    async def body(host: FakeHost, root: SupervisorNode) -> None:
        await root.start()
        host.current("x").end(1)  # sub gives up at once; root restarts it after 30 s
        await settle(host, root, timers=False)
        assert node(root, "sub").state is State.BACKOFF
        await root.terminate()
        assert host.states("sub")[-2:] == ["backoff", "stopped"]
        assert root.state is State.STOPPED and not root.timers

    run(spec, body)
