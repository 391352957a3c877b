"""Hot code upgrade (``ikosctl upgrade``, ``ikos.upgrade``) on a real ikosd.

The actor's module is a file next to the tree that each test rewrites: the
answers must then come from the new code, the state must survive through
``get_state``/``set_state``, no message may be lost or reordered under a
steady stream of asks and tells, and a new code that fails to start (a
syntax error, ``on_start`` or ``set_state`` raising) must leave the old
incarnation serving. Waits are polls with generous bounds, never sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HANG,
    REPO,
    Instance,
    marked_pids,
    start_ikosd,
    stop_and_check,
    wait_for,
)

import ikos

TREE = """
import ikos


def local_class():
    class Local(ikos.Actor):
        def receive(self, msg):
            return msg

    return Local


tree = ikos.Supervisor(
    "root",
    children=[
        ikos.Child("counter", "upmod:Counter"),
        ikos.Child("plain", "upmod:Plain"),
        ikos.Exec("sleeper", "/bin/sleep", args=["1000"]),
        ikos.Child("asyncy", "upmod:Asyncy"),
        ikos.Child("local", local_class()),
    ],
)
"""

#: The actor's module; VERSION, EXTRA (class body) and TOP (module level) vary per test.
MODULE = """
import os
import ikos

{top}


class Counter(ikos.Actor):
    version = {version}

    def __init__(self):
        self.count = 0
        self.seen = {{}}

    def receive(self, msg):
        if isinstance(msg, memoryview):  # a large payload, mapped from its memfd
            return ("v{version}", bytes(msg[:3]), len(msg))
        kind = msg[0]
        if kind == "incr":
            self.count += 1
            return ("v{version}", self.count)
        if kind == "seq":  # (seq, client, n): record n in the client's sequence
            self.seen.setdefault(msg[1], []).append(msg[2])
            return msg[2]
        if kind == "seen":
            return self.seen
        if kind == "fds":
            return len(os.listdir("/proc/self/fd"))
        return ("v{version}", msg)

    def get_state(self):
        return {{"count": self.count, "seen": self.seen}}

    def set_state(self, state):
        self.count = state["count"]
        self.seen = state["seen"]

{extra}


class Plain(ikos.Actor):
    def __init__(self):
        self.count = 0

    def receive(self, msg):
        self.count += 1
        return ("plain{version}", self.count)


class Asyncy(ikos.Actor):
    async def ping(self):
        return "pong"

    def receive(self, msg):
        return msg
"""


def write_module(base: Path, version: int, extra: str = "", top: str = "") -> None:
    extra = textwrap.indent(textwrap.dedent(extra), "    ")
    (base / "upmod.py").write_text(MODULE.format(version=version, extra=extra, top=top))


@pytest.fixture
def system(tmp_path: Path) -> Any:
    """An ikosd running TREE with version 1 of the actor's module, and its directory."""
    base = tmp_path / "up"
    base.mkdir()
    write_module(base, 1)
    (base / "uptree.py").write_text(textwrap.dedent(TREE))
    inst = start(base)
    instances = [inst]
    try:
        inst.wait_ready()
        yield inst, base, instances
    finally:
        stop_and_check(instances)


def start(base: Path) -> Instance:
    """ikosd on TREE, the actor's module found on PYTHONPATH."""
    env = {"PYTHONPATH": f"{base}{os.pathsep}{REPO}"}
    return start_ikosd(base, ["--tree", f"{base / 'uptree.py'}:tree"], env)


def upgrade(inst: Instance, name: str = "counter") -> Any:
    return inst.ctl("--json", "upgrade", name, timeout=HANG * 4)


def ref(inst: Instance, name: str = "counter") -> ikos.ActorRef:
    return ikos.ActorRef(name, root=inst.root)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def test_the_new_code_answers_and_the_state_survives(system: Any) -> None:
    inst, base, _ = system
    counter = ref(inst)
    assert [counter.ask(("incr",)) for _ in range(3)] == [("v1", 1), ("v1", 2), ("v1", 3)]
    before = inst.status("counter")
    write_module(base, 2)
    res = upgrade(inst)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["old_pid"] == before["pid"] and report["pid"] != before["pid"]
    assert report["state"] == "handed over"
    # the same connection, now served by the new process
    assert counter.ask(("incr",)) == ("v2", 4)
    after = inst.status("counter")
    assert after["pid"] == report["pid"] and after["state"] == "running"
    assert after["restarts"] == before["restarts"]
    wait_for(lambda: gone(before["pid"]), HANG, message="the old incarnation to be reaped")
    # text output for people
    write_module(base, 3)
    res = inst.ctl("upgrade", "counter", timeout=HANG * 4)
    assert res.returncode == 0, res.stderr
    assert f"pid {report['pid']} -> " in res.stdout and "state handed over" in res.stdout
    assert counter.ask(("incr",)) == ("v3", 5)
    assert "upgraded" in inst.log_text()


def test_an_actor_without_get_state_starts_fresh_and_the_api_says_so(system: Any) -> None:
    inst, base, _ = system
    plain = ref(inst, "plain")
    assert plain.ask("x") == ("plain1", 1) and plain.ask("x") == ("plain1", 2)
    write_module(base, 2)
    report = ikos.upgrade("plain", root=inst.root)
    assert report["state"] == "fresh" and report["pid"] != report["old_pid"]
    assert plain.ask("x") == ("plain2", 1)


def test_no_message_is_lost_or_reordered_under_a_stream_of_asks_and_tells(system: Any) -> None:
    inst, base, _ = system
    stop = threading.Event()
    sent: dict[str, int] = {}
    errors: list[BaseException] = []

    def client(cid: str, tell: bool) -> None:
        r = ref(inst)  # one connection per thread
        n = 0
        try:
            while not stop.is_set() or n < 50:
                if tell:
                    r.tell(("seq", cid, n))
                else:
                    assert r.ask(("seq", cid, n), timeout=HANG) == n
                n += 1
        except BaseException as exc:
            errors.append(exc)
        sent[cid] = n

    threads = [
        threading.Thread(target=client, args=(f"{kind}{i}", kind == "tell"))
        for i in range(3)
        for kind in ("ask", "tell")
    ]
    for t in threads:
        t.start()
    try:
        for version in (2, 3, 4):
            write_module(base, version)
            res = upgrade(inst)
            assert res.returncode == 0, res.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(HANG)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    assert not errors, errors
    counter = ref(inst)

    def complete() -> Any:
        seen = counter.ask(("seen",))
        return seen if all(len(seen.get(c, [])) == n for c, n in sent.items()) else None

    seen = wait_for(complete, HANG, message="every message to be handled")
    for cid, n in sent.items():
        assert seen[cid] == list(range(n)), cid
    assert counter.ask(("incr",)) == ("v4", 1)


@pytest.mark.parametrize(
    ("extra", "top", "cause"),
    [
        ("", "def broken(:", "SyntaxError"),
        (
            """
            def set_state(self, state):
                raise ValueError("cannot take this state")
            """,
            "",
            "set_state raised ValueError: cannot take this state",
        ),
        (
            """
            def on_start(self):
                raise RuntimeError("no database")
            """,
            "",
            "on_start raised RuntimeError: no database",
        ),
    ],
    ids=["syntax-error", "set_state-raises", "on_start-raises"],
)
def test_a_failed_upgrade_leaves_the_old_code_serving(
    system: Any, extra: str, top: str, cause: str
) -> None:
    inst, base, _ = system
    counter = ref(inst)
    assert counter.ask(("incr",)) == ("v1", 1)
    before = inst.status("counter")
    processes = set(marked_pids(inst.mark))
    stop = threading.Event()
    answers: list[Any] = []

    def stream() -> None:
        r = ref(inst)
        n = 0
        while not stop.is_set() or n < 20:
            answers.append(r.ask(("seq", "s", n), timeout=HANG))
            n += 1

    t = threading.Thread(target=stream)
    t.start()
    try:
        write_module(base, 2, extra, top)
        res = upgrade(inst)
    finally:
        stop.set()
        t.join(HANG)
    assert not t.is_alive(), "the client is stuck"
    assert res.returncode == 1, res.stdout
    line = res.stderr.strip()
    assert "\n" not in line
    assert line.startswith("ikosctl: actor 'counter' was not upgraded: "), line
    assert cause in line and f"pid {before['pid']} serves on" in line
    assert answers == list(range(len(answers)))
    assert counter.ask(("seen",))["s"] == answers
    assert counter.ask(("incr",)) == ("v1", 2)
    after = inst.status("counter")
    assert (after["pid"], after["restarts"], after["state"]) == (before["pid"], 0, "running")
    with pytest.raises(ikos.UpgradeFailed) as caught:
        ikos.upgrade("counter", root=inst.root)
    assert caught.value.name == "counter" and cause in caught.value.reason
    assert "Traceback" in caught.value.traceback or cause.startswith("SyntaxError")
    assert counter.ask(("incr",)) == ("v1", 3)
    # the new processes are gone (ikosd's own and its daemons' are the same as before)
    wait_for(lambda: set(marked_pids(inst.mark)) == processes, HANG, message="no new process")


def test_a_state_that_cannot_be_pickled_leaves_the_old_code_serving(system: Any) -> None:
    inst, base, _ = system
    counter = ref(inst)
    unpicklable = """
        def get_state(self):
            # a generator cannot be pickled, by pickle or by dill
            return {"count": self.count, "gen": (i for i in ())} if self.count else {}

        def set_state(self, state):
            self.count = state.get("count", 0)
            self.seen = {}
        """
    write_module(base, 1, unpicklable)
    assert upgrade(inst).returncode == 0  # nothing counted yet: a state that pickles
    assert counter.ask(("incr",)) == ("v1", 1)
    pid = inst.pid_of("counter")
    write_module(base, 2)
    res = upgrade(inst)
    assert res.returncode == 1, res.stdout
    assert "the value of get_state cannot be pickled: TypeError" in res.stderr, res.stderr
    assert f"pid {pid} serves on" in res.stderr
    assert counter.ask(("incr",)) == ("v1", 2)
    assert inst.pid_of("counter") == pid


def test_refusals_name_what_cannot_be_upgraded(system: Any) -> None:
    inst, _, _ = system
    for name, why, code in (
        ("nosuch", "no daemon, actor or supervisor named 'nosuch'", 4),
        ("sleeper", "'sleeper' is an executable: only actors can be upgraded", 1),
        ("root", "'root' is a supervisor: only actors can be upgraded", 1),
    ):
        res = inst.ctl("upgrade", name)
        assert res.returncode == code, (name, res.stderr)
        assert why in res.stderr and res.stderr.count("\n") == 1, res.stderr
    res = inst.ctl("upgrade", "asyncy")
    assert res.returncode == 1 and "it is an async actor" in res.stderr, res.stderr
    res = inst.ctl("upgrade", "local")
    assert res.returncode == 1, res.stderr
    assert "cannot be imported by its path" in res.stderr and "<locals>" in res.stderr
    inst.ctl("stop", "plain", check=True)
    res = inst.ctl("upgrade", "plain")
    assert res.returncode == 1 and "actor 'plain' is not running (stopped)" in res.stderr


def test_the_new_incarnation_leaks_no_descriptor_and_the_old_one_is_gone(system: Any) -> None:
    inst, base, _ = system
    counter = ref(inst)
    counter.ask(("incr",))
    first = inst.pid_of("counter")
    assert first is not None
    baseline = fd_count(first)
    pids = [first]
    for version in (2, 3):
        write_module(base, version)
        res = upgrade(inst)
        assert res.returncode == 0, res.stderr
        pids.append(json.loads(res.stdout)["pid"])
    assert fd_count(pids[-1]) == baseline
    for pid in pids[:-1]:
        wait_for(lambda pid=pid: gone(pid), HANG, message=f"pid {pid} to be reaped")


def test_a_crash_after_an_upgrade_restarts_the_new_code(system: Any) -> None:
    inst, base, _ = system
    write_module(base, 2)
    res = upgrade(inst)
    assert res.returncode == 0, res.stderr
    pid = json.loads(res.stdout)["pid"]
    os.kill(pid, signal.SIGKILL)
    inst.wait_running_new_pid("counter", pid)
    assert ref(inst).ask(("incr",)) == ("v2", 1)  # not the fork server's preloaded v1
    assert inst.status("counter")["restarts"] == 1


def test_kill_9_of_ikosd_after_an_upgrade_adopts_the_new_incarnation(system: Any) -> None:
    inst, base, instances = system
    counter = ref(inst)
    counter.ask(("incr",))
    write_module(base, 2)
    res = upgrade(inst)
    assert res.returncode == 0, res.stderr
    pid = json.loads(res.stdout)["pid"]
    inst.crash()
    again = start(base)
    instances.append(again)
    again.wait_ready()
    assert again.pid_of("counter") == pid
    assert counter.ask(("incr",)) == ("v2", 2)
    assert f"adopting pid {pid}" in again.log_text()


def test_half_a_frame_and_half_a_handshake_are_handed_over(system: Any) -> None:
    """Bytes the old incarnation read but could not frame yet (with the memfd that
    came with the first of them), and a handshake it began, are finished with the
    new one. Whether the old one had read those bytes or left them in the kernel
    buffer, nothing may be lost."""
    import secrets
    import socket

    from ikos._codec import encode
    from ikos.actors._ref import ASK, REPLY_OK, encode_shm
    from ikos.platform._memfd import send_with_fds
    from ikos.platform._wire import HEADER, MAC, MAGIC, NONCE, _mac, client_handshake

    inst, base, _ = system
    secret = (inst.root / "var/lib/ikos/secret").read_bytes()
    path = str(inst.root / "run/ikos/actors/counter.sock")

    def read_frame(sock: socket.socket) -> Any:
        from ikos._codec import decode

        head = sock.recv(4, socket.MSG_WAITALL)
        (n,) = HEADER.unpack(head)
        return decode(sock.recv(n, socket.MSG_WAITALL))

    ask = HEADER.pack(len(p := encode((ASK, 7, ("incr",))))) + p
    halfway = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    halfway.connect(path)
    client_handshake(halfway, secret, HANG)
    halfway.settimeout(HANG)
    halfway.sendall(ask[:6])  # the length and two bytes of the payload
    big = b"abc" * 200_000  # above the shared-memory threshold
    body, seg, _ = encode_shm(ASK, 8, big)
    mapped = HEADER.pack(len(body)) + body
    withfd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    withfd.connect(path)
    client_handshake(withfd, secret, HANG)
    withfd.settimeout(HANG)
    assert send_with_fds(withfd, mapped[:6], [seg]) == 6  # the descriptor rides on byte 1
    os.close(seg)
    shaking = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    shaking.connect(path)
    shaking.settimeout(HANG)
    nonce_c = secrets.token_bytes(NONCE)
    shaking.sendall(MAGIC + nonce_c)
    answer = shaking.recv(NONCE + HEADER.size + MAC, socket.MSG_WAITALL)
    nonce_s = answer[:NONCE]
    # the old incarnation answered the hello: both are in its hands now
    assert ref(inst).ask(("incr",)) == ("v1", 1)
    write_module(base, 2)
    res = upgrade(inst)
    assert res.returncode == 0, res.stderr
    halfway.sendall(ask[6:])
    assert read_frame(halfway) == (REPLY_OK, 7, ("v2", 2))
    shaking.sendall(_mac(secret, b"client", nonce_s, nonce_c) + ask)
    assert read_frame(shaking) == (REPLY_OK, 7, ("v2", 3))
    withfd.sendall(mapped[6:])
    assert read_frame(withfd) == (REPLY_OK, 8, ("v2", b"abc", len(big)))
    for sock in (halfway, shaking, withfd):
        sock.close()


def test_code_change_converts_the_old_state_with_the_old_version(system: Any) -> None:
    inst, base, _ = system
    counter = ref(inst)
    assert counter.ask(("incr",)) == ("v1", 1)
    write_module(
        base,
        2,
        """
        def code_change(self, old_version, state):
            assert old_version == 1, old_version
            return {"count": state["count"] * 100, "seen": {"from": [old_version]}}
        """,
    )
    res = upgrade(inst)
    assert res.returncode == 0, res.stderr
    assert counter.ask(("incr",)) == ("v2", 101)
    assert counter.ask(("seen",)) == {"from": [1]}


def test_hundreds_of_connections_cross_in_batches(system: Any) -> None:
    """More connections than one SCM_RIGHTS message carries (253 descriptors)."""
    import socket

    from ikos._codec import decode, encode
    from ikos.actors._ref import ASK, REPLY_OK
    from ikos.platform._wire import HEADER, client_handshake

    inst, base, _ = system
    secret = (inst.root / "var/lib/ikos/secret").read_bytes()
    path = str(inst.root / "run/ikos/actors/counter.sock")
    conns = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conns.append(sock)
            sock.connect(path)
            client_handshake(sock, secret, HANG)
            sock.settimeout(HANG)
        assert ref(inst).ask(("incr",)) == ("v1", 1)  # every handshake answered by now
        write_module(base, 2)
        res = upgrade(inst)
        assert res.returncode == 0, res.stderr
        for i, sock in enumerate(conns):
            payload = encode((ASK, i, ("echo", i)))
            sock.sendall(HEADER.pack(len(payload)) + payload)
            (n,) = HEADER.unpack(sock.recv(4, socket.MSG_WAITALL))
            assert decode(sock.recv(n, socket.MSG_WAITALL)) == (REPLY_OK, i, ("v2", ("echo", i)))
    finally:
        for sock in conns:
            sock.close()


def test_a_declared_service_stays_active_and_follows_the_new_pid(tmp_path: Path) -> None:
    base = tmp_path / "svc"
    base.mkdir()
    write_module(base, 1)
    (base / "ikos.toml").write_text(
        textwrap.dedent(
            """
            [actors.counter]
            class = "upmod:Counter"

            [actors.counter.service]
            name = "counting"
            """
        )
    )
    env = {"PYTHONPATH": f"{base}{os.pathsep}{REPO}"}
    inst = start_ikosd(base, ["-c", str(base / "ikos.toml")], env)
    try:
        inst.wait_ready()

        def service() -> Any:
            res = inst.ctl("--json", "discover", "counting")
            return json.loads(res.stdout)[0] if res.returncode == 0 else None

        first = wait_for(lambda: (s := service()) and s["active"] and s, HANG, message="active")
        write_module(base, 2)
        res = upgrade(inst)
        assert res.returncode == 0, res.stderr
        new_pid = json.loads(res.stdout)["pid"]
        assert first["pid"] != new_pid
        svc = wait_for(lambda: (s := service()) and s["pid"] == new_pid and s, HANG, message="pid")
        assert svc["active"] and svc["owner"] == "counter"
    finally:
        stop_and_check([inst])


WATCHER = """
class Watcher(ikos.Actor):
    def on_start(self):
        self.downs = []
        self.monitor("plain")  # the successor's on_start sets it too, before taking over

    def receive(self, msg):
        if isinstance(msg, ikos.Down):
            self.downs.append([msg.name, msg.reason])
        elif msg == "watch napper":
            self.monitor("napper")  # set by a handler: only the handed-over state knows it
        else:
            return ["{tag}", self.downs]

    def get_state(self):
        return self.downs

    def set_state(self, state):
        self.downs = state
"""


def test_a_watchers_monitors_go_on_in_its_new_incarnation(tmp_path: Path) -> None:
    # The Downs are addressed to the watcher's pid: after an upgrade they must reach
    # the new process, for the monitors of the old one and those of the new on_start
    # (which runs, and calls `monitor`, while the old one still serves).
    base = tmp_path / "up"
    base.mkdir()
    write_module(base, 1, top=WATCHER.replace("{tag}", "w1"))
    (base / "wtree.py").write_text(
        textwrap.dedent(
            """
            import ikos

            tree = ikos.Supervisor("root", max_restarts=100, within=1, children=[
                ikos.Child("plain", "upmod:Plain"),
                ikos.Exec("napper", "/bin/sleep", args=["1000"]),
                ikos.Child("watcher", "upmod:Watcher"),
            ])
            """
        )
    )
    env = {"PYTHONPATH": f"{base}{os.pathsep}{REPO}"}
    inst = start_ikosd(base, ["--tree", f"{base / 'wtree.py'}:tree"], env)
    try:
        inst.wait_ready()
        watcher = ref(inst, "watcher")
        watcher.ask("watch napper", timeout=HANG)
        assert watcher.ask("?", timeout=HANG) == ["w1", []]
        write_module(base, 2, top=WATCHER.replace("{tag}", "w2"))
        report = ikos.upgrade("watcher", root=inst.root)
        assert report["state"] == "handed over"
        for name in ("plain", "napper"):
            os.kill(inst.status(name)["pid"], signal.SIGKILL)
        wanted = ["w2", [["plain", "killed"], ["napper", "killed"]]]

        def both_downs() -> bool:
            answer = watcher.ask("?", timeout=HANG)
            answer[1].sort(key=lambda d: d[0] != "plain")
            return bool(answer == wanted)

        wait_for(both_downs, HANG * 2, message="the Downs in the upgraded watcher")
        # one Down per stop, though both incarnations' on_start monitored plain
        assert watcher.ask("?", timeout=HANG)[1].count(["plain", "killed"]) == 1
    finally:
        stop_and_check([inst])
