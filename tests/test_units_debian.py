"""The systemd units Debian ships, run unchanged by the real ikosd (``unit = "..."``).

Each test declares ``[executables.NAME] unit = "/lib/systemd/system/X.service"``
in an ``ikos.toml`` and nothing else about how to run the daemon: the
unit says it (its ExecStart=, Type=, User=, ExecStartPre=, ExecReload=,
RuntimeDirectory=...). What the package configured in ``/etc`` is what runs,
as it would under systemd, so a test needs the daemon's usual port free and
is skipped otherwise. The only key added beside ``unit`` is, for units that
say no ``Restart=`` (nginx), ``restart_on = "always"``: systemd's default is
not to restart, and the test checks a restart after SIGKILL.

Every daemon is checked the same way: it answers on its own protocol (HTTP
GET, RESP PING, memcached ``version``, haproxy's CLI), reloads as its unit
says, is restarted after SIGKILL of its whole process tree, and stops with no
process left. A template (``redis-server@.service``) runs as an instance
whose configuration file the test writes, as a user of the template would.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Instance, wait_for
from test_exec_live import CAN_TRACK, alive, children_of, shutdown_clean, wait_dead
from test_real_daemons import http_get, kill_by_cmdline, redis_answers, resp

UNITS = Path("/lib/systemd/system")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not CAN_TRACK,
    reason="Debian's units run as root and need a writable cgroup v2 to track their daemons",
)


def needs(unit: str, *ports: int) -> Any:
    """Skip unless the unit is installed and the daemon's configured ports are free."""
    if not (UNITS / unit).exists():
        return pytest.mark.skip(
            reason=f"{unit} is not installed: run scripts/test-deps.sh as root (make test-deps)"
        )
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return pytest.mark.skip(reason=f"port {port}, which {unit} uses, is taken")
    return pytest.mark.skipif(False, reason="installed, ports free")


@pytest.fixture(autouse=True)
def reachable_root(tmp_path: Path) -> None:
    """Let the daemons' users reach the instance's notify socket, as they reach /run.

    pytest makes its temporary directories 0700; a daemon running as ``redis``
    could then not send ``READY=1`` (EACCES) and would never be ready.
    """
    for folder in (tmp_path, *tmp_path.parents):
        if folder == Path(tempfile.gettempdir()) or folder.stat().st_uid != os.geteuid():
            break
        folder.chmod(folder.stat().st_mode | 0o111)


def start(factory: Callable[..., Instance], tables: str) -> Instance:
    config = "[root]\nmax_restarts = 50\nwithin = 60\n\n" + tables
    return factory(config=config, args=["--metrics", "off"])  # type: ignore[no-any-return]


def tree_pids(inst: Instance, name: str) -> list[int]:
    """The daemon's main process and its descendants (nginx's and haproxy's workers)."""
    pids = [inst.status(name)["pid"]]
    for pid in pids:  # grows as it goes: breadth first
        pids += [child for child in children_of(pid) if child not in pids]
    return pids


def check_restart_and_stop(
    inst: Instance, name: str, answers: Callable[[], bool], *, stop_code: int | None = 0
) -> None:
    """SIGKILL of every process: restarted and answering; then stopped, nothing left."""
    pid = inst.status(name)["pid"]
    before = tree_pids(inst, name)
    inst.ctl("kill", "-s", "KILL", name, check=True)
    new = inst.wait_running_new_pid(name, pid, timeout=60)
    wait_dead(*before)
    assert inst.status(name)["restarts"] >= 1
    wait_for(answers, 60, message=f"{name} answering after its restart")
    pids = tree_pids(inst, name)
    inst.ctl("stop", name, check=True)
    st = inst.wait_state(name, "stopped", timeout=60)
    wait_dead(new, *pids)
    assert not answers()
    if stop_code is not None:
        assert st["last_exit"]["code"] == stop_code, st
    inst.ctl("start", name, check=True)
    pid = inst.wait_state(name, "running", timeout=60)["pid"]
    wait_for(answers, 60, message=f"{name} answering after a start")
    shutdown_clean(inst, pid, *tree_pids(inst, name))
    assert not answers()


def refuse_reload(inst: Instance, name: str) -> None:
    """A unit without ExecReload= cannot reload (systemd: "Job type reload is not applicable")."""
    res = inst.ctl("reload", name)
    assert res.returncode != 0 and "has no ExecReload=" in res.stderr, res


def no_unsupported_directive_is_silent(inst: Instance, unit: str, *directives: str) -> None:
    text = inst.log_text()
    for directive in directives:
        assert f"{UNITS / unit}:" in text and f" {directive}= is not supported by ikos" in text


# -- nginx: Type=forking, PIDFile=, ExecStartPre=, ExecReload=, ExecStop= ---------------------


def nginx_answers() -> bool:
    try:
        return bool(http_get(80, "/"))
    except OSError:
        return False


@needs("nginx.service", 80)
def test_nginx_unit(ikosd_factory: Any) -> None:
    try:
        inst = start(
            ikosd_factory,
            '[executables.nginx]\nunit = "/lib/systemd/system/nginx.service"\n'
            'restart_on = "always"\n',
        )
        st = inst.wait_state("nginx", "running", timeout=60)
        master = st["pid"]
        assert int(Path("/run/nginx.pid").read_text()) == master  # PIDFile= read
        wait_for(nginx_answers, 30, message="nginx to answer on port 80")
        # ExecReload= (nginx -s reload): same master, new workers
        wait_for(lambda: len(tree_pids(inst, "nginx")) > 1, 30, message="nginx's workers")
        workers = set(tree_pids(inst, "nginx")) - {master}  # a reload replaces them
        inst.ctl("reload", "nginx", check=True)
        wait_for(lambda: not any(alive(w) for w in workers), 30, message="old workers gone")
        assert inst.status("nginx")["pid"] == master and nginx_answers()
        # ExecStop= (start-stop-daemon --stop --retry QUIT/5) ends it: a clean exit
        check_restart_and_stop(inst, "nginx", nginx_answers, stop_code=0)
    finally:
        kill_by_cmdline("nginx: master process /usr/sbin/nginx -g daemon on;")


# -- redis-server: Type=notify, User=, RuntimeDirectory=, UMask=, LimitNOFILE= ----------------


def nofile_override() -> tuple[str, int]:
    """Redis's units say LimitNOFILE=65535. A container without CAP_SYS_RESOURCE cannot raise
    its hard limit that far, and ikos refuses to start the unit there as systemd would: the
    limit is then lowered in ikos.toml (the unit file stays as Debian ships it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 65535 or can_raise_rlimits():
        return "", 65535
    return f"limits = {{ nofile = {hard} }}\n", hard


def can_raise_rlimits() -> bool:
    caps = int(
        next(
            line.split()[1]
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("CapEff:")
        ),
        16,
    )
    return bool(caps & (1 << 24))  # CAP_SYS_RESOURCE


@needs("redis-server.service", 6379)
def test_redis_server_unit(ikosd_factory: Any) -> None:
    override, nofile = nofile_override()
    try:
        inst = start(
            ikosd_factory,
            '[executables.redis]\nunit = "/lib/systemd/system/redis-server.service"\n' + override,
        )
        pid = inst.wait_state("redis", "running", timeout=60)["pid"]
        assert resp(6379, ["PING"]) == [b"+PONG"]  # ready means READY=1: no polling
        status = Path(f"/proc/{pid}/status").read_text()
        redis_uid = Path("/var/lib/redis").stat().st_uid
        assert f"Uid:\t{redis_uid}\t" in status  # User=redis
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and str(nofile) in line
            for line in limits.splitlines()
        )
        run = inst.root / "run" / "redis"  # RuntimeDirectory=redis, RuntimeDirectoryMode=2755
        info = run.stat()
        assert stat.S_IMODE(info.st_mode) == 0o2755 and info.st_uid == redis_uid
        no_unsupported_directive_is_silent(
            inst, "redis-server.service", "PrivateTmp", "ProtectSystem"
        )
        # no ExecReload=: refused, as systemd refuses it, and redis serves on
        refuse_reload(inst, "redis")
        assert inst.status("redis")["pid"] == pid and redis_answers(6379)
        # TimeoutStopSec=0 (no SIGKILL after the stop signal): redis exits on SIGTERM, 0
        check_restart_and_stop(inst, "redis", lambda: redis_answers(6379))
    finally:
        kill_by_cmdline("/usr/bin/redis-server 127.0.0.1:6379")


# -- redis-server@.service: a template, %i in ExecStart=, PIDFile=, RuntimeDirectory= -----------


@pytest.fixture
def redis_instance_config() -> Iterator[tuple[str, int]]:
    """``/etc/redis/redis-ikostest.conf``: the configuration the template's instance reads."""
    instance = f"ikostest{os.getpid()}"
    conf = Path(f"/etc/redis/redis-{instance}.conf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\ndaemonize no\nsave ""\nappendonly no\n'
        f'dir /var/lib/redis\nlogfile ""\ndbfilename {instance}.rdb\n'
    )
    redis = Path("/etc/redis").stat()
    os.chown(conf, redis.st_uid, redis.st_gid)
    try:
        yield instance, port
    finally:
        conf.unlink()
        kill_by_cmdline(f"127.0.0.1:{port}")


@needs("redis-server@.service")
def test_redis_server_template_unit(ikosd_factory: Any, redis_instance_config: Any) -> None:
    instance, port = redis_instance_config
    inst = start(
        ikosd_factory,
        f'[executables.cache]\nunit = "/lib/systemd/system/redis-server@{instance}.service"\n'
        + nofile_override()[0],
    )
    pid = inst.wait_state("cache", "running", timeout=60)["pid"]
    assert resp(port, ["PING"]) == [b"+PONG"]
    assert inst.status("cache")["description"] == f"Advanced key-value store ({instance})"  # %I
    assert (inst.root / "run" / f"redis-{instance}").is_dir()  # RuntimeDirectory=redis-%i
    assert resp(port, ["SET", "k", "v"], ["GET", "k"]) == [b"+OK", b"v"]
    refuse_reload(inst, "cache")
    assert inst.status("cache")["pid"] == pid
    check_restart_and_stop(inst, "cache", lambda: redis_answers(port))


# -- memcached: Type=simple (the default), a wrapper script, Restart=always ---------------------


def memcached_answers(port: int = 11211) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"version\r\n")
            return s.makefile("rb").readline().startswith(b"VERSION ")
    except OSError:
        return False


@needs("memcached.service", 11211)
def test_memcached_unit(ikosd_factory: Any) -> None:
    try:
        inst = start(
            ikosd_factory,
            '[executables.memcached]\nunit = "/lib/systemd/system/memcached.service"\n',
        )
        pid = inst.wait_state("memcached", "running", timeout=60)["pid"]
        wait_for(memcached_answers, 30, message="memcached to answer 'version'")
        refuse_reload(inst, "memcached")  # no ExecReload= either
        assert inst.status("memcached")["pid"] == pid and memcached_answers()
        # memcached answers SIGTERM with exit 0
        check_restart_and_stop(inst, "memcached", memcached_answers)
    finally:
        kill_by_cmdline("/usr/bin/memcached")


# -- haproxy: Type=notify, $VAR in Exec lines, EnvironmentFile=-, two ExecReload= commands -------


def haproxy_cli(command: str, path: str = "/run/haproxy/admin.sock") -> str:
    """One command on haproxy's CLI; its answer ends with an empty line (or the connection)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n\n") and (chunk := s.recv(65536)):
            data += chunk
    return data.decode(errors="replace")


def haproxy_pid() -> int | None:
    try:
        for line in haproxy_cli("show info").splitlines():
            if line.startswith("Pid: "):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.fixture
def haproxy_runtime_dir() -> Iterator[None]:
    """/run/haproxy, which Debian's tmpfiles.d/haproxy.conf creates at boot, not the unit."""
    path = Path("/run/haproxy")
    made = not path.exists()
    if made:
        path.mkdir(mode=0o2775)
        shutil.chown(path, "haproxy", "haproxy")
    try:
        yield
    finally:
        kill_by_cmdline("/usr/sbin/haproxy -Ws -f /etc/haproxy/haproxy.cfg")
        if made:
            shutil.rmtree(path, ignore_errors=True)


@needs("haproxy.service")
def test_haproxy_unit(ikosd_factory: Any, haproxy_runtime_dir: None) -> None:
    inst = start(
        ikosd_factory, '[executables.haproxy]\nunit = "/lib/systemd/system/haproxy.service"\n'
    )
    master = inst.wait_state("haproxy", "running", timeout=60)["pid"]
    wait_for(lambda: haproxy_pid() is not None, 30, message="haproxy's stats socket")
    worker = haproxy_pid()
    # $EXTRAOPTS was split into two words: the master CLI exists
    assert "master" in haproxy_cli("show proc", "/run/haproxy-master.sock")
    # ExecReload=: haproxy -c (the check) then kill -USR2 $MAINPID: a new worker, same master
    inst.ctl("reload", "haproxy", check=True)
    wait_for(lambda: haproxy_pid() not in (None, worker), 30, message="a new haproxy worker")
    assert inst.status("haproxy")["pid"] == master
    # SuccessExitStatus=143: haproxy's master exits 143 on SIGTERM, which is a clean stop
    check_restart_and_stop(inst, "haproxy", lambda: haproxy_pid() is not None, stop_code=None)
