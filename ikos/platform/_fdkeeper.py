"""The descriptor keeper process: holds ikosd's descriptors across its death.

See :mod:`ikos.platform._fdstore` for why it exists and for ikosd's side. This
module is the keeper in Python: the fallback of the C one (``fdkeeper.c``,
which speaks the same bytes) where there is no C compiler, or when
``IKOS_FDKEEPER=python`` asks for it; ``send`` and ``recv`` are ikosd's side
of the protocol either way. The Python keeper is started as a bare script,
``python -I -S .../_fdkeeper.py SOCKET``, importing nothing of ikos (nor
``site``): the keeper never runs ikos code, and a fresh interpreter that
imports the ikos package costs ikosd's start-up ~150 ms and the machine
~10 MiB more for as long as the keeper lives. It uses the standard library
only, and ``_unix.py`` (standard library only too) loaded by path.
"""

from __future__ import annotations

import array
import contextlib
import io
import os
import pickle
import signal
import socket
from collections.abc import Callable
from typing import Any

MAX_MESSAGE = 65536
MAX_FDS_PER_MESSAGE = 64
MAX_ENTRIES = 100_000


def send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


class _PlainUnpickler(pickle.Unpickler):
    """Strings, dicts, lists, None: no class of any module is ever looked up (nor run)."""

    def find_class(self, module: str, name: str, /) -> Any:
        raise pickle.UnpicklingError(f"no globals in the keeper's protocol ({module}.{name})")


def recv(sock: socket.socket) -> tuple[Any, list[int]]:
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
    try:
        return _PlainUnpickler(io.BytesIO(data)).load(), list(fds)
    except Exception:  # not a message: its descriptors are not kept either
        for fd in fds:
            os.close(fd)
        raise


# -- the keeper process ----------------------------------------------------------


def serve(
    path: str,
    bind_unix: Callable[[socket.socket, str, int], None],
    peer_credentials: Callable[[socket.socket], tuple[int, int, int]],
) -> None:
    """Hold descriptors for ikosd until told to quit (runs in the keeper process).

    The socket helpers of ``ikos.platform._unix`` are passed in: the keeper
    runs as a script, outside the package.
    """
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
            except Exception:  # whatever a peer sends (garbage, bad UTF-8) ends its session only
                continue
    for fd in store.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


def _session(conn: socket.socket, store: dict[tuple[str, str], int]) -> bool:
    """Serve one ikosd connection; True when told to quit."""
    while True:
        msg, fds = recv(conn)
        if not isinstance(msg, dict):
            for fd in fds:
                os.close(fd)
            continue
        op = msg.get("op")
        if op == "put" and len(fds) == 1 and len(store) < MAX_ENTRIES:
            try:
                key = (str(msg["name"]), str(msg["key"]))
            except KeyError:
                os.close(fds[0])
                raise
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
                send(conn, {"op": "entry", "name": owner, "key": what}, [fd])
            send(conn, {"op": "end"})
        elif op == "quit":
            send(conn, {"op": "bye"})
            return True


def _load_unix() -> Any:
    """``ikos.platform._unix`` loaded by path, without importing the ikos package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_ikos_unix", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_unix.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    import sys

    _unix = _load_unix()
    serve(sys.argv[1], _unix.bind_unix, _unix.peer_credentials)
