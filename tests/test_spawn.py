"""Spawning executables: plans checked in the parent, isolation read in /proc of real processes."""

from __future__ import annotations

import dataclasses
import os
import resource
import select
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, ignored_signals, wait_for

from ikos._errors import SpawnError, SpecError
from ikos.platform._paths import InstancePaths
from ikos.platform._signals import parse_signal, signal_name
from ikos.platform._spawn import (
    CAP_SYS_RESOURCE,
    RLIMIT_FIELDS,
    ExecPlan,
    ResourceLimits,
    build_exec_plan,
    has_capability,
    notify_socket_address,
    parse_environment_file,
    spawn_exec,
)
from ikos.supervision._spec import Exec

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="changing user/group needs root")
SLEEP = shutil.which("sleep") or "/bin/sleep"


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name = line[:26].strip()
        soft, hard = line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)


@pytest.fixture
def paths(tmp_path: Path) -> InstancePaths:
    p = InstancePaths.for_root(tmp_path / "inst")
    p.create()
    p.config_file.parent.mkdir(parents=True, exist_ok=True)
    return p


def plan_for(paths: InstancePaths, executable: str = SLEEP, **fields: Any) -> ExecPlan:
    fields.setdefault("args", ["30"])
    fields.setdefault("stdout", "null")
    fields.setdefault("stderr", "null")
    return build_exec_plan(Exec("svc", executable, **fields), paths)


# -- ResourceLimits -------------------------------------------------------------------------


def test_resource_limits_has_one_field_per_rlimit() -> None:
    from_module = {
        n[len("RLIMIT_") :].lower()
        for n in dir(resource)
        if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE"
    }
    expected = {"as_" if n == "as" else n for n in from_module} | {"locks"}
    assert set(RLIMIT_FIELDS) == expected
    names = {f.name for f in dataclasses.fields(ResourceLimits)}
    assert names == expected | {"memory_max", "cpu_quota", "tasks_max"}


def test_resource_limits_from_mapping_accepts_the_documented_forms() -> None:
    limits = ResourceLimits.from_mapping(
        "web",
        {
            "nofile": [1024, 4096],
            "core": 0,
            "as": "infinity",
            "stack": [8 << 20, resource.RLIM_INFINITY],
            "memory_max": "512M",
            "cpu_quota": "50%",
            "tasks_max": 64,
        },
    )
    assert limits.nofile == (1024, 4096)
    assert limits.core == 0
    assert limits.as_ == resource.RLIM_INFINITY
    assert limits.stack == (8 << 20, resource.RLIM_INFINITY)
    assert limits.memory_max == 512 << 20
    assert limits.cpu_quota == 0.5
    assert limits.tasks_max == 64
    assert limits.needs_cgroup
    assert ResourceLimits.from_mapping("web", limits.as_mapping()) == limits
    assert not ResourceLimits(nofile=10).needs_cgroup


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        ({"nofiles": 10}, "limits.nofiles"),
        ({"nofile": -5}, "limits.nofile"),
        ({"nofile": True}, "limits.nofile"),
        ({"nofile": [10]}, "limits.nofile"),
        ({"nofile": [4096, 1024]}, "limits.nofile"),
        ({"core": "lots"}, "limits.core"),
        ({"memory_max": "12 parsecs"}, "limits.memory_max"),
        ({"memory_max": 0}, "limits.memory_max"),
        ({"cpu_quota": 0}, "limits.cpu_quota"),
        ({"cpu_quota": "x%"}, "limits.cpu_quota"),
        ({"tasks_max": 0}, "limits.tasks_max"),
    ],
)
def test_resource_limits_from_mapping_names_the_bad_limit(
    mapping: dict[str, Any], field: str
) -> None:
    with pytest.raises(SpawnError) as info:
        ResourceLimits.from_mapping("web", mapping)
    assert info.value.daemon == "web"
    assert info.value.field == field
    assert "web" in str(info.value) and field in str(info.value)


# -- signals ---------------------------------------------------------------------------------


def test_parse_signal_accepts_every_spelling_and_refuses_the_rest() -> None:
    for spelling in (9, "9", " 9 ", "KILL", "SIGKILL", "sigkill", "kill", signal.SIGKILL):
        assert parse_signal(spelling) is signal.SIGKILL, spelling
    rt = signal.SIGRTMIN + 3  # a real-time signal has no name of its own, but works
    assert parse_signal(rt) == rt and parse_signal(str(int(rt))) == rt
    assert signal_name(signal.SIGHUP) == "SIGHUP" and signal_name(rt) == rt
    for bad in (True, False, 0, -1, signal.NSIG, 100000, "", "SIG", "NOPE", "9x", 9.0, None, [9]):
        with pytest.raises(ValueError):
            parse_signal(bad)


# -- validation in the parent ---------------------------------------------------------------


def test_environment_file_syntax() -> None:
    text = (
        "# comment\n"
        "; another\n"
        "\n"
        "A=1\n"
        "  B = spaced value  \n"
        "C='single # not a comment'\n"
        'D="double \\"quoted\\" \\$HOME"\n'
        'E="two\nlines"\n'
        "F=cont\\\n"
        "inued\n"
        "export G=exported\n"
        "H=\n"
    )
    assert parse_environment_file(text) == {
        "A": "1",
        "B": "spaced value",
        "C": "single # not a comment",
        "D": 'double "quoted" $HOME',
        "E": "two\nlines",
        "F": "continued",
        "G": "exported",
        "H": "",
    }
    for bad in ("NOEQUALS\n", "1BAD=x\n", 'Q="unterminated\n', "Q='x' trailing\n"):
        with pytest.raises(ValueError, match="line"):
            parse_environment_file(bad)


def _bad_field_cases(tmp: Path) -> list[tuple[str, dict[str, Any], str]]:
    not_exec = tmp / "not-exec"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    bad_env = tmp / "bad.env"
    bad_env.write_text("GOOD=1\nthis line is wrong\n")
    return [
        (str(tmp / "missing"), {}, "executable"),
        ("no-such-command-ikos", {}, "executable"),
        (str(not_exec), {}, "executable"),
        (str(tmp), {}, "executable"),
        (SLEEP, {"user": "no-such-user-ikos"}, "user"),
        (SLEEP, {"group": "no-such-group-ikos"}, "group"),
        (SLEEP, {"supplementary_groups": ["no-such-group-ikos"]}, "supplementary_groups"),
        (SLEEP, {"stderr": f"file:{tmp}/no/such/dir/x.log"}, "stderr"),
        (SLEEP, {"stdin": f"file:{tmp}/missing-input"}, "stdin"),
        (SLEEP, {"environment_files": [str(bad_env)]}, "environment_files"),
        (SLEEP, {"environment_files": [str(tmp / "missing.env")]}, "environment_files"),
        (SLEEP, {"limits": {"nofile": 1 << 40}}, "limits.nofile"),
        (SLEEP, {"working_directory": str(tmp / "nowhere")}, "working_directory"),
    ]


def test_build_exec_plan_names_daemon_and_field_for_each_bad_field(
    paths: InstancePaths, tmp_path: Path
) -> None:
    # What only the machine can tell (users, files, its limits) is found by the plan.
    for executable, fields, field in _bad_field_cases(tmp_path):
        spec = Exec("broken", executable, **{"stdout": "null", "stderr": "null", **fields})
        with pytest.raises(SpawnError) as info:
            build_exec_plan(spec, paths)
        assert (info.value.daemon, info.value.field) == ("broken", field), (fields, info.value)
        assert str(info.value).startswith(f"daemon 'broken', field '{field}': ")


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"umask": "999"}, "umask"),
    ({"umask": 0o1777}, "umask"),
    ({"umask": [1]}, "umask"),
    ({"stdout": "syslog"}, "stdout"),
    ({"stdout": "file:"}, "stdout"),
    ({"stdin": "log"}, "stdin"),
    ({"stdin": "append:/tmp/x"}, "stdin"),
    ({"environment": {"A=B": "x"}}, "environment"),
    ({"environment": ["A=B"]}, "environment"),
    ({"environment": {"A": True}}, "environment.A"),
    ({"limits": {"nofile": "many"}}, "limits.nofile"),
    ({"limits": {"bogus": 1}}, "limits.bogus"),
    ({"limits": 5}, "limits"),
    ({"type": "daemonized"}, "type"),
    ({"reload_signal": "SIGNOPE"}, "reload_signal"),
    ({"stop_signal": 999}, "stop_signal"),
    ({"stop_signal": True}, "stop_signal"),
    ({"args": "30"}, "args"),
    ({"args": ["a\0b"]}, "args"),
    ({"clear_environment": "yes"}, "clear_environment"),
    ({"user": ""}, "user"),
    ({"group": -1}, "group"),
    ({"supplementary_groups": [None]}, "supplementary_groups"),
    ({"working_directory": 3}, "working_directory"),
    ({"kill_mode": "nonsense"}, "kill_mode"),
    ({"reload_command": []}, "reload_command"),
    ({"reload_command": ["kill", None]}, "reload_command"),
    ({"watchdog_sec": -1}, "watchdog_sec"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_VALUES, ids=lambda v: str(v)[:30])
def test_a_bad_value_is_refused_when_the_spec_is_made(fields: dict[str, Any], field: str) -> None:
    # A value of the wrong form is refused up front, by the spec, before any plan.
    with pytest.raises(SpecError) as info:
        Exec("broken", SLEEP, **fields)
    assert (info.value.path, info.value.key) == ("broken", field), fields
    assert str(info.value).startswith(f"broken: {field}: expected ")


def test_setting_user_or_groups_requires_root(
    paths: InstancePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    monkeypatch.setattr(os, "getegid", lambda: 12345)
    for fields, field in (
        ({"user": "nobody"}, "user"),
        ({"group": "nogroup"}, "group"),
        ({"supplementary_groups": ["users"]}, "supplementary_groups"),
    ):
        with pytest.raises(SpawnError, match="requires root") as info:
            plan_for(paths, **fields)
        assert info.value.field == field


def test_plan_resolves_names_paths_and_environment(
    paths: InstancePaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IKOS_TEST_INHERITED", "yes")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # ikosd's own, under systemd
    monkeypatch.setenv("LISTEN_FDS", "2")
    env_file = tmp_path / "svc.env"
    env_file.write_text("FROM_FILE=1\nOVERRIDDEN=file\n")
    plan = plan_for(
        paths,
        "sleep",
        environment={"OVERRIDDEN": "environment", "PORT": 8080},
        environment_files=[str(env_file), "-/no/such/optional.env"],
        type="notify",
        pid_file="svc.pid",
        reload_signal="hup",
        stop_signal=signal.SIGINT,
        umask="0o027",
    )
    assert os.path.realpath(plan.executable) == os.path.realpath(SLEEP)
    assert plan.argv == ("sleep", "30")
    env = plan.environ
    assert env["IKOS_TEST_INHERITED"] == "yes"
    assert env["FROM_FILE"] == "1" and env["PORT"] == "8080"
    assert env["OVERRIDDEN"] == "file"  # files come after Environment=, as in systemd
    assert env["NOTIFY_SOCKET"] == notify_socket_address(paths) == plan.notify_socket
    assert plan.pid_file == str(paths.run_dir / "svc.pid")
    assert plan.reload_signal == signal.SIGHUP and plan.stop_signal == signal.SIGINT
    assert plan.umask == 0o027
    assert plan.log_path == str(paths.log_dir / "svc.log")

    plain = plan_for(paths).environ
    assert "NOTIFY_SOCKET" not in plain and "LISTEN_FDS" not in plain
    assert plain["IKOS_TEST_INHERITED"] == "yes"

    deep = InstancePaths.for_root(Path("/tmp") / ("x" * 120))
    assert notify_socket_address(deep).startswith("@ikos-")
    assert notify_socket_address(deep) == notify_socket_address(deep)

    cleared = plan_for(paths, clear_environment=True, environment={"ONLY": "this"})
    assert cleared.environ == {
        "ONLY": "this",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }


# -- real processes --------------------------------------------------------------------------


@needs_root
def test_isolation_fields_seen_in_proc_of_the_real_process(
    paths: InstancePaths, tmp_path: Path, children: list[int]
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    env_file = tmp_path / "svc.env"
    env_file.write_text('FROM_FILE="quoted value"\n')
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    out.write_text("old content to be truncated\n")
    err.write_text("kept\n")
    plan = plan_for(
        paths,
        user="nobody",
        group="nogroup",
        supplementary_groups=["users"],
        umask="027",
        working_directory=str(workdir),
        clear_environment=True,
        environment={"GREETING": "hello"},
        environment_files=[str(env_file)],
        stdin="null",
        stdout=f"file:{out}",
        stderr=f"append:{err}",
        limits={"nofile": [100, 200], "core": 0, "nproc": [5000, 10000], "as": [1 << 32, 1 << 33]},
    )
    keep_r, keep_w = os.pipe()
    try:
        pid = spawn_exec(plan, keep_fds=[keep_w])
        children.append(pid)
    finally:
        os.close(keep_r)
        os.close(keep_w)

    assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(SLEEP)
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == f"{SLEEP}\x0030\x00".encode()
    status = proc_status(pid)
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert set(status["Groups"].split()) == {"65534", "100"}
    assert status["Umask"] == "0027"
    assert int(status["SigBlk"], 16) == 0
    # pytest's process ignores SIGPIPE; the daemon must not
    assert ignored_signals(status) == set()
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == str(workdir)

    limits = proc_limits(pid)
    assert limits["Max open files"] == ("100", "200")
    assert limits["Max core file size"] == ("0", "0")
    assert limits["Max processes"] == ("5000", "10000")
    assert limits["Max address space"] == (str(1 << 32), str(1 << 33))

    env = proc_environ(pid)
    assert env["GREETING"] == "hello"
    assert env["FROM_FILE"] == "quoted value"
    assert env["USER"] == env["LOGNAME"] == "nobody"
    assert env["HOME"] == "/nonexistent"
    assert "IKOS_ROOT" not in env and "PYTEST_CURRENT_TEST" not in env

    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert fds[0] == "/dev/null"
    assert fds[1] == str(out)
    assert fds[2] == str(err)
    assert fds[keep_w].startswith("pipe:")
    assert set(fds) == {0, 1, 2, keep_w}  # everything else was closed
    assert out.read_text() == ""  # file: truncates
    assert err.read_text() == "kept\n"  # append: keeps
    flags = Path(f"/proc/{pid}/fdinfo/2").read_text()
    assert int(flags.split("flags:")[1].split()[0], 8) & os.O_APPEND


def test_raising_a_hard_limit_needs_cap_sys_resource(
    paths: InstancePaths, children: list[int]
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    higher = min(hard * 2, int(Path("/proc/sys/fs/nr_open").read_text()))
    if higher <= hard:
        pytest.skip("the nofile hard limit is already at fs.nr_open")
    if not has_capability(CAP_SYS_RESOURCE):
        # Refused in the parent, naming the limit, not by a failing child.
        with pytest.raises(SpawnError, match="CAP_SYS_RESOURCE") as info:
            plan_for(paths, limits={"nofile": [1024, higher]})
        assert info.value.field == "limits.nofile"
    else:
        pid = spawn_exec(plan_for(paths, limits={"nofile": [1024, higher]}))
        children.append(pid)
        assert proc_limits(pid)["Max open files"] == ("1024", str(higher))


def test_stdio_file_content_and_log_pipe(
    paths: InstancePaths, tmp_path: Path, children: list[int]
) -> None:
    both = tmp_path / "both.log"
    plan = plan_for(
        paths,
        "/bin/sh",
        args=["-c", "echo to-stdout; echo to-stderr >&2; exec sleep 30"],
        stdout=f"file:{both}",
        stderr=f"file:{both}",
    )
    children.append(spawn_exec(plan))
    # Same file for both streams: one open file description, so no overwriting.
    wait_for(lambda: both.read_text() == "to-stdout\nto-stderr\n")

    plan = plan_for(
        paths,
        "/bin/sh",
        args=["-c", "echo via-pipe; echo err-pipe >&2; exec sleep 30"],
        stdout="log",
        stderr="log",
    )
    r, w = os.pipe()
    try:
        children.append(spawn_exec(plan, stdio_fds={1: w, 2: w}))
        os.close(w)
        w = -1
        data = b""
        deadline = time.monotonic() + 30
        while data.count(b"\n") < 2:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no two lines within 30 s: {data!r}"
            chunk = os.read(r, 4096)
            assert chunk, "pipe closed early"
            data += chunk
        assert data == b"via-pipe\nerr-pipe\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_stdin_file_and_inherited_stdio(
    paths: InstancePaths, tmp_path: Path, children: list[int]
) -> None:
    source = tmp_path / "input.txt"
    source.write_text("data\n")
    plan = plan_for(paths, stdin=f"file:{source}", stdout="inherit", stderr="inherit")
    pid = spawn_exec(plan)
    children.append(pid)
    assert os.readlink(f"/proc/{pid}/fd/0") == str(source)
    for fd in (1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.readlink(f"/proc/self/fd/{fd}")


def test_log_mode_without_a_pipe_fails_in_the_child(paths: InstancePaths) -> None:
    plan = plan_for(paths, stdout="log")
    with pytest.raises(SpawnError) as info:
        spawn_exec(plan)
    assert (info.value.daemon, info.value.field) == ("svc", "stdout")
    assert "pipe" in info.value.reason


def test_signal_mask_and_dispositions_are_reset(paths: InstancePaths, children: list[int]) -> None:
    old_handler = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        pid = spawn_exec(plan_for(paths))
        children.append(pid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGUSR2, old_handler)
    status = proc_status(pid)
    assert int(status["SigBlk"], 16) == 0
    assert ignored_signals(status) == set()
    os.kill(pid, signal.SIGUSR2)  # default action: terminate
    _, st = os.waitpid(pid, 0)
    children.remove(pid)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGUSR2


def test_failures_in_the_child_are_reported_with_their_field(
    paths: InstancePaths, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    plan = plan_for(paths, working_directory=str(gone))
    gone.rmdir()  # disappears between validation and exec
    with pytest.raises(SpawnError) as info:
        spawn_exec(plan)
    assert info.value.field == "working_directory"
    assert "No such file or directory" in info.value.reason

    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    plan = plan_for(paths, str(script))
    script.chmod(0o644)
    if ROOT:  # root may exec a file with any x bit only; remove them all
        script.chmod(stat.S_IRUSR)
    with pytest.raises(SpawnError) as info:
        spawn_exec(plan)
    assert (info.value.daemon, info.value.field) == ("svc", "executable")
    assert "Permission denied" in info.value.reason

    script.write_bytes(b"\x7fELFgarbage")
    script.chmod(0o755)
    with pytest.raises(SpawnError) as info:
        spawn_exec(plan)
    assert info.value.field == "executable"
    assert "Exec format error" in info.value.reason


@needs_root
def test_executable_out_of_reach_of_the_user(paths: InstancePaths, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    script = private / "run"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o700)
    with pytest.raises(SpawnError) as info:
        plan_for(paths, str(script), user="nobody")
    assert info.value.field == "executable"
    assert "not executable by user 'nobody'" in info.value.reason
    script.chmod(0o755)
    with pytest.raises(SpawnError) as info:
        plan_for(paths, str(script), user="nobody")
    assert info.value.field == "executable"
    assert (
        f"cannot search {private.parent}" in info.value.reason
        or "cannot search" in info.value.reason
    )


@needs_root
def test_failure_after_dropping_privileges_is_reported(
    paths: InstancePaths, tmp_path: Path
) -> None:
    # Valid when checked; the directory closes before exec: execve as nobody fails.
    shared = Path(tempfile.mkdtemp(prefix="ikos-test-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        script = shared / "run"
        script.write_text("#!/bin/sh\nexec sleep 30\n")
        script.chmod(0o755)
        plan = plan_for(paths, str(script), user="nobody")
        shared.chmod(0o700)
        with pytest.raises(SpawnError) as info:
            spawn_exec(plan)
        assert (info.value.daemon, info.value.field) == ("svc", "executable")
        assert "Permission denied" in info.value.reason
    finally:
        shutil.rmtree(shared)


def test_exec_type_readiness_is_the_end_of_the_error_pipe(
    paths: InstancePaths, children: list[int]
) -> None:
    plan = plan_for(paths, type="exec", args=["300"])
    start = time.monotonic()
    pid = spawn_exec(plan)
    children.append(pid)
    # not when the process ends (in 300 s): a bound on hangs, not on speed
    assert time.monotonic() - start < HANG
    # When spawn_exec returns, the process is already the executable.
    assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(SLEEP)


def test_spawn_error_pickles() -> None:
    import pickle

    err = SpawnError("web", "user", "unknown user 'www'")
    again = pickle.loads(pickle.dumps(err))
    assert (again.daemon, again.field, again.reason) == ("web", "user", "unknown user 'www'")
