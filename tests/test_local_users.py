"""What another local user can and cannot do to an instance (ikos issue 7).

Each test runs the real ikosd in a directory every user can traverse and
acts as a user the test creates (``useradd``): a user with no relation to
the instance, the one the control and notify sockets (mode 0666) must be
safe from. That user tries what the issue reports: holding every
connection, pipelining requests it never reads, reading secrets, flooding
the notify socket. The checks are what root and the owner still get, what
the manager's memory does, what the audit log says; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import REPO, Instance, wait_for

from ikos._errors import NoSuchDaemon
from ikos.manager import _control_server
from ikos.manager._control_server import (
    AUDIT_BURST,
    MAX_CONNECTIONS_PER_UID,
    PUBLIC_STATUS_FIELDS,
    ControlServer,
)
from ikos.monitor._logfile import RotatingLog
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv to create another user and act as it",
)

SECRET = "s3cret-token-4711"
CONFIG = f"""
[ikosd]
metrics = false

[actors.echo]
class = "examples.actors:Echo"
description = "answers every message"

[executables.leaky]
executable = "/bin/sh"
args = ["-c", "echo token=$API_TOKEN; exec sleep 3600"]
environment = {{ API_TOKEN = "{SECRET}" }}
description = "prints its token"
"""


@pytest.fixture(scope="module")
def stranger() -> Iterator[pwd.struct_passwd]:
    """A system user created for these tests (and its group), removed afterwards."""
    name = f"ikos-t-{uuid.uuid4().hex[:8]}"
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/false"]
    # Other test runs may hold the lock on /etc/passwd for a moment.
    wait_for(
        lambda: subprocess.run([*command, name], capture_output=True).returncode == 0,
        60,
        0.2,
        "useradd",
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        wait_for(
            lambda: subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6),
            60,
            0.2,
            "userdel",
        )


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="ikos-users-"))
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def inst(ikosd_factory: Any, reachable: Path) -> Instance:
    """A real ikosd whose root another user can reach."""
    root = reachable / "root"
    started = ikosd_factory(config=CONFIG, args=["--root", str(root)])  # the last --root wins
    return Instance(root, started.proc, started.mark, started.log)


def as_user(
    user: pwd.struct_passwd,
    argv: list[str],
    gid: int | None = None,
    groups: str = "--clear-groups",
    **kwargs: Any,
) -> subprocess.Popen[str]:
    """Start ``argv`` as ``user``: its uid, ``gid`` (default its own), ``groups`` (none)."""
    gid = user.pw_gid if gid is None else gid
    command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={gid}", groups, *argv]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": "/"}
    return subprocess.Popen(command, env=env, text=True, **kwargs)


def ctl_as(user: pwd.struct_passwd, inst: Instance, *args: str) -> subprocess.CompletedProcess[str]:
    """``ikosctl --root ROOT ARGS`` as ``user``."""
    ikosctl = str(Path(sys.executable).parent / "ikosctl")
    proc = as_user(
        user,
        [ikosctl, "--root", str(inst.root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def python_as(
    user: pwd.struct_passwd, code: str, *args: str, **kwargs: Any
) -> subprocess.Popen[str]:
    """A Python program as ``user``, its stdout a pipe (``kwargs`` as :func:`as_user`'s)."""
    argv = [sys.executable, "-c", textwrap.dedent(code), *args]
    return as_user(user, argv, stdout=subprocess.PIPE, **kwargs)


@contextlib.contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def next_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the helper ended (status {proc.wait(timeout=60)})"
    report: dict[str, Any] = json.loads(line)
    return report


def audit_lines(inst: Instance) -> list[str]:
    return [
        line
        for line in (inst.root / "var/log/ikos/ikosd.log").read_text().splitlines()
        if " ikos.audit: " in line
    ]


# -- control ----------------------------------------------------------------------------------


def test_another_user_may_only_read(inst: Instance, stranger: pwd.struct_passwd) -> None:
    run_dir = inst.root / "run" / "ikos"
    # What lets the user in: a world-reachable run dir and socket, while the
    # mailboxes and the secret stay private.
    assert stat.S_IMODE(run_dir.stat().st_mode) & 0o005 == 0o005
    assert stat.S_IMODE((run_dir / "ikosd.sock").stat().st_mode) == 0o666
    assert stat.S_IMODE((run_dir / "actors").stat().st_mode) == 0o700
    assert stat.S_IMODE((inst.root / "var/lib/ikos/secret").stat().st_mode) == 0o600

    before = inst.status()
    res = ctl_as(stranger, inst, "status", "--json")
    assert res.returncode == 0, res.stderr
    assert [s["pid"] for s in json.loads(res.stdout)] == [s["pid"] for s in before]
    assert ctl_as(stranger, inst, "list").returncode == 0
    assert ctl_as(stranger, inst, "tree", "--json").returncode == 0
    assert ctl_as(stranger, inst, "is-active", "echo").returncode == 0

    for args in (
        ["stop", "echo"],
        ["restart", "echo"],
        ["kill", "-s", "KILL", "echo"],
        ["call", "echo", "hi"],
        ["reload-config"],
        ["shutdown"],
    ):
        res = ctl_as(stranger, inst, *args)
        assert res.returncode == 1, (args, res.stderr)
        assert res.stderr.startswith("ikosctl: ") and res.stderr.count("\n") == 1, res.stderr
        assert f"uid {stranger.pw_uid} may only read" in res.stderr

    after = inst.status()
    assert [(s["name"], s["state"], s["pid"], s["restarts"]) for s in after] == [
        (s["name"], s["state"], s["pid"], s["restarts"]) for s in before
    ]
    # Each attempt is in the audit trail, and nothing was done.
    refused = [line for line in audit_lines(inst) if f"uid {stranger.pw_uid}: refused" in line]
    assert [line.split(": refused ")[1].split(" (")[0] for line in refused] == [
        "stop 'echo'",
        "restart 'echo'",
        "kill 'echo'",
        "call 'echo'",
        "reload_config",
        "shutdown",
    ]
    assert inst.proc.poll() is None


# -- connections ------------------------------------------------------------------------------

HOLD_CONNECTIONS = """
import json, select, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
socks = {}
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks[s] = b""
refused = closed = 0
deadline = time.monotonic() + 120
while socks and time.monotonic() < deadline:
    ready, _, _ = select.select(list(socks), [], [], 1.0)
    for s in ready:
        data = s.recv(4096)
        if data:
            socks[s] += data
            continue
        if b'"limit"' in socks[s]:
            refused += 1
        else:
            closed += 1
        del socks[s]
        s.close()
    print(json.dumps({"open": len(socks), "refused": refused, "closed": closed}), flush=True)
"""


def test_another_user_cannot_lock_out_root_and_its_idle_connections_close(
    inst: Instance, stranger: pwd.struct_passwd
) -> None:
    count = 300
    socket_path = str(inst.root / "run/ikos/ikosd.sock")
    with running(python_as(stranger, HOLD_CONNECTIONS, socket_path, str(count))) as holder:
        report = next_report(holder)
        while report["refused"] < count - MAX_CONNECTIONS_PER_UID:
            report = next_report(holder)
        assert report["open"] == MAX_CONNECTIONS_PER_UID
        # While that user holds every connection it may have, root is served.
        res = inst.ctl("list")
        assert res.returncode == 0, res.stderr
        assert "echo" in res.stdout
        res = inst.ctl("stop", "echo")
        assert (res.returncode, res.stderr) == (0, "")
        assert inst.state("echo") == "stopped"
        inst.ctl("start", "echo", check=True)
        # The held connections are idle: ikosd closes them.
        while report["open"]:
            report = next_report(holder)
        assert report["closed"] == MAX_CONNECTIONS_PER_UID
    # Each refused connection is audited, as many as a flood deserves and then a count.
    refused = [line for line in audit_lines(inst) if f"uid {stranger.pw_uid}: refused" in line]
    assert 1 <= len(refused) <= AUDIT_BURST
    assert "connect" in refused[0] and f"uid {stranger.pw_uid} already has" in refused[0]


PIPELINE_WITHOUT_READING = """
import json, socket, sys, time
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
request = b'{"id": 1, "verb": "list"}\\n' * 1000
socks = []
sent = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    while len(socks) < count:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:
            s.close()
            break
        s.setblocking(False)
        socks.append(s)
    for s in list(socks):
        try:
            sent += s.send(request)
        except BlockingIOError:
            pass
        except OSError:  # refused or dropped: try again with a new one
            socks.remove(s)
            s.close()
    time.sleep(0.01)
print(json.dumps({"sent": sent}), flush=True)
"""


def test_clients_that_never_read_do_not_make_ikosd_grow(
    inst: Instance, stranger: pwd.struct_passwd
) -> None:
    manager = psutil.Process(inst.pid)
    baseline = manager.memory_info().rss
    socket_path = str(inst.root / "run/ikos/ikosd.sock")
    peak = baseline
    with running(python_as(stranger, PIPELINE_WITHOUT_READING, socket_path, "250", "20")) as flood:
        while flood.poll() is None:
            peak = max(peak, manager.memory_info().rss)
            time.sleep(0.1)  # sampling, not waiting for a condition
        report = next_report(flood)
    assert report["sent"] > 50 * 1024 * 1024  # the flood did push requests at ikosd
    growth = (peak - baseline) / 2**20
    print(f"ikosd RSS {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB under the flood")
    assert growth < 60, f"ikosd grew by {growth:.0f} MiB"
    assert inst.ctl("list").returncode == 0


# -- what another user may read ------------------------------------------------------------------


def test_another_user_sees_names_and_states_but_no_secrets(
    inst: Instance, stranger: pwd.struct_passwd
) -> None:
    wait_for(lambda: SECRET in inst.ctl("logs", "leaky").stdout, message="leaky's output")
    allowed = PUBLIC_STATUS_FIELDS | {"redacted", "children"}
    res = ctl_as(stranger, inst, "list", "--json")
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert [s["name"] for s in listing] == [s["name"] for s in inst.status()]
    for status in listing:
        assert set(status) <= allowed, status
        # every daemon runs, but the IPC broker, stopped until a first connection
        waiting = status.get("activation") == "waiting"
        assert status["redacted"] is True and (status["state"] == "running") != waiting
    tree = json.loads(ctl_as(stranger, inst, "tree", "--json").stdout)
    assert set(tree) <= allowed and all(set(c) <= allowed for c in tree["children"])
    res = ctl_as(stranger, inst, "status", "leaky")
    assert res.returncode == 0, res.stderr
    assert "prints its token" not in res.stdout and "/bin/sh" not in res.stdout
    assert "Details: hidden" in res.stdout
    # The owner still sees everything.
    assert inst.status("leaky")["description"] == "prints its token"

    res = ctl_as(stranger, inst, "logs", "leaky")
    assert res.returncode == 1 and SECRET not in res.stdout + res.stderr
    assert f"uid {stranger.pw_uid} may not read 'logs'" in res.stderr
    res = ctl_as(stranger, inst, "logs", "-f", "leaky")
    assert res.returncode == 1 and SECRET not in res.stdout + res.stderr

    # Nor around ikosd: the log files and their directory are the owner's.
    log_dir = inst.root / "var/log/ikos"
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((log_dir / "leaky.log").stat().st_mode) == 0o600
    reader = as_user(
        stranger,
        ["cat", str(log_dir / "leaky.log"), str(log_dir / "ikosd.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = reader.communicate(timeout=60)
    assert reader.returncode != 0 and SECRET not in out and "Permission denied" in err


def test_a_daemons_configuration_is_private(inst: Instance, stranger: pwd.struct_passwd) -> None:
    """Item 9: another user read API_TOKEN through daemon_get."""
    with ControlClient(InstancePaths.for_root(inst.root)) as client:
        assert client.call("hello")["verbs"]["daemon_get"] == "private"
    answer = request_as(stranger, inst, {"id": 1, "verb": "daemon_get", "args": {"name": "leaky"}})
    assert answer["ok"] is False and answer["error"]["code"] == "permission_denied"
    assert SECRET not in json.dumps(answer)


def test_alerts_and_the_events_stream_are_private(
    inst: Instance, stranger: pwd.struct_passwd
) -> None:
    """Alerts carry health-check output and exit reasons: another user gets neither."""
    for verb in ("alerts", "events"):
        answer = request_as(stranger, inst, {"id": 1, "verb": verb})
        assert answer["ok"] is False and answer["error"]["code"] == "permission_denied", answer


REQUEST = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
print(s.makefile().readline(), end="", flush=True)
"""


def request_as(
    user: pwd.struct_passwd, inst: Instance | Path, request: dict[str, Any], **kwargs: Any
) -> Any:
    """Send one request as ``user`` to an instance (or a socket path); the parsed answer."""
    path = inst if isinstance(inst, Path) else inst.root / "run/ikos/ikosd.sock"
    proc = python_as(user, REQUEST, str(path), json.dumps(request), **kwargs)
    with running(proc):
        assert proc.stdout is not None
        return json.loads(proc.stdout.read())


# -- the audit trail ---------------------------------------------------------------------------


def test_audit_lines_name_the_target_never_the_payload(
    inst: Instance, stranger: pwd.struct_passwd
) -> None:
    res = inst.ctl("call", "echo", '{"password": "hunter2"}')
    assert res.returncode == 0, res.stderr
    assert "hunter2" in res.stdout
    answer = request_as(
        stranger,
        inst,
        {"id": 1, "verb": "call", "args": {"name": "echo", "data": {"password": "hunter3"}}},
    )
    assert answer["error"]["code"] == "permission_denied"
    lines = audit_lines(inst)
    assert any(re.search(r"pid \d+ uid 0: call 'echo'$", line) for line in lines), lines
    refused = [line for line in lines if f"uid {stranger.pw_uid}: refused call 'echo'" in line]
    assert len(refused) == 1, lines
    text = (inst.root / "var/log/ikos/ikosd.log").read_text()
    assert "hunter2" not in text and "hunter3" not in text and "password" not in text


def test_refused_attempts_are_audited_and_rate_limited_per_user(
    inst: Instance, stranger: pwd.struct_passwd
) -> None:
    flood = """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    for n in range(200):
        f.write(b'{"id": %d, "verb": "stop", "args": {"name": "echo"}}\\n' % n)
        f.flush()
        assert b"permission_denied" in f.readline()
    print(json.dumps({"refused": 200}), flush=True)
    """
    with running(python_as(stranger, flood, str(inst.root / "run/ikos/ikosd.sock"))) as proc:
        assert next_report(proc) == {"refused": 200}
    refused = [line for line in audit_lines(inst) if f"uid {stranger.pw_uid}: refused" in line]
    assert len(refused) == AUDIT_BURST
    assert all("refused stop 'echo' (uid" in line for line in refused)
    assert inst.state("echo") == "running"
    # Root's own actions are still audited one by one during that user's flood.
    inst.ctl("restart", "echo", check=True)
    assert any("uid 0: restart 'echo'" in line for line in audit_lines(inst))


# -- the notify socket -------------------------------------------------------------------------

NOTIFIER = """
import time
from ikos.platform._notify import notify
notify("READY=1")
n = 0
while True:
    n += 1
    notify(f"STATUS=tick {n}")
    time.sleep(0.2)
"""

NOTIFY_CONFIG = """
[ikosd]
metrics = false

[executables.notifier]
executable = "{python}"
args = ["{script}"]
type = "notify"
environment = {{ PYTHONPATH = "{repo}" }}
"""

NOTIFY_FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    s.send(b"STATUS=flood")  # blocks while ikosd's queue is full
"""


def test_a_notify_flood_from_another_user_is_dropped_and_daemons_still_notify(
    ikosd_factory: Any, stranger: pwd.struct_passwd, reachable: Path
) -> None:
    base = reachable
    if True:
        root = base / "root"
        (base / "notifier.py").write_text(NOTIFIER)
        config = NOTIFY_CONFIG.format(python=sys.executable, script=base / "notifier.py", repo=REPO)
        started = ikosd_factory(config=config, args=["--root", str(root)])
        inst = Instance(root, started.proc, started.mark, started.log)
        notify_socket = str(root / "run/ikos/notify.sock")
        manager = psutil.Process(inst.pid)
        flood = python_as(stranger, NOTIFY_FLOOD, notify_socket, "120")  # killed when done
        with running(flood):
            log = inst.root / "var/log/ikos/ikosd.log"
            wait_for(
                lambda: f"uid {stranger.pw_uid} (pid" in log.read_text(),
                60,
                message="the flood to be rate-limited",
            )
            before, at = sum(manager.cpu_times()[:2]), time.monotonic()
            # A daemon's notifications still arrive: READY=1 of a restart, and STATUS=.
            old = inst.status("notifier")
            res = inst.ctl("restart", "notifier")
            assert res.returncode == 0, res.stderr
            wait_for(
                lambda: (
                    (s := inst.status("notifier"))["pid"] != old["pid"]
                    and str(s.get("status_text", "")).startswith("tick")
                ),
                60,
                message="the restarted notifier's READY=1 and STATUS=",
            )
            cpu = (sum(manager.cpu_times()[:2]) - before) / (time.monotonic() - at)
            print(f"ikosd used {cpu:.0%} of a core during the flood")
            wait_for(
                lambda: re.search(
                    rf"dropped \d+ datagrams of uid {stranger.pw_uid} over its rate limit",
                    log.read_text(),
                ),
                60,
                message="the count of dropped datagrams in the log",
            )


# -- the mechanisms, on a ControlServer of this process ----------------------------------------

WEB = {
    "name": "web",
    "kind": "exec",
    "state": "running",
    "pid": 4242,
    "restarts": 0,
    "started_at": 1764134400.5,
    "supervisor": "root",
    "target": "/usr/sbin/nginx",
    "description": "the front end",
    "status_text": "serving 3 clients",
    "last_exit": {"reason": "exited with status 1: TOKEN=abc", "code": 1, "signal": None},
}


class StubExecs:
    def __init__(self, root: Path) -> None:
        self.log = RotatingLog(root / "web.log")

    def tail(self, name: str, lines: int) -> list[str]:
        return ["TOKEN=abc"][-lines:] if lines else []

    def log_for(self, name: str) -> RotatingLog:
        return self.log


class StubManager:
    """What the ControlServer's own verbs use of the manager, with one daemon 'web'."""

    def __init__(self, root: Path) -> None:
        self.paths = InstancePaths.for_root(root)
        self.paths.run_dir.mkdir(parents=True)
        self.logs = StubExecs(root)  # the daemons' logs: tail and follow

    def health(self) -> dict[str, Any]:
        return {"state_store": {"ok": True}}

    def node(self, name: str) -> str:
        if name != "web":
            raise NoSuchDaemon(f"no daemon named {name!r}")
        return name

    def status_of(self, node: str) -> dict[str, Any]:
        return dict(WEB)

    def list_json(self) -> list[dict[str, Any]]:
        return [dict(WEB)]

    def tree_json(self) -> dict[str, Any]:
        return {**WEB, "children": [dict(WEB)]}


@contextlib.contextmanager
def serving(root: Path, reader_gid: int | None = None) -> Iterator[Path]:
    """A ControlServer on a stub manager, in a loop thread; yields its socket path."""
    loop = asyncio.new_event_loop()
    manager = StubManager(root)
    server = ControlServer(manager, reader_gid=reader_gid)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield manager.paths.control_socket
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        manager.logs.log.close()


def hello(user: pwd.struct_passwd, path: Path, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = request_as(user, path, {"id": 1, "verb": "hello"}, **kwargs)["result"]
    return result


def test_the_reader_group_may_read_what_other_users_may_not(
    stranger: pwd.struct_passwd, reachable: Path
) -> None:
    nogroup = 65534
    list_request = {"id": 1, "verb": "list"}
    logs_request = {"id": 2, "verb": "logs", "args": {"name": "web"}}
    with serving(reachable / "root", reader_gid=stranger.pw_gid) as path:
        # In the group by its primary gid, or by a supplementary one: a reader.
        for kwargs in ({}, {"gid": nogroup, "groups": f"--groups={stranger.pw_gid}"}):
            assert hello(stranger, path, **kwargs)["can_read"] is True
            assert request_as(stranger, path, list_request, **kwargs)["result"] == [WEB]
            logs = request_as(stranger, path, logs_request, **kwargs)
            assert logs["result"] == {"name": "web", "lines": ["TOKEN=abc"]}
            # A reader reads; it does not control.
            stop = request_as(stranger, path, {"id": 3, "verb": "stop", "args": {"name": "web"}})
            assert stop["error"]["code"] == "permission_denied"
        # Outside the group: names and states only, and no logs.
        outsider = {"gid": nogroup}
        answer = hello(stranger, path, **outsider)
        assert (answer["can_read"], answer["can_control"]) == (False, False)
        assert answer["verbs"]["logs"] == "private" and answer["verbs"]["list"] == "public"
        [shown] = request_as(stranger, path, list_request, **outsider)["result"]
        public = ("name", "kind", "state", "pid", "restarts", "started_at", "supervisor")
        assert shown == {**{key: WEB[key] for key in public}, "redacted": True}
        tree = request_as(stranger, path, {"id": 1, "verb": "tree"}, **outsider)["result"]
        assert "target" not in tree and "description" not in tree["children"][0]
        denied = request_as(stranger, path, logs_request, **outsider)
        assert denied["error"]["code"] == "permission_denied"
        assert "TOKEN" not in json.dumps(denied)
    with serving(reachable / "other", reader_gid=None) as path:
        assert hello(stranger, path)["can_read"] is False


NEVER_READ = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.setblocking(False)
request = b'{"id": 1, "verb": "tree"}\\n' * 1000
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        s.send(request)
    except BlockingIOError:
        time.sleep(0.05)
    except OSError:  # ikosd dropped us
        print("dropped", flush=True)
        break
"""


def test_a_client_that_does_not_read_its_answers_is_dropped(
    stranger: pwd.struct_passwd,
    reachable: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_control_server, "DRAIN_TIMEOUT", 1.0)
    with (
        serving(reachable / "root") as path,
        running(python_as(stranger, NEVER_READ, str(path))) as proc,
    ):
        assert proc.stdout is not None
        assert proc.stdout.readline() == "dropped\n"
    assert "did not read its answer within 1s" in caplog.text


HALF_A_LINE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"id": 1, "verb": "' + b"x" * int(sys.argv[2]))
    s.recv(1)
except OSError:
    pass
print("closed", flush=True)
"""


def test_other_users_share_a_bounded_buffer_root_does_not(
    stranger: pwd.struct_passwd,
    reachable: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_control_server, "SHARED_BUFFER_BUDGET", 256 * 1024)
    with serving(reachable / "root") as path:
        with running(python_as(stranger, HALF_A_LINE, str(path), str(300 * 1024))) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "closed\n"
        assert "buffer shared by other users is full" in caplog.text
        # Root's requests are not charged: a line longer than the whole budget is served.
        big = json.dumps({"id": 7, "verb": "status", "args": {"names": ["web"] * 60_000}})
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(big.encode() + b"\n")
            answer = json.loads(sock.makefile().readline())
        assert answer["id"] == 7 and len(answer["result"]) == 60_000


def test_refusals_past_the_burst_are_counted_in_one_line_when_the_window_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("ikos.test.ratelimit")

    async def flood() -> None:
        limited = _control_server._RateLimited(logger, burst=2, window=0.2)
        for n in range(7):
            limited.warning(1001, "refused %d", n)
        limited.warning(1002, "another user's line")
        while "5 more like the above" not in caplog.text:
            await asyncio.sleep(0.02)

    with caplog.at_level(logging.WARNING, logger="ikos.test.ratelimit"):
        asyncio.run(asyncio.wait_for(flood(), 30))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused 0",
        "refused 1",
        "another user's line",
        "uid 1001: 5 more like the above in 0.2s, not logged one by one",
    ]


def test_the_readers_of_the_configuration_read_the_logs_of_a_real_ikosd(
    ikosd_factory: Any, reachable: Path, stranger: pwd.struct_passwd
) -> None:
    """``[ikosd] readers = GROUP``: its members read logs and daemons' configurations."""
    root = reachable / "readers-root"
    config = CONFIG.replace("metrics = false", f"metrics = false\nreaders = {stranger.pw_gid}")
    started = ikosd_factory(config=config, name="readers", args=["--root", str(root)])
    inst = Instance(root, started.proc, started.mark, started.log)
    wait_for(lambda: "token=" in "".join(ikosd_logs(inst)))
    answer = request_as(stranger, inst, {"id": 1, "verb": "logs", "args": {"name": "leaky"}})
    assert answer["ok"] is True, answer
    assert SECRET in json.dumps(answer)  # a reader may read it: that is what the group is for
    answer = request_as(stranger, inst, {"id": 2, "verb": "stop", "args": {"name": "leaky"}})
    assert answer["error"]["code"] == "permission_denied"  # but not control
    mode = (root / "var" / "log" / "ikos").stat()
    assert (mode.st_mode & 0o777, mode.st_gid) == (0o750, stranger.pw_gid)


def ikosd_logs(inst: Instance) -> list[str]:
    with ControlClient(InstancePaths.for_root(inst.root)) as client:
        lines: list[str] = client.call("logs", {"name": "leaky", "lines": 5})["lines"]
    return lines
