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

The keeper runs as long as ikosd, so its memory counts as ikosd's: it is
the small C program ``fdkeeper.c`` (120-190 KiB of private memory, against
~6 MiB for a bare Python interpreter), compiled like the
spawn trampoline of :mod:`ikos.platform._cgexec` into the same cache
directory (``python -m ikos.platform._fdstore`` at install time, or ikosd
in a worker thread when it is missing, for the next keeper it starts). It
speaks the same bytes as the Python keeper (:mod:`ikos.platform._fdkeeper`),
which remains the fallback where there is no compiler, or when
``IKOS_FDKEEPER=python`` asks for it; a keeper of either kind started by an
earlier ikosd is reused as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ikos.platform import _cgexec
from ikos.platform._digest import sha256
from ikos.platform._fdkeeper import recv, send
from ikos.platform._process import disown, own
from ikos.platform._unix import connect_unix, peer_credentials

log = logging.getLogger("ikos.fdstore")

#: The C keeper's source, shipped with the package.
KEEPER_SOURCE = Path(__file__).with_name("fdkeeper.c")
#: Linked dynamically: measured on the test machine, 112 KiB of private memory
#: (USS; PSS 191 KiB), where a static glibc build is 696 KiB (its whole libc
#: image is the keeper's own, where the dynamic libc's pages are shared).
_FLAGS = ("-Os", "-s")


def _keeper_name() -> str | None:
    try:
        source = KEEPER_SOURCE.read_bytes()
    except OSError:
        return None  # an installation without the source: the Python keeper
    digest = sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:12]
    return f"ikos-fdkeeper-{digest}"


def _python_forced() -> bool:
    return os.environ.get("IKOS_FDKEEPER", "").lower() == "python"


def keeper_path() -> str | None:
    """The compiled keeper, if it is built and safe to run (and not switched off); else None."""
    name = _keeper_name()
    if name is None or _python_forced():
        return None
    return _cgexec.installed(name)


def build_keeper(timeout: float = 120.0) -> str | None:
    """Compile the C keeper into the cache unless it is there; its path, or None."""
    found = keeper_path()
    name = _keeper_name()
    if found is not None or name is None or _python_forced():
        return found
    _cgexec.compile_program(name, KEEPER_SOURCE.read_text(), "descriptor keeper", _FLAGS, timeout)
    return keeper_path()


def keeper_argv(path: Path) -> tuple[list[str], str]:
    """The command line of a new keeper on ``path``, and its kind (``"c"`` or ``"python"``)."""
    compiled = keeper_path()
    if compiled is not None:
        return [compiled, str(path)], "c"
    # a bare interpreter running the keeper's file: no ikos, no site (see _fdkeeper)
    script = str(Path(__file__).with_name("_fdkeeper.py"))
    return [sys.executable, "-I", "-S", script, str(path)], "python"


def keeper_kind(pid: int) -> str:
    """Which keeper process ``pid`` is: ``"c"``, ``"python"``, or ``"unknown"``."""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return "unknown"
    return "c" if exe.startswith("ikos-fdkeeper") else "python" if "python" in exe else "unknown"


# -- ikosd's side ---------------------------------------------------------------------


class FdStore:
    """ikosd's connection to its keeper: deposit, drop and take back descriptors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None
        #: Which keeper serves this store, ``"c"`` or ``"python"`` (logged; see keeper_kind).
        self.kind = "unknown"

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
        with contextlib.suppress(OSError):
            self.kind = keeper_kind(peer_credentials(sock)[0])
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
        log.info(
            "descriptor keeper (%s) found at %s: %d descriptors taken back",
            self.kind,
            self.path,
            sum(map(len, held.values())),
        )
        return held

    def _launch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        argv, kind = keeper_argv(self.path)
        proc = subprocess.Popen(
            argv,
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
        self.kind = kind
        log.info("descriptor keeper (%s) started: pid %d", kind, proc.pid)
        if kind == "python" and not _python_forced() and _cgexec.compiler() is not None:
            self._build_for_next_time()

    @staticmethod
    def _build_for_next_time() -> None:
        """Compile the C keeper off the loop, for the next keeper this machine starts."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not under ikosd's loop (a tool, a test): `make` or the next ikosd builds it
        # the default executor is joined before ikosd exits: no compiler is left running
        loop.run_in_executor(None, build_keeper)

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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build_keeper()
    print(built or "no C descriptor keeper built (see above): ikosd uses the Python one")
    raise SystemExit(0 if built else 1)
