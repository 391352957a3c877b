"""ikos.daemon from a plain process, against a real ikosd, checked on the real processes.

A *driver* (a plain Python subprocess, not an actor, finding ikosd through
``$IKOS_ROOT``) runs each API call the test sends it and answers with the
result or the exception. The test then looks at what a user would: the
daemon's process in ``/proc/PID/*`` (directory, credentials, umask,
environment, limits), ``ikosctl status``, and what survives a restart of
ikosd. Every wait is a condition polled with ``wait_for``. The pure parts
(configurations, changes, tree edits, the error mapping) have unit tests at
the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pickle
import pwd
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Instance, wait_for

import ikos
from ikos import ConfigError, Exec, SpawnError, Supervisor
from ikos._errors import error_for_code
from ikos.daemon import (
    DaemonConfig,
    DaemonExists,
    DaemonStatus,
    ResourceLimits,
    RestartPolicy,
    _daemon_error,
)
from ikos.manager._daemon_service import (
    FIELD_KEYS,
    LIVE_FIELDS,
    SPEC_KEYS,
    _refusal,
    apply_changes,
    config_of,
    exec_from_config,
    needs_restart,
)
from ikos.supervision._edit import find_spec, insert_spec, remove_spec, replace_spec
from ikos.supervision._spec import EXEC_FIELDS, EXEC_SPEC_KEYS

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sets users and limits: needs root")

TREE = """
import ikos

tree = ikos.Supervisor("root", max_restarts=100, within=10, children=[
    ikos.Supervisor("apps", max_restarts=100, within=10),
    ikos.Exec("configured", "/bin/sleep", args=["1000"]),
])
"""

NOBODY = pwd.getpwnam("nobody")

DRIVER = r"""
import dataclasses, json, sys
import ikos.daemon as d

def plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value

for line in sys.stdin:
    space = {"d": d}
    try:
        exec(json.loads(line), space)
        answer = {"ok": True, "result": plain(space.get("result"))}
    except Exception as exc:
        attrs = {k: getattr(exc, k) for k in ("daemon", "field", "table", "key", "code", "name")
                 if isinstance(getattr(exc, k, None), (str, int))}
        answer = {"ok": False, "type": type(exc).__name__, "message": str(exc), "attrs": attrs,
                  "mro": [c.__name__ for c in type(exc).__mro__]}
    print(json.dumps(answer), flush=True)
"""


class Driver:
    """A plain Python process that runs ikos.daemon calls sent to it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONPATH": str(REPO)},
        )

    def _send(self, code: str, timeout: float = 90) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the driver did not answer within {timeout}s: {code}"
        line = self.proc.stdout.readline()
        assert line, f"the driver died (status {self.proc.poll()}) on: {code}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, code: str) -> Any:
        """Run ``code`` (which may set ``result``) and return ``result``; fail on an exception."""
        answer = self._send(code)
        assert answer["ok"], f"{code}\nraised {answer['type']}: {answer['message']}"
        return answer["result"]

    def error(self, code: str) -> dict[str, Any]:
        """Run ``code``, which must raise; return the exception's type, message and fields."""
        answer = self._send(code)
        assert not answer["ok"], f"{code}\ndid not raise; result {answer['result']!r}"
        return answer

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def inst(ikosd_factory: Any) -> Instance:
    instance: Instance = ikosd_factory(tree=TREE, args=["--metrics", "off"])
    return instance


@contextlib.contextmanager
def driver(env: dict[str, str]) -> Iterator[Driver]:
    drv = Driver(env)
    try:
        yield drv
    finally:
        drv.close()


@pytest.fixture
def api(inst: Instance) -> Iterator[Driver]:
    with driver(inst.env) as drv:
        yield drv


# --- reading the real process ------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def uid_gid(pid: int) -> tuple[int, int]:
    st = proc_status(pid)
    return int(st["Uid"].split()[0]), int(st["Gid"].split()[0])


def cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def sleeper(name: str, **fields: Any) -> str:
    """Source of a DaemonConfig running /bin/sleep 1000 with ``fields``."""
    extra = "".join(f", {key}={value!r}" for key, value in fields.items())
    return f"d.DaemonConfig(name={name!r}, executable='/bin/sleep', args=['1000']{extra})"


# --- creating ----------------------------------------------------------------------------


@needs_root
def test_create_applies_every_field_to_the_real_process(
    inst: Instance, api: Driver, tmp_path: Path
) -> None:
    wd = tmp_path / "workdir"
    wd.mkdir()
    config = sleeper(
        "sleeper",
        supervisor="apps",
        working_directory=str(wd),
        user="nobody",
        umask="027",
        environment={"IKOS_API": "from a plain process"},
        description="sleeps",
    )
    st = api.run(f"result = d.create({config[:-1]}, limits=d.ResourceLimits(nofile=(256, 512))))")

    assert st["state"] == "running"
    assert st["kind"] == "exec"
    assert st["supervisor"] == "apps"
    assert st["created"] is True
    assert st["restarts"] == 0
    assert st["target"] == "/bin/sleep"
    assert st["description"] == "sleeps"
    assert isinstance(st["started_at"], float) and st["started_at"] <= time.time()
    assert st["last_exit"] is None and st["exit_code"] is None
    pid = st["pid"]
    assert Path(f"/proc/{pid}/exe").resolve() == Path("/bin/sleep").resolve()
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"1000"
    assert cwd(pid) == str(wd)
    assert uid_gid(pid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert proc_status(pid)["Umask"] == "0027"
    env = environ(pid)
    assert env["IKOS_API"] == "from a plain process"
    assert env["USER"] == "nobody"
    assert open_files_limit(pid) == (256, 512)

    # A child of the tree like any other: ikosctl sees it where it joined.
    assert inst.status("sleeper")["pid"] == pid
    assert "sleeper" in inst.status("apps")["children"]
    # status() reads the same, and the configuration reads back.
    again = api.run("result = d.status('sleeper')")
    assert (again["pid"], again["state"], again["supervisor"]) == (pid, "running", "apps")
    cfg = api.run("result = d.get_config('sleeper')")
    assert cfg["user"] == "nobody" and cfg["umask"] == "027"
    assert cfg["working_directory"] == str(wd) and cfg["supervisor"] == "apps"
    assert cfg["limits"]["nofile"] == [256, 512]


@needs_root
def test_start_stop_restart_reload(inst: Instance, api: Driver, tmp_path: Path) -> None:
    ready, mark = tmp_path / "ready", tmp_path / "reloads"
    script = tmp_path / "hup.sh"
    script.write_text(
        textwrap.dedent("""\
        #!/bin/sh
        trap 'echo reloaded >> "$MARK"' HUP
        echo $$ > "$READY"
        while :; do sleep 1 & wait $!; done
        """)
    )
    script.chmod(0o755)
    env = {"READY": str(ready), "MARK": str(mark)}
    st = api.run(
        f"result = d.create(d.DaemonConfig(name='hup', executable={str(script)!r}, "
        f"environment={env!r}, auto_start=False))"
    )
    assert (st["state"], st["pid"]) == ("stopped", None)
    assert not ready.exists()

    st = api.run("result = d.start('hup')")
    assert st["state"] == "running"
    pid = st["pid"]
    wait_for(lambda: ready.read_text().strip() == str(pid), message="the script's trap")

    st = api.run("result = d.reload('hup')")
    assert (st["state"], st["pid"]) == ("running", pid)
    wait_for(lambda: mark.read_text().count("reloaded") == 1, message="the HUP handler")

    st = api.run("result = d.restart('hup')")
    assert st["state"] == "running" and st["pid"] != pid
    assert st["restarts"] == 0  # an operator's restart is not counted
    assert st["last_exit"]["signal"] == signal.SIGTERM
    wait_for(lambda: not alive(pid), message="the old process to be gone")
    new = st["pid"]
    wait_for(lambda: ready.read_text().strip() == str(new), message="the new run's trap")

    st = api.run("result = d.stop('hup')")
    assert (st["state"], st["pid"]) == ("stopped", None)
    wait_for(lambda: not alive(new), message="the stopped process to be gone")
    assert inst.status("hup")["state"] == "stopped"
    # reloading a stopped daemon is refused, and it stays stopped
    err = api.error("d.reload('hup')")
    assert err["type"] == "ManagerError" and "not running" in err["message"]
    assert api.run("result = d.status('hup')")["state"] == "stopped"


@needs_root
def test_setters_change_the_process(inst: Instance, api: Driver, tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    pid = api.run(f"result = d.create({sleeper('s', working_directory=str(first))})")["pid"]
    assert cwd(pid) == str(first)

    st = api.run(f"result = d.set_working_directory('s', {str(second)!r})")
    assert st["state"] == "running" and st["pid"] != pid
    wait_for(lambda: not alive(pid), message="the old run to end")
    pid = st["pid"]
    assert cwd(pid) == str(second)

    st = api.run("result = d.set_user('s', 'nobody', 'nogroup')")
    assert st["pid"] != pid
    pid = st["pid"]
    assert uid_gid(pid) == (NOBODY.pw_uid, grp.getgrnam("nogroup").gr_gid)

    st = api.run("result = d.set_resource_limits('s', d.ResourceLimits(nofile=100))")
    assert st["pid"] != pid
    pid = st["pid"]
    assert open_files_limit(pid) == (100, 100)
    assert uid_gid(pid)[0] == NOBODY.pw_uid  # the earlier change is kept

    st = api.run("result = d.update('s', umask='077', environment={'STAGE': 'two'})")
    pid = st["pid"]
    assert proc_status(pid)["Umask"] == "0077"
    assert environ(pid)["STAGE"] == "two"

    # A restart policy is read at the next exit: no restart now.
    st = api.run("result = d.set_restart_policy('s', d.RestartPolicy(max_restarts=5))")
    assert st["pid"] == pid and st["state"] == "running"

    # A stopped daemon keeps the change for its next start.
    api.run("d.stop('s')")
    st = api.run(f"result = d.set_working_directory('s', {str(first)!r})")
    assert (st["state"], st["pid"]) == ("stopped", None)
    pid = api.run("result = d.start('s')")["pid"]
    assert cwd(pid) == str(first)

    # A configured daemon can be changed too, and reverted to its configuration.
    old = inst.pid_of("configured")
    assert old is not None and uid_gid(old)[0] == 0
    st = api.run("result = d.set_user('configured', 'nobody')")
    assert st["pid"] != old and st["extra"]["changed"] == ["group", "user"]
    assert uid_gid(st["pid"])[0] == NOBODY.pw_uid
    st = api.run("result = d.revert('configured')")
    assert uid_gid(st["pid"])[0] == 0 and "changed" not in st["extra"]


@needs_root
def test_no_auto_restart_leaves_a_killed_daemon_down(api: Driver) -> None:
    pid = api.run(f"result = d.create({sleeper('once')})")["pid"]
    st = api.run("result = d.set_restart_policy('once', d.RestartPolicy(auto_restart=False))")
    assert st["pid"] == pid  # a policy change does not restart the daemon

    os.kill(pid, signal.SIGKILL)
    st = wait_for(
        lambda: (s := api.run("result = d.status('once')"))["state"] == "failed" and s,
        message="the killed daemon to be failed",
    )
    assert st["pid"] is None
    assert st["last_exit"]["signal"] == signal.SIGKILL
    assert st["restarts"] == 0
    assert not alive(pid)


@needs_root
def test_max_restarts_exhausted_is_failed_with_its_reason(api: Driver, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = tmp_path / "crash.sh"
    script.write_text('#!/bin/sh\nwhile [ ! -e "$GO" ]; do sleep 0.05; done\nexit 3\n')
    script.chmod(0o755)
    st = api.run(
        f"result = d.create(d.DaemonConfig(name='crashy', executable={str(script)!r}, "
        f"environment={{'GO': {str(go)!r}}}, max_restarts=2))"
    )
    assert st["state"] == "running"
    go.touch()  # from now on every run exits with status 3 at once

    # Every crash passes through `failed` on its way to a restart (CI once read that
    # state with restarts 0): wait for the one that says the supervisor gave up.
    def gave_up() -> dict[str, Any] | None:
        s: dict[str, Any] = api.run("result = d.status('crashy')")
        reason = (s.get("last_exit") or {}).get("reason", "")
        return s if s["state"] == "failed" and "restart limit reached" in reason else None

    st = wait_for(gave_up, message="crashy to give up")
    assert st["restarts"] == 2
    assert st["exit_code"] == 3
    assert "restart limit reached (2 restarts)" in st["last_exit"]["reason"]
    assert "exited with status 3" in st["last_exit"]["reason"]


@needs_root
def test_errors_are_exceptions_that_name_the_daemon_and_field(inst: Instance, api: Driver) -> None:
    for call in (
        "d.status('ghost')",
        "d.start('ghost')",
        "d.stop('ghost')",
        "d.restart('ghost')",
        "d.reload('ghost')",
        "d.set_user('ghost', 'nobody')",
        "d.set_restart_policy('ghost', d.RestartPolicy())",
        "d.delete('ghost')",
    ):
        err = api.error(call)
        assert err["type"] == "NoSuchDaemon", (call, err)
        assert "ghost" in err["message"]

    err = api.error("d.create(d.DaemonConfig(name='nofile', executable='/no/such/program'))")
    assert err["type"] == "SpawnError"
    assert err["attrs"] == {"daemon": "nofile", "field": "executable"}
    assert "/no/such/program" in err["message"]

    err = api.error(f"d.create({sleeper('nouser', user='no-such-user-here')})")
    assert err["type"] == "SpawnError"
    assert err["attrs"] == {"daemon": "nouser", "field": "user"}

    # A value of the wrong form is refused by the client, with ikosd's own checks.
    err = api.error(f"d.create({sleeper('badlimit')[:-1]}, limits={{'nofile': [10, 5]}}))")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "limits.nofile"
    assert err["attrs"]["table"] == "daemon badlimit"
    err = api.error(f"d.create({sleeper('badmask', umask='999')})")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "umask"
    err = api.error("d.update('configured', restart_dealy=3)")
    assert err["type"] == "ConfigError" and "did you mean 'restart_delay'?" in err["message"]

    err = api.error(f"d.create({sleeper('badtype', restart='sometimes')})")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "restart"
    assert "IkosError" in err["mro"] and "badtype" in err["message"]

    err = api.error(f"d.create({sleeper('nosup', supervisor='no-such-supervisor')})")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "supervisor"

    err = api.error(f"d.create({sleeper('cyclic', requires=['cyclic'])})")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "requires"

    # A refused create leaves nothing behind.
    for name in ("nofile", "nouser", "badlimit", "badmask", "badtype", "nosup", "cyclic"):
        assert api.error(f"d.status({name!r})")["type"] == "NoSuchDaemon"

    # Names are unique in the whole tree: created daemons, configured ones, supervisors.
    api.run(f"d.create({sleeper('dup')})")
    for name in ("dup", "configured", "apps"):
        err = api.error(f"d.create({sleeper(name)})")
        assert err["type"] == "DaemonExists" and err["attrs"]["name"] == name
        assert "ManagerError" in err["mro"]

    # Changes are checked like a creation, and a refused one changes nothing.
    pid = inst.pid_of("dup")
    err = api.error("d.set_user('dup', 'no-such-user-here')")
    assert err["type"] == "SpawnError" and err["attrs"]["field"] == "user"
    err = api.error("d.set_restart_policy('dup', d.RestartPolicy(restart_on='sometimes'))")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "restart_on"
    err = api.error("d.update('dup', colour='blue')")
    assert err["type"] == "ConfigError" and err["attrs"]["key"] == "colour"
    assert inst.pid_of("dup") == pid
    assert api.run("result = d.get_config('dup')")["user"] is None

    # Supervisors have no daemon fields; configured daemons are not deleted by the API.
    err = api.error("d.set_working_directory('apps', '/')")
    assert err["type"] == "ManagerError" and "supervisor" in err["message"]
    err = api.error("d.delete('configured')")
    assert err["type"] == "ManagerError" and "configuration" in err["message"]

    # ikosctl shows the codes the API raises from.
    res = inst.ctl("status", "ghost")
    assert res.returncode == 4


def test_unavailable_manager_is_reported(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IKOS_ROOT"}
    with driver(env) as drv:
        err = drv.error(f"d.status('x', root={str(tmp_path / 'nothing')!r})")
    assert err["type"] == "ManagerUnavailable"


@needs_root
def test_created_daemons_and_changes_survive_a_restart_of_ikosd(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    first = ikosd_factory(tree=TREE, args=["--metrics", "off"], name="persist")
    with driver(first.env) as api:
        kept = api.run(f"result = d.create({sleeper('kept', supervisor='apps')})")
        api.run(f"d.create({sleeper('held', auto_start=False)})")
        api.run(f"d.create({sleeper('gone')})")
        api.run("d.delete('gone')")
        api.run("d.set_user('configured', 'nobody')")
        api.run("d.set_restart_policy('kept', d.RestartPolicy(max_restarts=7))")
    assert first.terminate() == 0
    assert first.leftovers() == []
    assert not alive(kept["pid"])

    second = ikosd_factory(tree=TREE, args=["--metrics", "off"], name="persist")
    assert second.root == first.root
    st = second.wait_state("kept", "running")
    assert st["supervisor"] == "apps" and st["created"] is True
    assert st["pid"] != kept["pid"]
    assert second.state("held") == "stopped"
    configured = second.wait_state("configured", "running")
    assert uid_gid(configured["pid"])[0] == NOBODY.pw_uid
    assert second.ctl("status", "gone").returncode == 4

    # The API by explicit root, from a process that has no $IKOS_ROOT.
    env = {k: v for k, v in os.environ.items() if k != "IKOS_ROOT"}
    root = str(second.root)
    with driver(env) as api:
        assert api.run(f"result = d.get_config('kept', root={root!r})")["max_restarts"] == 7
        assert api.run(f"result = d.start('held', root={root!r})")["state"] == "running"
        api.run(f"d.delete('kept', root={root!r})")
        api.run(f"d.revert('configured', root={root!r})")
        assert api.error(f"d.status('kept', root={root!r})")["type"] == "NoSuchDaemon"
    assert second.terminate() == 0

    third = ikosd_factory(tree=TREE, args=["--metrics", "off"], name="persist")
    assert third.ctl("status", "kept").returncode == 4
    assert third.state("held") == "stopped"  # auto_start = false, whatever ran before
    configured = third.wait_state("configured", "running")
    assert uid_gid(configured["pid"])[0] == 0


CONFIG = """
[ikosd]
metrics = false

[root]
max_restarts = 10
within = 5

[executables.configured]
executable = "/bin/sleep"
args = ["1000"]
"""


@needs_root
def test_reload_config_keeps_created_daemons_and_changes(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=CONFIG)
    with driver(inst.env) as api:
        extra = api.run(f"result = d.create({sleeper('extra')})")["pid"]
        changed = api.run("result = d.set_user('configured', 'nobody')")["pid"]

    res = inst.ctl("--json", "reload-config")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"added": [], "removed": [], "changed": [], "warnings": []}
    assert inst.pid_of("extra") == extra
    assert inst.pid_of("configured") == changed

    # The configuration now wants the created daemon's name: refused, nothing changes.
    path = inst.root.parent / "ikos.toml"
    path.write_text(textwrap.dedent(CONFIG) + '\n[executables.extra]\nexecutable = "/bin/true"\n')
    res = inst.ctl("reload-config")
    assert res.returncode == 1
    assert "extra" in res.stderr
    assert inst.pid_of("extra") == extra


# --- the pure parts ----------------------------------------------------------------------


def test_a_configuration_round_trips_through_its_json() -> None:
    config = DaemonConfig(
        name="web",
        executable="/usr/sbin/nginx",
        args=["-g", "daemon off;"],
        user="www-data",
        limits=ResourceLimits(nofile=(1024, 4096), memory_max=1 << 20),
        supervisor="apps",
        max_restarts=3,
        restart_on="on-failure",
    )
    spec, supervisor = exec_from_config(config.to_json())
    assert supervisor == "apps"
    assert spec.fields["limits"] == ResourceLimits(nofile=(1024, 4096), memory_max=1 << 20)
    assert "working_directory" not in spec.fields  # None leaves a field unset
    stored = json.loads(json.dumps(config_of(spec, supervisor)))
    assert exec_from_config(stored) == (spec, "apps")
    back = DaemonConfig.from_json(stored)
    assert back.limits == config.limits and back.args == ("-g", "daemon off;")
    assert back.max_restarts == 3 and back.supervisor == "apps"


def test_changes_reset_with_none_and_keep_the_rest() -> None:
    spec = Exec("web", "/bin/sleep", restart="transient", user="nobody", umask="027")
    changed = apply_changes(spec, {"user": None, "working_directory": "/srv", "restart": None})
    assert changed.fields == {"umask": 0o027, "working_directory": "/srv"}
    assert changed.restart == "permanent"
    assert spec.fields["user"] == "nobody"  # specs are values: the old one is untouched


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"name": "other"}, "name"),
        ({"colour": "blue"}, "colour"),
        ({"options": {}}, "options"),
        ({"umask": "999"}, "umask"),
        ({"limits": {"nofile": [10, 5]}}, "limits.nofile"),
        ({"start_timeout": 0}, "start_timeout"),
        ({"description": 3}, "description"),
        ({"auto_restart": "yes"}, "auto_restart"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"restart_delay": float("nan")}, "restart_delay"),
        ({"restart_on": "sometimes"}, "restart_on"),
        ({"shutdown": -2}, "shutdown"),
        ({"requires": "db"}, "requires"),
        ({"backoff": {"min": 1, "speed": 2}}, "backoff.speed"),
    ],
)
def test_a_bad_change_is_a_config_error_naming_daemon_and_field(
    changes: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        apply_changes(Exec("web", "/bin/sleep"), changes)
    assert info.value.key == key
    assert info.value.table == "daemon web"


def test_a_misspelt_field_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        apply_changes(Exec("web", "/bin/sleep"), {"restart_dealy": 3})
    assert info.value.key == "restart_dealy"
    assert "did you mean 'restart_delay'?" in str(info.value)


def test_a_missing_executable_is_a_spawn_error() -> None:
    with pytest.raises(SpawnError) as info:
        exec_from_config({"name": "web"})
    assert info.value.field == "executable"


def test_the_api_speaks_the_fields_of_the_one_table() -> None:
    config_fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}
    assert set(config_fields) == {"name", "executable", "supervisor", *EXEC_SPEC_KEYS, *EXEC_FIELDS}
    assert set(FIELD_KEYS) == set(EXEC_FIELDS) and set(SPEC_KEYS) == set(config_fields) - set(
        EXEC_FIELDS
    )
    for key, spec in EXEC_FIELDS.items():  # unset (None), or the table's own default
        default = config_fields[key].default
        if default is dataclasses.MISSING:
            default = config_fields[key].default_factory()
        assert default is None or default == spec.default, key
    policy = {f.name for f in dataclasses.fields(RestartPolicy)}
    assert policy - {"backoff"} <= LIVE_FIELDS
    assert "stop_signal" in LIVE_FIELDS and "user" not in LIVE_FIELDS


def test_only_fields_that_shape_the_process_need_a_restart() -> None:
    spec = Exec("web", "/bin/sleep", args=["1"])
    for change in (
        {"max_restarts": 3},
        {"auto_restart": False},
        {"restart_delay": 2},
        {"restart_on": "always"},
        {"backoff": {"min": 1, "max": 2}},
        {"description": "x"},
        {"shutdown": 1},
        {"stop_signal": "SIGINT"},
    ):
        assert not needs_restart(spec, apply_changes(spec, change)), change
    for change in (
        {"args": ["2"]},
        {"executable": "/bin/cat"},
        {"user": "nobody"},
        {"limits": {"nofile": 10}},
        {"environment": {"A": "1"}},
        {"umask": "077"},
    ):
        assert needs_restart(spec, apply_changes(spec, change)), change


def test_tree_edits_rebuild_only_the_path_to_the_change() -> None:
    leaf = Exec("a", "/bin/true")
    other = Supervisor("other", children=[Exec("b", "/bin/true")])
    tree = Supervisor("root", children=[Supervisor("apps", children=[leaf]), other])
    new = Exec("n", "/bin/true")
    grown = insert_spec(tree, "apps", new)
    assert find_spec(grown, "n") == (new, find_spec(grown, "apps")[0])
    assert grown.children[1] is other  # an untouched subtree is shared
    changed = replace_spec(grown, Exec("a", "/bin/false"))
    assert find_spec(changed, "a")[0].executable == "/bin/false"
    assert remove_spec(changed, "n") == replace_spec(tree, Exec("a", "/bin/false"))
    assert remove_spec(tree, "missing") is tree


def test_server_refusals_become_the_same_exceptions_in_the_client() -> None:
    for exc in (
        SpawnError("web", "user", "unknown user 'x'"),
        SpawnError("web", None, "failed to start: exited with status 1"),
        ConfigError(None, "daemon web", "restart", "one of permanent, transient", "x"),
    ):
        back = _daemon_error(_refusal(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert getattr(back, "field", None) == getattr(exc, "field", None)
        assert getattr(back, "key", None) == getattr(exc, "key", None)
    # One class on both sides: the client rebuilds it from the protocol code.
    assert DaemonExists is ikos._errors.DaemonExists
    exists = _daemon_error(error_for_code("daemon_exists", str(_refusal(DaemonExists("web")))))
    assert isinstance(exists, DaemonExists) and exists.name == "web"
    again = pickle.loads(pickle.dumps(exists))
    assert (type(again), again.name, str(again)) == (DaemonExists, "web", str(exists))


def test_status_objects_parse_with_unknown_keys_kept() -> None:
    st = DaemonStatus.from_json(
        {
            "name": "web",
            "state": "failed",
            "pid": None,
            "restarts": 2,
            "supervisor": "root",
            "last_exit": {"reason": "restart limit reached", "code": 3, "signal": None, "at": 1.0},
            "health": "critical",
        }
    )
    assert st.exit_code == 3 and st.last_exit is not None and st.last_exit.code == 3
    assert st.extra == {"health": "critical"} and not st.running
    with pytest.raises(ikos.ManagerError):
        DaemonStatus.from_json({"state": "running"})
    assert RestartPolicy(auto_restart=False).to_json()["auto_restart"] is False


def test_the_public_names_of_ikos_daemon_are_pinned() -> None:
    assert ikos.daemon.__name__ == "ikos.daemon"  # `import ikos` is enough to reach it
    contract = {
        "create", "start", "stop", "restart", "reload", "status", "set_working_directory",
        "set_user", "set_resource_limits", "set_restart_policy",
        "DaemonConfig", "DaemonStatus", "ResourceLimits", "RestartPolicy",
    }  # fmt: skip
    assert contract <= set(ikos.daemon.__all__)
    assert sorted(ikos.daemon.__all__) == ikos.daemon.__all__
    assert set(ikos.daemon.__all__) - contract == {
        "Backoff", "ConfigError", "DaemonExists", "ExitInfo", "ManagerError",
        "ManagerUnavailable", "NoSuchDaemon", "PermissionDenied", "SpawnError",
        "delete", "get_config", "revert", "update",
    }  # fmt: skip
    for name in ikos.daemon.__all__:
        assert hasattr(ikos.daemon, name), name
    assert issubclass(DaemonExists, ikos.ManagerError)
    assert ikos.daemon.ResourceLimits is ikos.platform._spawn.ResourceLimits


def test_a_created_daemon_that_fails_to_start_is_refused_and_not_kept(api: Driver) -> None:
    """OTP's start_child: the caller hears why, and nothing is left to restart in a loop."""
    err = api.error(
        "d.create(d.DaemonConfig(name='flop', executable='/bin/false', type='forking'))"
    )
    assert err["type"] == "SpawnError" and err["attrs"]["daemon"] == "flop", err
    assert "failed to start" in err["message"] and "status 1" in err["message"]
    assert api.error("d.status('flop')")["type"] == "NoSuchDaemon"
