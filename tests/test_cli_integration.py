"""ikosctl against a real ikosd, verb by verb, as a user runs it.

Every test starts the real ``ikosd`` on a small tree in a temporary root
(the ``ikosd_factory`` fixture) and drives it only through the real
``ikosctl`` command: exit codes, stdout and stderr are what is checked,
never the manager's internals. PIDs come from ``ikosctl --json status``
and liveness from /proc, so a restart is seen as a user would see it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, IKOSCTL, Instance, wait_for

from ikos.cli._ikosctl import PROTOCOL_VERBS, UNAVAILABLE_VERBS
from ikos.cli._render import LIST_COLUMNS
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths

TREE = """
import signal

import ikos
from examples.actors import Counter, Echo


class Signalled(ikos.Actor):
    '''Counts the SIGUSR1 it received; any message answers the count.'''

    def on_start(self):
        self.usr1 = 0
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum, frame):
        self.usr1 += 1

    def receive(self, message):
        return self.usr1


tree = ikos.Supervisor(
    "root",
    max_restarts=20,
    within=5,
    children=[
        ikos.Child("echo", Echo, description="answers every message"),
        ikos.Child("counter", Counter),
        ikos.Child("sig", Signalled),
        ikos.Supervisor(
            "workers",
            strategy="rest_for_one",
            max_restarts=20,
            within=5,
            children=[ikos.Child("w1", Echo), ikos.Child("w2", Echo)],
        ),
    ],
)
"""

# ikosd runs the IPC broker under ikos-system, the root's first child: it is a daemon of
# every instance.
TREE_ORDER = ["root", "ikos-system", "ikos-broker", "echo", "counter", "sig", "workers", "w1", "w2"]
STATUS_KEYS = {"name", "state", "pid", "restarts", "started_at", "supervisor"}
STATES = {"stopped", "starting", "running", "stopping", "backoff", "failed"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def alive(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single ``ikosctl: ...`` line a failure must print on stderr."""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {res.stderr!r}"
    assert lines[0].startswith("ikosctl: "), lines[0]
    assert "Traceback" not in res.stderr
    return lines[0]


def pids(inst: Instance) -> dict[str, int | None]:
    return {s["name"]: s["pid"] for s in inst.status()}


@pytest.fixture
def inst(ikosd_factory: Any) -> Instance:
    instance: Instance = ikosd_factory(tree=TREE)
    return instance


# -- status, list, tree, is-active ------------------------------------------


def test_status_json_has_the_contract_fields(inst: Instance) -> None:
    res = inst.ctl("status", "--json")
    assert res.returncode == 0, res.stderr
    statuses = json.loads(res.stdout)
    assert [s["name"] for s in statuses] == TREE_ORDER
    for s in statuses:
        assert set(s) >= STATUS_KEYS, s
        assert s["restarts"] == 0
        if s["name"] == "ikos-broker":  # no IPC yet: it waits for its first connection
            assert (s["state"], s["activation"], s["started_at"]) == ("stopped", "waiting", None)
            continue
        assert s["state"] == "running"
        assert isinstance(s["started_at"], int | float)
    by_name = {s["name"]: s for s in statuses}
    assert by_name["root"]["supervisor"] is None
    assert by_name["echo"]["supervisor"] == "root"
    assert by_name["w1"]["supervisor"] == "workers"
    assert by_name["workers"]["pid"] is None
    for name in ("echo", "counter", "sig", "w1", "w2"):
        assert alive(by_name[name]["pid"]), name


def test_status_human_block(inst: Instance) -> None:
    pid = inst.pid_of("echo")
    res = inst.ctl("status", "echo")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.splitlines()[0] == "echo - answers every message"
    since = r"since \S+; \d+[smhd]( \d+[smhd])? ago"
    assert re.search(rf"State: running \(pid {pid}\) {since}", out), out
    assert re.search(r"Restarts: 0$", out, re.M), out
    assert re.search(r"Supervisor: root$", out, re.M), out
    assert "\x1b[" not in out  # piped: no colours


def test_status_exit_codes(inst: Instance) -> None:
    assert inst.ctl("status").returncode == 0
    assert inst.ctl("status", "echo", "w2").returncode == 0
    inst.ctl("stop", "echo", check=True)
    assert inst.ctl("status").returncode == 3
    assert inst.ctl("status", "echo").returncode == 3
    assert inst.ctl("status", "counter").returncode == 0

    res = inst.ctl("status", "nosuch")
    assert res.returncode == 4
    assert "nosuch" in one_error_line(res)
    assert res.stdout == ""
    res = inst.ctl("status", "counter", "nosuch", "--json")
    assert res.returncode == 4
    assert "nosuch" in one_error_line(res)


def test_list_rows_and_json(inst: Instance) -> None:
    res = inst.ctl("list")
    assert res.returncode == 0, res.stderr
    # Piped: one tab-separated row per daemon, no header, uptime in seconds.
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert [row[0] for row in rows] == TREE_ORDER
    assert all(len(row) == 7 for row in rows)
    w1 = next(row for row in rows if row[0] == "w1")
    assert w1[1:4] == ["actor", "running", str(inst.pid_of("w1"))]
    assert w1[4] == "0" and w1[5].isdigit() and w1[6] == "workers"
    assert rows[0][3] == "-" and rows[0][6] == "-"  # root: no pid, no supervisor

    res = inst.ctl("list", "--json")
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert isinstance(listing, list)
    assert [s["name"] for s in listing] == TREE_ORDER
    for s in listing:
        assert set(s) >= STATUS_KEYS and s["state"] in STATES


def test_tree_text_and_json(inst: Instance) -> None:
    res = inst.ctl("tree")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "root [supervisor one_for_one] running"
    assert lines[1] == "├─ ikos-system [supervisor one_for_one] running"
    # no IPC yet: the broker waits for its first connection (socket activation)
    assert lines[2] == "│  └─ ikos-broker [exec] stopped (waiting for its first connection)"
    assert lines[3] == f"├─ echo [actor] running {inst.pid_of('echo')}"
    assert lines[6] == "└─ workers [supervisor rest_for_one] running"
    assert lines[7].startswith("   ├─ w1 [actor] running ")
    assert lines[8].startswith("   └─ w2 [actor] running ")

    res = inst.ctl("tree", "--json")
    assert res.returncode == 0, res.stderr
    root = json.loads(res.stdout)
    assert root["name"] == "root" and root["supervisor"] is None
    assert [c["name"] for c in root["children"]] == [
        "ikos-system",
        "echo",
        "counter",
        "sig",
        "workers",
    ]
    workers = root["children"][4]
    assert workers["strategy"] == "rest_for_one"
    assert [c["name"] for c in workers["children"]] == ["w1", "w2"]
    assert all(c["supervisor"] == "workers" for c in workers["children"])


def test_is_active_exit_codes(inst: Instance) -> None:
    res = inst.ctl("is-active", "echo")
    assert (res.returncode, res.stdout) == (0, "running\n")
    assert inst.ctl("is-active", "echo", "w1").returncode == 0
    inst.ctl("stop", "w1", check=True)
    res = inst.ctl("is-active", "w1")
    assert (res.returncode, res.stdout) == (3, "stopped\n")
    assert inst.ctl("is-active", "echo", "w1").returncode == 3
    res = inst.ctl("is-active", "nosuch")
    assert res.returncode == 4
    assert "nosuch" in one_error_line(res)
    res = inst.ctl("is-active", "echo", "--json")
    assert json.loads(res.stdout) == [{"name": "echo", "state": "running", "active": True}]


# -- start, stop, restart ---------------------------------------------------


def test_stop_then_start(inst: Instance) -> None:
    pid = inst.pid_of("echo")
    assert pid is not None
    res = inst.ctl("stop", "echo")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    st = inst.status("echo")
    assert st["state"] == "stopped" and st["pid"] is None
    assert not alive(pid)
    # Stopped by request: the supervisor leaves it stopped.
    assert inst.state("echo") == "stopped"

    res = inst.ctl("start", "echo", "--json")
    assert res.returncode == 0, res.stderr
    [started] = json.loads(res.stdout)
    assert started["name"] == "echo" and started["state"] == "running"
    assert started["pid"] not in (None, pid) and alive(started["pid"])
    assert inst.ctl("call", "echo", "back").stdout == "back\n"


def test_restart_changes_pid_but_is_not_counted(inst: Instance) -> None:
    assert inst.ctl("call", "counter", "incr").stdout == "1\n"
    before = inst.status("counter")
    res = inst.ctl("restart", "counter")
    assert res.returncode == 0, res.stderr
    after = inst.status("counter")
    assert after["state"] == "running"
    assert after["pid"] != before["pid"] and alive(after["pid"])
    assert not alive(before["pid"])
    # an operator's restart is not counted (docs/architecture.md, as systemd's NRestarts)
    assert after["restarts"] == before["restarts"]
    # A fresh process: the count started again.
    assert inst.ctl("call", "counter", "get").stdout == "0\n"


def test_restart_a_supervisor_restarts_its_subtree(inst: Instance) -> None:
    before = pids(inst)
    assert inst.ctl("restart", "workers").returncode == 0
    after = pids(inst)
    assert after["w1"] != before["w1"] and after["w2"] != before["w2"]
    for name in ("echo", "counter", "sig"):
        assert after[name] == before[name], name


def test_unknown_daemon_for_control_verbs(inst: Instance) -> None:
    for verb in ("start", "stop", "restart"):
        res = inst.ctl(verb, "nosuch")
        assert res.returncode == 4, (verb, res.stderr)
        assert "nosuch" in one_error_line(res)
    res = inst.ctl("kill", "-s", "KILL", "nosuch")
    assert res.returncode == 4
    res = inst.ctl("call", "nosuch", "x")
    assert res.returncode == 4


# -- kill -------------------------------------------------------------------


def test_kill_sigkill_is_restarted_by_the_supervisor(inst: Instance) -> None:
    before = pids(inst)
    res = inst.ctl("kill", "-s", "SIGKILL", "w1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"name": "w1", "pid": before["w1"], "signal": 9}
    new_w1 = inst.wait_running_new_pid("w1", before["w1"])
    # rest_for_one: w2, started after w1, restarts with it; the rest keeps running.
    new_w2 = inst.wait_running_new_pid("w2", before["w2"])
    assert alive(new_w1) and alive(new_w2)
    st = inst.status("w1")
    assert st["restarts"] == 1
    assert st["last_exit"]["signal"] == 9
    after = pids(inst)
    for name in ("echo", "counter", "sig"):
        assert after[name] == before[name]
    assert inst.ctl("call", "w1", "pid").stdout == f"{new_w1}\n"


def test_kill_usr1_reaches_the_actors_handler(inst: Instance) -> None:
    pid = inst.pid_of("sig")
    assert inst.ctl("call", "sig", "count").stdout == "0\n"
    assert inst.ctl("kill", "-s", "USR1", "sig").returncode == 0
    wait_for(lambda: inst.ctl("call", "sig", "count").stdout == "1\n", message="USR1 handled")
    assert inst.ctl("kill", "--signal", "10", "sig").returncode == 0  # by number
    wait_for(lambda: inst.ctl("call", "sig", "count").stdout == "2\n", message="second USR1")
    st = inst.status("sig")
    assert st["pid"] == pid and st["restarts"] == 0 and st["state"] == "running"


def test_kill_refuses_an_unknown_signal(inst: Instance) -> None:
    res = inst.ctl("kill", "-s", "SIGNOPE", "echo")
    assert res.returncode == 1
    assert "SIGNOPE" in one_error_line(res)
    assert inst.status("echo")["restarts"] == 0


# -- call -------------------------------------------------------------------


def test_call_with_json_and_plain_data(inst: Instance) -> None:
    res = inst.ctl("call", "echo", '{"a": [1, 2], "b": null}')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"a": [1, 2], "b": None}
    res = inst.ctl("call", "echo", "hello world")
    assert (res.returncode, res.stdout) == (0, "hello world\n")
    res = inst.ctl("--json", "call", "echo", "hello")
    assert json.loads(res.stdout) == "hello"
    res = inst.ctl("call", "echo", "42", "--json")
    assert json.loads(res.stdout) == 42
    for expected in ("1\n", "2\n", "3\n"):
        assert inst.ctl("call", "counter", "incr").stdout == expected


def test_call_to_a_supervisor_is_refused(inst: Instance) -> None:
    res = inst.ctl("call", "workers", "x")
    assert res.returncode == 1
    assert "not an actor" in one_error_line(res)


# -- reload-config and shutdown ----------------------------------------------


def test_reload_config_without_a_config_file_fails_clearly(inst: Instance) -> None:
    before = pids(inst)
    res = inst.ctl("reload-config")
    assert res.returncode == 1
    assert "configuration file" in one_error_line(res)
    assert pids(inst) == before


def test_reload_config_with_a_config(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        config="""
        [ikosd]
        metrics = false
        [actors.echo]
        class = "examples.actors:Echo"
        """
    )
    echo = inst.pid_of("echo")
    config = inst.root.parent / "ikos.toml"
    config.write_text(
        config.read_text() + '\n[actors.counter]\nclass = "examples.actors:Counter"\n'
    )
    res = inst.ctl("reload-config")
    assert (res.returncode, res.stdout) == (0, "added: counter\n"), res.stderr
    assert inst.state("counter") == "running"
    assert inst.pid_of("echo") == echo
    res = inst.ctl("reload-config", "--json")
    assert json.loads(res.stdout) == {"added": [], "removed": [], "changed": [], "warnings": []}
    assert inst.ctl("reload-config").stdout == "no changes\n"


def test_shutdown_stops_everything(inst: Instance) -> None:
    workers = [p for p in pids(inst).values() if p]
    res = inst.ctl("shutdown")
    assert (res.returncode, res.stderr) == (0, "")
    assert inst.proc.wait(timeout=60) == 0
    assert inst.leftovers() == []
    assert not any(alive(p) for p in workers)
    assert not (inst.root / "run" / "ikos" / "ikosd.sock").exists()
    assert "ikosd stopped (exit status 0)" in inst.log_text()
    res = inst.ctl("list")
    assert res.returncode == 1
    one_error_line(res)


# -- how ikosctl finds ikosd and reads its options ----------------------------


def test_root_and_json_before_or_after_the_verb(inst: Instance) -> None:
    env = {**inst.env}
    env.pop("IKOS_ROOT")
    root = str(inst.root)
    variants = [
        ["--root", root, "--json", "status", "echo"],
        ["--json", "--root", root, "status", "echo"],
        ["status", "echo", "--root", root, "--json"],
        ["status", "--json", "echo", "--root", root],
        ["--root", root, "status", "--json", "echo"],
        ["--json", "status", "--root", root, "echo"],
    ]
    for argv in variants:
        res = subprocess.run([IKOSCTL, *argv], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, (argv, res.stderr)
        assert json.loads(res.stdout)[0]["name"] == "echo", argv


def test_ikos_root_environment_variable(inst: Instance) -> None:
    res = subprocess.run(
        [IKOSCTL, "list", "--json"], capture_output=True, text=True, env=inst.env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert [s["name"] for s in json.loads(res.stdout)] == TREE_ORDER
    # --root wins over $IKOS_ROOT.
    env = {**inst.env, "IKOS_ROOT": str(inst.root.parent / "elsewhere")}
    res = subprocess.run(
        [IKOSCTL, "--root", str(inst.root), "is-active", "echo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


def test_no_ikosd_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IKOS_ROOT"}
    for argv in (
        ["--root", str(tmp_path / "none"), "status"],
        ["list", "--root", str(tmp_path / "none"), "--json"],
    ):
        res = subprocess.run([IKOSCTL, *argv], capture_output=True, text=True, env=env)
        assert res.returncode == 1
        assert res.stdout == ""
        line = one_error_line(res)
        assert "no ikosd" in line and str(tmp_path / "none") in line
    res = subprocess.run(
        [IKOSCTL, "status"],
        capture_output=True,
        text=True,
        env={**env, "IKOS_ROOT": str(tmp_path / "none")},
    )
    assert res.returncode == 1
    assert str(tmp_path / "none") in one_error_line(res)


# -- terminals --------------------------------------------------------------


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdout/stderr; return (status, output)."""
    main_fd, child_fd = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd, env=env
        )
    finally:
        os.close(child_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + HANG  # a chatty child must not keep the test going either
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output from {argv} within {timeout}s")
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_colours_only_on_a_terminal(inst: Instance) -> None:
    env = {k: v for k, v in inst.env.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm"
    status, out = run_in_pty([IKOSCTL, "--root", str(inst.root), "list"], env)
    assert status == 0, out
    assert "\x1b[32m" in out  # "running" in green
    plain = ANSI.sub("", out)
    assert "echo" in plain and "running" in plain

    status, out = run_in_pty([IKOSCTL, "--root", str(inst.root), "status", "echo"], env)
    assert status == 0 and "\x1b[" in out and "●" in out

    status, out = run_in_pty([IKOSCTL, "--root", str(inst.root), "list"], {**env, "NO_COLOR": "1"})
    assert status == 0 and "\x1b[" not in out
    # On a terminal list is a table with a header, NO_COLOR or not.
    assert out.splitlines()[0].split() == list(LIST_COLUMNS)
    # Nothing to list: a hint for the person, not a blank line.
    status, out = run_in_pty([IKOSCTL, "--root", str(inst.root), "services"], env)
    assert (status, out) == (0, "no services registered\r\n")
    res = inst.ctl("services")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")

    for argv in (["list"], ["status"], ["tree"]):
        res = inst.ctl(*argv)
        assert "\x1b" not in res.stdout, argv


# -- every verb of ikosctl, and only verbs ikosd serves ---------------------------------------

EVERY_VERB_CONFIG = """
[ikosd]
metrics = false

[actors.echo]
class = "examples.actors:Echo"
description = "answers every message"

[actors.echo.service]
name = "demo/echo"
type = "echo"
capabilities = ["ping"]

[actors.counter]
class = "examples.actors:Counter"

[executables.ticker]
executable = "/bin/sh"
args = ["-c", "trap 'echo reloaded' HUP; i=0; while :; do echo tick $i; i=$((i+1)); sleep .2; done"]
"""

RECORD = re.compile(r"^\S+ (stdout|stderr) (.*)$")


def follow(inst: Instance, *args: str) -> subprocess.Popen[str]:
    """``ikosctl logs -f ARGS`` running, its stdout a pipe."""
    return subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), "logs", "-f", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=inst.env,
    )


def test_logs_follow_prints_new_lines_as_they_are_written(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=EVERY_VERB_CONFIG)
    proc = follow(inst, "-n", "1", "ticker")
    try:
        assert proc.stdout is not None
        texts = []
        for _ in range(4):
            line = proc.stdout.readline()
            match = RECORD.match(line)
            assert match, line
            texts.append(match.group(2))
        numbers = [int(t.split()[1]) for t in texts]
        assert numbers == list(range(numbers[0], numbers[0] + 4))  # none lost, none twice
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (0, "")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    # Into a pipe whose reader leaves (``| head -2``): a quiet end too.
    head = subprocess.run(
        f"{IKOSCTL} --root {inst.root} logs -f ticker | head -2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=inst.env,
        executable="/bin/bash",
    )
    assert (head.returncode, head.stderr, len(head.stdout.splitlines())) == (0, "", 2)


def test_every_verb_against_a_real_ikosd(ikosd_factory: Any) -> None:
    inst = ikosd_factory(config=EVERY_VERB_CONFIG)
    wait_for(lambda: "tick 3" in inst.ctl("logs", "ticker").stdout, message="ticker's output")
    seen: set[str] = set()

    def ctl(*args: str) -> str:
        seen.add(args[0])
        res = inst.ctl(*args)
        assert (res.returncode, res.stderr) == (0, ""), (args, res.stderr)
        return res.stdout

    assert ctl("status", "echo").splitlines()[0] == "echo - answers every message"
    assert [row.split("\t")[0] for row in ctl("list").splitlines()] == [
        "root",
        "ikos-system",
        "ikos-broker",
        "echo",
        "counter",
        "ticker",
    ]
    assert ctl("tree").splitlines()[0] == "root [supervisor one_for_one] running"
    assert [row.split("\t")[0] for row in ctl("top", "--sort", "name").splitlines()] == [
        "counter",
        "echo",
        "ikos-broker",
        "ticker",
    ]
    assert ctl("is-active", "echo", "ticker") == "running\nrunning\n"
    assert ctl("publish", "demo.tick", '{"n": 1}') == ""
    assert ctl("queue", "put", "demo", "1") == "1\n"
    assert ctl("queue", "get", "--ack", "demo") == "1\t1\t1\n"
    sub = subprocess.run(  # nothing published meanwhile: -n 0 ends at once
        [IKOSCTL, "--root", str(inst.root), "subscribe", "-n", "0", "demo.#"],
        capture_output=True,
        text=True,
        timeout=60,
        env=inst.env,
    )
    assert (sub.returncode, sub.stdout, sub.stderr) == (0, "", "")
    seen.add("subscribe")
    assert ctl("call", "counter", "incr") == "1\n"
    assert ctl("tell", "counter", "incr") == ""
    wait_for(lambda: inst.ctl("call", "counter", "get").stdout == "2\n", message="the tell")
    pid = inst.pid_of("counter")
    assert (
        ctl("upgrade", "counter")
        == f"counter: upgraded, pid {pid} -> {inst.pid_of('counter')}, fresh state\n"
    )
    assert ctl("call", "counter", "get") == "0\n"  # no get_state: a fresh start
    lines = ctl("logs", "-n", "3", "ticker").splitlines()
    assert len(lines) == 3 and all(RECORD.match(line) for line in lines)
    assert ctl("reload", "ticker") == ""
    wait_for(lambda: "reloaded" in inst.ctl("logs", "ticker").stdout, message="the reload")
    assert ctl("kill", "-s", "HUP", "ticker") == ""
    wait_for(
        lambda: inst.ctl("logs", "-n", "100", "ticker").stdout.count("reloaded") == 2,
        message="the HUP",
    )
    proc = follow(inst, "-n", "0", "ticker")
    try:
        assert proc.stdout is not None
        assert RECORD.match(proc.stdout.readline())
        seen.add("logs")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    row = wait_for(lambda: inst.ctl("services").stdout, message="the echo service")
    assert row.split("\t")[:3] == ["demo/echo", "echo", "-"]
    assert ctl("services", "--active").split("\t")[0] == "demo/echo"
    assert "name:         demo/echo" in ctl("discover", "demo/echo")
    assert ctl("stop", "echo") == "" and inst.state("echo") == "stopped"
    assert ctl("start", "echo") == "" and inst.state("echo") == "running"
    assert ctl("alerts") == ""
    seen.add("events")
    events = subprocess.Popen(
        [IKOSCTL, "--root", str(inst.root), "events", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=inst.env,
    )
    try:
        assert events.stdout is not None
        assert json.loads(events.stdout.readline())["type"] == "subscribed"
        pid = inst.pid_of("counter")
        assert ctl("restart", "counter") == "" and inst.pid_of("counter") != pid
        first = json.loads(events.stdout.readline())
        assert (first["type"], first["daemon"], first["new"]) == (
            "transition",
            "counter",
            "stopping",
        )
        events.send_signal(signal.SIGINT)
        assert events.wait(timeout=60) == 0
    finally:
        if events.poll() is None:
            events.kill()
        events.communicate(timeout=60)
    assert ctl("reload-config") == "no changes\n"
    assert ctl("shutdown") == ""
    assert inst.proc.wait(timeout=60) == 0
    assert seen == set(PROTOCOL_VERBS), set(PROTOCOL_VERBS) ^ seen


def documented_verbs() -> dict[str, tuple[str, str]]:
    """docs/protocol.md's verb table: verb -> (access, ikosctl column)."""
    table: dict[str, tuple[str, str]] = {}
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            table[cells[0].strip("`")] = (cells[1], cells[2])
    return table


def test_help_offers_only_verbs_ikosd_serves_and_docs_name_them_all(inst: Instance) -> None:
    with ControlClient(InstancePaths.for_root(inst.root)) as client:
        served: dict[str, str] = client.call("hello")["verbs"]
    help_text = inst.ctl("--help").stdout
    offered = {v for v in PROTOCOL_VERBS if re.search(rf"^    {re.escape(v)}\b", help_text, re.M)}
    assert offered == set(PROTOCOL_VERBS)
    for verb in offered:
        assert set(PROTOCOL_VERBS[verb]) <= set(served), verb
    for verb in UNAVAILABLE_VERBS:
        assert not re.search(rf"^    {verb}\b", help_text, re.M), verb
        res = inst.ctl(verb)
        assert res.returncode == 1
        assert one_error_line(res) == f"ikosctl: '{verb}' is not available in this version of ikos"
    documented = documented_verbs()
    assert set(served) <= set(documented), set(served) - set(documented)
    sent_by_ikosctl = {p for verbs in PROTOCOL_VERBS.values() for p in verbs}
    for verb, access in served.items():
        doc_access, doc_ikosctl = documented[verb]
        assert doc_access.startswith(access), (verb, access, doc_access)
        if verb in sent_by_ikosctl:
            assert doc_ikosctl != "API only", verb
        else:
            # A control verb ikosctl does not offer must be documented as API only.
            assert doc_ikosctl == "API only", verb
