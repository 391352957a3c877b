"""Syslog records: what one is, how RFC 3164 and RFC 5424 lines parse, how RFC 5424 is written.

Pure functions over bytes and values, no sockets: the daemon
(:mod:`examples.system.log._daemon`) feeds them datagrams and IPC requests.
A line that does not parse is *kept*, not dropped: it becomes a record of
format ``raw`` whose ``error`` says what was wrong and where, with the whole
line as its message (a log collector that silently loses what it cannot read
hides exactly the lines someone needs; RFC 3164 section 4.3.3 asks a relay
to do the same with a line that has no PRI, as ``user.notice``). Parsing
never raises on any input: every failure is a value.

RFC 3164 lines come in the shapes ``logger(1)`` writes them:
``<PRI>Mmm dd hh:mm:ss host tag[pid]: msg`` (``--rfc3164``) and, on a local
socket without ``--rfc...``, the same without the host. A token after the
timestamp that ends in ``:`` or carries ``[pid]:`` is the tag (no host
given), as rsyslog decides; anything else is the host.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

#: Severity names by number (RFC 5424 table 2), as syslog.conf spells them.
LEVELS: tuple[str, ...] = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")

#: Facility names by number (RFC 5424 table 1); 13-15 as Linux's syslog.h.
FACILITIES: tuple[str, ...] = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
    "uucp", "cron", "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip

#: Other spellings accepted for a level (Python's logging names among them).
LEVEL_ALIASES: dict[str, str] = {
    "emergency": "emerg", "panic": "emerg", "critical": "crit", "error": "err",
    "warn": "warning", "information": "info", "informational": "info",
}  # fmt: skip

#: RFC 5424 section 6 limits of the header fields.
HOST_MAX, APP_MAX, PROCID_MAX, MSGID_MAX, SD_NAME_MAX = 255, 48, 128, 32, 32

_BOM = "\ufeff"
_PRI = re.compile(r"<(\d{1,3})>")
_RFC3164_TS = re.compile(
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([ 0-3]?\d) (\d\d):(\d\d):(\d\d) "
)
_MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
# a tag: up to 48 printable characters but space, ':' and '[', an optional [pid], then ':'
_TAG = re.compile(r"([^\s:\[\]]{1,48})(?:\[([^\]\s]{0,128})\])?:(?: |$)")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")
_SD_NAME = re.compile(r"[!#-~]{1,32}")  # printable ASCII but space, '=', ']', '"'
_SD_NAME_BAD = set('= ]"')


class Cred(NamedTuple):
    """A datagram's sender as the kernel saw it (``SCM_CREDENTIALS``)."""

    pid: int
    uid: int
    gid: int


class LogInputError(ValueError):
    """A request, a rule or an option is not what the logger expects; the message says where."""


@dataclass(frozen=True, slots=True)
class Record:
    """One log record, as stored, queried and forwarded.

    ``time`` is when the sender says the event happened (``received`` when it
    said nothing or said it badly); ``received`` when the logger got it;
    ``seq`` its place in this logger's files (increasing across restarts).
    ``format`` is ``rfc5424``, ``rfc3164``, ``ipc`` or ``raw`` (unparsed; then
    ``error`` says why). ``sd`` is RFC 5424 structured data: ``{id: {param: value}}``.
    ``cred`` is the sending process of a datagram as the kernel vouches for it
    (``pid``, ``uid``, ``gid``), whatever the line claims; None for IPC records.
    """

    time: float
    received: float
    facility: str
    level: str
    msg: str
    program: str | None = None
    pid: str | None = None
    host: str | None = None
    msgid: str | None = None
    sd: dict[str, dict[str, str]] = field(default_factory=dict)
    format: str = "ipc"
    source: str = "ipc"
    error: str | None = None
    cred: Cred | None = None
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """The record as JSON types (the line in the files, an item of a query's reply)."""
        data: dict[str, Any] = {
            "seq": self.seq,
            "time": self.time,
            "received": self.received,
            "facility": self.facility,
            "level": self.level,
            "host": self.host,
            "program": self.program,
            "pid": self.pid,
            "msgid": self.msgid,
            "sd": self.sd,
            "msg": self.msg,
            "format": self.format,
            "source": self.source,
            "cred": None if self.cred is None else self.cred._asdict(),
        }
        if self.error is not None:
            data["error"] = self.error
        return data

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """A record read back from a file line; :class:`LogInputError` if it is not one."""
        if not isinstance(data, dict):
            raise LogInputError("a record is a JSON object")
        try:
            return cls(
                time=float(data["time"]),
                received=float(data["received"]),
                facility=str(data["facility"]),
                level=str(data["level"]),
                msg=str(data["msg"]),
                program=_opt_str(data.get("program")),
                pid=_opt_str(data.get("pid")),
                host=_opt_str(data.get("host")),
                msgid=_opt_str(data.get("msgid")),
                sd=sd if isinstance(sd := data.get("sd"), dict) else {},
                format=str(data.get("format", "raw")),
                source=str(data.get("source", "")),
                error=_opt_str(data.get("error")),
                cred=Cred(**cred) if isinstance(cred := data.get("cred"), dict) else None,
                seq=int(data.get("seq", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LogInputError(f"not a record: {exc!r}") from None

    def numbered(self, seq: int) -> Record:
        """This record with its place in the files."""
        return replace(self, seq=seq)

    @property
    def severity(self) -> int:
        """The level as RFC 5424's number (0 emerg ... 7 debug)."""
        return LEVELS.index(self.level)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def level_number(value: Any, where: str) -> int:
    """A level given by name (any case, aliases too) or number 0-7, as its number."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(LEVELS):
            return value
    elif isinstance(value, str):
        name = value.strip().lower()
        name = LEVEL_ALIASES.get(name, name)
        if name in LEVELS:
            return LEVELS.index(name)
    raise LogInputError(f"{where}: expected a level ({', '.join(LEVELS)} or 0-7), got {value!r}")


def facility_name(value: Any, where: str) -> str:
    """A facility given by name or number 0-23, as its name."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(FACILITIES):
            return FACILITIES[value]
    elif isinstance(value, str) and value.strip().lower() in FACILITIES:
        return value.strip().lower()
    raise LogInputError(
        f"{where}: expected a facility ({', '.join(FACILITIES)} or 0-23), got {value!r}"
    )


# -- parsing -------------------------------------------------------------------


def parse_datagram(
    data: bytes, received: float, source: str = "syslog", cred: Cred | None = None
) -> Record:
    """One syslog line (RFC 5424, RFC 3164, or neither: a ``raw`` record with ``error``).

    Never raises. Trailing newlines and NULs are dropped (``logger`` on a
    stream socket and some C libraries add them); bytes that are not UTF-8
    are replaced and said so. ``cred`` is the sender as the kernel saw it
    (``SCM_CREDENTIALS``), kept beside what the line claims.

    Example::

        >>> r = parse_datagram(b"<13>Dec  6 01:35:01 vm root: hi", 0.0)
        >>> (r.format, r.facility, r.level, r.host, r.program, r.msg)
        ('rfc3164', 'user', 'notice', 'vm', 'root', 'hi')
    """
    data = data.rstrip(b"\n\r\0")
    try:
        text, note = data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", "replace")
        note = f"not UTF-8 at byte {exc.start} (bad bytes replaced by U+FFFD); "
    record = _parse_line(text, received)
    error = note + (record.error or "") if note or record.error is not None else None
    return replace(record, source=source, cred=cred, error=error)


def _parse_line(text: str, received: float) -> Record:
    m = _PRI.match(text)
    if m is None:
        return _raw(text, received, "no <PRI> at the start (kept as user.notice)")
    pri = int(m.group(1))
    if pri > 191 or (len(m.group(1)) > 1 and m.group(1)[0] == "0"):
        return _raw(text, received, f"PRI <{m.group(1)}> is not a number 0-191")
    facility, level = FACILITIES[pri >> 3], LEVELS[pri & 7]
    rest = text[m.end() :]
    try:
        if rest.startswith("1 "):
            return _parse_5424(rest[2:], received, facility, level)
        return _parse_3164(rest, received, facility, level)
    except LogInputError as exc:
        return _raw(text, received, str(exc), facility, level)


def _raw(
    text: str, received: float, error: str, facility: str = "user", level: str = "notice"
) -> Record:
    return Record(
        time=received,
        received=received,
        facility=facility,
        level=level,
        msg=text,
        format="raw",
        error=error,
    )


def _parse_5424(rest: str, received: float, facility: str, level: str) -> Record:
    # HEADER after "VERSION SP": TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
    parts = rest.split(" ", 5)
    if len(parts) < 6:
        raise LogInputError(
            "RFC 5424: the header has fewer than its 6 fields after the version "
            "(TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA)"
        )
    stamp, host, app, procid, msgid, tail = parts
    when = received if stamp == "-" else _rfc3339(stamp)
    for name, value, limit in (
        ("HOSTNAME", host, HOST_MAX),
        ("APP-NAME", app, APP_MAX),
        ("PROCID", procid, PROCID_MAX),
        ("MSGID", msgid, MSGID_MAX),
    ):
        if len(value) > limit or not value.isprintable() or not value.isascii():
            raise LogInputError(
                f"RFC 5424: {name} {value[:60]!r} is not 1-{limit} printable ASCII characters"
            )
    sd, msg = _structured_data(tail)
    if msg.startswith(_BOM):
        msg = msg[1:]
    return Record(
        time=when,
        received=received,
        facility=facility,
        level=level,
        msg=msg,
        host=_nil(host),
        program=_nil(app),
        pid=_nil(procid),
        msgid=_nil(msgid),
        sd=sd,
        format="rfc5424",
    )


def _nil(value: str) -> str | None:
    return None if value == "-" else value


def _rfc3339(stamp: str) -> float:
    if not _RFC3339.fullmatch(stamp):
        raise LogInputError(f"RFC 5424: TIMESTAMP {stamp[:40]!r} is not RFC 3339 or '-'")
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        raise LogInputError(f"RFC 5424: TIMESTAMP {stamp!r} is not a real date") from None


def _structured_data(tail: str) -> tuple[dict[str, dict[str, str]], str]:
    """RFC 5424 STRUCTURED-DATA at the start of ``tail``: ``(sd, the message after it)``."""
    if tail == "-" or tail.startswith("- "):
        return {}, tail[2:]
    if not tail.startswith("["):
        raise LogInputError(f"RFC 5424: STRUCTURED-DATA is neither '-' nor '[...]': {tail[:40]!r}")
    sd: dict[str, dict[str, str]] = {}
    i, n = 0, len(tail)
    while i < n and tail[i] == "[":
        i += 1
        j = i
        while j < n and tail[j] not in " ]":
            j += 1
        sd_id = tail[i:j]
        _check_sd_name(sd_id, "SD-ID")
        params: dict[str, str] = {}
        i = j
        while i < n and tail[i] == " ":
            i += 1
            eq = tail.find("=", i)
            if eq < 0 or eq + 1 >= n or tail[eq + 1] != '"':
                raise LogInputError(f'RFC 5424: SD-PARAM in [{sd_id}] is not NAME="VALUE"')
            name = tail[i:eq]
            _check_sd_name(name, f"PARAM-NAME in [{sd_id}]")
            value, i = _sd_value(tail, eq + 2, sd_id)
            params[name] = value
        if i >= n or tail[i] != "]":
            raise LogInputError(f"RFC 5424: SD-ELEMENT [{sd_id} ... has no closing ']'")
        i += 1
        sd.setdefault(sd_id, {}).update(params)
    if i < n and tail[i] != " ":
        raise LogInputError("RFC 5424: no space between STRUCTURED-DATA and MSG")
    return sd, tail[i + 1 :]


def _check_sd_name(name: str, what: str) -> None:
    if not name or len(name) > SD_NAME_MAX or not name.isascii() or _SD_NAME_BAD & set(name):
        raise LogInputError(f"RFC 5424: {what} {name[:40]!r} is not 1-32 printable ASCII")
    if not _SD_NAME.fullmatch(name):
        raise LogInputError(f"RFC 5424: {what} {name[:40]!r} is not 1-32 printable ASCII")


def _sd_value(tail: str, i: int, sd_id: str) -> tuple[str, int]:
    """A PARAM-VALUE from after its opening quote: ``(value, index after its closing quote)``."""
    out: list[str] = []
    n = len(tail)
    while i < n:
        c = tail[i]
        if c == "\\" and i + 1 < n and tail[i + 1] in '"\\]':
            out.append(tail[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise LogInputError(f"RFC 5424: a PARAM-VALUE in [{sd_id}] has no closing quote")


def _parse_3164(rest: str, received: float, facility: str, level: str) -> Record:
    when = received
    host: str | None = None
    m = _RFC3164_TS.match(rest)
    if m is not None:
        when = _rfc3164_time(m, received)
        rest = rest[m.end() :]
        first, _, after = rest.partition(" ")
        # "host tag: msg" or, as logger(1) writes on a local socket, "tag: msg"
        if first and _TAG.match(first + " ") is None and _TAG.match(first) is None:
            host, rest = first, after
    program = pid = None
    t = _TAG.match(rest)
    if t is not None:
        program, pid = t.group(1), t.group(2)
        rest = rest[t.end() :]
    return Record(
        time=when,
        received=received,
        facility=facility,
        level=level,
        msg=rest,
        host=host,
        program=program,
        pid=pid,
        format="rfc3164",
    )


def _rfc3164_time(m: re.Match[str], received: float) -> float:
    """``Mmm dd hh:mm:ss`` in local time, in the year that puts it nearest before ``received``."""
    month, day = _MONTHS[m.group(1)], int(m.group(2))
    hour, minute, second = int(m.group(3)), int(m.group(4)), int(m.group(5))
    year = time.localtime(received).tm_year
    try:
        datetime(year, month, day, hour, minute, second)  # checks the day and the clock
    except ValueError:
        raise LogInputError(f"RFC 3164: TIMESTAMP {m.group(0).strip()!r} is not a real time")
    when = time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
    if when > received + 86400:  # "Dec 31" received on Jan 1: last year's
        when = time.mktime((year - 1, month, day, hour, minute, second, 0, 0, -1))
    return when


# -- writing RFC 5424 ------------------------------------------------------------


def format_5424(record: Record, default_host: str) -> bytes:
    """``record`` as one RFC 5424 line (UTF-8, a BOM before a message that is not ASCII).

    Header fields are made valid rather than refused: characters RFC 5424
    does not allow there become ``_`` and each is cut to its length limit.

    Example::

        >>> r = Record(time=0.0, received=0.0, facility="daemon", level="err", msg="x",
        ...            program="app", pid="42")
        >>> format_5424(r, "h")
        b'<27>1 1970-01-01T00:00:00.000000Z h app 42 - - x'
    """
    pri = FACILITIES.index(record.facility) * 8 + record.severity
    stamp = datetime.fromtimestamp(record.time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = [
        _header(record.host or default_host, HOST_MAX),
        _header(record.program, APP_MAX),
        _header(record.pid, PROCID_MAX),
        _header(record.msgid, MSGID_MAX),
    ]
    sd = "".join(
        "[" + _sd_name(sd_id) + "".join(
            f' {_sd_name(k)}="{_sd_escape(v)}"' for k, v in params.items()
        ) + "]"
        for sd_id, params in record.sd.items()
    ) or "-"  # fmt: skip
    msg = record.msg if record.msg.isascii() else _BOM + record.msg
    line = f"<{pri}>1 {stamp} {' '.join(fields)} {sd} {msg}"
    return line.encode("utf-8", "replace")


def _header(value: str | None, limit: int) -> str:
    if not value:
        return "-"
    clean = "".join(c if "!" <= c <= "~" else "_" for c in value)
    return clean[:limit]


def _sd_name(name: str) -> str:
    return "".join("_" if c in _SD_NAME_BAD or not "!" <= c <= "~" else c for c in name)[:32] or "_"


def _sd_escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def octet_counted(line: bytes) -> bytes:
    """RFC 6587 octet-counting framing for a TCP stream: ``LEN SP LINE``."""
    return b"%d %s" % (len(line), line)
