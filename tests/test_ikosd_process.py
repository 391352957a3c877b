"""ikosd as a process: its command line, readiness, signals, lock and log.

What a service manager (systemd, a shell, a container runtime) sees of
ikosd: the ready line on stdout, ``READY=1`` on ``$NOTIFY_SOCKET``, exit
statuses (0 orderly, 1 the root gave up or another ikosd holds the root,
2 usage or configuration errors), no process left behind after SIGTERM or
SIGINT, and a log file under the instance root recording every state
transition.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IKOSD, REPO, Instance, kill_marked, wait_for

TREE = """
import ikos
from examples.actors import Counter, Echo

tree = ikos.Supervisor(
    "root",
    max_restarts=10,
    within=5,
    children=[
        ikos.Child("echo", Echo),
        ikos.Supervisor("workers", children=[ikos.Child("counter", Counter)]),
    ],
)
"""

PKG_MODULE = """
import ikos
from examples.actors import Echo

tree = ikos.Supervisor("pkgroot", children=[ikos.Child("echo", Echo)])

def make_tree():
    return ikos.Supervisor("made", children=[ikos.Child("built", Echo)])

not_a_tree = 42
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def run_ikosd(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run an ikosd that is expected to exit on its own; reap all it started."""
    mark = uuid.uuid4().hex
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "IKOS_TEST_MARK": mark, **(env or {})}
    try:
        return subprocess.run(
            [IKOSD, *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    finally:
        assert kill_marked(mark) == []


@pytest.fixture
def pkg_path(tmp_path: Path) -> Path:
    """A directory holding the package ``ikostest_pkg`` with trees in ``mod``."""
    lib = tmp_path / "lib"
    (lib / "ikostest_pkg").mkdir(parents=True)
    (lib / "ikostest_pkg" / "__init__.py").write_text("")
    (lib / "ikostest_pkg" / "mod.py").write_text(textwrap.dedent(PKG_MODULE))
    return lib


def names(inst: Instance) -> list[str]:
    """The tree's daemons in order, less ikosd's own IPC broker (checked: the root's first
    child is ``ikos-system``, holding ``ikos-broker``)."""
    found = [s["name"] for s in inst.status()]
    assert found[1:3] == ["ikos-system", "ikos-broker"], found
    return [found[0], *found[3:]]


# -- readiness ----------------------------------------------------------------


def test_the_ready_line_is_printed_once(ikosd_factory: Any) -> None:
    inst = ikosd_factory(tree=TREE)
    ready = [ln for ln in inst.log_text().splitlines() if "ikosd ready" in ln]
    assert len(ready) == 1
    assert f"pid {inst.pid}" in ready[0]
    assert str(inst.root / "run/ikos/ikosd.sock") in ready[0]
    # Restarts and reload attempts do not announce readiness again.
    old = inst.pid_of("echo")
    inst.ctl("kill", "-s", "KILL", "echo", check=True)
    inst.wait_running_new_pid("echo", old)
    inst.ctl("restart", "workers", check=True)
    os.kill(inst.pid, signal.SIGHUP)  # no -c: the reload is refused, ikosd runs on
    wait_for(lambda: "configuration reload refused" in inst.log_text(), message="the refusal")
    assert inst.ctl("status").returncode == 0
    assert inst.terminate() == 0
    assert inst.log_text().count("ikosd ready") == 1


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A datagram socket standing in for systemd's: (NOTIFY_SOCKET value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify.sock"
        sock.bind(str(path))
        address = str(path)
    else:
        name = f"ikos-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(30)
    try:
        yield address, sock
    finally:
        sock.close()


def notifications(sock: socket.socket) -> dict[str, str]:
    fields = dict(
        line.split("=", 1) for line in sock.recv(4096).decode().splitlines() if "=" in line
    )
    return fields


def test_ready_arrives_on_the_notify_socket(
    ikosd_factory: Any, notify_socket: tuple[str, socket.socket]
) -> None:
    address, sock = notify_socket
    inst = ikosd_factory(tree=TREE, env={"NOTIFY_SOCKET": address})
    ready = notifications(sock)
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(inst.pid)
    # By then the tree is up: the ready line came first, every daemon runs.
    assert "ikosd ready" in inst.log_text()
    assert inst.ctl("status").returncode == 0
    assert inst.terminate() == 0
    assert notifications(sock).get("STOPPING") == "1"
    assert inst.leftovers() == []


# -- stopping -----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_everything_in_order(ikosd_factory: Any, sig: signal.Signals) -> None:
    inst = ikosd_factory(tree=TREE)
    inst.ctl("start", "ikos-broker", check=True)  # else it waits for its first client
    inst.wait_state("ikos-broker", "running")
    workers = [s["pid"] for s in inst.status() if s["pid"]]
    assert len(workers) == 3 and all(alive(p) for p in workers)  # ikos-broker, echo, counter
    assert len(inst.leftovers()) > len(workers)  # ikosd and its helpers too
    inst.proc.send_signal(sig)
    assert inst.proc.wait(timeout=60) == 0
    assert inst.leftovers() == []
    run = inst.root / "run/ikos"
    assert not (run / "ikosd.sock").exists()
    assert not (run / "ikosd.pid").exists()
    log = inst.log_text()
    assert "ikosd stopped (exit status 0)" in log
    # Reverse start order: workers' counter before echo, the IPC broker (the root's
    # first child) after every daemon, the root last.
    counter = log.index("actor counter: stopping -> stopped")
    echo = log.index("actor echo: stopping -> stopped")
    broker = log.index("exec ikos-broker: stopping -> stopped")
    root = log.index("supervisor root: stopping -> stopped")
    assert counter < echo < broker < root


def test_the_root_giving_up_exits_1(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        tree="""
        import ikos
        from examples.actors import Echo
        tree = ikos.Supervisor("root", max_restarts=0, children=[
            ikos.Child("echo", Echo), ikos.Child("other", Echo)])
        """,
        expect_exit=1,
    )
    inst.ctl("kill", "-s", "KILL", "echo", check=True)
    assert inst.proc.wait(timeout=60) == 1
    assert inst.leftovers() == []
    assert "the root supervisor gave up" in inst.log_text()


# -- one ikosd per root ---------------------------------------------------------


def test_a_second_ikosd_on_the_same_root_is_refused(ikosd_factory: Any) -> None:
    inst = ikosd_factory(tree=TREE)
    before = inst.status()
    tree_file = inst.root.parent / "tree_inst.py"
    res = run_ikosd("--root", str(inst.root), "--tree", f"{tree_file}:tree", cwd=inst.root.parent)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    message = res.stderr.strip().splitlines()[-1]
    assert "another ikosd" in message and f"pid {inst.pid}" in message, res.stderr
    assert "ikosd ready" not in res.stdout
    # The first one keeps running, untouched, and still answers on its socket.
    assert inst.proc.poll() is None
    assert (inst.root / "run/ikos/ikosd.sock").exists()
    after = inst.status()
    assert [(s["name"], s["pid"], s["restarts"]) for s in after] == [
        (s["name"], s["pid"], s["restarts"]) for s in before
    ]
    assert inst.ctl("call", "echo", "still here").stdout == "still here\n"
    assert inst.terminate() == 0
    assert inst.leftovers() == []


def test_instances_in_different_roots_run_side_by_side(ikosd_factory: Any) -> None:
    a = ikosd_factory(tree=TREE, name="a")
    b = ikosd_factory(tree=TREE, name="b")
    assert a.pid_of("echo") != b.pid_of("echo")
    a.ctl("stop", "echo", check=True)
    assert a.state("echo") == "stopped"
    assert b.state("echo") == "running"


# -- what to run: --tree and -c ----------------------------------------------------


def test_tree_from_a_module_on_pythonpath(ikosd_factory: Any, pkg_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(pkg_path)])}
    inst = ikosd_factory(args=["--tree", "ikostest_pkg.mod:tree"], env=env)
    assert names(inst) == ["pkgroot", "echo"]
    assert inst.ctl("call", "echo", "hi").stdout == "hi\n"


def test_tree_from_a_function_returning_a_supervisor(ikosd_factory: Any, pkg_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(pkg_path)])}
    inst = ikosd_factory(args=["--tree", "ikostest_pkg.mod:make_tree"], env=env)
    assert names(inst) == ["made", "built"]


def test_tree_from_a_file_path(ikosd_factory: Any, tmp_path: Path) -> None:
    # Absolute path (the fixture's own way) ...
    inst = ikosd_factory(tree=TREE)
    assert names(inst) == ["root", "echo", "workers", "counter"]
    # ... and relative to the working directory.
    base = tmp_path / "rel"
    base.mkdir()
    (base / "my_tree.py").write_text(textwrap.dedent(PKG_MODULE))
    rel = ikosd_factory(name="rel", args=["--tree", "my_tree.py:make_tree"])
    assert names(rel) == ["made", "built"]


def test_tree_and_config_together(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        tree=TREE,
        config="""
        [ikosd]
        metrics = false

        [actors.extra]
        class = "examples.actors:Counter"
        supervisor = "workers"
        requires = ["echo"]

        [actors.top]
        class = "examples.actors:Echo"
        """,
    )
    by_name = {s["name"]: s for s in inst.status()}
    assert list(by_name) == [
        "root",
        "ikos-system",
        "ikos-broker",
        "echo",
        "workers",
        "counter",
        "extra",
        "top",
    ]
    assert by_name["extra"]["supervisor"] == "workers"
    assert by_name["top"]["supervisor"] == "root"
    # the broker, not used, waits for its first connection
    assert all(s["state"] == "running" for s in by_name.values() if s["name"] != "ikos-broker")
    assert by_name["ikos-broker"]["activation"] == "waiting"


def test_the_roots_own_config_file_is_the_default(ikosd_factory: Any, tmp_path: Path) -> None:
    etc = tmp_path / "inst" / "root" / "etc" / "ikos"
    etc.mkdir(parents=True)
    (etc / "ikos.toml").write_text(
        '[ikosd]\nmetrics = false\n[actors.echo]\nclass = "examples.actors:Echo"\n'
    )
    inst = ikosd_factory()
    assert names(inst) == ["root", "echo"]


BAD_INVOCATIONS = {
    "no tree": ([], "a tree to run"),
    "bad log level": (["--tree", "x:tree", "--log-level", "loud"], "log level"),
    "not a supervisor": (["--tree", "ikostest_pkg.mod:not_a_tree"], "Supervisor"),
    "no such module": (["--tree", "ikostest_nowhere.mod:tree"], "ikostest_nowhere"),
    "no such attribute": (["--tree", "ikostest_pkg.mod:nothing"], "nothing"),
    "no such file": (["--tree", "missing_tree.py:tree"], "missing_tree.py"),
    "no such config": (["-c", "missing.toml"], "missing.toml"),
}


@pytest.mark.parametrize("case", sorted(BAD_INVOCATIONS))
def test_usage_and_tree_errors_exit_2(tmp_path: Path, pkg_path: Path, case: str) -> None:
    args, expected = BAD_INVOCATIONS[case]
    root = tmp_path / "root"
    res = run_ikosd(
        "--root",
        str(root),
        *args,
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(REPO), str(pkg_path)])},
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert expected in res.stderr, res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith("ikosd"), res.stderr
    assert res.stdout == ""


def test_a_bad_config_exits_2_naming_file_table_and_key(tmp_path: Path) -> None:
    config = tmp_path / "ikos.toml"
    config.write_text('[actors.echo]\nclass = "examples.actors:Echo"\nrestart = "forever"\n')
    res = run_ikosd("--root", str(tmp_path / "root"), "-c", str(config), cwd=tmp_path)
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert "ikos.toml" in line and "[actors.echo]" in line and "'restart'" in line, line


# -- the log --------------------------------------------------------------------

TRANSITION = re.compile(r" ikos\.daemon: (\w+) (\S+): (\w+) -> (\w+) \(")


def transitions(text: str) -> dict[str, list[tuple[str, str]]]:
    chains: dict[str, list[tuple[str, str]]] = {}
    for match in TRANSITION.finditer(text):
        _, name, old, new = match.groups()
        chains.setdefault(name, []).append((old, new))
    return chains


def test_every_transition_is_in_the_log_file(ikosd_factory: Any) -> None:
    inst = ikosd_factory(tree=TREE, args=["--log-level", "info"])
    log_file = inst.root / "var/log/ikos/ikosd.log"
    assert log_file.is_file()
    inst.ctl("start", "ikos-broker", check=True)  # else it waits for its first client
    old = inst.pid_of("echo")
    inst.ctl("kill", "-s", "KILL", "echo", check=True)
    inst.wait_running_new_pid("echo", old)
    inst.ctl("stop", "counter", check=True)
    inst.ctl("start", "counter", check=True)
    inst.ctl("restart", "workers", check=True)
    assert inst.terminate() == 0

    text = log_file.read_text()
    assert "ikosd stopped (exit status 0)" in text
    assert "actor echo: starting -> running" in text
    assert "actor echo: running -> failed (killed by SIGKILL)" in text
    chains = transitions(text)
    assert set(chains) == {"root", "ikos-system", "ikos-broker", "echo", "workers", "counter"}
    for name, chain in chains.items():
        # One unbroken chain from stopped back to stopped: no transition missing.
        assert chain[0][0] == "stopped" and chain[-1][1] == "stopped", (name, chain)
        for (_, new), (old, _) in itertools.pairwise(chain):
            assert new == old, (name, chain)
    assert chains["echo"] == [
        ("stopped", "starting"),
        ("starting", "running"),
        ("running", "failed"),
        ("failed", "starting"),
        ("starting", "running"),
        ("running", "stopping"),
        ("stopping", "stopped"),
    ]
    assert chains["counter"].count(("starting", "running")) == 3
    # The log file and ikosd's stderr tell the same story.
    assert transitions(inst.log_text()) == chains


def _proc_state(stat: str) -> str:
    with open(stat) as f:
        return f.read().rpartition(")")[2].split()[0]


def test_a_sigterm_during_the_last_moments_of_shutdown_is_harmless(
    ikosd_factory: Any,
) -> None:
    # A service manager may well send SIGTERM after `ikosctl shutdown` began.
    inst = ikosd_factory(tree=TREE)
    inst.ctl("shutdown", check=True)

    # SIGTERM without a pause until ikosd is a zombie (never reaped in between,
    # so the pid stays ikosd's): any moment with SIG_DFL, on any of its
    # threads, ends it with -15.
    stat = f"/proc/{inst.pid}/stat"
    deadline = time.monotonic() + 60
    sent = 0
    while time.monotonic() < deadline:
        os.kill(inst.pid, signal.SIGTERM)
        sent += 1
        if sent % 20 == 0 and _proc_state(stat) == "Z":
            break
    assert _proc_state(stat) == "Z", "ikosd did not exit within 60 s"
    assert inst.proc.wait() == 0
    # Once the shutdown began the kernel drops them: none reached a handler whose
    # wake-up write could fail (printing that failure for each one starved the
    # main thread: ikosd still ran 60 s later).
    assert "signal wakeup fd" not in inst.log_text()
    assert not (inst.root / "run/ikos/ikosd.pid").exists()
