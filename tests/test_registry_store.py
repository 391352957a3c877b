"""The registry store and ServiceInfo: validation, ownership, discovery, persistence, events."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psutil._pslinux
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ikos._errors import IkosError, NoSuchDaemon, PermissionDenied
from ikos.platform._process import process_stamp
from ikos.registry._graph import DependencyCycle
from ikos.registry._service import (
    InvalidService,
    NoSuchService,
    NotServiceOwner,
    RegistryFull,
    ServiceConflict,
    ServiceInfo,
    is_service_name,
    validate_service,
)
from ikos.registry._store import (
    RegistryEvent,
    RegistryStore,
    process_alive,
)

ME = os.getpid()
MY_START = process_stamp(ME)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RegistryStore]:
    s = RegistryStore(tmp_path / "registry.sqlite3", autocommit=True)
    try:
        yield s
    finally:
        s.close()


def _spawn_owner() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A real, living process to own services; killed and reaped afterwards."""
    proc = _spawn_owner()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def names(infos: list[ServiceInfo]) -> list[str]:
    return [i.name for i in infos]


# -- ServiceInfo and validation -------------------------------------------------


def test_json_round_trip_keeps_every_field() -> None:
    info = ServiceInfo(
        "net/dhcp",
        description="DHCP server",
        version="1.2.3",
        type="dhcp",
        endpoint="udp://0.0.0.0:67",
        capabilities=("dhcpv4", "dhcpv6"),
        pid=1234,
        active=False,
        start_time=1764134400.5,
        owner="net",
        health="passing",
        metadata={"zone": "lan"},
    )
    data = info.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["capabilities"] == ["dhcpv4", "dhcpv6"]
    assert ServiceInfo.from_json(json.loads(json.dumps(data))) == info


def test_from_json_fills_defaults_and_refuses_unknown_fields() -> None:
    assert ServiceInfo.from_json({"name": "log"}) == ServiceInfo("log")
    with pytest.raises(InvalidService) as err:
        ServiceInfo.from_json({"name": "log", "colour": "red"})
    assert err.value.field == "colour"
    with pytest.raises(InvalidService) as err:
        ServiceInfo.from_json({"description": "no name"})
    assert err.value.field == "name"
    with pytest.raises(InvalidService) as err:
        ServiceInfo.from_json(["log"])
    with pytest.raises(InvalidService) as err:
        ServiceInfo.from_json({"name": "log", "pid": "12"})
    assert err.value.field == "pid"
    with pytest.raises(InvalidService) as err:
        ServiceInfo.from_json({"name": "log", "active": 1})
    assert err.value.field == "active"


@pytest.mark.parametrize(
    "name", ["log", "net/dhcp", "auth:pam", "net/dhcp@eth0", "a.b-c_d/e:f", "x" * 128]
)
def test_valid_names(name: str) -> None:
    assert is_service_name(name)
    validate_service(ServiceInfo(name))


@pytest.mark.parametrize(
    "name", ["", "bad name", "/net", "net/", "net//dhcp", "net/:x", "-x", "é", "a\n", "x" * 129, 5]
)
def test_invalid_names_are_refused_naming_the_field(name: Any, store: RegistryStore) -> None:
    assert not is_service_name(name)
    with pytest.raises(InvalidService) as err:
        store.register(ServiceInfo(name), None, None)
    assert err.value.field == "name"
    assert "name" in str(err.value)
    if isinstance(name, str) and len(name) > 128:
        assert "128" in str(err.value)
    assert store.list() == []


@pytest.mark.parametrize(
    ("info", "field", "limit"),
    [
        (ServiceInfo("s", metadata={f"k{i}": "v" for i in range(33)}), "metadata", "32"),
        (ServiceInfo("s", metadata={"blob": "x" * 5000}), "metadata", "4096"),
        (ServiceInfo("s", metadata={"bad key": "v"}), "metadata", "64"),
        (ServiceInfo("s", description="d" * 1025), "description", "1024"),
        (ServiceInfo("s", version="v" * 257), "version", "256"),
        (ServiceInfo("s", type="t" * 65), "type", "64"),
        (ServiceInfo("s", endpoint="e" * 513), "endpoint", "512"),
        (ServiceInfo("s", capabilities=tuple(f"c{i}" for i in range(65))), "capabilities", "64"),
        (ServiceInfo("s", capabilities=("c" * 65,)), "capabilities", "64"),
    ],
)
def test_oversized_fields_are_refused_with_field_and_limit(
    info: ServiceInfo, field: str, limit: str, store: RegistryStore
) -> None:
    with pytest.raises(InvalidService) as err:
        store.register(info, None, None)
    assert err.value.field == field
    assert field in str(err.value) and limit in str(err.value)
    assert store.list() == []


@pytest.mark.parametrize(
    ("info", "field"),
    [
        (ServiceInfo("s", capabilities=("a", "a")), "capabilities"),
        (ServiceInfo("s", capabilities=("has space",)), "capabilities"),
        (ServiceInfo("s", health="great"), "health"),
        (ServiceInfo("s", pid=0), "pid"),
        (ServiceInfo("s", start_time=float("nan")), "start_time"),
        (ServiceInfo("s", owner="bad owner"), "owner"),
        (ServiceInfo("s", version="1\x1b[31m"), "version"),
        (ServiceInfo("s", endpoint="\ud800"), "endpoint"),
        (ServiceInfo("s", metadata={"k": "\ud800"}), "metadata"),
        (ServiceInfo("s", metadata={"k": 1}), "metadata"),  # type: ignore[dict-item]
    ],
)
def test_invalid_fields_are_refused(info: ServiceInfo, field: str) -> None:
    with pytest.raises(InvalidService) as err:
        validate_service(info)
    assert err.value.field == field


def test_metadata_at_the_limits_is_accepted() -> None:
    validate_service(ServiceInfo("s", metadata={f"k{i:02}": "v" for i in range(32)}))
    validate_service(ServiceInfo("s", metadata={"k": "x" * 4095}))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_fields = st.sampled_from(
    ["name", "description", "version", "type", "endpoint", "capabilities", "pid", "active",
     "start_time", "owner", "health", "metadata"]
)  # fmt: skip


@given(st.dictionaries(_fields, _json, max_size=12) | _json)
@settings(max_examples=300)
def test_from_json_of_anything_is_a_valid_service_or_invalid_service(data: object) -> None:
    try:
        info = ServiceInfo.from_json(data)
    except InvalidService:
        return
    validate_service(info)
    assert ServiceInfo.from_json(json.loads(json.dumps(info.to_json()))) == info


def test_errors_survive_pickling() -> None:
    for exc in (
        InvalidService("metadata", "too big"),
        ServiceConflict("net/dhcp", 42),
        NoSuchService("net/dhcp"),
        NotServiceOwner("net/dhcp", 42, 43),
        RegistryFull(10),
    ):
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc)
        assert str(copy) == str(exc)
        assert copy.args == exc.args
    assert isinstance(NoSuchService("x"), NoSuchDaemon)
    assert NoSuchService("x").code == "no_such_daemon"
    assert isinstance(NotServiceOwner("x", 1, 2), PermissionDenied)
    assert isinstance(InvalidService("name", "bad"), IkosError)
    assert "net/dhcp" in str(NoSuchService("net/dhcp"))
    assert "42" in str(ServiceConflict("net/dhcp", 42))


# -- registration and discovery ---------------------------------------------------


def _populate(store: RegistryStore) -> None:
    for info in (
        ServiceInfo("net/dhcp", type="dhcp", capabilities=("dhcpv4", "leases")),
        ServiceInfo("net/dns", type="dns", capabilities=("resolve",)),
        ServiceInfo("net/dhcp6", type="dhcp", capabilities=("dhcpv6", "leases")),
        ServiceInfo("log", type="log", capabilities=("syslog",)),
        ServiceInfo("auth:pam", type="auth"),
        ServiceInfo("netlink", type="dev"),
    ):
        store.register(info, None, None)


def test_register_returns_the_stored_service(store: RegistryStore) -> None:
    before = time.time()
    stored = store.register(ServiceInfo("log", active=False), ME, MY_START)
    assert stored.active is True
    assert stored.pid == ME
    assert stored.start_time is not None
    assert abs(stored.start_time - psutil.Process(ME).create_time()) < 1.0  # a Unix time
    assert store.get("log") == stored
    assert store.owner_of("log") == (ME, MY_START)
    by_manager = store.register(ServiceInfo("dev"), None, None)
    assert by_manager.pid is None
    assert by_manager.start_time is not None and by_manager.start_time >= before
    explicit = store.register(ServiceInfo("x", pid=7, start_time=1.0), ME, None)
    assert (explicit.pid, explicit.start_time) == (7, 1.0)
    assert store.owner_of("x") == (ME, MY_START)


def test_discover_by_name_pattern_capability_and_type(store: RegistryStore) -> None:
    _populate(store)
    assert names(store.discover(name="net/dns")) == ["net/dns"]
    assert store.discover(name="net/nothing") == []
    assert names(store.discover(pattern="net/*")) == ["net/dhcp", "net/dhcp6", "net/dns"]
    assert names(store.discover(pattern="net*")) == ["net/dhcp", "net/dhcp6", "net/dns", "netlink"]
    assert names(store.discover(pattern="net/dhcp?")) == ["net/dhcp6"]
    assert names(store.discover(pattern="*:*")) == ["auth:pam"]
    assert names(store.discover(pattern="[!n]*")) == ["auth:pam", "log"]
    assert names(store.discover(pattern="[al]*")) == ["auth:pam", "log"]
    assert names(store.discover(pattern="*dhcp*")) == ["net/dhcp", "net/dhcp6"]
    assert names(store.discover(pattern="log")) == ["log"]
    assert names(store.discover(pattern="NET/*")) == []
    assert names(store.discover(capability="leases")) == ["net/dhcp", "net/dhcp6"]
    assert names(store.discover(capability="nothing")) == []
    assert names(store.discover(type="dhcp")) == ["net/dhcp", "net/dhcp6"]
    assert names(store.discover(pattern="net/*", capability="dhcpv6")) == ["net/dhcp6"]
    assert names(store.discover(type="dhcp", capability="dhcpv4")) == ["net/dhcp"]
    assert names(store.list()) == sorted(names(store.list()))
    assert len(store.list()) == store.count() == 6
    got = store.get("net/dhcp")
    assert got.capabilities == ("dhcpv4", "leases")


def test_re_registration_replaces_capabilities(store: RegistryStore) -> None:
    store.register(ServiceInfo("s", capabilities=("a", "b")), ME, MY_START)
    store.register(ServiceInfo("s", capabilities=("c",), endpoint="tcp://x:1"), ME, MY_START)
    assert store.discover(capability="a") == []
    assert names(store.discover(capability="c")) == ["s"]
    assert store.get("s").endpoint == "tcp://x:1"
    assert store.count() == 1


def test_discover_active_only(store: RegistryStore, child: subprocess.Popen[bytes]) -> None:
    store.register(ServiceInfo("a"), child.pid, None)
    store.register(ServiceInfo("b"), ME, MY_START)
    assert store.mark_owner_dead(child.pid) == ["a"]
    assert names(store.discover(active_only=True)) == ["b"]
    assert names(store.discover()) == ["a", "b"]
    assert store.count(active_only=True) == 1


def test_pattern_must_be_bounded(store: RegistryStore) -> None:
    with pytest.raises(InvalidService) as err:
        store.discover(pattern="*" * 1000)
    assert err.value.field == "pattern"


def test_get_unknown_raises_no_such_service(store: RegistryStore) -> None:
    with pytest.raises(NoSuchService) as err:
        store.get("nothing")
    assert err.value.name == "nothing"


# -- ownership --------------------------------------------------------------------


def test_a_living_owner_keeps_its_name(
    store: RegistryStore, child: subprocess.Popen[bytes]
) -> None:
    store.register(ServiceInfo("net/dhcp", endpoint="one"), child.pid, process_stamp(child.pid))
    with pytest.raises(ServiceConflict) as err:
        store.register(ServiceInfo("net/dhcp", endpoint="two"), ME, MY_START)
    assert err.value.holder_pid == child.pid
    assert err.value.name == "net/dhcp"
    assert str(child.pid) in str(err.value)
    assert store.get("net/dhcp").endpoint == "one"
    # The owner itself may re-register, and so may the manager.
    store.register(ServiceInfo("net/dhcp", endpoint="three"), child.pid, None)
    assert store.get("net/dhcp").endpoint == "three"
    store.register(ServiceInfo("net/dhcp", endpoint="four"), None, None)
    assert store.owner_of("net/dhcp") == (None, None)


def test_takeover_after_the_owner_died(store: RegistryStore) -> None:
    proc = _spawn_owner()
    try:
        started = process_stamp(proc.pid)
        store.register(ServiceInfo("net/dhcp"), proc.pid, started)
        assert process_alive(proc.pid, started)
    finally:
        _kill_and_reap(proc)
    assert not process_alive(proc.pid, started)
    taken = store.register(ServiceInfo("net/dhcp", endpoint="mine"), ME, MY_START)
    assert taken.active and taken.pid == ME
    assert store.owner_of("net/dhcp") == (ME, MY_START)


def test_a_reused_pid_is_not_the_owner(
    store: RegistryStore, child: subprocess.Popen[bytes]
) -> None:
    assert MY_START is not None
    # Our pid, but a start time of another process: the holder is gone.
    store.register(ServiceInfo("s"), ME, (MY_START[0], MY_START[1] - 1000))
    assert not process_alive(ME, (MY_START[0], MY_START[1] - 1000))
    store.register(ServiceInfo("s"), child.pid, None)
    assert store.owner_of("s")[0] == child.pid


def test_an_inactive_name_can_be_taken_even_if_the_holder_lives(
    store: RegistryStore, child: subprocess.Popen[bytes]
) -> None:
    store.register(ServiceInfo("s"), child.pid, None)
    store.set_active("s", False)
    store.register(ServiceInfo("s"), ME, MY_START)
    assert store.owner_of("s")[0] == ME


def test_unregister_only_by_owner_or_manager(
    store: RegistryStore, child: subprocess.Popen[bytes]
) -> None:
    store.register(ServiceInfo("a"), child.pid, None)
    store.register(ServiceInfo("b"), child.pid, None)
    with pytest.raises(NotServiceOwner) as err:
        store.unregister("a", ME)
    assert (err.value.holder_pid, err.value.caller_pid) == (child.pid, ME)
    removed = store.unregister("a", child.pid)
    assert removed.name == "a"
    store.unregister("b")
    assert store.list() == []
    with pytest.raises(NoSuchService):
        store.unregister("a")
    store.register(ServiceInfo("c"), None, None)
    with pytest.raises(NotServiceOwner):
        store.unregister("c", ME)


def test_owner_death_turns_services_inactive_and_a_restart_reactivates(
    store: RegistryStore,
) -> None:
    proc = _spawn_owner()
    try:
        store.register(ServiceInfo("net/dhcp", health="passing"), proc.pid, None)
        store.register(ServiceInfo("net/dns"), proc.pid, None)
        store.register(ServiceInfo("log"), ME, MY_START)
    finally:
        _kill_and_reap(proc)
    assert store.mark_owner_dead(proc.pid) == ["net/dhcp", "net/dns"]
    assert store.mark_owner_dead(proc.pid) == []
    dhcp = store.get("net/dhcp")
    assert (dhcp.active, dhcp.health) == (False, "critical")
    assert store.get("log").active
    restarted = _spawn_owner()
    try:
        again = store.register(ServiceInfo("net/dhcp"), restarted.pid, None)
        assert again.active and again.pid == restarted.pid
    finally:
        _kill_and_reap(restarted)


def test_registry_full(tmp_path: Path) -> None:
    with RegistryStore(tmp_path / "r.sqlite3", autocommit=True, max_services=2) as store:
        store.register(ServiceInfo("a"), None, None)
        store.register(ServiceInfo("b"), None, None)
        with pytest.raises(RegistryFull):
            store.register(ServiceInfo("c"), None, None)
        store.register(ServiceInfo("a", version="2"), None, None)  # a replacement is no new name
        assert store.count() == 2


# -- persistence ------------------------------------------------------------------


def test_services_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.sqlite3"
    with RegistryStore(path) as store:
        _populate(store)
        store.set_health("log", "passing")
        store.add_dependency("net/dhcp", "log")
        store.commit()
        before = store.list()
    with RegistryStore(path) as again:
        assert again.list() == before
        assert again.get_dependencies("net/dhcp") == ["log"]
        assert again.get("log").health == "passing"
        assert names(again.discover(capability="leases")) == ["net/dhcp", "net/dhcp6"]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_batched_writes_are_visible_to_others_only_after_commit(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    store = RegistryStore(path)
    try:
        store.register(ServiceInfo("a"), None, None)
        assert names(store.list()) == ["a"]  # the store sees its own batch
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT count(*) FROM services").fetchone()[0] == 0
            store.commit()
            assert other.execute("SELECT count(*) FROM services").fetchone()[0] == 1
        finally:
            other.close()
    finally:
        store.close()


def test_a_failed_call_leaves_the_batch_intact(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "registry.sqlite3"
    with RegistryStore(path) as store:
        store.register(ServiceInfo("a"), child.pid, None)
        with pytest.raises(ServiceConflict):
            store.register(ServiceInfo("a"), ME, MY_START)
        with pytest.raises(NoSuchService):
            store.add_dependency("a", "missing")
        store.register(ServiceInfo("b"), None, None)
    with RegistryStore(path) as again:
        assert names(again.list()) == ["a", "b"]
        assert again.owner_of("a")[0] == child.pid


def test_a_step_of_the_wall_clock_keeps_a_living_owner(
    tmp_path: Path, child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI failure of stop 19: after a 14 s step, a living owner was taken for dead.

    The kernel computes ``/proc/stat``'s boot time from the wall clock, and
    psutil's start times add it: a step moved them all. The owner is now its
    boot and its start in ticks since it, which no step moves.
    """
    path = tmp_path / "registry.sqlite3"
    with RegistryStore(path) as store:
        store.register(ServiceInfo("net/dhcp"), child.pid, None)
    created = psutil.Process(child.pid).create_time()
    boot, now = psutil._pslinux.boot_time, time.time
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot() + 14.0)
    monkeypatch.setattr(time, "time", lambda: now() + 14.0)
    assert abs(psutil.Process(child.pid).create_time() - created - 14.0) < 0.01
    with RegistryStore(path) as store:
        assert store.reconcile_dead_owners() == []
        assert process_alive(*store.owner_of("net/dhcp"))
        with pytest.raises(ServiceConflict):
            store.register(ServiceInfo("net/dhcp"), ME, None)


def test_an_owner_of_another_boot_is_gone(store: RegistryStore) -> None:
    assert MY_START is not None and process_alive(ME, MY_START)
    assert not process_alive(ME, ("another-boot", MY_START[1]))
    store.register(ServiceInfo("s"), ME, ("another-boot", MY_START[1]))
    assert store.reconcile_dead_owners() == ["s"]


def test_a_registry_of_an_ikos_before_stamps_is_read_and_gains_them(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "registry.sqlite3"
    with RegistryStore(path) as store:
        store.register(ServiceInfo("new"), None, None)
    db = sqlite3.connect(path)  # as an ikos before stamps left it
    db.execute("DROP TABLE services")
    db.execute(
        "CREATE TABLE services (name TEXT PRIMARY KEY, description TEXT NOT NULL,"
        " version TEXT NOT NULL, type TEXT NOT NULL, endpoint TEXT NOT NULL,"
        " capabilities TEXT NOT NULL, pid INTEGER, active INTEGER NOT NULL, start_time REAL,"
        " owner TEXT, health TEXT NOT NULL, metadata TEXT NOT NULL, owner_pid INTEGER,"
        " owner_start_time REAL) WITHOUT ROWID"
    )
    created = psutil.Process(child.pid).create_time()
    for name, start in (("live", created), ("reused", created - 100)):
        db.execute(
            "INSERT INTO services VALUES (?, '', '', '', '', '[]', ?, 1, ?, NULL, 'unknown',"
            " '{}', ?, ?)",
            (name, child.pid, start, child.pid, start),
        )
    db.commit()
    db.close()
    with RegistryStore(path) as store:
        assert store.owner_of("live") == (child.pid, created)
        assert store.reconcile_dead_owners() == ["reused"]
        store.register(ServiceInfo("live"), child.pid, None)  # rewritten: stamped
        assert store.owner_of("live") == (child.pid, process_stamp(child.pid))
    _kill_and_reap(child)
    with RegistryStore(path) as store:
        assert store.reconcile_dead_owners() == ["live"]


def test_reconcile_at_start_marks_dead_owners_inactive(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    proc = _spawn_owner()
    try:
        with RegistryStore(path) as store:
            store.register(ServiceInfo("net/dhcp"), proc.pid, process_stamp(proc.pid))
            store.register(ServiceInfo("log"), ME, MY_START)
            store.register(ServiceInfo("declared"), None, None)
            assert store.reconcile_dead_owners() == []
    finally:
        _kill_and_reap(proc)  # the owner dies while "ikosd is down"
    with RegistryStore(path) as store:
        events: list[RegistryEvent] = []
        store.add_listener(events.append)
        assert store.reconcile_dead_owners() == ["net/dhcp"]
        assert [(e.kind, e.info.name) for e in events] == [("inactive", "net/dhcp")]
        assert not store.get("net/dhcp").active
        assert store.get("log").active and store.get("declared").active
    with RegistryStore(path) as store:
        assert not store.get("net/dhcp").active


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    RegistryStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(IkosError, match="99"):
        RegistryStore(path)


# -- scale ------------------------------------------------------------------------


def test_ten_thousand_services(tmp_path: Path) -> None:
    with RegistryStore(tmp_path / "registry.sqlite3") as store:
        for i in range(10_000):
            caps = ("all", f"mod7-{i % 7}") + (("rare",) if i % 1000 == 0 else ())
            store.register(
                ServiceInfo(f"svc/{i:05}", type=f"t{i % 3}", capabilities=caps), None, None
            )
        store.commit()
        assert store.count() == 10_000
        assert len(store.list()) == 10_000
        assert names(store.discover(pattern="svc/001*")) == [f"svc/{i:05}" for i in range(100, 200)]
        assert len(store.discover(pattern="svc/*7")) == 1000
        assert len(store.discover(pattern="*")) == 10_000
        assert names(store.discover(capability="rare")) == [
            f"svc/{i:05}" for i in range(0, 10_000, 1000)
        ]
        assert len(store.discover(capability="mod7-3")) == len(range(3, 10_000, 7))
        assert len(store.discover(capability="all", type="t1")) == len(range(1, 10_000, 3))
        assert names(store.discover(name="svc/09999")) == ["svc/09999"]


# -- health, activity and events --------------------------------------------------


def test_set_health_and_set_active(store: RegistryStore) -> None:
    store.register(ServiceInfo("s"), None, None)
    assert store.set_health("s", "passing").health == "passing"
    with pytest.raises(InvalidService) as err:
        store.set_health("s", "fine")
    assert err.value.field == "health"
    with pytest.raises(NoSuchService):
        store.set_health("nothing", "passing")
    off = store.set_active("s", False)
    assert (off.active, off.health) == (False, "critical")
    assert store.get("s") == off
    assert store.set_active("s", True).active


def test_events_are_emitted_on_every_change(
    store: RegistryStore, child: subprocess.Popen[bytes]
) -> None:
    events: list[RegistryEvent] = []

    def broken(event: RegistryEvent) -> None:
        raise RuntimeError("a listener that fails must not break the registry")

    store.add_listener(broken)
    store.add_listener(events.append)
    store.register(ServiceInfo("a"), child.pid, None)
    store.register(ServiceInfo("a", version="2"), child.pid, None)
    store.set_health("a", "passing")
    store.set_health("a", "passing")  # no change, no event
    store.mark_owner_dead(child.pid)
    store.register(ServiceInfo("a"), ME, MY_START)
    store.set_active("a", False)
    store.set_active("a", True)
    store.unregister("a")
    with pytest.raises(ServiceConflict):  # a refused call emits nothing
        store.register(ServiceInfo("b"), child.pid, None)
        store.register(ServiceInfo("b"), ME, MY_START)
    assert [(e.kind, e.info.name) for e in events] == [
        ("registered", "a"),
        ("registered", "a"),
        ("health", "a"),
        ("inactive", "a"),
        ("active", "a"),
        ("inactive", "a"),
        ("active", "a"),
        ("unregistered", "a"),
        ("registered", "b"),
    ]
    assert events[1].info.version == "2"
    assert events[2].info.health == "passing"
    assert events[3].info.active is False
    store.remove_listener(events.append)
    store.remove_listener(broken)
    store.set_health("b", "warning")
    assert len(events) == 9


# -- dependencies -----------------------------------------------------------------


def test_dependencies(store: RegistryStore) -> None:
    for name in ("a", "b", "c", "d"):
        store.register(ServiceInfo(name), None, None)
    store.add_dependency("a", "b")
    store.add_dependency("a", "c")
    store.add_dependency("a", "b")  # again: no-op
    store.add_dependency("b", "c")
    assert store.get_dependencies("a") == ["b", "c"]
    assert store.get_dependencies("d") == []
    assert store.remove_dependency("a", "c") is True
    assert store.remove_dependency("a", "c") is False
    assert store.get_dependencies("a") == ["b"]
    with pytest.raises(NoSuchService):
        store.add_dependency("a", "zzz")
    with pytest.raises(NoSuchService):
        store.add_dependency("zzz", "a")
    with pytest.raises(NoSuchService):
        store.get_dependencies("zzz")
    with pytest.raises(InvalidService) as err:
        store.add_dependency("a", "bad name")
    assert err.value.field == "depends_on"
    store.unregister("c")
    assert store.get_dependencies("b") == []


def test_self_dependency_is_refused(store: RegistryStore) -> None:
    store.register(ServiceInfo("a"), None, None)
    with pytest.raises(DependencyCycle) as err:
        store.add_dependency("a", "a")
    assert err.value.cycle == ["a", "a"]
    assert store.get_dependencies("a") == []


def test_a_dependency_closing_a_cycle_is_refused_with_its_path(store: RegistryStore) -> None:
    for name in ("net/dhcp", "log", "dev", "auth", "other"):
        store.register(ServiceInfo(name), None, None)
    store.add_dependency("net/dhcp", "log")
    store.add_dependency("log", "dev")
    store.add_dependency("log", "other")
    store.add_dependency("dev", "auth")
    with pytest.raises(DependencyCycle) as err:
        store.add_dependency("auth", "net/dhcp")
    assert err.value.cycle == ["auth", "net/dhcp", "log", "dev", "auth"]
    assert "auth -> net/dhcp -> log -> dev -> auth" in str(err.value)
    assert store.get_dependencies("auth") == []
    store.add_dependency("other", "dev")  # a diamond is no cycle
    assert pickle.loads(pickle.dumps(err.value)).cycle == err.value.cycle


def test_an_owner_recorded_without_a_start_is_checked_by_its_pid_alone() -> None:
    proc = _spawn_owner()
    try:
        assert process_alive(proc.pid, None)
    finally:
        _kill_and_reap(proc)
    assert not process_alive(proc.pid, None)
    zombie = subprocess.Popen(["/bin/true"])
    try:
        wait_for_zombie = time.monotonic() + 30
        while (
            time.monotonic() < wait_for_zombie
            and os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None
        ):
            time.sleep(0.01)
        assert not process_alive(zombie.pid, None)  # a zombie is dead
    finally:
        zombie.wait()
