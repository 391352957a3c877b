"""Unix-domain socket helpers that survive long paths.

``sun_path`` holds at most 107 bytes, and instance roots under a test's
temporary directory easily exceed that. Rather than moving sockets to a
short global directory (which would break ``--root`` isolation), a long
path is reached through ``/proc/self/fd/N/NAME`` where N is an ``O_PATH``
descriptor of the socket's directory, held only for the duration of the
call.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

SUN_PATH_MAX = 107


@contextlib.contextmanager
def short_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a path to ``path`` short enough for ``sun_path``."""
    p = os.fspath(path)
    if len(os.fsencode(p)) <= SUN_PATH_MAX:
        yield p
        return
    directory, name = os.path.split(p)
    dfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{name}"
    finally:
        os.close(dfd)


def connect_unix(sock: socket.socket, path: str | os.PathLike[str]) -> None:
    """``sock.connect(path)`` for paths of any length."""
    with short_path(path) as p:
        sock.connect(p)


def bind_unix(sock: socket.socket, path: str | os.PathLike[str], mode: int | None = None) -> None:
    """Bind ``sock`` at ``path`` (removing a stale socket file first) and chmod it."""
    p = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if p.is_socket():
            p.unlink()
    with short_path(p) as sp:
        sock.bind(sp)
    if mode is not None:
        os.chmod(p, mode)


def process_groups(pid: int) -> frozenset[int] | None:
    """The supplementary groups of process ``pid`` (``Groups:`` of /proc/PID/status).

    None when they cannot be read (the process is gone): callers decide what
    that means for them.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of a connected Unix socket (SO_PEERCRED)."""
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
