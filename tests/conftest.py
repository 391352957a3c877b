"""Shared fixtures: real ikosd instances in temporary roots, and a leak check.

``ikosd_factory`` starts the real ``ikosd`` command (a subprocess, as a user
would) on a tree file or config, waits for its ready line, and on teardown
stops it with SIGTERM and checks what it left. Every process of an instance
carries ``IKOS_TEST_MARK`` in its environment (actors and executables
inherit it), so the fixture finds stragglers even after they were
re-parented. A hung shutdown, a process left behind or an exit status the
test did not declare fails the test (an error at teardown), and everything
is killed anyway, so that one failure does not spill into the next test.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import settings

# The machine running the suite is shared and noisy: a property test is about
# its property, not about how fast one example ran.
settings.register_profile("ikos", deadline=None)
settings.load_profile("ikos")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IKOSD = str(BIN / "ikosd")
IKOSCTL = str(BIN / "ikosctl")


#: The upper bound a test may put on how long something takes: a bound on hangs,
#: not a performance claim. Far above what anything here needs on a loaded machine;
#: how fast ikos is belongs in bench/, where figures go to a table, not to asserts.
HANG = 30.0


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the condition may not be observable yet
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {message}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def read_line(stream: IO[Any], timeout: float = 60.0) -> str:
    """One line from another process's pipe; fail after ``timeout`` seconds instead of hanging.

    Reads the descriptor a byte at a time, bypassing the file object's
    buffer, so that nothing past the line is consumed: the stream can still
    be read or ``communicate``d afterwards (as long as it was not read
    through its buffer before). Returns what came before EOF if the writer
    closed the pipe mid-line, ``""`` at EOF.
    """
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no line within {timeout}s (so far: {line!r})")
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace")


#: glibc reserves signals 32 and 33 for itself: sigaction() refuses them, so no
#: spawner (ikos, systemd) can reset them, and a parent that ignores them passes
#: that on. They are left out of "every signal is back to its default".
GLIBC_RESERVED = frozenset({32, 33})


def ignored_signals(status: dict[str, str]) -> set[int]:
    """Signals a /proc status (``SigIgn``) says are ignored, glibc's reserved ones aside."""
    mask = int(status["SigIgn"], 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))} - GLIBC_RESERVED


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def env_pids(entry: str) -> list[int]:
    """PIDs of live processes whose environment holds ``entry`` (``NAME=value``)."""
    needle = entry.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(name)):
            found.append(int(name))
    return found


def marked_pids(mark: str) -> list[int]:
    """PIDs of live processes whose environment holds ``IKOS_TEST_MARK=mark``."""
    return env_pids(f"IKOS_TEST_MARK={mark}")


class Instance:
    """A running ikosd under a temporary root, driven as a user would.

    What the teardown of ``ikosd_factory`` accepts from it is declared here:
    ``expect_exit(*statuses)`` when the test ends ikosd itself with another
    status than 0 (a failed start, an escalation: 1 or 2), ``crash()`` to
    kill it as a crash would (its daemons then belong to the next ikosd on
    the root, which must stop them), ``leave_behind(reason)`` when processes
    of this instance are meant to outlive every ikosd of the test.
    """

    def __init__(self, root: Path, proc: subprocess.Popen[str], mark: str, log: Path) -> None:
        self.root = root
        self.proc = proc
        self.mark = mark
        self.log = log
        self.env = {**os.environ, "IKOS_ROOT": str(root), "IKOS_TEST_MARK": mark}
        #: statuses ikosd may have when the test (not the teardown) ended it
        self.expected_exit: frozenset[int] = frozenset({0})
        #: why processes of this instance may outlive the test (None: none may)
        self.leftovers_allowed: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect_exit(self, *statuses: int) -> None:
        """Declare the exit statuses this test expects of ikosd (the teardown checks)."""
        self.expected_exit = frozenset(statuses)

    def crash(self, timeout: float = 30) -> None:
        """``kill -9`` ikosd and reap it: a crash, which the teardown then expects.

        Its daemons run on: a next ikosd on the same root adopts them and
        stops them, so the leak check still covers them once it has stopped.
        """
        self.expect_exit(-signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=timeout)

    def leave_behind(self, reason: str) -> None:
        """Exempt this instance's processes from the leak check, saying why."""
        self.leftovers_allowed = reason

    def ctl(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ikosctl --root ROOT ARGS`` and return the completed process."""
        res = subprocess.run(
            [IKOSCTL, "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"ikosctl {' '.join(args)} -> {res.returncode}: {res.stderr}")
        return res

    def status(self, name: str | None = None) -> Any:
        """``ikosctl --json status [NAME]`` parsed: a list, or one dict when NAME is given."""
        res = self.ctl("--json", "status", *([name] if name else []))
        if res.returncode not in (0, 3):
            raise AssertionError(f"status failed ({res.returncode}): {res.stderr}")
        data = json.loads(res.stdout)
        return data[0] if name else data

    def state(self, name: str) -> str:
        return str(self.status(name)["state"])

    def pid_of(self, name: str) -> int | None:
        return self.status(name)["pid"]

    def wait_state(self, name: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(name))["state"] == state and s,
            timeout,
            message=f"{name} to be {state}",
        )

    def wait_gave_up(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until ``name`` is failed for good: its restart limit reached.

        Not ``wait_state(name, "failed")``: every crash passes through ``failed``
        on its way to a restart, and a test polling then reads a restart count
        the supervisor has not reached yet.
        """

        def check() -> dict[str, Any] | None:
            st = self.status(name)
            reason = (st.get("last_exit") or {}).get("reason") or ""
            return st if st["state"] == "failed" and "restart limit reached" in reason else None

        return wait_for(check, timeout, message=f"{name} to reach its restart limit")  # type: ignore[no-any-return]

    def wait_running_new_pid(self, name: str, old: int | None, timeout: float = 20.0) -> int:
        def check() -> int | None:
            st = self.status(name)
            if st["state"] == "running" and st["pid"] and st["pid"] != old:
                return int(st["pid"])
            return None

        return int(wait_for(check, timeout, message=f"{name} to run with a pid other than {old}"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait for the ready line; fail with ikosd's output if it exited instead."""
        wait_for(
            lambda: "ikosd ready" in self.log_text() or self.proc.poll() is not None,
            timeout,
            message="ikosd's ready line",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"ikosd exited with {self.proc.returncode}:\n{self.log_text()}")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def leftovers(self) -> list[int]:
        return [p for p in marked_pids(self.mark) if p != os.getpid()]


def kill_marked(mark: str) -> list[int]:
    pids = marked_pids(mark)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def describe(pid: int) -> str:
    """``pid (command line)`` of a process, for a message that names what leaked."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} ({' '.join(a.decode(errors='replace') for a in argv if a)[:300]})"


#: How long the teardown waits for ikosd to stop after SIGTERM, and then for
#: its processes to disappear (an exiting process needs a moment to be reaped):
#: bounds on hangs, long enough for a loaded machine.
SHUTDOWN_TIMEOUT = 60.0
LEFTOVER_GRACE = 10.0


def left_behind(mark: str, timeout: float | None = None) -> str | None:
    """What still runs with ``IKOS_TEST_MARK=mark`` after polling a while, or None.

    Polled (up to ``timeout`` s, by default ``LEFTOVER_GRACE``) because a
    process that is exiting needs a moment to be reaped; the message names
    each process found by pid and command line.
    """
    deadline = time.monotonic() + (LEFTOVER_GRACE if timeout is None else timeout)
    while (pids := [p for p in marked_pids(mark) if p != os.getpid()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    if not pids:
        return None
    return f"{len(pids)} processes left behind:\n" + "\n".join(f"  {describe(p)}" for p in pids)


def kill_and_check(mark: str, *procs: subprocess.Popen[Any]) -> str | None:
    """Kill and reap ``procs`` if they still run; return what was left (then killed too).

    For a test that runs ikosd itself: what is left is ``left_behind``'s
    message, or None.
    """
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = left_behind(mark)
    kill_marked(mark)
    return left


def stop_and_check(instances: list[Instance]) -> None:
    """Stop ``instances`` (newest first), kill whatever is left, and fail on what was wrong.

    The newest goes first because it may have adopted the daemons of an
    older one that crashed; only once all have stopped is each one's mark
    checked for processes. What fails the test (``pytest.fail``, every
    problem listed): ikosd still running ``SHUTDOWN_TIMEOUT`` after SIGTERM
    (with its log's tail), an exit status other than 0 after this SIGTERM or
    other than the declared ones (``Instance.expect_exit``) when the test
    ended ikosd, and processes alive ``LEFTOVER_GRACE`` after that, unless
    the instance declared them (``Instance.leave_behind``).
    """
    problems: list[str] = []
    try:
        for inst in reversed(instances):
            expected = inst.expected_exit
            if inst.proc.poll() is None:
                expected = frozenset({0})  # this SIGTERM asks for an orderly shutdown
                inst.proc.send_signal(signal.SIGTERM)
                try:
                    inst.proc.wait(timeout=SHUTDOWN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    problems.append(
                        f"ikosd {inst.pid} ({inst.root}) hung: still running "
                        f"{SHUTDOWN_TIMEOUT:.0f} s after SIGTERM; its log ends:\n"
                        + inst.log_text()[-3000:]
                    )
                    inst.proc.kill()
                    inst.proc.wait()
                    continue
            if inst.proc.returncode not in expected:
                problems.append(
                    f"ikosd {inst.pid} ({inst.root}) exited with status "
                    f"{inst.proc.returncode}, expected {sorted(expected)}; its log ends:\n"
                    + inst.log_text()[-3000:]
                )
        for inst in instances:
            if inst.leftovers_allowed is None and (left := left_behind(inst.mark)):
                problems.append(f"ikosd {inst.pid} ({inst.root}): {left}")
    finally:
        for inst in instances:
            if inst.proc.poll() is None:
                inst.proc.kill()
                inst.proc.wait()
            kill_marked(inst.mark)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def children() -> Iterator[list[int]]:
    """PIDs a test forked itself: killed and reaped after it, whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def start_ikosd(base: Path, args: list[str], env: dict[str, str] | None = None) -> Instance:
    """Start ``ikosd --root BASE/root --log-level debug ARGS`` in ``base`` with a fresh mark.

    Its output goes to ``BASE/ikosd.out`` (``Instance.log``); the caller
    waits for it with ``Instance.wait_ready`` and stops it with
    ``stop_and_check``.
    """
    mark = uuid.uuid4().hex
    log = base / "ikosd.out"
    full_env = {**os.environ, "IKOS_TEST_MARK": mark, "PYTHONPATH": str(REPO)}
    full_env.update(env or {})
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [IKOSD, "--root", str(base / "root"), "--log-level", "debug", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=base,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )
    return Instance(base / "root", proc, mark, log)


@pytest.fixture
def ikosd_factory(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    """Start real ikosd instances: ``factory(tree=SRC or config=TOML, args=[...])``.

    At teardown each instance still running gets SIGTERM, and the test fails
    (an error at teardown; see ``stop_and_check``) when ikosd does not stop
    within ``SHUTDOWN_TIMEOUT``, when its exit status was not expected, or
    when any process carrying its mark is alive ``LEFTOVER_GRACE`` after all
    instances stopped. The status is checked because an ikosd that died in
    the middle of a test may leave the test's assertions passing by chance;
    the suite's ikosd exits 0 on SIGTERM or SIGINT, so a test that ends
    ikosd otherwise says what it expects with ``Instance.expect_exit`` (exit
    1 after an escalation, 2 for a bad configuration), ``Instance.crash``
    (kill -9) or ``expect_exit=`` here, for an ikosd that is meant to fail
    to start. Processes meant to outlive ikosd are declared with
    ``Instance.leave_behind``. Whatever is found, everything is killed.
    """
    started: list[Instance] = []

    def start(
        *,
        tree: str | None = None,
        config: str | None = None,
        name: str = "inst",
        args: list[str] | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        expect_exit: int = 0,
    ) -> Instance:
        base = tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        cmd = []
        if tree is not None:
            (base / f"tree_{name}.py").write_text(textwrap.dedent(tree))
            cmd += ["--tree", f"{base / f'tree_{name}.py'}:tree"]
        if config is not None:
            (base / "ikos.toml").write_text(textwrap.dedent(config))
            cmd += ["-c", str(base / "ikos.toml")]
        inst = start_ikosd(base, cmd + (args or []), env)
        inst.expect_exit(expect_exit)
        started.append(inst)
        if wait_ready:
            inst.wait_ready()
        return inst

    yield start
    stop_and_check(started)
