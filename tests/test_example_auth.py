"""The authentication service (``examples/system/auth.py``) on a real ikosd, and its logic.

The daemon runs under the real ``ikosd`` with cheap argon2 parameters (the
``argon2`` option; production keeps argon2-cffi's defaults) and short
back-off, and is asked over its mailbox as the other daemons do, and over the
broker (its served name) as a process of another user would. Back-off,
permissions and the admin rule are unit-tested on :class:`AuthService` with a
temporary database, where the caller's uid can be anything.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HANG, Instance, wait_for
from test_ipc_api import needs_users, run_as, shared_instance, stranger  # noqa: F401  (a fixture: another user)

import ikos
import ikos.ipc
import ikos.registry
from examples.system.auth import (
    MAX_PASSWORD,
    MAX_SESSIONS_PER_USER,
    MAX_TRACKED,
    AuthService,
    Backoff,
    Caller,
    FailureTable,
    MailboxPolicy,
    check,
    mailbox_is_private,
    make_hasher,
    permitted,
)
from examples.system.auth import Auth as AuthActor

CHEAP = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}

TREE = """
import ikos
from examples.system import auth

tree = ikos.Supervisor("root", max_restarts=10, within=10, children=[
    auth.child(argon2={"time_cost": 1, "memory_cost": 8, "parallelism": 1},
               lockout_after=3, lockout_base=3.0, lockout_max=10.0, session_ttl=600,
               bootstrap_admin=("admin", "pw-admin", ["auth.admin"])),
])
"""

Auth = tuple[Instance, ikos.ActorRef[Any]]


@pytest.fixture
def auth(ikosd_factory: Callable[..., Instance]) -> Auth:
    inst = ikosd_factory(tree=TREE, args=["--metrics", "off"])
    ref: ikos.ActorRef[Any] = ikos.ActorRef("auth", root=inst.root)
    wait_for(lambda: ref.ask({"op": "stats"}, timeout=5)["ok"], HANG, message="auth answering")
    return inst, ref


def ask(ref: ikos.ActorRef[Any], **request: Any) -> Any:
    return ref.ask(request, timeout=HANG)


def add(ref: ikos.ActorRef[Any], user: str, password: str, *perms: str) -> None:
    reply = ask(ref, op="add_user", user=user, password=password, permissions=list(perms))
    assert reply["ok"], reply


def test_login_validate_check_logout_and_events(auth: Auth) -> None:
    inst, ref = auth
    with ikos.ipc.subscribe("auth.#", root=inst.root) as events:
        add(ref, "alice", "correct horse", "net.*")
        login = ask(ref, op="login", user="alice", password="correct horse", peer="tty1")
        assert login["ok"] and login["permissions"] == ["net.*"], login
        token = login["token"]
        valid = ask(ref, op="validate", token=token)
        assert valid["ok"] and valid["user"] == "alice" and valid["peer"] == "tty1"
        assert ask(ref, op="check", token=token, permission="net.configure")["allowed"] is True
        denied = ask(ref, op="check", token=token, permission="auth.admin")
        assert denied["allowed"] is False and "lacks 'auth.admin'" in denied["reason"]
        # the helper other daemons use before a privileged op
        assert check(token, "net.configure", root=inst.root) == (True, "alice")
        assert check(token, "auth.admin", root=inst.root)[0] is False
        assert check("x" * 1000, "net.configure", root=inst.root) == (
            False,
            "the auth service refused the check: 'token': 1000 bytes, more than the limit of 128",
        )
        no_service = check(token, "net.configure", root=inst.root, service="nothere", timeout=2)
        assert no_service[0] is False and "unavailable" in no_service[1]
        sessions = ask(ref, op="sessions", user="alice")["sessions"]
        assert [s["session"] for s in sessions] == [login["session"]]
        assert ask(ref, op="logout", token=token) == {"ok": True, "user": "alice"}
        assert ask(ref, op="validate", token=token) == {
            "ok": False,
            "error": "invalid or expired token",
        }
        assert ask(ref, op="login", user="alice", password="wrong")["ok"] is False
        topics: list[str] = []
        seen: list[Any] = []

        def got_failure() -> bool:
            msg = events.get(timeout=1)
            topics.append(str(msg.topic))
            seen.append(msg.payload)
            return msg.topic == "auth.failure"

        wait_for(got_failure, HANG, interval=0, message="auth.failure")
    assert topics == ["auth.user", "auth.login", "auth.logout", "auth.failure"]
    # no secret travels in an event: not the password, not the token
    assert "correct horse" not in repr(seen) and token not in repr(seen)
    users = {u["user"]: u["permissions"] for u in ask(ref, op="users")["users"]}
    assert users == {"admin": ["auth.admin"], "alice": ["net.*"]}  # the bootstrap admin too
    service = ikos.registry.lookup("auth", root=inst.root)
    assert service.active and "check" in service.capabilities


def test_an_expired_token_is_refused(auth: Auth) -> None:
    _, ref = auth
    add(ref, "bob", "pw-bob")
    token = ask(ref, op="login", user="bob", password="pw-bob", ttl=0.5)["token"]
    wait_for(
        lambda: ask(ref, op="validate", token=token)["ok"] is False,
        HANG,
        message="the token to expire",
    )
    assert ask(ref, op="check", token=token, permission="x")["allowed"] is False
    too_long = ask(ref, op="login", user="bob", password="pw-bob", ttl=10**9)
    assert too_long["ok"] is False and "'ttl'" in too_long["error"]


def test_lockout_after_repeated_failures_then_unlock(auth: Auth) -> None:
    _, ref = auth
    add(ref, "carol", "pw-carol")
    for _ in range(2):
        assert ask(ref, op="login", user="carol", password="nope", peer="p1")["ok"] is False
    third = ask(ref, op="login", user="carol", password="nope", peer="p2")
    assert third["retry_after"] == 3.0  # the 3rd failure of user:carol locks it
    # locked: even the right password is refused, from any peer, without verifying
    locked = ask(ref, op="login", user="carol", password="pw-carol", peer="p3")
    assert locked["ok"] is False and "too many failed logins" in locked["error"]
    assert 0 < locked["retry_after"] <= 3.0
    assert ask(ref, op="stats")["lockouts"] >= 1
    # after the back-off the right password works again, and the count starts over
    wait_for(
        lambda: ask(ref, op="login", user="carol", password="pw-carol", peer="p3")["ok"],
        HANG,
        interval=0.2,
        message="carol's lock to end",
    )


def test_unknown_users_and_bad_input_are_answered_clearly(auth: Auth) -> None:
    inst, ref = auth
    pid = inst.pid_of("auth")
    before = ask(ref, op="stats")["dummy_verifications"]
    reply = ask(ref, op="login", user="nobody", password="whatever")
    # the same answer as a wrong password, after verifying against the dummy hash
    assert reply == {"ok": False, "error": "wrong user or password"}
    assert ask(ref, op="stats")["dummy_verifications"] == before + 1
    for request, fragment in [
        ({"op": "login", "user": "u", "password": "x" * (MAX_PASSWORD + 1)}, "'password': 1025"),
        ({"op": "login", "user": "u" * 10_000, "password": "x"}, "'user': 10000 bytes"),
        ({"op": "login", "user": "Bad Name", "password": "x"}, "'user': expected a name"),
        ({"op": "login", "user": "u"}, "'password': expected a string"),
        ({"op": "validate", "token": "t" * 1000}, "'token': 1000 bytes"),
        ({"op": "check", "token": "t"}, "'permission'"),
        ({"op": "explode"}, "unknown op 'explode'"),
        ({"op": "login", **{f"k{i}": i for i in range(20)}}, "at most 8 keys"),
        ({"op": "add_user", "user": "d", "password": "x", "permissions": ["A B"]}, "permission"),
    ]:
        reply = ref.ask(request, timeout=HANG)
        assert reply["ok"] is False and fragment in reply["error"], (request, reply)
    assert ref.ask("hello", timeout=HANG)["error"].startswith("expected a request object")
    assert ask(ref, op="delete_user", user="ghost")["error"] == "no user 'ghost'"
    assert inst.pid_of("auth") == pid  # nothing crashed


def test_memory_stays_bounded_under_bad_requests(auth: Auth) -> None:
    inst, ref = auth
    pid = inst.pid_of("auth")
    assert pid is not None
    proc = psutil.Process(pid)

    def flood(start: int, n: int) -> None:
        for i in range(start, start + n):
            # a new user from a new peer each time: each one verified, each one tracked
            login = {"op": "login", "user": f"ghost{i}", "password": "x", "peer": f"p{i}"}
            ref.ask(login, timeout=HANG)
            ref.ask({"op": "validate", "token": f"bogus{i}"}, timeout=HANG)
            ref.ask({"op": "nope", "junk": "y" * 1000}, timeout=HANG)

    flood(0, 300)  # warm up: allocator pools, SQLite's page cache
    rss = proc.memory_info().rss
    flood(300, 1000)
    grown = proc.memory_info().rss - rss
    assert grown < 8 * 1024 * 1024, f"auth grew by {grown} bytes under 1,000 bad requests"
    stats = ask(ref, op="stats")
    assert stats["dummy_verifications"] == 1300 and stats["tracked_failures"] == 2600 <= MAX_TRACKED
    assert inst.pid_of("auth") == pid


SLOW_TREE = """
import ikos
from examples.system import auth

tree = ikos.Supervisor("root", children=[
    auth.child(argon2={"time_cost": 10, "memory_cost": 65536, "parallelism": 1}),
])
"""


def test_validations_are_answered_while_logins_hash(
    ikosd_factory: Callable[..., Instance],
) -> None:
    # argon2 at about half a second a hash here: four logins keep both hashing
    # threads busy for a second or more, during which other requests are answered
    inst = ikosd_factory(tree=SLOW_TREE, args=["--metrics", "off"])
    ref: ikos.ActorRef[Any] = ikos.ActorRef("auth", root=inst.root)
    wait_for(lambda: ref.ask({"op": "stats"}, timeout=5)["ok"], HANG, message="auth answering")
    add(ref, "gina", "pw-gina")
    token = ask(ref, op="login", user="gina", password="pw-gina")["token"]
    logins = [
        ref.ask_future({"op": "login", "user": "gina", "password": "pw-gina"}, timeout=HANG)
        for _ in range(4)
    ]
    # stats (a light op, as validate) sees a login hashing: it was answered meanwhile
    wait_for(lambda: ask(ref, op="stats")["hashing"] >= 1, HANG, message="a login hashing")
    assert ask(ref, op="validate", token=token)["ok"]
    assert all(f.result()["ok"] for f in logins)


def test_users_and_sessions_survive_kill_9(auth: Auth) -> None:
    inst, ref = auth
    add(ref, "dave", "pw-dave", "net.configure")
    token = ask(ref, op="login", user="dave", password="pw-dave")["token"]
    db = inst.root / "var/lib/ikos/auth/auth.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    old = inst.pid_of("auth")
    assert old is not None
    os.kill(old, 9)
    inst.wait_running_new_pid("auth", old)
    wait_for(lambda: ask(ref, op="validate", token=token)["ok"], HANG, message="the session back")
    assert ask(ref, op="check", token=token, permission="net.configure")["allowed"] is True
    assert ask(ref, op="login", user="dave", password="pw-dave")["ok"]
    # and the new incarnation serves the name on the broker again
    with ikos.ipc.connect("auth.api", timeout=HANG, root=inst.root) as conn:
        reply = wait_for(
            lambda: conn.request({"op": "validate", "token": token}).payload,
            HANG,
            message="auth served again",
        )
    assert reply["user"] == "dave"
    assert "auth.api" in ikos.ipc.stats(root=inst.root)["served"]


def test_the_broker_path_knows_the_caller(auth: Auth) -> None:
    inst, ref = auth
    add(ref, "erin", "pw-erin", "net.configure")
    # the daemon serves auth.api on the broker, where the kernel gives it the caller's uid
    wait_for(lambda: "auth.api" in ikos.ipc.stats(root=inst.root)["served"], HANG, message="served")
    with ikos.ipc.connect("auth.api", timeout=HANG, root=inst.root) as conn:
        assert not conn.direct
        login = conn.request({"op": "login", "user": "erin", "password": "pw-erin"}).payload
        assert login["ok"], login
        check = conn.request(
            {"op": "check", "token": login["token"], "permission": "net.configure"}
        ).payload
        assert check == {"ok": True, "allowed": True, "user": "erin"}
        # this process is the instance's owner: admin ops are allowed here too
        assert conn.request({"op": "users"}).payload["ok"] is True


STRANGER = """
import json, ikos.ipc
out = {}
for name in ("auth.api", "auth2"):  # served by a daemon; an actor's mailbox
    with ikos.ipc.connect(name, timeout=30) as auth:
        login = auth.request({"op": "login", "user": "ivan", "password": "pw-ivan",
                              "peer": "spoofed"}).payload
        out[name] = {
            "login": login,
            "session": auth.request({"op": "validate", "token": login["token"]}).payload,
            "add_user": auth.request({"op": "add_user", "user": "evil", "password": "x"}).payload,
        }
print(json.dumps(out))
"""

TWO_TREE = """
import ikos
from examples.system import auth

CHEAP = {{"time_cost": 1, "memory_cost": 8, "parallelism": 1}}
tree = ikos.Supervisor("root", children=[
    auth.child(argon2=CHEAP),
    auth.child("auth2", serve=False, argon2=CHEAP, db_path={db!r},
               bootstrap_admin=("boss", "pw-boss", ["auth.admin"])),
])
"""


@needs_users
def test_another_user_is_never_an_administrator(
    ikosd_factory: Callable[..., Instance],
    stranger: pwd.struct_passwd,  # noqa: F811 (the fixture imported above)
) -> None:
    # Through the served name ('auth.api') the kernel vouches for the stranger's uid;
    # through a mailbox ('auth2', where the broker forwards the calls the policy
    # allows) the caller is anonymous, and since the policy grants others 'call' on
    # it, that mailbox is not taken for the owner's: neither way is the stranger an
    # administrator. 'auth', whose name the policy does not grant, keeps its mailbox
    # for the owner.
    base = Path(tempfile.mkdtemp(prefix="ikos-auth-users-"))
    try:
        config = f"""
            [[ipc.allow]]
            users = ["{stranger.pw_name}"]
            call = ["auth.api", "auth2"]
            """
        tree = TWO_TREE.format(db=str(base / "auth2.db"))
        inst = shared_instance(base, ikosd_factory, tree, config)
        wait_for(lambda: "auth.api" in ikos.ipc.stats(root=inst.root)["served"], HANG)
        ivan = {"op": "add_user", "user": "ivan", "password": "pw-ivan"}
        auth: ikos.ActorRef[Any] = ikos.ActorRef("auth", root=inst.root)
        auth2: ikos.ActorRef[Any] = ikos.ActorRef("auth2", root=inst.root)
        assert auth.ask(ivan, timeout=HANG)["ok"]  # the owner, by the private mailbox
        refused = auth2.ask(ivan, timeout=HANG)
        assert "needs an administrator" in refused["error"], refused
        assert "grants others 'call' on this daemon's name" in refused["error"]
        boss = auth2.ask({"op": "login", "user": "boss", "password": "pw-boss"}, timeout=HANG)
        assert auth2.ask({**ivan, "admin_token": boss["token"]}, timeout=HANG)["ok"]

        out = run_as(stranger, STRANGER, inst.root)
        for name, peer in [("auth.api", f"uid:{stranger.pw_uid}"), ("auth2", "mailbox")]:
            assert out[name]["login"]["ok"], out
            assert out[name]["session"]["peer"] == peer  # not the one it claimed
            assert "needs an administrator" in out[name]["add_user"]["error"]
        assert [u["user"] for u in auth.ask({"op": "users"}, timeout=HANG)["users"]] == ["ivan"]
        users = auth2.ask({"op": "users", "admin_token": boss["token"]}, timeout=HANG)["users"]
        assert [u["user"] for u in users] == ["boss", "ivan"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_mailbox_is_private_unless_the_policy_grants_call(tmp_path: Path) -> None:
    policy = tmp_path / "broker.json"
    assert mailbox_is_private("auth", policy)  # no broker, no forwarding
    policy.write_text(json.dumps({"policy": [{"uids": [5], "call": ["echo", "app.*"]}]}))
    assert mailbox_is_private("auth", policy)
    policy.write_text(json.dumps({"policy": [{"uids": [5], "call": ["#"]}]}))
    assert not mailbox_is_private("auth", policy)
    policy.write_text("{not json")
    assert not mailbox_is_private("auth", policy)  # fail closed
    policy.write_text(json.dumps({"policy": [{"gids": [7], "call": ["auth"]}]}))
    watched = MailboxPolicy("auth", policy)
    assert watched.private() is False
    policy.unlink()
    policy.write_text(json.dumps({"policy": []}))  # a reload: a new file
    assert watched.private() is True


# -- the logic, without a daemon ------------------------------------------------


def test_backoff_doubles_and_is_bounded() -> None:
    b = Backoff(threshold=3, base=1.0, cap=10.0)
    assert [b.delay(n) for n in range(1, 9)] == [0, 0, 1, 2, 4, 8, 10, 10]
    assert b.delay(10**6) == 10.0


def test_failure_table_is_bounded_and_clears() -> None:
    table = FailureTable(Backoff(threshold=2, base=5.0, cap=60.0), limit=100)
    assert table.fail("user:a", 0.0) == 0.0
    assert table.fail("user:a", 1.0) == 5.0
    assert table.locked_for("user:a", 2.0) == 4.0
    assert table.locked_for("user:a", 6.0) == 0.0
    table.clear("user:a")
    assert table.locked_for("user:a", 1.0) == 0.0
    for i in range(1000):
        table.fail(f"user:{i}", 0.0)
    assert len(table) == 100


def test_permitted() -> None:
    assert permitted(["net.configure"], "net.configure")
    assert permitted(["net.*"], "net.link.set")
    assert permitted(["*"], "anything")
    assert not permitted(["net.*"], "netx.configure")
    assert not permitted([], "net.configure")


@pytest.fixture
def service(tmp_path: Path) -> tuple[AuthService, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    svc = AuthService(
        tmp_path / "auth.db",
        make_hasher(CHEAP),
        Backoff(3, 1.0, 4.0),
        600.0,
        frozenset({0, 4242}),
        lambda topic, data: events.append((topic, data)),
    )
    return svc, events


def test_admin_ops_need_an_admin(
    service: tuple[AuthService, list[tuple[str, dict[str, Any]]]],
) -> None:
    svc, _ = service
    outsider = Caller("broker", uid=1234)
    req = {"op": "add_user", "user": "x", "password": "y"}
    refused = svc.handle(req, outsider)
    assert refused["ok"] is False and "needs an administrator" in refused["error"]
    assert svc.handle(req, Caller("broker", uid=4242))["ok"]  # an owner uid
    admin = {"op": "add_user", "user": "root_", "password": "r", "permissions": ["auth.admin"]}
    assert svc.handle(admin, Caller("mailbox"))["ok"]
    token = svc.handle({"op": "login", "user": "root_", "password": "r"}, outsider)["token"]
    delete = {"op": "delete_user", "user": "x", "admin_token": token}
    assert svc.handle(delete, outsider) == {"ok": True, "user": "x"}
    # a outsider names no peer of its choosing: it is its own uid
    svc.handle({"op": "login", "user": "zz", "password": "n", "peer": "spoof"}, outsider)
    assert svc.failures.locked_for("peer:uid:1234", 0) == 0.0  # counted there, not locked yet
    assert "peer:spoof" not in svc.failures._keys


def test_per_peer_lockout_spans_users(
    service: tuple[AuthService, list[tuple[str, dict[str, Any]]]],
) -> None:
    svc, events = service
    me = Caller("mailbox")
    for user in ("u1", "u2", "u3"):  # three different (unknown) users, one peer
        svc.handle({"op": "login", "user": user, "password": "x", "peer": "10.0.0.9"}, me)
    reply = svc.handle({"op": "login", "user": "u4", "password": "x", "peer": "10.0.0.9"}, me)
    assert "too many failed logins" in reply["error"]
    assert ("auth.lockout", {"key": "peer:10.0.0.9", "seconds": 1.0}) in events
    other = svc.handle({"op": "login", "user": "u4", "password": "x", "peer": "10.0.0.10"}, me)
    assert other["error"] == "wrong user or password"  # another peer is not locked
    assert svc.counters["dummy_verifications"] == 4


def test_user_changes(service: tuple[AuthService, list[tuple[str, dict[str, Any]]]]) -> None:
    svc, events = service
    me = Caller("mailbox")
    assert svc.handle({"op": "add_user", "user": "f", "password": "one"}, me)["ok"]
    assert svc.handle({"op": "add_user", "user": "f", "password": "two"}, me) == {
        "ok": False,
        "error": "user 'f' exists",
    }
    token = svc.handle({"op": "login", "user": "f", "password": "one"}, me)["token"]
    perms = {"op": "set_permissions", "user": "f", "permissions": ["net.*", "net.*"]}
    assert svc.handle(perms, me) == {"ok": True, "user": "f", "permissions": ["net.*"]}
    assert svc.handle({"op": "check", "token": token, "permission": "net.up"}, me)["allowed"]
    # a new password ends the old sessions and the old password
    assert svc.handle({"op": "set_password", "user": "f", "password": "two"}, me)["ok"]
    assert svc.handle({"op": "validate", "token": token}, me)["ok"] is False
    assert svc.handle({"op": "login", "user": "f", "password": "one"}, me)["ok"] is False
    assert svc.handle({"op": "login", "user": "f", "password": "two"}, me)["ok"]
    assert svc.handle({"op": "set_password", "user": "g", "password": "x"}, me) == {
        "ok": False,
        "error": "no user 'g'",
    }
    assert [e[1]["action"] for e in events if e[0] == "auth.user"] == [
        "add",
        "set_permissions",
        "set_password",
    ]


def test_sessions_per_user_are_bounded(
    service: tuple[AuthService, list[tuple[str, dict[str, Any]]]],
) -> None:
    svc, _ = service
    me = Caller("mailbox")
    assert svc.handle({"op": "add_user", "user": "h", "password": "pw"}, me)["ok"]
    tokens = [
        svc.handle({"op": "login", "user": "h", "password": "pw"}, me)["token"]
        for _ in range(MAX_SESSIONS_PER_USER + 3)
    ]
    assert len(svc.handle({"op": "sessions", "user": "h"}, me)["sessions"]) == 64
    assert svc.handle({"op": "validate", "token": tokens[0]}, me)["ok"] is False  # the oldest
    assert svc.handle({"op": "validate", "token": tokens[-1]}, me)["ok"] is True


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="auth option hash_threads=0: expected a number >= 1"):
        AuthActor(hash_threads=0)
    with pytest.raises(ValueError, match="auth option argon2: memory_kib=8"):
        make_hasher({"memory_kib": 8})
