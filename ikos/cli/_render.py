"""Human-readable output of ikosctl: status blocks, tables and the tree.

Every function here is pure: it takes the protocol's JSON objects (as
``docs/protocol.md`` describes them), a :class:`Style` and, where time
matters, ``now``, and returns text. ikosctl decides what to print and where;
the tests check the text without a terminal or a clock.

Design: decoration follows the output, not the user's wishes alone: colours
and the ``●`` bullet only on a terminal and without ``NO_COLOR``
(https://no-color.org), box-drawing characters only where the output
encoding can carry them, and tables (aligned, with a header) only on a
terminal: elsewhere a table is tab-separated rows without a header, with
fixed columns, which ``cut`` and ``awk`` read reliably. Everything that
comes from the server is stripped of control characters (tabs included)
before it is shown, so a daemon's description cannot move the cursor,
recolour the terminal or shift a column.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO, TypeGuard

__all__ = [
    "LIST_COLUMNS",
    "TOP_COLUMNS",
    "Style",
    "format_bytes",
    "format_time",
    "humanize_duration",
    "render_list",
    "render_mapping",
    "render_service",
    "render_services",
    "render_status",
    "render_top",
    "render_tree",
]

Status = Mapping[str, Any]

_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_STATE_COLOURS = {
    "running": "\x1b[32m",  # green
    "starting": "\x1b[33m",  # yellow
    "stopping": "\x1b[33m",
    "backoff": "\x1b[33m",
    "failed": "\x1b[31m",  # red
    "stopped": "\x1b[90m",  # grey
}
#: A service's health drawn in the colour of the daemon state that means the same.
_HEALTH_AS_STATE = {
    "passing": "running",
    "warning": "backoff",
    "critical": "failed",
    "unknown": "stopped",
}
#: The columns of ``ikosctl list``, in order (the header on a terminal).
LIST_COLUMNS = ("NAME", "KIND", "STATE", "PID", "RESTARTS", "UPTIME", "SUPERVISOR")
#: The columns of ``ikosctl top``, in order.
TOP_COLUMNS = (
    "NAME",
    "STATE",
    "PID",
    "CPU%",
    "CPU",
    "RSS",
    "USS",
    "FDS",
    "THR",
    "PROC",
    "RESTARTS",
)
_UNICODE_PROBE = "●├─│└"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Style:
    """How decorated the output may be.

    ``color``: ANSI colours and the ``●`` bullet (a terminal, no ``NO_COLOR``);
    ``unicode``: box-drawing characters (the output encoding can carry them);
    ``table``: aligned columns under a header (a terminal), else
    tab-separated rows with fixed columns and no header.
    """

    color: bool = False
    unicode: bool = True
    table: bool = True

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        """The style that suits ``stream`` in the current environment."""
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            _UNICODE_PROBE.encode(encoding)
            unicode = True
        except (LookupError, UnicodeError):
            unicode = False
        return cls(color=tty and not os.environ.get("NO_COLOR"), unicode=unicode, table=tty)

    def state(self, state: str, text: str | None = None) -> str:
        """``text`` (default ``state``) in the colour of ``state``."""
        text = state if text is None else text
        colour = _STATE_COLOURS.get(state)
        return f"{colour}{text}{_RESET}" if self.color and colour else text

    def bold(self, text: str) -> str:
        """``text`` in bold on a terminal."""
        return f"{_BOLD}{text}{_RESET}" if self.color else text


def humanize_duration(seconds: float) -> str:
    """A duration in its two largest units, rounded down.

    >>> [humanize_duration(s) for s in (3, 125, 3720, 273600)]
    ['3s', '2m 5s', '1h 2m', '3d 4h']
    """
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def format_time(timestamp: float) -> str:
    """A Unix time as local ISO 8601 to the second, e.g. ``2025-11-26T05:20:00+01:00``."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def render_status(statuses: Sequence[Status], style: Style, now: float) -> str:
    """Status blocks in the manner of ``systemctl status``, one per daemon.

    ::

        ● echo - answers pings
                Kind: actor (examples.demo:Echo)
               State: running (pid 1234) since 2025-11-26T05:20:00+01:00; 12s ago
             Restart: permanent
            Restarts: 2
          Supervisor: root
           Last exit: killed by SIGKILL at 2025-11-26T05:19:59+01:00
    """
    return "\n\n".join(_status_block(status, style, now) for status in statuses) + (
        "\n" if statuses else ""
    )


def _status_block(status: Status, style: Style, now: float) -> str:
    name = _text(status.get("name"))
    state = _text(status.get("state") or "unknown")
    description = _text(status.get("description") or "")
    head = style.bold(name) + (f" - {description}" if description else "")
    if style.color and style.unicode:
        head = style.state(state, "●") + " " + head
    lines = [head]

    def field(label: str, value: str) -> None:
        lines.append(f"{label:>12}: {value}")

    kind = _text(status.get("kind") or "-")
    if kind == "supervisor":
        details = [_text(status.get("strategy") or "")]
        limit, within = status.get("max_restarts"), status.get("within")
        if limit is not None and within is not None:
            noun = "restart" if limit == 1 else "restarts"
            details.append(f"at most {_text(limit)} {noun} in {_number(within)}s")
        field("Kind", kind + _parenthesised(", ".join(d for d in details if d)))
    else:
        field("Kind", kind + _parenthesised(_text(status.get("target") or "")))
    field("State", _state_line(status, state, style, now))
    if status.get("restart"):
        field("Restart", _text(status["restart"]))
    field("Restarts", _text(status.get("restarts", 0)))
    parent = status.get("supervisor")
    field("Supervisor", _text(parent) if parent else "none (root of the tree)")
    if status.get("placement") == "ray":
        field("Node", _node_cell(status) + " (Ray)")
    children = status.get("children")
    if isinstance(children, list) and children:
        names = [_text(c.get("name") if isinstance(c, Mapping) else c) for c in children]
        field("Children", ", ".join(names))
    last_exit = status.get("last_exit")
    if isinstance(last_exit, Mapping):
        field("Last exit", _exit_line(last_exit))
    services = status.get("services")
    if isinstance(services, list) and services:
        field("Services", ", ".join(_text(name) for name in services))
    health = status.get("health")
    if isinstance(health, str):
        field("Health", _health_line(health, status.get("health_checks"), style))
    usage = status.get("usage")
    if isinstance(usage, Mapping):
        field("CPU", _cpu_line(usage))
        field("Memory", _memory_line(usage))
        field("Tasks", _tasks_line(usage))
    if status.get("redacted"):
        field("Details", "hidden (shown to root, the owner and the reader group)")
    return "\n".join(lines)


def _cpu_line(usage: Mapping[str, Any]) -> str:
    text = f"{_seconds(usage.get('cpu_seconds'))}s"
    percent = usage.get("cpu_percent")
    if isinstance(percent, int | float):
        text += f" ({percent:.1f}% over the last interval)"
    return text


def _memory_line(usage: Mapping[str, Any]) -> str:
    text = f"{format_bytes(usage.get('rss_bytes'))} resident"
    if usage.get("uss_bytes") is not None:
        text += f", {format_bytes(usage.get('uss_bytes'))} unique"
    return text


def _tasks_line(usage: Mapping[str, Any]) -> str:
    processes, threads, fds = (usage.get(k) for k in ("processes", "threads", "open_fds"))
    return (
        f"{_text(processes)} {'process' if processes == 1 else 'processes'}, "
        f"{_text(threads)} {'thread' if threads == 1 else 'threads'}, "
        f"{_text(fds)} open {'file' if fds == 1 else 'files'}"
    )


def _seconds(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


def format_bytes(value: Any) -> str:
    """A byte count in binary units, as ``top`` shows memory.

    >>> [format_bytes(v) for v in (512, 2048, 67108864, None)]
    ['512B', '2.0K', '64.0M', '-']
    """
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    amount = float(value)
    for unit in ("B", "K", "M", "G", "T"):
        if amount < 1024 or unit == "T":
            return f"{int(amount)}B" if unit == "B" else f"{amount:.1f}{unit}"
        amount /= 1024
    return "-"  # not reached


def render_top(rows: Sequence[Status], style: Style) -> str:
    """The table of ``ikosctl top``, one row per daemon (see :data:`TOP_COLUMNS`).

    On a terminal figures are rounded for people; without ``style.table``
    they are raw numbers (seconds, bytes) and ``-`` where unknown.
    """
    out: list[list[tuple[str, str | None]]] = []
    for row in rows:
        usage = row.get("usage")
        u: Mapping[str, Any] = usage if isinstance(usage, Mapping) else {}
        state = _text(row.get("state") or "unknown")

        def raw(key: str, u: Mapping[str, Any] = u) -> str:
            value = u.get(key)
            return "-" if value is None else _text(value)

        percent = u.get("cpu_percent")
        if style.table:
            cpu_pct = f"{percent:.1f}" if isinstance(percent, int | float) else "-"
            cells = [cpu_pct, _seconds(u.get("cpu_seconds")) if u else "-"]
            cells += [format_bytes(u.get("rss_bytes")), format_bytes(u.get("uss_bytes"))]
        else:
            cells = [raw("cpu_percent"), raw("cpu_seconds"), raw("rss_bytes"), raw("uss_bytes")]
        pid = row.get("pid")
        out.append(
            [
                (_text(row.get("name")), None),
                (state, state),
                (_text(pid) if pid is not None else "-", None),
                *((c, None) for c in cells),
                (raw("open_fds"), None),
                (raw("threads"), None),
                (raw("processes"), None),
                (_text(row.get("restarts", 0)), None),
            ]
        )
    return _table(*_with_nodes(TOP_COLUMNS, rows, out), style)


def _health_line(health: str, checks: Any, style: Style) -> str:
    text = style.state(_HEALTH_AS_STATE.get(health, ""), _text(health))
    if isinstance(checks, list):
        parts = [
            f"{_text(c.get('check'))}: {_text(c.get('status'))}"
            for c in checks
            if isinstance(c, Mapping)
        ]
        if parts:
            text += " (" + "; ".join(parts) + ")"
    return text


#: How a daemon that ikosd starts at its first connection shows while it waits for it.
WAITING_NOTE = "waiting for its first connection"


def _state_line(status: Status, state: str, style: Style, now: float) -> str:
    text = style.state(state)
    pid = status.get("pid")
    if pid is not None:
        text += f" (pid {_text(pid)})"
    if status.get("activation") == "waiting":  # socket-activated: ikosd holds its socket
        text += f" ({WAITING_NOTE})"
    started = status.get("started_at")
    if isinstance(started, int | float) and state in ("running", "starting", "stopping"):
        text += f" since {format_time(started)}; {humanize_duration(_uptime(status, now))} ago"
    return text


def _exit_line(last_exit: Mapping[str, Any]) -> str:
    reason = last_exit.get("reason")
    if not reason:
        if last_exit.get("signal") is not None:
            reason = f"killed by signal {_text(last_exit['signal'])}"
        elif last_exit.get("code") is not None:
            reason = f"exited with status {_text(last_exit['code'])}"
        else:
            reason = "exited"
    text = _text(reason)
    at = last_exit.get("at")
    if isinstance(at, int | float):
        text += f" at {format_time(at)}"
    return text


def _uptime(status: Status, now: float) -> float:
    uptime = status.get("uptime_seconds")
    if isinstance(uptime, int | float):
        return float(uptime)
    started = status.get("started_at")
    return now - started if isinstance(started, int | float) else 0.0


def render_list(statuses: Sequence[Status], style: Style, now: float) -> str:
    """The table of ``ikosctl list``: NAME KIND STATE PID RESTARTS UPTIME SUPERVISOR.

    Without ``style.table``, UPTIME is a whole number of seconds.
    """
    rows: list[list[tuple[str, str | None]]] = []
    for status in statuses:
        state = _text(status.get("state") or "unknown")
        running = status.get("started_at") is not None or status.get("uptime_seconds") is not None
        uptime = _uptime(status, now)
        shown = humanize_duration(uptime) if style.table else str(int(max(uptime, 0)))
        rows.append(
            [
                (_text(status.get("name")), None),
                (_text(status.get("kind") or "-"), None),
                (state, state),
                (_text(status.get("pid") if status.get("pid") is not None else "-"), None),
                (_text(status.get("restarts", 0)), None),
                (shown if running else "-", None),
                (_text(status.get("supervisor") or "-"), None),
            ]
        )
    return _table(*_with_nodes(LIST_COLUMNS, statuses, rows), style)


def _node_cell(status: Status) -> str:
    """Where a Ray-placed actor runs: its node's address (and id), or ``-``."""
    node, node_id = status.get("node"), status.get("node_id")
    if not node:
        return "-"
    return _text(node) + (f" {_text(node_id)[:8]}" if node_id else "")


def _with_nodes(
    headers: Sequence[str], statuses: Sequence[Status], rows: list[list[tuple[str, str | None]]]
) -> tuple[Sequence[str], list[list[tuple[str, str | None]]]]:
    """A last column NODE when some daemon is placed on Ray (docs/scaling.md); a tree
    without placements keeps its columns as they were, for the scripts that cut them."""
    if not any(s.get("placement") == "ray" for s in statuses):
        return headers, rows
    for status, row in zip(statuses, rows, strict=True):
        row.append((_node_cell(status) if status.get("placement") == "ray" else "-", None))
    return (*headers, "NODE"), rows


def render_tree(root: Status, style: Style, *, deps: bool = False) -> str:
    """The supervision tree, one line per node: ``name [kind strategy] state pid``.

    ::

        root [supervisor one_for_one] running
        ├─ echo [actor] running 1234
        └─ workers [supervisor rest_for_one] running
           └─ w1 [exec] backoff
    """
    if style.unicode:
        branch, last, pipe, blank = "├─ ", "└─ ", "│  ", "   "
    else:
        branch, last, pipe, blank = "|- ", "`- ", "|  ", "   "
    lines: list[str] = []
    # An explicit stack rather than recursion: a deep tree cannot overflow it.
    stack: list[tuple[Status, str, str]] = [(root, "", "")]
    while stack:
        node, lead, child_lead = stack.pop()
        label = _tree_label(node, style)
        if deps:
            for key in ("requires", "after"):
                names = [_text(n) for n in node.get(key) or []]
                if names:
                    label += f" ({key} {', '.join(names)})"
        lines.append(lead + label)
        children = [c for c in node.get("children") or [] if isinstance(c, Mapping)]
        for index in reversed(range(len(children))):
            is_last = index == len(children) - 1
            stack.append(
                (
                    children[index],
                    child_lead + (last if is_last else branch),
                    child_lead + (blank if is_last else pipe),
                )
            )
    return "\n".join(lines) + "\n"


def _tree_label(node: Status, style: Style) -> str:
    kind = _text(node.get("kind") or "-")
    if node.get("strategy"):
        kind += " " + _text(node["strategy"])
    state = _text(node.get("state") or "unknown")
    text = f"{_text(node.get('name'))} [{kind}] {style.state(state)}"
    if node.get("activation") == "waiting":
        text += f" ({WAITING_NOTE})"
    if node.get("pid") is not None:
        text += f" {_text(node['pid'])}"
    if node.get("placement") == "ray":
        text += f" @{_node_cell(node)}"
    return text


#: Columns of ``ikosctl services``, in order; a column shows when any service has the key.
_SERVICE_COLUMNS = (
    "name",
    "type",
    "version",
    "endpoint",
    "capabilities",
    "pid",
    "owner",
    "active",
    "health",
)


def render_services(services: Sequence[Mapping[str, Any]], style: Style) -> str:
    """The table of ``ikosctl services``: NAME TYPE VERSION ENDPOINT ... ACTIVE HEALTH.

    Only the columns that some service has are shown; ``active`` and
    ``health`` are coloured on a terminal (inactive grey, critical red...).

    ::

        NAME      TYPE  VERSION  ENDPOINT          CAPABILITIES  PID   OWNER  ACTIVE  HEALTH
        net/dhcp  dhcp  4.4      udp://0.0.0.0:67  dhcpv4        1234  net    yes     passing
    """
    if style.table:
        keys = [k for k in _SERVICE_COLUMNS if any(k in s for s in services)]
    else:
        keys = list(_SERVICE_COLUMNS)  # fixed columns: a script must not guess
    rows: list[list[tuple[str, str | None]]] = []
    for service in services:
        row: list[tuple[str, str | None]] = []
        for key in keys:
            value = service.get(key)
            colour: str | None = None
            if key == "active" and isinstance(value, bool):
                colour = "running" if value else "stopped"
            elif key == "health" and isinstance(value, str):
                colour = _HEALTH_AS_STATE.get(value)
            row.append((_cell(value), colour))
        rows.append(row)
    return _table([k.upper() for k in keys], rows, style)


def render_service(service: Mapping[str, Any]) -> str:
    """One service as ``key: value`` lines (``ikosctl discover NAME``); times as dates."""
    shown = dict(service)
    started = shown.get("start_time")
    if isinstance(started, int | float) and not isinstance(started, bool):
        shown["start_time"] = format_time(started)
    metadata = shown.get("metadata")
    if isinstance(metadata, Mapping) and not metadata:
        del shown["metadata"]
    return render_mapping(shown)


def render_mapping(mapping: Mapping[str, Any]) -> str:
    """``key: value`` lines, keys aligned (``ikosctl discover``)."""
    if not mapping:
        return ""
    width = max(len(_text(k)) for k in mapping) + 1
    return "".join(f"{_text(k) + ':':<{width}} {_cell(v)}\n" for k, v in mapping.items())


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[tuple[str, str | None]]], style: Style
) -> str:
    """Columns two spaces apart; each cell is (text, state to colour it by, or None).

    Nothing for no rows. Without ``style.table``: tab-separated rows, no header.
    """
    if not rows:
        return ""
    if not style.table:
        return "".join("\t".join(text for text, _ in row) + "\n" for row in rows)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        cells = []
        for i, (text, state) in enumerate(row):
            padded = text if i == len(row) - 1 else text.ljust(widths[i])
            # Pad before colouring: escape codes take no columns.
            cells.append(style.state(state, padded) if state else padded)
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, Mapping):
        return _text(json.dumps(value, ensure_ascii=False))
    return _text(value)


def _text(value: Any) -> str:
    """``value`` as one line of text with no control characters."""
    return _CONTROL.sub("?", str(value))


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else _text(value)


def _parenthesised(text: str) -> str:
    return f" ({text})" if text else ""


_QUEUE_COLUMNS = ("name", "ready", "delayed", "leased", "dead", "puts", "acks", "bytes")


def render_queues(queues: Sequence[Mapping[str, Any]], style: Style) -> str:
    """The table of ``ikosctl queue list``: NAME READY DELAYED LEASED DEAD PUTS ACKS BYTES.

    Fixed columns in a pipe, as for ``services``; ``-`` where the broker gave none.

    ::

        NAME  READY  DELAYED  LEASED  DEAD  PUTS  ACKS  BYTES
        jobs  12     0        2       1     15    2     4096
    """
    rows = [[(_cell(q.get(key)), None) for key in _QUEUE_COLUMNS] for q in queues]
    return _table([k.upper() for k in _QUEUE_COLUMNS], rows, style)


#: Severities shown in the colour of the daemon state they are as bad as.
_SEVERITY_STATES = {"critical": "failed", "warning": "backoff"}


def render_alerts(alerts: Sequence[Mapping[str, Any]], style: Style, now: float) -> str:
    """The table of ``ikosctl alerts``: ALERT DAEMON SEVERITY VALUE THRESHOLD SINCE MESSAGE.

    In a pipe: tab-separated, SINCE as Unix seconds, VALUE and THRESHOLD as
    numbers; on a terminal: sizes and percentages, and how long ago.

    ::

        ALERT   DAEMON  SEVERITY  VALUE   THRESHOLD  SINCE  MESSAGE
        memory  web     warning   1.2GiB  1.0GiB     3m 2s  web memory (RSS) at 1.2GiB, ...
    """
    rows = []
    for a in alerts:
        kind = _text(a.get("alert", ""))
        if style.table:
            value, threshold = (
                _alert_value(kind, a.get("value")),
                _alert_value(kind, a.get("threshold")),
            )
            since = a.get("since")
            ago = humanize_duration(max(0.0, now - since)) if _is_seconds(since) else "-"
        else:
            value, threshold = _cell_number(a.get("value")), _cell_number(a.get("threshold"))
            ago = _cell_number(a.get("since"))
        severity = _text(a.get("severity", ""))
        rows.append(
            [
                (kind, None),
                (_cell(a.get("daemon")), None),
                (severity, _SEVERITY_STATES.get(severity)),
                (value, None),
                (threshold, None),
                (ago, None),
                (_cell(a.get("message")), None),
            ]
        )
    headers = ["ALERT", "DAEMON", "SEVERITY", "VALUE", "THRESHOLD", "SINCE", "MESSAGE"]
    return _table(headers, rows, style)


def render_event(event: Mapping[str, Any]) -> str:
    """One line of ``ikosctl events``: time, then a transition or an alert fired/resolved.

    ::

        2026-12-05T20:00:01+00:00 web running -> stopped (stopped by request)
        2026-12-05T20:00:03+00:00 alert fired memory web warning: web memory (RSS) at ...
    """
    at = event.get("time")
    stamp = format_time(at) if _is_seconds(at) else "-"
    kind = event.get("type")
    if kind == "transition":
        what = (
            f"{_text(event.get('daemon'))} {_text(event.get('old'))} -> "
            f"{_text(event.get('new'))}{_parenthesised(_text(event.get('why', '')))}"
        )
    elif kind == "alert":
        what = (
            f"alert {_text(event.get('event'))} {_text(event.get('alert'))} "
            f"{_text(event.get('daemon'))} {_text(event.get('severity'))}: "
            f"{_text(event.get('message'))}"
        )
    elif kind == "dropped":
        what = f"({_text(event.get('count'))} events dropped: this reader was too slow)"
    else:
        what = _text(json.dumps(event, ensure_ascii=False))
    return f"{stamp} {what}\n"


def _is_seconds(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell_number(value: Any) -> str:
    """A number for a script to read: exact (``%g`` made 21045248 bytes 2.10452e+07)."""
    if not _is_seconds(value):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _alert_value(kind: str, value: Any) -> str:
    if not _is_seconds(value):
        return "-"
    if kind == "memory":
        return format_bytes(value)
    if kind == "cpu":
        return f"{value * 100:.0f}%"
    return _number(value)
