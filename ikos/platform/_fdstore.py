"""A file-descriptor store that outlives ikosd, like systemd's FDSTORE.

When ikosd is killed (``kill -9``, a crash), its daemons keep running, but
the descriptors only ikosd held would die with it: the read ends of the
daemons' log pipes (their next write would hit EPIPE), the actors'
listening sockets and status pipes. So ikosd deposits a duplicate of each
such descriptor with this small keeper process, started in its own
session; a new ikosd on the same root takes them back and carries on as if
nothing happened: logs keep flowing, restarts reuse the same mailbox
address, exit reasons still arrive.

The keeper only holds descriptors; it never reads them. It accepts
connections from its own uid only (SO_PEERCRED) on ``RUN/fdstore.sock`` and
speaks pickled dicts over SOCK_SEQPACKET with SCM_RIGHTS. Rejected
alternative: keeping the fork server alive across ikosd's death, which
would tie the descriptors to a process whose preloaded code may be stale
for the next ikosd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ikos.platform._fdkeeper import recv, send
from ikos.platform._process import disown, own
from ikos.platform._unix import connect_unix

# -- ikosd's side ---------------------------------------------------------------------


class FdStore:
    """ikosd's connection to its keeper: deposit, drop and take back descriptors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5.0)
        try:
            connect_unix(sock, self.path)
        except OSError:
            sock.close()
            return None
        return sock

    def open(self) -> dict[str, dict[str, int]]:
        """Reach the keeper (starting one if none runs); return what it held, by daemon."""
        sock = self._connect()
        if sock is None:
            self._launch()
            sock = self._connect()
            if sock is None:
                raise OSError(f"the descriptor keeper does not answer at {self.path}")
            self.sock = sock
            return {}
        self.sock = sock
        held: dict[str, dict[str, int]] = {}
        send(sock, {"op": "list"})
        while True:
            msg, fds = recv(sock)
            if msg.get("op") == "end":
                break
            if fds:
                for fd in fds:
                    os.set_inheritable(fd, False)
                held.setdefault(msg["name"], {})[msg["key"]] = fds[0]
        return held

    def _launch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        proc = subprocess.Popen(
            # a bare interpreter running the keeper's file: no ikos, no site (see _fdkeeper)
            [
                sys.executable,
                "-I",
                "-S",
                str(Path(__file__).with_name("_fdkeeper.py")),
                str(self.path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # it outlives ikosd: holding ikosd's stderr would keep a pipe that ikosd
            # writes to (`ikosd | head`, a test's capture) open for ever
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives ikosd's death and its process group's signals
        )
        own(proc.pid)  # ours to reap (quit does), not the orphan reaper's
        assert proc.stdout is not None
        deadline = time.monotonic() + 10
        line = proc.stdout.readline()
        proc.stdout.close()
        if b"ready" not in line or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            disown(proc.pid)
            raise OSError("the descriptor keeper failed to start")
        self.process = proc  # not waited for until quit(): it must outlive a crash of ikosd

    def put(self, name: str, key: str, fd: int) -> None:
        """Deposit a duplicate of ``fd`` under (name, key), replacing an older one."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            send(self.sock, {"op": "put", "name": name, "key": key}, [fd])

    def drop(self, name: str, keys: list[str] | None = None) -> None:
        """Forget (and close in the keeper) the descriptors of ``name``."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            send(self.sock, {"op": "drop", "name": name, "keys": keys})

    def quit(self) -> None:
        """Orderly shutdown: the keeper closes everything and exits."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError, EOFError):
            send(self.sock, {"op": "quit"})
            recv(self.sock)
        self.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            disown(self.process.pid)
            self.process = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
