"""sd_notify: real senders, kernel credentials, and what a hostile sender cannot do."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, wait_for

from ikos.platform import _notify
from ikos.platform._notify import (
    MAX_NOTIFY_BYTES,
    NotifyMessage,
    NotifySocket,
    SenderLimits,
    main_pid,
    notify,
    parse_notify,
)
from ikos.platform._paths import InstancePaths
from ikos.platform._spawn import build_exec_plan, spawn_exec
from ikos.supervision._spec import Exec

REPO = str(Path(__file__).resolve().parents[1])


def python(code: str, address: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": REPO, "NOTIFY_SOCKET": address}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, **kw)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait(timeout=10)


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    try:
        yield s
    finally:
        s.close()


# -- parsing ---------------------------------------------------------------------------------


def test_parse_notify() -> None:
    assert parse_notify(b"READY=1\nSTATUS=Serving 3 clients\nMAINPID=42\n") == {
        "READY": "1",
        "STATUS": "Serving 3 clients",
        "MAINPID": "42",
    }
    assert parse_notify(b"STATUS=a=b") == {"STATUS": "a=b"}
    assert parse_notify("STATUS=caf\u00e9".encode()) == {"STATUS": "caf\u00e9"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no KEY=VALUE"),
        (b"\n\n", "no KEY=VALUE"),
        (b"READY", "no '='"),
        (b"READY=1\ngarbage", "line 2"),
        (b"=1", "invalid key"),
        (b"BAD KEY=1", "invalid key"),
        (b"STATUS=\xff\xfe", "not UTF-8"),
        (b"READY=1\x00", "NUL"),
        (b"STATUS=" + b"x" * MAX_NOTIFY_BYTES, "more than 4096"),
    ],
)
def test_parse_notify_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_notify(data)


def test_main_pid_checks() -> None:
    me = os.getpid()
    assert main_pid({}, owner_pgid=os.getpgrp()) is None
    assert main_pid({"MAINPID": str(me)}, owner_pgid=os.getpgrp()) == me
    for value, reason in (
        ("1", "init"),
        ("abc", "not a PID"),
        ("-3", "not a PID"),
        ("0", "not a PID"),
    ):
        with pytest.raises(ValueError, match=reason):
            main_pid({"MAINPID": value}, owner_pgid=os.getpgrp())
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        with pytest.raises(ValueError, match="outside the daemon's process group"):
            main_pid({"MAINPID": str(stranger.pid)}, owner_pgid=os.getpgrp())
        assert main_pid({"MAINPID": str(stranger.pid)}, owner_pgid=stranger.pid) == stranger.pid
        pids = frozenset({stranger.pid})
        assert (
            main_pid({"MAINPID": str(stranger.pid)}, owner_pgid=1, owner_pids=pids) == stranger.pid
        )
    finally:
        stranger.kill()
        stranger.wait(timeout=10)
    with pytest.raises(ValueError, match="not running"):
        main_pid({"MAINPID": str(stranger.pid)}, owner_pgid=os.getpgrp())


# -- real senders ----------------------------------------------------------------------------


def test_real_child_notifies_with_kernel_credentials(
    sock: NotifySocket, procs: list[subprocess.Popen[bytes]]
) -> None:
    child = python(
        """
        import os
        from ikos.platform._notify import notify
        assert notify("STATUS=starting")
        assert notify(f"READY=1\\nSTATUS=ready\\nMAINPID={os.getpid()}")
        """,
        sock.address,
    )
    procs.append(child)
    assert child.wait(timeout=30) == 0
    messages: list[NotifyMessage] = []

    def two() -> bool:
        messages.extend(sock.drain())
        return len(messages) >= 2

    wait_for(two, message="the two notifications")
    assert messages == [
        NotifyMessage(child.pid, os.getuid(), os.getgid(), {"STATUS": "starting"}),
        NotifyMessage(
            child.pid,
            os.getuid(),
            os.getgid(),
            {"READY": "1", "STATUS": "ready", "MAINPID": str(child.pid)},
        ),
    ]
    assert sock.recv() is None
    assert sock.dropped == 0


def test_systemd_notify_binary_is_understood(sock: NotifySocket) -> None:
    tool = shutil.which("systemd-notify")
    if tool is None:
        pytest.skip("systemd-notify is not installed")
    env = {**os.environ, "NOTIFY_SOCKET": sock.address}
    # --pid names the main PID explicitly; the sender is systemd-notify itself. systemd 250+
    # then sends BARRIER=1 with a pipe and waits until the manager closes it.
    tool_proc = subprocess.Popen(
        [tool, "--ready", "--status=from systemd-notify", f"--pid={os.getpid()}"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        messages: list[NotifyMessage] = []

        def tool_done() -> bool:
            messages.extend(sock.drain())  # it waits for its barrier to be read
            return tool_proc.poll() is not None

        wait_for(tool_done, HANG, interval=0.001, message="systemd-notify to finish")
        messages += sock.drain()
        assert tool_proc.stderr is not None
        assert tool_proc.returncode == 0, tool_proc.stderr.read()
    finally:
        tool_proc.kill()
        tool_proc.wait(timeout=10)
        if tool_proc.stderr is not None:
            tool_proc.stderr.close()
    assert sock.dropped == 0
    (msg,) = messages
    # As root, systemd-notify --pid sends with the credentials of that PID (CAP_SYS_ADMIN).
    assert msg.pid == (os.getpid() if os.geteuid() == 0 else tool_proc.pid)
    assert msg.fields["READY"] == "1"
    assert msg.fields["STATUS"] == "from systemd-notify"
    assert msg.fields["MAINPID"] == str(os.getpid())
    assert msg.uid == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_abstract_socket_and_a_daemon_running_as_nobody(tmp_path: Path) -> None:
    """A notify daemon spawned as nobody: the kernel says uid 65534, whatever it claims."""
    address = f"@ikos-test-{uuid.uuid4().hex}/notify"
    paths = InstancePaths.for_root(tmp_path / "inst")
    paths.create()
    tool = shutil.which("systemd-notify")
    if tool is None:
        pytest.skip("systemd-notify is not installed")
    with NotifySocket(address) as s:
        plan = build_exec_plan(
            Exec(
                "nb",
                tool,
                args=["--ready", "--status=up"],
                type="notify",
                user="nobody",
                stdout="null",
                stderr="null",
            ),
            paths,
        )
        env = dict(plan.env)
        env["NOTIFY_SOCKET"] = address  # the manager would point at its own socket
        import dataclasses

        pid = spawn_exec(dataclasses.replace(plan, env=tuple(env.items())))
        try:
            msg = wait_for(s.recv)
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        assert (msg.pid, msg.uid, msg.gid) == (pid, 65534, 65534)
        assert msg.fields["READY"] == "1" and msg.fields["STATUS"] == "up"


def test_long_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    address = str(deep / "notify.sock")
    assert len(address) > 108
    with NotifySocket(address) as s:
        assert os.path.exists(address)
        assert notify("READY=1", address)
        msg = wait_for(s.recv)
        assert msg.pid == os.getpid() and msg.fields == {"READY": "1"}
    assert not os.path.exists(address)  # close() unlinks


def test_notify_without_a_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    with pytest.raises(ValueError, match="absolute path"):
        notify("READY=1", "relative/path")


# -- hostile senders -------------------------------------------------------------------------


def _raw_sender(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(address)
    return s


def test_oversized_malformed_and_fd_carrying_datagrams_are_dropped(
    sock: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ikos.notify")
    with _raw_sender(sock.address) as s:
        s.send(b"STATUS=" + b"x" * 10_000)  # oversized
        s.send(b"\xff\xfe\xfd")  # not UTF-8
        s.send(b"no equals sign")
        r, w = os.pipe()
        try:
            s.sendmsg([b"FDSTORE=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
                __import__("array").array("i", [r, w]))))])  # fmt: skip
        finally:
            os.close(r)
            os.close(w)
        s.send(b"READY=1")
    fds_before = set(os.listdir("/proc/self/fd"))
    msg = sock.recv()
    assert msg is not None and msg.fields == {"READY": "1"} and msg.pid == os.getpid()
    assert sock.dropped == 4
    assert set(os.listdir("/proc/self/fd")) <= fds_before  # passed descriptors were closed
    text = caplog.text
    assert (
        "oversized" in text and "not UTF-8" in text and "no '='" in text and "descriptors" in text
    )


def test_flood_of_10000_datagrams_leaves_the_socket_usable(
    sock: NotifySocket, procs: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ikos.notify")
    flooder = python(
        """
        import os, socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.setblocking(False)
        sent = 0
        for i in range(10_000):
            payload = [b"STATUS=flood %d" % i, b"garbage", b"x" * 5000, b"\\xff"][i % 4]
            try:
                s.send(payload)
                sent += 1
            except BlockingIOError:
                pass  # the manager's queue is full: the flood is throttled by the kernel
        print(sent)
        """,
        sock.address,
        stdout=subprocess.PIPE,
    )
    procs.append(flooder)
    received: list[NotifyMessage] = []

    def flooder_done() -> bool:
        received.extend(sock.drain())
        return flooder.poll() is not None

    wait_for(flooder_done, HANG, interval=0.001, message="the flooder to finish")
    received += sock.drain()
    assert flooder.stdout is not None
    sent = int(flooder.stdout.read())
    flooder.stdout.close()
    assert sent > 0
    assert all(m.pid == flooder.pid and m.fields["STATUS"].startswith("flood") for m in received)
    assert len(received) + sock.dropped == sent
    # Logging stayed bounded however many were dropped.
    assert len([r for r in caplog.records if r.name == "ikos.notify"]) <= 20
    # And the socket still works.
    assert notify("READY=1", sock.address)
    msg = wait_for(sock.recv)
    assert msg.fields == {"READY": "1"} and msg.pid == os.getpid()


def test_recv_skips_a_bounded_number_of_bad_datagrams_per_call(tmp_path: Path) -> None:
    with NotifySocket(tmp_path / "n.sock", max_skip=5) as s, _raw_sender(s.address) as raw:
        # The kernel queues few datagrams per socket (net.unix.max_dgram_qlen, 10 here).
        for _ in range(8):
            raw.send(b"garbage")
        raw.send(b"READY=1")
        calls = 0
        msg = None
        while msg is None and calls < 100:  # a deadline: a bug must fail, not spin
            calls += 1
            msg = s.recv()
        assert calls == 2  # 6 datagrams consumed per empty-handed call, never all at once
        assert s.dropped == 8


# -- rate limits per sender --------------------------------------------------------------------


def drain_all(sock: NotifySocket) -> list[NotifyMessage]:
    """Every valid notification already queued (the senders sent before this)."""
    out: list[NotifyMessage] = []
    while batch := sock.drain():
        out += batch
    return out


def test_a_sender_over_its_rate_is_dropped_before_parsing(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ikos.notify")
    limits = SenderLimits(pid_rate=0.001, pid_burst=5, exempt_uids=frozenset())
    with NotifySocket(tmp_path / "n.sock", limits=limits) as sock:
        with _raw_sender(sock.address) as raw:
            for n in range(5):
                raw.send(b"STATUS=%d" % n)
            for _ in range(3):  # over the budget: not even parsed
                raw.send(b"no equals sign")
        received = drain_all(sock)
        assert [m.fields for m in received] == [{"STATUS": str(n)} for n in range(5)]
        assert sock.dropped == 3 and sock.rate_limited == {os.getuid(): 3}
        assert "no '='" not in caplog.text
        assert caplog.text.count("over its rate limit") == 1
        # Another process of the same user has a budget of its own.
        child = python("from ikos.platform._notify import notify; notify('READY=1')", sock.address)
        procs.append(child)
        assert child.wait(timeout=30) == 0
        msg = wait_for(sock.recv)
        assert (msg.pid, msg.fields) == (child.pid, {"READY": "1"})


def test_a_users_processes_share_the_users_budget(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    limits = SenderLimits(uid_rate=0.001, uid_burst=3, exempt_uids=frozenset())
    with NotifySocket(tmp_path / "n.sock", limits=limits) as sock:
        for _ in range(2):
            assert notify("WATCHDOG=1", sock.address)
        child = python(
            "from ikos.platform._notify import notify\nfor _ in range(3): notify('STATUS=x')",
            sock.address,
        )
        procs.append(child)
        assert child.wait(timeout=30) == 0
        received = drain_all(sock)
        assert len(received) == 3
        assert sock.rate_limited[os.getuid()] == 2


def test_the_count_of_dropped_datagrams_is_logged_once_per_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="ikos.notify")
    with NotifySocket(
        tmp_path / "n.sock",
        limits=SenderLimits(pid_rate=0.001, pid_burst=1, exempt_uids=frozenset()),
    ) as s:
        with _raw_sender(s.address) as raw:
            for _ in range(8):
                raw.send(b"WATCHDOG=1")
        assert len(drain_all(s)) == 1
        assert "dropped 7 datagrams" not in caplog.text
        monkeypatch.setattr(_notify, "LOG_WINDOW", 0.0)  # the window closes at the next datagram
        assert notify("WATCHDOG=1", s.address)
        wait_for(lambda: s.recv() is None and s.dropped == 8)
        assert f"dropped 7 datagrams of uid {os.getuid()} over its rate limit" in caplog.text


def test_the_table_of_senders_is_bounded() -> None:
    buckets = _notify._Buckets(rate=1.0, burst=2.0, max_tracked=10)
    for pid in range(1000):
        assert buckets.has(pid, 0.0)
        buckets.take(pid, 0.0)
        assert len(buckets._state) <= 11
    buckets.take(999, 0.0)
    assert not buckets.has(999, 0.0)  # its burst of two is spent
    assert buckets.has(999, 1.0)  # one second refills one token


def test_root_and_the_owner_are_not_rate_limited(tmp_path: Path) -> None:
    """A daemon of the owner that bursts STATUS= lines must not lose its READY=1."""
    limits = SenderLimits(pid_rate=0.001, pid_burst=1)
    assert os.getuid() in limits.exempt_uids
    with NotifySocket(tmp_path / "n.sock", limits=limits) as s:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for n in range(5):
            sender.sendto(f"STATUS={n}".encode(), str(tmp_path / "n.sock"))
        sender.close()
        got = [m.fields for m in s.drain()]
    assert [f["STATUS"] for f in got] == ["0", "1", "2", "3", "4"]
