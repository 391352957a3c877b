"""Signal names and numbers as users write them: the one parser of ikos.

A signal reaches ikos from a configuration file (``stop_signal = "INT"``), a
daemon's fields in Python or JSON (``reload_signal=signal.SIGHUP``), the
control protocol (``kill {"signal": 9}``) and the command line (``ikosctl
kill -s usr1``). Every one of them goes through :func:`parse_signal`, so a
signal spelt one way is accepted, or refused, the same way everywhere. The
function raises a plain ``ValueError`` with a short reason; each caller wraps
it in its own error (a ``ConfigError`` naming the file and key, a protocol
``BadRequest``, an ``argparse`` usage error).

Real-time signals (``SIGRTMIN`` + n) have no member of ``signal.Signals``
apart from the two ends, yet daemons use them: a number in the range the
kernel knows is therefore accepted and returned as a plain ``int``, and every
named signal as its ``signal.Signals`` member (an ``int`` too).
"""

from __future__ import annotations

import signal

__all__ = ["parse_signal", "signal_name"]


def parse_signal(value: object) -> int:
    """The signal ``value`` names: a number, ``"9"``, ``"KILL"``, ``"SIGKILL"`` or ``"sigkill"``.

    Returns the ``signal.Signals`` member when the signal has a name, else
    the number (an unnamed real-time signal). Raises ``ValueError`` for a
    bool, a number outside 1..NSIG-1, an unknown name or any other type.

    >>> parse_signal("hup"), parse_signal(9), parse_signal(" SIGUSR1 ")
    (<Signals.SIGHUP: 1>, <Signals.SIGKILL: 9>, <Signals.SIGUSR1: 10>)
    """
    if isinstance(value, signal.Signals):
        return value
    if isinstance(value, bool):
        raise ValueError(f"not a signal: {value!r}")
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            # a 5,000-digit string is out of range, not a reason to parse it
            number = int(text) if len(text) <= 3 else signal.NSIG
        else:
            name = text.upper()
            name = name if name.startswith("SIG") else "SIG" + name
            member = signal.Signals.__members__.get(name)
            if member is None:
                raise ValueError(f"unknown signal {value[:40]!r}")
            return member
    else:
        raise ValueError(f"not a signal: {str(value)[:40]}")
    if not 0 < number < signal.NSIG:
        shown = str(value).strip()[:20]
        raise ValueError(f"no signal number {shown} (1-{signal.NSIG - 1})")
    try:
        return signal.Signals(number)
    except ValueError:
        return number  # a real-time signal without a name of its own


def signal_name(number: int) -> str | int:
    """How a signal is written back (in JSON, in messages): its name, else its number.

    >>> signal_name(1), signal_name(40)
    ('SIGHUP', 40)
    """
    try:
        return signal.Signals(number).name
    except ValueError:
        return int(number)
