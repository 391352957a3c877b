"""Health checks against a real ikosd and real probes: every kind failing and recovering.

The daemons and their checks come from an ``ikos.toml`` given with a
``--tree`` module that defines the actor classes. The probes meet real
things: a command's exit status, a TCP listener of the test, an
``http.server`` of the test, heartbeats sent through the control socket and
an actor's own method. What a user sees is checked: ``ikosctl status
--json`` (``health``, ``health_checks``), the health of the daemons'
services, and the registry's events.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, wait_for
from test_registry_live import ctl_json, info

import ikos
import ikos.registry as registry

TREE = """
import os
import ikos
import ikos.registry as registry

class Checked(ikos.Actor):
    def on_start(self):
        self.sick = False

    def receive(self, message):
        method = registry.health_request(message)
        if method is not None:
            return getattr(self, method)()
        if message in ("sick", "well"):
            self.sick = message == "sick"
        return os.getpid()

    def healthy(self):
        return "fine" if not self.sick else False

tree = ikos.Supervisor("root", max_restarts=100, within=1)
"""

# Probes every 0.1 s; generous timeout and threshold, so that a stall of this
# shared, loaded machine never passes for a failure.
FAST = "interval = 0.1\ntimeout = 2\nunhealthy_threshold = 3\n"


def sleeper(name: str, check: str, on_failure: str = "alert") -> str:
    return f"""
[executables.{name}]
executable = "sleep"
args = ["1000"]
[executables.{name}.service]
name = "{name}/svc"
type = "probe"
[[executables.{name}.health]]
{check}
on_failure = "{on_failure}"
{FAST}
"""


class Toggle:
    """A flag shared with a server thread, and the status it answers when not ok."""

    def __init__(self, failing_status: int = 503) -> None:
        self.ok = True
        self.failing_status = failing_status


class TcpListener:
    """A real TCP server the test can close and reopen on the same port.

    A thread accepts and closes every connection, so that the probes never
    fill the listen backlog.
    """

    def __init__(self) -> None:
        self.port = 0
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.open()

    def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.sock = sock
        self.thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self.thread.start()

    @staticmethod
    def _accept(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed
            conn.close()

    def close(self) -> None:
        if self.sock is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None


@contextlib.contextmanager
def http_server(toggle: Toggle) -> Iterator[int]:
    """A real ``http.server`` answering 200, or (503) ``toggle.failing_status`` when not ok."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"ok" if toggle.ok else b"unwell"
            self.send_response(200 if toggle.ok else toggle.failing_status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class Heartbeats:
    """Heartbeats for a daemon's ttl check, sent every 0.1 s while ``beating`` is set.

    A driver of the daemon's liveness, as the daemon itself would run it;
    the test still waits on conditions, never on this thread's pace.
    """

    def __init__(self, daemon: str, root: Path) -> None:
        self.daemon, self.root = daemon, root
        self.beating = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.1):
            if self.beating.is_set():
                with contextlib.suppress(ikos.IkosError):
                    registry.heartbeat(self.daemon, note="from the test", root=self.root)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def health(inst: Instance, name: str) -> str:
    return str(inst.status(name)["health"])


def test_every_check_kind_fails_and_recovers(ikosd_factory, tmp_path: Path):
    flag = tmp_path / "healthy.flag"
    flag.touch()
    listener = TcpListener()
    web = Toggle()
    with contextlib.ExitStack() as stack:
        stack.callback(listener.close)
        port = stack.enter_context(http_server(web))
        config = (
            "[ikosd]\nmetrics = false\n"
            + sleeper("exc", f'kind = "exec"\ntarget = ["test", "-e", "{flag}"]')
            + sleeper("tcp", f'kind = "tcp"\ntarget = "127.0.0.1:{listener.port}"')
            + sleeper("web", f'kind = "http"\ntarget = "http://127.0.0.1:{port}/health"')
            + sleeper("hb", 'kind = "ttl"\nttl = 2')
            + f"""
[actors.mth]
class = "tree_inst:Checked"
service = {{ name = "mth/svc", type = "probe" }}
health = {{ kind = "method", target = "healthy", {", ".join(FAST.split(chr(10))[:-1])} }}
"""
        )
        inst = ikosd_factory(tree=TREE, config=config)
        daemons = ["exc", "tcp", "web", "hb", "mth"]
        events = stack.enter_context(registry.watch(root=inst.root, idle_timeout=30))
        beats = Heartbeats("hb", inst.root)
        stack.callback(beats.stop)
        beats.beating.set()

        def all_health(expected: str) -> bool:
            statuses = {s["name"]: s for s in inst.status() if s["name"] in daemons}
            return all(s["health"] == expected for s in statuses.values())

        wait_for(lambda: all_health("passing"), message="every check passing")
        status = inst.status("web")
        assert status["services"] == ["web/svc"]
        assert status["health_checks"] == [
            {
                "check": f"http http://127.0.0.1:{port}/health",
                "status": "passing",
                "on_failure": "alert",
                "output": "HTTP/1.0 200 OK\nok",
            }
        ]
        assert inst.status("mth")["health_checks"][0]["output"] == "fine"
        assert {s["name"]: s["health"] for s in ctl_json(inst, "services")} == {
            f"{d}/svc": "passing" for d in daemons
        }
        pids = {d: inst.pid_of(d) for d in daemons}

        # Break every probe's target.
        beats.beating.clear()
        flag.unlink()
        listener.close()
        web.ok = False
        ikos.ActorRef("mth", root=inst.root).ask("sick", timeout=10)
        wait_for(lambda: all_health("critical"), message="every check critical")
        assert {s["name"]: s["health"] for s in ctl_json(inst, "services")} == {
            f"{d}/svc": "critical" for d in daemons
        }
        outputs = {d: inst.status(d)["health_checks"][0]["output"] for d in daemons}
        assert outputs["exc"].startswith("exit status 1")
        assert "connect to 127.0.0.1" in outputs["tcp"]
        assert outputs["web"].startswith("HTTP/1.0 503")
        assert outputs["hb"].startswith("last heartbeat") and "from the test" in outputs["hb"]
        assert outputs["mth"] == "False"
        text = inst.ctl("status", "web").stdout
        assert "Health: critical (http http://127.0.0.1:" in text

        # Mend them: every check passes again; on_failure = "alert" restarted nothing.
        beats.beating.set()
        flag.touch()
        listener.open()
        web.ok = True
        ikos.ActorRef("mth", root=inst.root).ask("well", timeout=10)
        wait_for(lambda: all_health("passing"), message="every check passing again")
        assert {d: inst.pid_of(d) for d in daemons} == pids
        assert all(info(inst, f"{d}/svc").health == "passing" for d in daemons)

        # The watcher saw each service go critical (by way of warning), then passing again.
        seen: dict[str, list[str]] = {f"{d}/svc": [] for d in daemons}
        daemon_events = []

        def recovered(changes: list[str]) -> bool:
            return changes[-2:] == ["critical", "passing"]

        deadline = time.monotonic() + 60
        while not all(recovered(changes) for changes in seen.values()):
            assert time.monotonic() < deadline, f"not every service recovered: {seen}"
            event = next(events)  # at most 30 s each (the watch's idle timeout)
            if event.kind == "health" and event.service is not None:
                changes = seen[event.service.name]
                new = event.service.health
                if new in ("critical", "passing") and changes[-1:] != [new]:
                    changes.append(new)
            elif event.kind == "daemon_health":
                daemon_events.append((event.daemon, event.health))
        assert ("exc", "critical") in daemon_events


def test_an_unhealthy_daemon_with_on_failure_restart_is_restarted(ikosd_factory, tmp_path):
    flag = tmp_path / "healthy.flag"
    flag.touch()
    config = (
        "[ikosd]\nmetrics = false\n"
        + sleeper("fragile", f'kind = "exec"\ntarget = ["test", "-e", "{flag}"]', "restart")
        + f"""
[actors.picky]
class = "tree_inst:Checked"
[[actors.picky.health]]
kind = "method"
target = "healthy"
on_failure = "restart"
{FAST}
"""
    )
    inst = ikosd_factory(tree=TREE, config=config)
    wait_for(lambda: health(inst, "fragile") == "passing" and health(inst, "picky") == "passing")
    old_exec, old_actor = inst.pid_of("fragile"), inst.pid_of("picky")

    flag.unlink()
    new_exec = inst.wait_running_new_pid("fragile", old_exec)
    flag.touch()
    wait_for(lambda: health(inst, "fragile") == "passing")
    assert inst.pid_of("fragile") == new_exec or inst.pid_of("fragile") != old_exec

    # The actor's own method says it is sick: a new incarnation, healthy again.
    assert ikos.ActorRef("picky", root=inst.root).ask("sick", timeout=10) == old_actor
    inst.wait_running_new_pid("picky", old_actor)
    wait_for(lambda: health(inst, "picky") == "passing")
    assert "health of picky is critical: failing it for its supervisor" in inst.log_text()
    svc = info(inst, "fragile/svc")
    assert svc.active and svc.pid == inst.pid_of("fragile")


GIVING_UP_TREE = """
import ikos

tree = ikos.Supervisor("root", max_restarts=2, within=60)
"""


def test_health_restarts_count_against_restart_intensity(ikosd_factory, tmp_path: Path):
    """Issue 7.12: a health restart is a failure like any other.

    The endpoint starts answering 404. Each health restart counts against the
    root's intensity (2 in 60 s), so the third makes it give up and ikosd exit
    1, where an operator-style restart would go on for ever; and the second
    incarnation, failing from its first probe, is given its start period
    before its checks count.
    """
    starts = tmp_path / "starts"
    web = Toggle(failing_status=404)
    with http_server(web) as port:
        config = f"""
[ikosd]
metrics = false

[executables.web]
executable = "sh"
args = ["-c", "date +%s.%N >> {starts}; exec sleep 1000"]

[[executables.web.health]]
kind = "http"
target = "http://127.0.0.1:{port}/health"
on_failure = "restart"
start_period = 1
{FAST}
"""
        inst = ikosd_factory(tree=GIVING_UP_TREE, config=config, expect_exit=1)
        wait_for(lambda: health(inst, "web") == "passing", message="web passing")
        web.ok = False

        def times() -> list[float]:
            return [float(t) for t in starts.read_text().split()]

        def outcome() -> str | None:
            if len(times()) > 3:
                return "restarted a third time"
            return "exited" if inst.proc.poll() is not None else None

        assert wait_for(outcome, 60, message="ikosd to exit or web to restart") == "exited"
        assert inst.proc.returncode == 1
        assert len(times()) == 3
        _, second, third = times()
        assert third - second >= 1.0  # the start period of the second incarnation
        text = inst.log_text()
        assert "reached max restart intensity (2 in 60 s) after 'web' health check failed" in text
        assert inst.leftovers() == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[executables.x]\nexecutable = "sleep"\n'
            '[executables.x.health]\nkind = "method"\ntarget = "ok"\n',
            "[executables.x.health] key 'kind': expected exec, tcp, http or ttl",
        ),
        (
            '[executables.x]\nexecutable = "sleep"\n'
            '[[executables.x.health]]\nkind = "tcp"\ntarget = "nohost"\n',
            "[executables.x.health] key 'target': expected an address 'host:port'",
        ),
    ],
)
def test_ikosd_refuses_a_bad_health_table_naming_it(ikosd_factory, table: str, message: str):
    inst = ikosd_factory(
        config="[ikosd]\nmetrics = false\n" + table, wait_ready=False, expect_exit=2
    )
    assert inst.proc.wait(timeout=60) == 2
    assert message in inst.log_text()
