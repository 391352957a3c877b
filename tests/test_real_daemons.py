"""Real daemons from Debian's packages under the real ikosd: nginx and redis-server.

``scripts/test-deps.sh`` (run by ``make test``) installs them; without them
(a user who is not root, say) these tests are skipped and say how to get
them. Each daemon runs on a free port of 127.0.0.1 with every file in
``tmp_path``, and is checked by talking to it: HTTP GET for nginx, raw RESP
for redis (no client library: the protocol is three lines).

- nginx as ``type="forking"`` with ``pid_file`` (its classic start: the
  launcher exits, the master writes the PID file after detaching with
  ``setsid``) and as ``type="simple"`` with ``-g 'daemon off;'``; reloaded
  with SIGHUP after its configuration changed; stopped; SIGKILLed and
  restarted by ikos.
- redis-server as ``type="notify"`` (``--supervised systemd``: it says
  ``READY=1`` and ``STATUS=`` itself), restarted after SIGKILL, stopped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, wait_for
from test_exec_live import (
    CAN_TRACK,
    alive,
    children_of,
    shutdown_clean,
    start_ikosd,
    wait_dead,
)

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NGINX = shutil.which("nginx", path=SBIN_PATH)
REDIS = shutil.which("redis-server", path=SBIN_PATH)

needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed: run scripts/test-deps.sh as root (make test-deps)",
)
needs_redis = pytest.mark.skipif(
    REDIS is None,
    reason="redis-server is not installed: run scripts/test-deps.sh as root (make test-deps)",
)


def kill_by_cmdline(needle: str) -> None:
    """SIGKILL what is left of a daemon that ikos lost track of (a failing test's leftovers).

    The fixture finds leftovers by their environment, but nginx and redis write
    their process titles over it: they are found by their command line instead.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- nginx ------------------------------------------------------------------------------------


def nginx_config(base: Path, port: int, body: str, *, pid_file: Path | None) -> str:
    """A self-contained nginx.conf: every path in ``base``, one server answering ``body``."""
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (base / "temp" / d).mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name  # as root, workers would run as nobody otherwise
    return f"""
        user {user};
        worker_processes 2;
        pid {pid_file or base / "unused.pid"};
        error_log {base / "error.log"} info;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {base}/temp/body;
            proxy_temp_path {base}/temp/proxy;
            fastcgi_temp_path {base}/temp/fastcgi;
            uwsgi_temp_path {base}/temp/uwsgi;
            scgi_temp_path {base}/temp/scgi;
            server {{
                listen 127.0.0.1:{port};
                root {base / "www"};
                location = /config {{ return 200 "{body}\\n"; }}
            }}
        }}
    """


def http_get(port: int, path: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return str(resp.read().decode())


def serves(port: int, path: str, expected: str) -> bool:
    try:
        return http_get(port, path) == expected
    except (OSError, urllib.error.URLError):
        return False


def nginx_pids(master: int) -> list[int]:
    return [master, *children_of(master)]


def _nginx_site(tmp_path: Path, name: str, forking: bool) -> tuple[dict[str, Any], Path, int]:
    base = tmp_path / name
    (base / "www").mkdir(parents=True)
    (base / "www" / "index.html").write_text("first page\n")
    port = free_port()
    pid_file = base / "nginx.pid" if forking else None
    conf = base / "nginx.conf"
    conf.write_text(nginx_config(base, port, "config one", pid_file=pid_file))
    args = ["-p", str(base), "-c", str(conf), "-e", str(base / "error.log")]
    fields: dict[str, Any] = {"executable": NGINX, "shutdown": 10.0}
    if forking:
        fields.update(type="forking", pid_file=str(pid_file), args=args)
    else:
        fields.update(type="simple", args=[*args, "-g", "daemon off;"])
    return fields, base, port


def _check_nginx(inst: Instance, name: str, base: Path, port: int, forking: bool) -> None:
    st = inst.wait_state(name, "running", timeout=30)
    master = st["pid"]
    if forking:
        assert int((base / "nginx.pid").read_text()) == master
    assert Path(f"/proc/{master}/cmdline").read_bytes().startswith(b"nginx: master process")
    wait_for(lambda: serves(port, "/", "first page\n"), 30, message="nginx to serve /")
    assert http_get(port, "/config") == "config one\n"
    wait_for(lambda: len(children_of(master)) == 2, message="two nginx workers")
    workers = children_of(master)

    # reload: a new configuration and new files, same master, new workers
    (base / "www" / "index.html").write_text("second page\n")
    conf = base / "nginx.conf"
    conf.write_text(conf.read_text().replace('"config one', '"config two'))
    inst.ctl("reload", name, check=True)
    wait_for(lambda: serves(port, "/config", "config two\n"), 30, message="the new config")
    assert http_get(port, "/") == "second page\n"
    wait_for(lambda: not any(alive(w) for w in workers), 30, message="old workers to leave")
    st = inst.status(name)
    assert st["pid"] == master and st["state"] == "running" and st["restarts"] == 0

    # SIGKILL of the whole daemon: ikos restarts it, and it serves again
    before = nginx_pids(master)
    inst.ctl("kill", "-s", "KILL", name, check=True)
    new_master = inst.wait_running_new_pid(name, master, timeout=30)
    wait_dead(*before)
    assert inst.status(name)["restarts"] == 1
    wait_for(lambda: serves(port, "/config", "config two\n"), 30, message="nginx serving again")
    if forking:
        assert int((base / "nginx.pid").read_text()) == new_master

    # stop: every process gone, port closed
    pids = nginx_pids(new_master)
    inst.ctl("stop", name, check=True)
    st = inst.wait_state(name, "stopped")
    wait_dead(*pids)
    assert not serves(port, "/", "second page\n")


FORKING_NEEDS_TRACKING = pytest.mark.skipif(
    not CAN_TRACK,
    reason="nginx's master leaves ikos's session (setsid); without a writable cgroup v2 to "
    "track it, ikos cannot tell that the PID in the PID file is the daemon's",
)


@needs_nginx
@pytest.mark.parametrize(
    "forking",
    [pytest.param(True, marks=FORKING_NEEDS_TRACKING), False],
    ids=["forking-pid-file", "simple-daemon-off"],
)
def test_nginx(ikosd_factory: Any, tmp_path: Path, forking: bool) -> None:
    fields, base, port = _nginx_site(tmp_path, "web", forking)
    try:
        inst = start_ikosd(ikosd_factory, {"web": fields})
        _check_nginx(inst, "web", base, port, forking)
        inst.ctl("start", "web", check=True)
        wait_for(lambda: serves(port, "/", "second page\n"), 30, message="nginx started again")
        master = inst.status("web")["pid"]
        shutdown_clean(inst, *nginx_pids(master))
        assert not serves(port, "/", "second page\n")
    finally:
        kill_by_cmdline(str(base))


# -- redis ------------------------------------------------------------------------------------


def resp(port: int, *commands: list[str], timeout: float = 5.0) -> list[bytes]:
    """Send commands in RESP, return one raw reply line (or bulk string) per command."""
    payload = b""
    for cmd in commands:
        payload += f"*{len(cmd)}\r\n".encode()
        for arg in cmd:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        f = s.makefile("rb")
        replies = []
        for _ in commands:
            line = f.readline().rstrip(b"\r\n")
            if line.startswith(b"$") and line != b"$-1":
                line = f.read(int(line[1:]) + 2)[:-2]
            replies.append(line)
        return replies


def redis_answers(port: int) -> bool:
    try:
        return resp(port, ["PING"]) == [b"+PONG"]
    except OSError:
        return False


@needs_redis
def test_redis_speaks_sd_notify(ikosd_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--supervised", "systemd"]
    args += ["--daemonize", "no", "--save", "", "--appendonly", "no", "--dir", str(data)]
    try:
        _check_redis(ikosd_factory, port, args)
    finally:
        kill_by_cmdline(f"127.0.0.1:{port}")  # redis-server's process title


def _check_redis(ikosd_factory: Any, port: int, args: list[str]) -> None:
    inst = start_ikosd(
        ikosd_factory,
        {"redis": {"executable": REDIS, "type": "notify", "args": args, "shutdown": 10.0}},
    )
    st = inst.wait_state("redis", "running", timeout=30)
    pid = st["pid"]
    # ready means ready: no polling needed before the first command
    assert resp(port, ["PING"]) == [b"+PONG"]
    assert "ready" in st["status_text"].lower(), st  # redis's own STATUS=
    assert resp(port, ["SET", "greeting", "hello ikos"], ["GET", "greeting"]) == [
        b"+OK",
        b"hello ikos",
    ]

    inst.ctl("kill", "-s", "KILL", "redis", check=True)
    new = inst.wait_running_new_pid("redis", pid, timeout=30)
    wait_dead(pid)
    st = inst.status("redis")
    assert st["restarts"] == 1 and st["last_exit"]["signal"] == signal.SIGKILL
    assert resp(port, ["PING"]) == [b"+PONG"]  # running again means READY=1 again
    assert resp(port, ["GET", "greeting"]) == [b"$-1"]  # --save '': a fresh, empty store

    inst.ctl("stop", "redis", check=True)
    st = inst.wait_state("redis", "stopped")
    assert st["last_exit"]["code"] == 0  # SIGTERM: redis shuts down cleanly
    wait_dead(new)
    assert not redis_answers(port)
    inst.ctl("start", "redis", check=True)
    pid = inst.wait_state("redis", "running")["pid"]
    assert resp(port, ["PING"]) == [b"+PONG"]
    shutdown_clean(inst, pid)
    assert not redis_answers(port)
