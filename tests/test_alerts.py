"""Alerts: the rules with a fake clock, the configuration, and the real ikosd raising them.

The engine (:mod:`ikos.monitor._alerts`) is driven with explicit times:
an alert fires only once its condition held for ``for``, resolves only
after ``resolve_for`` below ``resolve_below``, restarts count in a sliding
window, and the notification limiter holds back repeats. Then a real ikosd:
an actor that grows past a memory threshold raises an alert seen by
``ikosctl alerts``, ``ikosctl events``, a subscriber of ``ikos.alerts`` and
``/metrics``, which resolves when it frees the memory; a restart action
restarts the daemon once and the rate limit keeps it from looping; a
crash-looping daemon raises ``restarts``, and its supervisor ``gave_up``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, IKOSCTL, Instance, wait_for

import ikos.ipc
from ikos._errors import ConfigError
from ikos.manager._config import load_config, read_alert_settings
from ikos.monitor._alerts import (
    AlertEngine,
    AlertRules,
    NotificationLimiter,
    Rule,
    parse_size,
)

MIB = 1024 * 1024

# -- the engine, with a fake clock ----------------------------------------------------------


def events(changes: list[Any]) -> list[tuple[str, str, str]]:
    return [(c.event, c.alert.alert, c.alert.daemon) for c in changes]


def test_threshold_fires_only_after_its_duration() -> None:
    engine = AlertEngine(AlertRules({"memory": Rule("memory", above=100, for_=10)}))
    assert engine.observe("web", {"memory": 150}, now=0.0) == []
    assert engine.observe("web", {"memory": 150}, now=9.9) == []
    # a dip below the line starts the duration over
    assert engine.observe("web", {"memory": 50}, now=10.0) == []
    assert engine.observe("web", {"memory": 150}, now=11.0) == []
    assert engine.observe("web", {"memory": 150}, now=20.9) == []
    fired = engine.observe("web", {"memory": 160}, now=21.0)
    assert events(fired) == [("fired", "memory", "web")]
    alert = fired[0].alert
    assert (alert.value, alert.threshold, alert.since, alert.severity) == (
        160,
        100,
        21.0,
        "warning",
    )
    assert [a.daemon for a in engine.active()] == ["web"]
    assert engine.fired["memory"] == 1
    # firing is once: still above, nothing new
    assert engine.observe("web", {"memory": 170}, now=30.0) == []
    assert engine.active()[0].value == 170  # the active set shows the latest value


def test_threshold_resolves_after_resolve_for_below_resolve_below() -> None:
    rule = Rule("fds", above=100, for_=0, resolve_for=5, resolve_below=80)
    engine = AlertEngine(AlertRules({"fds": rule}))
    assert events(engine.observe("db", {"fds": 100}, now=0.0)) == [("fired", "fds", "db")]
    # under the threshold but not under resolve_below: hysteresis keeps it active
    assert engine.observe("db", {"fds": 90}, now=1.0) == []
    assert engine.observe("db", {"fds": 90}, now=100.0) == []
    assert engine.observe("db", {"fds": 70}, now=101.0) == []
    assert engine.observe("db", {"fds": 85}, now=104.0) == []  # back above: starts over
    assert engine.observe("db", {"fds": 70}, now=105.0) == []
    assert engine.observe("db", {"fds": 70}, now=109.9) == []
    assert events(engine.observe("db", {"fds": 70}, now=110.0)) == [("resolved", "fds", "db")]
    assert engine.active() == []


def test_resolve_for_defaults_to_for() -> None:
    engine = AlertEngine(AlertRules({"cpu": Rule("cpu", above=0.9, for_=3)}))
    engine.observe("w", {"cpu": 1.0}, now=0.0)
    assert events(engine.observe("w", {"cpu": 1.0}, now=3.0)) == [("fired", "cpu", "w")]
    assert engine.observe("w", {"cpu": 0.1}, now=4.0) == []
    assert engine.observe("w", {"cpu": 0.1}, now=6.9) == []
    assert events(engine.observe("w", {"cpu": 0.1}, now=7.0)) == [("resolved", "cpu", "w")]


def test_a_daemon_that_stops_running_resolves_its_usage_alerts() -> None:
    engine = AlertEngine(AlertRules({"memory": Rule("memory", above=10)}))
    engine.observe("w", {"memory": 20}, now=0.0)
    assert events(engine.stopped_running("w", now=1.0)) == [("resolved", "memory", "w")]
    assert engine.stopped_running("w", now=2.0) == []


def test_restarts_count_within_their_window() -> None:
    engine = AlertEngine(AlertRules({"restarts": Rule("restarts", above=3, window=60)}))
    assert engine.restarted("w", now=0.0) == []
    assert engine.restarted("w", now=10.0) == []
    assert engine.tick(now=30.0) == []
    assert events(engine.restarted("w", now=50.0)) == [("fired", "restarts", "w")]
    assert engine.active()[0].value == 3
    assert engine.tick(now=59.0) == []
    # the first restart leaves the window at 60: two remain, under the threshold
    assert events(engine.tick(now=60.0)) == [("resolved", "restarts", "w")]
    assert engine.tick(now=200.0) == []


def test_event_alerts_fire_at_once_and_clear() -> None:
    engine = AlertEngine()
    fired = engine.raise_event("w", "failed", now=5.0, message="w: crashed")
    assert events(fired) == [("fired", "failed", "w")]
    assert fired[0].alert.severity == "critical"
    assert engine.raise_event("w", "failed", now=6.0, message="again") == []  # already active
    assert events(engine.clear_event("w", "failed", now=7.0)) == [("resolved", "failed", "w")]
    assert engine.clear_event("w", "failed", now=8.0) == []


def test_a_removed_daemon_takes_its_alerts_along() -> None:
    engine = AlertEngine(AlertRules({"fds": Rule("fds", above=1)}))
    engine.observe("gone", {"fds": 5}, now=0.0)
    engine.observe("kept", {"fds": 5}, now=0.0)
    engine.restarted("gone", now=0.0)
    assert events(engine.forget(["kept"], now=1.0)) == [("resolved", "fds", "gone")]
    assert [a.daemon for a in engine.active()] == ["kept"]
    assert engine.tick(now=2.0) == [] and engine.forget(["kept"], now=3.0) == []


def test_per_daemon_rules_replace_or_turn_off_the_defaults() -> None:
    rules = AlertRules(
        {"fds": Rule("fds", above=10)},
        {"quiet": {"fds": None, "failed": None}, "big": {"fds": Rule("fds", above=1000)}},
    )
    engine = AlertEngine(rules)
    assert events(engine.observe("any", {"fds": 11}, now=0.0)) == [("fired", "fds", "any")]
    assert engine.observe("quiet", {"fds": 11}, now=0.0) == []
    assert engine.observe("big", {"fds": 11}, now=0.0) == []
    assert engine.raise_event("quiet", "failed", now=0.0, message="x") == []


def test_limiter_holds_back_repeats_per_key_and_in_all() -> None:
    limiter = NotificationLimiter(interval=60, per_minute=3)
    key = ("fired", "memory", "web")
    assert limiter.allow(key, 0.0)
    assert not limiter.allow(key, 59.0)
    assert limiter.allow(key, 60.0)
    assert limiter.suppressed == 1
    # the global cap: 3 a minute, whatever the keys
    assert limiter.allow(("fired", "fds", "a"), 61.0)
    assert limiter.allow(("fired", "fds", "b"), 62.0)  # 60, 61, 62: three in a minute
    assert not limiter.allow(("fired", "fds", "c"), 63.0)
    assert not limiter.allow(("fired", "fds", "d"), 64.0)
    assert limiter.allow(("fired", "fds", "e"), 120.5)  # the one at 60 left the minute
    assert limiter.suppressed == 3
    assert limiter.take_held() == {"fired:memory": 1, "fired:fds": 2}
    assert limiter.take_held() == {}


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 * MIB
    assert parse_size("1.5G") == int(1.5 * 1024 * MIB)
    assert parse_size("100kB") == 100_000
    assert parse_size("64M") == 64 * MIB
    for bad in ("", "12 parsecs", "-1", "iB", True, -5):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]


# -- configuration -------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ikos.toml"
    path.write_text(text)
    return path


def test_config_defaults_and_daemon_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[alerts]
notify_interval = 10
max_per_minute = 5
[alerts.memory]
above = "512MiB"
for = 30
severity = "critical"
[alerts.failed]
enabled = false
[executables.web]
executable = "/bin/sleep"
args = ["1000"]
[executables.web.alerts.memory]
above = "1GiB"
action = "restart"
[executables.web.alerts.restarts]
above = 3
window = 120
typo = 1
[executables.db]
executable = "/bin/sleep"
args = ["1000"]
[executables.db.alerts]
memory = false
""",
    )
    loaded = load_config(path)
    assert any("[executables.web.alerts.restarts] unknown key 'typo'" in w for w in loaded.warnings)
    settings, _ = read_alert_settings(path)
    assert (settings.notify_interval, settings.max_per_minute) == (10.0, 5)
    web = settings.rules.for_daemon("web")
    # the daemon's table changes what it names and keeps the defaults' other keys
    assert web["memory"] == Rule(
        "memory", above=1024 * MIB, for_=30, severity="critical", action="restart"
    )
    assert web["restarts"] == Rule("restarts", above=3, window=120)
    assert "failed" not in web and "gave_up" in web and "health" in web
    assert "memory" not in settings.rules.for_daemon("db")
    assert settings.rules.for_daemon("other")["memory"].above == 512 * MIB


def test_config_alerts_of_daemons_the_file_does_not_define(tmp_path: Path) -> None:
    path = write(tmp_path, "[alerts.daemons.pyd.fds]\nabove = 5\n[alerts.daemons.pyd]\ntypo = 1\n")
    settings, warnings = read_alert_settings(path)
    assert settings.rules.for_daemon("pyd")["fds"] == Rule("fds", above=5)
    assert warnings == (f"{path}: [alerts.daemons.pyd] unknown key 'typo' (ignored)",)
    twice = write(
        tmp_path,
        '[executables.web]\nexecutable = "/bin/true"\n[executables.web.alerts.fds]\nabove = 5\n'
        "[alerts.daemons.web.fds]\nabove = 6\n",
    )
    with pytest.raises(ConfigError, match=r"\[alerts\.daemons\.web\].*given twice"):
        load_config(twice)


@pytest.mark.parametrize(
    ("text", "table", "key", "expected"),
    [
        ('[alerts.memory]\nabove = "lots"', "alerts.memory", "above", "bytes"),
        ("[alerts.cpu]\nfor = 3", "alerts.cpu", "above", "required"),
        ('[alerts.fds]\nabove = 10\nseverity = "loud"', "alerts.fds", "severity", "one of"),
        ('[alerts.fds]\nabove = 10\naction = "command"', "alerts.fds", "command", "command"),
        ("[alerts.fds]\nabove = 10\nresolve_below = 20", "alerts.fds", "resolve_below", "most"),
        ("[alerts]\nmemory = 3", "alerts", "memory", "a table"),
        ("[alerts]\nmax_per_minute = 0", "alerts", "max_per_minute", "integer"),
    ],
)
def test_config_errors_name_file_table_and_key(
    tmp_path: Path, text: str, table: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text + '\n[executables.x]\nexecutable = "/bin/true"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and table in message and key in message, message
    assert expected in message, message


def test_daemon_alerts_table_error_names_the_daemon(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[executables.web]\nexecutable = "/bin/true"\n[executables.web.alerts.fds]\nabove = 0\n',
    )
    with pytest.raises(ConfigError, match=r"executables\.web\.alerts\.fds.*above"):
        load_config(path)


# -- the real ikosd --------------------------------------------------------------------------

HOGS = f"""
import ikos


class Hog(ikos.Actor):
    '''Holds memory on request ("grow" N MiB, "free").'''

    def on_start(self):
        self.block = None

    def receive(self, message):
        if message == "free":
            self.block = None
        else:
            self.block = bytearray(int(message) * {MIB})
            for i in range(0, len(self.block), 4096):
                self.block[i] = 1
        return "ok"


class Bloat(ikos.Actor):
    '''Holds 200 MiB from its start.'''

    def on_start(self):
        self.block = bytearray(200 * {MIB})
        for i in range(0, len(self.block), 4096):
            self.block[i] = 1

    def receive(self, message):
        return len(self.block)
"""


def start(ikosd_factory: Any, tmp_path: Path, config: str) -> Instance:
    base = tmp_path / "inst"
    base.mkdir(parents=True, exist_ok=True)
    (base / "alert_hogs.py").write_text(HOGS)
    return ikosd_factory(config=config)  # type: ignore[no-any-return]


def active_alerts(inst: Instance) -> list[dict[str, Any]]:
    res = inst.ctl("--json", "alerts", check=True)
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def find_alert(inst: Instance, alert: str, daemon: str) -> dict[str, Any] | None:
    return next(
        (a for a in active_alerts(inst) if a["alert"] == alert and a["daemon"] == daemon), None
    )


def scrape(inst: Instance) -> str:
    found = re.search(r"metrics (http://\S+/metrics)", inst.log_text())
    assert found, inst.log_text()
    with urllib.request.urlopen(found.group(1), timeout=HANG) as answer:
        return str(answer.read().decode())


class EventsReader:
    """``ikosctl events --json`` in the background, its lines parsed as they come."""

    def __init__(self, inst: Instance) -> None:
        self.proc = subprocess.Popen(
            [IKOSCTL, "--root", str(inst.root), "events", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=inst.env,
        )
        self.lines: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # the stream is live once ikosctl says so: an event before that is not its to show
        try:
            wait_for(lambda: self.has(type="subscribed"), HANG, message="ikosctl events live")
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def has(self, **fields: Any) -> bool:
        return any(all(e.get(k) == v for k, v in fields.items()) for e in list(self.lines))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=HANG)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=HANG)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


MEMORY_CONFIG = """
[ikosd]
metrics = "127.0.0.1:0"

[monitor]
interval = 0.2

[alerts]
notify_interval = 0
max_per_minute = 1000

[actors.hog]
class = "alert_hogs:Hog"

[actors.hog.alerts.memory]
above = "150MiB"
for = 0.4
resolve_for = 0.4
"""


def test_memory_alert_fires_everywhere_and_resolves(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = start(ikosd_factory, tmp_path, MEMORY_CONFIG)
    inst.wait_state("hog", "running", timeout=HANG)
    received: list[Any] = []
    # the subscription starts the broker (socket activation); alerts go out once it runs
    sub = ikos.ipc.subscribe("ikos.alerts", lambda m: received.append(m.payload), root=inst.root)
    inst.wait_state("ikos-broker", "running", timeout=HANG)
    try:
        reader = EventsReader(inst)
    except BaseException:
        sub.unsubscribe()
        raise
    try:
        assert active_alerts(inst) == []
        inst.ctl("call", "hog", "200", check=True)
        alert = wait_for(lambda: find_alert(inst, "memory", "hog"), HANG, message="memory alert")
        assert alert["severity"] == "warning"
        assert alert["threshold"] == 150 * MIB and alert["value"] >= 150 * MIB
        assert set(alert) == {
            "alert",
            "daemon",
            "severity",
            "value",
            "threshold",
            "since",
            "message",
        }
        wait_for(
            lambda: reader.has(type="alert", event="fired", alert="memory", daemon="hog"),
            HANG,
            message="the fired event on 'ikosctl events'",
        )
        wait_for(
            lambda: any(
                isinstance(p, dict) and p.get("event") == "fired" and p.get("daemon") == "hog"
                for p in received
            ),
            HANG,
            message="the alert on topic ikos.alerts",
        )
        text = scrape(inst)
        assert 'ikos_alert_firing{alert="memory",daemon="hog",severity="warning"} 1.0' in text
        assert 'ikos_alerts_fired_total{alert="memory"} 1.0' in text
        assert "ikos_alerts_active 1.0" in text
        assert "ikos_alerts_suppressed_total 0.0" in text
        assert "memory" in inst.status("hog")["alerts"]
        assert re.search(r"alert fired: memory on hog \(warning\)", inst.log_text())
        # the table for people, plain lines for programs
        plain = inst.ctl("alerts", check=True).stdout
        assert plain.startswith("memory\thog\twarning\t"), plain

        inst.ctl("call", "hog", "free", check=True)
        wait_for(lambda: find_alert(inst, "memory", "hog") is None, HANG, message="resolution")
        wait_for(
            lambda: reader.has(type="alert", event="resolved", alert="memory", daemon="hog"),
            HANG,
            message="the resolved event",
        )
        wait_for(lambda: "ikos_alerts_active 0.0" in scrape(inst), HANG)
        assert "ikos_alert_firing{" not in scrape(inst)
        # transitions are on the stream too
        inst.ctl("restart", "hog", check=True)
        wait_for(
            lambda: reader.has(type="transition", daemon="hog", new="stopping"),
            HANG,
            message="hog's transition on the stream",
        )
        # the stream ends, and ikosctl with status 0, when ikosd stops
        inst.ctl("shutdown", check=True)
        assert reader.proc.wait(timeout=HANG) == 0
        assert inst.proc.wait(timeout=HANG) == 0
    finally:
        reader.close()
        sub.unsubscribe()


ACTION_CONFIG = """
[ikosd]
metrics = "127.0.0.1:0"

[monitor]
interval = 0.2

[alerts]
notify_interval = 3600

[actors.bloat]
class = "alert_hogs:Bloat"

[actors.bloat.alerts.memory]
above = "150MiB"
action = "restart"

[supervisors.flaky]
restart = "temporary"
max_restarts = 3
within = 60

[executables.crasher]
supervisor = "flaky"
executable = "/bin/sh"
args = ["-c", "sleep 0.2; exit 3"]

[executables.crasher.alerts.restarts]
above = 2
window = 60
severity = "critical"
"""


def test_restart_action_runs_once_then_the_rate_limit_holds(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    inst = start(ikosd_factory, tmp_path, ACTION_CONFIG)

    def runs() -> list[int]:
        return [
            int(p)
            for p in re.findall(
                r"actor bloat: starting -> running \(ready \(pid (\d+)\)", inst.log_text()
            )
        ]

    # the first alert restarts bloat (it may be done before the test looks): a new pid
    wait_for(lambda: "alerts: memory on bloat: action restart" in inst.log_text(), HANG)
    wait_for(lambda: len(runs()) == 2, HANG, message="bloat's second run")
    first, second = runs()
    assert first != second
    inst.wait_running_new_pid("bloat", first, timeout=HANG)
    # the new run is over the threshold too: the alert is active again (the truth)...
    wait_for(lambda: find_alert(inst, "memory", "bloat"), HANG, message="the second alert")
    # ...but its notification, and so its action, is held back: no loop of restarts
    wait_for(
        lambda: re.search(r"ikos_alerts_suppressed_total [1-9]", scrape(inst)),
        HANG,
        message="the suppressed notification counted",
    )
    assert inst.pid_of("bloat") == second
    assert inst.log_text().count("action restart") == 1
    wait_for(
        lambda: re.search(
            r"1 notifications held back by the rate limit.*fired:memory", inst.log_text()
        ),
        HANG,
        message="the summary line",
    )
    assert runs() == [first, second]
    assert 'ikos_alerts_fired_total{alert="memory"} 2.0' in scrape(inst)


def test_crash_loop_raises_restarts_then_gave_up(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = start(ikosd_factory, tmp_path, ACTION_CONFIG)
    restarts = wait_for(
        lambda: find_alert(inst, "restarts", "crasher"), HANG, message="the restarts alert"
    )
    assert restarts["severity"] == "critical" and restarts["value"] >= 2
    gave_up = wait_for(lambda: find_alert(inst, "gave_up", "flaky"), HANG, message="gave_up")
    assert gave_up["severity"] == "critical"
    assert "restart intensity" in gave_up["message"]
    assert re.search(r"alert fired: gave_up on flaky \(critical\)", inst.log_text())
    # starting the supervisor again takes it out of failed: gave_up resolves
    inst.ctl("start", "flaky", check=True)
    wait_for(lambda: find_alert(inst, "gave_up", "flaky") is None, HANG, message="resolution")


def test_a_daemon_left_failed_raises_failed(ikosd_factory: Any, tmp_path: Path) -> None:
    inst = start(
        ikosd_factory,
        tmp_path,
        """
[executables.once]
executable = "/bin/sh"
args = ["-c", "sleep 0.3; exit 3"]
restart = "temporary"
""",
    )
    alert = wait_for(lambda: find_alert(inst, "failed", "once"), HANG, message="failed alert")
    assert alert["severity"] == "critical" and "exit" in alert["message"]
    inst.ctl("start", "once", check=True)
    wait_for(lambda: find_alert(inst, "failed", "once") is None, HANG, message="resolution")


FORTY_FILES = (
    "import os, time; fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(40)]; "
    "time.sleep(3600)"
)
COMMAND = 'echo "$IKOS_EVENT $IKOS_ALERT $IKOS_DAEMON $IKOS_SEVERITY $IKOS_VALUE $IKOS_THRESHOLD"'


def test_command_action_and_health_alert(ikosd_factory: Any, tmp_path: Path) -> None:
    flag, out = tmp_path / "healthy", tmp_path / "command.out"
    inst = start(
        ikosd_factory,
        tmp_path,
        f"""
[monitor]
interval = 0.2

[executables.files]
executable = "{sys.executable}"
args = ["-c", "{FORTY_FILES}"]

[executables.files.alerts.fds]
above = 30
action = "command"
command = '{COMMAND} > {out}; echo said-something'

[executables.sick]
executable = "/bin/sleep"
args = ["3600"]

[[executables.sick.health]]
kind = "exec"
target = "test -e {flag}"
interval = 0.2
unhealthy_threshold = 1
on_failure = "alert"
""",
    )
    wait_for(lambda: out.is_file() and out.read_text(), HANG, message="the command's output")
    event, alert, daemon, severity, value, threshold = out.read_text().split()
    assert (event, alert, daemon, severity, threshold) == ("fired", "fds", "files", "warning", "30")
    assert int(value) >= 40
    wait_for(lambda: "said-something" in inst.log_text(), HANG, message="its output in the log")
    assert find_alert(inst, "fds", "files") is not None

    health = wait_for(lambda: find_alert(inst, "health", "sick"), HANG, message="health alert")
    assert health["severity"] == "warning" and "critical" in health["message"]
    flag.write_text("")
    wait_for(lambda: find_alert(inst, "health", "sick") is None, HANG, message="health resolved")

    # reload-config applies new thresholds: 40 files are no longer too many
    config = tmp_path / "inst" / "ikos.toml"
    config.write_text(config.read_text().replace("above = 30", "above = 100"))
    inst.ctl("reload-config", check=True)
    wait_for(lambda: find_alert(inst, "fds", "files") is None, HANG, message="fds resolved")


def test_alerts_of_a_python_tree(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        tree=f"""
import ikos

tree = ikos.Supervisor(
    "root", children=[ikos.Exec("files", {sys.executable!r}, args=["-c", {FORTY_FILES!r}])]
)
""",
        config="""
[monitor]
interval = 0.2

[alerts.daemons.files.fds]
above = 30
severity = "critical"
""",
    )
    alert = wait_for(lambda: find_alert(inst, "fds", "files"), HANG, message="the fds alert")
    assert alert["severity"] == "critical" and alert["value"] >= 40


def test_a_slow_follower_of_events_is_bounded() -> None:
    from ikos.manager._alert_service import EVENTS_QUEUE, _Follower

    async def main() -> list[dict[str, Any]]:
        followers: set[_Follower] = set()
        follower = _Follower(followers)
        followers.add(follower)
        for i in range(EVENTS_QUEUE + 500):
            follower.put({"n": i})
        assert follower.dropped == 500
        got = [await anext(follower) for _ in range(EVENTS_QUEUE)]
        follower.put({"n": "after"})
        got += [await anext(follower), await anext(follower)]
        follower.close()
        assert follower not in followers
        with pytest.raises(StopAsyncIteration):
            await anext(follower)
        return got

    got = asyncio.run(main())
    assert [e["n"] for e in got[:EVENTS_QUEUE]] == list(range(EVENTS_QUEUE))
    # the gap is marked where it is, with its size
    assert got[EVENTS_QUEUE]["type"] == "dropped" and got[EVENTS_QUEUE]["count"] == 500
    assert got[EVENTS_QUEUE + 1] == {"n": "after"}


def test_render_alerts_and_events() -> None:
    from ikos.cli._render import Style, render_alerts, render_event

    alert = {
        "alert": "memory",
        "daemon": "web",
        "severity": "critical",
        "value": 3 * MIB,
        "threshold": 2 * MIB,
        "since": 1000.0,
        "message": "web memory (RSS) at 3.0MiB",
    }
    table = render_alerts([alert], Style(color=False, table=True), now=1062.0)
    header, row = table.splitlines()
    assert header.split() == [
        "ALERT",
        "DAEMON",
        "SEVERITY",
        "VALUE",
        "THRESHOLD",
        "SINCE",
        "MESSAGE",
    ]
    assert row.split()[:7] == ["memory", "web", "critical", "3.0M", "2.0M", "1m", "2s"]
    plain = render_alerts([alert], Style(color=False, table=False), now=1062.0)
    assert (
        plain == f"memory\tweb\tcritical\t{3 * MIB}\t{2 * MIB}\t1000\tweb memory (RSS) at 3.0MiB\n"
    )
    # as the verb's JSON gives them (floats): exact, never 2.10452e+07
    exact = {**alert, "value": 21045248.0, "threshold": 0.75, "since": 1796500310.25}
    cells = render_alerts([exact], Style(color=False, table=False), now=0.0).split("\t")
    assert cells[3:6] == ["21045248", "0.75", "1796500310.25"]
    line = render_event(
        {
            "type": "transition",
            "time": 0,
            "daemon": "web",
            "old": "running",
            "new": "stopping",
            "why": "asked",
        }
    )
    assert line.endswith(" web running -> stopping (asked)\n")
    assert render_event({"type": "dropped", "time": 0, "count": 3}).endswith(
        " (3 events dropped: this reader was too slow)\n"
    )


def test_publications_to_a_broker_that_is_down_are_lost_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ikos.manager._alert_service import _Publisher
    from ikos.platform._paths import InstancePaths

    publisher = _Publisher(InstancePaths.resolve(tmp_path / "no-such-instance"))
    with caplog.at_level("WARNING", logger="ikos.alerts"):
        for n in range(3):
            publisher.publish({"n": n})  # returns at once: the thread does the waiting
        wait_for(lambda: publisher.lost == 3, HANG, message="three publications lost")
        publisher.close()
    lines = [
        r.getMessage() for r in caplog.records if "not published on ikos.alerts" in r.getMessage()
    ]
    assert len(lines) == 1, lines


def test_stopping_aborts_a_publication_blocked_on_a_broker_that_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hang of ikosd's stop after the root gave up: the publisher thread was
    blocked on a broker that accepted and did not answer, and stop waited on it
    (in the default executor, whose shutdown Python 3.11 waits for without bound).
    Now the stop aborts the publication and the thread is gone when it returns."""
    import ikos.ipc._client
    from ikos.ipc._client import broker_socket
    from ikos.manager._alert_service import _Publisher
    from ikos.platform._paths import InstancePaths
    from ikos.platform._unix import bind_unix

    # a hello that would wait an hour: the client's own timeout never saves the day
    monkeypatch.setattr(ikos.ipc._client, "HELLO_TIMEOUT", 3600.0)
    paths = InstancePaths.resolve(tmp_path / "root")
    path = broker_socket(paths)
    path.parent.mkdir(parents=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, never answers
    bind_unix(silent, path)
    silent.listen(8)
    publisher = _Publisher(paths)
    try:
        publisher.publish({"alert": "gave_up"})
        silent.settimeout(HANG)
        conn, _ = silent.accept()  # the publication is under way, waiting for a welcome
        with conn:
            conn.settimeout(HANG)
            assert conn.recv(65536)  # its hello
            asyncio.run(asyncio.wait_for(publisher.aclose(HANG), HANG * 2))
            thread = publisher._thread
            assert thread is not None and not thread.is_alive()
            assert conn.recv(65536) == b""  # the client's end is closed, not left waiting
    finally:
        publisher.close()
        silent.close()


def test_alerts_are_not_published_while_the_broker_does_not_run(tmp_path: Path) -> None:
    """The broker is started on demand: an alert must not start it (nobody can be
    subscribed to a broker that does not run), nor reach for it once ikosd stops."""
    from ikos.manager._alert_service import _Publisher
    from ikos.platform._paths import InstancePaths

    publisher = _Publisher(InstancePaths.resolve(tmp_path / "root"))
    publisher.open = False
    publisher.publish({"alert": "restarts"})
    assert (publisher.skipped, publisher.lost, publisher._thread) == (1, 0, None)


def test_the_alert_service_s_clock_does_not_step_with_the_wall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine's "for" durations and restart windows are differences of this
    # clock: by the wall clock, a step forward fired a pending alert at once.
    import time

    from ikos.manager._alert_service import AlertService

    service = AlertService()
    before = service._now()
    assert abs(before - time.time()) < 1.0  # it reads as a date, for "since"
    now = time.time
    monkeypatch.setattr(time, "time", lambda: now() + 3600.0)
    after = service._now()
    assert 0.0 <= after - before < 1.0
