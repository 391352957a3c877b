"""Back-off between restarts, measured on a real actor killed again and again.

With ``Backoff(min=0.2, max=0.8, random_factor=0.5)`` the n-th consecutive
restart waits ``min(max, min * 2**n) * (1 + u * random_factor)`` seconds,
``u`` uniform in [0, 1) (Akka's BackoffSupervisor). The delay ikosd logs
when it enters ``backoff`` must lie between the lower bound
``min(max, min * 2**n)`` and that times ``1 + random_factor``, exactly. The
wait is real: measured from just before the SIGKILL to the next
``on_start`` (the actor writes ``time.time()`` to its start log), it is at
least the lower bound, and the status says ``backoff`` meanwhile. How soon
after the delay the new process runs is restart latency, a benchmark's
business (bench/exec.py, bench/actors.py), so the measured delay's upper
bound here is only one on hangs. After ``reset_after`` seconds of stable
running the count starts again at 0.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from conftest import HANG, wait_for

from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths

# reset_after is long enough for the test to kill each incarnation well before it,
# even on a loaded machine (a kill after it would reset the count it checks).
MIN, MAX, RANDOM_FACTOR, RESET_AFTER = 0.2, 0.8, 0.5, 3.0

# Metrics off: instances running side by side must not fight over the default port.
NO_METRICS = ["--metrics", "off"]

TREE = """
import os
import time

import ikos


class Probe(ikos.Actor):
    def __init__(self, log):
        self.log = log

    def on_start(self):
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {time.time()!r}\\n".encode())
        finally:
            os.close(fd)

    def receive(self, message):
        return os.getpid()


tree = ikos.Supervisor("root", max_restarts=100, within=60, children=[
    ikos.Child("w", Probe, kwargs={"log": LOG}, backoff=ikos.Backoff(
        min=MIN, max=MAX, random_factor=RANDOM_FACTOR, reset_after=RESET_AFTER)),
])
"""


def starts(log: Path) -> list[tuple[int, float]]:
    """(pid, time.time() at on_start) for every start, in order."""
    if not log.exists():
        return []
    return [(int(p), float(t)) for p, t in (line.split() for line in log.read_text().splitlines())]


def start_number(log: Path, count: int, timeout: float = 20.0) -> tuple[int, float]:
    runs = wait_for(
        lambda: len(s := starts(log)) >= count and s, timeout, message=f"start #{count}"
    )
    assert len(runs) == count, f"more starts than expected: {runs}"
    return runs[-1]


def bounds(n: int) -> tuple[float, float]:
    """The n-th restart's delay: Akka's lower bound and upper bound (without slack)."""
    base = min(MAX, MIN * 2**n)
    return base, base * (1 + RANDOM_FACTOR)


def announced_delays(text: str) -> list[float]:
    """The delays ikosd logged on each transition into ``backoff``."""
    return [
        float(d) for d in re.findall(r"actor w: \w+ -> backoff \(restarting in ([\d.]+) s\)", text)
    ]


def test_backoff_delays_stay_within_akka_bounds_and_reset(ikosd_factory, tmp_path):
    log = tmp_path / "starts.log"
    header = f"LOG = {str(log)!r}\n"
    header += (
        f"MIN, MAX, RANDOM_FACTOR, RESET_AFTER = {MIN}, {MAX}, {RANDOM_FACTOR}, {RESET_AFTER}\n"
    )
    inst = ikosd_factory(tree=header + TREE, args=NO_METRICS)
    with ControlClient(InstancePaths.for_root(inst.root)) as client:

        def status() -> dict[str, Any]:
            return dict(client.call("status", {"names": ["w"]})[0])

        def kill_when_running(count: int) -> tuple[float, float]:
            """Kill start number ``count`` once it runs; return (its start, the kill) times."""
            pid, started = start_number(log, count)
            wait_for(lambda: (s := status())["state"] == "running" and s["pid"] == pid)
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            return started, killed

        for n in range(4):  # 0.2, 0.4, 0.8, then capped at 0.8 (before jitter)
            started, killed = kill_when_running(n + 1)
            # Killed before reset_after of running, so the count keeps growing.
            assert killed - started < RESET_AFTER
            low, high = bounds(n)
            if low >= 0.4:  # a window wide enough to be seen by polling
                seen = wait_for(
                    lambda: (s := status())["state"] == "backoff" and s,
                    timeout=high,
                    interval=0.005,
                    message=f"w in backoff before restart {n}",
                )
                assert seen["pid"] is None
            _, restarted = start_number(log, n + 2)
            delay = restarted - killed
            # at least the delay; the upper bound is on hangs, not a performance claim
            assert low <= delay < high + HANG, f"restart {n}: {delay:.3f} s, below {low}"
        assert status()["restarts"] == 4

        # Running for longer than reset_after: the next delay is the first one again.
        pid, started = start_number(log, 5)
        wait_for(lambda: (s := status())["state"] == "running" and s["pid"] == pid)
        # The stable period is the thing tested: let it pass.
        time.sleep(max(0.0, started + RESET_AFTER + 0.3 - time.time()))
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        _, restarted = start_number(log, 6)
        low, high = bounds(0)
        delay = restarted - killed
        assert low <= delay < high + HANG, f"after a reset: {delay:.3f} s, below {low}"

    # ikosd's own account of each delay: exactly the bounds, without any slack.
    announced = announced_delays(inst.log_text())
    assert len(announced) == 5, announced
    for n, d in enumerate(announced[:4]):
        low, high = bounds(n)
        assert low <= d <= high + 0.001, (n, announced)
    # after the reset, the first delay again: without it, the capped one (at least MAX)
    assert bounds(0)[0] <= announced[4] <= bounds(0)[1] + 0.001, announced
    assert inst.terminate() == 0
    assert inst.leftovers() == []
