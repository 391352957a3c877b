"""``Down``: the message a monitor delivers when the daemon it watches stops.

An actor that called :meth:`~ikos.Actor.monitor` gets one :class:`Down` in its
``receive`` each time the watched daemon's process ends (OTP's ``'DOWN'``
message, Akka's ``Terminated``). The manager builds it (it is the one that sees
every exit) and hands it to the watcher's mailbox; it is a small frozen value,
pickled like any other message.

The reason is one word from :data:`REASONS`, so that code can match on it;
``detail`` is the human version (exit status, signal, the exception line,
who stopped it).

On its way, a Down is :class:`Addressed` to the watcher's process: an
actor's mailbox socket outlives its incarnations, so a delivery that starts
just as the watcher crashes could otherwise be taken by the next
incarnation, which never asked for it. The check runs where only the
receiver can make it, when the message is unpickled in the receiving
process: elsewhere than in the process it was addressed to, unpickling
raises, and the actor runtime answers the ask with an error instead of
calling ``receive``. (Pids are compared as ikosd sees them: actors share its
pid namespace.) Each also carries its number in the watcher's sequence, so
that one sent again (a delivery that timed out may or may not have arrived)
is refused the same way when the first copy did arrive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

#: Every value :attr:`Down.reason` takes, and what each means.
REASONS: Final = {
    "normal": "exited on its own with status 0 (an actor's self.stop(), an executable's exit 0)",
    "crashed": "exited on its own with another status: an exception in receive or on_start, "
    "an executable's failure, a start that failed",
    "killed": "died of a signal nobody in ikos sent as a stop (kill -9, ikosctl kill, the OOM "
    "killer)",
    "stopped": "stopped by an operator (ikosctl stop, ikos.daemon.stop)",
    "restarted": "stopped by an operator's restart (ikosctl restart); a new incarnation follows",
    "failed": "stopped by ikos because it failed from outside (a health check gone critical)",
    "shutdown": "stopped by its supervisor: ikosd shutting down, a sibling's restart "
    "(one_for_all, rest_for_one), a supervisor giving up, its removal from the tree "
    "(terminate_child, daemon_delete, a reload) or a reload that changed it",
    "noproc": "it was not running when the monitor was set",
}


@dataclass(frozen=True)
class Down:
    """The daemon ``name`` stopped; ``reason`` is one of :data:`REASONS`.

    ``detail`` says what happened in words (``"killed by SIGKILL"``,
    ``"receive raised ValueError: bad"``, ``"stopped by request: exited with
    status 0"``); ``pid`` is the process that ended (None for ``noproc``).

    Example::

        class Watcher(ikos.Actor):
            def on_start(self):
                self.monitor("db")

            def receive(self, message):
                if isinstance(message, ikos.Down) and message.reason != "normal":
                    log.warning("db went down: %s", message.detail)
    """

    name: str
    reason: str
    detail: str = ""
    pid: int | None = None


class StaleDown(ValueError):
    """A Down reached a later incarnation of the watcher it was addressed to: refused."""


class DuplicateDown(ValueError):
    """A Down sent again after a delivery that was not confirmed, though the first
    copy had arrived: refused, so that each Down is received once."""


#: The number of the last Down this process took (see :class:`Addressed`).
_last_taken = 0


class Addressed:
    """A :class:`Down` on its way: addressed to the watcher process ``to`` (a pid) and
    numbered ``seq`` in that watcher's sequence; see the module docstring.

    It unpickles as the plain ``Down``, in that process only (else
    :class:`StaleDown`), and only once (a number not above the last one taken
    is :class:`DuplicateDown`): the manager may send it again when it could
    not tell whether a delivery arrived.
    """

    __slots__ = ("down", "seq", "to")

    def __init__(self, down: Down, to: int, seq: int) -> None:
        self.down = down
        self.to = to
        self.seq = seq

    def __reduce__(self) -> tuple[Any, ...]:
        d = self.down
        return (_delivered, (d.name, d.reason, d.detail, d.pid, self.to, self.seq))


def _delivered(name: str, reason: str, detail: str, pid: int | None, to: int, seq: int) -> Down:
    global _last_taken
    if os.getpid() != to:
        raise StaleDown(
            f"Down({name!r}) was addressed to pid {to}, an earlier incarnation of this actor"
        )
    if seq <= _last_taken:
        raise DuplicateDown(f"Down({name!r}) number {seq} was received already")
    _last_taken = seq
    return Down(name, reason, detail, pid)
