"""The logger example daemon (examples/system/log): parsing, rules and files as units, then
the real daemon under a real ikosd, fed by the real ``logger(1)`` and by ikos IPC, queried
with the real ``ikosctl``, forwarding to listeners this test runs.

The daemon's ``requires=["auth"]`` is met by a stand-in ``auth`` actor in the test's tree,
so that these tests do not depend on the auth example.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import REPO, Instance, wait_for
from hypothesis import given
from hypothesis import strategies as st

import ikos.ipc
from examples.system import log
from examples.system.log._forward import Forwarder
from examples.system.log._store import RecentRecords, RecordFiles
from examples.system.log._syslog import octet_counted

LOGGER = shutil.which("logger")
needs_logger = pytest.mark.skipif(
    LOGGER is None, reason="logger(1) is not installed (Debian bsdutils: scripts/test-deps.sh)"
)


# -- units: parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        # logger --rfc3164 -u PATH
        (
            b"<13>Dec  6 01:35:01 vm root: hello w\xc3\xb6rld",
            {"format": "rfc3164", "host": "vm", "program": "root", "msg": "hello wörld"},
        ),
        # logger -u PATH (the local format: no host)
        (
            b"<155>Dec  6 01:35:01 myprog[27798]: hi",
            {
                "format": "rfc3164",
                "host": None,
                "program": "myprog",
                "pid": "27798",
                "facility": "local3",
                "level": "err",
                "msg": "hi",
            },
        ),
        # no timestamp at all
        (b"<30>cron: job", {"format": "rfc3164", "program": "cron", "facility": "daemon"}),
        # logger --rfc5424 with structured data, escapes and a MSGID
        (
            b'<13>1 2026-12-06T01:35:01.922991+00:00 vm root 12 MID [timeQuality tzKnown="1"]'
            b'[foo@123 bar="b\\"a\\]z"] hello',
            {
                "format": "rfc5424",
                "host": "vm",
                "program": "root",
                "pid": "12",
                "msgid": "MID",
                "sd": {"timeQuality": {"tzKnown": "1"}, "foo@123": {"bar": 'b"a]z'}},
                "msg": "hello",
                "time": 1796520901.922991,
            },
        ),
        # a real U+FFFD in valid UTF-8 is text, not a decoding error
        (
            "<13>1 - - - - - - a \ufffd b".encode(),
            {"format": "rfc5424", "msg": "a \ufffd b"},
        ),
        # NILVALUEs everywhere and a BOM before the message
        (
            b"<14>1 - - - - - - \xef\xbb\xbfbom",
            {"format": "rfc5424", "host": None, "program": None, "msg": "bom", "time": 1e9},
        ),
    ],
)
def test_parse_the_formats_logger_writes(line: bytes, expect: dict[str, Any]) -> None:
    record = log.parse_datagram(line, 1e9).to_json()
    assert "error" not in record
    assert {k: record[k] for k in expect} == expect


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"no pri here", "no <PRI>"),
        (b"<192>x", "PRI <192>"),
        (b"<013>x", "PRI <013>"),
        (b"<13>1 2026-12-06", "fewer than its 6 fields"),
        (b"<13>1 yesterday h a - - - x", "TIMESTAMP 'yesterday'"),
        (b"<13>1 2026-02-30T00:00:00Z h a - - - x", "not a real date"),
        (b'<13>1 - h a - - [x a="b"', "no closing ']'"),
        (b'<13>1 - h a - - [x a="b" m', "SD-PARAM in [x]"),
        (b'<13>1 - h a - - [x a="b] m', "no closing quote"),
        (b"<13>1 - h a - - junk m", "neither '-' nor"),
        (b"<13>Feb 31 01:00:00 h t: x", "not a real time"),
        (b"\xff<13>x", "not UTF-8 at byte 0"),
    ],
)
def test_malformed_lines_are_kept_raw_with_the_reason(line: bytes, reason: str) -> None:
    record = log.parse_datagram(line, 5.0)
    assert record.format == "raw"
    assert record.error is not None and reason in record.error
    assert record.time == 5.0 and record.msg  # kept, with the line as its message


@given(st.binary(max_size=300))
def test_parsing_never_raises(data: bytes) -> None:
    record = log.parse_datagram(data, 0.0)
    assert record.level in log.LEVELS and record.facility in log.FACILITIES


_ascii_field = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=32
).filter(lambda v: v != "-")
_sd_name = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='= ]"'),
    min_size=1,
    max_size=32,
)
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(
    when=st.integers(0, 4 * 10**15).map(lambda us: us / 1e6),  # microseconds up to 2096
    facility=st.sampled_from(log.FACILITIES),
    level=st.sampled_from(log.LEVELS),
    fields=st.fixed_dictionaries(
        {"host": _ascii_field, "program": _ascii_field, "pid": _ascii_field, "msgid": _ascii_field}
    ),
    sd=st.dictionaries(_sd_name, st.dictionaries(_sd_name, _text, max_size=3), max_size=3),
    msg=_text.filter(lambda m: not m.endswith(("\n", "\r", "\0"))),
)
def test_rfc5424_written_reads_back_the_same_for_any_record(
    when: float,
    facility: str,
    level: str,
    fields: dict[str, str],
    sd: dict[str, dict[str, str]],
    msg: str,
) -> None:
    record = log.Record(when, 0.0, facility, level, msg, sd=sd, format="rfc5424", **fields)
    back = log.parse_datagram(log.format_5424(record, "unused"), 0.0)
    assert back.error is None, back.error
    assert abs(back.time - when) < 1e-3
    assert (back.facility, back.level, back.msg, back.sd) == (facility, level, msg, sd)
    assert (back.host, back.program, back.pid, back.msgid) == (
        fields["host"], fields["program"][:48], fields["pid"], fields["msgid"],
    )  # fmt: skip


def test_rfc5424_written_reads_back_the_same() -> None:
    record = log.Record(
        time=1796520901.5,
        received=0.0,
        facility="local7",
        level="crit",
        msg='héllo ] "x"',
        program="my app",  # a space is not allowed in APP-NAME: made valid
        pid="42",
        msgid="M1",
        sd={"ex@1": {"k": 'v"]\\'}},
    )
    line = log.format_5424(record, "host1")
    assert line.startswith(b"<186>1 2026-12-06T01:35:01.500000Z host1 my_app 42 M1 ")
    back = log.parse_datagram(line, 0.0)
    assert back.error is None
    assert (back.sd, back.msg, back.level, back.facility, back.time) == (
        record.sd, record.msg, "crit", "local7", record.time,
    )  # fmt: skip
    assert octet_counted(b"abc") == b"3 abc"


# -- units: rules --------------------------------------------------------------------------


def _rec(program: str | None, level: str, facility: str = "user") -> log.Record:
    return log.Record(0.0, 0.0, facility, level, "m", program=program)


def test_filter_first_matching_rule_decides_then_min_level() -> None:
    f = log.Filter.from_options(
        "info",
        [
            {"program": "noisy*", "drop": True},
            {"facility": ["auth", "authpriv"], "min_level": "debug"},
            {"program": "cron", "min_level": "warning"},
        ],
    )
    assert not f.accepts(_rec("noisy-daemon", "emerg"))
    assert f.accepts(_rec("sshd", "debug", "auth"))
    assert not f.accepts(_rec("cron", "notice")) and f.accepts(_rec("cron", "err"))
    assert f.accepts(_rec("x", "info")) and not f.accepts(_rec("x", "debug"))
    assert not f.accepts(_rec(None, "debug"))


@pytest.mark.parametrize(
    ("rules", "where"),
    [
        ([{"program": "x"}], "rules[0]: give exactly one of"),
        ([{"drop": True}, {"facility": "nope", "drop": True}], "rules[1].facility[0]"),
        ([{"program": "x", "min_level": "loud"}], "rules[0].min_level"),
        ([{"progam": "x", "drop": True}], "rules[0]: unknown key 'progam'"),
        ({"program": "x"}, "rules: expected a list"),
    ],
)
def test_bad_rules_name_the_rule_and_key(rules: Any, where: str) -> None:
    with pytest.raises(log.LogInputError, match="^" + re.escape(where)):
        log.child(rules=rules)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_file_bytes", 0),
        ("keep_files", -1),
        ("forward", ["http://x:1"]),
        ("forward", "udp://x:1"),
        ("min_level", "verbose"),
        ("max_datagram", 10),
        ("socket_path", "relative/log.sock"),
        ("directory", 3),
    ],
)
def test_bad_options_fail_child_naming_them(option: str, value: Any) -> None:
    with pytest.raises(log.LogInputError, match=option):
        log.child(**{option: value})


def test_query_conditions() -> None:
    q = log.Query.from_request(
        {"op": "query", "program": "s*", "level": "warning", "since": 10, "until": 20}
    )
    assert q.matches(log.Record(15.0, 0.0, "user", "err", "m", program="sshd"))
    assert not q.matches(log.Record(15.0, 0.0, "user", "info", "m", program="sshd"))
    assert not q.matches(log.Record(25.0, 0.0, "user", "err", "m", program="sshd"))
    assert not q.matches(log.Record(15.0, 0.0, "user", "err", "m", program="cron"))
    ages = log.Query.from_request({"since": "-10m", "until": "-1.5h"}, now=10_000.0)
    assert (ages.since, ages.until) == (9400.0, 4600.0)
    for bad, key in (({"limit": 0}, "query.limit"), ({"since": "soon"}, "query.since"),
                     ({"colour": 1}, "unknown key 'colour'")):  # fmt: skip
        with pytest.raises(log.LogInputError, match=key):
            log.Query.from_request(bad)


# -- units: files --------------------------------------------------------------------------


def test_files_rotate_by_size_keep_n_and_read_back_newest_first(tmp_path: Path) -> None:
    files = RecordFiles(tmp_path, max_bytes=1000, max_age=None, keep=2, fsync_interval=0)
    for i in range(1, 41):
        files.append(_rec("p", "info").numbered(i), time.time())
    assert files.rotations >= 3
    rotated = files.rotated()
    assert len(rotated) == 2  # retention
    for path in [files.current, *rotated]:
        assert path.stat().st_size <= 1000
    seqs = [r.seq for r in files.newest_first()]
    assert seqs == sorted(seqs, reverse=True) and seqs[0] == 40
    assert next(r.seq for r in files.newest_first(before_seq=39)) == 38
    files.close()


def test_files_rotate_by_age_and_survive_a_torn_line(tmp_path: Path) -> None:
    files = RecordFiles(tmp_path, max_bytes=10**6, max_age=60, keep=5, fsync_interval=0)
    now = time.time()
    files.append(_rec("p", "info").numbered(1), now)
    assert not files.tick(now + 30)
    assert files.tick(now + 61) and len(files.rotated()) == 1
    files.append(_rec("p", "info").numbered(2), now + 62)
    files.close()
    with open(tmp_path / "current.jsonl", "ab") as f:
        f.write(b'{"seq": 3, "ti')  # a crash in the middle of a line
    files = RecordFiles(tmp_path, max_bytes=10**6, max_age=60, keep=5, fsync_interval=0)
    files.append(_rec("p", "info").numbered(4), now + 63)
    assert [r.seq for r in files.newest_first()] == [4, 2, 1]
    assert files.unreadable_lines == 1
    files.close()


def test_files_reopen_when_moved_away_or_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "syslog"
    files = RecordFiles(directory, max_bytes=10**6, max_age=None, keep=2, fsync_interval=0)
    files.append(_rec("p", "info").numbered(1), time.time())
    (directory / "current.jsonl").rename(tmp_path / "moved.jsonl")  # logrotate's way
    files.tick(time.time())
    files.append(_rec("p", "info").numbered(2), time.time())
    assert [r.seq for r in files.newest_first()] == [2] and files.reopens == 1
    shutil.rmtree(directory)  # a hand that cleans too much
    files.tick(time.time())
    files.append(_rec("p", "info").numbered(3), time.time())
    assert [r.seq for r in files.newest_first()] == [3] and files.reopens == 2
    files.tick(time.time())
    assert files.reopens == 2  # nothing moved: nothing reopened
    files.close()


def test_socket_is_replaced_atomically_but_never_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log.sock"
    path.write_text("not a socket")
    with pytest.raises(log.LogInputError, match="exists and is not a socket"):
        log.Logger()._bind(path)
    assert path.read_text() == "not a socket"
    path.unlink()
    old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old.bind(str(path))  # a live reader: another logger given the same path
    new = log.Logger()._bind(path)
    try:
        assert "took over" in capsys.readouterr().err
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"<13>hi", str(path))
        assert new.recv(100) == b"<13>hi"
        assert [p.name for p in tmp_path.iterdir()] == ["log.sock"]  # no staging name left
    finally:
        old.close()
        new.close()


def test_tcp_forwarder_keeps_lines_while_the_collector_is_down_within_its_bound() -> None:
    async def scenario() -> tuple[bytes, dict[str, object]]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        listener.setblocking(False)
        port = listener.getsockname()[1]
        forwarder = Forwarder(f"tcp://127.0.0.1:{port}", queue_size=3)
        await forwarder.start()
        for i in range(5):
            forwarder.submit(b"line %d" % i)  # the collector is down: 0 and 1 overflow
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while forwarder.errors == 0 and loop.time() < deadline:  # a refused connect first
            await asyncio.sleep(0.01)
        listener.listen()
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 30)
        data = b""
        while data.count(b"line") < 3:
            chunk = await asyncio.wait_for(loop.sock_recv(conn, 4096), 30)
            if not chunk:
                break
            data += chunk
        stats = forwarder.stats()
        await forwarder.close()
        conn.close()
        listener.close()
        return data, stats

    data, stats = asyncio.run(scenario())
    assert data == b"6 line 26 line 36 line 4"  # octet counting; the oldest two dropped
    assert stats["dropped"] == 2 and stats["errors"] >= 1 and stats["sent"] == 3


def test_forward_queue_is_bounded_in_lines_and_bytes() -> None:
    by_lines = Forwarder("tcp://127.0.0.1:9", queue_size=3)
    by_bytes = Forwarder("tcp://127.0.0.1:9", queue_size=1000, queue_bytes=1024)
    for i in range(10):
        by_lines.submit(b"%d" % i)
        by_bytes.submit(b"%d" % i + b"x" * 299)
    assert list(by_lines.queue) == [b"1 7", b"1 8", b"1 9"] and by_lines.dropped == 7
    assert by_bytes.queued_bytes == sum(map(len, by_bytes.queue)) <= 1024
    assert len(by_bytes.queue) == 3 and by_bytes.dropped == 7
    assert by_bytes.queue[-1].startswith(b"300 9")  # the newest kept


def test_recent_records_bounded_in_count_and_bytes() -> None:
    ring = RecentRecords(max_records=3, max_bytes=10_000)
    for i in range(1, 5):
        ring.append(_rec("p", "info").numbered(i))
    assert [r.seq for r in ring.newest_first()] == [4, 3, 2] and not ring.complete
    big = RecentRecords(max_records=100, max_bytes=5000)
    big.append(log.Record(0.0, 0.0, "user", "info", "a" * 3000).numbered(1))
    assert big.complete
    big.append(log.Record(0.0, 0.0, "user", "info", "b" * 3000).numbered(2))
    assert [r.seq for r in big.newest_first()] == [2] and big.bytes <= 5000
    assert big.oldest_seq == 2 and not big.complete
    filled = RecentRecords(max_records=2, max_bytes=10_000)
    filled.fill(iter([_rec("p", "info").numbered(n) for n in (9, 8, 7)]))  # newest first
    assert [r.seq for r in filled.newest_first()] == [9, 8] and not filled.complete


def test_log_handler_never_loops_nor_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pylog = logging.getLogger("test_example_log.reentrant")
    handler = log.LogHandler(root=tmp_path)  # no ikosd there
    pylog.addHandler(handler)
    try:
        pylog.error("nobody listens")  # the tell fails: one report on stderr, no exception
        assert "Logging error" in capsys.readouterr().err
        sent: list[Any] = []

        class LoggingRef:  # a tell that logs through the same logger
            def tell(self, message: Any) -> None:
                sent.append(message)
                pylog.warning("logged by the tell")

        handler.ref = LoggingRef()  # type: ignore[assignment]
        pylog.error("once")
    finally:
        pylog.removeHandler(handler)
    assert [m["msg"] for m in sent] == ["once"]


def test_a_forward_name_that_does_not_resolve_is_retried_not_fatal() -> None:
    async def scenario() -> dict[str, object]:
        forwarder = Forwarder("udp://no-such-host.invalid:514", queue_size=3)
        await forwarder.start()  # does not raise: the network may come later
        forwarder.submit(b"lost")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while forwarder.errors == 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await forwarder.close()
        return forwarder.stats()

    stats = asyncio.run(scenario())
    assert stats["dropped"] == 1 and stats["errors"] >= 1 and stats["connects"] == 0
    assert str(stats["last_error"]).startswith("resolve: gaierror")


# -- the real daemon ------------------------------------------------------------------------

TREE = """
import ikos
from examples.system import log

class Auth(ikos.Actor):  # stands in for the auth example: the logger requires "auth"
    def receive(self, message):  # the auth daemon's "check", with one good token
        if isinstance(message, dict) and message.get("op") == "check":
            good = message["token"] == "good-token" and message["permission"] == "log.read"
            return {"ok": True, "allowed": good, "user": "alice", "reason": "bad token"}
        return {"ok": False, "error": "not the auth daemon"}

tree = ikos.Supervisor("root", children=[
    ikos.Child("auth", Auth),
    log.child(**{options!r}),
])
"""


def start_logger(factory: Callable[..., Instance], **options: Any) -> Instance:
    inst: Instance = factory(tree=TREE.replace("{options!r}", repr(options)))
    inst.wait_state("log", "running", timeout=60)
    return inst


def call(inst: Instance, request: Any) -> Any:
    """``ikosctl --json call log REQUEST``, parsed."""
    res = inst.ctl("--json", "call", "log", json.dumps(request), check=True)
    return json.loads(res.stdout)


def query(inst: Instance, **conditions: Any) -> list[dict[str, Any]]:
    reply = call(inst, {"op": "query", **conditions})
    assert reply["ok"], reply
    return list(reply["records"])


def sock_path(inst: Instance) -> Path:
    return inst.root / "run" / "ikos" / "log.sock"


def run_logger(inst: Instance, *args: str) -> None:
    assert LOGGER is not None
    subprocess.run([LOGGER, "-u", str(sock_path(inst)), "-d", *args], check=True, timeout=30)


class Collector:
    """A syslog collector this test runs: a UDP socket and a TCP listener (octet counting)."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen()
        self.tcp.settimeout(0.2)
        self.udp_lines: list[bytes] = []
        self.tcp_lines: list[bytes] = []
        self.tcp_connections = 0
        self.stopping = threading.Event()
        self.drop_connection = threading.Event()
        self.threads = [threading.Thread(target=t, daemon=True) for t in (self._udp, self._tcp)]
        for t in self.threads:
            t.start()

    @property
    def urls(self) -> list[str]:
        return [
            f"udp://127.0.0.1:{self.udp.getsockname()[1]}",
            f"tcp://127.0.0.1:{self.tcp.getsockname()[1]}",
        ]

    def _udp(self) -> None:
        while not self.stopping.is_set():
            try:
                self.udp_lines.append(self.udp.recv(70000))
            except TimeoutError:
                continue

    def _tcp(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            self.tcp_connections += 1
            conn.settimeout(0.2)
            buf = b""
            with conn:
                while not self.stopping.is_set() and not self.drop_connection.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    buf += data
                    while b" " in buf:  # RFC 6587 octet counting: LEN SP MSG
                        length, _, rest = buf.partition(b" ")
                        if len(rest) < int(length):
                            break
                        self.tcp_lines.append(rest[: int(length)])
                        buf = rest[int(length) :]
            self.drop_connection.clear()

    def close(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=10)
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    try:
        yield c
    finally:
        c.close()


@needs_logger
def test_logger1_both_formats_ipc_topic_filter_forward_and_query(
    ikosd_factory: Callable[..., Instance], collector: Collector
) -> None:
    inst = start_logger(
        ikosd_factory,
        min_level="info",
        rules=[{"program": "noisy", "drop": True}],
        forward=collector.urls,
    )
    assert sock_path(inst).is_socket()
    wait_for(  # the UDP target is opened by a task: lines sent before it are dropped
        lambda: call(inst, {"op": "stats"})["forward"][0]["connects"] == 1,
        message="the UDP forwarder ready",
    )
    services = {s["name"]: s for s in json.loads(inst.ctl("--json", "services").stdout)}
    assert services["log"]["endpoint"] == f"unixgram://{sock_path(inst)}"
    published: list[Any] = []
    sub = ikos.ipc.subscribe("log.record", lambda m: published.append(m.payload), root=inst.root)

    run_logger(inst, "--rfc3164", "-t", "r3164", "-p", "daemon.warning", "three one six four")
    run_logger(inst, "--rfc5424", "-t", "r5424", "--msgid", "M7", "--sd-id", "ex@32473",
               "--sd-param", 'k="v w"', "-p", "local0.err", "five four two four")  # fmt: skip
    run_logger(inst, "-t", "local-fmt", "-i", "the local format")
    run_logger(inst, "-t", "noisy", "-p", "user.crit", "dropped by a rule")
    run_logger(inst, "-t", "dbg", "-p", "user.debug", "below min_level")
    assert log.send("over ipc", level="err", program="ipcprog", root=inst.root, wait=True)["ok"]
    log.send("told over ipc", program="ipcprog", root=inst.root)
    handler_name = "test_example_log.handler"
    pylog = logging.getLogger(handler_name)
    handler = log.LogHandler(root=inst.root)
    pylog.addHandler(handler)
    try:
        pylog.error("from Python's logging: %d", 42)
    finally:
        pylog.removeHandler(handler)
    inst.ctl("publish", "log.submit", '{"msg": "on the topic", "program": "topicprog"}', check=True)

    def by_program() -> dict[str, dict[str, Any]]:
        return {r["program"]: r for r in query(inst, limit=50)}

    want = {"r3164", "r5424", "local-fmt", "ipcprog", "topicprog", handler_name}
    seen = wait_for(lambda: want <= set(p := by_program()) and p, message="every record")
    r3164, r5424, local = seen["r3164"], seen["r5424"], seen["local-fmt"]
    assert (r3164["format"], r3164["facility"], r3164["level"], r3164["msg"]) == (
        "rfc3164", "daemon", "warning", "three one six four",
    )  # fmt: skip
    assert r3164["host"] == socket.gethostname()
    assert (r5424["format"], r5424["level"], r5424["msgid"], r5424["msg"]) == (
        "rfc5424", "err", "M7", "five four two four",
    )  # fmt: skip
    assert r5424["sd"]["ex@32473"] == {"k": "v w"}
    assert local["format"] == "rfc3164" and local["host"] is None and local["pid"].isdigit()
    assert seen["ipcprog"]["format"] == "ipc" and seen["topicprog"]["msg"] == "on the topic"
    from_logging = seen[handler_name]
    assert (from_logging["msg"], from_logging["level"], from_logging["facility"]) == (
        "from Python's logging: 42", "err", "daemon",
    )  # fmt: skip
    assert from_logging["pid"] == str(os.getpid())
    # who sent a datagram, as the kernel saw it: logger(1) run by this test's user
    assert r3164["cred"]["uid"] == os.getuid() and r3164["cred"]["gid"] == os.getgid()
    assert r3164["cred"]["pid"] not in (0, os.getpid()) and seen["ipcprog"]["cred"] is None
    assert local["pid"] == str(local["cred"]["pid"])  # logger -i: the pid it claims is its own
    assert {r["program"] for r in query(inst, uid=os.getuid())} == {"r3164", "r5424", "local-fmt"}
    assert "noisy" not in seen and "dbg" not in seen
    stats = call(inst, {"op": "stats"})
    assert stats["filtered"] == 2 and stats["malformed"] == 0
    # records at least as severe as publish_level (warning) are published on log.record
    severe = {"r3164", "r5424", "ipcprog", handler_name}
    wait_for(lambda: {p["program"] for p in published} == severe, message="the publications")
    ikos.ipc.unsubscribe(sub)

    # queries: by level, program glob, time range, limit
    assert {r["program"] for r in query(inst, level="err")} == {"r5424", "ipcprog", handler_name}
    assert [r["program"] for r in query(inst, program="r5*")] == ["r5424"]
    assert query(inst, since=time.time() + 3600) == []
    assert len(query(inst, limit=2)) == 2
    bad = inst.ctl("--json", "call", "log", '{"op": "query", "level": "loud"}', check=True)
    assert "query.level" in json.loads(bad.stdout)["error"]

    # the logger's own small verb: lines for people
    def verb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "examples.system.log", "--root", str(inst.root), *args],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip

    sent = verb("send", "-l", "err", "-t", "verb", "from", "the", "verb")
    assert sent.returncode == 0, sent.stderr
    shown = verb("query", "--since", "1h", "-l", "err", "-p", "verb")
    assert shown.returncode == 0 and shown.stdout.count("\n") == 1, shown
    assert shown.stdout.rstrip().endswith("verb user.err: from the verb")
    refused = verb("query", "--level", "loud")
    assert refused.returncode == 1 and "query.level" in refused.stderr

    # forwarded in RFC 5424, over UDP and over TCP with octet counting
    for lines in (collector.udp_lines, collector.tcp_lines):
        wait_for(lambda lines=lines: len(lines) >= 5, message="forwarded lines")
        parsed = [log.parse_datagram(line, 0.0) for line in lines]
        assert all(p.format == "rfc5424" and p.error is None for p in parsed)
        fwd = {p.program: p for p in parsed}
        assert fwd["r5424"].sd["ex@32473"] == {"k": "v w"} and fwd["r5424"].msgid == "M7"
        assert fwd["r3164"].msg == "three one six four" and fwd["r3164"].level == "warning"

    # a collector that drops the connection: the logger reconnects and goes on
    collector.drop_connection.set()
    wait_for(lambda: not collector.drop_connection.is_set(), message="the drop")
    tcp_forwarder = lambda: call(inst, {"op": "stats"})["forward"][1]  # noqa: E731
    wait_for(lambda: tcp_forwarder()["connects"] >= 2, timeout=40, message="a reconnect")
    assert collector.tcp_connections >= 2 and "closed" in tcp_forwarder()["last_error"]
    before = len(collector.tcp_lines)
    for i in range(3):
        log.send(f"after the drop {i}", root=inst.root)
    wait_for(lambda: sum(b"after the drop" in x for x in collector.tcp_lines[before:]) == 3,
             message="every line after the reconnect")  # fmt: skip


@needs_logger
def test_rotation_retention_and_a_kill_9_keep_the_files(
    ikosd_factory: Callable[..., Instance],
) -> None:
    inst = start_logger(ikosd_factory, max_file_bytes=2048, max_file_age=2.0, keep_files=2)
    directory = inst.root / "var" / "log" / "ikos" / "syslog"
    for i in range(60):
        run_logger(inst, "--rfc5424", "-t", "rot", f"record number {i:03d} " + "x" * 40)
    wait_for(lambda: query(inst, program="rot", limit=100)[-1:] and
             query(inst, program="rot", limit=100)[-1]["msg"].startswith("record number 059"),
             message="the last record")  # fmt: skip
    stats = call(inst, {"op": "stats"})  # the logger's view: never between rename and delete
    assert stats["rotations"] >= 3
    assert 1 <= len(stats["files"]) - 1 <= 2  # retention: the current file and 2 rotated
    assert all(f["bytes"] <= 2048 for f in stats["files"])

    # by age: a file whose first record is 2 s old is rotated by the tick, idle or not
    run_logger(inst, "-t", "aged", "alone in its file")
    wait_for(lambda: any(
        "alone in its file" in p.read_text() for p in directory.glob("records-*.jsonl")
    ), timeout=30, message="the age rotation")  # fmt: skip

    # kill -9: the files stay, the new incarnation reloads its ring from them
    old = inst.pid_of("log")
    inst.ctl("kill", "-s", "SIGKILL", "log", check=True)
    inst.wait_running_new_pid("log", old, timeout=60)
    assert [r["msg"] for r in query(inst, program="aged")] == ["alone in its file"]
    seq_before = query(inst, limit=1)[0]["seq"]
    run_logger(inst, "-t", "after", "after the kill")
    after = wait_for(lambda: query(inst, program="after"), message="a record after the restart")
    assert after[0]["seq"] > seq_before  # numbering goes on from the files

    # the directory deleted under the running logger: a new one, and records go on there
    shutil.rmtree(directory, ignore_errors=True)  # the logger may be rotating meanwhile
    wait_for(lambda: call(inst, {"op": "stats"})["reopens"] >= 1, message="the files reopened")
    run_logger(inst, "-t", "reopened", "into the new directory")
    wait_for(lambda: "into the new directory" in (directory / "current.jsonl").read_text(),
             message="a record in the new file")  # fmt: skip


def test_bad_input_is_counted_and_memory_stays_bounded(
    ikosd_factory: Callable[..., Instance],
) -> None:
    inst = start_logger(ikosd_factory, ring_size=500, max_message=1000, max_file_bytes=1 << 20)
    pid = inst.pid_of("log")
    assert pid is not None
    proc = psutil.Process(pid)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sender.connect(str(sock_path(inst)))
    garbage = [b"<13>1 - - -", b"\xff\xfe garbage", b"<999>x", b'<13>1 - h a - - [x a="', b""]

    def flood(n: int) -> None:
        for i in range(n):
            sender.send(garbage[i % len(garbage)] + str(i).encode())
            if i % 1000 == 0:
                sender.send(b"<13>" + b"x" * 100_000)  # oversized: dropped and counted

    def counted(n: int) -> dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (s := call(inst, {"op": "stats"}))["received_syslog"] >= n and s,
            timeout=120,
            message=f"{n} datagrams received",
        )

    flood(10_000)
    counted(10_010)
    rss_before = proc.memory_info().rss
    flood(10_000)
    stats = counted(20_020)
    rss_after = proc.memory_info().rss
    sender.close()
    assert stats["malformed"] >= 20_000 and stats["oversized"] == 20
    assert stats["ring"] == 500
    assert rss_after - rss_before < 8 * 1024 * 1024, (rss_before, rss_after)
    assert inst.pid_of("log") == pid  # never crashed
    if LOGGER is not None:  # the real client can send one too (its --size lifts its own cap)
        run_logger(inst, "--size", "100000", "-t", "huge", "h" * 70_000)
        wait_for(lambda: call(inst, {"op": "stats"})["oversized"] == 21, message="counted")
        assert query(inst, program="huge") == []

    # said once a second at most, as the logger's own record and in its ikos log
    notes = wait_for(lambda: query(inst, program="log", grep="oversized"), message="a note")
    assert "limit 65536" in notes[-1]["msg"] and notes[-1]["level"] == "warning"
    assert "oversized datagram(s) dropped" in inst.ctl("logs", "-n", "200", "log").stdout

    # bad requests over IPC: answered with what was wrong, the daemon unaffected
    for request, says in (
        ({"op": "log", "msg": "x" * 1001}, "max_message (1000)"),
        ({"op": "log", "msg": 3}, "log.msg: expected a string"),
        ({"op": "log", "msg": "m", "level": "loud"}, "log.level"),
        ({"op": "log", "msg": "m", "colour": 1}, "unknown key 'colour'"),
        ({"op": "syslog", "line": "<13>" + "y" * 70_000}, "max_datagram"),
        ({"op": "frobnicate"}, "unknown op 'frobnicate'"),
        ("just a string", "expected a request"),
    ):
        reply = call(inst, request)
        assert reply["ok"] is False and says in reply["error"], (request, reply)
    reply = call(inst, {"op": "syslog", "line": "no pri"})
    assert reply["ok"] and "no <PRI>" in reply["error"]  # kept raw, and the sender told why
    assert inst.pid_of("log") == pid

    # a query whose answer would not fit in a reply: the newest that fit, and "more"
    big = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for i in range(1000):
        big.sendto(b"<13>1 - - big - - - %04d " % i + b"z" * 1000, str(sock_path(inst)))
    big.close()
    wait_for(lambda: query(inst, program="big", limit=1)[0]["msg"].startswith("0999"),
             message="the big records")  # fmt: skip
    reply = call(inst, {"op": "query", "program": "big", "limit": 1000})
    assert reply["more"] and 500 < len(reply["records"]) < 1000  # past the ring: from the files
    assert reply["records"][-1]["msg"].startswith("0999")
    assert [r["seq"] for r in reply["records"]] == sorted(r["seq"] for r in reply["records"])


def test_stop_removes_the_socket_and_a_stale_one_is_replaced(
    ikosd_factory: Callable[..., Instance],
) -> None:
    inst = start_logger(ikosd_factory)
    path = sock_path(inst)
    inst.ctl("stop", "log", check=True)
    wait_for(lambda: not path.exists(), message="the socket removed on stop")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))  # what a kill -9 leaves behind
    stale.close()
    inst.ctl("start", "log", check=True)
    inst.wait_state("log", "running")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    probe.sendto(b"<13>1 - - probe - - - fresh socket", str(path))
    probe.close()
    wait_for(lambda: query(inst, program="probe"), message="a record on the new socket")
    os.kill(inst.pid, signal.SIGTERM)
    assert inst.proc.wait(timeout=60) == 0
    assert not path.exists()


def test_queries_need_a_token_and_without_its_socket_the_logger_goes_on(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")  # no socket can be made under a file
    unusable = tmp_path / "a-file" / "log.sock"
    inst = start_logger(
        ikosd_factory,
        query_permission="log.read",
        socket_path=str(unusable),
        directory=str(unusable.parent / "records"),
    )
    # what it lacks is said once, in its log and its stats; IPC goes on, in memory
    stats = call(inst, {"op": "stats"})
    assert stats["socket"] is None and stats["files"] == []
    assert f"cannot bind the syslog socket {unusable}" in stats["socket_error"]
    assert "cannot write record files" in stats["files_error"]
    said = inst.ctl("logs", "log").stdout
    assert "records come over ikos IPC only" in said and "kept in memory only" in said
    rotate = call(inst, {"op": "rotate"})
    assert rotate["ok"] is False and "cannot write record files" in rotate["error"]
    assert log.send("open to all", program="anyone", root=inst.root, wait=True)["ok"]
    for request, says in (
        ({}, "a 'token' holding 'log.read' is needed"),
        ({"token": "stolen"}, "not allowed by 'auth': bad token"),
    ):
        reply = call(inst, {"op": "query", "program": "anyone", **request})
        assert reply["ok"] is False and says in reply["error"], reply
    records = query(inst, program="anyone", token="good-token")
    assert [r["msg"] for r in records] == ["open to all"]
    assert call(inst, {"op": "stats"})["denied"] == 2
    with pytest.raises(log.LogInputError, match="not allowed"):
        log.query(root=inst.root, program="anyone", token="stolen")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_loses_no_record_from_memory_and_tears_no_line(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    """The disk fills up under the logger: records still answered, files never torn."""
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(full)], check=True)
    try:
        inst = start_logger(ikosd_factory, directory=str(full))
        pid = inst.pid_of("log")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            for i in range(200):  # ~30 KiB of lines for 12 KiB of disk
                line = f"<13>Dec  6 04:00:00 host fill: record {i:03d} " + "x" * 100
                client.sendto(line.encode(), str(sock_path(inst)))
            wait_for(lambda: call(inst, {"op": "stats"})["kept"] >= 200, message="200 kept")
            stats = call(inst, {"op": "stats"})
            assert stats["write_errors"] > 0, stats  # the disk did fill up
            # every record is still answered from memory, and the logger never restarted
            assert len(query(inst, program="fill", limit=1000)) == 200
            assert inst.pid_of("log") == pid

            # space again (an operator cleaned up): records reach the file again
            subprocess.run(["mount", "-o", "remount,size=1m", str(full)], check=True)
            for i in range(5):
                client.sendto(f"<13>Dec  6 04:00:01 host after: back {i}".encode(),
                              str(sock_path(inst)))  # fmt: skip
            current = full / "current.jsonl"
            wait_for(lambda: "back 4" in current.read_text(), message="records written again")
        # a write cut short by the full disk left no half line for the next to run into
        lines = current.read_text().splitlines()
        for n, text in enumerate(lines, 1):
            try:
                json.loads(text)
            except ValueError:
                pytest.fail(f"current.jsonl:{n} is not a whole record: {text!r}")
        kept = [json.loads(t)["msg"] for t in lines]
        assert [m for m in kept if m.startswith("back")] == [f"back {i}" for i in range(5)]
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
