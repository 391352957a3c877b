"""``ikos.ipc`` on a real ikosd: request/response, publish/subscribe, queues, reconnects.

Every test runs the real ``ikosd`` (which runs the real broker as ``ikos-broker``)
and talks to it from this process, from plain subprocesses and from actors, as a
user would. Losses are counted, not sampled: every put a producer saw acknowledged
must be found again after the broker or ikosd was killed. The ``[ipc]`` table's
reading is unit-tested at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, REPO, Instance, wait_for

import ikos
import ikos.ipc
import ikos.registry
from ikos._errors import ConfigError
from ikos.ipc import _client
from ikos.manager._config import IpcSettings, load_config, read_ipc_settings
from ikos.platform._paths import InstancePaths

NO_METRICS = ["--metrics", "off"]

TREE = """
import time

import ikos
import ikos.ipc


class Echo(ikos.Actor):
    def receive(self, message):
        if isinstance(message, dict) and message.get("sleep"):
            time.sleep(message["sleep"])
        if isinstance(message, dict) and "publish" in message:
            for n in range(message["count"]):  # an actor publishing: order kept
                ikos.ipc.publish(message["publish"], n)
        return message


class Caller(ikos.Actor):
    # asks another actor through ikos.ipc: request/response between actors
    def receive(self, message):
        with ikos.ipc.connect(message["to"]) as conn:
            reply = conn.request(message["data"])
        return {"reply": reply.payload, "type": reply.type, "direct": conn.direct}


class Watcher(ikos.Actor):
    def on_start(self):
        self.seen = []
        self.subscribe("net.*")

    def receive(self, message):
        if isinstance(message, ikos.ipc.IpcMessage):
            self.seen.append([message.type, message.topic, message.payload])
            return None
        if message == "seen":
            return self.seen
        if message == "stop":
            self.unsubscribe("net.*")
            return "stopped"


tree = ikos.Supervisor(
    "root",
    max_restarts=20,
    within=5,
    children=[
        ikos.Child("echo", Echo),
        ikos.Child("caller", Caller),
        ikos.Child("watcher", Watcher),
    ],
)
"""


@pytest.fixture(autouse=True)
def close_shared_clients() -> Iterator[None]:
    """Each test's instance is gone after it: so must this process's clients of it be."""
    yield
    with _client._shared_lock:
        clients = list(_client._shared.values())
        _client._shared.clear()
    for client in clients:
        client.close()


@pytest.fixture
def inst(ikosd_factory: Any) -> Instance:
    return ikosd_factory(tree=TREE, args=NO_METRICS)  # type: ignore[no-any-return]


def run_py(inst: Instance, code: str, *, timeout: float = HANG) -> str:
    """Run ``code`` in a plain Python process of the instance; its stdout."""
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**inst.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def start_py(inst: Instance, code: str) -> subprocess.Popen[str]:
    """Start ``code`` in a plain Python process; the caller kills and waits for it."""
    return subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(code)],
        env={**inst.env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_proc(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=HANG)


def start_broker(inst: Instance) -> int:
    """Start the broker (it otherwise waits for its first connection); its pid."""
    inst.ctl("start", "ikos-broker", check=True)
    return int(inst.wait_state("ikos-broker", "running", timeout=HANG)["pid"])


def kill_broker(inst: Instance) -> int:
    """``kill -9`` the broker and wait until its successor runs; the new pid."""
    old = inst.pid_of("ikos-broker") or start_broker(inst)
    os.kill(old, signal.SIGKILL)
    return inst.wait_running_new_pid("ikos-broker", old, timeout=HANG)


def test_the_public_names_of_ikos_ipc_are_pinned() -> None:
    assert sorted(ikos.ipc.__all__) == [
        "BrokerClient",
        "Connection",
        "IpcBadRequest",
        "IpcDenied",
        "IpcError",
        "IpcFull",
        "IpcMessage",
        "IpcNoSuchTarget",
        "IpcRemoteError",
        "IpcTimeout",
        "IpcTooLarge",
        "IpcUnavailable",
        "MESSAGE_TYPES",
        "Queue",
        "QueueMessage",
        "Server",
        "SharedBuffer",
        "Subscription",
        "connect",
        "disconnect",
        "publish",
        "queue",
        "queues",
        "receive_message",
        "send_message",
        "serve",
        "shared_buffer",
        "stats",
        "subscribe",
        "unsubscribe",
    ]
    assert ikos.ipc.MESSAGE_TYPES == ("request", "response", "notification", "broadcast")
    assert issubclass(ikos.ipc.IpcTimeout, TimeoutError)
    assert issubclass(ikos.ipc.IpcError, ikos.IkosError)


# --- request/response --------------------------------------------------------------------


def test_request_response_with_an_actor_from_a_plain_process(inst: Instance) -> None:
    conn = ikos.ipc.connect("echo", root=inst.root)
    try:
        assert conn.direct  # the owner talks to the mailbox itself: the ask path
        reply = conn.request({"x": 1})
        assert (reply.type, reply.payload) == ("response", {"x": 1})
        assert reply.receiver_pid == os.getpid()
        # the seed's functions: send now, receive the response later, matched by id
        first = ikos.ipc.send_message(conn, "one")
        second = ikos.ipc.send_message(conn, "two")
        got = [ikos.ipc.receive_message(conn, timeout=HANG) for _ in range(2)]
        assert [(m.correlation_id, m.payload) for m in got] == [(first, "one"), (second, "two")]
        # a response that does not come in time is a timeout, and comes later
        slow = conn.send_message({"sleep": 1.0, "n": 3})
        with pytest.raises(ikos.ipc.IpcTimeout) as timed_out:
            conn.receive_message(timeout=0.05)
        assert isinstance(timed_out.value, TimeoutError) and "echo" in str(timed_out.value)
        late = conn.receive_message(timeout=HANG)
        assert (late.correlation_id, late.payload) == (slow, {"sleep": 1.0, "n": 3})
        with pytest.raises(ikos.ipc.IpcTimeout):
            conn.request({"sleep": 2.0}, timeout=0.1)
    finally:
        ikos.ipc.disconnect(conn)
    with pytest.raises(ikos.ipc.IpcUnavailable, match="closed"):
        conn.request(1)


def test_request_response_between_actors(inst: Instance) -> None:
    answer = ikos.ActorRef("caller", root=inst.root).ask(
        {"to": "echo", "data": [1, 2]}, timeout=HANG
    )
    assert answer == {"reply": [1, 2], "type": "response", "direct": True}


def test_a_plain_process_calls_a_served_name_and_an_actor_through_the_broker(
    inst: Instance,
) -> None:
    def add(message: ikos.ipc.IpcMessage) -> Any:
        if message.payload == "boom":
            raise ValueError("no sum of boom")
        return {"sum": sum(message.payload), "from": message.sender_pid}

    with ikos.ipc.serve("calc", add, root=inst.root):
        out = run_py(
            inst,
            """
            import json, os, ikos.ipc
            from ikos.ipc._client import shared_client

            calc = ikos.ipc.connect("calc", codec="json")
            assert not calc.direct
            reply = calc.request([1, 2, 3])
            result = {"calc": reply.payload, "me": os.getpid(), "type": reply.type}
            result["server"] = reply.sender_pid
            try:
                calc.request("boom")
            except ikos.ipc.IpcRemoteError as exc:
                result["boom"] = [exc.remote_type, "no sum of boom" in str(exc)]
            try:
                ikos.ipc.connect("nobody").request(1, timeout=5)
            except ikos.ipc.IpcNoSuchTarget as exc:
                result["nobody"] = str(exc)
            # an actor through the broker, in JSON, as another user's process would
            value, _ = shared_client().request("echo", {"via": "broker"}, codec="json")
            result["echo"] = value
            print(json.dumps(result))
            """,
        )
    result = json.loads(out)
    assert result["calc"] == {"sum": 6, "from": result["me"]}
    assert result["server"] == os.getpid()  # this test process serves "calc"
    assert result["type"] == "response"
    assert result["boom"] == ["ValueError", True]
    assert "nobody" in result["nobody"]
    assert result["echo"] == {"via": "broker"}


def test_a_handler_raising_a_huge_error_answers_it_cut_and_keeps_serving(inst: Instance) -> None:
    def handler(message: ikos.ipc.IpcMessage) -> Any:
        if message.payload == "huge":
            raise RuntimeError("x" * 200_000)  # far more than a frame header may hold
        return "fine"

    with ikos.ipc.serve("fragile", handler, root=inst.root):
        conn = ikos.ipc.connect("fragile", root=inst.root)
        with pytest.raises(ikos.ipc.IpcRemoteError) as raised:
            conn.request("huge")
        assert raised.value.remote_type == "RuntimeError"
        assert len(str(raised.value)) < 2000 and "RuntimeError" in raised.value.traceback
        assert conn.request("again").payload == "fine"  # the server is still served


def test_connect_to_a_registered_service_reaches_its_daemon(inst: Instance) -> None:
    ikos.registry.register("demo/echo", endpoint="actor://echo", root=inst.root)
    try:
        with ikos.ipc.connect("demo/echo", root=inst.root) as conn:
            assert conn.target == "echo" and conn.direct
            assert conn.request("via the registry").payload == "via the registry"
    finally:
        ikos.registry.unregister("demo/echo", root=inst.root)


# --- publish/subscribe ------------------------------------------------------------------


def test_pub_sub_with_patterns_to_several_subscribers_processes_and_an_actor(
    inst: Instance,
) -> None:
    received: list[ikos.ipc.IpcMessage] = []
    done = threading.Event()

    def on_message(message: ikos.ipc.IpcMessage) -> None:
        received.append(message)
        if message.payload == 49:
            done.set()

    one_level = ikos.ipc.subscribe("net.*", on_message, root=inst.root)
    every = ikos.ipc.subscribe("net.#", root=inst.root)
    other = start_py(
        inst,
        """
        import json, ikos.ipc
        sub = ikos.ipc.subscribe("net.*.up")
        print("ready", flush=True)
        for message in sub:
            print(json.dumps([message.topic, message.payload]), flush=True)
            if message.payload == "last":
                break
        """,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline() == "ready\n"
        run_py(
            inst,
            """
            import ikos.ipc
            for i in range(50):
                ikos.ipc.publish(f"net.eth{i % 2}", i)
            ikos.ipc.publish("net.eth0.up", {"mtu": 1500})
            ikos.ipc.publish("dev.usb1", "not for net")
            ikos.ipc.publish("net.lo.up", "last", ack=True)
            """,
        )
        assert done.wait(HANG)
        # per-publisher order, the pattern's topics only
        assert [m.payload for m in received] == list(range(50))
        assert {m.topic for m in received} == {"net.eth0", "net.eth1"}
        assert all(m.type == "broadcast" and m.codec == "pickle" for m in received)
        deep = [every.get(HANG) for _ in range(52)]
        assert [m.payload for m in deep[:50]] == list(range(50))
        assert [(m.topic, m.payload) for m in deep[50:]] == [
            ("net.eth0.up", {"mtu": 1500}),
            ("net.lo.up", "last"),
        ]
        with pytest.raises(ikos.ipc.IpcTimeout):
            every.get(timeout=0.05)
        lines, _ = other.communicate(timeout=HANG)
        assert [json.loads(line) for line in lines.splitlines()] == [
            ["net.eth0.up", {"mtu": 1500}],
            ["net.lo.up", "last"],
        ]
        watcher = ikos.ActorRef("watcher", root=inst.root)
        seen = wait_for(
            lambda: len(s := watcher.ask("seen")) == 50 and s, HANG, message="50 broadcasts"
        )
        assert seen == [["broadcast", f"net.eth{i % 2}", i] for i in range(50)]
        assert watcher.ask("stop") == "stopped"
    finally:
        stop_proc(other)
        ikos.ipc.unsubscribe(one_level)
        every.unsubscribe()
    assert not one_level.active
    ikos.ipc.publish("net.eth0", "after", root=inst.root, ack=True)
    with pytest.raises(ikos.ipc.IpcUnavailable):
        every.get(timeout=0.05)


def test_an_actor_publishes_in_order(inst: Instance) -> None:
    with ikos.ipc.subscribe("from.actor", root=inst.root) as sub:
        ikos.ActorRef("echo", root=inst.root).ask({"publish": "from.actor", "count": 100})
        got = [sub.get(HANG) for _ in range(100)]
    assert [m.payload for m in got] == list(range(100))
    assert {m.sender_pid for m in got} == {inst.pid_of("echo")}


def test_subscriptions_and_served_names_come_back_after_the_broker_restarts(
    inst: Instance,
) -> None:
    sub = ikos.ipc.subscribe("after.#", root=inst.root)
    server = ikos.ipc.serve("still-here", lambda m: "yes", root=inst.root)
    try:
        ikos.ipc.publish("after.before", 0, root=inst.root, ack=True)
        assert sub.get(HANG).payload == 0
        kill_broker(inst)
        publisher = """
            import ikos.ipc
            ikos.ipc.publish("after.restart", 1, ack=True)
            print(ikos.ipc.connect("still-here").request("?").payload)
            """

        # the subscription is back once this process has reconnected; publish until seen
        def delivered() -> bool:
            try:
                answer = run_py(inst, publisher)
            except AssertionError:
                return False  # the broker's successor is not serving yet
            assert answer == "yes\n"
            try:
                return sub.get(timeout=0.5).payload == 1
            except ikos.ipc.IpcTimeout:
                return False

        wait_for(delivered, HANG, message="a delivery through the new broker")
        assert sub.client.reconnects >= 1
    finally:
        sub.unsubscribe()
        server.stop()


def test_an_eager_broker_is_running_before_any_other_daemon_starts(ikosd_factory: Any) -> None:
    """Its subtree is a wave of its own: with ``[ipc] start = "eager"`` the broker
    runs before any actor's first instant.

    Waves start together whatever needs nothing; the broker needs nothing, but
    everything may need it. (On demand, the default, an actor's first connection
    waits in the backlog of ikosd's socket until the broker it started accepts it:
    tests/test_ipc_activation.py.)
    """
    inst = ikosd_factory(tree=TREE, config='[ipc]\nstart = "eager"\n', args=NO_METRICS)
    transitions = [
        line.split("ikos.daemon: ", 1)[1]
        for line in inst.log_text().splitlines()
        if "ikos.daemon: " in line and " -> " in line
    ]
    broker_up = next(
        i
        for i, t in enumerate(transitions)
        if t.startswith("exec ikos-broker: starting -> running")
    )
    first_other = next(
        i
        for i, t in enumerate(transitions)
        if t.startswith(("actor ", "exec "))
        and "stopped -> starting" in t
        and "ikos-broker" not in t
    )
    assert broker_up < first_other, transitions


def test_a_broker_killed_again_and_again_never_takes_the_instance_down(
    ikosd_factory: Any,
) -> None:
    # A root with OTP's default intensity, 1 restart in 5 s: were the broker its
    # child, the second kill would stop every daemon and ikosd. Under ikos-system
    # it is only restarted.
    default_root = TREE.replace("max_restarts=20,\n    within=5,\n", "")
    assert default_root != TREE
    inst = ikosd_factory(tree=default_root, args=NO_METRICS)
    echo = inst.pid_of("echo")
    for _ in range(4):
        kill_broker(inst)
    assert inst.proc.poll() is None
    assert inst.pid_of("echo") == echo
    system = inst.status("ikos-system")
    assert system["state"] == "running" and system["supervisor"] == "root"
    assert inst.status("ikos-broker")["restarts"] >= 4
    with ikos.ipc.connect("echo", root=inst.root) as conn:
        assert conn.request("still", timeout=HANG).payload == "still"


def test_a_broker_that_stays_down_is_an_error_naming_its_socket(tmp_path: Path) -> None:
    paths = InstancePaths.for_root(tmp_path)
    client = ikos.ipc.BrokerClient(paths, reconnect_timeout=0.2)
    with pytest.raises(ikos.ipc.IpcUnavailable) as down:
        client.publish("a.b", 1)
    assert str(paths.run_dir / "ipc" / "broker.sock") in str(down.value)
    client.close()


# --- durable queues ----------------------------------------------------------------------


def test_pipelined_puts_are_on_disk_in_order_and_bounded(ikosd_factory: Any) -> None:
    inst = ikosd_factory(tree=TREE, args=NO_METRICS, config="[ipc.queues]\nmax_messages = 1500\n")
    jobs = ikos.ipc.queue("stream", root=inst.root)
    futures = [jobs.put_async(n) for n in range(1500)]
    ids = [f.result(timeout=HANG) for f in futures]
    assert ids == sorted(ids) and len(set(ids)) == 1500
    # past max_messages the future fails with the broker's error, nothing hangs
    with pytest.raises(ikos.ipc.IpcFull):
        jobs.put_async("one too many").result(timeout=HANG)
    # on disk before the futures resolved: a kill -9 of the broker loses none
    kill_broker(inst)
    got = [jobs.get(timeout=HANG) for _ in range(1500)]
    assert [m.data for m in got] == list(range(1500))
    for m in got:
        m.ack()


def test_queue_put_get_ack_nack(inst: Instance) -> None:
    jobs = ikos.ipc.queue("jobs", root=inst.root)
    ids = [jobs.put({"n": n}) for n in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    first = jobs.get(timeout=HANG)
    assert (first.id, first.data, first.deliveries) == (ids[0], {"n": 0}, 1)
    first.nack()
    again = jobs.get(timeout=HANG)
    assert (again.id, again.deliveries) == (ids[0], 2)
    again.ack()
    rest = [jobs.get(timeout=HANG) for _ in range(2)]
    assert [m.data for m in rest] == [{"n": 1}, {"n": 2}]
    for m in rest:
        m.ack()
    with pytest.raises(ikos.ipc.IpcTimeout):
        jobs.get(timeout=0.1)
    names = {q.get("name") for q in ikos.ipc.queues(root=inst.root)}
    assert "jobs" in names


def test_a_message_returns_at_once_when_its_consumer_is_killed(inst: Instance) -> None:
    work = ikos.ipc.queue("work", root=inst.root)
    put = work.put("the job")
    consumer = start_py(
        inst,
        """
        import time, ikos.ipc
        m = ikos.ipc.queue("work").get(timeout=30)
        print(m.id, flush=True)
        time.sleep(300)
        """,
    )
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline() == f"{put}\n"
        with pytest.raises(ikos.ipc.IpcTimeout):
            work.get(timeout=0.1)  # leased to the consumer
        consumer.kill()
        consumer.wait(timeout=HANG)
        again = work.get(timeout=HANG)  # well before the visibility timeout (30 s)
        assert (again.id, again.data, again.deliveries) == (put, "the job", 2)
        again.ack()
    finally:
        stop_proc(consumer)


PRODUCER = """
import sys, ikos.ipc
q = ikos.ipc.queue("durable")
n = 0
while n < {count}:
    try:
        q.put({{"n": n}}, timeout=10)
    except ikos.ipc.IpcError as exc:
        print("error", type(exc).__name__, file=sys.stderr, flush=True)
        continue  # not acknowledged: put again (the same n may then arrive twice)
    print(n, flush=True)
    n += 1
"""


def drain(inst: Instance, name: str) -> list[Any]:
    """Every message of queue ``name``, acked, until it stays empty for a moment."""
    queue = ikos.ipc.queue(name, root=inst.root)
    out: list[Any] = []
    while True:
        try:
            m = queue.get(timeout=1.0)
        except ikos.ipc.IpcTimeout:
            return out
        out.append(m.data)
        m.ack()


def test_no_acknowledged_put_is_lost_when_the_broker_is_killed(inst: Instance) -> None:
    producer = start_py(inst, PRODUCER.format(count=3000))
    try:
        assert producer.stdout is not None
        wait_for(lambda: int(producer.stdout.readline()) >= 300, HANG, message="300 puts")
        kill_broker(inst)  # with puts in flight
        _out, err = producer.communicate(timeout=HANG * 4)
        assert producer.returncode == 0, err
    finally:
        stop_proc(producer)
    got = {m["n"] for m in drain(inst, "durable")}
    assert got == set(range(3000))  # every acknowledged put, and nothing invented


def test_no_acknowledged_put_is_lost_across_a_restart_of_ikosd(
    ikosd_factory: Any, inst: Instance
) -> None:
    out = run_py(inst, PRODUCER.format(count=200))
    acknowledged = {int(line) for line in out.split()}
    assert acknowledged == set(range(200))
    inst.crash()  # kill -9 ikosd: the broker runs on, the next ikosd adopts it
    again = ikosd_factory(tree=TREE, args=NO_METRICS)
    assert again.root == inst.root
    kill_broker(again)  # then the broker itself
    assert again.terminate() == 0  # and an orderly restart too
    third = ikosd_factory(tree=TREE, args=NO_METRICS)
    got = [m["n"] for m in drain(third, "durable")]
    assert sorted(got) == sorted(acknowledged)


# --- the [ipc] table -----------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ikos.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_ipc_settings_default_without_a_table(tmp_path: Path) -> None:
    settings, warnings = read_ipc_settings(write(tmp_path, "[root]\n"))
    assert settings == IpcSettings() and warnings == ()
    config = settings.broker_config(1000, "/log/ipc-audit.log")
    assert set(config) == {
        "owner_uid",
        "subscriber_queue",
        "slow_subscriber",
        "shm_threshold",
        "max_frame",
        "max_clients",
        "max_clients_per_uid",
        "queues",
        "policy",
        "audit_log",
    }
    assert config["queues"] == {
        "max_deliveries": 5,
        "visibility_timeout": 30.0,
        "max_messages": 1000000,
    }


def test_ipc_settings_read_rules_with_names_and_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [ipc]
        subscriber_queue = 50
        slow_subscriber = "disconnect"
        shm_threshold = 4096
        [ipc.queues]
        max_deliveries = 2
        visibility_timeout = 1.5
        [[ipc.allow]]
        users = ["root", 0]
        groups = ["root"]
        publish = ["app.#"]
        subscribe = ["#", "net.*"]
        queues = ["jobs"]
        call = ["log", "net/dhcp"]
        """,
    )
    settings, warnings = read_ipc_settings(path)
    assert warnings == ()
    assert (settings.subscriber_queue, settings.slow_subscriber) == (50, "disconnect")
    assert (settings.max_deliveries, settings.visibility_timeout) == (2, 1.5)
    (rule,) = settings.rules
    assert rule.uids == (0, 0) and rule.gids == (0,)
    assert rule.to_json()["subscribe"] == ["#", "net.*"]
    assert rule.to_json()["call"] == ["log", "net/dhcp"]
    assert load_config(path).ipc == settings


@pytest.mark.parametrize(
    ("text", "table", "key", "expected"),
    [
        ('[ipc]\nslow_subscriber = "block"', "[ipc]", "slow_subscriber", "drop-oldest"),
        ("[ipc]\nsubscriber_queue = 0", "[ipc]", "subscriber_queue", "integer >= 1"),
        ('[ipc]\nenabled = "no"', "[ipc]", "enabled", "true or false"),
        ("[ipc.queues]\nvisibility_timeout = -1", "[ipc.queues]", "visibility_timeout", "> 0"),
        (
            '[[ipc.allow]]\nusers = ["no-such-user-ikos"]\npublish = ["#"]',
            "[ipc.allow]",
            "users",
            "existing user",
        ),
        ('[[ipc.allow]]\ngroups = [1.5]\npublish = ["#"]', "[ipc.allow]", "groups", "group"),
        ('[[ipc.allow]]\nusers = [0]\npublish = ["a..b"]', "[ipc.allow]", "publish", "patterns"),
        ('[[ipc.allow]]\npublish = ["#"]', "[ipc.allow]", "users", "whom the rule allows"),
        (
            '[[ipc.allow]]\nusers = [0]\n[[ipc.allow]]\nusers = ["nobody-ikos-x"]',
            "[ipc.allow[1]]",
            "users",
            "existing user",
        ),
    ],
)
def test_a_bad_ipc_entry_names_file_table_key_and_what_was_expected(
    tmp_path: Path, text: str, table: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as bad:
        read_ipc_settings(path)
    message = str(bad.value)
    assert str(path) in message and table in message and f"key '{key}'" in message, message
    assert expected in message, message
    with pytest.raises(ConfigError):
        load_config(path)  # ikosd refuses the file before starting anything


def test_unknown_ipc_keys_are_warnings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [ipc]
        subscriber_queu = 5
        [ipc.queues]
        max_delivery = 3
        [[ipc.allow]]
        users = [0]
        publsh = ["#"]
        """,
    )
    _settings, warnings = read_ipc_settings(path)
    assert len(warnings) == 3
    assert "did you mean 'subscriber_queue'" in warnings[0]
    assert "[ipc.queues]" in warnings[1] and "max_delivery" in warnings[1]
    assert "publsh" in warnings[2]
    assert not any("unknown table [ipc]" in w for w in load_config(path).warnings)


def test_enabled_false_runs_without_a_broker(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        config="""
        [ipc]
        enabled = false
        [actors.echo]
        class = "config_actors:Echo"
        """,
        args=NO_METRICS,
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
    )
    assert [s["name"] for s in inst.status()] == ["root", "echo"]
    res = inst.ctl("status")
    assert "ikos.ipc" not in res.stdout


def test_a_reload_rewrites_broker_json_and_the_broker_keeps_running(
    ikosd_factory: Any,
) -> None:
    config = """
        [ipc]
        subscriber_queue = {size}
        [actors.echo]
        class = "config_actors:Echo"
        """
    inst = ikosd_factory(
        config=config.format(size=100),
        args=NO_METRICS,
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
    )
    assert [s["name"] for s in inst.status()] == ["root", "ikos-system", "ikos-broker", "echo"]
    broker_json = inst.root / "run" / "ikos" / "ipc" / "broker.json"
    assert json.loads(broker_json.read_text())["subscriber_queue"] == 100
    pid = start_broker(inst)
    (inst.root.parent / "ikos.toml").write_text(textwrap.dedent(config.format(size=7)))
    assert inst.ctl("reload-config").returncode == 0
    assert json.loads(broker_json.read_text())["subscriber_queue"] == 7
    assert inst.pid_of("ikos-broker") == pid  # re-read on SIGHUP, not restarted
    wait_for(lambda: "re-reads it" in inst.log_text(), HANG, message="the SIGHUP")
    (inst.root.parent / "ikos.toml").write_text(
        textwrap.dedent(config.format(size=7)) + '[[ipc.allow]]\nusers = ["no-such-user-ikos"]\n'
    )
    res = inst.ctl("reload-config")
    assert res.returncode == 1 and "no-such-user-ikos" in res.stderr
    assert json.loads(broker_json.read_text())["subscriber_queue"] == 7


# --- another user: the policy of [[ipc.allow]], end to end -----------------------------------

needs_users = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv to create another user and act as it",
)


@pytest.fixture(scope="module")
def stranger() -> Iterator[pwd.struct_passwd]:
    """A system user created for these tests (and its group), removed afterwards."""
    name = f"ikos-i-{uuid.uuid4().hex[:8]}"
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/false"]
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


STRANGER = """
import json, sys, ikos.ipc
out = {}
ikos.ipc.publish("app.hello", {"from": "stranger"}, ack=True)
try:
    ikos.ipc.publish("sys.shutdown", 1, ack=True)
except ikos.ipc.IpcDenied as exc:
    out["publish_denied"] = str(exc)
with ikos.ipc.connect("echo") as echo:
    out["direct"] = echo.direct
    out["echo"] = echo.request({"n": 1}).payload
try:
    ikos.ipc.connect("other").request(1, timeout=5)
except ikos.ipc.IpcDenied as exc:
    out["call_denied"] = str(exc)
print(json.dumps(out))
"""


def shared_instance(base: Path, ikosd_factory: Any, tree: str, config: str) -> Instance:
    """An ikosd whose root (under ``base``, made 0711) another user can reach."""
    os.chmod(base, 0o711)  # pytest's tmp is 0700: the stranger must reach the socket
    inst = ikosd_factory(
        tree=tree,
        config=config,
        args=[*NO_METRICS, "--root", str(base / "root")],  # the last --root wins
    )
    return Instance(base / "root", inst.proc, inst.mark, inst.log)


def run_as(user: pwd.struct_passwd, script: str, root: Path) -> Any:
    """Run the Python ``script`` as ``user`` against the instance at ``root``; its JSON output."""
    command = [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        sys.executable,
        "-c",
        script,
    ]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": "/", "IKOS_ROOT": str(root)}
    res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@needs_users
def test_another_user_is_allowed_what_a_rule_grants_and_denied_the_rest(
    ikosd_factory: Any, stranger: pwd.struct_passwd
) -> None:
    base = Path(tempfile.mkdtemp(prefix="ikos-ipc-users-"))
    try:
        config = f"""
            [[ipc.allow]]
            users = ["{stranger.pw_name}"]
            publish = ["app.#"]
            call = ["echo"]
            """
        inst = shared_instance(base, ikosd_factory, TREE, config)
        sub = ikos.ipc.subscribe("app.#", root=inst.root)
        out = run_as(stranger, STRANGER, inst.root)
        assert "sys.shutdown" in out["publish_denied"]
        assert out["direct"] is False  # no secret: through the broker, in JSON
        assert out["echo"] == {"n": 1}
        assert "other" in out["call_denied"]
        message = sub.get(HANG)  # the owner's subscriber got the stranger's publication
        assert (message.topic, message.payload, message.codec) == (
            "app.hello",
            {"from": "stranger"},
            "json",
        )
        assert message.sender_uid == stranger.pw_uid
        sub.unsubscribe()
        audit = (inst.root / "var" / "log" / "ikos" / "ipc-audit.log").read_text()
        denials = [line for line in audit.splitlines() if str(stranger.pw_uid) in line]
        assert any("sys.shutdown" in line for line in denials), audit
        assert any("other" in line for line in denials), audit
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_broker_figures_are_prometheus_metrics(ikosd_factory: Any) -> None:
    inst = ikosd_factory(tree=TREE, args=["--metrics", "127.0.0.1:0"])
    found = re.search(r"metrics (http://\S+/metrics)", inst.log_text())
    assert found, inst.log_text()
    slow = ikos.ipc.subscribe("m.#", root=inst.root)
    ikos.ipc.publish("m.x", 1, root=inst.root, ack=True)
    ikos.ipc.queue("metered", root=inst.root).put("job")

    def scrape() -> str:
        with urllib.request.urlopen(found.group(1), timeout=HANG) as answer:
            return str(answer.read().decode())

    text = wait_for(
        lambda: 'ikos_ipc_queue_messages{queue="metered"} 1.0' in (t := scrape()) and t,
        HANG,
        message="the queue in the metrics",
    )
    assert "ikos_ipc_broker_up 1.0" in text
    assert 'ikos_ipc_published_total{topic="m.x"} 1.0' in text
    assert 'ikos_ipc_delivered_total{topic="m.x"} 1.0' in text
    assert 'ikos_ipc_dropped_total{topic="m.x"} 0.0' in text
    assert 'ikos_ipc_queue_puts_total{queue="metered"} 1.0' in text
    assert re.search(r"^ikos_ipc_clients [1-9]", text, re.M), text
    slow.unsubscribe()
