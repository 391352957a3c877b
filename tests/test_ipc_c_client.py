"""A client in C speaks the broker wire: handshake, serve, call, publish, subscribe, in JSON.

``tests/c/ipc_client.c`` is built here with the system compiler (``cc``); where
there is none the test is skipped and says why. The program follows only
docs/protocol.md, so this is the check that the documented wire is enough for a
non-Python client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import test_broker
from conftest import HANG, read_line
from test_broker import BrokerProcess

# the broker fixtures of test_broker.py, used here as they are
base = test_broker.base
brokers = test_broker.brokers

SOURCE = Path(__file__).resolve().parent / "c" / "ipc_client.c"
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")


@pytest.fixture
def c_client(tmp_path: Path) -> Path:
    binary = tmp_path / "ipc_client"
    assert CC is not None
    built = subprocess.run(
        [
            CC,
            "-std=c11",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Werror",
            "-O2",
            "-o",
            str(binary),
            str(SOURCE),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    return binary


def test_a_c_program_serves_calls_publishes_and_subscribes(
    c_client: Path, brokers: Callable[..., BrokerProcess]
) -> None:
    broker = brokers()
    py = broker.connect(name="python")
    py.ok("serve", name="pyserv")
    py.ok("subscribe", pattern="c.#")
    proc = subprocess.Popen(
        [str(c_client), str(broker.socket_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert read_line(proc.stdout, HANG).startswith("welcome uid ")
        assert read_line(proc.stdout, HANG).strip() == "ready"
        # the C program's call reaches the Python server...
        req = py.expect("request")
        assert req.header["name"] == "pyserv" and json.loads(req.payload) == [1, 2]
        py.send({"op": "response", "id": req.header["id"], "codec": "json"}, b'{"sum": 3}')
        # ...its publish reaches the Python subscriber...
        msg = py.expect("message")
        assert msg.header["topic"] == "c.hello" and json.loads(msg.payload) == {"from": "c"}
        # ...and the Python client calls the name the C program serves
        answer = py.call("request", b'{"q": 1}', to="cserv", codec="json", timeout=HANG)
        assert answer.op == "response" and json.loads(answer.payload) == {"echo": {"q": 1}}
        out, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert 'message c.hello {"from":"c"}' in lines
    assert 'response {"sum": 3}' in lines
    assert 'served {"q": 1}' in lines
