"""Hostile and malformed input on every socket and file ikosd reads.

The mailbox sockets carry pickles, so the rule there is absolute: nothing
is decoded before the peer proved the instance secret. The control socket
speaks JSON and must answer every malformed request with an error (or
close the connection) and keep serving. A bad tree file must stop ikosd
before anything starts, with exit status 2 and one line naming the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HANG, IKOSD, Instance

import ikos
from ikos._codec import encode
from ikos.actors import _runtime
from ikos.actors._ref import ASK
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import connect_unix
from ikos.platform._wire import (
    HEADER,
    MAGIC,
    NONCE,
    SERVER_LEN,
    _mac,
    client_handshake,
    read_secret,
)

TREE = """
import os

import ikos


class Echo(ikos.Actor):
    def on_start(self):
        self.count = 0

    def receive(self, message):
        if message == "count":
            return self.count
        self.count += 1
        return (message if not isinstance(message, bytes) else len(message), os.getpid())


class Relay(ikos.Actor):
    \"\"\"Asks 'echo' on behalf of the caller and returns what happened, error or reply.\"\"\"

    def receive(self, size):
        try:
            return ("reply", self.actor("echo").ask(b"x" * size, timeout=10))
        except ikos.IkosError as exc:
            return ("error", exc)


# Some junk arguments are valid requests too ('kill' with name "echo" sends it SIGTERM), and
# each one that reaches a process is a restart: OTP's default intensity (1 in 5 s) would make
# the test's outcome depend on whether a second kill finds echo still starting, with no pid.
tree = ikos.Supervisor(
    "root",
    max_restarts=100,
    within=5,
    children=[ikos.Child("echo", Echo), ikos.Child("relay", Relay)],
)
"""


def mailbox(inst: Instance, name: str = "echo") -> Path:
    return InstancePaths.for_root(inst.root).actor_socket(name)


@contextlib.contextmanager
def connection(path: Path, timeout: float = 10.0) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        connect_unix(sock, path)
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes; fails if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the peer kept the connection open for {timeout}s") from None
        if not chunk:
            return data
        data += chunk


def still_serving(inst: Instance, pid: int) -> None:
    """The actor answers a legitimate ask, from the same process as before."""
    fresh = ikos.ActorRef("echo", root=inst.root)
    _, answered_by = fresh.ask("legit", timeout=10)
    assert answered_by == pid == inst.pid_of("echo")
    assert inst.status("echo")["restarts"] == 0


class Evil:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_payload(path: Path) -> bytes:
    return b"p" + pickle.dumps(Evil(path), protocol=5)


# -- the mailbox socket -----------------------------------------------------------


def test_garbage_and_wrong_secrets_are_dropped(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("echo")
    path = mailbox(inst)
    # Random bytes (a leading byte other than 'I' is refused at once).
    for _ in range(20):
        with connection(path) as sock:
            sock.sendall(b"\x00" + os.urandom(4095))
            assert read_until_closed(sock) == b""
    # The right magic, then a wrong MAC.
    with connection(path) as sock:
        sock.sendall(MAGIC + secrets.token_bytes(NONCE))
        answer = read_exact(sock, SERVER_LEN)
        sock.sendall(secrets.token_bytes(32))
        assert read_until_closed(sock) == b""
        assert len(answer) == SERVER_LEN
    # A well-formed handshake by a client holding the wrong secret: the client sees
    # that the server does not share its secret ...
    with connection(path) as sock, pytest.raises(ikos.AuthenticationError):
        client_handshake(sock, secrets.token_bytes(32), 5)
    # ... and a client that ignores that and proves its wrong secret is dropped.
    wrong = secrets.token_bytes(32)
    with connection(path) as sock:
        nonce_c = secrets.token_bytes(NONCE)
        sock.sendall(MAGIC + nonce_c)
        nonce_s = read_exact(sock, SERVER_LEN)[:NONCE]
        sock.sendall(_mac(wrong, b"client", nonce_s, nonce_c) + frame_of((ASK, 1, "hi")))
        assert read_until_closed(sock) == b""
    still_serving(inst, pid)


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def frame_of(value: object) -> bytes:
    data = encode(value)
    return HEADER.pack(len(data)) + data


def test_nothing_is_unpickled_before_authentication(ikosd_factory, tmp_path):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("echo")
    path = mailbox(inst)
    # The payload works: unpickled here, it creates its file.
    control = tmp_path / "control"
    pickle.loads(evil_payload(control)[1:]).close()
    assert control.exists()

    targets = [tmp_path / f"pwned-{i}" for i in range(5)]
    attempts = [
        # a bare pickle, a frame, a frame in place of the hello
        evil_payload(targets[0]),
        HEADER.pack(len(evil_payload(targets[1]))) + evil_payload(targets[1]),
        MAGIC + HEADER.pack(len(evil_payload(targets[2]))) + evil_payload(targets[2]),
        # a hello, then a frame instead of the proof (sent before the server answers)
        MAGIC + secrets.token_bytes(NONCE) + frame_of((ASK, 1, Evil(targets[3]))),
    ]
    for data in attempts:
        with connection(path) as sock:
            sock.sendall(data)
            read_until_closed(sock)
    # a hello, the server's answer, a wrong proof followed by the frame
    with connection(path) as sock:
        sock.sendall(MAGIC + secrets.token_bytes(NONCE))
        read_exact(sock, SERVER_LEN)
        sock.sendall(secrets.token_bytes(32) + frame_of((ASK, 1, Evil(targets[4]))))
        read_until_closed(sock)
    still_serving(inst, pid)
    assert [t.name for t in targets if t.exists()] == []


def test_idle_peer_is_dropped_after_the_handshake_timeout(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("echo")
    with connection(mailbox(inst)) as sock:
        t0 = time.monotonic()
        assert read_until_closed(sock, timeout=_runtime.HANDSHAKE_TIMEOUT + HANG) == b""
        elapsed = time.monotonic() - t0
    # not before the handshake timeout; the upper bound is a bound on hangs, not a claim
    assert _runtime.HANDSHAKE_TIMEOUT - 0.5 <= elapsed < _runtime.HANDSHAKE_TIMEOUT + HANG
    still_serving(inst, pid)


def test_a_flood_of_idle_connections_does_not_lock_out_legitimate_clients(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("echo")
    idle = []
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            sock.settimeout(10)
            connect_unix(sock, mailbox(inst))
        # While they are all still open, a legitimate client gets in at once.
        t0 = time.monotonic()
        still_serving(inst, pid)
        assert time.monotonic() - t0 < HANG  # a bound on hangs, not a performance claim
    finally:
        for sock in idle:
            sock.close()
    still_serving(inst, pid)


def test_oversized_frame_header_closes_that_connection_only(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("echo")
    echo = ikos.ActorRef("echo", root=inst.root)
    assert echo.ask("before", timeout=10) == ("before", pid)  # a connection held open
    secret = read_secret(InstancePaths.for_root(inst.root).secret_file)
    for header in (HEADER.pack(2**31), HEADER.pack(2**32 - 1), HEADER.pack(0)):
        with connection(mailbox(inst)) as sock:
            client_handshake(sock, secret, 5)
            sock.sendall(header + b"\x00" * 1024)
            assert read_until_closed(sock) == b""
    assert echo.ask("after", timeout=10) == ("after", pid)  # the other connection lives
    still_serving(inst, pid)


CONFIG_SMALL_FRAMES = """
[ikosd]
max_message_bytes = 65536
"""


def test_message_over_the_frame_limit_is_refused_before_sending(ikosd_factory):
    inst = ikosd_factory(tree=TREE, config=CONFIG_SMALL_FRAMES)
    relay = ikos.ActorRef("relay", root=inst.root)
    # Within the instance (an actor knows the instance's limit) ...
    kind, err = relay.ask(100_000, timeout=10)
    assert kind == "error" and isinstance(err, ikos.MessageTooLarge)
    assert err.limit == 65536 and err.size > 100_000 and err.name == "echo"
    assert "exceeds the limit of 65536 bytes" in str(err)
    assert relay.ask(1000, timeout=10)[0] == "reply"
    # ... and nothing was sent: echo saw the small message only.
    assert ikos.ActorRef("echo", root=inst.root).ask("count", timeout=10) == 1


def test_client_outside_the_instance_refuses_a_message_over_the_default_limit(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    echo = ikos.ActorRef("echo", root=inst.root)
    limit = 64 * 1024 * 1024
    t0 = time.monotonic()
    with pytest.raises(ikos.MessageTooLarge) as info:
        # a str: bytes this large would go by shared memory, which has no frame limit
        echo.ask("x" * limit, timeout=HANG)
    assert time.monotonic() - t0 < HANG  # a bound on hangs, not a performance claim
    assert info.value.limit == limit and info.value.size > limit
    assert echo.ask("count", timeout=10) == 0


def test_client_outside_the_instance_learns_the_instance_frame_limit(ikosd_factory):
    """The mailbox announces its limit in the handshake: no client sends what it would drop."""
    inst = ikosd_factory(tree=TREE, config=CONFIG_SMALL_FRAMES)
    echo = ikos.ActorRef("echo", root=inst.root)
    pid = inst.pid_of("echo")
    with pytest.raises(ikos.MessageTooLarge) as info:
        echo.ask(b"x" * 100_000, timeout=10)
    assert info.value.limit == 65536
    with pytest.raises(ikos.MessageTooLarge):
        echo.tell(b"x" * 100_000)
    assert echo.ask(b"x" * 60_000, timeout=10) == (60_000, pid)
    assert echo.ask("count", timeout=10) == 1
    # ikosctl call goes through the manager, which learns the limit the same way.
    res = inst.ctl("call", "echo", json.dumps("x" * 100_000))
    assert res.returncode == 1
    assert "exceeds the limit of 65536 bytes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# -- the control socket -------------------------------------------------------------


def control_exchange(inst: Instance, data: bytes, timeout: float = 10.0) -> list[dict] | None:
    """Send raw bytes, read answer lines; None when the server closed without answering."""
    with connection(InstancePaths.for_root(inst.root).control_socket, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return None
        expected = data.count(b"\n")
        buf = b""
        while buf.count(b"\n") < expected:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
    lines = [json.loads(line) for line in buf.splitlines() if line]
    return lines or None


def hello_works(inst: Instance) -> None:
    answer = control_exchange(inst, b'{"id": 1, "verb": "hello"}\n')
    assert answer is not None and answer[0]["ok"] is True
    assert answer[0]["result"]["pid"] == inst.pid


DEEP_DATA = b'{"id": 1, "verb": "call", "args": {"name": "echo", "data": %s}}\n' % (
    b"[" * 5000 + b"]" * 5000
)
HUGE_TIMEOUT = b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": %s}}\n' % (
    b"9" * 400
)
HUGE_SIGNAL = b'{"id": 1, "verb": "kill", "args": {"name": "echo", "signal": "%s"}}\n' % (
    b"9" * 5000
)

MALFORMED_REQUESTS = [
    (b"not json\n", "bad_request"),
    (b"\xff\xfe\x00garbage\n", "bad_request"),
    (b"[1, 2, 3]\n", "bad_request"),
    (b'"status"\n', "bad_request"),
    (b"null\n", "bad_request"),
    (b'{"id": 1}\n', "bad_request"),
    (b'{"id": 1, "verb": "no-such-verb"}\n', "unknown_verb"),
    (b'{"id": 1, "verb": 42}\n', "bad_request"),
    (b'{"id": 1, "verb": "status", "args": [1]}\n', "bad_request"),
    (b'{"id": {"x": 1}, "verb": "status"}\n', "bad_request"),
    (b'{"id": 1, "verb": "status", "args": {"names": "echo"}}\n', "bad_request"),
    (b'{"id": 1, "verb": "status", "args": {"names": [1, 2]}}\n', "bad_request"),
    (b'{"id": 1, "verb": "stop", "args": {"name": ["echo"]}}\n', "bad_request"),
    (b'{"id": 1, "verb": "stop", "args": {}}\n', "bad_request"),
    (b'{"id": 1, "verb": "kill", "args": {"name": "echo", "signal": 99999}}\n', "bad_request"),
    (b'{"id": 1, "verb": "kill", "args": {"name": "echo", "signal": true}}\n', "bad_request"),
    (b'{"id": 1, "verb": "kill", "args": {"name": "echo", "signal": "NOPE"}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": "x"}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": -1}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "root"}}\n', "failed"),
    (b'{"id": 1, "verb": "status", "args": {"names": ["nobody"]}}\n', "no_such_daemon"),
    # nested past the parser's recursion limit (a RecursionError, once a traceback)
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad_request"),
    (DEEP_DATA, "bad_request"),
    # numbers a float cannot hold, and the constants JSON does not have (once OverflowError)
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": 1e308}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": 1e999}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": Infinity}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": NaN}}\n', "bad_request"),
    (b'{"id": 1, "verb": "call", "args": {"name": "echo", "timeout": 86401}}\n', "bad_request"),
    (HUGE_TIMEOUT, "bad_request"),
    (HUGE_SIGNAL, "bad_request"),
    (b'{"id": 1, "verb": "kill", "args": {"name": "echo", "signal": "\\u00b2"}}\n', "bad_request"),
    (b'{"id": 1, "verb": "logs", "args": {"name": "echo", "follow": "yes"}}\n', "bad_request"),
    # a boolean is not an id, though Python's bool is an int
    (b'{"id": true, "verb": "hello"}\n', "bad_request"),
    (b'{"id": false, "verb": "hello"}\n', "bad_request"),
]


def test_malformed_control_requests_get_an_error_answer(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    pid = inst.pid_of("echo")
    for request_line, code in MALFORMED_REQUESTS:
        answer = control_exchange(inst, request_line)
        what = request_line[:60]
        assert answer is not None and len(answer) == 1, what
        assert answer[0]["ok"] is False, what
        assert answer[0]["error"]["code"] == code, (what, answer)
        assert answer[0]["error"]["message"], what
        assert answer[0]["id"] in (1, None), what
        hello_works(inst)
    assert inst.pid_of("echo") == pid
    assert inst.status("echo")["restarts"] == 0
    assert "Traceback" not in manager_log(inst)


def manager_log(inst: Instance) -> str:
    return (inst.root / "var/log/ikos/ikosd.log").read_text()


#: Arguments of the wrong kind for whatever verb receives them.
JUNK_ARGS = [
    {"name": 5},
    {"name": ["echo"]},
    {"name": "echo", "names": "echo", "lines": -1, "timeout": "soon", "follow": 1},
    {"supervisor": {}, "args": "x", "signal": [], "data": None},
    {"service": 5, "config": [], "changes": "x", "depends_on": 7, "pattern": 5, "limit": 1e999},
    {"name": "echo", "config": {"name": 5}, "changes": {"args": 5}, "timeout": 0.01},
]


def test_no_verb_answers_wrong_arguments_with_a_traceback(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    verbs = control_exchange(inst, b'{"id": 1, "verb": "hello"}\n')[0]["result"]["verbs"]
    assert {"hello", "list", "logs", "stop"} <= set(verbs)
    for verb in sorted(set(verbs) - {"shutdown", "reload_config"}):
        for args in JUNK_ARGS:
            request = json.dumps({"id": 1, "verb": verb, "args": args}).encode() + b"\n"
            answer = control_exchange(inst, request)
            assert answer is not None, (verb, args)
            message = (answer[0].get("error") or {}).get("message", "")
            assert not re.match(r"[A-Z]\w*(Error|Exception)\b", message), (verb, args, answer)
    assert "Traceback" not in manager_log(inst)
    assert "control request failed" not in manager_log(inst)
    hello_works(inst)


def wait_closed(sock: socket.socket, timeout: float = 60.0) -> bytes:
    """Read until the server closes ``sock``; what it sent before."""
    sock.settimeout(timeout)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize(
    "start",
    [
        b'{"id": 1, "verb": "sta',
        b'{"verb": "' + b"a" * 500_000,  # a long line, begun and never finished
    ],
)
def test_a_request_line_begun_and_never_finished_is_closed(ikosd_factory, start):
    inst = ikosd_factory(tree=TREE)
    with connection(InstancePaths.for_root(inst.root).control_socket) as sock:
        sock.sendall(start)
        assert wait_closed(sock) == b""
    assert "did not finish a request line" in manager_log(inst)
    hello_works(inst)


def test_control_socket_survives_huge_lines_and_hangups(ikosd_factory):
    inst = ikosd_factory(tree=TREE)
    # A line over 1 MiB closes the connection, with or without its newline.
    assert control_exchange(inst, b"x" * (2 * 1024 * 1024) + b"\n") is None
    assert control_exchange(inst, b'{"verb": "' + b"a" * (1024 * 1024 + 10)) is None
    # Half a request, then a hang-up.
    with connection(InstancePaths.for_root(inst.root).control_socket) as sock:
        sock.sendall(b'{"id": 1, "verb": "sta')
    # Many requests pipelined on one connection are answered in order.
    lines = b"".join(b'{"id": %d, "verb": "hello"}\n' % i for i in range(50))
    answers = control_exchange(inst, lines + b"garbage\n")
    assert answers is not None
    assert [a["id"] for a in answers] == [*range(50), None]
    assert answers[-1]["error"]["code"] == "bad_request"
    hello_works(inst)
    assert inst.ctl("status", "echo").returncode == 0


# -- bad trees ----------------------------------------------------------------------

BAD_TREES = {
    "not_a_supervisor": (
        "tree = 42",
        ["--tree", "an ikos.Supervisor", "int"],
    ),
    "a_child_as_root": (
        'tree = ikos.Child("echo", Echo)',
        ["--tree", "an ikos.Supervisor", "Child"],
    ),
    "duplicate_names": (
        'tree = ikos.Supervisor("root", children=[ikos.Child("echo", Echo), '
        'ikos.Supervisor("sub", children=[ikos.Child("echo", Echo)])])',
        ["root/sub/echo", "name", "unique", "root/echo"],
    ),
    "unknown_strategy": (
        'tree = ikos.Supervisor("root", strategy="one_for_none", '
        'children=[ikos.Child("echo", Echo)])',
        ["root", "strategy", "one_for_none", "one_for_one"],
    ),
    "negative_max_restarts": (
        'tree = ikos.Supervisor("root", children=[ikos.Supervisor("sub", max_restarts=-1, '
        'children=[ikos.Child("echo", Echo)])])',
        ["root/sub", "max_restarts", "-1", "integer >= 0"],
    ),
    "actor_not_an_actor": (
        'tree = ikos.Supervisor("root", children=[ikos.Child("echo", dict)])',
        ["root/echo", "actor", "ikos.Actor"],
    ),
    "actor_import_path": (
        'tree = ikos.Supervisor("root", children=[ikos.Child("echo", "no_such_module:Echo")])',
        ["root/echo", "actor", "no_such_module"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_bad_tree_exits_2_with_one_clear_line(tmp_path, case):
    body, words = BAD_TREES[case]
    tree_file = tmp_path / "badtree.py"
    tree_file.write_text(f"import ikos\n\nclass Echo(ikos.Actor):\n    pass\n\n{body}\n")
    root = tmp_path / "root"
    res = subprocess.run(
        [IKOSD, "--root", str(root), "--tree", f"{tree_file}:tree"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ikosd: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert res.stdout == ""
    # Refused before anything started: no control socket, no mailbox.
    assert not InstancePaths.for_root(root).control_socket.exists()
    assert not list(root.glob("run/ikos/actors/*.sock"))
