"""grafana/ against the real thing: dashboards, alerting rules, a real Prometheus scraping ikosd.

The committed dashboard JSON must be what ``grafana/build.py`` writes (so
nobody edits it by hand); ``promtool`` must accept the alerting rules and
pass their unit tests; and every PromQL expression of every dashboard panel
and variable, and of every alerting rule, must return data from a real
Prometheus scraping a real ikosd. The ikosd runs a tree built so that every
series exists and every rule's condition really holds: actors answering
asks, a crash-looping executable under a supervisor kept close to its
restart intensity, a supervisor that gave up, a failed executable, a failing
health check and the service it takes down, a memory and fd hog, a durable
queue with messages and a subscriber on a topic. The rules' conditions that
cannot hold here are listed in ``LEFT_HAND_SIDE`` with the reason; for the
resource thresholds, sized for production, the test lowers the number (and
checks it is the committed one it replaces).

Every expression that stays empty fails the test, all of them in one
assertion.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, Instance, wait_for
from prometheus import PROMTOOL, Prometheus, free_port, require, running_prometheus

import ikos.ipc

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
RULES = GRAFANA / "prometheus" / "ikos-rules.yml"
RULES_TEST = GRAFANA / "prometheus" / "ikos-rules.test.yml"
DASHBOARDS = GRAFANA / "dashboards"

#: What the dashboards' variables stand for here: the test's scrape job, the
#: ikosd under test (filled in per run), the daemon of "ikos: daemon".
DAEMON = "worker"
RATE_INTERVAL = "1m"

#: Thresholds sized for production that a test machine should not reach:
#: rule -> (the committed number, the one used here). The tree's hog is above
#: the test's numbers, so these rules' conditions hold with them. The CPU rule's
#: rate over 5m divides by the whole 5 minutes while Prometheus has held the
#: series for a minute or so: the hog's 5 % of a core shows as about 1 %.
THRESHOLDS = {
    "IkosDaemonHighCpu": ("0.9", "0.002"),
    "IkosDaemonHighMemory": ("1073741824", "33554432"),
    "IkosDaemonTooManyFds": ("1000", "200"),
}

#: Rules whose condition cannot reasonably be produced: their left-hand side
#: (the comparison removed) is evaluated instead, proving the series exist.
LEFT_HAND_SIDE = {
    # making the state store's disk fail under a running ikosd is
    # tests/test_crash_recovery.py's business, not the dashboards'
    "IkosStateWriteFailures": "increase(ikos_state_write_failures_total[10m])",
}

#: Rules evaluated at the end, once the test stopped the IPC broker.
AT_THE_END = {"IkosBrokerDown"}

#: Rule -> (label, value) that must be among the series its condition selects.
CULPRIT = {
    "IkosdDown": ("instance", "DEAD"),
    "IkosDaemonFailed": ("daemon", "broken"),
    "IkosSupervisorGaveUp": ("daemon", "doomed"),
    "IkosRestartStorm": ("daemon", "crasher"),
    "IkosSupervisorIntensityLow": ("supervisor", "flaky"),
    "IkosDaemonHighCpu": ("daemon", "hog"),
    "IkosDaemonHighMemory": ("daemon", "hog"),
    "IkosDaemonTooManyFds": ("daemon", "hog"),
    "IkosHealthCheckFailing": ("daemon", "sick"),
    "IkosServiceDown": ("daemon", "sick"),
}

#: Holds 64 MiB resident and 300 fds, and burns about 5 % of a core.
HOG = """
import os, time
ballast = b"x" * (64 << 20)
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
while True:
    start = time.process_time()
    while time.process_time() - start < 0.005:
        pass
    time.sleep(0.05)
"""

CONFIG = f"""
[root]
max_restarts = 100
within = 5

[monitor]
interval = 0.5
uss_every = 1

[actors.{DAEMON}]
class = "examples.actors:Echo"
# an alert of ikosd's own on it, for the daemon dashboard's alerts
[actors.{DAEMON}.alerts.memory]
above = "1MiB"
[actors.{DAEMON}.service]
name = "{DAEMON}"
[[actors.{DAEMON}.health]]
kind = "exec"
target = ["true"]
interval = 0.5

[executables.sick]
executable = "sleep"
args = ["1000"]
[executables.sick.service]
name = "sick"
[[executables.sick.health]]
kind = "exec"
target = ["false"]
interval = 0.5
unhealthy_threshold = 1
on_failure = "alert"

[executables.hog]
executable = "{sys.executable}"
args = ["-c", {json.dumps(HOG)}]
# ikosd's own memory alert on the hog: ikos_alert_firing, relayed by IkosAlert
[executables.hog.alerts.memory]
above = "32MiB"

[executables.broken]
executable = "false"
restart = "temporary"

# crashes every 1.6 s: at most 3 restarts in any 4 s, so flaky never gives
# up, and at least 2 in the window after each, so it keeps 1 or less in hand
[supervisors.flaky]
max_restarts = 3
within = 4
[executables.crasher]
supervisor = "flaky"
executable = "sh"
args = ["-c", "sleep 1.6; exit 1"]

# gives up at its child's first crash, and is not restarted
[supervisors.doomed]
max_restarts = 0
within = 5
restart = "temporary"
[executables.doomed_child]
supervisor = "doomed"
executable = "sh"
args = ["-c", "sleep 1; exit 1"]
"""


def load_build() -> Any:
    """grafana/build.py as a module (it is a script, not part of ikos)."""
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[dev]'")
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboards_are_what_build_py_writes() -> None:
    build = load_build()
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == sorted(build.DASHBOARDS)
    for name, make in build.DASHBOARDS.items():
        assert (DASHBOARDS / name).read_text() == build.render(make()), (
            f"grafana/dashboards/{name} is out of date: run python grafana/build.py"
        )
    assert build.main(["--check"]) == 0


def test_ikos_itself_never_imports_the_dashboard_sdk() -> None:
    # grafana-foundation-sdk is in the dev extra only: a user's ikos runs without it
    package = GRAFANA.parent / "ikos"
    users = [p for p in package.rglob("*.py") if "grafana_foundation_sdk" in p.read_text()]
    assert users == []


def test_every_dashboard_queries_through_its_datasource_variable() -> None:
    for board in DASHBOARDS.glob("*.json"):
        data = json.loads(board.read_text())
        names = [v["name"] for v in data["templating"]["list"]]
        assert names[:3] == ["datasource", "job", "instance"], board.name
        for panel in panels(data):
            for target in panel.get("targets", []):
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_promtool_checks_and_tests_the_rules() -> None:
    require(PROMTOOL)
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULES_TEST)],
        ["check", "config", str(GRAFANA / "prometheus" / "prometheus.yml")],
    ):
        res = subprocess.run(
            [PROMTOOL, *args], capture_output=True, text=True, timeout=HANG, cwd=RULES.parent
        )
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"


def test_the_rules_unit_tests_cover_every_rule_firing_and_not() -> None:
    rules = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)
    cases = re.findall(
        r"^\s*alertname: (\w+)\n\s*exp_alerts:( \[\])?$", RULES_TEST.read_text(), re.M
    )
    assert len(rules) == len(set(rules)) >= 13
    assert {name for name, nothing in cases if nothing} == set(rules)  # not firing
    assert {name for name, nothing in cases if not nothing} == set(rules)  # firing


# --- every expression against a real Prometheus ---------------------------------------------


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, those inside collapsed rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(substitutions: dict[str, str]) -> dict[str, str]:
    """``{"FILE: panel title [refId]": expr}`` for every panel target and query variable.

    Template variables are replaced as Grafana would for one selection; a
    variable's ``label_values(SELECTOR, label)`` becomes its ``SELECTOR``.
    """

    def fill(expr: str) -> str:
        for name, value in substitutions.items():
            expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
        assert "$" not in expr, f"a variable left in {expr!r}"
        return expr

    out = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                m = re.fullmatch(r"label_values\((.*), *(\w+)\)", var["query"])
                assert m, var["query"]
                out[f"{path.name}: variable {var['name']}"] = fill(m.group(1))
        for panel in panels(board):
            for target in panel.get("targets", []):
                key = f"{path.name}: {panel['title']} [{target['refId']}]"
                assert key not in out, f"two panels titled {panel['title']!r} in {path.name}"
                out[key] = fill(target["expr"])
    return out


def rule_expressions(prometheus: Prometheus) -> dict[str, str]:
    """``{"rule NAME": expr}`` of every alerting rule, as the server loaded them."""
    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"] if g["file"] == str(RULES)]
    assert all(r["health"] in ("ok", "unknown") for r in rules), rules
    out = {}
    for rule in rules:
        expr = rule["query"]
        if rule["name"] in THRESHOLDS:
            committed, here = THRESHOLDS[rule["name"]]
            # the server prints numbers its own way (1.073741824e+09)
            lhs, _, rhs = expr.rpartition(" > ")
            assert lhs and float(rhs) == float(committed), (rule["name"], expr)
            expr = f"{lhs} > {here}"
        expr = LEFT_HAND_SIDE.get(rule["name"], expr)
        out[f"rule {rule['name']}"] = expr
    return out


class Traffic:
    """Asks to an actor, publications and a subscriber, a queue: what the IPC series count.

    A thread asks ``DAEMON`` and publishes every 0.1 s for as long as the test
    runs, so that rates and the ask histogram have fresh data in every window.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stop = threading.Event()
        self.sub = ikos.ipc.subscribe("grafana.news", root=root)
        queue = ikos.ipc.queue("jobs", root=root)
        for i in range(3):
            queue.put({"job": i})
        queue.get(timeout=HANG).ack()
        self.leased = queue.get(timeout=HANG)  # handed out, not acked: one leased message
        self.conn = ikos.ipc.connect(DAEMON, root=root)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.conn.request("ping", timeout=HANG)
            ikos.ipc.publish("grafana.news", "tick", root=self.root)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=HANG)
        self.conn.disconnect()
        self.sub.unsubscribe()


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), rule_files=[RULES]) as server:
        yield server


def test_every_expression_returns_data_from_a_real_prometheus(
    prometheus: Prometheus, ikosd_factory: Any, tmp_path: Path
) -> None:
    inst: Instance = ikosd_factory(config=CONFIG, name="scraped")
    # a second target where nothing listens: an ikosd that is down, for IkosdDown
    dead = f"127.0.0.1:{free_port()}"
    (tmp_path / "dead.json").write_text(json.dumps([{"targets": [dead], "labels": {}}]))
    [address, _] = prometheus.scrape(
        inst.root / "run" / "ikos" / "metrics.json", tmp_path / "dead.json"
    )
    prometheus.wait_up(address)
    traffic = Traffic(inst.root)
    try:
        inst.wait_state("broken", "failed", timeout=HANG)
        inst.wait_state("doomed", "failed", timeout=HANG)
        # enough restarts in Prometheus for increase(...[10m]) > 5
        wait_for(
            lambda: prometheus.query(
                f'ikos_daemon_restarts_total{{instance="{address}", daemon="crasher"}} > 6'
            ),
            HANG * 2,
            message="the crasher's restarts in Prometheus",
        )
        substitutions = {
            "datasource": "unused",
            "job": "ikos",
            # a regex, as Grafana writes a multi-value variable's selection
            "instance": re.escape(address).replace("\\", "\\\\"),
            "daemon": DAEMON,
            "__rate_interval": RATE_INTERVAL,
        }
        rules = rule_expressions(prometheus)
        last = {k: rules.pop(f"rule {k}") for k in AT_THE_END}
        exprs = dashboard_expressions(substitutions) | rules
        results: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}  # expressions Prometheus refused: they will not improve

        culprits = {
            f"rule {rule}": (label, dead if value == "DEAD" else value)
            for rule, (label, value) in CULPRIT.items()
        }

        def done(key: str) -> bool:
            """Data, and for a rule the series that should meet its condition among it."""
            if key in errors:
                return True
            if key not in culprits:
                return bool(results.get(key))
            label, value = culprits[key]
            return any(s["metric"].get(label) == value for s in results.get(key, []))

        def all_have_data() -> bool:
            for key, expr in exprs.items():
                if not done(key):
                    try:
                        results[key] = prometheus.query(expr)
                    except (AssertionError, OSError) as e:
                        errors[key] = str(e)
                        results[key] = []
            return all(map(done, exprs))

        # generous: rates need two scrapes, alerts and health checks their intervals;
        # what is still empty after that is reported below, all at once
        with contextlib.suppress(AssertionError):
            wait_for(all_have_data, HANG * 2, interval=1.0, message="every expression")
        failed = {
            k: f"{e}  ({errors[k]})" if k in errors else e
            for k, res in results.items()
            if not res
            for e in [exprs[k]]
        }
        assert not failed, "no data for:\n" + "\n".join(f"  {k}: {e}" for k, e in failed.items())
        wrong = [(k, culprits[k], results[k]) for k in culprits if not done(k)]
        assert not wrong, (
            f"conditions that hold, but not for the series meant to meet them: {wrong}"
        )
    finally:
        traffic.close()
    # IkosBrokerDown: the broker does not answer, ikosd says so. (A stopped broker is
    # no outage: ikosd holds its socket and starts it at the next connection.)
    inst.ctl("kill", "-s", "STOP", "ikos-broker", check=True)
    try:
        wait_for(
            lambda: any(
                s["metric"].get("instance") == address
                for s in prometheus.query(last["IkosBrokerDown"])
            ),
            HANG * 2,
            message="IkosBrokerDown's condition in Prometheus",
        )
    finally:
        inst.ctl("kill", "-s", "CONT", "ikos-broker")
