"""Futures and asyncio on the calling side: many asks in flight on one connection.

Real ikosd, real actors. The actors record what they handle, so order is
checked where it happens (in the actor) as well as where the futures complete;
an actor that must be busy at a known moment waits for a gate file the test
creates, and every wait is a future's own bounded wait: nothing sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import warnings
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, Instance, wait_for
from gate_source import GATE_SOURCE

import ikos
from ikos.actors import _loop_pipeline, _pipeline

ACTORS = (
    GATE_SOURCE
    + """

class Recorder(ikos.Actor):
    def on_start(self):
        self.seen = []

    def receive(self, message):
        if message == "dump":
            return self.seen
        if isinstance(message, tuple) and message[0] == "gate":
            open(message[1] + ".busy", "w").close()
            wait_gate(message[1])
            return "opened"
        if isinstance(message, tuple) and message[0] == "boom":
            raise KeyError(message[1])
        if isinstance(message, (bytes, memoryview)):
            return message  # a large one goes back by shared memory
        self.seen.append(message)
        return ("seen", message)

    def incr(self, k):
        self.seen.append(("incr", k))
        return k + 1
"""
)

TREE = (
    ACTORS
    + """
tree = ikos.Supervisor("root", max_restarts=50, within=10, children=[
    ikos.Child("rec", Recorder, mailbox_size=1000),
])
"""
)


def start(ikosd_factory) -> tuple[Instance, ikos.ActorRef[Any]]:
    inst = ikosd_factory(tree=TREE)
    return inst, ikos.ActorRef("rec", root=inst.root)


def all_done(futures: list[Future[Any]]) -> None:
    """Every future completes within HANG (whatever its outcome): none hangs."""
    _, not_done = wait(futures, timeout=HANG)
    assert not not_done, f"{len(not_done)} futures never completed"


def busy(gate: Path) -> bool:
    return Path(str(gate) + ".busy").exists()


def test_ten_thousand_futures_in_flight_answered_in_order(ikosd_factory):
    _inst, ref = start(ikosd_factory)
    n = 10_000
    completed: list[int] = []
    futures = []
    for i in range(n):
        future = ref.ask_future(i, timeout=HANG * 4)
        # callbacks run in the reader thread, in the order replies complete futures
        future.add_done_callback(lambda f, i=i: completed.append(i))
        futures.append(future)
    all_done(futures)
    assert [f.result() for f in futures] == [("seen", i) for i in range(n)]
    assert completed == list(range(n))
    assert ref.ask("dump", timeout=HANG) == list(range(n))


def test_order_of_one_thread_and_of_several(ikosd_factory):
    _inst, ref = start(ikosd_factory)
    # futures of several threads: each thread's in its order, all answered
    threads, count = 4, 500
    results: dict[int, list[Any]] = {}

    def sender(t: int) -> None:
        futures = [ref.ask_future((t, i), timeout=HANG * 2) for i in range(count)]
        results[t] = [f.result(timeout=HANG * 2) for f in futures]

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(HANG * 4)
    assert not any(w.is_alive() for w in workers)
    for t in range(threads):
        assert results[t] == [("seen", (t, i)) for i in range(count)]
    seen = ref.ask("dump", timeout=HANG)
    for t in range(threads):
        assert [m for m in seen if m[0] == t] == [(t, i) for i in range(count)]
    # across paths: once a future is done, the actor has handled its ask, so a tell
    # made after waiting comes after it; a message sent with ask_future (its future
    # ignored) keeps its place among the thread's futures. (The tell and the later
    # futures travel on two connections: their relative order is not promised.)
    first = ref.ask_future("after-wait-1", timeout=HANG)
    first.result(timeout=HANG)
    ref.tell("after-wait-2")
    ignored = [ref.ask_future(f"pipelined-{i}", timeout=HANG) for i in range(3)]
    last = ref.ask_future("pipelined-last", timeout=HANG)
    assert last.result(timeout=HANG) == ("seen", "pipelined-last")
    all_done(ignored)
    seen = wait_for(lambda: (s := ref.ask("dump", timeout=HANG)) and "after-wait-2" in s and s)
    assert seen.index("after-wait-1") < seen.index("after-wait-2")
    tail = [m for m in seen[seen.index("after-wait-1") :] if m != "after-wait-2"]
    assert tail == ["after-wait-1", "pipelined-0", "pipelined-1", "pipelined-2", "pipelined-last"]


def test_asyncio_many_concurrent_asks_from_one_loop(ikosd_factory):
    _inst, ref = start(ikosd_factory)

    async def main() -> tuple[list[Any], list[Any], Any]:
        replies = await asyncio.gather(*(ref.ask_async(i, timeout=HANG) for i in range(2000)))
        calls = await asyncio.gather(*(ref.async_proxy(HANG).incr(k) for k in range(100)))
        with pytest.raises(ikos.ActorCrashed, match="KeyError"):
            await ref.ask_async(("boom", "x"), timeout=HANG)
        # the crash ends that connection (an ask sent before its end is seen fails
        # with ActorDeadError); the restarted actor gets a new one
        deadline = time.monotonic() + HANG
        while True:
            try:
                after = await ref.ask_async("after the crash", timeout=HANG)
                break
            except ikos.ActorDeadError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        return replies, calls, after

    replies, calls, after = asyncio.run(main())
    assert after == ("seen", "after the crash")
    assert replies == [("seen", i) for i in range(2000)]
    assert calls == [k + 1 for k in range(100)]

    # asyncio.run closed that loop with its connection open: the next loop's first
    # connect closes it (nothing leaks from one asyncio.run to the next)
    (old,) = [p for pipes in _loop_pipeline._by_loop.values() for p in pipes.values()]
    assert isinstance(old, _loop_pipeline.LoopPipeline) and not old.closed

    async def again() -> Any:
        return await ref.ask_async("again", timeout=HANG)

    assert asyncio.run(again()) == ("seen", "again")
    assert old.closed and old.conn.sock.fileno() == -1
    assert old.loop not in _loop_pipeline._by_loop


def test_futures_time_out_and_late_replies_are_dropped(ikosd_factory, tmp_path):
    _inst, ref = start(ikosd_factory)
    gate = tmp_path / "gate"
    blocker = ref.ask_future(("gate", str(gate)), timeout=HANG)
    wait_for(lambda: busy(gate), HANG, message="the actor to be busy")
    short = [ref.ask_future(("short", i), timeout=0.2) for i in range(20)]
    all_done(short)
    for f in short:
        with pytest.raises(ikos.AskTimeout, match=r"no reply within 0\.2 s"):
            f.result()

    async def late() -> None:
        with pytest.raises(ikos.AskTimeout):
            await ref.ask_async("late", timeout=0.2)

    asyncio.run(late())
    gate.touch()
    assert blocker.result(timeout=HANG) == "opened"
    # the timed-out asks were still handled, their replies dropped; new ones pair up
    assert ref.ask_future("fresh", timeout=HANG).result(timeout=HANG) == ("seen", "fresh")
    # a cancelled future is left alone when its reply comes
    cancelled = ref.ask_future("cancel-me", timeout=HANG)
    cancelled.cancel()
    assert ref.ask_future("after", timeout=HANG).result(timeout=HANG) == ("seen", "after")


def test_sigkill_with_futures_in_flight_fails_every_one(ikosd_factory, tmp_path):
    inst, ref = start(ikosd_factory)
    gate = tmp_path / "gate"
    blocker = ref.ask_future(("gate", str(gate)), timeout=HANG)
    wait_for(lambda: busy(gate), HANG, message="the actor to be busy")
    queued = [ref.ask_future(i, timeout=HANG) for i in range(300)]
    pid = inst.pid_of("rec")
    assert pid
    os.kill(pid, signal.SIGKILL)
    futures = [blocker, *queued]
    all_done(futures)
    for f in futures:
        with pytest.raises(ikos.ActorDeadError, match="actor 'rec': stopped before answering"):
            f.result()
    # the restarted actor serves a new pipelined connection
    inst.wait_running_new_pid("rec", pid, timeout=HANG)
    assert wait_for(lambda: ref.ask_future("again", timeout=HANG).result(), HANG) == (
        "seen",
        "again",
    )


def test_sigkill_with_asyncio_asks_in_flight_fails_every_one(ikosd_factory, tmp_path):
    inst, ref = start(ikosd_factory)
    gate = tmp_path / "gate"
    pid = inst.pid_of("rec")
    assert pid

    async def main() -> list[Any]:
        blocker = asyncio.ensure_future(ref.ask_async(("gate", str(gate)), timeout=HANG))
        deadline = time.monotonic() + HANG
        while not busy(gate):  # the loop's own wait: the gated actor answers nothing
            assert time.monotonic() < deadline, "the gated actor never started its message"
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(ref.ask_async(i, timeout=HANG)) for i in range(300)]
        await asyncio.sleep(0)  # let them queue and go out
        os.kill(pid, signal.SIGKILL)
        return await asyncio.wait_for(
            asyncio.gather(blocker, *queued, return_exceptions=True), HANG
        )

    outcomes = asyncio.run(main())
    assert len(outcomes) == 301
    for outcome in outcomes:
        assert isinstance(outcome, ikos.ActorDeadError), outcome
        assert "stopped before answering" in str(outcome)


def test_remote_errors_shared_memory_and_dead_actors(ikosd_factory):
    inst, ref = start(ikosd_factory)
    with pytest.raises(ikos.ActorCrashed) as info:
        ref.ask_future(("boom", "k"), timeout=HANG).result(timeout=HANG)
    assert info.value.exc_type == "KeyError" and "raise KeyError" in info.value.traceback
    inst.wait_state("rec", "running", timeout=HANG)
    payload = os.urandom(1 << 20)  # above the shared-memory threshold both ways
    reply = wait_for(lambda: ref.ask_future(payload, timeout=HANG).result(), HANG)
    assert isinstance(reply, memoryview) and reply.readonly and bytes(reply) == payload
    del reply
    nobody = ikos.ActorRef("nobody", root=inst.root)
    with pytest.raises(ikos.ActorDeadError, match="not running"):
        nobody.ask_future("x", timeout=HANG).result(timeout=HANG)


def test_the_reader_ends_when_idle_and_a_fork_starts_afresh(ikosd_factory, children):
    _inst, ref = start(ikosd_factory)

    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "ikos-pipeline-rec"]

    assert ref.ask_future(1, timeout=HANG).result(timeout=HANG) == ("seen", 1)
    assert len(readers()) == 1
    with warnings.catch_warnings():  # 3.12+ warns of fork() with threads: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: the parent's connection is not its own
        code = 1
        try:
            ok = ref.ask_future("child", timeout=HANG).result(timeout=HANG) == ("seen", "child")
            code = 0 if ok else 1
        finally:
            os._exit(code)
    children.append(pid)
    assert ref.ask_future(2, timeout=HANG).result(timeout=HANG) == ("seen", 2)
    _, status = os.waitpid(pid, 0)
    children.remove(pid)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: not readers(), HANG, message="the idle reader to end")
    assert (None, "rec") not in _pipeline._pipelines and not any(
        key[1] == "rec" for key in _pipeline._pipelines
    )
    assert ref.ask_future(3, timeout=HANG).result(timeout=HANG) == ("seen", 3)
