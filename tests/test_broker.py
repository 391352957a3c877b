"""The IPC broker on its wire: the real broker process and a small client speaking frames.

Each test starts ``python -m ikos.ipc._broker --root ROOT`` with a ``broker.json``
written by the test (no ikosd needed, except for the actor test) and talks to it
with :class:`Wire`, which knows nothing but the frame format of docs/protocol.md.
The pure parts (topic matching, the subscription index, policy decisions) have unit
tests first, checked against brute force where the input space is large.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import itertools
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_local_users
from conftest import HANG, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from ikos.ipc._client import BrokerClient
from ikos.ipc._frames import LENGTHS, Frame, FrameError, FrameReader, FrameTooLarge, encode_frame
from ikos.ipc._policy import Peer, allowed, covers, parse_policy
from ikos.ipc._subscription import Subscription
from ikos.ipc._topics import SubscriptionIndex, matches, pattern_error, topic_error
from ikos.platform._paths import InstancePaths

# -- topics and patterns -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("net.*", "net.eth0", True),
        ("net.*", "net.eth0.up", False),
        ("net.*", "net", False),
        ("dev.#", "dev", True),
        ("dev.#", "dev.usb.1", True),
        ("#", "a.b.c", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("*.b", "a.b", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
    ],
)
def test_pattern_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add(pattern, "k")
    assert bool(index.match(topic)) is expected


def test_topic_and_pattern_validation_names_the_segment() -> None:
    assert topic_error("net.eth0") is None
    assert topic_error("a:b@c_d-e") is None
    assert "bad segment ''" in str(topic_error("net..x"))
    assert "bad segment '*'" in str(topic_error("net.*"))
    assert "bad segment 'a/b'" in str(topic_error("a/b"))
    assert "longer than 255" in str(topic_error("a" * 256))
    assert "must be a string" in str(topic_error(3))
    assert "empty" in str(topic_error(""))
    assert pattern_error("net.*.#") is None
    assert "bad segment 'a*'" in str(pattern_error("a*.b"))


SEGMENTS = st.sampled_from(["a", "b", "c"])
PATTERN_SEGMENTS = st.sampled_from(["a", "b", "c", "*", "#"])


@settings(max_examples=300, deadline=None)
@given(
    patterns=st.lists(st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4), max_size=8),
    topics=st.lists(st.lists(SEGMENTS, min_size=1, max_size=5), min_size=1, max_size=8),
    removed=st.sets(st.integers(0, 7)),
)
def test_index_agrees_with_brute_force(
    patterns: list[list[str]], topics: list[list[str]], removed: set[int]
) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    subs = {(".".join(p), n) for n, p in enumerate(patterns)}
    for pattern, n in subs:
        index.add(pattern, n)
    for t in topics:  # fill the cache, then change the subscriptions under it
        index.match(".".join(t))
    for pattern, n in list(subs):
        if n in removed:
            assert index.remove(pattern, n)
            subs.discard((pattern, n))
    for t in topics:
        topic = ".".join(t)
        got = {(p, k) for p, keys in index.match(topic) for k in keys}
        assert got == {(p, n) for p, n in subs if matches(p, topic)}
    for pattern, n in subs:
        index.remove(pattern, n)
    assert len(index) == 0 and index._root.children == {}


def test_many_hashes_in_a_pattern_cost_polynomial_time() -> None:
    # '#.#.#...x' against a long topic: exponential for a backtracking matcher, and a
    # pattern any subscriber may send. Run apart, so that a regression fails (timeout)
    # instead of hanging the suite.
    code = textwrap.dedent(
        """
        from ikos.ipc._policy import covers
        from ikos.ipc._topics import SubscriptionIndex, matches
        p = ".".join(["#"] * 120 + ["x"])
        t = ".".join(["a"] * 127)
        index = SubscriptionIndex()
        index.add(p, 1)
        assert not matches(p, t) and matches(p, t + ".x")
        assert not index.match(t) and index.match(t + ".x")
        assert covers("#.x.#", p) and not covers("a.#", p)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=HANG, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


# -- frames --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(["id", "topic", "x"]), st.integers(), max_size=3),
            st.binary(max_size=300),
        ),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
    share=st.booleans(),
)
def test_frames_parse_the_same_however_the_stream_is_cut(
    frames: list[tuple[dict[str, int], bytes]], cuts: list[int], share: bool
) -> None:
    stream = b"".join(encode_frame({"op": "t", **h}, p) for h, p in frames)
    reader = FrameReader(1000, share_headers=share)
    got = []
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        reader.feed(stream[start:cut])
        start = cut
        got.extend((f.header, f.payload) for f in reader.frames())
    assert got == [({"op": "t", **h}, p) for h, p in frames]
    assert reader.buffered == 0


def test_frame_limits_are_checked_before_buffering() -> None:
    reader = FrameReader(100)
    reader.feed(LENGTHS.pack(4 + 10 + 101, 10))  # only the lengths: refused already
    with pytest.raises(FrameTooLarge, match="101 bytes exceeds the limit of 100"):
        list(reader.frames())
    for lengths, message in (
        (LENGTHS.pack(4, 0), "bad frame lengths"),
        (LENGTHS.pack(70000, 65537), "bad frame lengths"),
        (LENGTHS.pack(5, 2), "bad frame lengths"),
    ):
        reader = FrameReader(100)
        reader.feed(lengths)
        with pytest.raises(FrameError, match=message):
            list(reader.frames())
    shared = FrameReader(100, share_headers=True)
    shared.feed(encode_frame({"op": "p", "topic": "a"}) * 2)
    first, second = shared.frames()
    assert first.header is second.header  # parsed once


# -- the policy ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    granted=st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4),
    requested=st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4),
    topics=st.lists(st.lists(SEGMENTS, min_size=1, max_size=6), max_size=30),
)
def test_a_covered_subscription_only_reaches_granted_topics(
    granted: list[str], requested: list[str], topics: list[list[str]]
) -> None:
    g, r = ".".join(granted), ".".join(requested)
    if covers(g, r):
        for t in topics:
            topic = ".".join(t)
            if matches(r, topic):
                assert matches(g, topic), (g, r, topic)


def test_policy_grants_by_uid_gid_and_supplementary_group() -> None:
    policy = parse_policy(
        1000,
        [
            {"uids": [1001], "publish": ["app.#"], "subscribe": ["app.*"]},
            {"gids": [50], "call": ["log"], "queues": ["jobs"]},
        ],
    )
    owner, root = Peer(1, 1000, 1000), Peer(2, 0, 0)
    assert policy.trusted(owner) and policy.trusted(root)
    assert policy.grants(owner)["serve"] == ("#",)
    u = policy.grants(Peer(3, 1001, 1001))
    assert allowed(u["publish"], "app.x.y", "publish")
    assert not allowed(u["publish"], "sys.x", "publish")
    assert allowed(u["subscribe"], "app.*", "subscribe")
    assert not allowed(u["subscribe"], "app.#", "subscribe")  # wider than granted
    assert not allowed(u["call"], "log", "call")
    member = policy.grants(Peer(4, 1002, 1002, frozenset({50})))
    assert allowed(member["call"], "log", "call") and allowed(member["queues"], "jobs", "queues")
    assert not any(policy.grants(Peer(5, 1003, 1003)).values())


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"uids": [1]}, "must be a list of rules"),
        ([{"uids": "1"}], "policy[0].uids must be a list of non-negative integers"),
        ([{"uids": [1], "publish": ["a..b"]}], "policy[0].publish: bad segment ''"),
        ([{"uids": [1], "pubish": []}], "policy[0] has unknown keys ['pubish']"),
    ],
)
def test_bad_policy_is_reported_where_it_is_wrong(rules: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(0, rules)


# -- a client of the wire ------------------------------------------------------------


#: The ops that answer a request (a get answers "message" or "empty", with the id).
ANSWERS = frozenset({"ok", "error", "response", "message", "empty"})


class Wire:
    """A minimal broker client: frames out, frames in, descriptors both ways."""

    def __init__(self, path: Path, *, hello: bool = True, name: str = "test") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(HANG)
        self.sock.connect(str(path))
        self.reader = FrameReader(1 << 28)
        self.ids = itertools.count(1)
        self.backlog: list[Frame] = []
        self.welcome: dict[str, Any] = {}
        if hello:
            self.send({"op": "hello", "version": 1, "name": name})
            frame = self.recv()
            assert frame is not None and frame.op == "welcome", frame
            self.welcome = frame.header

    def send(self, header: dict[str, Any], payload: bytes = b"", fd: int | None = None) -> None:
        data = encode_frame(header, payload)
        if fd is None:
            self.sock.sendall(data)
        else:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            n = self.sock.sendmsg([data], anc)
            if n < len(data):
                self.sock.sendall(data[n:])

    def recv(self, timeout: float = HANG) -> Frame | None:
        """The next frame, or None when the broker closed the connection."""
        if self.backlog:
            return self.backlog.pop(0)
        self.sock.settimeout(timeout)
        while True:
            for frame in self.reader.frames():
                return frame
            data, anc, _flags, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            fds: list[int] = []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[: len(raw) - len(raw) % 4])
                    fds.extend(a)
            if not data and not fds:
                return None
            self.reader.feed(data, fds)

    def expect(self, op: str, timeout: float = HANG) -> Frame:
        """The next frame with ``op``, keeping the others for later."""
        skipped = []
        try:
            while True:
                frame = self.recv(timeout)
                assert frame is not None, f"closed while waiting for {op!r}"
                if frame.op == op:
                    return frame
                skipped.append(frame)
        finally:
            self.backlog[:0] = skipped

    def call(self, op: str, payload: bytes = b"", fd: int | None = None, **fields: Any) -> Frame:
        """Send a request with a fresh id and return its answer (ok, error, response...)."""
        rid = next(self.ids)
        self.send({"op": op, "id": rid, **fields}, payload, fd)
        skipped = []
        try:
            while True:
                frame = self.recv()
                assert frame is not None, f"closed while waiting for the answer to {op!r}"
                if frame.header.get("id") == rid and frame.op in ANSWERS:
                    return frame
                skipped.append(frame)
        finally:
            self.backlog[:0] = skipped

    def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        frame = self.call(op, **fields)
        assert frame.op == "ok", frame.header
        return frame.header

    def closed_by_broker(self) -> dict[str, Any] | None:
        """Read to the end: the error frame the broker sent before closing, if any."""
        error = None
        while True:
            try:
                frame = self.recv()
            except ConnectionResetError:
                return error
            if frame is None:
                return error
            if frame.op == "error":
                error = frame.header["error"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# -- the broker process --------------------------------------------------------------

DEFAULT_CONFIG: dict[str, Any] = {
    "owner_uid": os.getuid(),
    "subscriber_queue": 10000,
    "slow_subscriber": "drop-oldest",
    "shm_threshold": 1 << 20,
    "max_frame": 1 << 20,
    "max_clients": 4096,
    "max_clients_per_uid": 256,
    "queues": {"max_deliveries": 5, "visibility_timeout": 30.0, "max_messages": 1000000},
    "policy": [],
    "audit_log": "LOG/ipc-audit.log",
}


@dataclass
class BrokerProcess:
    root: Path
    proc: subprocess.Popen[bytes]
    output: Path
    clients: list[Wire] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "ikos" / "ipc" / "broker.sock"

    @property
    def config_path(self) -> Path:
        return self.root / "run" / "ikos" / "ipc" / "broker.json"

    @property
    def audit_path(self) -> Path:
        return self.root / "var" / "log" / "ikos" / "ipc-audit.log"

    def connect(self, **kwargs: Any) -> Wire:
        wire = Wire(self.socket_path, **kwargs)
        self.clients.append(wire)
        return wire

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stats(self) -> dict[str, Any]:
        wire = Wire(self.socket_path, name="stats")
        try:
            stats: dict[str, Any] = wire.ok("stats")["stats"]
            return stats
        finally:
            wire.close()

    def write_config(self, **changes: Any) -> None:
        config = {**DEFAULT_CONFIG, **changes}
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        tmp.replace(self.config_path)


def start_broker(base: Path, env: dict[str, str] | None = None, **config: Any) -> BrokerProcess:
    root = base / f"root-{uuid.uuid4().hex[:6]}"
    ipc = root / "run" / "ikos" / "ipc"
    ipc.mkdir(parents=True)
    output = base / f"broker-{root.name}.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ikos.ipc._broker", "--root", str(root)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    broker = BrokerProcess(root, proc, output)
    broker.write_config(**config)

    wait_listening(proc, broker.socket_path, output)
    return broker


def wait_listening(proc: subprocess.Popen[bytes], path: Path, output: Path) -> None:
    """Wait until the broker accepts connections at ``path`` (failing if it exited)."""

    def up() -> bool:
        assert proc.poll() is None, output.read_text()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True

    wait_for(up, HANG, message="the broker listening")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp is 0700): other uids connect."""
    path = Path(tempfile.mkdtemp(prefix="ikos-broker-"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def brokers(base: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers; at teardown each gets SIGTERM and must exit 0 and remove its socket."""
    started: list[BrokerProcess] = []

    def start(**config: Any) -> BrokerProcess:
        broker = start_broker(base, **config)
        started.append(broker)
        return broker

    yield start
    problems = []
    for broker in started:
        for wire in broker.clients:
            wire.close()
        if broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGTERM)
        try:
            status = broker.proc.wait(HANG)
        except subprocess.TimeoutExpired:
            broker.proc.kill()
            broker.proc.wait()
            status = None
        if status != 0:
            problems.append(f"broker exited {status}: {broker.output.read_text()[-2000:]}")
        if broker.socket_path.exists():
            problems.append("the broker left its socket file")
    assert not problems, problems


@pytest.fixture
def broker(brokers: Callable[..., BrokerProcess]) -> BrokerProcess:
    return brokers()


# -- handshake and lifecycle ---------------------------------------------------------


def test_handshake_welcome_and_socket_modes(broker: BrokerProcess) -> None:
    wire = broker.connect()
    w = wire.welcome
    assert w["version"] == 1 and w["broker_pid"] == broker.proc.pid
    assert w["uid"] == os.getuid() and w["pid"] == os.getpid() and w["trusted"] is True
    assert w["max_frame"] == 1 << 20 and w["shm_threshold"] == 1 << 20
    assert broker.socket_path.stat().st_mode & 0o777 == 0o666
    assert broker.socket_path.parent.stat().st_mode & 0o777 == 0o755


def test_ready_is_notified_and_sigterm_stops_in_order(base: Path) -> None:
    notify_path = base / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify_path))
        listener.settimeout(HANG)
        broker = start_broker(base, env={"NOTIFY_SOCKET": str(notify_path)})
        try:
            assert b"READY=1" in listener.recv(4096)
            wire = broker.connect()
            broker.proc.send_signal(signal.SIGTERM)
            assert broker.proc.wait(HANG) == 0
            assert wire.recv() is None  # closed by the broker
            wire.close()
            assert not broker.socket_path.exists()
        finally:
            if broker.proc.poll() is None:
                broker.proc.kill()
                broker.proc.wait()


def test_a_first_frame_other_than_hello_is_refused(broker: BrokerProcess) -> None:
    wire = broker.connect(hello=False)
    wire.send({"op": "publish", "topic": "a", "codec": "bytes"}, b"x")
    error = wire.closed_by_broker()
    assert error is not None and error["type"] == "bad_request"
    assert '"hello"' in error["message"]
    bad_version = broker.connect(hello=False)
    bad_version.send({"op": "hello", "version": 99})
    error = bad_version.closed_by_broker()
    assert error is not None and "unsupported version 99" in error["message"]


def test_a_silent_client_is_closed_after_the_handshake_timeout(broker: BrokerProcess) -> None:
    wire = broker.connect(hello=False)
    error = wire.closed_by_broker()
    assert error is not None and "no hello within 5 s" in error["message"]
    assert broker.stats()["counters"]["handshake_timeouts"] == 1


# -- publish/subscribe ---------------------------------------------------------------


def test_patterns_reach_exactly_their_subscribers(broker: BrokerProcess) -> None:
    pub = broker.connect(name="pub")
    one = broker.connect(name="one")
    deep = broker.connect(name="deep")
    every = broker.connect(name="every")
    one.ok("subscribe", pattern="net.*")
    deep.ok("subscribe", pattern="net.#")
    every.ok("subscribe", pattern="#")
    for topic in ("net.eth0", "net.eth0.up", "net", "dev.usb"):
        pub.send({"op": "publish", "topic": topic, "codec": "json"}, json.dumps(topic).encode())
    # in order: once this one is acknowledged, all before it were fanned out
    assert pub.call("publish", b'"end"', topic="end", codec="json", ack=True).op == "ok"

    def topics(wire: Wire, n: int) -> list[str]:
        got = []
        for _ in range(n):
            frame = wire.expect("message")
            assert json.loads(frame.payload) == frame.header["topic"]
            got.append(frame.header["topic"])
        return got

    assert topics(one, 1) == ["net.eth0"]
    assert topics(deep, 3) == ["net.eth0", "net.eth0.up", "net"]
    assert topics(every, 5) == ["net.eth0", "net.eth0.up", "net", "dev.usb", "end"]
    # nothing more arrived for the narrow subscriber
    one.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        one.sock.recv(1)
    message = deep.ok("unsubscribe", pattern="net.#")
    assert message["op"] == "ok"
    stats = broker.stats()
    assert stats["patterns"] == {"net.*": 1, "#": 1}
    assert stats["topics"]["net.eth0"]["published"] == 1
    assert stats["topics"]["net.eth0"]["delivered"] == 3


def test_a_delivery_says_who_sent_it_and_which_subscription(broker: BrokerProcess) -> None:
    pub = broker.connect()
    sub = broker.connect()
    sub.ok("subscribe", pattern="a.*")
    sub.ok("subscribe", pattern="a.#")
    pub.send({"op": "publish", "topic": "a.b", "codec": "bytes"}, b"\x00\xff")
    got = sorted((sub.expect("message").header for _ in range(2)), key=lambda h: str(h["pattern"]))
    assert [h["pattern"] for h in got] == ["a.#", "a.*"]  # one delivery per subscription
    for h in got:
        assert h["topic"] == "a.b" and h["codec"] == "bytes"
        assert h["sender_pid"] == os.getpid() and h["sender_uid"] == os.getuid()
        assert isinstance(h["message_id"], int) and abs(h["timestamp"] - time.time()) < HANG


def test_bad_publish_and_subscribe_are_errors_that_keep_the_connection(
    broker: BrokerProcess,
) -> None:
    wire = broker.connect()
    error = wire.call("subscribe", pattern="net..x").header["error"]
    assert error["type"] == "bad_request" and "bad segment ''" in error["message"]
    error = wire.call("publish", topic="a.*", codec="json", ack=True).header["error"]
    assert "bad segment '*'" in error["message"]
    error = wire.call("publish", topic="a", codec="yaml", ack=True).header["error"]
    assert '"codec" must be one of' in error["message"]
    assert wire.ok("stats")["op"] == "ok"


def test_per_publisher_order_is_kept_across_publishers(broker: BrokerProcess) -> None:
    pubs = [broker.connect(name=f"p{i}") for i in range(3)]
    sub = broker.connect()
    sub.ok("subscribe", pattern="order.#")
    n = 2000
    for seq in range(n):
        for i, pub in enumerate(pubs):
            pub.send({"op": "publish", "topic": f"order.p{i}", "codec": "json"}, b"%d" % seq)
    last = {f"order.p{i}": -1 for i in range(3)}
    for _ in range(3 * n):
        frame = sub.expect("message")
        seq = int(frame.payload)
        assert seq == last[frame.header["topic"]] + 1
        last[frame.header["topic"]] = seq
    assert set(last.values()) == {n - 1}


def _small_rcvbuf_wire(broker: BrokerProcess, name: str) -> Wire:
    wire = Wire.__new__(Wire)
    wire.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wire.sock.settimeout(HANG)
    wire.sock.connect(str(broker.socket_path))
    wire.reader = FrameReader(1 << 28)
    wire.ids = itertools.count(1)
    wire.backlog = []
    wire.send({"op": "hello", "version": 1, "name": name})
    assert wire.expect("welcome")
    broker.clients.append(wire)
    return wire


def test_a_slow_subscriber_loses_the_oldest_while_a_fast_one_keeps_up(
    brokers: Callable[..., BrokerProcess],
) -> None:
    bound = 100
    broker = brokers(subscriber_queue=bound)
    pub = broker.connect(name="pub")
    fast = broker.connect(name="fast")
    slow = _small_rcvbuf_wire(broker, "slow")
    fast.ok("subscribe", pattern="load.#")
    slow.ok("subscribe", pattern="load.#")
    rss_before = broker.rss_kib()
    n, size, window = 4000, 16384, 50
    body = b"x" * size
    for start in range(0, n, window):
        for seq in range(start, start + window):
            pub.send({"op": "publish", "topic": "load.x", "codec": "bytes"}, b"%08d" % seq + body)
        for seq in range(start, start + window):  # the fast one gets every one, in order
            assert fast.expect("message").payload[:8] == b"%08d" % seq
    # the slow one held at most its bound in the broker all along: the broker stayed small
    grown = broker.rss_kib() - rss_before
    assert grown < 40 * 1024, f"the broker grew by {grown} KiB for a {bound}-message bound"
    stats = broker.stats()
    by_name = {s["name"]: s for s in stats["subscribers"]}
    assert by_name["fast"]["dropped"] == 0 and by_name["fast"]["delivered"] == n
    assert by_name["slow"]["dropped"] > 0 and by_name["slow"]["queued"] <= bound
    assert stats["topics"]["load.x"]["dropped"] == by_name["slow"]["dropped"]
    # the slow one reads at last: what is left, with notices of what was dropped, newest kept
    received, dropped, last = 0, 0, -1
    while received + dropped < n:
        frame = slow.recv()
        assert frame is not None
        if frame.op == "dropped":
            assert frame.header["pattern"] == "load.#"
            dropped += frame.header["count"]
        else:
            seq = int(frame.payload[:8])
            assert seq > last
            last = seq
            received += 1
    assert received + dropped == n and last == n - 1
    assert broker.stats()["counters"]["dropped"] == dropped


def test_a_slow_subscriber_is_disconnected_when_so_configured(
    brokers: Callable[..., BrokerProcess],
) -> None:
    broker = brokers(subscriber_queue=10, slow_subscriber="disconnect")
    pub = broker.connect()
    slow = _small_rcvbuf_wire(broker, "slow")
    slow.ok("subscribe", pattern="x")
    for _ in range(2000):
        pub.send({"op": "publish", "topic": "x", "codec": "bytes"}, b"y" * 4096)
    pub.ok("stats")
    wait_for(lambda: broker.stats()["counters"].get("slow_disconnected") == 1, HANG)
    while True:  # what was written before the cut, then the broker's reason, then the end
        try:
            frame = slow.recv()
        except ConnectionResetError:
            break
        if frame is None:
            break
        if frame.op == "error":
            assert frame.header["error"]["type"] == "full"
    assert broker.stats()["subscriptions"] == 0


# -- requests to served names --------------------------------------------------------


def test_request_to_a_served_name_and_back(broker: BrokerProcess) -> None:
    server = broker.connect(name="server")
    client = broker.connect(name="client")
    server.ok("serve", name="calc")
    client.send({"op": "request", "id": 41, "to": "calc", "codec": "json", "timeout": 10}, b"[2,3]")
    req = server.expect("request")
    h = req.header
    assert h["name"] == "calc" and h["codec"] == "json" and h["timeout"] == 10
    assert h["sender_pid"] == os.getpid() and isinstance(h["id"], int)  # the broker's own id
    assert json.loads(req.payload) == [2, 3]
    server.send({"op": "response", "id": h["id"], "codec": "json"}, b"5")
    resp = client.expect("response")
    # the server's pid, from SO_PEERCRED (both ends are this process here)
    assert resp.header == {"op": "response", "id": 41, "codec": "json", "sender_pid": os.getpid()}
    assert resp.payload == b"5"
    # an error answer is passed on with its type and details
    client.send({"op": "request", "id": 42, "to": "calc", "codec": "json"}, b"[]")
    h = server.expect("request").header
    server.send(
        {
            "op": "response",
            "id": h["id"],
            "error": {"type": "remote", "message": "boom", "remote_type": "ValueError"},
        }
    )
    error = client.expect("error").header
    assert error["id"] == 42
    assert error["error"] == {"type": "remote", "message": "boom", "remote_type": "ValueError"}
    # one-way notify
    client.send({"op": "notify", "to": "calc", "codec": "bytes"}, b"ping")
    note = server.expect("notify")
    assert note.payload == b"ping" and "id" not in note.header
    # a name served once only
    other = broker.connect()
    error = other.call("serve", name="calc").header["error"]
    assert error["type"] == "bad_request" and "already served" in error["message"]
    error = client.call("request", to="nobody", codec="json").header["error"]
    assert error["type"] == "no_such_target" and "'nobody'" in error["message"]


def test_a_request_times_out_and_its_late_answer_is_dropped(broker: BrokerProcess) -> None:
    server = broker.connect()
    client = broker.connect()
    server.ok("serve", name="slow")
    error = client.call("request", to="slow", codec="json", timeout=0.2).header["error"]
    assert error["type"] == "timeout" and "'slow'" in error["message"]
    h = server.expect("request").header
    server.send({"op": "response", "id": h["id"], "codec": "json"}, b"1")
    wait_for(lambda: broker.stats()["counters"].get("late_responses") == 1, HANG)
    assert client.ok("stats")["stats"]["pending_requests"] == 0


def test_outstanding_requests_fail_when_the_server_dies(broker: BrokerProcess) -> None:
    server = broker.connect()
    client = broker.connect()
    server.ok("serve", name="fragile")
    for rid in (1, 2, 3):
        client.send({"op": "request", "id": 100 + rid, "to": "fragile", "codec": "json"}, b"0")
    for _ in range(3):
        server.expect("request")
    server.close()
    errors = sorted((client.expect("error").header for _ in range(3)), key=lambda e: e["id"])
    assert [e["id"] for e in errors] == [101, 102, 103]
    assert {e["error"]["type"] for e in errors} == {"unavailable"}
    error = client.call("request", to="fragile", codec="json").header["error"]
    assert error["type"] == "no_such_target"


# -- bad input -----------------------------------------------------------------------


def _bad_clients(broker: BrokerProcess) -> Iterator[tuple[str, Callable[[Wire], None]]]:
    def garbage(w: Wire) -> None:
        # not random bytes: a random "header length" of 1..65536 with a payload under
        # the limit is a valid start of a frame (1 in 65536), and then the answer differs
        w.sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" + b"\x00" * 32)

    def truncated(w: Wire) -> None:
        w.sock.sendall(LENGTHS.pack(1000, 10) + b'{"op":"x"}' + b"y" * 20)

    def oversized(w: Wire) -> None:
        w.sock.sendall(LENGTHS.pack(100 << 20, 10) + b'{"op":"x"}')

    def not_json(w: Wire) -> None:
        w.sock.sendall(encode_frame(b"{nope"))

    def not_an_object(w: Wire) -> None:
        w.sock.sendall(encode_frame(b"[1,2]"))

    def fd_without_shm(w: Wire) -> None:
        r, wr = os.pipe()
        try:
            w.send({"op": "publish", "topic": "a", "codec": "bytes"}, b"x", fd=r)
        finally:
            os.close(r)
            os.close(wr)

    def unsealed_shm(w: Wire) -> None:
        fd = os.memfd_create("x", os.MFD_CLOEXEC)
        os.write(fd, b"abc")
        try:
            w.send({"op": "publish", "topic": "a", "codec": "bytes", "shm": 3}, fd=fd)
        finally:
            os.close(fd)

    def shm_without_fd(w: Wire) -> None:
        w.send({"op": "publish", "topic": "a", "codec": "bytes", "shm": 3})

    yield "garbage", garbage
    yield "shm without fd", shm_without_fd
    yield "truncated", truncated
    yield "oversized", oversized
    yield "not json", not_json
    yield "not an object", not_an_object
    yield "fd without shm", fd_without_shm
    yield "unsealed shm", unsealed_shm


def _attack(w: Wire, bad: Callable[[Wire], None]) -> None:
    """Send ``bad`` and nothing more (a truncated frame's rest never comes)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        bad(w)  # the broker may close before the end of what is sent
        w.sock.shutdown(socket.SHUT_WR)


def test_bad_frames_are_refused_and_leave_nothing_behind(broker: BrokerProcess) -> None:
    keeper = broker.connect()
    keeper.ok("subscribe", pattern="#")
    for _ in range(3):  # warm up the allocator before measuring
        for _name, bad in _bad_clients(broker):
            w = broker.connect()
            _attack(w, bad)
            w.closed_by_broker()
            w.close()
    broker.clients.clear()
    broker.clients.append(keeper)
    fds, rss = broker.fds(), broker.rss_kib()
    for _round in range(40):
        for name, bad in _bad_clients(broker):
            for hello in (True, False):
                w = Wire(broker.socket_path, hello=hello)
                _attack(w, bad)
                error = w.closed_by_broker()
                if name != "truncated":
                    assert error is not None, (name, hello)
                    want = "too_large" if name == "oversized" else "bad_request"
                    assert error["type"] == want, (name, error)
                w.close()
    assert keeper.ok("stats")["op"] == "ok"  # still serving
    wait_for(lambda: broker.fds() == fds, HANG, message=f"the broker's fds back to {fds}")
    grown = broker.rss_kib() - rss
    assert grown < 4096, f"the broker grew by {grown} KiB"
    assert broker.stats()["counters"]["protocol_errors"] >= 40 * 14


def test_error_frames_name_what_was_wrong(broker: BrokerProcess) -> None:
    w = broker.connect()
    w.sock.sendall(LENGTHS.pack(100 << 20, 10) + b'{"op":"x"}')
    error = w.closed_by_broker()
    assert error is not None
    assert "exceeds the limit of 1048576 bytes" in error["message"]
    w = broker.connect()
    w.send({"op": "frobnicate"})
    error = w.closed_by_broker()
    assert error is not None and "unknown op 'frobnicate'" in error["message"]


# -- shared memory -------------------------------------------------------------------


def _sealed(data: bytes) -> int:
    fd = os.memfd_create("ikos-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    seals = 0x0001 | 0x0002 | 0x0004 | 0x0008  # SEAL, SHRINK, GROW, WRITE
    fcntl.fcntl(fd, 1033, seals)  # F_ADD_SEALS
    return fd


def test_shm_segments_are_passed_on_unchanged_and_closed(broker: BrokerProcess) -> None:
    pub = broker.connect()
    subs = [broker.connect() for _ in range(3)]
    for sub in subs:
        sub.ok("subscribe", pattern="big")
    fds = broker.fds()
    data = os.urandom(768 << 10)  # within max_frame, which bounds segments too
    fd = _sealed(data)
    try:
        pub.send({"op": "publish", "topic": "big", "codec": "bytes", "shm": len(data)}, fd=fd)
    finally:
        os.close(fd)
    for sub in subs:
        frame = sub.expect("message")
        assert frame.header["shm"] == len(data) and frame.payload == b""
        assert frame.fd is not None
        assert os.pread(frame.fd, len(data), 0) == data
        frame.close()
    wait_for(lambda: broker.fds() == fds, HANG, message="the broker closed its copy")
    # a served name gets the segment of a request the same way
    server, client = subs[0], pub
    server.ok("serve", name="store")
    fd = _sealed(b"abc")
    try:
        client.send({"op": "request", "id": 9, "to": "store", "codec": "bytes", "shm": 3}, fd=fd)
    finally:
        os.close(fd)
    req = server.expect("request")
    assert req.fd is not None and os.pread(req.fd, 3, 0) == b"abc"
    server.send({"op": "response", "id": req.header["id"], "codec": "bytes", "shm": 3}, fd=req.fd)
    req.close()
    resp = client.expect("response")
    assert resp.fd is not None and os.pread(resp.fd, 3, 0) == b"abc"
    resp.close()
    wait_for(lambda: broker.fds() == fds, HANG, message="the broker closed its copies")


def test_a_segment_of_the_wrong_size_is_refused(broker: BrokerProcess) -> None:
    w = broker.connect()
    fd = _sealed(b"abcd")
    try:
        w.send({"op": "publish", "topic": "a", "codec": "bytes", "shm": 3}, fd=fd)
    finally:
        os.close(fd)
    error = w.closed_by_broker()
    assert error is not None and "4" in error["message"] and "3" in error["message"]


# -- many clients --------------------------------------------------------------------


def test_a_thousand_concurrent_clients(broker: BrokerProcess) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    n = 1000
    wires = []
    try:
        for _ in range(n):
            w = Wire(broker.socket_path, hello=False)
            w.send({"op": "hello", "version": 1})
            wires.append(w)
        for i, w in enumerate(wires):
            assert w.expect("welcome")
            w.send({"op": "subscribe", "id": 1, "pattern": f"many.{i % 10}"})
        for w in wires:
            assert w.expect("ok").header["id"] == 1
        assert broker.stats()["clients"] == n + 1
        pub = broker.connect()
        for k in range(10):
            pub.send({"op": "publish", "topic": f"many.{k}", "codec": "json"}, b"%d" % k)
        for i, w in enumerate(wires):
            assert int(w.expect("message").payload) == i % 10
    finally:
        for w in wires:
            w.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: broker.stats()["clients"] <= 2, HANG, message="the clients gone")
    assert broker.stats()["subscriptions"] == 0


# -- another uid: the policy ---------------------------------------------------------


needs_users = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="needs root and useradd to create another user and act as it",
)


# a system user created for these tests, as tests/test_local_users.py makes it
stranger = test_local_users.stranger


def as_user(user: pwd.struct_passwd, job: Callable[[], Any], groups: tuple[int, ...] = ()) -> Any:
    """Run ``job`` in a forked child as ``user`` (with supplementary ``groups``): its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                result = {"ok": job()}
            except BaseException as exc:
                result = {"raised": repr(exc)}
                status = 1
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(status)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            raw = pipe.read()
    finally:
        os.waitpid(pid, 0)
    result = json.loads(raw)
    assert "raised" not in result, result["raised"]
    return result["ok"]


@needs_users
def test_policy_allows_and_denies_another_uid_and_audits(
    brokers: Callable[..., BrokerProcess], stranger: pwd.struct_passwd
) -> None:
    uid = stranger.pw_uid
    broker = brokers(
        max_clients_per_uid=3,
        policy=[
            {
                "uids": [uid],
                "publish": ["app.#"],
                "subscribe": ["app.*"],
                "call": ["calc"],
                "queues": ["jobs"],
            },
        ],
    )
    server = broker.connect(name="server")
    server.ok("serve", name="calc")
    owner_sub = broker.connect()
    owner_sub.ok("subscribe", pattern="app.#")
    assert owner_sub.call("put", b"1", queue="secret", codec="json").op == "ok"
    path = broker.socket_path

    def stranger_session() -> dict[str, Any]:
        w = Wire(path, name="stranger")
        out: dict[str, Any] = {"welcome": w.welcome}
        out["publish_ok"] = w.call("publish", topic="app.x", codec="json", ack=True).header
        out["publish_denied"] = w.call("publish", topic="sys.x", codec="json", ack=True).header
        out["pickle_denied"] = w.call("publish", topic="app.x", codec="pickle", ack=True).header
        out["subscribe_ok"] = w.call("subscribe", pattern="app.*").header
        out["subscribe_denied"] = w.call("subscribe", pattern="#").header
        out["serve_denied"] = w.call("serve", name="calc2").header
        out["call_denied"] = w.call("request", to="other", codec="json").header
        out["put_ok"] = w.call("put", b"1", queue="jobs", codec="json").header
        out["put_denied"] = w.call("put", b"1", queue="other", codec="json").header
        out["queues"] = w.call("queues").header
        out["stats_denied"] = w.call("stats").header
        w.send({"op": "request", "id": 77, "to": "calc", "codec": "json"}, b"[1]")
        out["message"] = w.expect("message").header  # the owner's publish below, json only
        out["response"] = w.expect("response").header
        extra = [Wire(path) for _ in range(2)]
        over = Wire(path, hello=False)
        out["over_quota"] = over.closed_by_broker()
        for x in [*extra, over, w]:
            x.close()
        return out

    # the owner answers the stranger's call and publishes while it waits
    import threading

    def owner_side() -> None:
        req = server.expect("request")
        pub = Wire(path)
        pub.send({"op": "publish", "topic": "app.y", "codec": "pickle"}, b"p\x80\x04N.")
        pub.ok("publish", topic="app.y", codec="json", ack=True)
        pub.close()
        server.send({"op": "response", "id": req.header["id"], "codec": "json"}, b"1")

    helper = threading.Thread(target=owner_side, daemon=True)
    helper.start()
    out = as_user(stranger, stranger_session)
    helper.join(HANG)
    assert out["welcome"]["trusted"] is False and out["welcome"]["uid"] == uid
    assert out["publish_ok"]["op"] == "ok" and out["put_ok"]["op"] == "ok"
    assert [q["name"] for q in out["queues"]["queues"]] == ["jobs"]  # only what it may use
    for key, what in (
        ("publish_denied", "publish to 'sys.x'"),
        ("pickle_denied", "pickle"),
        ("subscribe_denied", "subscribe to '#'"),
        ("serve_denied", "serve 'calc2'"),
        ("call_denied", "call 'other'"),
        ("put_denied", "use queue 'other'"),
        ("stats_denied", "stats"),
    ):
        error = out[key]["error"]
        assert error["type"] == "denied", key
        assert what in error["message"] and f"uid {uid}" in error["message"], (key, error)
    assert out["message"]["topic"] == "app.y" and out["message"]["codec"] == "json"
    assert out["response"]["id"] == 77
    assert out["over_quota"]["type"] == "full"
    assert str(uid) in out["over_quota"]["message"]
    owner_sub.expect("message")  # the owner's subscriber got the stranger's publish
    stats = broker.stats()
    assert stats["topics"]["app.y"]["undeliverable"] == 1  # the pickle, not to the stranger
    audit = broker.audit_path.read_text()
    for what in ("publish to 'sys.x'", "subscribe to '#'", "serve 'calc2'", "call 'other'"):
        assert f"uid {uid}: {what}: denied" in audit, audit
    assert f"uid {uid}: subscribe to 'app.*': allowed" in audit


@needs_users
def test_sighup_reloads_the_policy(
    brokers: Callable[..., BrokerProcess], stranger: pwd.struct_passwd
) -> None:
    uid = stranger.pw_uid
    broker = brokers(policy=[{"uids": [uid], "publish": ["app.#"]}])
    path = broker.socket_path

    def try_publish() -> str:
        w = Wire(path)
        try:
            return str(w.call("publish", topic="sys.x", codec="json", ack=True).op)
        finally:
            w.close()

    assert as_user(stranger, try_publish) == "error"
    broker.write_config(policy=[{"uids": [uid], "publish": ["#"]}])
    broker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: as_user(stranger, try_publish) == "ok", HANG, message="the new policy")
    # a broken configuration is refused and the running one kept
    broker.config_path.write_text('{"max_frame": "big"}')
    broker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in broker.output.read_text(), HANG)
    assert "max_frame must be an integer" in broker.output.read_text()
    assert as_user(stranger, try_publish) == "ok"


# -- actors --------------------------------------------------------------------------


def test_requests_reach_actors_through_the_broker(
    ikosd_factory: Any, base: Path, tmp_path: Path
) -> None:
    inst = ikosd_factory(
        config="""
        [ikosd]
        metrics = false

        [ipc]
        enabled = false  # this test runs its own broker on the instance

        [actors.echo]
        class = "examples.actors:Echo"

        [actors.crashy]
        class = "examples.actors:Crashy"

        [actors.counter]
        class = "examples.actors:Counter"
        """
    )
    root = inst.root
    ipc = root / "run" / "ikos" / "ipc"
    ipc.mkdir(parents=True, exist_ok=True)
    (ipc / "broker.json").write_text(json.dumps(DEFAULT_CONFIG))
    out = tmp_path / "broker.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ikos.ipc._broker", "--root", str(root)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        sock = ipc / "broker.sock"
        wait_listening(proc, sock, out)
        w = Wire(sock)
        resp = w.call("request", payload=b'{"x": [1, 2]}', to="echo", codec="json")
        assert resp.op == "response" and json.loads(resp.payload) == {"x": [1, 2]}
        # in order per (client, actor), though several run at once
        for k in range(20):
            w.send({"op": "request", "id": 1000 + k, "to": "echo", "codec": "json"}, b"%d" % k)
        got = [w.expect("response") for _ in range(20)]
        assert [g.header["id"] for g in got] == [1000 + k for k in range(20)]
        assert [int(g.payload) for g in got] == list(range(20))
        error = w.call("request", payload=b'"crash"', to="crashy", codec="json").header["error"]
        assert error["type"] == "remote" and error["remote_type"] == "RuntimeError"
        assert "asked to crash" in error["traceback"]
        resp = w.call("request", payload=b"\x00\xff", to="echo", codec="bytes")
        assert resp.op == "response" and resp.payload == b"\x00\xff"
        error = w.call("request", payload=b"n", to="counter", codec="bytes").header["error"]
        assert error["type"] == "remote" and "cannot be represented as bytes" in error["message"]
        w.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0, out.read_text()


# -- durable queues ------------------------------------------------------------------


def test_queue_put_get_ack_and_empty(broker: BrokerProcess) -> None:
    producer = broker.connect()
    consumer = broker.connect()
    answer = producer.call("put", b'{"n": 1}', queue="jobs", codec="json").header
    assert answer["op"] == "ok" and isinstance(answer["msg"], int)
    got = consumer.call("get", queue="jobs", timeout=5)
    assert got.op == "message" and json.loads(got.payload) == {"n": 1}
    h = got.header
    assert h["queue"] == "jobs" and h["msg"] == answer["msg"] and h["deliveries"] == 1
    assert consumer.ok("ack", queue="jobs", msg=h["msg"])["op"] == "ok"
    empty = consumer.call("get", queue="jobs", timeout=0).header
    assert empty["op"] == "empty" and empty["queue"] == "jobs"
    error = consumer.call("ack", queue="jobs", msg=h["msg"]).header["error"]
    assert error["type"] == "bad_request" and "jobs" in error["message"]
    error = consumer.call("put", b"x", queue="a.*", codec="bytes").header["error"]
    assert error["type"] == "bad_request" and "bad segment '*'" in error["message"]
    infos = {q["name"]: q for q in consumer.ok("queues")["queues"]}
    assert infos["jobs"]["puts"] == 1 and infos["jobs"]["acks"] == 1
    # a get that waits is answered by the next put
    consumer.send({"op": "get", "id": 500, "queue": "later", "timeout": HANG})
    producer.call("put", b"soon", queue="later", codec="bytes")
    assert consumer.expect("message").payload == b"soon"


def test_a_dead_consumers_message_goes_to_the_next_at_once(broker: BrokerProcess) -> None:
    producer = broker.connect()
    first, second = broker.connect(), broker.connect()
    msg = producer.call("put", b"work", queue="jobs", codec="bytes").header["msg"]
    assert first.call("get", queue="jobs", timeout=5).header["msg"] == msg
    second.send({"op": "get", "id": 1, "queue": "jobs", "timeout": HANG})
    first.close()  # consumer_gone: back at once, not after the visibility timeout
    again = second.expect("message")
    assert again.header["msg"] == msg and again.header["deliveries"] == 2


def test_failed_deliveries_end_in_the_dead_letters(brokers: Callable[..., BrokerProcess]) -> None:
    broker = brokers(queues={"max_deliveries": 2, "visibility_timeout": 30.0})
    w = broker.connect()
    msg = w.call("put", b'{"bad": true}', queue="jobs", codec="json").header["msg"]
    w.call("put", b"\x00raw", queue="jobs", codec="bytes")
    for _ in range(2):
        got = w.call("get", queue="jobs", timeout=5).header
        assert got["msg"] == msg
        assert w.ok("nack", queue="jobs", msg=msg)["op"] == "ok"
    dead = w.ok("dead", queue="jobs", limit=10)
    assert dead["messages"] == [
        {"msg": msg, "deliveries": 2, "codec": "json", "data": {"bad": True}}
    ]
    assert w.call("get", queue="jobs", timeout=5).payload == b"\x00raw"


def _restart(broker: BrokerProcess, base: Path) -> subprocess.Popen[bytes]:
    """A new broker on the same root (the caller stops it)."""
    output = base / f"again-{uuid.uuid4().hex[:6]}.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ikos.ipc._broker", "--root", str(broker.root)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_listening(proc, broker.socket_path, output)
    return proc


def _drain_queue(path: Path, queue: str) -> set[int]:
    w = Wire(path)
    found = set()
    while True:
        got = w.call("get", queue=queue, timeout=0)
        if got.op == "empty":
            break
        found.add(int(got.payload))
        w.ok("ack", queue=queue, msg=got.header["msg"])
    w.close()
    return found


def test_sigterm_finishes_the_puts_under_way_and_answers_them(
    brokers: Callable[..., BrokerProcess], base: Path
) -> None:
    broker = brokers()
    w = broker.connect()
    n = 300
    for k in range(n):
        w.send({"op": "put", "id": k, "queue": "stop", "codec": "json"}, b"%d" % k)
    w.ok("stats")  # all read by the broker: what follows is under way or done
    broker.proc.send_signal(signal.SIGTERM)
    acked = set()
    while True:
        frame = w.recv()
        if frame is None:
            break
        if frame.op == "ok":
            acked.add(int(frame.header["id"]))
    assert broker.proc.wait(HANG) == 0
    assert acked == set(range(n))  # every put read before SIGTERM was committed and answered
    proc = _restart(broker, base)
    try:
        assert _drain_queue(broker.socket_path, "stop") == set(range(n))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0


def test_acknowledged_puts_survive_kill_9_of_the_broker(base: Path) -> None:
    broker = start_broker(base)
    try:
        w = broker.connect()
        for k in range(300):  # pipelined: many are in flight when the broker dies
            w.send({"op": "put", "id": k, "queue": "durable", "codec": "json"}, b"%d" % k)
        acked: set[int] = set()
        while len(acked) < 150:
            frame = w.expect("ok")
            acked.add(int(frame.header["id"]))
        broker.proc.kill()
        broker.proc.wait()
        w.close()
    finally:
        if broker.proc.poll() is None:
            broker.proc.kill()
            broker.proc.wait()
    # a new broker on the same root finds every acknowledged message
    proc = _restart(broker, base)
    try:
        found = _drain_queue(broker.socket_path, "durable")
        assert acked <= found, sorted(acked - found)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0


def test_queue_payloads_in_shared_memory(brokers: Callable[..., BrokerProcess]) -> None:
    broker = brokers(shm_threshold=1000)
    w = broker.connect()
    data = os.urandom(5000)
    fd = _sealed(data)
    try:
        assert w.call("put", queue="big", codec="bytes", shm=len(data), fd=fd).op == "ok"
    finally:
        os.close(fd)
    got = w.call("get", queue="big", timeout=5)
    assert got.header["shm"] == len(data) and got.fd is not None
    assert os.pread(got.fd, len(data), 0) == data
    got.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_broker_keeps_serving_without_spinning(
    broker: BrokerProcess,
) -> None:
    keeper = broker.connect()
    limit = broker.fds() + 3
    soft, hard = resource.prlimit(broker.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(broker.proc.pid, resource.RLIMIT_NOFILE, (limit, hard))
    waiting = []
    try:
        for _ in range(10):  # the kernel queues them; the broker cannot accept them all
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(broker.socket_path))
            waiting.append(s)
        wait_for(
            lambda: keeper.ok("stats")["stats"]["counters"].get("accept_failed"),
            HANG,
            message="accept failing",
        )
        before = _cpu_seconds(broker.proc.pid)
        time.sleep(1.0)  # a window to see whether the loop spins on the readable listener
        spent = _cpu_seconds(broker.proc.pid) - before
        assert spent < 0.3, f"the broker used {spent:.2f} s of CPU in 1 s while out of fds"
        assert keeper.ok("stats")["op"] == "ok"  # those connected are still served
    finally:
        for s in waiting:
            s.close()
        resource.prlimit(broker.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert broker.connect().welcome["trusted"] is True  # accepting again


def test_a_client_that_does_not_read_its_answers_is_no_longer_read(
    broker: BrokerProcess,
) -> None:
    greedy = broker.connect(name="greedy")
    other = broker.connect(name="other")
    rss = broker.rss_kib()
    request = encode_frame({"op": "stats", "id": 1})
    greedy.sock.setblocking(False)
    sent = 0
    stalled_since = None
    # write requests until the broker stops taking them (its answers pile up unread)
    while stalled_since is None or time.monotonic() - stalled_since < 1.0:
        try:
            greedy.sock.send(request)
            sent += 1
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            time.sleep(0.01)
        assert sent < 1_000_000, "the broker never stopped reading"
    grown = broker.rss_kib() - rss
    assert grown < 48 * 1024, f"the broker holds {grown} KiB for one client's unread answers"
    assert other.ok("stats")["op"] == "ok"  # everyone else is served meanwhile
    greedy.sock.setblocking(True)
    answers = 0
    while answers < sent:  # reading, it gets every answer: the broker read it again
        frame = greedy.recv()
        assert frame is not None and frame.op == "ok"
        answers += 1


@needs_users
def test_a_reload_revokes_what_the_policy_no_longer_grants(
    brokers: Callable[..., BrokerProcess], stranger: pwd.struct_passwd
) -> None:
    uid = stranger.pw_uid
    broker = brokers(policy=[{"uids": [uid], "subscribe": ["app.#"], "serve": ["svc"]}])
    path = broker.socket_path
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(stranger.pw_gid)
            os.setuid(uid)
            w = Wire(path)
            w.ok("subscribe", pattern="app.#")
            w.ok("serve", name="svc")
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            w.close()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert broker.stats()["subscriptions"] == 1 and broker.stats()["served"] == ["svc"]
        broker.write_config(policy=[{"uids": [uid], "publish": ["#"]}])
        broker.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: broker.stats()["subscriptions"] == 0 and broker.stats()["served"] == [],
            HANG,
            message="the subscription and the name revoked",
        )
        audit = broker.audit_path.read_text()
        assert f"uid {uid}: subscription 'app.#': revoked by reload" in audit
        assert f"uid {uid}: serve 'svc': revoked by reload" in audit
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


def test_the_audit_log_keeps_each_uid_to_its_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ikos.ipc import _broker

    now = [1000.0]
    monkeypatch.setattr(_broker.time, "monotonic", lambda: now[0])
    audit = _broker.AuditLog(str(tmp_path / "audit.log"))
    flood, quiet = Peer(10, 2001, 2001), Peer(11, 2002, 2002)
    for k in range(_broker.AUDIT_BURST + 30):
        audit.write(flood, f"publish to 't{k}'", "denied (no publish grant)")
    audit.write(quiet, "publish to 'q'", "denied (no publish grant)")
    now[0] += _broker.AUDIT_WINDOW  # the window closes: the count of what was held back
    audit.write(flood, "publish to 'later'", "denied (no publish grant)")
    audit.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert sum("uid 2001: publish" in line for line in lines) == _broker.AUDIT_BURST + 1
    assert any("pid 11 uid 2002: publish to 'q': denied" in line for line in lines)
    assert any("uid 2001: 30 more audit lines not written" in line for line in lines)


def test_segments_waiting_for_a_subscriber_that_dies_are_released(
    brokers: Callable[..., BrokerProcess],
) -> None:
    broker = brokers(subscriber_queue=20)
    pub = broker.connect()
    stuck = _small_rcvbuf_wire(broker, "stuck")
    stuck.ok("subscribe", pattern="seg")
    fds = broker.fds()
    for _ in range(20):  # fill the socket between them, so that the broker has to hold on
        pub.send({"op": "publish", "topic": "seg", "codec": "bytes"}, b"f" * 100_000)
    for k in range(50):  # more than the bound: the oldest are dropped, their fds closed
        fd = _sealed(b"%04d" % k)
        try:
            pub.send({"op": "publish", "topic": "seg", "codec": "bytes", "shm": 4}, fd=fd)
        finally:
            os.close(fd)
    pub.ok("stats")
    held = broker.fds() - fds
    assert 0 < held <= 20, f"the broker holds {held} segments for a bound of 20"
    stuck.sock.close()  # dies without reading: the broker closes what it held for it
    wait_for(lambda: broker.fds() == fds - 1, HANG, message="the segments released")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "broker.json must hold a JSON object"),
        ({"max_frame": "big"}, "max_frame must be an integer >= 1024, got 'big'"),
        ({"subscriber_queue": 0}, "subscriber_queue must be an integer >= 1, got 0"),
        ({"slow_subscriber": "block"}, 'slow_subscriber must be "drop-oldest" or "disconnect"'),
        ({"owner_uid": -1}, "owner_uid must be a uid"),
        ({"policy": [{"uids": [1], "call": ["a.."]}]}, "policy[0].call: bad segment ''"),
        ({"queues": []}, "queues must be an object"),
    ],
)
def test_a_bad_broker_json_names_the_key(raw: Any, message: str, tmp_path: Path) -> None:
    from ikos.ipc._broker import BrokerConfig, ConfigProblem

    with pytest.raises(ConfigProblem) as caught:
        BrokerConfig.parse(raw, tmp_path)
    assert message in str(caught.value)


def test_broker_json_defaults_and_the_audit_path(tmp_path: Path) -> None:
    from ikos.ipc._broker import BrokerConfig

    config = BrokerConfig.parse({"audit_log": "LOG/ipc-audit.log"}, tmp_path)
    assert config.owner_uid == os.getuid() and config.subscriber_queue == 10000
    assert config.audit_log == str(tmp_path / "ipc-audit.log")
    assert BrokerConfig.parse({"audit_log": "/x/a.log"}, tmp_path).audit_log == "/x/a.log"


@needs_users
def test_a_supplementary_group_is_granted_what_its_rule_says(
    brokers: Callable[..., BrokerProcess], stranger: pwd.struct_passwd
) -> None:
    group = 42424  # a gid of no one else: given to the child as a supplementary group
    broker = brokers(policy=[{"gids": [group], "publish": ["grp.#"]}])
    path = broker.socket_path

    def publish() -> str:
        w = Wire(path)
        try:
            return str(w.call("publish", topic="grp.x", codec="json", ack=True).op)
        finally:
            w.close()

    assert as_user(stranger, publish, groups=(group,)) == "ok"
    assert as_user(stranger, publish) == "error"


class _Planted:
    """Unpickling this creates the file it names: a payload that must never be decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@needs_users
def test_root_never_unpickles_what_another_users_instance_carries(
    base: Path, stranger: pwd.struct_passwd
) -> None:
    # An instance owned by another user: its broker runs as that user and trusts
    # its owner and root. Root's client must not take that for trust: it would
    # unpickle what the user's processes publish, as root.
    root = base / "theirs"
    ipc = root / "run" / "ikos" / "ipc"
    ipc.mkdir(parents=True)
    (ipc / "broker.json").write_text(json.dumps({**DEFAULT_CONFIG, "owner_uid": stranger.pw_uid}))
    for path in (root, root / "run", root / "run" / "ikos", ipc):
        os.chown(path, stranger.pw_uid, stranger.pw_gid)
    os.chown(ipc / "broker.json", stranger.pw_uid, stranger.pw_gid)
    from ikos.ipc._broker import main  # imported here: the user cannot read root's Python

    pid = os.fork()
    if pid == 0:  # the user's broker, in a child that never returns into pytest
        status = 1
        try:
            os.setgroups([])
            os.setgid(stranger.pw_gid)
            os.setuid(stranger.pw_uid)
            status = main(["--root", str(root)])
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(status)
    planted = base / "planted"
    os.chmod(base, 0o733)  # the user may create the file, were the pickle ever decoded
    try:
        wait_for(lambda: (ipc / "broker.sock").exists(), HANG, message="the user's broker")
        client = BrokerClient(InstancePaths.for_root(root))
        try:
            sub = Subscription(client, "loot.#")
            client._add_subscription(sub)
            assert client.broker_uid == stranger.pw_uid
            assert not client.trusted  # the broker said "trusted" (root); not enough

            def publish() -> bool:
                theirs = BrokerClient(InstancePaths.for_root(root))
                theirs.connect()
                assert theirs.trusted  # the owner, under its own broker: pickle allowed
                theirs.publish("loot.a", _Planted(str(planted)), codec="pickle", ack=True)
                theirs.publish("loot.b", "after", codec="json", ack=True)
                theirs.close()
                return True

            assert as_user(stranger, publish)
            # the JSON message after it arrives; the pickle before it was refused
            assert sub.get(timeout=HANG).payload == "after"
            assert not planted.exists()
        finally:
            client.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.chmod(base, 0o711)
