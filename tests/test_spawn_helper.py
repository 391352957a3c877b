"""The cgroup trampoline (ikos.platform._cgexec) and the pipe reading around it."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ikos.platform import _cgexec
from ikos.platform._spawn import read_until_eof


def test_parse_report() -> None:
    assert _cgexec.parse_report(b"pid 42\n") == (42, "")
    assert _cgexec.parse_report(b"cgroup: Permission denied: /x\n") == (
        None,
        "cgroup: Permission denied: /x",
    )
    assert _cgexec.parse_report(b"executable: No such file or directory: /a\npid 7\n") == (
        7,
        "executable: No such file or directory: /a",
    )
    assert _cgexec.parse_report(b"") == (None, "")


def test_read_until_eof_on_a_descriptor_above_1024() -> None:
    """A manager of hundreds of daemons holds such descriptors: select() refused them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    r, w = os.pipe2(os.O_CLOEXEC)
    high = os.dup2(r, 1500)
    os.close(r)
    try:
        os.write(w, b"pid 1\n")
        os.close(w)
        assert read_until_eof(high, time.monotonic() + 5) == (b"pid 1\n", True)
    finally:
        os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_trampoline_starts_the_daemon_in_its_cgroup_and_reports_failures(
    tmp_path: Path,
) -> None:
    helper = _cgexec.build()
    if helper is None:
        pytest.skip("no C compiler to build the spawn helper")
    assert _cgexec.build() == helper  # built once: the second call finds it

    def run(dirs: tuple[str, ...], executable: str) -> tuple[int, int | None, str]:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.posix_spawn(
            helper,
            _cgexec.argv(helper, dirs, executable, ("sleep", "100007")),
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_DUP2, w, _cgexec.ERROR_FD)],
        )
        os.close(w)
        data, eof = read_until_eof(r, time.monotonic() + 10)
        os.close(r)
        assert eof
        daemon, error = _cgexec.parse_report(data)
        return pid, daemon, error

    # no cgroup: the trampoline execs the daemon itself, in a session of its own
    pid, daemon, error = run((), "/bin/sleep")
    assert (daemon, error) == (pid, "")
    assert os.getsid(pid) == pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

    # a cgroup that is no directory: the field and the path are named
    pid, daemon, error = run((str(tmp_path / "nowhere"),), "/bin/sleep")
    assert daemon is None and error.startswith("cgroup: ") and "nowhere" in error, error
    os.waitpid(pid, 0)

    # an executable that cannot be run: named, and the trampoline exits 127
    pid, daemon, error = run((), str(tmp_path / "missing"))
    assert error == f"executable: No such file or directory: {tmp_path / 'missing'}"
    assert os.waitpid(pid, 0)[1] >> 8 == 127


def test_off_switch_and_no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKOS_SPAWN_HELPER", "off")
    assert _cgexec.helper_path() is None
    assert _cgexec.build() is None


def test_the_helper_is_refused_when_others_can_write_it(tmp_path: Path) -> None:
    helper = _cgexec.build()
    if helper is None:
        pytest.skip("no C compiler to build the spawn helper")
    copy = tmp_path / "copy"
    subprocess.run(["cp", helper, str(copy)], check=True)
    copy.chmod(0o777)
    assert not _cgexec._trusted(copy, directory=False)
    copy.chmod(0o755)
    assert _cgexec._trusted(copy, directory=False)


def test_plans_share_the_environment_and_see_its_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 plans must not hold 500 decoded copies of the manager's environment."""
    import ikos
    from ikos.platform._paths import InstancePaths
    from ikos.platform._spawn import build_exec_plan

    paths = InstancePaths.for_root(tmp_path)
    a = build_exec_plan(ikos.Exec("a", "/bin/true"), paths)
    b = build_exec_plan(ikos.Exec("b", "/bin/true"), paths)
    assert a.env == b.env
    assert all(x is y for x, y in zip(a.env, b.env, strict=True))
    monkeypatch.setenv("IKOS_TEST_SHARED_ENV", "changed")
    c = build_exec_plan(ikos.Exec("c", "/bin/true"), paths)
    assert c.environ["IKOS_TEST_SHARED_ENV"] == "changed"
    assert "IKOS_TEST_SHARED_ENV" not in a.environ


def test_plans_share_one_environment_tuple_and_their_stdio_specs(tmp_path: Path) -> None:
    """Per plan, only what is the daemon's own: ~40 pairs' tuple and three specs are shared."""
    import dataclasses

    import ikos
    from ikos.platform._paths import InstancePaths
    from ikos.platform._spawn import build_exec_plan, shared_env

    paths = InstancePaths.for_root(tmp_path)
    a = build_exec_plan(ikos.Exec("a", "/bin/true"), paths)
    b = build_exec_plan(ikos.Exec("b", "/bin/true", stdout="null"), paths)
    assert a.env is b.env
    assert a.stdin is b.stdin is b.stdout
    assert a.stdout is a.stderr is b.stderr
    # the daemon's marker is kept apart from the shared tuple, and set over it
    marks = (("IKOS_TEST_MARK", "instance"),)
    placed = [
        dataclasses.replace(p, env=shared_env((*p.env, *marks)), mark=("IKOS_TEST_DAEMON", n))
        for p, n in ((a, "a"), (b, "b"))
    ]
    assert placed[0].env is placed[1].env
    assert placed[0].environ["IKOS_TEST_DAEMON"] == "a"
    assert placed[1].environ["IKOS_TEST_DAEMON"] == "b"
    assert placed[1].environ["IKOS_TEST_MARK"] == "instance"
    assert "IKOS_TEST_DAEMON" not in a.environ
