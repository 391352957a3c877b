"""Actor timers: ``send_after``, ``send_interval``, ``cancel``, through real processes.

The actors record when each timer message arrives, on the monotonic clock
(shared by every process of the machine), next to when it was due; the tests
ask for the records and poll until they are complete, never sleeping to
wait. Where a test must show that something does *not* arrive, the actor
sets a later marker timer and the test waits for the marker: timers fire in
order, so what did not come before the marker is not coming. The rule for
periodic timers (fixed rate, skipping) and the validation are unit-tested on
the timer heap itself, with the time passed in.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import deque

import pytest
from conftest import HANG, Instance, wait_for

import ikos
from ikos.actors._stats import RECEIVED, TAKEN, private_counters
from ikos.actors._timers import TIMER, HeapTimers, check_delay
from ikos.platform._memfd import create_segment, map_segment

ACTORS = """
import asyncio
import os
import time

import ikos


class Clock(ikos.Actor):
    \"\"\"Sets timers on request; records (message, due, arrived) of each timer message.\"\"\"

    def on_start(self):
        self.got = []
        self.timers = {}

    def receive(self, message):
        kind = message[0]
        if kind == "after":  # ("after", key, seconds)
            _, key, seconds = message
            self.timers[key] = self.send_after(seconds, ("fired", key, time.monotonic() + seconds))
            return os.getpid()
        if kind == "every":  # ("every", key, seconds)
            _, key, seconds = message
            self.timers[key] = self.send_interval(seconds, ("tick", key, time.monotonic(), seconds))
            return time.monotonic()
        if kind == "cancel":
            return self.timers[message[1]].cancel()
        if kind == "dump":
            return self.got
        if kind == "ping":
            return message[1]
        if kind == "bad":  # ("bad", method, seconds): the error, as (type, text)
            try:
                getattr(self, message[1])(message[2], "never")
            except Exception as exc:
                return type(exc).__name__, str(exc)
            return None
        if kind == "slow":
            time.sleep(message[1])
            return time.monotonic()
        if kind in ("fired", "tick"):
            self.got.append((message, time.monotonic()))
            return None
        raise ValueError(message)


class Witness(ikos.Actor):
    \"\"\"Writes a file per timer message, named after the message and the pid.\"\"\"

    def __init__(self, directory):
        self.directory = directory

    def receive(self, message):
        if isinstance(message, tuple) and message[0] == "arm":
            self.send_after(message[1], message[2])
            return os.getpid()
        with open(os.path.join(self.directory, f"{message}-{os.getpid()}"), "w"):
            pass
        return None


class EarlyTimer(ikos.Actor):
    \"\"\"Sets a timer in an async on_start that is due before on_start returns.\"\"\"

    async def on_start(self):
        self.events = ["on_start began"]
        self.send_after(0, "tick")
        await asyncio.sleep(0.2)
        self.events.append("on_start ended")

    def receive(self, message):
        if message == "events":
            return self.events
        self.events.append(message)


class AsyncClock(Clock):
    \"\"\"The same, run by the asyncio runtime; "slow" awaits instead of blocking.\"\"\"

    async def on_start(self):
        await asyncio.sleep(0)
        Clock.on_start(self)

    async def receive(self, message):
        if message[0] == "slow":
            await asyncio.sleep(message[1])  # the loop runs on: ticks come due meanwhile
            return time.monotonic()
        return Clock.receive(self, message)
"""


def tree_source(children: str, **constants: object) -> str:
    consts = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    return f"{ACTORS}\n{consts}\ntree = {children}\n"


def clock_tree(name: str = "clock", cls: str = "Clock") -> str:
    return tree_source(f'ikos.Supervisor("root", children=[ikos.Child("{name}", {cls})])')


def ref(inst: Instance, name: str) -> ikos.ActorRef:
    return ikos.ActorRef(name, root=inst.root)


def arrivals(actor: ikos.ActorRef, key: str) -> list[tuple[tuple[object, ...], float]]:
    return [(m, t) for m, t in actor.ask(("dump",), timeout=10) if m[1] == key]


def await_marker(clock: ikos.ActorRef, seconds: float) -> None:
    """Set a marker timer ``seconds`` away and wait for it: timers fire in order, so
    a message that did not arrive before the marker is not coming."""
    clock.ask(("after", "marker", seconds), timeout=10)
    wait_for(lambda: arrivals(clock, "marker"), message="the marker")


# -- send_after ------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["Clock", "AsyncClock"])
def test_send_after_fires_once_not_before_its_delay(ikosd_factory, cls):
    inst = ikosd_factory(tree=clock_tree(cls=cls))
    clock = ref(inst, "clock")
    delays = {"zero": 0, "short": 0.05, "long": 0.4}
    for key, seconds in delays.items():
        clock.ask(("after", key, seconds), timeout=10)
    wait_for(lambda: len(clock.ask(("dump",), timeout=10)) == 3, message="three timers")
    for key in delays:
        [((_, _, due), arrived)] = arrivals(clock, key)
        # never early; late by far less than this bound on hangs (the tolerance
        # measured on an idle actor is about a millisecond: docs/actors.md)
        assert due <= arrived < due + 5, (key, arrived - due)
    # fired once each: a later marker arrives with nothing more before it
    await_marker(clock, 0.1)
    assert len(clock.ask(("dump",), timeout=10)) == 4


def test_timers_fire_in_due_order_behind_waiting_messages(ikosd_factory):
    inst = ikosd_factory(tree=clock_tree())
    clock = ref(inst, "clock")
    clock.ask(("after", "b", 0.2), timeout=10)
    clock.ask(("after", "a", 0.1), timeout=10)
    clock.ask(("after", "now", 0), timeout=10)
    wait_for(lambda: len(clock.ask(("dump",), timeout=10)) == 3)
    assert [m[1] for m, _ in clock.ask(("dump",), timeout=10)] == ["now", "a", "b"]


# -- send_interval and cancel ------------------------------------------------------


@pytest.mark.parametrize("cls", ["Clock", "AsyncClock"])
def test_send_interval_repeats_on_its_grid_until_cancelled(ikosd_factory, cls):
    inst = ikosd_factory(tree=clock_tree(cls=cls))
    clock = ref(inst, "clock")
    interval = 0.05
    clock.ask(("every", "t", interval), timeout=10)
    wait_for(lambda: len(arrivals(clock, "t")) >= 6, message="six ticks")
    assert clock.ask(("cancel", "t"), timeout=10) is True
    assert clock.ask(("cancel", "t"), timeout=10) is False  # idempotent
    got = arrivals(clock, "t")
    ticks = [t for _, t in got]
    started = got[0][0][2]  # taken just before send_interval was called
    # fixed rate: the i-th tick no earlier than start + i * interval
    for i, arrived in enumerate(ticks, start=1):
        assert arrived >= started + i * interval, (i, arrived - started)
    # after cancel: a marker six intervals later comes with no tick before it
    await_marker(clock, 6 * interval)
    assert len(arrivals(clock, "t")) == len(ticks)


def test_cancel_before_a_one_shot_fires_and_after(ikosd_factory):
    inst = ikosd_factory(tree=clock_tree())
    clock = ref(inst, "clock")
    clock.ask(("after", "x", 0.3), timeout=10)
    assert clock.ask(("cancel", "x"), timeout=10) is True
    clock.ask(("after", "y", 0), timeout=10)
    wait_for(lambda: arrivals(clock, "y"))
    assert clock.ask(("cancel", "y"), timeout=10) is False  # already received
    await_marker(clock, 0.6)
    assert arrivals(clock, "x") == []


@pytest.mark.parametrize("cls", ["Clock", "AsyncClock"])
def test_a_slow_actor_gets_no_backlog_of_ticks(ikosd_factory, cls):
    """Ticks due while a long handler runs are skipped, not queued up."""
    inst = ikosd_factory(tree=clock_tree(cls=cls))
    clock = ref(inst, "clock")
    interval = 0.01
    clock.ask(("every", "t", interval), timeout=10)
    wait_for(lambda: arrivals(clock, "t"), message="a first tick")
    ended = clock.ask(("slow", 0.5), timeout=10)  # fifty ticks come due meanwhile
    assert clock.ask(("cancel", "t"), timeout=10) is True
    cancelled = time.monotonic()
    # after the slow handler: at most one tick for all it missed, then one per
    # interval until the cancel (none if the cancel came first); queued up, the
    # fifty would all have come at once
    late = [t for _, t in arrivals(clock, "t") if t >= ended]
    assert len(late) <= 2 + (cancelled - ended) / interval, late


def test_a_timer_fires_while_a_client_asks_in_a_tight_loop(ikosd_factory):
    """One client keeps the actor in its fast path (blocked in recv): the timer
    still fires on time."""
    inst = ikosd_factory(tree=clock_tree())
    clock = ref(inst, "clock")
    clock.ask(("after", "fast", 0.3), timeout=10)
    deadline = time.monotonic() + HANG
    asks = 0
    while not arrivals(clock, "fast"):
        for i in range(50):  # the same connection, back to back
            assert clock.ask(("ping", i), timeout=10) == i
        asks += 51
        assert time.monotonic() < deadline, "the timer never fired"
    [((_, _, due), arrived)] = arrivals(clock, "fast")
    assert due <= arrived < due + 5, arrived - due
    assert asks > 51  # the client was talking when the timer came due


def test_bad_delays_are_clear_errors_naming_actor_and_argument(ikosd_factory):
    inst = ikosd_factory(tree=clock_tree())
    clock = ref(inst, "clock")
    pid = inst.pid_of("clock")
    cases = [
        ("send_after", -1, "ValueError"),
        ("send_after", float("nan"), "ValueError"),
        ("send_after", float("inf"), "ValueError"),
        ("send_after", "soon", "TypeError"),
        ("send_after", True, "TypeError"),
        ("send_interval", 0, "ValueError"),
        ("send_interval", None, "TypeError"),
    ]
    for method, seconds, exc_type in cases:
        kind, text = clock.ask(("bad", method, seconds), timeout=10)
        assert kind == exc_type, (method, seconds, text)
        assert "actor 'clock'" in text and f"{method}(seconds=...)" in text, text
        assert repr(seconds) in text, text
    assert inst.pid_of("clock") == pid


def test_timers_die_with_their_incarnation(ikosd_factory, tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    inst = ikosd_factory(
        tree=tree_source(
            'ikos.Supervisor("root", children=[ikos.Child("w", Witness, args=(SEEN,))])',
            SEEN=str(seen),
        )
    )
    witness = ref(inst, "w")
    old = witness.ask(("arm", 0.5, "late"), timeout=10)
    os.kill(old, signal.SIGKILL)
    new = inst.wait_running_new_pid("w", old)
    # The new incarnation's own marker fires after the old timer's time: had the
    # old timer survived the restart, its file would be there before the marker's.
    assert witness.ask(("arm", 1.0, "marker"), timeout=15) == new
    wait_for(lambda: (seen / f"marker-{new}").exists(), message="the marker")
    assert sorted(p.name for p in seen.iterdir()) == [f"marker-{new}"]
    # the same timer in a living incarnation does fire (the check above can fail)
    witness.ask(("arm", 0, "late"), timeout=10)
    wait_for(lambda: (seen / f"late-{new}").exists())


def test_a_timer_due_during_an_async_on_start_waits_for_it(ikosd_factory):
    inst = ikosd_factory(tree=clock_tree("early", "EarlyTimer"))
    early = ref(inst, "early")
    wait_for(lambda: "tick" in early.ask("events", timeout=10), message="the tick")
    assert early.ask("events", timeout=10) == ["on_start began", "on_start ended", "tick"]


# -- the timer heap, time passed in --------------------------------------------------


class Runtime:
    """What timers use of an actor's runtime."""

    def __init__(self) -> None:
        self.mailbox: deque[tuple[object, int, int, object]] = deque()
        self.stats = private_counters()
        self.segments = 0


def heap_timers() -> tuple[HeapTimers, deque[tuple[object, int, int, object]], memoryview]:
    runtime = Runtime()
    return HeapTimers("unit", runtime, [math.inf], 0.02), runtime.mailbox, runtime.stats


def test_a_periodic_tick_is_skipped_while_the_last_one_waits():
    timers, mailbox, stats = heap_timers()
    timer = timers.start("send_interval", 1.0, "tick", periodic=True)
    first = timer.when
    timers.fire_due(first + 100.5)  # a hundred ticks late: one message, not a hundred
    assert [m for _, _, _, m in mailbox] == ["tick"]
    assert timer.when == first + 101  # the next point of the grid after now
    timers.fire_due(first + 101)  # its message still waits: this tick is skipped
    assert len(mailbox) == 1
    assert timer.when == first + 102
    mailbox.popleft()  # the loop takes it
    timers.fire_due(first + 102)
    assert len(mailbox) == 1
    assert stats[RECEIVED] == 2


def test_cancel_takes_back_a_waiting_message_and_keeps_the_depth_right():
    timers, mailbox, stats = heap_timers()
    other = (None, 0, 0, "a tell")
    once = timers.start("send_after", 0, "once", periodic=False)
    timers.fire_due(once.when)
    mailbox.append(other)
    assert [e[1] for e in mailbox] == [TIMER, 0]
    assert once.cancel() is True  # fired, but not received yet
    assert list(mailbox) == [other]
    assert stats[RECEIVED] - stats[TAKEN] == 0  # the depth no longer counts it
    assert once.cancel() is False
    later = timers.start("send_after", 5, "later", periodic=False)
    assert timers.timeout(later.when - 5) == pytest.approx(5)
    assert later.cancel() is True
    timers.fire_due(later.when + 1)
    assert list(mailbox) == [other]
    assert timers.timeout(0) is None


def test_the_heap_stays_bounded_when_timers_are_set_and_cancelled():
    timers, _, _ = heap_timers()
    keep = timers.start("send_after", 1000, "keep", periodic=False)
    for _ in range(10_000):
        timers.start("send_after", 3600, "x", periodic=False).cancel()
    assert len(timers.heap) <= 200
    assert keep.cancel() is True


def test_a_shared_memory_message_counts_as_a_waiting_segment():
    """The loop counts a mapped view out when it takes one: a timer's must be counted in."""
    runtime = Runtime()
    timers = HeapTimers("unit", runtime, [math.inf], 0.02)
    view = map_segment(create_segment(b"x" * 4096), 4096)
    kept = timers.start("send_after", 0, view, periodic=False)
    timers.fire_due(kept.when)
    assert runtime.segments == 1
    assert kept.cancel() is True and runtime.segments == 0 and not runtime.mailbox
    del kept
    view.release()


def test_a_timer_pulls_in_the_fast_path():
    cell = [math.inf]
    timers = HeapTimers("unit", Runtime(), cell, 0.02)
    timer = timers.start("send_after", 0.5, "m", periodic=False)
    assert cell[0] == pytest.approx(timer.when - 0.02)
    now = timer.when - 0.3
    assert timers.fire_due(now) == pytest.approx(now + 0.02)  # due far off: a full wait
    assert timers.fire_due(timer.when - 0.03) == pytest.approx(timer.when - 0.02)


def test_closed_timers_never_fire():
    timers, mailbox, _ = heap_timers()
    timer = timers.start("send_interval", 0.1, "tick", periodic=True)
    timers.close()
    timers.fire_due(timer.when + 10)
    assert not mailbox and not timers.heap
    late = timers.start("send_after", 0, "late", periodic=False)
    assert late.cancel() is False  # set while stopping: it was never going to fire


def test_delay_validation():
    assert check_delay("a", "send_after", 0, periodic=False) == 0.0
    assert check_delay("a", "send_interval", 2, periodic=True) == 2.0
    with pytest.raises(ValueError, match=r"actor 'a': send_interval\(seconds=...\).*> 0, got 0"):
        check_delay("a", "send_interval", 0, periodic=True)
    with pytest.raises(TypeError, match="expected a number of seconds, got str '1'"):
        check_delay("a", "send_after", "1", periodic=False)


def test_timers_outside_the_runtime_or_thread_are_refused():
    class Idle(ikos.Actor):
        pass

    with pytest.raises(ikos.ActorError, match="from on_start on"):
        Idle().send_after(1, "x")
    timers, _, _ = heap_timers()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            timers.start("send_after", 1, "x", periodic=False)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(10)
    assert len(errors) == 1 and "another thread" in str(errors[0])


def test_an_actor_with_pending_timers_stops_normally(ikosd_factory):
    inst = ikosd_factory(tree=clock_tree())
    clock = ref(inst, "clock")
    clock.ask(("every", "t", 0.01), timeout=10)
    clock.ask(("after", "x", 30), timeout=10)
    wait_for(lambda: arrivals(clock, "t"), message="a first tick")
    inst.ctl("stop", "clock", check=True)
    status = inst.status("clock")
    assert status["state"] == "stopped" and status["last_exit"]["code"] == 0
    assert status["dead_letters"] == 0  # a waiting tick is nobody's dead letter
