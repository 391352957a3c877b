"""ikosd as PID 1 of a PID namespace, as a container's entry point (issue 12, item 3).

Each test runs the real ikosd under ``unshare --pid --fork --mount-proc``,
so that it is PID 1 of a fresh namespace exactly as under Docker or
Kubernetes: orphans of the whole namespace are re-parented to it, and the
kernel drops every signal it has no handler for. The test drives it from
the host as a container runtime does (signals to its host PID) and reads
the namespace through the host's ``/proc``: a process belongs to it when
its ``ns/pid`` link is ikosd's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import HANG, IKOSD, REPO, wait_for

from ikos._errors import ConfigError
from ikos.manager._config import load_config
from ikos.manager._logs import OutputForwarder

UNSHARE = shutil.which("unshare")


def _unshare_works() -> str | None:
    """None if ``unshare --pid --fork --mount-proc`` runs here, else why not."""
    if UNSHARE is None:
        return "unshare (util-linux) is not installed"
    try:
        res = subprocess.run(
            [UNSHARE, "--pid", "--fork", "--mount-proc", "sh", "-c", "test $$ -eq 1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if res.returncode != 0:
        return f"unshare --pid --fork --mount-proc failed: {res.stderr.strip()}"
    return None


_WHY_NOT = _unshare_works()
needs_unshare = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def state_of(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()[0]


@dataclass
class Container:
    """ikosd as PID 1 of a new PID namespace; ``pid`` is its PID on the host."""

    base: Path
    proc: subprocess.Popen[bytes]
    pid: int
    ns: str

    @property
    def root(self) -> Path:
        return self.base / "root"

    def out(self) -> str:
        return (self.base / "stdout").read_text(errors="replace")

    def err(self) -> str:
        return (self.base / "stderr").read_text(errors="replace")

    def members(self) -> list[int]:
        """The namespace's processes, as host PIDs."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and pid_ns(int(entry)) == self.ns:
                found.append(int(entry))
        return found

    def zombies(self) -> list[int]:
        return [p for p in self.members() if state_of(p) == "Z"]

    def wait_exit(self, timeout: float = HANG * 2) -> int:
        """ikosd's exit status (unshare --fork exits with its child's)."""
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal ikosd from outside, as a container runtime does; its exit status."""
        os.kill(self.pid, sig)
        return self.wait_exit()

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(IKOSD).with_name("ikosctl")), "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Callable[..., Container]]:
    """Start ikosd as PID 1 on a configuration; everything is killed after the test."""
    started: list[Container] = []

    def start(config: str, *args: str, wait_ready: bool = True) -> Container:
        base = tmp_path / f"c{len(started)}"
        base.mkdir()
        (base / "ikos.toml").write_text("[ikosd]\nmetrics = false\n" + textwrap.dedent(config))
        assert UNSHARE is not None
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [
                    UNSHARE,
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    IKOSD,
                    "--root",
                    str(base / "root"),
                    "-c",
                    str(base / "ikos.toml"),
                    "--log-level",
                    "debug",
                    *args,
                ],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=base,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        pid = int(wait_for(lambda: children.read_text().split()[0], 60, message="ikosd forked"))
        ns = pid_ns(pid)
        assert ns is not None and ns != pid_ns(os.getpid()), "ikosd runs in its own namespace"
        c = Container(base, proc, pid, ns)
        started.append(c)
        if not wait_ready:
            return c
        wait_for(lambda: "ikosd ready" in c.out() or proc.poll() is not None, 60, message="ready")
        assert proc.poll() is None, f"ikosd exited {proc.returncode}:\n{c.err()}"
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            # SIGKILL of PID 1 takes the whole namespace with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
            c.proc.wait(timeout=60)


def events(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@needs_unshare
def test_orphans_are_reaped_and_sigterm_stops_the_tree_in_order_with_status_0(
    container: Callable[..., Container], tmp_path: Path
) -> None:
    log = tmp_path / "events"
    made = tmp_path / "made"
    config = f"""
    [executables.db]
    executable = "/bin/sh"
    args = ["-c", "trap 'echo stop-db >> {log}; exit 0' TERM; echo start-db >> {log}; \
sleep 1000 & wait"]

    [executables.web]
    executable = "/bin/sh"
    requires = ["db"]
    args = ["-c", "trap 'echo stop-web >> {log}; exit 0' TERM; echo start-web >> {log}; \
i=0; while [ $i -lt 20 ]; do (sleep 0.01 &); i=$((i+1)); echo $i > {made}; sleep 0.02; done; \
sleep 1000 & wait"]
    """
    c = container(config, "--shutdown-timeout", "30")
    assert "ikosd ready" in c.out() and "pid 1," in c.out()
    # web's 20 short-lived grandchildren, each left by a subshell that exited at once,
    # were re-parented to PID 1: once they are all done, not one may be a zombie
    wait_for(lambda: made.exists() and made.read_text().strip() == "20", 60, message="20 made")
    # (then the daemons only wait: nothing of theirs is a zombie even for a moment)
    wait_for(lambda: c.zombies() == [], 30, message="no zombie in the namespace")
    assert events(log) == ["start-db", "start-web"]

    assert c.stop(signal.SIGTERM) == 0, c.err()
    assert events(log) == ["start-db", "start-web", "stop-web", "stop-db"], "reverse order"
    assert "shutdown did not finish" not in c.err()
    assert c.members() == [], "nothing of the namespace is left"


@needs_unshare
def test_a_daemon_ignoring_sigterm_is_killed_after_the_grace_period_status_3(
    container: Callable[..., Container],
) -> None:
    config = """
    [executables.stubborn]
    executable = "/bin/sh"
    args = ["-c", "trap '' TERM; while true; do sleep 0.1; done"]
    shutdown = 600

    [executables.polite]
    executable = "/bin/sleep"
    args = ["1000"]
    """
    c = container(config, "--stop-timeout", "1")
    stubborn = c.ctl("--json", "status", "stubborn")
    assert '"state": "running"' in stubborn.stdout, stubborn.stdout + stubborn.stderr
    assert c.stop(signal.SIGTERM) == 3, c.err()
    assert "shutdown did not finish within 1s: killing what is left" in c.err()
    assert c.members() == []


@needs_unshare
def test_sigpwr_stops_in_order_and_sigusr1_logs_the_status(
    container: Callable[..., Container],
) -> None:
    config = """
    [executables.web]
    executable = "/bin/sleep"
    args = ["1000"]
    """
    c = container(config)
    os.kill(c.pid, signal.SIGUSR1)  # no default action for PID 1: it must be handled
    wait_for(lambda: "status: exec web running pid" in c.err(), 30, message="status lines")
    assert c.proc.poll() is None
    assert c.stop(signal.SIGPWR) == 0, c.err()
    assert "exec web: stopping -> stopped" in c.err()


@needs_unshare
def test_daemons_output_is_on_ikosd_stdout_and_stderr_prefixed_and_in_its_log(
    container: Callable[..., Container],
) -> None:
    config = """
    [executables.web]
    executable = "/bin/sh"
    args = ["-c", "echo hello from web; echo trouble in web >&2; exec sleep 1000"]
    """
    c = container(config)
    wait_for(lambda: "web | hello from web" in c.out(), 30, message="stdout forwarded")
    wait_for(lambda: "web | trouble in web" in c.err(), 30, message="stderr forwarded")
    assert "trouble" not in c.out(), "stderr lines stay on stderr"
    log_file = c.root / "var" / "log" / "ikos" / "web.log"
    wait_for(lambda: "trouble in web" in log_file.read_text(), 30, message="the log file too")
    assert c.stop(signal.SIGTERM) == 0

    quiet = container(config, "--no-log-to-stdout")
    log_file = quiet.root / "var" / "log" / "ikos" / "web.log"
    wait_for(lambda: "hello from web" in log_file.read_text(), 30, message="the log file")
    assert quiet.stop(signal.SIGTERM) == 0
    assert "web |" not in quiet.out() + quiet.err()


def test_forwarding_never_blocks_on_a_slow_reader_and_counts_the_lines_dropped() -> None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    forwarder = OutputForwarder({"stdout": out_w, "stderr": err_w}, max_bytes=64 * 1024)
    try:
        # nobody reads yet: this returns (the test would hang otherwise), dropping lines
        for i in range(2000):
            forwarder.forward("web", "stdout", [f"{i} " + "x" * 100])
        dropped = forwarder.dropped
        assert dropped > 0
        got: dict[int, bytes] = {out_r: b"", err_r: b""}

        def drain(fd: int) -> None:
            while chunk := os.read(fd, 65536):
                got[fd] += chunk

        readers = [threading.Thread(target=drain, args=(fd,)) for fd in (out_r, err_r)]
        for t in readers:
            t.start()
        wait_for(lambda: forwarder.backlog == 0, 30, message="the backlog written")
        forwarder.forward("web", "stdout", ["after\r"])
        forwarder.forward("web", "stderr", ["oops"])
        forwarder.close(timeout=HANG)
    finally:
        os.close(out_w)
        os.close(err_w)
    for t in readers:
        t.join(30)
    os.close(out_r)
    os.close(err_r)
    lines = got[out_r].decode().splitlines()
    assert lines[-1] == "web | after"
    assert all(line.startswith("web | ") and line.endswith("x" * 100) for line in lines[:-1])
    assert len(lines) - 1 + dropped == 2000, "every line is either written whole or counted"
    *notes, last = got[err_r].decode().splitlines()
    assert last == "web | oops"
    # one note per episode of drops (the writer may catch up between two of them)
    note = re.compile(
        r"ikosd \| (\d+) lines of daemons' output dropped: "
        r"ikosd's stdout and stderr did not keep up"
    )
    counts = [note.fullmatch(n) for n in notes]
    assert all(counts), notes
    assert sum(int(m.group(1)) for m in counts if m) == dropped


@needs_unshare
def test_a_sigterm_while_ikosd_is_still_loading_is_not_lost(
    container: Callable[..., Container], tmp_path: Path
) -> None:
    """PID 1 has no default action for SIGTERM: unhandled, the kernel drops it.

    The tree module holds ikosd in its start (before the manager exists) until
    the test has sent SIGTERM; ikosd must then stop instead of running on.
    """
    loading, gate = tmp_path / "loading", tmp_path / "gate"
    module = tmp_path / "slow_tree.py"
    module.write_text(
        textwrap.dedent(
            f"""
            import os, pathlib, time
            import ikos
            pathlib.Path({str(loading)!r}).touch()
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.02)
            tree = ikos.Supervisor("root", children=[ikos.Exec("web", "/bin/sleep", args=["1000"])])
            """
        )
    )
    c = container("", "--tree", f"{module}:tree", wait_ready=False)
    wait_for(loading.exists, 60, message="ikosd loading its tree")
    os.kill(c.pid, signal.SIGTERM)
    gate.touch()
    assert c.wait_exit() == 0, c.err()
    assert "shutdown requested (signal 15) while ikosd was starting" in c.err()


def test_log_to_stdout_outside_a_container_from_the_configuration(ikosd_factory: Any) -> None:
    inst = ikosd_factory(
        config="""
        [ikosd]
        metrics = false
        log_to_stdout = true

        [executables.web]
        executable = "/bin/sh"
        args = ["-c", "echo hello from web; exec sleep 1000"]
        """
    )
    wait_for(lambda: "web | hello from web" in inst.log_text(), 30, message="forwarded")
    assert inst.terminate() == 0


def test_bad_values_of_the_new_settings_are_named(tmp_path: Path) -> None:
    config = tmp_path / "ikos.toml"
    config.write_text('[ikosd]\nlog_to_stdout = "yes"\n')
    with pytest.raises(ConfigError, match=r"\[ikosd\] key 'log_to_stdout': expected true or false"):
        load_config(config)
    res = subprocess.run(
        [IKOSD, "--root", str(tmp_path / "root"), "--shutdown-timeout", "0", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "--stop-timeout: expected seconds > 0, got '0'" in res.stderr
