"""Socket activation of the IPC broker, on a real ikosd with real sockets.

ikosd holds ``RUN/ipc/broker.sock`` and starts ``ikos-broker`` at the first
connection (``[ipc] start = "on-demand"``, the default): a tree of plain
executables runs no broker at all; the first client (a request, a publication,
an actor using IPC at start) starts it and is served; a broker killed with
SIGKILL leaves the socket listening, so no connect is refused while it restarts.
"""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HANG, Instance, wait_for

import ikos.ipc
from ikos.ipc._client import PROTOCOL_VERSION, BrokerClient, broker_socket
from ikos.ipc._frames import FrameReader, encode_frame
from ikos.platform._activation import activation_socket
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import connect_unix

NO_METRICS = ["--metrics", "off"]
WAITING = "waiting for its first connection"

TREE = """
import ikos

class Echo(ikos.Actor):
    def receive(self, message):
        return message

tree = ikos.Supervisor("root", children=[
    ikos.Exec("sleeper", "/bin/sleep", args=["1000"]),
    ikos.Child("echo", Echo),
])
"""


def broker_processes(inst: Instance) -> list[psutil.Process]:
    """ikosd's children running the broker's module."""
    found = []
    for child in psutil.Process(inst.pid).children(recursive=True):
        try:
            if "ikos.ipc._broker" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def hello(path: str) -> int:
    """Connect and say hello as a client does: the broker's pid from its welcome.

    ``ConnectionRefusedError`` and ``FileNotFoundError`` go to the caller (the
    failures socket activation exists to prevent); a reset by a dying broker
    gives 0.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANG)
        connect_unix(sock, path)
        try:
            sock.sendall(encode_frame({"op": "hello", "version": PROTOCOL_VERSION}))
            reader = FrameReader(1 << 20)
            while True:
                data = sock.recv(65536)
                if not data:
                    return 0
                reader.feed(data)
                for frame in reader.frames():
                    return int(frame.header.get("broker_pid") or 0)
        except (ConnectionResetError, BrokenPipeError):
            return 0
    finally:
        sock.close()


@pytest.fixture
def inst(ikosd_factory: Any) -> Instance:
    return ikosd_factory(tree=TREE, args=NO_METRICS)  # type: ignore[no-any-return]


def test_a_tree_that_does_not_use_ipc_runs_no_broker(inst: Instance) -> None:
    broker = inst.status("ikos-broker")
    assert broker["state"] == "stopped" and broker["pid"] is None
    assert broker["activation"] == "waiting"
    assert broker_processes(inst) == []
    # the human views say why it is stopped, and status counts it as it should be
    tree = inst.ctl("tree")
    assert f"ikos-broker [exec] stopped ({WAITING})" in tree.stdout
    res = inst.ctl("status")
    assert res.returncode == 0, res.stdout
    assert "the broker starts at its first connection" in res.stdout
    # a crash and its restart (transitions, alerts) start no broker either
    sleeper = inst.pid_of("sleeper")
    inst.ctl("kill", "-s", "KILL", "sleeper", check=True)
    inst.wait_running_new_pid("sleeper", sleeper)
    assert inst.status("ikos-broker")["activation"] == "waiting"
    assert broker_processes(inst) == []
    # the socket is there and held by ikosd alone
    assert broker_socket(InstancePaths.resolve(str(inst.root))).is_socket()


def test_the_first_client_starts_the_broker_and_is_served(inst: Instance) -> None:
    paths = InstancePaths.resolve(str(inst.root))
    with BrokerClient(paths, label="test") as client:  # a call to an actor, routed by it
        reply, frame = client.request("echo", "hello", timeout=HANG)
        frame.close()
        assert reply == "hello"
    subscription = ikos.ipc.subscribe("news.*", root=inst.root)
    try:
        assert inst.ctl("publish", "news.first", '{"n": 1}').returncode == 0
        assert subscription.get(timeout=HANG).payload == {"n": 1}
    finally:
        subscription.unsubscribe()
    broker = inst.wait_state("ikos-broker", "running")
    assert "activation" not in broker
    assert [p.pid for p in broker_processes(inst)] == [broker["pid"]]
    assert "a client connected" in inst.log_text()
    # an operator's stop puts it back to waiting; the next client starts it again
    inst.ctl("stop", "ikos-broker", check=True)
    wait_for(lambda: inst.status("ikos-broker").get("activation") == "waiting", HANG)
    res = inst.ctl("publish", "news.second", "2")
    assert res.returncode == 0, res.stderr
    inst.wait_state("ikos-broker", "running")


def test_no_connect_is_refused_while_a_killed_broker_restarts(inst: Instance) -> None:
    path = str(broker_socket(InstancePaths.resolve(str(inst.root))))
    first = hello(path)  # starts it
    assert first == inst.wait_state("ikos-broker", "running")["pid"]
    refused: list[BaseException] = []
    served: list[int] = []
    done = threading.Event()

    def connect_all_the_time() -> None:
        while not done.is_set():
            try:
                served.append(hello(path))
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    refused.append(exc)
                else:
                    raise

    client = threading.Thread(target=connect_all_the_time)
    client.start()
    try:
        wait_for(lambda: len(served) >= 3, HANG, message="connections to the first broker")
        inst.ctl("kill", "-s", "KILL", "ikos-broker", check=True)
        second = inst.wait_running_new_pid("ikos-broker", first)
        wait_for(lambda: second in served, HANG, message="a connection served by the restart")
    finally:
        done.set()
        client.join(HANG)
    assert refused == []


def test_an_actor_using_ipc_at_start_starts_the_broker(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        tree="""
        import ikos, ikos.ipc

        class Announcer(ikos.Actor):
            def on_start(self):
                ikos.ipc.publish("boot", "up")
                self.served = ikos.ipc.serve("announcer", lambda m: m.payload * 2)

            def receive(self, message):
                return message

        tree = ikos.Supervisor("root", children=[ikos.Child("announcer", Announcer)])
        """,
        args=NO_METRICS,
    )
    assert inst.state("announcer") == "running"
    inst.wait_state("ikos-broker", "running")
    with BrokerClient(InstancePaths.resolve(str(inst.root))) as client:
        reply, frame = client.request("announcer", 21, timeout=HANG)
        frame.close()
    assert reply == 42


def test_eager_start_runs_the_broker_at_once(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        config="""
        [ipc]
        start = "eager"

        [executables.sleeper]
        executable = "/bin/sleep"
        args = ["1000"]
        """,
        args=NO_METRICS,
    )
    broker = inst.wait_state("ikos-broker", "running")
    assert "activation" not in broker
    # it still takes ikosd's socket: the handoff socket is there
    assert activation_socket(InstancePaths.resolve(str(inst.root)).run_dir).is_socket()


def test_a_waiting_broker_is_no_outage_in_the_metrics() -> None:
    from ikos.manager._ipc_service import IpcCollector

    def gauges(collector: IpcCollector) -> dict[str, float]:
        return {f.name: f.samples[0].value for f in collector.collect() if f.samples}

    waiting = IpcCollector(lambda: (None, "not running"), lambda: True)
    assert gauges(waiting) == {"ikos_ipc_broker_up": 1, "ikos_ipc_broker_waiting": 1}
    down = IpcCollector(lambda: (None, "does not answer"), lambda: False)
    assert gauges(down) == {"ikos_ipc_broker_up": 0, "ikos_ipc_broker_waiting": 0}


def test_ipc_start_is_checked(tmp_path: Path) -> None:
    from ikos._errors import ConfigError
    from ikos.manager._config import read_ipc_settings

    good = tmp_path / "good.toml"
    good.write_text('[ipc]\nstart = "eager"\n')
    assert read_ipc_settings(good)[0].start == "eager"
    assert read_ipc_settings(None)[0].start == "on-demand"
    bad = tmp_path / "bad.toml"
    bad.write_text('[ipc]\nstart = "lazy"\n')
    with pytest.raises(ConfigError) as caught:
        read_ipc_settings(bad)
    message = str(caught.value)
    assert "bad.toml" in message and "[ipc]" in message and "'start'" in message, message
