"""Unit tests of the transport: the codec, the HMAC handshake, the secret, paths, sockets.

Nothing here starts ikosd; the handshake runs over real socket pairs and
the codec's output is decoded in a separate interpreter, where ``__main__``
is not the test's.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import ikos
from ikos._codec import DILL, PICKLE, decode, encode
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import SUN_PATH_MAX, bind_unix, connect_unix, short_path
from ikos.platform._wire import (
    DEFAULT_MAX_FRAME,
    HEADER,
    HELLO_LEN,
    MAC,
    MAGIC,
    NONCE,
    SERVER_LEN,
    ServerHandshake,
    _mac,
    client_handshake,
    ensure_secret,
    frame,
    read_secret,
)

SECRET = b"s" * 32

# -- codec ---------------------------------------------------------------------------

PLAIN = [
    None,
    0,
    -(2**70),
    1.5,
    "text",
    b"\x00bytes",
    bytearray(b"ba"),
    [1, [2, [3]]],
    (1, "two"),
    {"k": [1, 2], 3: None},
    {1, 2},
    frozenset({"a"}),
    ValueError("an exception"),
    ikos.ActorDeadError("echo", "gone"),
    ikos.ActorRef("echo", root="/tmp/somewhere"),
    Path("/etc"),
]


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
def test_plain_data_takes_pickle(value):
    data = encode(value)
    assert data[0] == PICKLE == ord("p")
    back = decode(data)
    if isinstance(value, BaseException):
        assert type(back) is type(value) and back.args == value.args
    else:
        assert back == value


def make_closure(k):
    def times(x):
        return x * k

    return times


def test_lambdas_closures_and_local_classes_take_dill():
    class Local:
        def __init__(self, v):
            self.v = v

        def twice(self):
            return 2 * self.v

    square = lambda x: x * x  # noqa: E731 - a lambda is the point
    cases = [square, make_closure(3), Local, Local(21), {"nested": [square]}]
    for value in cases:
        data = encode(value)
        assert data[0] == DILL == ord("d"), value
    assert decode(encode(square))(7) == 49
    assert decode(encode(make_closure(3)))(5) == 15
    assert decode(encode(Local(21))).twice() == 42
    assert decode(encode(Local))(4).twice() == 8
    assert decode(encode({"nested": [square]}))["nested"][0](3) == 9


DECODE_ELSEWHERE = """
import sys
from ikos._codec import decode
value = decode(sys.stdin.buffer.read())
print(value.describe(), value.fn(2), value.__class__.__name__)
"""


def test_main_references_take_dill_and_load_in_another_process():
    """A class pickle could only name as ``__main__.X`` is sent by value instead."""
    main = sys.modules["__main__"]

    class MainThing:
        def __init__(self):
            self.fn = lambda x: x + 40

        def describe(self):
            return "from the test's main"

    MainThing.__module__ = "__main__"
    MainThing.__qualname__ = MainThing.__name__ = "IkosTestMainThing"
    main.IkosTestMainThing = MainThing
    try:
        plain_class_ref = encode(MainThing)  # picklable by reference, but to __main__
        assert plain_class_ref[0] == DILL
        data = encode(MainThing())
        assert data[0] == DILL
    finally:
        delattr(main, "IkosTestMainThing")
    res = subprocess.run(
        [sys.executable, "-c", DECODE_ELSEWHERE],
        input=data,
        capture_output=True,
        timeout=60,
        cwd="/",
    )
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().split() == [
        "from",
        "the",
        "test's",
        "main",
        "42",
        "IkosTestMainThing",
    ]


def test_plain_strings_mentioning_main_still_round_trip():
    # The __main__ check looks at bytes: data that merely mentions it goes by dill. Slower, correct.
    value = {"module": "__main__", "payload": b"__main__"}
    assert decode(encode(value)) == value


def test_unknown_codec_byte_is_refused():
    with pytest.raises(ValueError, match="unknown codec byte"):
        decode(b"x" + encode(1)[1:])


def test_encode_fails_clearly_for_what_neither_codec_can_carry():
    with pytest.raises(TypeError, match="generator"):
        encode(x for x in ())


# -- handshake state machine -----------------------------------------------------------


def client_hello(nonce_c: bytes = b"c" * NONCE) -> bytes:
    return MAGIC + nonce_c


def server_reply_ok(
    out: bytes, nonce_c: bytes, secret: bytes = SECRET, limit: int = DEFAULT_MAX_FRAME
) -> bytes:
    """Check the server's answer as a client would; return the server's nonce."""
    assert len(out) == SERVER_LEN
    nonce_s, announced, mac_s = out[:NONCE], out[NONCE:-MAC], out[-MAC:]
    assert HEADER.unpack(announced) == (limit,)
    assert mac_s == _mac(secret, b"server", nonce_c, nonce_s + announced)
    return nonce_s


def test_handshake_fed_byte_by_byte():
    hs = ServerHandshake(SECRET)
    nonce_c = os.urandom(NONCE)
    hello = client_hello(nonce_c)
    outs = [hs.feed(hello[i : i + 1]) for i in range(len(hello))]
    assert outs[:-1] == [b""] * (HELLO_LEN - 1)
    nonce_s = server_reply_ok(outs[-1], nonce_c)
    proof = _mac(SECRET, b"client", nonce_s, nonce_c)
    for i in range(MAC - 1):
        assert hs.feed(proof[i : i + 1]) == b""
        assert not hs.done
    assert hs.feed(proof[-1:]) == b""
    assert hs.done and hs.leftover == b""


def test_handshake_keeps_frame_bytes_sent_behind_the_proof():
    hs = ServerHandshake(SECRET)
    nonce_c = os.urandom(NONCE)
    nonce_s = server_reply_ok(hs.feed(client_hello(nonce_c)), nonce_c)
    tail = frame(encode("first")) + frame(encode("second"))[:3]
    assert hs.feed(_mac(SECRET, b"client", nonce_s, nonce_c) + tail) == b""
    assert hs.done and hs.leftover == tail


def test_handshake_announces_the_frame_limit_under_the_mac():
    hs = ServerHandshake(SECRET, 65536)
    nonce_c = os.urandom(NONCE)
    out = hs.feed(client_hello(nonce_c))
    server_reply_ok(out, nonce_c, limit=65536)
    # A limit altered on the way fails the client's check of the server's MAC.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        b.sendall(out[:NONCE] + HEADER.pack(2**31) + out[-MAC:])
        with pytest.raises(ikos.AuthenticationError):
            client_handshake(a, SECRET, 2)


def test_handshake_nonces_are_fresh():
    a, b = ServerHandshake(SECRET), ServerHandshake(SECRET)
    hello = client_hello()
    assert a.feed(hello)[:NONCE] != b.feed(hello)[:NONCE]


@pytest.mark.parametrize(
    "first",
    [b"X", b"IKX", b"ikos1", b"IKOS1" + b"n" * NONCE, b"\x00" * 100, b"GET / HTTP/1.1\r\n"],
)
def test_handshake_refuses_bad_magic_as_soon_as_it_shows(first):
    hs = ServerHandshake(SECRET)
    with pytest.raises(ikos.AuthenticationError, match="bad magic"):
        hs.feed(first)
    assert not hs.done


def test_handshake_accepts_a_prefix_of_the_magic():
    hs = ServerHandshake(SECRET)
    assert hs.feed(b"") == b""
    assert hs.feed(b"IK") == b""
    assert hs.feed(b"OS") == b""
    assert not hs.done


@pytest.mark.parametrize(
    "proof",
    [
        b"\x00" * MAC,
        "wrong secret",
        "swapped nonces",
        "server label",
    ],
)
def test_handshake_refuses_a_bad_mac(proof):
    hs = ServerHandshake(SECRET)
    nonce_c = os.urandom(NONCE)
    nonce_s = server_reply_ok(hs.feed(client_hello(nonce_c)), nonce_c)
    forged = {
        "wrong secret": _mac(b"w" * 32, b"client", nonce_s, nonce_c),
        "swapped nonces": _mac(SECRET, b"client", nonce_c, nonce_s),
        "server label": _mac(SECRET, b"server", nonce_s, nonce_c),
    }.get(proof, proof)
    assert isinstance(forged, bytes)
    with pytest.raises(ikos.AuthenticationError, match="HMAC"):
        hs.feed(forged + frame(encode("never decoded")))
    assert not hs.done and hs.leftover == b""


def test_handshake_refuses_a_proof_sent_with_the_hello():
    # A client cannot know the server's nonce yet: 32 bytes behind the hello are a bad proof.
    hs = ServerHandshake(SECRET)
    with pytest.raises(ikos.AuthenticationError):
        hs.feed(client_hello() + os.urandom(MAC))


def serve(sock: socket.socket, secret: bytes, result: dict) -> None:
    """Drive a ServerHandshake over a real socket, as the actor runtime does."""
    hs = ServerHandshake(secret, 12345)
    try:
        sock.settimeout(5)
        while not hs.done:
            data = sock.recv(4096)
            if not data:
                result["error"] = ConnectionResetError("client hung up")
                return
            out = hs.feed(data)
            if out:
                sock.sendall(out)
        rest = hs.leftover
        while len(rest) < 4 or len(rest) < 4 + HEADER.unpack_from(rest)[0]:
            data = sock.recv(4096)  # at most 5 s each (the timeout above)
            if not data:
                result["error"] = ConnectionResetError("client hung up mid-message")
                return
            rest += data
        result["message"] = decode(rest[4:])
    except Exception as exc:
        result["error"] = exc


def run_pair(client_secret: bytes, server_secret: bytes, message: object = "hello"):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    result: dict = {}
    server = threading.Thread(target=serve, args=(b, server_secret, result))
    server.start()
    try:
        result["limit"] = client_handshake(a, client_secret, 5)
        a.sendall(frame(encode(message)))
        return result, None
    except Exception as exc:
        return result, exc
    finally:
        a.close()
        server.join(10)
        b.close()
        assert not server.is_alive()


def test_client_handshake_against_server_handshake():
    result, client_error = run_pair(SECRET, SECRET, {"after": "the handshake"})
    assert client_error is None
    assert result == {"message": {"after": "the handshake"}, "limit": 12345}


def test_wrong_secret_raises_authentication_error_on_both_sides():
    other = b"o" * 32
    result, client_error = run_pair(other, SECRET)
    # The client checks the server's MAC first: it refuses a server without its secret ...
    assert isinstance(client_error, ikos.AuthenticationError)
    assert "wrong instance secret" in str(client_error)
    # ... and never sends a proof, so the server sees a hang-up, not a message.
    assert "message" not in result
    # A client that skips its check and proves the wrong secret is refused by the server.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    result = {}
    server = threading.Thread(target=serve, args=(b, SECRET, result))
    server.start()
    try:
        nonce_c = os.urandom(NONCE)
        a.settimeout(10)  # a server that died or hangs is a failure, not a hang
        a.sendall(client_hello(nonce_c))
        answer = b""
        while len(answer) < SERVER_LEN:
            chunk = a.recv(SERVER_LEN - len(answer))
            assert chunk, "the server hung up before its answer"
            answer += chunk
        a.sendall(_mac(other, b"client", answer[:NONCE], nonce_c) + frame(encode("x")))
    finally:
        server.join(10)
        a.close()
        b.close()
    assert isinstance(result.get("error"), ikos.AuthenticationError)
    assert "message" not in result


def test_client_handshake_times_out_on_a_silent_server():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(TimeoutError):
            client_handshake(a, SECRET, 0.2)
        hello = b.recv(100)
        assert hello.startswith(MAGIC) and len(hello) == HELLO_LEN
    finally:
        a.close()
        b.close()


def test_client_handshake_sees_a_hang_up():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    try:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            client_handshake(a, SECRET, 1)
    finally:
        a.close()


# -- the instance secret -------------------------------------------------------------


def test_ensure_secret_creates_a_private_file_and_reuses_it(tmp_path):
    path = tmp_path / "state" / "secret"
    first = ensure_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_secret(path) == first
    assert read_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary left


def test_ensure_secret_replaces_a_truncated_secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"short")
    with pytest.raises(ikos.AuthenticationError, match="too short"):
        read_secret(path)
    fresh = ensure_secret(path)
    assert len(fresh) == 32 and fresh != b"short"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_read_secret_errors_name_the_file(tmp_path):
    with pytest.raises(ikos.AuthenticationError, match=r"no instance secret at .*nothing"):
        read_secret(tmp_path / "nothing")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_read_secret_permission_denied(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 32)
    path.chmod(0)
    with pytest.raises(ikos.AuthenticationError, match="permission denied"):
        read_secret(path)


# -- paths ---------------------------------------------------------------------------


def test_instance_paths_for_root_layout(tmp_path):
    paths = InstancePaths.for_root(tmp_path / "inst")
    base = (tmp_path / "inst").resolve()
    assert paths.root == base
    assert paths.run_dir == base / "run" / "ikos"
    assert paths.control_socket == base / "run" / "ikos" / "ikosd.sock"
    assert paths.pid_file == base / "run" / "ikos" / "ikosd.pid"
    assert paths.actors_dir == base / "run" / "ikos" / "actors"
    assert paths.actor_socket("echo") == base / "run" / "ikos" / "actors" / "echo.sock"
    assert paths.state_dir == base / "var" / "lib" / "ikos"
    assert paths.secret_file == base / "var" / "lib" / "ikos" / "secret"
    assert paths.log_dir == base / "var" / "log" / "ikos"
    assert paths.config_file == base / "etc" / "ikos" / "ikos.toml"


def test_instance_paths_resolve_relative_roots_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert InstancePaths.for_root("rel").root == (tmp_path / "rel").resolve()
    monkeypatch.setenv("IKOS_ROOT", str(tmp_path / "env"))
    assert InstancePaths.resolve().root == (tmp_path / "env").resolve()
    assert InstancePaths.resolve(tmp_path / "explicit").root == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("IKOS_ROOT")
    assert InstancePaths.resolve() == InstancePaths.default()
    assert InstancePaths.default().root is None


def test_instance_paths_create_sets_modes(tmp_path):
    paths = InstancePaths.for_root(tmp_path / "inst")
    paths.create()
    paths.create()  # idempotent
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(paths.actors_dir) == 0o700
    assert mode(paths.state_dir) == 0o700
    assert mode(paths.run_dir) == 0o755
    assert paths.log_dir.is_dir()


# -- Unix sockets at long paths ----------------------------------------------------------


def long_dir(tmp_path: Path) -> Path:
    d = tmp_path
    while len(os.fsencode(d / "x.sock")) <= 120:
        d = d / ("d" * 40)
    d.mkdir(parents=True)
    return d


def test_long_path_bind_and_connect(tmp_path):
    path = long_dir(tmp_path) / "mailbox.sock"
    assert len(os.fsencode(path)) > 108
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix(server, path, 0o600)
        server.listen(1)
        assert path.is_socket()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        client.settimeout(5)
        connect_unix(client, path)
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
    finally:
        client.close()
        server.close()
    # A stale socket file from a previous run is replaced.
    again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix(again, path)
        again.listen(1)
    finally:
        again.close()


def test_short_path_leaves_short_paths_alone(tmp_path):
    with short_path("/tmp/a.sock") as p:
        assert p == "/tmp/a.sock"
    longp = long_dir(tmp_path) / "x.sock"
    with short_path(longp) as p:
        assert len(os.fsencode(p)) <= SUN_PATH_MAX
        assert p.startswith("/proc/self/fd/") and p.endswith("/x.sock")


def test_connect_to_a_missing_long_path_raises_file_not_found(tmp_path):
    path = long_dir(tmp_path) / "absent.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(FileNotFoundError):
            connect_unix(sock, path)
    finally:
        sock.close()
