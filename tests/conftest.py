"""Shared fixtures: real ikosd instances in temporary roots, and a leak check.

``ikosd_factory`` starts the real ``ikosd`` command (a subprocess, as a user
would) on a tree file or config, waits for its ready line, and on teardown
stops it with SIGTERM and then kills anything it left behind. Every process
of an instance carries ``IKOS_TEST_MARK`` in its environment (actors and
executables inherit it), so the fixture finds stragglers even after they
were re-parented, and the test fails if an orderly shutdown left any.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    """A running ikosd under a temporary root, driven as a user would."""

    def __init__(self, root: Path, proc: subprocess.Popen[str], mark: str, log: Path) -> None:
        self.root = root
        self.proc = proc
        self.mark = mark
        self.log = log
        self.env = {**os.environ, "IKOS_ROOT": str(root), "IKOS_TEST_MARK": mark}

    @property
    def pid(self) -> int:
        return self.proc.pid

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

    def wait_running_new_pid(self, name: str, old: int | None, timeout: float = 20.0) -> int:
        def check() -> int | None:
            st = self.status(name)
            if st["state"] == "running" and st["pid"] and st["pid"] != old:
                return int(st["pid"])
            return None

        return int(wait_for(check, timeout, message=f"{name} to run with a pid other than {old}"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

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


@pytest.fixture
def ikosd_factory(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    """Start real ikosd instances: ``factory(tree=SRC or config=TOML, extra_args=[...])``."""
    started: list[Instance] = []

    def start(
        *,
        tree: str | None = None,
        config: str | None = None,
        name: str = "inst",
        args: list[str] | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> Instance:
        base = tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        root = base / "root"
        cmd = [IKOSD, "--root", str(root), "--log-level", "debug"]
        if tree is not None:
            (base / f"tree_{name}.py").write_text(textwrap.dedent(tree))
            cmd += ["--tree", f"{base / f'tree_{name}.py'}:tree"]
        if config is not None:
            (base / "ikos.toml").write_text(textwrap.dedent(config))
            cmd += ["-c", str(base / "ikos.toml")]
        cmd += args or []
        mark = uuid.uuid4().hex
        log = base / "ikosd.out"
        full_env = {**os.environ, "IKOS_TEST_MARK": mark, "PYTHONPATH": str(REPO)}
        full_env.update(env or {})
        out = open(log, "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=base,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        inst = Instance(root, proc, mark, log)
        started.append(inst)
        if wait_ready:
            wait_for(
                lambda: "ikosd ready" in inst.log_text() or proc.poll() is not None,
                60,
                message="ikosd's ready line",
            )
            if proc.poll() is not None:
                raise AssertionError(f"ikosd exited with {proc.returncode}:\n{inst.log_text()}")
        return inst

    yield start
    for inst in started:
        try:
            if inst.proc.poll() is None:
                inst.proc.send_signal(signal.SIGTERM)
                try:
                    inst.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    inst.proc.kill()
                    inst.proc.wait()
        finally:
            kill_marked(inst.mark)
