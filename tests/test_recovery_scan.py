"""The scan for processes carrying an instance's mark (``ikos.manager._recovery.find_marked``).

It decodes only the environments that contain the marker's bytes; what it
finds must stay exactly what a full decode finds: the process whose
``IKOS_INSTANCE`` is the mark, not one whose value merely starts with it, nor
one where the bytes appear in another variable.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from conftest import wait_for

from ikos.manager._recovery import MARK_DAEMON, MARK_INSTANCE, find_marked
from ikos.platform._process import environ_of

MARK = "0123456789abcdef"


@pytest.fixture
def sleepers() -> Iterator[dict[str, int]]:
    """Processes with look-alike environments: name -> pid (killed and reaped after)."""
    envs = {
        "marked": {MARK_INSTANCE: MARK, MARK_DAEMON: "web"},
        "longer": {MARK_INSTANCE: MARK + "0"},  # the bytes are there, the value differs
        "elsewhere": {"OTHER": f"{MARK_INSTANCE}={MARK}"},  # in another variable's value
        "other": {MARK_INSTANCE: "fedcba9876543210"},
    }
    procs = {
        name: subprocess.Popen(["/bin/sleep", "1000"], env={"PATH": os.defpath, **env})
        for name, env in envs.items()
    }
    try:
        # Popen returns once exec has closed its error pipe, which is before the
        # kernel sets up the new environment: /proc/PID/environ reads empty until then
        for p in procs.values():
            wait_for(lambda p=p: environ_of(p.pid), 60, message=f"{p.pid}'s environment")
        yield {name: p.pid for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_find_marked_finds_exactly_the_marked_process(sleepers: dict[str, int]) -> None:
    found = [(m.info.pid, m.daemon) for m in find_marked(MARK)]
    assert found == [(sleepers["marked"], "web")]


def test_environ_of_with_containing_decodes_only_what_contains_the_bytes(
    sleepers: dict[str, int],
) -> None:
    needle = f"{MARK_INSTANCE}={MARK}".encode()
    env = environ_of(sleepers["marked"], containing=needle)
    assert env is not None and env[MARK_INSTANCE] == MARK
    assert environ_of(sleepers["other"], containing=needle) is None
    assert environ_of(sleepers["other"]) == {"PATH": os.defpath, MARK_INSTANCE: "fedcba9876543210"}


def test_a_process_caught_in_its_execve_is_found(
    sleepers: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Popen returns once exec closed its error pipe, before the kernel copied the
    # environment into the new memory: read at once, /proc/PID/environ is empty
    # about 4 times in 10 here. A daemon a crashed ikosd was starting at that
    # moment must be found. The scan is given the new process first, as the
    # scan of a machine of many processes may.
    from ikos.manager import _recovery

    newest: list[int] = []
    monkeypatch.setattr(_recovery, "all_pids", lambda: [*newest, sleepers["marked"]])
    for _ in range(40):
        with subprocess.Popen(
            ["/bin/sleep", "1000"], env={"PATH": os.defpath, MARK_INSTANCE: MARK}
        ) as proc:
            newest[:] = [proc.pid]
            try:
                found = {m.info.pid for m in find_marked(MARK)}
            finally:
                proc.kill()
        assert found == {sleepers["marked"], proc.pid}


def test_an_empty_environment_is_read_again_only_while_it_may_fill(
    sleepers: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ikos.manager import _recovery
    from ikos.platform._process import may_gain_environ, read_small

    # the marked process as the scan sees it mid-execve: empty, three times
    reads = {"marked": 0}
    target = f"/proc/{sleepers['marked']}/environ"

    def reading(path: str) -> bytes | None:
        if path == target and reads["marked"] < 3:
            reads["marked"] += 1
            return b""
        return read_small(path)

    monkeypatch.setattr(_recovery, "read_small", reading)
    monkeypatch.setattr(_recovery, "may_gain_environ", lambda pid: True)
    assert [m.info.pid for m in find_marked(MARK)] == [sleepers["marked"]]
    assert reads["marked"] == 3
    # a process started with no environment at all is not one: its command line shows
    with subprocess.Popen(["/bin/sleep", "1000"], env={}) as bare:
        try:
            wait_for(lambda: read_small(f"/proc/{bare.pid}/cmdline"), 60)
            assert read_small(f"/proc/{bare.pid}/environ") == b""
            assert not may_gain_environ(bare.pid)
        finally:
            bare.kill()
    assert not may_gain_environ(bare.pid)  # a zombie, then gone
