"""A real Prometheus server for the tests: started on loopback, scraping ikosd, stopped cleanly.

Not a test module: tests import :func:`running_prometheus` (one server per
module is enough; starting one takes a second or two) and point it at an
ikosd with :meth:`Prometheus.scrape`. The server finds its targets through a
``file_sd`` file, the same format as ikosd's ``RUN/metrics.json``, so that
one server follows instances that come and go without a restart, and the
file ikosd publishes is proven to be one Prometheus reads as it is. Scrapes
run every second; the storage lives in a temporary directory. The binaries
come from Debian's ``prometheus`` package (``scripts/test-deps.sh``); where
they are missing the tests that need them are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
MISSING = "Prometheus is not installed (Debian's 'prometheus'; run scripts/test-deps.sh as root)"

#: Scrape and evaluation interval: short, so that a change shows within seconds.
INTERVAL = "1s"

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files: {rule_files}
scrape_configs:
  - job_name: ikos
    file_sd_configs:
      - files: ["{targets}"]
        refresh_interval: {interval}
"""


def require(binary: str) -> None:
    """Skip the calling test (or fixture) when ``binary`` is not installed."""
    if not os.access(binary, os.X_OK):
        pytest.skip(MISSING)


def free_port() -> int:
    """A loopback port free right now (Prometheus cannot report one it picked itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A running Prometheus server: its targets, its HTTP API."""

    def __init__(self, base: Path, proc: subprocess.Popen[bytes], port: int) -> None:
        self.base = base
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.targets_file = base / "targets.json"

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/PATH``; the ``data`` of a successful answer (AssertionError otherwise)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        _status, body = http_get(f"{self.url}/api/v1/{path}{query}", timeout=10)
        answer = json.loads(body)  # errors come as JSON too, with Prometheus's reason
        assert answer.get("status") == "success", answer
        return answer["data"]

    def scrape(self, *metrics_json: Path) -> list[str]:
        """Scrape the instances whose ``RUN/metrics.json`` files are given; their addresses.

        The files' target groups are merged into the server's ``file_sd``
        file (written whole, atomically, as Prometheus expects); no file means
        no target.
        """
        groups: list[Any] = []
        for file in metrics_json:
            groups += json.loads(file.read_text())
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.targets_file)
        return [target for group in groups for target in group["targets"]]

    def targets(self) -> list[dict[str, Any]]:
        """The active targets, as ``/api/v1/targets`` gives them."""
        return list(self.api("targets")["activeTargets"])

    def wait_up(self, address: str, timeout: float = HANG) -> dict[str, Any]:
        """Wait until the target ``HOST:PORT`` was scraped successfully; its entry."""

        def up() -> dict[str, Any] | None:
            for target in self.targets():
                if target["labels"].get("instance") == address and target["health"] == "up":
                    return target
            return None

        return dict(wait_for(up, timeout, interval=0.2, message=f"Prometheus to scrape {address}"))

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate the PromQL ``expr`` now; the result vector (``[{metric, value}, ...]``)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def close(self, timeout: float = HANG) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET ``url``: its status and body, an error status included.

    An ``HTTPError`` holds the open response: dropped unclosed (as ``wait_for``
    drops the errors of a poll, Prometheus answering 503 while it starts) its
    socket was reported by the garbage collector in whatever test ran next.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return int(res.status), res.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


@contextlib.contextmanager
def running_prometheus(base: Path, rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    """Run a Prometheus under ``base`` (config, targets, storage, log) until the block ends.

    ``rule_files`` are loaded as the configuration's ``rule_files`` (their
    rules evaluated every second; ``Prometheus.api("rules")`` shows them).

    Skips when Prometheus is not installed; fails, with the server's log,
    when it does not become ready.
    """
    require(PROMETHEUS)
    base.mkdir(parents=True, exist_ok=True)
    targets = base / "targets.json"
    targets.write_text("[]")
    config = base / "prometheus.yml"
    files = json.dumps([str(f) for f in rule_files])
    config.write_text(CONFIG.format(interval=INTERVAL, targets=targets, rule_files=files))
    port = free_port()
    log = base / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=base,
        )
    server = Prometheus(base, proc, port)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({proc.returncode}):\n{log.read_text()}")
            status, _body = http_get(f"{server.url}/-/ready", timeout=5)
            return status == 200

        wait_for(ready, HANG * 2, interval=0.1, message="Prometheus to be ready")
        yield server
    finally:
        server.close()


def promtool_check_metrics(text: str) -> tuple[int, str]:
    """``promtool check metrics`` on an exposition ``text``: its exit status and what it said."""
    require(PROMTOOL)
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    return res.returncode, (res.stdout + res.stderr).strip()


def fetch_metrics(url: str) -> str:
    """The text of an ikosd's ``/metrics`` at ``url``."""
    with urllib.request.urlopen(url, timeout=10) as res:
        return str(res.read().decode())
