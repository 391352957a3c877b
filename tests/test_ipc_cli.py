"""ikosctl's IPC verbs on a real ikosd: publish, subscribe, queue, and the figures in status.

Run as a user runs them: the ``ikosctl`` command in a subprocess, text and
``--json``, piped to ``head``, with the exit codes of the contract (0, 1, 4) and
one clear line on stderr for every error.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from conftest import HANG, IKOSCTL, Instance, wait_for

NO_METRICS = ["--metrics", "off"]

TREE = """
import ikos

class Echo(ikos.Actor):
    def receive(self, message):
        return message

tree = ikos.Supervisor("root", children=[ikos.Child("echo", Echo)])
"""


@pytest.fixture
def inst(ikosd_factory: Any) -> Instance:
    return ikosd_factory(tree=TREE, args=NO_METRICS)  # type: ignore[no-any-return]


def ok(inst: Instance, *args: str) -> str:
    res = inst.ctl(*args)
    assert res.returncode == 0, (args, res.returncode, res.stderr)
    assert res.stderr == ""
    return res.stdout


def failing(inst: Instance, *args: str, status: int) -> str:
    res = inst.ctl(*args)
    assert res.returncode == status, (args, res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ikosctl: "), res.stderr
    return lines[0]


def subscriber(inst: Instance, *args: str) -> subprocess.Popen[str]:
    """``ikosctl subscribe ARGS``, started; ready once the broker counts its subscription."""
    before = broker_subscriptions(inst)
    proc = subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), "subscribe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=inst.env,
    )
    wait_for(lambda: broker_subscriptions(inst) > before, HANG, message="the subscription")
    return proc


def broker_subscriptions(inst: Instance) -> int:
    broker = inst.status("ikos-broker")
    return int(broker.get("ipc", {}).get("subscriptions", 0))


def test_publish_and_subscribe_text_and_json_lines(inst: Instance) -> None:
    text = subscriber(inst, "net.*", "-n", "3")
    lines = subscriber(inst, "--json", "net.#", "-n", "2")
    try:
        assert ok(inst, "publish", "net.eth0", '{"up": true}') == ""
        assert ok(inst, "publish", "net.eth0.mtu", "1500") == ""
        assert ok(inst, "publish", "net.lo", "plain words") == ""
        assert json.loads(ok(inst, "--json", "publish", "net.wlan0", "[1, 2]")) == {
            "topic": "net.wlan0",
            "published": True,
        }
        out, err = text.communicate(timeout=HANG)
        assert (text.returncode, err) == (0, "")
        assert out == 'net.eth0 {"up": true}\nnet.lo plain words\nnet.wlan0 [1, 2]\n'
        out, err = lines.communicate(timeout=HANG)
        assert (lines.returncode, err) == (0, "")
        docs = [json.loads(line) for line in out.splitlines()]
        assert [(d["topic"], d["data"]) for d in docs] == [
            ("net.eth0", {"up": True}),
            ("net.eth0.mtu", 1500),
        ]
        assert all(isinstance(d["sender_pid"], int) and d["timestamp"] > 0 for d in docs)
    finally:
        for proc in (text, lines):
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=HANG)


def test_subscribe_piped_to_head_exits_quietly(inst: Instance) -> None:
    shell = subprocess.Popen(
        f"'{IKOSCTL}' --root '{inst.root}' subscribe 'tick' | head -n 2; "
        'echo "status ${PIPESTATUS[0]}"',
        shell=True,
        executable="/bin/bash",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=inst.env,
    )
    try:
        wait_for(lambda: broker_subscriptions(inst) == 1, HANG, message="the subscription")

        def head_done() -> bool:
            ok(inst, "publish", "tick", "t")
            return shell.poll() is not None

        wait_for(head_done, HANG, message="head to end and ikosctl with it")
        out, err = shell.communicate(timeout=HANG)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.communicate(timeout=HANG)
    assert out == "tick t\ntick t\nstatus 0\n"
    assert err == ""


def test_status_shows_the_ipc_figures(inst: Instance) -> None:
    ok(inst, "publish", "a.b", "1")
    out = ok(inst, "status")
    (line,) = [x for x in out.splitlines() if x.startswith("ikos.ipc:")]
    assert "published 1" in line and "clients" in line
    broker = inst.status("ikos-broker")
    assert broker["state"] == "running"
    assert broker["ipc"]["published"] == 1
    assert set(broker["ipc"]) >= {"clients", "subscriptions", "delivered", "dropped", "queues"}
    # a status of other daemons only does not ask the broker
    assert "ikos.ipc" not in ok(inst, "status", "echo")


def test_errors_are_one_line_with_the_contracts_exit_codes(inst: Instance) -> None:
    line = failing(inst, "publish", "bad..topic", "1", status=1)
    assert "bad..topic" in line
    failing(inst, "subscribe", "a.#.#.", status=1)
    failing(inst, "publish", "only-topic", status=1)  # usage: DATA missing
    failing(inst, "queue", "get", status=1)  # usage: QUEUE missing
    failing(inst, "queue", "ack", "jobs", "not-a-number", status=1)
    inst.ctl("start", "ikos-broker", check=True)  # else it waits for its first client
    assert inst.ctl("kill", "-s", "KILL", "ikos-broker").returncode == 0
    inst.wait_state("ikos-broker", "running")


def test_queue_verbs(inst: Instance) -> None:
    assert ok(inst, "queue", "put", "jobs", '{"n": 1}') == "1\n"
    put = json.loads(ok(inst, "--json", "queue", "put", "jobs", "second"))
    assert put == {"queue": "jobs", "msg": 2}
    # take for good: get and ack in one
    assert ok(inst, "queue", "get", "--ack", "jobs") == '1\t1\t{"n": 1}\n'
    # a detached lease, settled by a later invocation
    got = json.loads(ok(inst, "--json", "queue", "get", "jobs"))
    assert got == {"queue": "jobs", "msg": 2, "deliveries": 1, "data": "second"}
    assert ok(inst, "queue", "nack", "jobs", "2") == ""
    again = json.loads(ok(inst, "--json", "queue", "get", "jobs"))
    assert (again["msg"], again["deliveries"]) == (2, 2)
    assert json.loads(ok(inst, "--json", "queue", "ack", "jobs", "2")) == {
        "queue": "jobs",
        "msg": 2,
        "ack": True,
    }
    line = failing(inst, "queue", "get", "jobs", "--timeout", "0.1", status=1)
    assert "jobs" in line and "empty" in line
    listed = json.loads(ok(inst, "--json", "queue", "list"))
    (jobs,) = [q for q in listed if q["name"] == "jobs"]
    assert jobs["ready"] == 0 and jobs["dead"] == 0
    assert ok(inst, "queue", "list").split("\t")[0] == "jobs"
    assert json.loads(ok(inst, "--json", "queue", "dead", "jobs")) == []
    failing(inst, "queue", "ack", "jobs", "99", status=1)
