"""Metrics of issue 9 beyond the daemons': supervisors, actors' mailboxes and asks, the registry.

Each test runs a real ikosd, makes a known situation (messages sent, a child
crashed, health checks passing and failing, a daemon removed) and reads
``/metrics`` until the series show it, polling, never sleeping. The actors'
counters live in a page of shared memory per incarnation
(``ikos.actors._stats``): the tests also check that no mapping or descriptor
of it outlives its actor, and that the counters survive a ``kill -9`` of
ikosd, whose successor adopts the running actors.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, wait_for
from prometheus import fetch_metrics, promtool_check_metrics
from prometheus_client.parser import text_string_to_metric_families
from test_health_live import sleeper

import ikos
from ikos.actors._stats import (
    ASK_BUCKETS,
    ASK_SUM_NS,
    FIRST_BUCKET,
    MEMFD_NAME,
    RECEIVED,
    SIZE,
    TAKEN,
    create_stats_fd,
    map_for_reading,
    map_for_writing,
    read_figures,
)

HEAD = """
[root]
max_restarts = 10
within = 60

[supervisors.crashers]
max_restarts = 5
within = 3600

[actors.worker]
class = "examples.actors:Crashy"
"""
CRASHY = """
[actors.crashy]
class = "examples.actors:Crashy"
supervisor = "crashers"
"""


# a sleeper offering NAME/svc, checked every 0.1 s by a command
WELL = sleeper("well", 'kind = "exec"\ntarget = "true"')
SICK = sleeper("sick", 'kind = "exec"\ntarget = "false"')
CHECKED = WELL + SICK
CONFIG = HEAD + CRASHY + CHECKED


def metrics_url(inst: Instance) -> str:
    [root] = [s for s in inst.status() if s["supervisor"] is None]
    return str(root["metrics"])


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(inst: Instance, name: str, **labels: str) -> float | None:
    """The value of one series on ikosd's ``/metrics`` now, None when it is absent."""
    return samples(fetch_metrics(metrics_url(inst))).get((name, frozenset(labels.items())))


def wait_value(inst: Instance, name: str, expected: float, **labels: str) -> None:
    wait_for(
        lambda: value(inst, name, **labels) == expected,
        message=f"{name}{labels} == {expected} (last: {value(inst, name, **labels)})",
    )


def ref(inst: Instance, name: str) -> ikos.ActorRef:
    return ikos.ActorRef(name, root=inst.root)


def stats_mappings(pid: int) -> int:
    """How many mappings of actors' counters process ``pid`` holds."""
    text = Path(f"/proc/{pid}/maps").read_text()
    return sum(1 for line in text.splitlines() if f"memfd:{MEMFD_NAME}" in line)


def stats_fds(pid: int) -> int:
    """How many descriptors of actors' counters process ``pid`` holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if f"memfd:{MEMFD_NAME}" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                count += 1
        except OSError:
            pass
    return count


def keeper_pid(inst: Instance) -> int:
    """The descriptor keeper of ``inst`` (it holds a copy of every actor's counters)."""
    sock = str(inst.root / "run" / "ikos" / "fdstore.sock").encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if sock in cmdline.split(b"\0"):
                return int(entry)
    raise AssertionError("no descriptor keeper found")


# --- actors -----------------------------------------------------------------------------


def test_an_actor_shows_the_messages_it_handled_and_its_asks(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=CONFIG)
    worker = ref(inst, "worker")
    assert value(inst, "ikos_actor_messages_total", daemon="worker") == 0
    for i in range(50):
        worker.tell(i)
    for _ in range(7):
        assert worker.ask("pid", timeout=30) == inst.pid_of("worker")
    # the asks were answered after the tells were handled (one mailbox, in order)
    assert value(inst, "ikos_actor_messages_total", daemon="worker") == 57
    assert value(inst, "ikos_actor_mailbox_depth", daemon="worker") == 0
    assert value(inst, "ikos_actor_ask_duration_seconds_count", daemon="worker") == 7
    ask_sum = value(inst, "ikos_actor_ask_duration_seconds_sum", daemon="worker")
    assert ask_sum is not None and ask_sum > 0
    buckets = [
        value(inst, "ikos_actor_ask_duration_seconds_bucket", daemon="worker", le=le)
        for le in [repr(b) for b in ASK_BUCKETS] + ["+Inf"]
    ]
    assert all(b is not None for b in buckets)
    assert buckets == sorted(buckets)  # type: ignore[type-var]
    assert buckets[-1] == 7
    # another actor's counters are its own
    assert value(inst, "ikos_actor_messages_total", daemon="crashy") == 0


def test_messages_waiting_behind_a_slow_handler_show_as_mailbox_depth(
    ikosd_factory: Any,
) -> None:
    inst = ikosd_factory(config=CONFIG)
    worker = ref(inst, "worker")
    for _ in range(10):
        worker.tell(("sleep", 0.3))
    wait_for(
        lambda: (value(inst, "ikos_actor_mailbox_depth", daemon="worker") or 0) > 0,
        message="messages waiting in worker's mailbox",
    )
    wait_value(inst, "ikos_actor_messages_total", 10, daemon="worker")
    wait_value(inst, "ikos_actor_mailbox_depth", 0, daemon="worker")


def test_actor_counters_go_with_their_process_and_leave_nothing_behind(
    ikosd_factory: Any,
) -> None:
    inst = ikosd_factory(config=HEAD + CRASHY)
    keeper = keeper_pid(inst)
    # one mapping per running actor in ikosd (its mmap keeps a descriptor), one
    # descriptor per actor in the keeper
    assert stats_mappings(inst.pid) == 2 and stats_fds(inst.pid) == 2
    wait_for(lambda: stats_fds(keeper) == 2, message="the keeper to hold both counters")
    worker = ref(inst, "worker")
    worker.tell("hello")
    wait_value(inst, "ikos_actor_messages_total", 1, daemon="worker")
    # a restart starts from zero (a new process, a new page), the old page is gone
    pid = inst.pid_of("worker")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    inst.wait_running_new_pid("worker", pid)
    wait_value(inst, "ikos_actor_messages_total", 0, daemon="worker")
    assert stats_mappings(inst.pid) == 2 and stats_fds(inst.pid) == 2
    wait_for(lambda: stats_fds(keeper) == 2, message="the keeper to hold one page per actor")
    # a stopped actor has no counters, and nothing of them is left anywhere
    inst.ctl("stop", "worker", check=True)
    assert value(inst, "ikos_actor_messages_total", daemon="worker") is None
    assert value(inst, "ikos_actor_mailbox_depth", daemon="worker") is None
    assert value(inst, "ikos_actor_ask_duration_seconds_count", daemon="worker") is None
    assert stats_mappings(inst.pid) == 1 and stats_fds(inst.pid) == 1
    wait_for(lambda: stats_fds(keeper) == 1, message="the keeper to drop worker's counters")
    inst.ctl("start", "worker", check=True)
    wait_value(inst, "ikos_actor_messages_total", 0, daemon="worker")


def test_actor_counters_survive_a_kill_9_of_ikosd(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=HEAD + CRASHY, name="same")
    worker = ref(inst, "worker")
    for _ in range(5):
        worker.ask("x", timeout=30)
    pid = inst.pid_of("worker")
    wait_value(inst, "ikos_actor_messages_total", 5, daemon="worker")
    inst.crash()
    again = ikosd_factory(config=HEAD + CRASHY, name="same")
    assert again.pid_of("worker") == pid  # adopted, not restarted
    assert value(again, "ikos_actor_messages_total", daemon="worker") == 5
    assert value(again, "ikos_actor_ask_duration_seconds_count", daemon="worker") == 5
    worker.ask("x", timeout=30)
    assert value(again, "ikos_actor_messages_total", daemon="worker") == 6
    assert stats_mappings(again.pid) == 2


# --- supervisors ------------------------------------------------------------------------


def test_a_supervisor_shows_its_restarts_and_the_intensity_left(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=HEAD + CRASHY)
    assert value(inst, "ikos_supervisor_restarts_total", supervisor="crashers") == 0
    assert value(inst, "ikos_supervisor_intensity_left", supervisor="crashers") == 5
    for n in (1, 2):
        pid = inst.pid_of("crashy")
        ref(inst, "crashy").tell("crash")
        inst.wait_running_new_pid("crashy", pid)
        wait_value(inst, "ikos_supervisor_restarts_total", n, supervisor="crashers")
        assert value(inst, "ikos_supervisor_intensity_left", supervisor="crashers") == 5 - n
    # the root restarted nothing: its window is untouched
    assert value(inst, "ikos_supervisor_restarts_total", supervisor="root") == 0
    assert value(inst, "ikos_supervisor_intensity_left", supervisor="root") == 10


def test_a_supervisor_that_gave_up_has_no_intensity_left(ikosd_factory: Any) -> None:
    config = HEAD.replace("max_restarts = 5", "max_restarts = 1") + CRASHY.replace(
        "[actors.crashy]", '[actors.crashy]\nrestart = "permanent"'
    )
    config = config.replace(
        "[supervisors.crashers]", '[supervisors.crashers]\nrestart = "temporary"'
    )
    inst = ikosd_factory(config=config)
    pid = inst.pid_of("crashy")
    ref(inst, "crashy").tell("crash")
    inst.wait_running_new_pid("crashy", pid)
    wait_value(inst, "ikos_supervisor_intensity_left", 0, supervisor="crashers")
    ref(inst, "crashy").tell("crash")  # one more than it allows: it gives up
    inst.wait_state("crashers", "failed")
    assert value(inst, "ikos_supervisor_intensity_left", supervisor="crashers") == 0
    assert value(inst, "ikos_supervisor_restarts_total", supervisor="crashers") == 1


# --- the registry -----------------------------------------------------------------------


def test_services_and_health_checks_show_their_results(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=CONFIG)
    well, sick = "exec true", "exec false"
    wait_value(inst, "ikos_health_check_up", 1, daemon="well", check=well)
    wait_value(inst, "ikos_health_check_up", 0, daemon="sick", check=sick)
    wait_value(inst, "ikos_service_up", 1, service="well/svc", daemon="well")
    wait_value(inst, "ikos_service_up", 0, service="sick/svc", daemon="sick")
    wait_for(
        lambda: (
            (value(inst, "ikos_health_checks_total", daemon="well", check=well, result="pass") or 0)
            >= 2
        ),
        message="passes of well's check counted",
    )
    wait_for(
        lambda: (
            (value(inst, "ikos_health_checks_total", daemon="sick", check=sick, result="fail") or 0)
            >= 2
        ),
        message="failures of sick's check counted",
    )
    assert value(inst, "ikos_health_checks_total", daemon="well", check=well, result="fail") == 0
    assert value(inst, "ikos_health_checks_total", daemon="sick", check=sick, result="pass") == 0
    registered = inst.ctl("services", "--json", check=True).stdout
    assert value(inst, "ikos_registry_services") == len(json.loads(registered))
    # a stopped provider: its service is down, its check has no last result, the
    # counts stay (they go on when it runs again)
    inst.ctl("stop", "well", check=True)
    wait_value(inst, "ikos_service_up", 0, service="well/svc", daemon="well")
    assert value(inst, "ikos_health_check_up", daemon="well", check=well) is None
    assert (
        value(inst, "ikos_health_checks_total", daemon="well", check=well, result="pass") or 0
    ) >= 2


# --- removal and the exposition as a whole ------------------------------------------------


def test_removed_daemons_leave_no_series_and_promtool_accepts_the_whole(
    ikosd_factory: Any,
) -> None:
    inst = ikosd_factory(config=CONFIG)
    ref(inst, "crashy").ask("x", timeout=30)
    ref(inst, "worker").ask("x", timeout=30)
    wait_value(inst, "ikos_health_check_up", 0, daemon="sick", check="exec false")
    text = fetch_metrics(metrics_url(inst))
    assert promtool_check_metrics(text) == (0, "")
    for label in (
        'daemon="crashy"',
        'supervisor="crashers"',
        'daemon="sick"',
        'service="sick/svc"',
    ):
        assert label in text
    kept = HEAD.replace("[supervisors.crashers]\nmax_restarts = 5\nwithin = 3600\n", "") + WELL
    (inst.root.parent / "ikos.toml").write_text(kept)
    inst.ctl("reload-config", check=True)

    def gone() -> bool:
        text = fetch_metrics(metrics_url(inst))
        return not any(
            label in text for label in ('daemon="crashy"', 'supervisor="crashers"', 'daemon="sick"')
        )

    wait_for(gone, message="the removed daemons' series to go")
    text = fetch_metrics(metrics_url(inst))
    assert 'daemon="worker"' in text and 'daemon="well"' in text
    assert promtool_check_metrics(text) == (0, "")


# --- the shared page, without ikosd -------------------------------------------------------


def test_the_counters_page_reads_what_the_actor_wrote() -> None:
    fd = create_stats_fd()
    try:
        region = map_for_reading(fd)
        assert region is not None
        view = map_for_writing(os.dup(fd))
        figures = read_figures(region)
        assert figures is not None and figures.messages == 0 and figures.ask_count == 0
        view[RECEIVED] += 5
        view[TAKEN] += 3
        view[ASK_SUM_NS] += 1_500_000_000
        view[FIRST_BUCKET] += 1  # <= 10 µs
        view[FIRST_BUCKET + len(ASK_BUCKETS)] += 2  # > 10 s
        figures = read_figures(region)
        assert figures is not None
        assert (figures.mailbox_depth, figures.messages) == (2, 3)
        assert figures.ask_sum_seconds == 1.5
        assert figures.ask_buckets[0] == 1 and figures.ask_buckets[-2] == 1
        assert figures.ask_buckets[-1] == figures.ask_count == 3
        view.release()
        region.close()
        assert read_figures(region) is None  # closed: no figures, no crash
    finally:
        os.close(fd)


def test_a_page_that_is_not_sealed_or_not_of_the_layout_is_refused(tmp_path: Path) -> None:
    unsealed = os.memfd_create("x")
    try:
        os.ftruncate(unsealed, SIZE)
        assert map_for_reading(unsealed) is None  # the actor could shrink it under us
    finally:
        os.close(unsealed)
    with open(tmp_path / "f", "wb+") as f:
        assert map_for_reading(f.fileno()) is None


@pytest.mark.parametrize("seconds", [0.0, 1e-5, 0.002, 11.0])
def test_bucket_bounds_hold_their_upper_bound(seconds: float) -> None:
    from bisect import bisect_left

    from ikos.actors._stats import ASK_BUCKETS_NS

    index = bisect_left(ASK_BUCKETS_NS, round(seconds * 1e9))
    bounds = (*ASK_BUCKETS, float("inf"))
    assert seconds <= bounds[index]
    assert index == 0 or seconds > bounds[index - 1]
