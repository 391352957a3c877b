"""The logger (``log``): collects log records from every daemon and program of an instance.

Records come in over ikos IPC (asks and tells ``{"op": "log", ...}`` to the
actor ``log``, :func:`send` here, or publications on the topic
``log.submit``) and on a syslog datagram socket that ``logger(1)`` and
``syslog(3)`` write to (``ROOT/run/ikos/log.sock`` by default; RFC 3164 and
RFC 5424 both parsed, a line that parses as neither kept as ``raw`` with the
reason). They are filtered by level, facility and program, written to
rotated JSON Lines files (``ROOT/var/log/ikos/syslog/``), forwarded in RFC
5424 over UDP or TCP, and queried by time, program and level
(:class:`LogHandler` sends a program's :mod:`logging` records there)::

    ikosctl call log '{"op": "query", "program": "cron*", "level": "warning"}'

The daemon is :class:`Logger` (``_daemon.py``); the parsing and formatting
of syslog lines is in ``_syslog.py``, the filter and query rules in
``_rules.py``, the files in ``_store.py``, forwarding in ``_forward.py``.
docs/examples.md, "The logger (log)", is the user's guide.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import ikos
from examples.system.log._daemon import (
    RECORD_TOPIC,
    ROTATED_TOPIC,
    SUBMIT_TOPIC,
    Logger,
    Options,
)
from examples.system.log._rules import Filter, Query
from examples.system.log._syslog import (
    FACILITIES,
    LEVELS,
    LogInputError,
    Record,
    format_5424,
    parse_datagram,
)

__all__ = [
    "FACILITIES",
    "LEVELS",
    "RECORD_TOPIC",
    "ROTATED_TOPIC",
    "SUBMIT_TOPIC",
    "Filter",
    "LogHandler",
    "LogInputError",
    "Logger",
    "Query",
    "Record",
    "child",
    "format_5424",
    "parse_datagram",
    "query",
    "send",
]

#: Seconds :func:`send` (with ``wait``) and :func:`query` wait for the logger.
TIMEOUT = 10.0


def child(name: str = "log", *, requires: Sequence[str] = ("auth",), **options: Any) -> ikos.Child:
    """The logger as a child of a supervision tree, its options checked now.

    ``options`` are :class:`Options`'s (all keywords, all optional):
    ``socket_path``, ``directory``, ``min_level``, ``rules``,
    ``max_file_bytes``, ``max_file_age``, ``keep_files``, ``fsync_interval``,
    ``ring_size``, ``max_datagram``, ``max_message``, ``forward``,
    ``forward_queue``, ``publish_level``, ``query_permission``,
    ``auth_service`` (docs/examples.md says what each does). A bad one raises
    :class:`LogInputError` naming it, before any process starts.

    Example::

        ikos.Supervisor("root", children=[auth.child(), log.child(
            min_level="info", forward=["tcp://10.0.0.5:601"])])
    """
    Options(**options)
    return ikos.Child(
        name,
        Logger,
        kwargs=options,
        requires=list(requires),
        shutdown=10.0,
        description="log collector: ikos IPC and syslog socket, files, forwarding, queries",
    )


def send(
    msg: str,
    *,
    level: str | int = "info",
    program: str | None = None,
    facility: str = "user",
    wait: bool = False,
    name: str = "log",
    root: str | os.PathLike[str] | None = None,
    **fields: Any,
) -> dict[str, Any] | None:
    """Log ``msg`` to the logger over ikos IPC, from any process of the instance.

    ``program`` defaults to this program's name. Without ``wait`` it is a
    tell (returns None once the logger's mailbox has it); with ``wait`` an
    ask, returning the logger's reply (``{"ok": True, "seq": N}``, or
    ``{"ok": False, "error": ...}`` for a bad field). ``fields`` are the
    other keys of a ``log`` request (``pid``, ``host``, ``msgid``, ``time``, ``sd``).

    Example::

        from examples.system import log
        log.send("disk almost full", level="warning", program="diskwatch")
    """
    request = {
        "op": "log",
        "msg": msg,
        "level": level,
        "facility": facility,
        "program": program or os.path.basename(sys.argv[0] or "python")[:48] or "python",
        **fields,
    }
    ref: ikos.ActorRef[Any] = ikos.ActorRef(name, root=root)
    if wait:
        reply: dict[str, Any] = ref.ask(request, timeout=TIMEOUT)
        return reply
    ref.tell(request)
    return None


#: Python logging levels to syslog levels (a level between two takes the lower one's).
_PY_LEVELS = (
    (logging.CRITICAL, "crit"),
    (logging.ERROR, "err"),
    (logging.WARNING, "warning"),
    (logging.INFO, "info"),
)


class LogHandler(logging.Handler):
    """A :mod:`logging` handler that sends each record to the logger over ikos IPC.

    For the daemons of the instance: ``logging.getLogger().addHandler(LogHandler())``
    and their ``log.warning(...)`` lines become records of program ``program``
    (default: the logger's name, ``examples.system.auth`` say) with the pid
    and the level mapped (CRITICAL crit, ERROR err, WARNING warning, INFO
    info, below debug). Each record is a tell: it waits only if the
    logger's mailbox is full, and a logger that is down makes ``emit`` fail
    through :meth:`logging.Handler.handleError` (one line on stderr), never
    raise into the caller.
    """

    def __init__(
        self,
        program: str | None = None,
        *,
        facility: str = "daemon",
        name: str = "log",
        root: str | os.PathLike[str] | None = None,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.program = program
        self.facility = facility
        self.ref: ikos.ActorRef[Any] = ikos.ActorRef(name, root=root)
        self._emitting = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._emitting, "active", False):
            return  # a record logged by the tell itself (ikos's own logging): not sent, no loop
        self._emitting.active = True
        try:
            level = next((name for n, name in _PY_LEVELS if record.levelno >= n), "debug")
            self.ref.tell(
                {
                    "op": "log",
                    "msg": self.format(record)[:MAX_HANDLER_MESSAGE],
                    "level": level,
                    "facility": self.facility,
                    "program": (self.program or record.name)[:48],
                    "pid": str(record.process or os.getpid()),
                    "time": record.created,
                }
            )
        except Exception:
            self.handleError(record)
        finally:
            self._emitting.active = False


#: The longest message :class:`LogHandler` sends (the logger's default max_message).
MAX_HANDLER_MESSAGE = 64 * 1024


def query(
    *, name: str = "log", root: str | os.PathLike[str] | None = None, **conditions: Any
) -> list[dict[str, Any]]:
    """The records matching ``conditions`` (``since``, ``until``, ``program``, ``level``,
    ``facility``, ``host``, ``uid``, ``grep``, ``limit``; ``token`` when the logger
    has a ``query_permission``), oldest first.

    Raises :class:`LogInputError` with the logger's message for a bad condition.
    """
    ref: ikos.ActorRef[Any] = ikos.ActorRef(name, root=root)
    reply = ref.ask({"op": "query", **conditions}, timeout=TIMEOUT)
    if not reply.get("ok"):
        raise LogInputError(reply.get("error", "query failed"))
    records: list[dict[str, Any]] = reply["records"]
    return records
