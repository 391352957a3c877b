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

import array
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ikos.platform._process import disown, own
from ikos.platform._unix import bind_unix, connect_unix, peer_credentials

MAX_MESSAGE = 65536
MAX_FDS_PER_MESSAGE = 64
MAX_ENTRIES = 100_000


def _send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError
    return pickle.loads(data), list(fds)


# -- the keeper process ----------------------------------------------------------


def serve(path: str) -> None:
    """Hold descriptors for ikosd until told to quit (runs in the keeper process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    store: dict[tuple[str, str], int] = {}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bind_unix(listener, path, 0o600)
    listener.listen(4)
    uid = os.getuid()
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                if peer_credentials(conn)[1] not in (0, uid):
                    continue
                if _session(conn, store):
                    break
            except (EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError):
                continue
    for fd in store.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


def _session(conn: socket.socket, store: dict[tuple[str, str], int]) -> bool:
    """Serve one ikosd connection; True when told to quit."""
    while True:
        msg, fds = _recv(conn)
        if not isinstance(msg, dict):
            for fd in fds:
                os.close(fd)
            continue
        op = msg.get("op")
        if op == "put" and len(fds) == 1 and len(store) < MAX_ENTRIES:
            key = (str(msg["name"]), str(msg["key"]))
            old = store.pop(key, None)
            if old is not None:
                os.close(old)
            store[key] = fds[0]
            continue
        for fd in fds:
            os.close(fd)
        if op == "drop":
            name = str(msg["name"])
            keys = msg.get("keys")
            for entry in [k for k in store if k[0] == name and (keys is None or k[1] in keys)]:
                os.close(store.pop(entry))
        elif op == "list":
            for (owner, what), fd in list(store.items()):
                _send(conn, {"op": "entry", "name": owner, "key": what}, [fd])
            _send(conn, {"op": "end"})
        elif op == "quit":
            _send(conn, {"op": "bye"})
            return True


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
        _send(sock, {"op": "list"})
        while True:
            msg, fds = _recv(sock)
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
            [sys.executable, "-m", "ikos.platform._fdstore", str(self.path)],
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
            _send(self.sock, {"op": "put", "name": name, "key": key}, [fd])

    def drop(self, name: str, keys: list[str] | None = None) -> None:
        """Forget (and close in the keeper) the descriptors of ``name``."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            _send(self.sock, {"op": "drop", "name": name, "keys": keys})

    def quit(self) -> None:
        """Orderly shutdown: the keeper closes everything and exits."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError, EOFError):
            _send(self.sock, {"op": "quit"})
            _recv(self.sock)
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


if __name__ == "__main__":
    serve(sys.argv[1])
