"""The service registry against a real ikosd: owners, persistence, discovery, waits, events.

Every test runs the real ``ikosd`` (``ikosd_factory``) and registers services
from real processes: actors of the tree, and plain processes driven through
their stdin (:class:`Owner`), whose lives and deaths decide whether their
services are active. ikosctl is run as a user would run it. Tests wait on
conditions (``wait_for``, log lines, the watch stream), never on sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, REPO, Instance, wait_for

import ikos.registry as registry
from ikos._errors import ManagerError, NoSuchDaemon
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths
from ikos.registry import (
    InvalidService,
    NoSuchService,
    ServiceConflict,
    ServiceInfo,
    ServiceTimeout,
)

OWNER_SCRIPT = r"""
import json, os, sys
import ikos.registry as r

print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "register":
            result = r.register(r.ServiceInfo.from_json(cmd["service"])).to_json()
        elif op == "unregister":
            result = r.unregister(cmd["name"]).to_json()
        elif op == "add_dependency":
            result = r.add_dependency(cmd["name"], cmd["depends_on"])
        elif op == "exit":
            sys.exit(0)
        else:
            raise ValueError(op)
        out = {"ok": True, "result": result}
    except Exception as exc:
        out = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)
"""

TREE = """
import os
import ikos
import ikos.registry as registry

class Pinger(ikos.Actor):
    def on_start(self):
        registry.register("ping/main", type="ping", version="1.0",
                          endpoint=f"actor://pinger/{os.getpid()}", capabilities=["ping", "echo"])

    def receive(self, message):
        return ("pong", os.getpid())

tree = ikos.Supervisor("root", max_restarts=10, within=5, children=[ikos.Child("pinger", Pinger)])
"""


class Owner:
    """A plain process (not a daemon of the tree) that registers what it is told to."""

    def __init__(self, inst: Instance, script: Path) -> None:
        env = {**inst.env, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = int(self._read()["pid"])

    def _read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"owner {self.proc.pid} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"owner {self.proc.pid} exited ({self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def register(self, name: str, **fields: Any) -> dict[str, Any]:
        answer = self.send("register", service={"name": name, **fields})
        assert answer["ok"], answer
        result: dict[str, Any] = answer["result"]
        return result

    def exit(self) -> None:
        """End the process (EOF on stdin) and reap it."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        """Kill and reap the process, and close our ends of its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture
def owners(tmp_path: Path) -> Iterator[Callable[[Instance], Owner]]:
    """Start plain owner processes; every one is killed and reaped at teardown."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    started: list[Owner] = []

    def start(inst: Instance) -> Owner:
        owner = Owner(inst, script)
        started.append(owner)
        return owner

    yield start
    for owner in started:
        owner.kill()


def info(inst: Instance, name: str) -> ServiceInfo:
    return registry.lookup(name, root=inst.root)


def active(inst: Instance, name: str) -> bool:
    return info(inst, name).active


def client(inst: Instance) -> ControlClient:
    return ControlClient(InstancePaths.for_root(inst.root), timeout=30)


def ctl_json(inst: Instance, *args: str) -> Any:
    res = inst.ctl("--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def kill_and_wait(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), message=f"pid {pid} to die")


# --- ownership ------------------------------------------------------------------------------


def test_a_plain_process_owns_its_registration_until_it_exits(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    first = owners(inst)
    stored = first.register("plain/db", type="sql", endpoint="tcp://127.0.0.1:5432")
    assert stored["pid"] == first.pid and stored["active"] and stored["owner"] is None
    assert stored["health"] == "passing"
    # The owner's pid comes from the socket's credentials, not from the request.
    forged = first.send("register", service={"name": "plain/forged", "pid": 1})
    assert forged["ok"] and forged["result"]["pid"] == first.pid

    first.exit()
    gone = wait_for(lambda: (s := info(inst, "plain/db")) and not s.active and s)
    assert gone.health == "critical" and gone.pid == first.pid

    second = owners(inst)
    again = second.register("plain/db", type="sql", endpoint="tcp://127.0.0.1:5433")
    assert again["active"] and again["pid"] == second.pid
    assert info(inst, "plain/db").endpoint == "tcp://127.0.0.1:5433"


def test_an_actor_registers_in_on_start_and_its_restart_reactivates_it(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("pinger")
    svc = wait_for(lambda: info(inst, "ping/main"))
    assert (svc.pid, svc.owner, svc.active, svc.type) == (pid, "pinger", True, "ping")
    assert svc.endpoint == f"actor://pinger/{pid}"
    assert inst.status("pinger")["services"] == ["ping/main"]
    assert inst.status("pinger")["health"] == "passing"

    os.kill(pid, signal.SIGKILL)
    new = inst.wait_running_new_pid("pinger", pid)
    svc = wait_for(lambda: (s := info(inst, "ping/main")).pid == new and s)
    assert svc.active and svc.owner == "pinger" and svc.endpoint == f"actor://pinger/{new}"

    assert inst.ctl("stop", "pinger").returncode == 0
    svc = info(inst, "ping/main")
    assert not svc.active and svc.health == "critical"
    assert inst.status("pinger")["health"] == "critical"


def test_a_name_held_by_a_living_owner_cannot_be_taken(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    holder, thief = owners(inst), owners(inst)
    holder.register("held/name")
    answer = thief.send("register", service={"name": "held/name"})
    assert not answer["ok"] and answer["type"] == "ServiceConflict"
    assert answer["message"] == (
        f"service 'held/name' is already registered by living process {holder.pid}"
    )
    with pytest.raises(ServiceConflict) as caught:  # the same from this process
        registry.register("held/name", root=inst.root)
    assert caught.value.holder_pid == holder.pid and caught.value.name == "held/name"
    refused = thief.send("unregister", name="held/name")
    assert not refused["ok"] and refused["type"] == "NotServiceOwner"
    assert info(inst, "held/name").pid == holder.pid

    holder.exit()
    wait_for(lambda: not active(inst, "held/name"))
    assert thief.register("held/name")["pid"] == thief.pid


# --- persistence ----------------------------------------------------------------------------


def test_the_registry_survives_an_orderly_restart_of_ikosd(ikosd_factory, owners):
    inst = ikosd_factory(tree=TREE)
    wait_for(lambda: info(inst, "ping/main").active)
    holder = owners(inst)
    holder.register("keep/db", capabilities=["sql"])
    holder.register("keep/web", metadata={"region": "eu"})
    assert holder.send("add_dependency", name="keep/web", depends_on="keep/db")["ok"]
    old_actor = inst.pid_of("pinger")

    assert inst.terminate() == 0
    again = ikosd_factory(tree=TREE)
    # The plain owner lived on: still active. The actor was stopped with ikosd,
    # and its new incarnation registered again.
    web = info(again, "keep/web")
    assert web.active and web.pid == holder.pid and web.metadata == {"region": "eu"}
    assert registry.get_dependencies("keep/web", root=again.root) == ["keep/db"]
    svc = wait_for(lambda: (s := info(again, "ping/main")).active and s)
    assert svc.pid == again.pid_of("pinger") != old_actor

    holder.exit()
    wait_for(lambda: not active(again, "keep/db"))


def test_owners_that_died_while_ikosd_was_down_are_inactive_at_start(ikosd_factory, owners):
    inst = ikosd_factory(tree=TREE)
    wait_for(lambda: info(inst, "ping/main").active)
    survivor, victim = owners(inst), owners(inst)
    survivor.register("k9/survivor")
    victim.register("k9/victim", capabilities=["gone"])
    actor = inst.pid_of("pinger")
    assert actor is not None

    inst.crash()
    # While ikosd is down: one owner dies; the orphaned actor is stopped too
    # (re-adopting running daemons is another feature; ours must not linger).
    victim.kill()
    kill_and_wait(actor)

    again = ikosd_factory(tree=TREE)
    assert not active(again, "k9/victim")
    assert info(again, "k9/victim").health == "critical"
    assert active(again, "k9/survivor")
    assert registry.discover(capability="gone", active_only=True, root=again.root) == []
    # The actor's entry was inactive at start too, until the new actor registered.
    svc = wait_for(lambda: (s := info(again, "ping/main")).active and s)
    assert svc.pid == again.pid_of("pinger") != actor
    log = again.log_text()
    assert "services turned inactive: their owners died while ikosd was down" in log
    # And the survivor is followed again: its death is seen by the new ikosd.
    survivor.exit()
    wait_for(lambda: not active(again, "k9/survivor"))


def test_a_daemon_left_running_by_a_killed_ikosd_keeps_or_yields_its_names(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    orphan = wait_for(lambda: (s := info(inst, "ping/main")).active and s).pid
    inst.crash()
    try:
        again = ikosd_factory(tree=TREE)
        svc = wait_for(lambda: (s := info(again, "ping/main")).pid == again.pid_of("pinger") and s)
        assert svc.active and again.status("pinger")["services"] == ["ping/main"]
        if svc.pid == orphan:
            # The new ikosd adopted the running daemon: its entry stays, and the
            # registry follows that process again (its death is seen).
            os.kill(orphan, signal.SIGKILL)
            new = again.wait_running_new_pid("pinger", orphan)
            wait_for(lambda: (s := info(again, "ping/main")).pid == new and s.active)
        else:
            # A new incarnation: the recovery did not vouch for the orphan (ikosd was
            # killed before its row said "running"), so it stopped it: never two
            # copies. The new one's registration took the name, and did not crash
            # against the orphan's entry.
            wait_for(lambda: not alive(orphan), message="the recovery to stop the orphan")
            assert again.status("pinger")["restarts"] == 0
    finally:
        kill_and_wait(orphan)


# --- discovery ------------------------------------------------------------------------------


def test_discovery_by_name_pattern_capability_and_type(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    owner, other = owners(inst), owners(inst)
    owner.register("net/dhcp", type="dhcp", capabilities=["dhcpv4", "dhcpv6"])
    owner.register("net/dns", type="dns", capabilities=["dns"])
    owner.register("net:ntp", type="ntp", capabilities=["time"])
    owner.register("auth/pam", type="auth", capabilities=["login"])
    other.register("net/dns-backup", type="dns", capabilities=["dns"])
    other.exit()
    wait_for(lambda: not active(inst, "net/dns-backup"))

    def names(**criteria: Any) -> list[str]:
        return [s.name for s in registry.discover(root=inst.root, **criteria)]

    assert names(name="net/dns") == ["net/dns"]
    with pytest.raises(NoSuchService, match="no service named 'net/nope'"):
        registry.discover("net/nope", root=inst.root)
    assert names(pattern="net/*") == ["net/dhcp", "net/dns", "net/dns-backup"]
    assert names(pattern="net[:/]*") == ["net/dhcp", "net/dns", "net/dns-backup", "net:ntp"]
    assert names(pattern="*d?s*") == ["net/dns", "net/dns-backup"]
    assert names(pattern="net/*", active_only=True) == ["net/dhcp", "net/dns"]
    assert names(capability="dns") == ["net/dns", "net/dns-backup"]
    assert names(capability="dhcpv6") == ["net/dhcp"]
    assert names(type="dns", active_only=True) == ["net/dns"]
    assert names(pattern="net/*", capability="dns", type="dns") == ["net/dns", "net/dns-backup"]
    assert names(capability="nothing") == []
    everything = [s.name for s in registry.list(root=inst.root)]
    assert everything == ["auth/pam", "net/dhcp", "net/dns", "net/dns-backup", "net:ntp"]


def test_wait_for_returns_when_the_service_appears_and_times_out_otherwise(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    with pytest.raises(ServiceTimeout, match=r"'never' became active within 0\.3s"):
        registry.wait_for("never", timeout=0.3, root=inst.root)

    results: list[Any] = []
    waiter = threading.Thread(
        target=lambda: results.append(
            registry.wait_for(capability="late-cap", timeout=60, root=inst.root)
        )
    )
    started = time.monotonic()
    waiter.start()
    wait_for(lambda: "registry: waiting for" in inst.log_text(), message="the waiter")
    assert waiter.is_alive()
    owner = owners(inst)
    owner.register("late/svc", capabilities=["late-cap"])
    waiter.join(timeout=HANG)
    # returned, and not at its 60 s timeout (a bound on hangs, not on speed)
    assert not waiter.is_alive() and time.monotonic() - started < HANG
    assert results[0].name == "late/svc" and results[0].pid == owner.pid
    # Already there: no wait at all.
    assert registry.wait_for("late/svc", timeout=5, root=inst.root).pid == owner.pid


def test_watchers_see_registrations_deaths_reactivations_and_removals(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    with registry.watch(pattern="w/*", root=inst.root, idle_timeout=30) as events:
        first = owners(inst)
        first.register("w/one")
        first.register("other/ignored")
        first.exit()
        second = owners(inst)
        second.register("w/one")
        assert second.send("unregister", name="w/one")["ok"]
        seen = [(e.kind, e.service.name, e.service.pid) for e in _take(events, 4) if e.service]
    assert seen == [
        ("registered", "w/one", first.pid),
        ("inactive", "w/one", first.pid),
        ("active", "w/one", second.pid),
        ("unregistered", "w/one", second.pid),
    ]


def _take(events: Iterator[registry.ServiceEvent], n: int) -> list[registry.ServiceEvent]:
    return [next(events) for _ in range(n)]


# --- refusals -------------------------------------------------------------------------------


def test_invalid_names_and_oversized_metadata_are_refused_clearly(ikosd_factory):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    # The client checks before sending...
    with pytest.raises(InvalidService, match="invalid service field 'name': expected a name"):
        registry.register("bad name", root=inst.root)
    with pytest.raises(InvalidService, match="limit of 4096 bytes"):
        registry.register("ok/name", metadata={"k": "v" * 5000}, root=inst.root)
    # ...and so does the manager, whatever a client sends.
    with client(inst) as c:
        cases = [
            ({"name": "/leading/slash"}, "invalid service field 'name'"),
            ({"name": "x" * 129}, "129 characters, more than the limit of 128"),
            ({"name": "ok/meta", "metadata": {"k": "v" * 5000}}, "limit of 4096 bytes"),
            ({"name": "ok/caps", "capabilities": ["c"] * 2}, "duplicate 'c'"),
            ({"name": "ok/field", "colour": "red"}, "invalid service field 'colour'"),
            ({"name": "ok/ctl", "endpoint": "a\x1b[2J"}, "control characters"),
        ]
        for service, message in cases:
            with pytest.raises(ManagerError, match="invalid service field") as caught:
                c.call("register", {"service": service})
            assert caught.value.code == "invalid_service" and message in str(caught.value)
        with pytest.raises(ManagerError, match="needs 'service' as an object"):
            c.call("register", {"service": "net/dhcp"})
        with pytest.raises(ManagerError, match="'pattern'"):
            c.call("discover", {"pattern": "*" * 300})
    assert registry.list(root=inst.root) == []


def test_dependencies_between_services_and_cycles(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    owner = owners(inst)
    for name in ("dep/a", "dep/b", "dep/c"):
        owner.register(name)
    assert registry.add_dependency("dep/a", "dep/b", root=inst.root) == ["dep/b"]
    assert registry.add_dependency("dep/b", "dep/c", root=inst.root) == ["dep/c"]
    with pytest.raises(ManagerError, match=r"dependency cycle: dep/c -> dep/a -> dep/b -> dep/c"):
        registry.add_dependency("dep/c", "dep/a", root=inst.root)
    with pytest.raises(NoSuchService):
        registry.add_dependency("dep/a", "dep/zzz", root=inst.root)
    assert registry.get_dependencies("dep/a", root=inst.root) == ["dep/b"]
    assert registry.remove_dependency("dep/a", "dep/b", root=inst.root) is True
    assert registry.remove_dependency("dep/a", "dep/b", root=inst.root) is False
    assert registry.get_dependencies("dep/a", root=inst.root) == []


# --- ikosctl --------------------------------------------------------------------------------


def test_ikosctl_services_and_discover(ikosd_factory, owners):
    inst = ikosd_factory(tree=TREE)
    wait_for(lambda: info(inst, "ping/main").active)
    owner = owners(inst)
    owner.register("cli/db", type="sql", version="15", endpoint="tcp://127.0.0.1:5432")

    listed = ctl_json(inst, "services")
    assert [s["name"] for s in listed] == ["cli/db", "ping/main"]
    assert set(listed[0]) >= {
        "name", "description", "version", "type", "endpoint", "capabilities",
        "pid", "active", "start_time",
    }  # fmt: skip
    assert listed[0]["pid"] == owner.pid and listed[1]["owner"] == "pinger"

    table = inst.ctl("services")
    assert table.returncode == 0
    # Off a terminal: tab-separated rows in fixed columns, no header, no colours.
    rows = [line.split("\t") for line in table.stdout.splitlines()]
    assert [row[0] for row in rows] == ["cli/db", "ping/main"]
    assert rows[0][:4] == ["cli/db", "sql", "15", "tcp://127.0.0.1:5432"]
    assert all(len(row) == 9 for row in rows)
    assert "\x1b[" not in table.stdout

    found = ctl_json(inst, "discover", "cli/db")
    assert [s["name"] for s in found] == ["cli/db"] and found[0]["endpoint"].endswith(":5432")
    text = inst.ctl("discover", "cli/db").stdout
    assert "name:" in text and "cli/db" in text and "tcp://127.0.0.1:5432" in text
    assert [s["name"] for s in ctl_json(inst, "discover", "--capability", "ping")] == ["ping/main"]
    assert [s["name"] for s in ctl_json(inst, "discover", "*/*")] == ["cli/db", "ping/main"]

    for args in (("discover", "cli/nope"), ("--json", "discover", "cli/nope")):
        res = inst.ctl(*args)
        assert res.returncode == 4 and res.stdout == ""
        assert res.stderr == "ikosctl: no service named 'cli/nope'\n"
    res = inst.ctl("discover", "--type", "nothing")
    assert res.returncode == 4 and "no service matches type 'nothing'" in res.stderr


def test_a_reader_of_another_uid_cannot_register(ikosd_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    # The other user must reach the control socket: open the directories on the way.
    modes = {p: os.stat(p).st_mode for p in inst.root.parents if p != Path("/")}
    try:
        for path, mode in modes.items():
            os.chmod(path, mode | 0o005)
        _register_as_nobody(inst)
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert registry.list(root=inst.root) == []
    with pytest.raises(NoSuchDaemon):
        registry.lookup("other/user", root=inst.root)


def _register_as_nobody(inst: Instance) -> None:
    """In a forked child that became uid 65534: try to register, then to read."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            lines = []
            with client(inst) as c:
                try:
                    c.call("register", {"service": {"name": "other/user"}})
                    lines.append("registered")
                except ManagerError as exc:
                    lines.append(f"{exc.code}: {exc}")
                lines.append(str(len(c.call("services"))))
            os.write(w, "\n".join(lines).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    first, second = out.splitlines()
    assert first.startswith("permission_denied: uid 65534 may only read the registry")
    assert second == "0"


# --- services declared in the configuration -------------------------------------------------

DECLARED = """
[ikosd]
metrics = false

[actors.store]
class = "tree_inst:Plain"
description = "the store"
[[actors.store.service]]
type = "kv"
capabilities = ["get", "put"]
[[actors.store.service]]
name = "store/admin"
endpoint = "unix:///run/store-admin.sock"

[executables.sleeper]
executable = "sleep"
args = ["1000"]
[executables.sleeper.service]
name = "sleeper/svc"
version = "2"
metadata = { tier = "gold" }
"""

PLAIN_TREE = """
import ikos

class Plain(ikos.Actor):
    def receive(self, message):
        return message

tree = ikos.Supervisor("root", max_restarts=10, within=5)
"""


def test_services_declared_in_the_configuration_follow_their_daemon(ikosd_factory):
    inst = ikosd_factory(tree=PLAIN_TREE, config=DECLARED)
    store_pid, sleeper_pid = inst.pid_of("store"), inst.pid_of("sleeper")
    store = info(inst, "store")
    assert (store.owner, store.pid, store.active, store.health) == (
        "store",
        store_pid,
        True,
        "passing",
    )
    assert store.description == "the store" and store.capabilities == ("get", "put")
    assert info(inst, "store/admin").endpoint == "unix:///run/store-admin.sock"
    sleeper = info(inst, "sleeper/svc")
    assert (sleeper.owner, sleeper.pid, sleeper.version) == ("sleeper", sleeper_pid, "2")
    assert sleeper.metadata == {"tier": "gold"}
    assert inst.status("store")["services"] == ["store", "store/admin"]
    assert inst.status("sleeper")["services"] == ["sleeper/svc"]

    assert inst.ctl("stop", "sleeper").returncode == 0
    assert not active(inst, "sleeper/svc")
    assert inst.ctl("start", "sleeper").returncode == 0
    sleeper = info(inst, "sleeper/svc")
    assert sleeper.active and sleeper.pid == inst.pid_of("sleeper") != sleeper_pid

    os.kill(store_pid, signal.SIGKILL)
    new = inst.wait_running_new_pid("store", store_pid)
    wait_for(lambda: info(inst, "store").pid == new and info(inst, "store/admin").pid == new)
    assert all(s.active for s in registry.discover(pattern="store*", root=inst.root))


# --- the public API and the stream's end ----------------------------------------------------


def test_the_public_names_of_ikos_registry() -> None:
    assert sorted(registry.__all__) == sorted(
        [
            "InvalidService", "NoSuchService", "NotServiceOwner", "RegistryFull",
            "ServiceConflict", "ServiceEvent", "ServiceInfo", "ServiceTimeout", "ServiceWatch",
            "add_dependency", "discover", "get_dependencies", "health_request", "heartbeat",
            "list", "lookup", "register", "remove_dependency", "unregister", "wait_for", "watch",
        ]
    )  # fmt: skip
    assert all(hasattr(registry, name) for name in registry.__all__)
    assert registry.health_request({"ikos.health": "ok"}) == "ok"
    assert registry.health_request({"ikos.health": "ok", "x": 1}) is None
    # Clients do not pay for the manager's side: no SQLite, no store, no probes.
    code = (
        "import sys, ikos.registry\n"
        "print(sorted(m for m in ('sqlite3', 'ikos.registry._store', 'ikos.registry._health',"
        " 'psutil') if m in sys.modules))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert res.stdout.strip() == "[]"


def test_a_closed_watch_is_forgotten_by_the_manager(ikosd_factory, owners):
    inst = ikosd_factory(tree="import ikos\ntree = ikos.Supervisor('root')\n")
    # More watches than the manager keeps at once, one after the other: each one
    # closed by its client must have been dropped, or the last ones would be refused.
    for _ in range(140):
        registry.watch(root=inst.root).close()
    with registry.watch(name="after/all", root=inst.root, idle_timeout=30) as events:
        owners(inst).register("after/all")
        event = next(events)
    assert (event.kind, event.service and event.service.name) == ("registered", "after/all")
