"""ikosd's metrics against a real Prometheus: addresses, scrapes, restarts, stale series, promtool.

One Prometheus serves the module (see tests/prometheus.py); each test points
it at its own ikosd through the instance's ``RUN/metrics.json``, used as the
server's ``file_sd`` file. Instances run with default settings: the point of
the address tests is that the default is safe for several on one machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, wait_for
from prometheus import (
    Prometheus,
    fetch_metrics,
    promtool_check_metrics,
    running_prometheus,
)

from ikos._errors import ManagerError
from ikos.manager._config import AUTO_METRICS
from ikos.manager._ikosd import metrics_address
from ikos.manager._metrics import MetricsService, metrics_file
from ikos.platform._paths import InstancePaths

HEAD = """
[root]
max_restarts = 10
within = 5
"""
ALPHA = '[actors.alpha]\nclass = "examples.actors:Echo"\n'
BETA = '[actors.beta]\nclass = "examples.actors:Echo"\n'
CONFIG = HEAD + ALPHA + BETA


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as server:
        yield server


def metrics_json(inst: Instance) -> Path:
    return inst.root / "run" / "ikos" / "metrics.json"


def root_status(inst: Instance) -> dict[str, Any]:
    [root] = [s for s in inst.status() if s["supervisor"] is None]
    return dict(root)


def scraped(prometheus: Prometheus, ikosd_factory: Any, name: str) -> tuple[Instance, str]:
    """An ikosd running CONFIG, scraped by ``prometheus`` (up once): it and its address."""
    inst = ikosd_factory(config=CONFIG, name=name)
    [address] = prometheus.scrape(metrics_json(inst))
    prometheus.wait_up(address)
    return inst, address


def daemons(series: list[dict[str, Any]]) -> dict[str, float]:
    """``{daemon: value}`` of a query's result vector."""
    return {s["metric"]["daemon"]: float(s["value"][1]) for s in series}


def test_instances_side_by_side_each_serve_metrics_at_their_own_address(
    ikosd_factory: Any,
) -> None:
    first = ikosd_factory(config=CONFIG, name="first")
    second = ikosd_factory(config=CONFIG, name="second")
    urls = []
    for inst in (first, second):
        url = root_status(inst)["metrics"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), url
        assert f"metrics {url}" in inst.log_text()  # the ready line tells the truth
        [group] = json.loads(metrics_json(inst).read_text())
        assert group == {"targets": [url[7:-8]], "labels": {"ikos_root": str(inst.root)}}
        text = inst.ctl("status").stdout
        assert f"ikosd: metrics at {url}\n" in text
        assert 'ikos_daemon_up{daemon="alpha",kind="actor",supervisor="root"} 1.0' in (
            fetch_metrics(url)
        )
        urls.append(url)
    assert urls[0] != urls[1]
    assert first.terminate() == 0
    assert not metrics_json(first).exists()  # gone with the instance
    assert "ikos_daemon_up" in fetch_metrics(urls[1])


@pytest.mark.parametrize("where", ["flag", "config"])
def test_an_explicit_address_that_cannot_be_bound_stops_ikosd(
    ikosd_factory: Any, where: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        if where == "flag":
            kw: dict[str, Any] = {"config": CONFIG, "args": ["--metrics", address]}
        else:
            kw = {"config": f'[ikosd]\nmetrics = "{address}"\n' + CONFIG}
        inst = ikosd_factory(**kw, wait_ready=False, expect_exit=1)
        assert inst.proc.wait(timeout=60) == 1
    out = inst.log_text()
    assert f"ikosd: cannot serve metrics on {address}: Address already in use" in out
    assert "ikosd ready" not in out
    assert not metrics_json(inst).exists()


def test_prometheus_sees_every_daemon_and_their_restarts(
    prometheus: Prometheus, ikosd_factory: Any
) -> None:
    inst, address = scraped(prometheus, ikosd_factory, "scraped")
    up = f'ikos_daemon_up{{instance="{address}",kind="actor"}}'
    wait_for(
        lambda: daemons(prometheus.query(up)) == {"alpha": 1.0, "beta": 1.0},
        message="a series of ikos_daemon_up per daemon",
    )
    pid = inst.pid_of("alpha")
    os.kill(pid, signal.SIGKILL)
    inst.wait_running_new_pid("alpha", pid)
    restarts = f'ikos_daemon_restarts_total{{instance="{address}",daemon="alpha"}}'
    wait_for(
        lambda: daemons(prometheus.query(restarts)).get("alpha", 0) >= 1,
        message="the restart counted in Prometheus",
    )
    beta = f'ikos_daemon_restarts_total{{instance="{address}",daemon="beta"}}'
    assert daemons(prometheus.query(beta)) == {"beta": 0.0}
    status, said = promtool_check_metrics(fetch_metrics(root_status(inst)["metrics"]))
    assert (status, said) == (0, "")


def test_a_daemon_removed_by_reload_leaves_no_series(
    prometheus: Prometheus, ikosd_factory: Any
) -> None:
    inst, address = scraped(prometheus, ikosd_factory, "reloaded")
    beta = f'{{instance="{address}",daemon="beta"}}'
    wait_for(
        lambda: (
            {s["metric"]["__name__"] for s in prometheus.query(beta)}
            >= {"ikos_daemon_up", "ikos_daemon_restarts_total", "ikos_state_transitions_total"}
        ),
        message="beta's series in Prometheus",
    )
    (inst.root.parent / "ikos.toml").write_text(textwrap.dedent(HEAD + ALPHA))
    inst.ctl("reload-config", check=True)
    assert 'daemon="beta"' not in fetch_metrics(root_status(inst)["metrics"])
    # the next scrape without them marks every one of beta's series stale
    wait_for(lambda: prometheus.query(beta) == [], message="beta's series to go")
    assert daemons(prometheus.query(f'ikos_daemon_up{{instance="{address}",kind="actor"}}')) == {
        "alpha": 1.0
    }


# --- the address, without a Prometheus ----------------------------------------------------


def test_the_default_address_depends_on_the_instance(tmp_path: Path) -> None:
    system = InstancePaths.default()
    mine = InstancePaths.for_root(tmp_path)
    if os.geteuid() == 0:  # the system instance keeps the well-known port, falling back
        assert metrics_address(system, AUTO_METRICS) == ("127.0.0.1", 9464, True)
    else:
        assert metrics_address(system, AUTO_METRICS) == ("127.0.0.1", 0, False)
    assert metrics_address(mine, AUTO_METRICS) == ("127.0.0.1", 0, False)
    assert metrics_address(system, ("0.0.0.0", 9100)) == ("0.0.0.0", 9100, False)
    assert metrics_address(mine, None) is None


class _Host:
    """The part of an ExtensionHost the metrics service uses: the view's paths."""

    def __init__(self, paths: InstancePaths) -> None:
        self.view = self
        self.paths = paths


@pytest.mark.parametrize("fallback", [True, False])
def test_a_taken_default_port_falls_back_and_an_explicit_one_refuses(
    tmp_path: Path, fallback: bool
) -> None:
    paths = InstancePaths.for_root(tmp_path)
    paths.create()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = MetricsService("127.0.0.1", port, fallback=fallback)
        try:
            if not fallback:
                with pytest.raises(ManagerError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                    asyncio.run(service.start(_Host(paths)))  # type: ignore[arg-type]
                assert not metrics_file(paths).exists()
                return
            asyncio.run(service.start(_Host(paths)))  # type: ignore[arg-type]
            address = service.endpoint.address
            assert address is not None and address != f"127.0.0.1:{port}"
            [group] = json.loads(metrics_file(paths).read_text())
            assert group["targets"] == [address]
        finally:
            asyncio.run(service.stop())
    assert not metrics_file(paths).exists()
