"""Stopping, with real processes: order, timeouts, brutal_kill, held children, queued asks.

OTP's shutdown is "terminate, wait, kill": children stop in reverse start
order, each gets SIGTERM and its ``shutdown`` seconds, then SIGKILL;
``brutal_kill`` is SIGKILL at once. Every actor here appends ``"start NAME"``
and ``"stop NAME"`` (the latter from ``on_stop``, so only when it stopped in
an orderly way) to one event file, which the tests read back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, Instance, wait_for

import ikos

# Metrics off: instances running side by side must not fight over the default port.
NO_METRICS = ["--metrics", "off"]

PROBE = """
import os
import signal
import time

import ikos


def note(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)


class Probe(ikos.Actor):
    def __init__(self, events, ignore_sigterm=False):
        self.events, self.ignore_sigterm = events, ignore_sigterm

    def on_start(self):
        if self.ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        note(self.events, f"start {self.name} {os.getpid()}")

    def receive(self, message):
        if isinstance(message, tuple) and message[0] == "sleep":
            note(self.events, f"busy {self.name}")
            time.sleep(message[1])
            return "slept"
        return os.getpid()

    def on_stop(self):
        note(self.events, f"stop {self.name}")

"""


def tree_source(events: Path, body: str) -> str:
    return f"EVENTS = {str(events)!r}\n" + PROBE + body


def events_of(path: Path) -> list[str]:
    """The event lines without PIDs: ``["start a", ..., "stop a"]``."""
    if not path.exists():
        return []
    return [" ".join(line.split()[:2]) for line in path.read_text().splitlines()]


def pids_of(path: Path) -> dict[str, list[int]]:
    """Each actor's PIDs, one per start."""
    out: dict[str, list[int]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if parts[0] == "start":
            out.setdefault(parts[1], []).append(int(parts[2]))
    return out


def close_pooled(ref: ikos.ActorRef) -> None:
    """Close this thread's pooled connection to ``ref``'s actor.

    There is no public way to do it, and leaving it to the garbage collector
    is not enough: the exception a failed ask raised holds it in a reference
    cycle, and the socket's own finalizer may then run first and warn.
    """
    ref._drop()


def stop_and_time(inst: Instance) -> tuple[int, float]:
    """SIGTERM ikosd; return its exit status and how long it took to exit."""
    t0 = time.monotonic()
    inst.proc.send_signal(signal.SIGTERM)
    code = inst.proc.wait(timeout=60)
    return code, time.monotonic() - t0


def test_sigterm_stops_in_reverse_start_order_across_nested_supervisors(ikosd_factory, tmp_path):
    events = tmp_path / "events"
    # The listed order differs from the start order: sub2 starts after d (`after`),
    # so the stop order below can only come from the start order, not from the list.
    inst = ikosd_factory(
        tree=tree_source(
            events,
            """
def actor(name):
    return ikos.Child(name, Probe, kwargs={"events": EVENTS})

tree = ikos.Supervisor("root", children=[
    ikos.Supervisor("sub2", children=[actor("e"), actor("f")], after=["d"]),
    actor("a"),
    ikos.Supervisor("sub1", strategy="one_for_all", children=[actor("b"), actor("c")]),
    actor("d"),
])
""",
        ),
        args=NO_METRICS,
    )
    # Start order a, sub1 (b, c), d, sub2 (e, f). Children without constraints
    # between them start together (one wave), so only `after` orders the starts.
    order = ["a", "b", "c", "d", "e", "f"]
    started = events_of(events)
    assert sorted(started) == [f"start {n}" for n in order]
    assert started.index("start d") < min(started.index("start e"), started.index("start f"))
    code, _ = stop_and_time(inst)
    assert code == 0
    # Stopping is one child at a time, in exactly the reverse of the start order.
    assert events_of(events)[len(order) :] == [f"stop {n}" for n in reversed(order)]
    assert inst.leftovers() == []


def test_child_ignoring_sigterm_is_killed_after_its_shutdown_timeout(ikosd_factory, tmp_path):
    events = tmp_path / "events"
    inst = ikosd_factory(
        tree=tree_source(
            events,
            """
tree = ikos.Supervisor("root", children=[
    ikos.Child("polite", Probe, kwargs={"events": EVENTS}),
    ikos.Child("stubborn", Probe, shutdown=0.5,
               kwargs={"events": EVENTS, "ignore_sigterm": True}),
])
""",
        ),
        args=NO_METRICS,
    )
    stubborn = inst.pid_of("stubborn")
    code, took = stop_and_time(inst)
    assert code == 0
    assert took >= 0.5, f"shutdown took {took:.3f} s, less than stubborn's timeout"
    assert took < HANG, f"shutdown took {took:.3f} s"  # a bound on hangs, not on speed
    assert "stubborn: did not stop within 0.5s: sending SIGKILL" in inst.log_text()
    # stubborn was killed (no on_stop), then polite stopped in order.
    assert events_of(events)[2:] == ["stop polite"]
    with pytest.raises(ProcessLookupError):
        os.kill(stubborn, 0)
    assert inst.leftovers() == []


def test_brutal_kill_kills_at_once_without_on_stop(ikosd_factory, tmp_path):
    events = tmp_path / "events"
    inst = ikosd_factory(
        tree=tree_source(
            events,
            """
tree = ikos.Supervisor("root", children=[
    ikos.Child("brute", Probe, shutdown="brutal_kill",
               kwargs={"events": EVENTS, "ignore_sigterm": True}),
    ikos.Child("other", Probe, kwargs={"events": EVENTS}),
])
""",
        ),
        args=NO_METRICS,
    )
    t0 = time.monotonic()
    st = inst.ctl("--json", "stop", "brute", check=True)
    took = time.monotonic() - t0
    status = inst.status("brute")
    assert status["state"] == "stopped" and status["pid"] is None
    assert status["last_exit"]["signal"] == signal.SIGKILL, st.stdout
    # A bound on hangs, not on speed: that the kill came at once, with no wait for the
    # default 5 s shutdown timeout, is the missing "did not stop within" line below.
    assert took < HANG, f"stopping a brutal_kill child took {took:.3f} s"
    assert "stop brute" not in events_of(events)
    assert "brute: did not stop within" not in inst.log_text()
    assert inst.terminate() == 0
    assert events_of(events)[-1] == "stop other"
    assert inst.leftovers() == []


def test_ikosctl_stop_holds_a_child_until_ikosctl_start_which_is_no_restart(
    ikosd_factory, tmp_path
):
    events = tmp_path / "events"
    inst = ikosd_factory(
        tree=tree_source(
            events,
            """
tree = ikos.Supervisor("root", strategy="one_for_all", max_restarts=10, within=60,
    children=[ikos.Child(n, Probe, kwargs={"events": EVENTS}) for n in ("a", "b", "c")])
""",
        ),
        args=NO_METRICS,
    )
    first = {n: pids[0] for n, pids in pids_of(events).items()}
    inst.ctl("stop", "b", check=True)
    st = inst.status("b")
    assert st["state"] == "stopped" and st["pid"] is None
    assert inst.ctl("is-active", "b").returncode == 3
    assert events_of(events)[-1] == "stop b"  # an orderly stop: on_stop ran
    # A stop by request is not a crash: nothing restarted, b included.
    assert {n: inst.pid_of(n) for n in "ac"} == {n: first[n] for n in "ac"}
    # one_for_all restarts everyone after a's crash, except the held b.
    os.kill(first["a"], signal.SIGKILL)
    for n in "ac":
        inst.wait_running_new_pid(n, first[n])
    inst.ctl("start", "a", check=True)  # a barrier through root's queue
    assert inst.state("b") == "stopped"
    assert len(pids_of(events)["b"]) == 1
    st = inst.ctl("--json", "start", "b", check=True)
    new_b = inst.wait_running_new_pid("b", None)
    assert pids_of(events)["b"] == [first["b"], new_b], st.stdout
    # An operator's stop and start are not a restart; a's crash restarted a and c.
    assert {n: inst.status(n)["restarts"] for n in "abc"} == {"a": 1, "b": 0, "c": 1}
    inst.ctl("restart", "b", check=True)  # nor is an operator's restart
    assert len(pids_of(events)["b"]) == 3 and inst.status("b")["restarts"] == 0
    assert inst.terminate() == 0
    assert inst.leftovers() == []


def test_queued_asks_of_a_stopping_actor_get_actor_dead_error(ikosd_factory, tmp_path):
    events = tmp_path / "events"
    inst = ikosd_factory(
        tree=tree_source(
            events,
            """
tree = ikos.Supervisor("root", children=[ikos.Child("busy", Probe, kwargs={"events": EVENTS})])
""",
        ),
        args=NO_METRICS,
    )
    askers = 4
    connected = threading.Barrier(askers + 1, timeout=30)
    go = threading.Event()
    results: dict[str, Any] = {}

    def late_asker(i: int) -> None:
        ref = ikos.ActorRef("busy", root=inst.root)
        try:
            ref.ask("pid", timeout=20)  # opens this thread's connection (handshake done)
            connected.wait()
            go.wait(30)
            t0 = time.monotonic()
            try:
                results[f"late{i}"] = ref.ask("late", timeout=2 * HANG)
            except Exception as exc:
                results[f"late{i}"] = exc
            results[f"late{i}-took"] = time.monotonic() - t0
        finally:
            close_pooled(ref)

    def busy_asker() -> None:
        ref = ikos.ActorRef("busy", root=inst.root)
        try:
            results["busy"] = ref.ask(("sleep", 2.0), timeout=30)
        except Exception as exc:
            results["busy"] = exc
        finally:
            close_pooled(ref)

    threads = [threading.Thread(target=late_asker, args=(i,)) for i in range(askers)]
    for t in threads:
        t.start()
    connected.wait()
    busy = threading.Thread(target=busy_asker)
    busy.start()
    threads.append(busy)
    wait_for(lambda: "busy busy" in events_of(events), message="busy to be inside receive")
    go.set()  # the asks queue up behind the sleeping receive
    try:
        inst.ctl("stop", "busy", check=True)
    finally:
        go.set()
        for t in threads:
            t.join(60)
    assert results["busy"] == "slept"  # the message being handled finishes
    for i in range(askers):
        assert isinstance(results[f"late{i}"], ikos.ActorDeadError), results
        assert results[f"late{i}-took"] < HANG  # not the ask's timeout (a bound on hangs)
    assert inst.state("busy") == "stopped"
    assert events_of(events)[-1] == "stop busy"
    assert inst.terminate() == 0
    assert inst.leftovers() == []
