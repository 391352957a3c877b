"""Health checks: every probe kind passing and failing, thresholds, the monitor loop."""

from __future__ import annotations

import asyncio
import http.server
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ikos._errors import AskTimeout, ConfigError
from ikos.platform._process import reap_orphans
from ikos.registry._health import (
    CheckState,
    HealthCheck,
    HealthMonitor,
    ProbeResult,
    TtlCheck,
    next_check_state,
    probe_exec,
    probe_http,
    probe_method,
    probe_tcp,
    worst,
)

# -- helpers ----------------------------------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie left to init)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = f"status {self.status} for {self.path}".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        if 300 <= self.status < 400:
            self.send_header("Location", "/elsewhere")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock
    finally:
        sock.close()


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


# -- exec -------------------------------------------------------------------------


def test_exec_passes_and_fails_on_exit_status() -> None:
    ok = asyncio.run(probe_exec(["true"], timeout=5))
    assert ok.ok and ok.duration >= 0
    bad = asyncio.run(probe_exec(["false"], timeout=5))
    assert not bad.ok and "exit status 1" in bad.output
    said = asyncio.run(probe_exec(["sh", "-c", "echo all good; echo oops >&2"], timeout=5))
    assert said.ok and said.output == "all good\noops\n"


def test_exec_status_is_not_lost_to_the_managers_reaper_of_orphans() -> None:
    """ikosd reaps every unowned child on SIGCHLD: a probe's command must be owned.

    Run from asyncio's subprocesses, the reaper took the command's status
    about one time in ten, and asyncio then reported exit status 255: a
    passing check failed, a failing one said the wrong thing.
    """

    async def main() -> list[str]:
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, reap_orphans)
        try:
            return [(await probe_exec(["false"], timeout=10)).output for _ in range(100)]
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)

    outputs = asyncio.run(main())
    assert set(outputs) == {"exit status 1"}, sorted(set(outputs))


def test_exec_output_is_truncated_and_fully_drained() -> None:
    # 1 MiB of output must neither block the command nor be kept.
    result = asyncio.run(probe_exec(["sh", "-c", "head -c 1048576 /dev/zero; exit 0"], timeout=10))
    assert result.ok
    assert len(result.output.encode()) == 4096


def test_exec_of_a_missing_program_fails() -> None:
    result = asyncio.run(probe_exec(["/nonexistent/ikos-check"], timeout=5))
    assert not result.ok and "cannot run" in result.output
    assert not asyncio.run(probe_exec([], timeout=5)).ok


def test_exec_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    shell_pid = tmp_path / "shell"
    sleep_pid = tmp_path / "sleep"
    script = f"echo $$ > {shell_pid}; sleep 60 & echo $! > {sleep_pid}; echo started; wait"
    result = asyncio.run(probe_exec(["sh", "-c", script], timeout=0.5))
    assert not result.ok
    assert "timed out after 0.5s" in result.output and "started" in result.output
    pids = [int(shell_pid.read_text()), int(sleep_pid.read_text())]
    assert all(gone(pid) for pid in pids)
    with pytest.raises(psutil.NoSuchProcess):  # our own child is reaped, not a zombie
        psutil.Process(pids[0])


def test_a_cancelled_exec_probe_kills_its_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def main() -> int:
        task = asyncio.create_task(
            probe_exec(
                [
                    "sh",
                    "-c",
                    f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 60",
                ],
                60,
            )
        )
        await until(pid_file.exists)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pid_file.read_text())

    pid = asyncio.run(main())
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(pid)


# -- tcp and http -----------------------------------------------------------------


def test_tcp_against_a_listening_socket_and_a_closed_port(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    ok = asyncio.run(probe_tcp("127.0.0.1", port, timeout=5))
    assert ok.ok and f"127.0.0.1:{port}" in ok.output
    free = closed_port()
    bad = asyncio.run(probe_tcp("127.0.0.1", free, timeout=5))
    assert not bad.ok and str(free) in bad.output


def test_http_passes_on_2xx_3xx_and_fails_on_5xx(http_server: tuple[str, type[_Handler]]) -> None:
    url, handler = http_server
    ok = asyncio.run(probe_http(url + "/health?x=1", timeout=5))
    assert ok.ok
    assert ok.output.startswith("HTTP/1.0 200") and "status 200 for /health?x=1" in ok.output
    handler.status = 302
    assert asyncio.run(probe_http(url + "/health", timeout=5)).ok
    handler.status = 500
    bad = asyncio.run(probe_http(url + "/health", timeout=5))
    assert not bad.ok and "500" in bad.output
    handler.status = 404
    assert not asyncio.run(probe_http(url, timeout=5)).ok


def test_http_against_a_closed_port_a_mute_server_and_a_bad_url(listening: socket.socket) -> None:
    assert not asyncio.run(probe_http(f"http://127.0.0.1:{closed_port()}/", timeout=5)).ok
    # The listening socket accepts through its backlog but never answers.
    port = listening.getsockname()[1]
    mute = asyncio.run(probe_http(f"http://127.0.0.1:{port}/", timeout=0.3))
    assert not mute.ok and "timed out" in mute.output
    assert not asyncio.run(probe_http("ftp://127.0.0.1/", timeout=1)).ok


def test_http_refuses_a_garbage_answer() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"SSH-2.0-OpenSSH\r\n")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        port = server.getsockname()[1]
        result = asyncio.run(probe_http(f"http://127.0.0.1:{port}/", timeout=5))
        assert not result.ok and "malformed" in result.output
    finally:
        thread.join(timeout=10)
        server.close()


# -- ttl and method ---------------------------------------------------------------


def test_ttl_check_with_a_controlled_clock() -> None:
    now = [100.0]
    check = TtlCheck(5.0, clock=lambda: now[0])
    assert not check.probe().ok and not check.alive
    check.heartbeat("serving 3 clients")
    assert check.probe().ok and "serving 3 clients" in check.probe().output
    now[0] += 5.0
    assert check.alive
    now[0] += 0.1
    assert not check.probe().ok
    check.heartbeat()
    assert check.alive


def test_ttl_check_expires_and_recovers_in_real_time() -> None:
    async def main() -> None:
        check = TtlCheck(0.1)
        check.heartbeat()
        assert check.probe().ok
        await until(lambda: not check.alive)
        assert not check.probe().ok
        check.heartbeat()
        assert check.probe().ok

    asyncio.run(main())


def test_method_probe() -> None:
    async def answer(result: object) -> object:
        return result

    async def raises(method: str) -> object:
        raise RuntimeError(f"{method} broke")

    async def slow(method: str) -> object:
        await asyncio.sleep(60)
        return True

    async def ask_times_out(method: str) -> object:
        raise AskTimeout("net", "no answer in 1s")

    def returning(value: object) -> Callable[[str], Awaitable[object]]:
        return lambda method: answer(value)

    async def main() -> None:
        assert (await probe_method(returning(True), "healthy", 1)).ok
        assert (await probe_method(returning(None), "healthy", 1)).ok
        said = await probe_method(returning("3 leases"), "healthy", 1)
        assert said.ok and said.output == "3 leases"
        assert not (await probe_method(returning(False), "healthy", 1)).ok
        broke = await probe_method(raises, "healthy", 1)
        assert not broke.ok and "RuntimeError: healthy broke" in broke.output
        late = await probe_method(slow, "healthy", 0.05)
        assert not late.ok and "timed out" in late.output
        ask = await probe_method(ask_times_out, "healthy", 1)
        assert not ask.ok and "AskTimeout" in ask.output

    asyncio.run(main())


# -- configuration ----------------------------------------------------------------


def test_from_mapping_builds_every_kind() -> None:
    exec_check = HealthCheck.from_mapping("net", {"kind": "exec", "target": "pgrep -x 'dhcp d'"})
    assert exec_check.target == ("pgrep", "-x", "dhcp d")
    tcp = HealthCheck.from_mapping("net", {"kind": "tcp", "target": "[::1]:53", "interval": 5})
    assert (tcp.host, tcp.port, tcp.interval) == ("::1", 53, 5.0)
    assert isinstance(tcp.interval, float)
    http = HealthCheck.from_mapping(
        "net", {"kind": "http", "target": "https://x:8443/h", "on_failure": "restart"}
    )
    assert http.on_failure == "restart"
    ttl = HealthCheck.from_mapping("log", {"kind": "ttl", "ttl": 30, "unhealthy_threshold": 1})
    assert ttl.ttl == 30.0 and ttl.target is None
    method = HealthCheck.from_mapping("auth", {"kind": "method", "target": "healthy"})
    assert method.target == "healthy"
    listed = HealthCheck("exec", ["true"])  # type: ignore[arg-type]
    assert listed.target == ("true",)
    assert hash(listed) == hash(HealthCheck("exec", ("true",)))


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"target": "x"}, "kind"),
        ({"kind": "smoke"}, "kind"),
        ({"kind": "exec"}, "target"),
        ({"kind": "exec", "target": []}, "target"),
        ({"kind": "exec", "target": "'unclosed"}, "target"),
        ({"kind": "tcp", "target": "localhost"}, "target"),
        ({"kind": "tcp", "target": "localhost:70000"}, "target"),
        ({"kind": "http", "target": "localhost:80"}, "target"),
        ({"kind": "ttl"}, "ttl"),
        ({"kind": "ttl", "ttl": -1}, "ttl"),
        ({"kind": "ttl", "ttl": 5, "target": "x"}, "target"),
        ({"kind": "tcp", "target": "h:1", "ttl": 5}, "ttl"),
        ({"kind": "method", "target": "not a name"}, "target"),
        ({"kind": "tcp", "target": "h:1", "interval": 0}, "interval"),
        ({"kind": "tcp", "target": "h:1", "timeout": "2s"}, "timeout"),
        ({"kind": "tcp", "target": "h:1", "interval": True}, "interval"),
        ({"kind": "tcp", "target": "h:1", "healthy_threshold": 0}, "healthy_threshold"),
        ({"kind": "tcp", "target": "h:1", "unhealthy_threshold": 1.5}, "unhealthy_threshold"),
        ({"kind": "tcp", "target": "h:1", "on_failure": "panic"}, "on_failure"),
        ({"kind": "tcp", "target": "h:1", "start_period": -1}, "start_period"),
        ({"kind": "tcp", "target": "h:1", "start_period": "30s"}, "start_period"),
        ({"kind": "tcp", "target": "h:1", "start_period": float("inf")}, "start_period"),
    ],
)
def test_from_mapping_refuses_bad_entries_naming_table_and_key(
    mapping: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        HealthCheck.from_mapping("net", mapping)
    assert err.value.table == "health.net"
    assert err.value.key == key
    assert "[health.net]" in str(err.value) and key in str(err.value)


def test_from_mapping_warns_about_unknown_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        HealthCheck.from_mapping("net", {"kind": "ttl", "ttl": 1, "colour": "red"})
    assert "colour" in caplog.text and "health.net" in caplog.text
    with pytest.raises(ConfigError):
        HealthCheck.from_mapping("net", ["kind", "ttl"])


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError):
        HealthCheck("tcp", "nowhere")


# -- state machine ----------------------------------------------------------------


def _run(results: list[bool], healthy: int, unhealthy: int) -> list[str]:
    state = CheckState()
    seen: list[str] = []
    for ok in results:
        state = next_check_state(state, ok, healthy, unhealthy)
        seen.append(state.status)
    return seen


def test_thresholds() -> None:
    assert _run([True], 1, 3) == ["passing"]
    assert _run([True, True, True], 3, 3) == ["unknown", "unknown", "passing"]
    assert _run([False, False, False], 1, 3) == ["unknown", "unknown", "critical"]
    assert _run([True, False, True], 1, 3) == ["passing", "warning", "passing"]
    assert _run([True, False, False, False, True, True], 2, 3) == [
        "unknown",
        "unknown",
        "unknown",
        "critical",
        "critical",
        "passing",
    ]
    assert _run([True, True, False, False, True], 2, 2) == [
        "unknown",
        "passing",
        "warning",
        "critical",
        "critical",
    ]


@given(
    st.lists(st.booleans(), max_size=30),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 6),
    st.booleans(),
)
def test_enough_consecutive_results_always_decide(
    prefix: list[bool], healthy: int, unhealthy: int, run: int, ok: bool
) -> None:
    results = [*prefix, *[ok] * run]
    statuses = _run(results, healthy, unhealthy)
    if ok and run >= healthy:
        assert statuses[-1] == "passing"
    if not ok and run >= unhealthy:
        assert statuses[-1] == "critical"
    # Never critical without `unhealthy` failures in a row, never passing from
    # unknown or critical without `healthy` passes in a row.
    before = ["unknown", *statuses]
    for i, status in enumerate(statuses):
        if status == "critical" and before[i] != "critical":
            assert i + 1 >= unhealthy and not any(results[i + 1 - unhealthy : i + 1])
        if status == "passing" and before[i] in ("unknown", "critical"):
            assert i + 1 >= healthy and all(results[i + 1 - healthy : i + 1])


def test_worst() -> None:
    assert worst([]) == "unknown"
    assert worst(["passing", "passing"]) == "passing"
    assert worst(["passing", "unknown"]) == "unknown"
    assert worst(["unknown", "warning", "passing"]) == "warning"
    assert worst(["warning", "critical"]) == "critical"


# -- the monitor ------------------------------------------------------------------


class Switch:
    """A method check's answer, switched by the test."""

    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    async def __call__(self, method: str) -> object:
        self.calls += 1
        if not self.ok:
            raise RuntimeError("unhealthy")
        return True


def test_run_once_walks_the_thresholds() -> None:
    switch = Switch()
    monitor = HealthMonitor(
        "auth",
        [HealthCheck("method", "healthy", healthy_threshold=2, unhealthy_threshold=2)],
        call_method=switch,
    )

    async def main() -> list[str]:
        seen: list[str] = []
        for ok in (True, True, False, False, True, True):
            switch.ok = ok
            seen.append((await monitor.run_once()).status)
        return seen

    assert monitor.status == "unknown"
    assert asyncio.run(main()) == [
        "unknown",
        "passing",
        "warning",
        "critical",
        "critical",
        "passing",
    ]
    snap = monitor.snapshot()
    assert snap.checks[0].last is not None and snap.checks[0].last.ok
    assert snap.checks[0].state.passes == 2


def test_the_worst_check_decides_and_restart_is_requested(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    monitor = HealthMonitor(
        "net/dhcp",
        [
            HealthCheck("tcp", f"127.0.0.1:{port}"),
            HealthCheck("exec", ("false",), unhealthy_threshold=1, on_failure="restart"),
        ],
    )
    status = asyncio.run(monitor.run_once())
    assert [c.status for c in status.checks] == ["passing", "critical"]
    assert status.status == "critical" and status.restart_requested
    alert_only = HealthMonitor("x", [HealthCheck("exec", ("false",), unhealthy_threshold=1)])
    assert not asyncio.run(alert_only.run_once()).restart_requested


def test_a_method_check_needs_a_caller() -> None:
    with pytest.raises(ConfigError):
        HealthMonitor("x", [HealthCheck("method", "healthy")])


def test_run_reports_changes_of_a_ttl_check() -> None:
    changes: list[tuple[str, str, str]] = []

    async def on_change(service: str, old: str, new: str) -> None:
        changes.append((service, old, new))

    monitor = HealthMonitor(
        "log", [HealthCheck("ttl", ttl=0.2, interval=0.02, unhealthy_threshold=1)]
    )

    async def main() -> None:
        task = asyncio.create_task(monitor.run(on_change))
        try:
            await until(lambda: changes[-1:] == [("log", "unknown", "critical")])
            monitor.heartbeat()
            await until(lambda: changes[-1:] == [("log", "critical", "passing")])
            # No more heartbeats: the ttl expires.
            await until(lambda: changes[-1:] == [("log", "passing", "critical")])
            monitor.heartbeat()
            await until(lambda: changes[-1:] == [("log", "critical", "passing")])
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert changes == [
        ("log", "unknown", "critical"),
        ("log", "critical", "passing"),
        ("log", "passing", "critical"),
        ("log", "critical", "passing"),
    ]


def test_run_survives_a_failing_callback_and_accepts_a_sync_one(
    http_server: tuple[str, type[_Handler]],
) -> None:
    url, handler = http_server
    seen: list[str] = []

    def on_change(service: str, old: str, new: str) -> None:
        seen.append(new)
        if len(seen) == 1:
            raise RuntimeError("a broken watcher must not stop the checks")

    monitor = HealthMonitor("web", [HealthCheck("http", url, interval=0.02, unhealthy_threshold=2)])

    async def main() -> None:
        task = asyncio.create_task(monitor.run(on_change))
        try:
            await until(lambda: seen == ["passing"])
            handler.status = 503
            await until(lambda: seen == ["passing", "warning", "critical"])
            handler.status = 200
            await until(lambda: seen[-1] == "passing")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_cancelling_run_kills_a_running_exec_check(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 60"
    monitor = HealthMonitor("slow", [HealthCheck("exec", ("sh", "-c", script), timeout=60)])

    async def main() -> int:
        task = asyncio.create_task(monitor.run(lambda *change: None))
        await until(pid_file.exists)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pid_file.read_text())

    pid = asyncio.run(main())
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(pid)


def test_run_without_checks_returns() -> None:
    monitor = HealthMonitor("nothing", [])
    asyncio.run(monitor.run(lambda *change: None))
    assert monitor.status == "unknown"


def test_probe_result_is_a_value() -> None:
    assert ProbeResult(True, "", 0.0) == ProbeResult(True, "", 0.0)


# -- the start period of a new incarnation -------------------------------------------


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_start_period_is_read_and_defaults_to_zero() -> None:
    assert HealthCheck("tcp", "h:1").start_period == 0
    check = HealthCheck.from_mapping("web", {"kind": "tcp", "target": "h:1", "start_period": 30})
    assert check.start_period == 30.0 and isinstance(check.start_period, float)


def test_failures_in_the_start_period_do_not_count() -> None:
    clock, switch = Clock(), Switch()
    check = HealthCheck("method", "healthy", unhealthy_threshold=2, start_period=10)
    monitor = HealthMonitor("web", [check], call_method=switch, clock=clock)
    switch.ok = False

    async def main() -> list[tuple[str, int]]:
        seen = []
        for now in (50.0, 55.0, 59.9, 60.0, 61.0):  # the period ends at 60
            clock.now = now
            snap = await monitor.run_once()
            seen.append((snap.status, snap.checks[0].state.failures))
        return seen

    assert asyncio.run(main()) == [
        ("unknown", 0),
        ("unknown", 0),
        ("unknown", 0),
        ("unknown", 1),
        ("critical", 2),
    ]
    last = monitor.snapshot().checks[0].last
    assert last is not None and "unhealthy" in last.output  # shown even while not counted


def test_a_pass_ends_the_start_period_early() -> None:
    clock, switch = Clock(), Switch()
    check = HealthCheck("method", "healthy", unhealthy_threshold=2, start_period=300)
    monitor = HealthMonitor("web", [check], call_method=switch, clock=clock)

    async def main() -> list[str]:
        seen = []
        for ok in (False, True, False, False):
            switch.ok = ok
            seen.append((await monitor.run_once()).status)
        return seen

    assert monitor.in_start_period(0)
    assert asyncio.run(main()) == ["unknown", "passing", "warning", "critical"]
    assert not monitor.in_start_period(0)  # over for good, though 300 s have not passed


def test_without_a_start_period_failures_count_at_once() -> None:
    switch = Switch()
    switch.ok = False
    monitor = HealthMonitor(
        "web", [HealthCheck("method", "healthy", unhealthy_threshold=1)], call_method=switch
    )
    assert not monitor.in_start_period(0)
    assert asyncio.run(monitor.run_once()).status == "critical"


def test_each_check_has_its_own_start_period() -> None:
    clock = Clock()
    quick = HealthCheck("exec", ("false",), unhealthy_threshold=1)
    slow = HealthCheck("exec", ("false",), unhealthy_threshold=1, start_period=5)
    monitor = HealthMonitor("web", [quick, slow], clock=clock)
    snap = asyncio.run(monitor.run_once())
    assert [c.status for c in snap.checks] == ["critical", "unknown"]


def test_a_new_monitor_starts_unknown_with_nothing_counted() -> None:
    """The manager makes one monitor per incarnation: nothing carries over."""
    monitor = HealthMonitor("web", [HealthCheck("exec", ("true",))])
    snap = monitor.snapshot()
    assert snap.status == "unknown"
    assert [(c.state.passes, c.state.failures, c.last) for c in snap.checks] == [(0, 0, None)]


def test_the_configuration_file_gives_a_check_its_start_period(tmp_path: Path) -> None:
    from ikos.manager._config import read_declarations

    conf = tmp_path / "ikos.toml"
    conf.write_text(
        '[executables.web]\nexecutable = "sleep"\n'
        '[[executables.web.health]]\nkind = "tcp"\ntarget = "127.0.0.1:80"\nstart_period = 15\n'
        '[executables.bad]\nexecutable = "sleep"\n'
        '[[executables.bad.health]]\nkind = "tcp"\ntarget = "127.0.0.1:80"\nstart_period = -1\n'
    )
    with pytest.raises(ConfigError) as err:
        read_declarations(conf)
    assert "[executables.bad.health] key 'start_period': expected a number of seconds >= 0" in (
        str(err.value)
    )
    conf.write_text(conf.read_text().split("[executables.bad]")[0])
    (check,) = read_declarations(conf).health["web"]
    assert check.start_period == 15.0
