"""The control client against a scripted ikosd on a real Unix socket.

:class:`ScriptedPeer` is the server side of the protocol reduced to a
script: a thread accepts connections on the instance's control socket, reads
request lines, records them and answers what the test scripted for each
verb (a result, an error, events, garbage, a hang or a hang-up). The ikosctl
unit tests use it too. Nothing of ikos is faked: the client under test opens
real sockets and parses real bytes.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from ikos._errors import ManagerError, ManagerUnavailable, NoSuchDaemon, PermissionDenied
from ikos.platform._control import ControlClient, EventStream, bind_unix, connect_unix
from ikos.platform._paths import InstancePaths

HANG = "hang"
"""Action: answer nothing until the peer stops."""
CLOSE = "close"
"""Action: hang up."""

Action = dict[str, Any] | bytes | str
Script = Callable[[dict[str, Any]], Sequence[Action]]


def ok(result: Any) -> Script:
    """Answer success with ``result``."""
    return lambda request: [{"id": request["id"], "ok": True, "result": result}]


def fail(code: str, message: str) -> Script:
    """Answer failure with ``code`` and ``message``."""
    return lambda request: [
        {"id": request["id"], "ok": False, "error": {"code": code, "message": message}}
    ]


def events(items: list[Any], result: Any = None) -> Script:
    """Answer a stream: one event line per item, then success."""
    return lambda request: (
        [{"id": request["id"], "event": item} for item in items]
        + [{"id": request["id"], "ok": True, "result": result}]
    )


def raw(*actions: Action) -> Script:
    """Answer exactly these actions (bytes sent as is, HANG, CLOSE)."""
    return lambda request: list(actions)


def echo_args(request: dict[str, Any]) -> list[Action]:
    """Answer success with the request's own args."""
    return [{"id": request["id"], "ok": True, "result": request["args"]}]


class ScriptedPeer:
    """A scripted ikosd listening on ``socket_path`` (see the module docstring).

    ``scripts`` maps a verb to a :data:`Script`; an unscripted verb gets
    ``unknown_verb``, as from a server that does not implement it.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.scripts: dict[str, Script] = {}
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.answered = 0
        self.closed = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_unix(self._listener, socket_path)
        self._listener.listen(16)
        self._wake_r, self._wake_w = os.pipe()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> None:
        """Start accepting connections."""
        self._acceptor.start()

    def __enter__(self) -> ScriptedPeer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, wake every hanging answer, close and join everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=10)
        with self._cond:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=10)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        assert not self._acceptor.is_alive() and not any(t.is_alive() for t in threads)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (it runs under the peer's lock)."""
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "the peer never got there"

    def sent(self) -> list[tuple[str, dict[str, Any]]]:
        """(verb, args) of every request received so far."""
        with self._cond:
            return [(r["verb"], r.get("args", {})) for r in self.requests]

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is not self._listener:
                        return
                    conn, _ = self._listener.accept()
                    thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                    with self._cond:
                        self._conns.append(conn)
                        self._threads.append(thread)
                        self.connections += 1
                        self._cond.notify_all()
                    thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    with self._cond:
                        self.requests.append(request)
                        self._cond.notify_all()
                    script = self.scripts.get(request["verb"])
                    if script is None:
                        script = fail("unknown_verb", f"unknown verb '{request['verb']}'")
                    for action in script(request):
                        if action == HANG:
                            self._stopping.wait(timeout=60)
                            return
                        if action == CLOSE:
                            return
                        if isinstance(action, dict):
                            action = json.dumps(action).encode() + b"\n"
                        assert isinstance(action, bytes)
                        conn.sendall(action)
                    with self._cond:
                        self.answered += 1
                        self._cond.notify_all()
        except OSError:
            pass
        finally:
            conn.close()
            with self._cond:
                self.closed += 1
                self._cond.notify_all()


def instance(root: Path) -> InstancePaths:
    """The paths of an instance under ``root``, its run directory created."""
    paths = InstancePaths.for_root(root)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    return paths


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InstancePaths:
    monkeypatch.delenv("IKOS_ROOT", raising=False)
    return instance(tmp_path)


@pytest.fixture
def peer(paths: InstancePaths) -> Iterator[ScriptedPeer]:
    server = ScriptedPeer(paths.control_socket)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(paths: InstancePaths) -> Iterator[ControlClient]:
    with ControlClient(paths, timeout=10.0) as c:
        yield c


def deep_root(tmp_path: Path) -> Path:
    """A root whose control socket path is longer than ``sun_path`` allows."""
    root = tmp_path / ("r" * 60) / ("o" * 60) / ("t" * 60)
    assert len(os.fsencode(InstancePaths.for_root(root).control_socket)) > 108
    return root


# --- calls ------------------------------------------------------------------


def test_call_sends_one_request_line_and_returns_the_result(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    status = {"name": "echo", "state": "running"}
    peer.scripts["status"] = ok([status])
    assert client.call("status", {"names": ["echo"]}) == [status]
    assert peer.requests == [{"id": 1, "verb": "status", "args": {"names": ["echo"]}}]


def test_missing_args_are_sent_as_an_empty_object(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["list"] = ok([])
    client.call("list")
    assert peer.sent() == [("list", {})]


def test_one_connection_serves_every_call(peer: ScriptedPeer, client: ControlClient) -> None:
    peer.scripts["list"] = ok([])
    peer.scripts["tree"] = fail("failed", "no tree")
    client.call("list")
    with pytest.raises(ManagerError):
        client.call("tree")
    client.call("list")
    assert peer.connections == 1
    assert [r["id"] for r in peer.requests] == [1, 2, 3]


def test_a_connection_the_server_closed_while_idle_is_replaced(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["list"] = lambda request: [*ok([])(request), CLOSE]
    client.call("list")
    peer.wait_for(lambda: peer.closed == 1)
    client.call("list")
    assert peer.connections == 2


def test_a_large_answer_arriving_in_pieces_is_read_whole(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    big = [{"name": f"d{i}", "description": "x" * 100} for i in range(5000)]
    peer.scripts["list"] = ok(big)
    assert client.call("list") == big


def test_bytes_nobody_asked_for_make_the_next_call_reconnect(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["list"] = lambda request: [*ok([])(request), b'{"id": 7, "ok": true}\n']
    client.call("list")
    peer.wait_for(lambda: peer.answered == 1)
    assert client.call("list") == []
    assert peer.connections == 2


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        ("no_such_daemon", NoSuchDaemon),
        ("permission_denied", PermissionDenied),
        ("unknown_verb", ManagerError),
        ("failed", ManagerError),
    ],
)
def test_a_failure_raises_the_exception_of_its_code(
    peer: ScriptedPeer, client: ControlClient, code: str, exception: type[ManagerError]
) -> None:
    peer.scripts["start"] = fail(code, "no daemon named 'ech'")
    with pytest.raises(exception) as info:
        client.call("start", {"name": "ech"})
    assert info.value.code == code
    assert str(info.value) == "no daemon named 'ech'"


def test_threads_share_a_client_without_mixing_answers(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["echo"] = echo_args
    results: dict[int, list[Any]] = {}

    def worker(n: int) -> None:
        results[n] = [client.call("echo", {"n": n, "i": i}) for i in range(25)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {n: [{"n": n, "i": i} for i in range(25)] for n in range(8)}
    assert peer.connections == 1


def test_closing_the_client_closes_the_connection(peer: ScriptedPeer, paths: InstancePaths) -> None:
    peer.scripts["list"] = ok([])
    with ControlClient(paths) as c:
        c.call("list")
    peer.wait_for(lambda: peer.closed == 1)


def test_the_default_paths_come_from_ikos_root(
    peer: ScriptedPeer, paths: InstancePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert paths.root is not None
    monkeypatch.setenv("IKOS_ROOT", str(paths.root))
    peer.scripts["list"] = ok(["x"])
    with ControlClient() as c:
        assert c.socket_path == paths.control_socket
        assert c.call("list") == ["x"]


# --- failures of the transport ----------------------------------------------


def test_a_missing_socket_is_unavailable_and_named(paths: InstancePaths) -> None:
    with ControlClient(paths) as c, pytest.raises(ManagerUnavailable) as info:
        c.call("list")
    assert str(paths.control_socket) in str(info.value)
    assert "is it running?" in str(info.value)


def test_a_socket_nobody_listens_on_is_unavailable(paths: InstancePaths) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix(stale, paths.control_socket)  # bound, never listening: refused
        with ControlClient(paths) as c, pytest.raises(ManagerUnavailable) as info:
            c.call("list")
        assert str(paths.control_socket) in str(info.value)
    finally:
        stale.close()


def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["status"] = raw(HANG)
    peer.scripts["list"] = ok([])
    with pytest.raises(ManagerError) as info:
        client.call("status", timeout=0.2)
    assert info.value.code == "timeout"
    assert "did not answer 'status' within 0.2s" in str(info.value)
    # The late answer must never be read as the next call's.
    assert client.call("list") == []
    assert peer.connections == 2


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b"hello\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"id": 99, "ok": true, "result": 1}\n', "answer id 99"),
        (b'{"id": 1, "result": 1}\n', "no boolean 'ok'"),
        (b'{"id": 1, "ok": false, "error": "bad"}\n', "without code and message"),
        (b'{"id": 1, "event": 1}\n', "an event for a plain request"),
    ],
)
def test_a_malformed_answer_is_a_bad_response(
    peer: ScriptedPeer, client: ControlClient, answer: bytes, detail: str
) -> None:
    peer.scripts["list"] = raw(answer)
    with pytest.raises(ManagerError) as info:
        client.call("list")
    assert info.value.code == "bad_response"
    assert detail in str(info.value)
    assert str(peer.socket_path) in str(info.value)


def test_a_server_that_hangs_up_mid_answer_is_a_lost_connection(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["list"] = raw(b'{"id": 1, "ok": tr', CLOSE)
    with pytest.raises(ManagerError) as info:
        client.call("list")
    assert info.value.code == "connection_lost"
    assert "closed the connection before answering 'list'" in str(info.value)


def test_arguments_that_are_not_json_are_refused_before_sending(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    with pytest.raises(ManagerError) as info:
        client.call("tell", {"name": "echo", "data": object()})
    assert info.value.code == "bad_request"
    with pytest.raises(ManagerError) as info:
        client.call("tell", {"name": "echo", "data": float("nan")})
    assert info.value.code == "bad_request"
    assert peer.requests == []


def test_a_request_over_the_protocol_limit_is_refused_before_sending(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    with pytest.raises(ManagerError) as info:
        client.call("tell", {"name": "echo", "data": "x" * (1 << 20)})
    assert info.value.code == "bad_request"
    assert peer.connections == 0


# --- long socket paths --------------------------------------------------------


def test_socket_paths_longer_than_sun_path_still_connect(
    tmp_path: Path,
) -> None:
    paths = instance(deep_root(tmp_path))
    with ScriptedPeer(paths.control_socket) as server:
        assert stat.S_ISSOCK(os.stat(paths.control_socket).st_mode)
        server.scripts["list"] = ok([{"name": "echo"}])
        with ControlClient(paths, timeout=10.0) as c:
            assert c.call("list") == [{"name": "echo"}]


def test_connect_unix_accepts_short_paths_and_reports_missing_ones(tmp_path: Path) -> None:
    long_missing = deep_root(tmp_path) / "run" / "ikosd.sock"
    for path in (tmp_path / "absent.sock", long_missing):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            with pytest.raises(FileNotFoundError):
                connect_unix(s, path)


# --- streams --------------------------------------------------------------------


def test_a_stream_yields_events_until_the_final_answer(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["subscribe"] = events(["a", {"b": 2}, 3], result={"count": 3})
    stream = client.stream("subscribe", {"topic": "t"})
    assert isinstance(stream, EventStream)
    assert list(stream) == ["a", {"b": 2}, 3]
    assert stream.result == {"count": 3}
    assert peer.sent() == [("subscribe", {"topic": "t"})]
    peer.wait_for(lambda: peer.closed == 1)


def test_a_refused_stream_raises_on_the_first_event(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    with client.stream("subscribe", {"topic": "t"}) as stream, pytest.raises(ManagerError) as info:
        next(stream)
    assert info.value.code == "unknown_verb"


def test_a_stream_cut_short_is_a_lost_connection(peer: ScriptedPeer, client: ControlClient) -> None:
    peer.scripts["logs"] = lambda request: [*events(["one"])(request)[:1], CLOSE]
    with client.stream("logs", {"name": "echo", "follow": True}) as stream:
        assert next(stream) == "one"
        with pytest.raises(ManagerError) as info:
            next(stream)
    assert info.value.code == "connection_lost"


def test_a_stream_has_its_own_connection_and_closing_it_hangs_up(
    peer: ScriptedPeer, client: ControlClient
) -> None:
    peer.scripts["logs"] = lambda request: [{"id": request["id"], "event": "line"}, HANG]
    peer.scripts["list"] = ok([])
    stream = client.stream("logs", {"name": "echo", "follow": True})
    assert next(stream) == "line"
    assert client.call("list") == []  # not blocked by the open stream
    assert peer.connections == 2
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


def test_a_silent_stream_times_out_when_asked_to(peer: ScriptedPeer, client: ControlClient) -> None:
    peer.scripts["logs"] = lambda request: [{"id": request["id"], "event": "line"}, HANG]
    with client.stream("logs", {"name": "echo"}, idle_timeout=0.2) as stream:
        assert next(stream) == "line"
        with pytest.raises(ManagerError) as info:
            next(stream)
    assert info.value.code == "timeout"


def test_a_stream_to_a_missing_socket_is_unavailable(paths: InstancePaths) -> None:
    with ControlClient(paths) as c, pytest.raises(ManagerUnavailable):
        c.stream("subscribe", {"topic": "t"})
