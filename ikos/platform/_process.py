"""A supervised process as the manager's event loop sees it: a pidfd and a status pipe.

Exits arrive through the process's pidfd becoming readable, never through
SIGCHLD handlers or polling, and signals are sent through the same pidfd,
so a PID recycled after the process died can never be hit. The manager is a
child subreaper: daemons double-forked by the fork server are re-parented to
it, so ``waitid(P_PIDFD)`` yields their real exit status.

The optional status pipe carries JSON lines from the child (the actor
runtime writes ``ready`` and ``exit`` events); it is drained when the
process exits so that the exit's explanation is never lost to a race
between the two descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ikos.process")

PR_SET_CHILD_SUBREAPER = 36
MAX_STATUS_BYTES = 64 * 1024


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; True on success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except OSError:
        return False


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: ``code`` for an exit, ``signal`` for a kill."""

    code: int | None
    signal: int | None
    at: float

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code is None:
            return "exited (status unknown)"
        return "exited normally" if self.code == 0 else f"exited with status {self.code}"


class ProcessHandle:
    """Watches one process from the running event loop."""

    def __init__(self, pid: int, status_fd: int | None = None, *, exec_pipe: bool = False) -> None:
        self.pid = pid
        self.started_at = time.time()
        self.loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[ExitStatus] = self.loop.create_future()
        self.ready: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.events: list[dict[str, Any]] = []
        self._status_fd = status_fd
        self._status_buf = bytearray()
        # exec_pipe: the status pipe is a CLOEXEC error pipe of an exec: EOF with
        # nothing written means the exec succeeded; text is the failure.
        self._exec_pipe = exec_pipe
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = None
        if status_fd is not None:
            os.set_blocking(status_fd, False)
            self.loop.add_reader(status_fd, self._read_status)
        if self.pidfd is None:
            self._finish(ExitStatus(None, None, time.time()))
        else:
            self.loop.add_reader(self.pidfd, self._on_exit)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit_event(self) -> dict[str, Any] | None:
        """The child's own ``exit`` event (reason, traceback), if it sent one."""
        for event in reversed(self.events):
            if event.get("event") == "exit":
                return dict(event)
        return None

    def _read_status(self) -> None:
        fd = self._status_fd
        if fd is None:
            return
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                if self._exec_pipe:
                    self._exec_result()
                self._close_status()
                break
            self._status_buf += chunk
            if len(self._status_buf) > MAX_STATUS_BYTES:
                log.warning("pid %d: status pipe overflow, closing it", self.pid)
                self._close_status()
                break
        while not self._exec_pipe and b"\n" in self._status_buf:
            line, _, rest = bytes(self._status_buf).partition(b"\n")
            self._status_buf = bytearray(rest)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            if event.get("event") == "ready" and not self.ready.done():
                self.ready.set_result(event)

    def _exec_result(self) -> None:
        text = bytes(self._status_buf).decode("utf-8", "replace").strip()
        self._status_buf.clear()
        if text:
            self.events.append({"event": "exit", "reason": f"exec failed: {text}"})
        elif not self.ready.done():
            self.ready.set_result({"event": "ready", "pid": self.pid})

    def _close_status(self) -> None:
        fd = self._status_fd
        if fd is not None:
            self._status_fd = None
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_exit(self) -> None:
        assert self.pidfd is not None
        try:
            res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            res = None
            status = ExitStatus(None, None, time.time())  # not our child (adopted)
        else:
            if res is None:
                # readable but not yet waitable: a non-child that exited, or spurious
                with contextlib.suppress(OSError):
                    os.kill(self.pid, 0)
                    return
                status = ExitStatus(None, None, time.time())
            elif res.si_code == os.CLD_EXITED:
                status = ExitStatus(res.si_status, None, time.time())
            else:
                status = ExitStatus(None, res.si_status, time.time())
        self._finish(status)

    def _finish(self, status: ExitStatus) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self._read_status()
        self._close_status()
        if not self.exited.done():
            self.exited.set_result(status)

    def send_signal(self, sig: int) -> bool:
        """Signal the process through its pidfd; False if it is already gone."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)
