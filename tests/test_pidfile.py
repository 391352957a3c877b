"""PID files: atomic, locked against a second holder in another process, checked when read."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_line, wait_for

from ikos._errors import IkosError
from ikos.platform._pidfile import PidFile, PidFileError, PidFileLocked, read_pid_file

HOLDER = textwrap.dedent(
    """
    import sys
    from ikos.platform._pidfile import PidFile
    p = PidFile(sys.argv[1])
    p.acquire()
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
    p.release()
    print("released", flush=True)
    """
)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        p.kill()
        p.wait(timeout=10)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                stream.close()


def start_holder(path: Path, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    procs.append(p)
    assert p.stdout is not None
    assert read_line(p.stdout) == "held\n"  # waits until the child holds the lock
    return p


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    return p.pid


def test_acquire_writes_atomically_and_release_removes(tmp_path: Path) -> None:
    path = tmp_path / "svc.pid"
    pf = PidFile(path)
    pf.acquire()
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        assert PidFile.is_locked(path)
        assert PidFile.read(path) == os.getpid()
        assert not PidFile.is_stale(path)
        assert [p.name for p in tmp_path.iterdir()] == ["svc.pid"]  # no temporary file left
    finally:
        pf.release()
    assert not path.exists()
    pf.release()  # idempotent


def test_second_holder_in_another_process_is_refused_with_the_holder_pid(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "ikosd.pid"
    holder = start_holder(path, procs)
    with pytest.raises(PidFileLocked) as info:
        PidFile(path).acquire()
    assert info.value.pid == holder.pid
    assert str(holder.pid) in str(info.value)
    assert isinstance(info.value, IkosError)
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.pid) == (str(path), holder.pid)
    assert path.read_text() == f"{holder.pid}\n"  # the refused claim changed nothing

    # When the holder lets go, the claim succeeds.
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()
    assert read_line(holder.stdout) == "released\n"
    assert holder.wait(timeout=10) == 0
    pf = PidFile(path)
    pf.acquire()
    pf.release()


def test_same_process_second_claim_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pid"
    with PidFile(path), pytest.raises(PidFileLocked):
        PidFile(path).acquire()


def test_lock_dies_with_a_killed_holder_and_the_file_is_stale(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "svc.pid"
    holder = start_holder(path, procs)
    holder.kill()
    holder.wait(timeout=10)
    # The file remains, naming a dead process, and nobody holds its lock.
    assert path.read_text() == f"{holder.pid}\n"
    assert not PidFile.is_locked(path)
    assert PidFile.read(path) is None
    assert PidFile.is_stale(path)
    pf = PidFile(path)
    pf.acquire(4242)
    try:
        assert path.read_text() == "4242\n"
    finally:
        pf.release()


@pytest.mark.parametrize(
    "content",
    ["", "garbage\n", "-5\n", "0\n", "1\n", "12 34\n", "9" * 30, "\x00\x01", "1" * 100],
)
def test_invalid_content_reads_as_stale(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.pid"
    path.write_text(content)
    assert PidFile.read(path) is None
    assert PidFile.is_stale(path)
    with pytest.raises(PidFileError):
        read_pid_file(path)
    with PidFile(path):  # a stale file never blocks a claim
        assert path.read_text() == f"{os.getpid()}\n"


def test_read_of_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.pid"
    assert PidFile.read(path) is None
    assert not PidFile.is_stale(path)
    with pytest.raises(PidFileError, match="does not exist"):
        read_pid_file(path)


def test_read_pid_file_refuses_pid_1_dead_pids_and_strangers(tmp_path: Path) -> None:
    path = tmp_path / "daemon.pid"
    path.write_text("1\n")
    with pytest.raises(PidFileError, match="PID 1"):
        read_pid_file(path)
    assert PidFile.read(path) is None

    gone = dead_pid()
    path.write_text(f"{gone}\n")
    with pytest.raises(PidFileError, match=f"PID {gone}, which is not running"):
        read_pid_file(path)

    # A live process, but in another process group and session than the owner's.
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        path.write_text(f"{stranger.pid}\n")
        assert read_pid_file(path) == stranger.pid  # no owner given: only liveness
        with pytest.raises(PidFileError, match="outside the daemon's process group"):
            read_pid_file(path, owner_pgid=os.getpgrp())
        assert read_pid_file(path, owner_pgid=stranger.pid) == stranger.pid
        assert (
            read_pid_file(path, owner_pgid=os.getpgrp(), owner_pids={stranger.pid}) == stranger.pid
        )
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def test_forking_daemon_main_pid_accepted_in_its_session(tmp_path: Path) -> None:
    """The shape of Type=forking: a launcher in its own session writes the PID of its child."""
    path = tmp_path / "forking.pid"
    script = f"sleep 30 & echo $! > {path}; wait"
    launcher = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        wait_for(lambda: path.exists() and path.read_text().strip().isdigit())
        main = read_pid_file(path, owner_pgid=launcher.pid)
        assert main != launcher.pid and os.getsid(main) == launcher.pid
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)


def test_release_does_not_remove_a_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "svc.pid"
    pf = PidFile(path)
    pf.acquire()
    path.unlink()  # removed by hand...
    other = PidFile(path)
    other.acquire()  # ...and claimed again
    pf.release()
    assert path.read_text() == f"{os.getpid()}\n" and PidFile.is_locked(path)
    other.release()
    assert not path.exists()
