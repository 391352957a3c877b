"""Socket activation of the broker: ikosd holds the listening socket, the broker borrows it.

ikosd binds ``RUN/ipc/broker.sock`` itself and keeps it for its whole life, so
a client's ``connect`` never fails: before the broker runs, and while it is
restarted, connections wait in the listen backlog. ikosd starts the broker when
that socket first becomes readable (``[ipc] start = "on-demand"``, the default)
or at once (``"eager"``). The broker takes the listening socket from ikosd over
``RUN/ipc/activation.sock`` (0600, ikosd's uid only, checked with SO_PEERCRED):
one byte with the descriptor attached by SCM_RIGHTS. The broker's environment
names that socket in :data:`ENV`; without it (a broker started by hand, or by
an older ikosd) the broker binds its own socket, as it always did.

Rejected: passing the socket by inheritance (``LISTEN_FDS``), as systemd does.
ikosd starts executables by two routes (``posix_spawn``, through the compiled
cgroup trampoline or not, and the fork server), and each would need to carry
one more descriptor for this one daemon; the handoff needs neither, works the
same whichever route started the broker, and costs one local round trip per
broker start.

It lives in the platform layer, not in ``ikos.ipc``, because ikosd holds the
socket from its first moments: importing the ``ikos.ipc`` package (the
client, the codecs, shared memory) for that would undo the lazy loading that
keeps ikosd's start light.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Final

from ikos.platform._memfd import recv_with_fds, send_with_fds
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import bind_unix, connect_unix, peer_credentials

#: The variable naming the activation socket in the broker's environment.
ENV: Final = "IKOS_BROKER_ACTIVATION"
#: Seconds the broker waits for ikosd to hand the listening socket over.
HANDOFF_TIMEOUT: Final = 5.0
#: The listen backlog of the broker's socket: the connections that wait while no
#: broker accepts (the kernel caps it at net.core.somaxconn).
BACKLOG: Final = 4096


class ActivationError(OSError):
    """The broker could not take its listening socket from ikosd."""


def broker_socket(paths: InstancePaths) -> Path:
    """Where the broker of the instance ``paths`` listens."""
    return paths.run_dir / "ipc" / "broker.sock"


def activation_socket(run_dir: Path) -> Path:
    """Where ikosd hands the broker's listening socket over."""
    return run_dir / "ipc" / "activation.sock"


def listening_socket(path: Path, mode: int = 0o666, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking stream socket listening at ``path`` (0666 unless said: every user)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        bind_unix(sock, path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def serves(path: Path) -> bool:
    """Whether some process accepts connections at ``path`` (a broker from a previous ikosd)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        connect_unix(probe, path)
    except OSError:  # missing, stale (refused), or a backlog full: nobody we can use
        return False
    finally:
        probe.close()
    return True


class Handoff:
    """ikosd's side: a 0600 socket where the broker, of ikosd's uid, takes the listener."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = listening_socket(path, 0o600, 16)

    def give(self, listener: socket.socket) -> int:
        """Hand ``listener`` to every waiting peer of our uid; the number served."""
        served = 0
        while True:
            try:
                peer, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return served
            except OSError:
                return served  # out of descriptors: the broker retries, then fails visibly
            with peer:
                try:
                    _pid, uid, _gid = peer_credentials(peer)
                    if uid != os.geteuid():
                        continue  # 0600 already keeps others out; a second lock
                    peer.settimeout(1.0)
                    send_with_fds(peer, b"L", [listener.fileno()])
                    served += 1
                except OSError:
                    continue

    def close(self) -> None:
        """Stop handing over and remove the socket file."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def take_listener(path: str, timeout: float = HANDOFF_TIMEOUT) -> socket.socket:
    """The broker's side: the listening socket ikosd holds, taken over ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        connect_unix(sock, path)
        buffer = bytearray(1)
        got, fds = recv_with_fds(sock, buffer)
    except OSError as exc:
        raise ActivationError(f"no listening socket from ikosd at {path}: {exc}") from None
    finally:
        sock.close()
    if got != 1 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ActivationError(f"no listening socket from ikosd at {path}: nothing was sent")
    listener = socket.socket(fileno=fds[0])
    listener.setblocking(False)
    return listener
