"""Restart intensity with real processes: escalation up the tree, up to ikosd's exit 1.

OTP's rule: more than ``max_restarts`` restarts within ``within`` seconds
make a supervisor stop its children and fail to its parent, which handles it
like any child's crash; when the root gives up, ikosd stops everything and
exits with status 1, leaving no process behind. Crashes are SIGKILLs of real
actors; restarts are seen as new PIDs in a start log every actor appends to
(``"<name> <pid>"``), so the tests react within milliseconds of a restart
instead of polling ikosctl.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import Instance, wait_for

# Metrics off: instances running side by side must not fight over the default port.
NO_METRICS = ["--metrics", "off"]

PROBE = """
import os

import ikos


class Probe(ikos.Actor):
    def __init__(self, log):
        self.log = log

    def on_start(self):
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.name} {os.getpid()}\\n".encode())
        finally:
            os.close(fd)

    def receive(self, message):
        return os.getpid()

"""


def starts(log: Path, name: str) -> list[int]:
    """PIDs of ``name``'s starts, in order."""
    if not log.exists():
        return []
    return [
        int(pid) for n, pid in (line.split() for line in log.read_text().splitlines()) if n == name
    ]


def next_start(log: Path, name: str, count: int, timeout: float = 20.0) -> int:
    """Wait for ``name``'s start number ``count`` (1-based) and return its PID."""
    pids = wait_for(
        lambda: (p := starts(log, name)) and len(p) >= count and p,
        timeout,
        message=f"start #{count} of {name}",
    )
    assert len(pids) == count, f"{name} started more often than expected: {pids}"
    return int(pids[-1])


def crash(log: Path, name: str, expected_starts: int) -> int:
    """SIGKILL ``name``'s current incarnation (start number ``expected_starts``)."""
    pid = next_start(log, name, expected_starts)
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_exit(inst: Instance, timeout: float = 30.0) -> int:
    return inst.proc.wait(timeout=timeout)


def barrier(inst: Instance, name: str) -> None:
    """A no-op through ``name``'s supervisor's queue: earlier exits have been handled."""
    inst.ctl("start", name, check=True)


def tree_source(log: Path, body: str) -> str:
    return f"LOG = {str(log)!r}\n" + PROBE + body


def test_intensity_escalates_through_two_levels_to_exit_1(ikosd_factory, tmp_path):
    log = tmp_path / "starts.log"
    inst = ikosd_factory(
        tree=tree_source(
            log,
            """
tree = ikos.Supervisor("root", max_restarts=1, within=60, children=[
    ikos.Supervisor("mid", max_restarts=1, within=60, children=[
        ikos.Child("w", Probe, kwargs={"log": LOG}),
    ]),
    ikos.Child("side", Probe, kwargs={"log": LOG}),
])
""",
        ),
        args=NO_METRICS,
        expect_exit=1,  # every test here ends in an escalation
    )
    side = next_start(log, "side", 1)
    # Round 1: mid absorbs the first crash, gives up at the second; root restarts mid.
    crash(log, "w", 1)
    crash(log, "w", 2)
    w3 = next_start(log, "w", 3)
    wait_for(
        lambda: (s := inst.status("mid"))["state"] == "running" and s["restarts"] == 1,
        message="root to restart mid",
    )
    barrier(inst, "side")
    assert inst.proc.poll() is None
    assert inst.status("w")["pid"] == w3
    assert starts(log, "side") == [side]  # one_for_one at the root: side kept running
    text = inst.log_text()
    assert "supervisor mid: reached max restart intensity (1 in 60 s)" in text
    assert "the root supervisor gave up" not in text
    # Round 2: a restarted mid has a fresh history, so again one crash is absorbed;
    # the second makes mid fail again, its second failure within 60 s for root.
    crash(log, "w", 3)
    crash(log, "w", 4)
    assert wait_exit(inst) == 1
    text = inst.log_text()
    assert "supervisor root: reached max restart intensity (1 in 60 s) after 'mid'" in text
    assert "the root supervisor gave up" in text
    assert starts(log, "w")[4:] == []  # mid was not started a third time
    assert inst.leftovers() == []


def test_one_failure_counts_once_even_when_several_children_restart(ikosd_factory, tmp_path):
    log = tmp_path / "starts.log"
    inst = ikosd_factory(
        tree=tree_source(
            log,
            """
tree = ikos.Supervisor("root", strategy="one_for_all", max_restarts=1, within=60,
    children=[ikos.Child(n, Probe, kwargs={"log": LOG}) for n in ("a", "b", "c")])
""",
        ),
        args=NO_METRICS,
        expect_exit=1,  # every test here ends in an escalation
    )
    first = {n: next_start(log, n, 1) for n in "abc"}
    crash(log, "b", 1)
    second = {n: next_start(log, n, 2) for n in "abc"}  # all three restarted...
    assert all(second[n] != first[n] for n in "abc")
    barrier(inst, "a")
    assert inst.proc.poll() is None  # ...and that was one restart, within the limit of 1
    assert inst.status("root")["state"] == "running"
    crash(log, "b", 2)  # the second failure within the window escalates
    assert wait_exit(inst) == 1
    assert all(len(starts(log, n)) == 2 for n in "abc")
    assert inst.leftovers() == []


def test_max_restarts_zero_escalates_at_the_first_crash(ikosd_factory, tmp_path):
    log = tmp_path / "starts.log"
    inst = ikosd_factory(
        tree=tree_source(
            log,
            """
tree = ikos.Supervisor("root", max_restarts=0, within=60, children=[
    ikos.Child("a", Probe, kwargs={"log": LOG}),
    ikos.Child("b", Probe, kwargs={"log": LOG}),
])
""",
        ),
        args=NO_METRICS,
        expect_exit=1,  # every test here ends in an escalation
    )
    next_start(log, "a", 1)
    crash(log, "b", 1)
    assert wait_exit(inst) == 1
    assert starts(log, "b")[1:] == [] and len(starts(log, "a")) == 1
    assert "reached max restart intensity (0 in 60 s) after 'b' killed by SIGKILL" in (
        inst.log_text()
    )
    assert inst.leftovers() == []


def test_crashes_spaced_wider_than_the_window_never_escalate(ikosd_factory, tmp_path):
    within = 1.0
    log = tmp_path / "starts.log"
    inst = ikosd_factory(
        tree=tree_source(
            log,
            f"""
tree = ikos.Supervisor("root", max_restarts=1, within={within}, children=[
    ikos.Child("w", Probe, kwargs={{"log": LOG}}),
])
""",
        ),
        args=NO_METRICS,
        expect_exit=1,  # every test here ends in an escalation
    )
    for n in range(1, 4):
        crash(log, "w", n)
        next_start(log, "w", n + 1)  # the restart was recorded before this returned
        # The window is what is tested: let it pass, so that the next crash finds
        # the history empty. (Not a wait for an event: nothing else is observable.)
        time.sleep(within + 0.25)
        assert inst.proc.poll() is None
    barrier(inst, "w")
    st = inst.status("w")
    assert st["state"] == "running" and st["restarts"] == 3
    # The same two crashes back to back, inside the window, do escalate.
    crash(log, "w", 4)
    crash(log, "w", 5)
    assert wait_exit(inst) == 1
    assert inst.leftovers() == []
