"""The logger daemon: an async ikos actor that owns a syslog socket, files and forwarders.

It is an *async* actor so that the syslog datagram socket is just one more
reader on the actor's own event loop (``loop.add_reader``): a datagram is
parsed, filtered, written and forwarded on the same thread, between
messages, as the IPC requests are, so nothing needs a lock and no queue
stands between the socket and the files. (Rejected: a thread reading the
socket and telling each datagram to the actor, which pays a pickle and a
mailbox round trip per line and doubles the places a flood can pile up;
here a flood waits in the kernel's socket buffer, whose size bounds it,
and the kernel drops what does not fit.) The TCP forwarders are tasks on
the same loop.

Every input is bounded: a datagram longer than ``max_datagram`` bytes is
dropped and counted (its real length is read with ``MSG_TRUNC``, so nothing
of it is kept), an IPC record's message longer than ``max_message``
characters is refused with an error naming the limit, the in-memory ring of
recent records holds at most ``ring_size`` records and ``ring_bytes`` bytes,
a TCP forwarder's queue ``forward_queue`` lines and ``forward_queue_bytes``
bytes, and the files ``keep_files`` rotated files of ``max_file_bytes``.
What was dropped is also said once a second at most, as
one record of the logger's own (program ``log``, facility ``syslog``) and one
line in its ikos log, never one per bad datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ikos
import ikos.ipc
import ikos.registry
from examples.system.log._forward import Forwarder, parse_target
from examples.system.log._rules import Filter, Query, check_names, newest_matches
from examples.system.log._store import RecentRecords, RecordFiles
from examples.system.log._syslog import (
    LEVELS,
    Cred,
    LogInputError,
    Record,
    facility_name,
    format_5424,
    level_number,
    parse_datagram,
)

#: The topic other processes may publish records to (payload: a ``log`` request's fields).
SUBMIT_TOPIC = "log.submit"
#: The topic the logger publishes kept records on, when at least ``publish_level``.
RECORD_TOPIC = "log.record"
#: The topic the logger publishes a rotation on (``{"file": path}``).
ROTATED_TOPIC = "log.rotated"

#: The most JSON a query's reply holds (under ikosd's 1 MiB control line, for ikosctl call).
REPLY_MAX_BYTES = 768 * 1024

#: Seconds a query waits for the auth daemon's answer about its token.
AUTH_TIMEOUT = 5.0

#: Seconds between the logger's housekeeping ticks (fsync, age rotation, drop notes).
TICK = 1.0

_LOG_KEYS = frozenset(
    {"op", "msg", "level", "facility", "program", "pid", "host", "msgid", "time", "sd"}
)


class _Tick:
    """The housekeeping timer's message (the object itself; nothing outside can send it)."""


_TICK = _Tick()


class Options:
    """The logger's options, checked: :class:`LogInputError` names the first bad one."""

    def __init__(
        self,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        min_level: str | int = "debug",
        rules: Sequence[Mapping[str, Any]] = (),
        max_file_bytes: int = 4 * 1024 * 1024,
        max_file_age: float | None = 24 * 3600.0,
        keep_files: int = 7,
        fsync_interval: float = 1.0,
        ring_size: int = 10_000,
        ring_bytes: int = 32 * 1024 * 1024,
        max_datagram: int = 64 * 1024,
        max_message: int = 64 * 1024,
        forward: Sequence[str] = (),
        forward_queue: int = 10_000,
        forward_queue_bytes: int = 16 * 1024 * 1024,
        publish_level: str | int | None = "warning",
        query_permission: str | None = None,
        auth_service: str = "auth",
    ) -> None:
        self.socket_path = _absolute(socket_path, "socket_path")
        self.directory = _absolute(directory, "directory")
        self.filter = Filter.from_options(min_level, rules)
        self.max_file_bytes = _int(max_file_bytes, "max_file_bytes", 256)
        self.max_file_age = (
            None if max_file_age is None else _number(max_file_age, "max_file_age", 0.001)
        )
        self.keep_files = _int(keep_files, "keep_files", 0)
        self.fsync_interval = _number(fsync_interval, "fsync_interval", 0.0)
        self.ring_size = _int(ring_size, "ring_size", 1)
        self.ring_bytes = _int(ring_bytes, "ring_bytes", 1024)
        self.max_datagram = _int(max_datagram, "max_datagram", 480)  # RFC 3164's minimum
        self.max_message = _int(max_message, "max_message", 1)
        self.forward = check_names(forward, "forward")
        for i, url in enumerate(self.forward):
            parse_target(url, f"forward[{i}]")
        self.forward_queue = _int(forward_queue, "forward_queue", 1)
        self.forward_queue_bytes = _int(forward_queue_bytes, "forward_queue_bytes", 1024)
        self.publish_level = (
            None if publish_level is None else level_number(publish_level, "publish_level")
        )
        for name, value in (("query_permission", query_permission), ("auth_service", auth_service)):
            if value is not None and (not isinstance(value, str) or not value):
                raise LogInputError(f"{name}: expected a non-empty string, got {value!r}")
        self.query_permission = query_permission
        self.auth_service = auth_service


def _absolute(value: str | os.PathLike[str] | None, name: str) -> Path | None:
    # relative to what? the actor's working directory is not the user's
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not Path(value).is_absolute():
        raise LogInputError(f"{name}: expected an absolute path, got {value!r}")
    return Path(value)


def _int(value: Any, name: str, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise LogInputError(f"{name}: expected an integer >= {least}, got {value!r}")
    return value


def _number(value: Any, name: str, least: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= least:
        raise LogInputError(f"{name}: expected a number >= {least:g}, got {value!r}")
    return float(value)


class Logger(ikos.Actor):
    """The ``log`` daemon: syslog socket + ikos IPC in, filter, files, forwarders, queries.

    Requests (asks or tells; ``ikosctl call log '{"op": ...}'``), each answered
    with a dict holding ``"ok"``, and ``"error"`` saying what was wrong when
    ``ok`` is false:

    - ``{"op": "log", "msg": ..., "level": "info", "program": ..., "facility":
      "user", "pid", "host", "msgid", "time", "sd"}``: one record; answers
      ``{"ok": true, "seq": N}`` or ``{"ok": true, "filtered": true}``.
    - ``{"op": "syslog", "line": "<13>..."}``: one syslog line, as if it came
      on the socket.
    - ``{"op": "query", "since", "until", "program", "level", "facility",
      "host", "uid", "grep", "limit"}`` (and ``"token"`` with a ``query_permission``,
      checked by the auth daemon): ``{"ok": true, "records": [...], "more": bool}``,
      the newest ``limit`` matches in time order (at most :data:`REPLY_MAX_BYTES`
      of them; ``more`` says the limit or that bound cut the answer short).
    - ``{"op": "stats"}``, ``{"op": "rotate"}``.
    """

    def __init__(self, **options: Any) -> None:
        self.options = Options(**options)

    # -- life ----------------------------------------------------------------

    async def on_start(self) -> None:
        paths = self.paths
        opts = self.options
        self.socket_path = opts.socket_path or paths.run_dir / "log.sock"
        self.directory = opts.directory or paths.log_dir / "syslog"
        self.counters: dict[str, int] = dict.fromkeys(
            ("received_syslog", "received_ipc", "kept", "filtered", "malformed", "oversized",
             "refused_ipc", "denied", "write_errors", "publish_errors"), 0,
        )  # fmt: skip
        self._notes: dict[str, int] = {}
        self._largest_oversized = 0
        self.hostname = socket.gethostname()
        self.files: RecordFiles | None = None
        self.files_error: str | None = None
        try:
            self.files = RecordFiles(
                self.directory,
                max_bytes=opts.max_file_bytes,
                max_age=opts.max_file_age,
                keep=opts.keep_files,
                fsync_interval=opts.fsync_interval,
            )
        except OSError as exc:  # no right to the directory: records in memory only
            self.files_error = (
                f"cannot write record files in {self.directory}: {exc.strerror or exc}; "
                f"records are kept in memory only (the newest {opts.ring_size})"
            )
            self._say(self.files_error)
        self.ring = RecentRecords(opts.ring_size, opts.ring_bytes)
        if self.files is not None:
            self.ring.fill(self.files.newest_first())  # the ring again after a restart
        self.seq = max((r.seq for r in self.ring.records), default=0)
        self._buffer = bytearray(opts.max_datagram)
        self.sock: socket.socket | None = None
        self.socket_error: str | None = None
        try:
            self.sock = self._bind(self.socket_path)
        except OSError as exc:  # no right to the path (/dev/log without root): IPC only
            self.socket_error = (
                f"cannot bind the syslog socket {self.socket_path}: {exc.strerror or exc} "
                f"(needs write access to {self.socket_path.parent}); "
                "records come over ikos IPC only"
            )
            self._say(self.socket_error)
        else:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)
        self.forwarders = [
            Forwarder(url, opts.forward_queue, opts.forward_queue_bytes) for url in opts.forward
        ]
        for forwarder in self.forwarders:
            await forwarder.start()
        self.send_interval(TICK, _TICK)
        self.subscribe(SUBMIT_TOPIC)
        syslog = ["rfc3164", "rfc5424"] if self.sock is not None else []
        ikos.registry.register(
            self.name,
            description="log collector: ikos IPC and syslog (RFC 3164/5424) in, files, forwarding",
            type="syslog",
            endpoint=f"unixgram://{self.socket_path}" if self.sock is not None else "",
            capabilities=[*syslog, "query", *(f.scheme for f in self.forwarders)],
            metadata={"socket": str(self.socket_path), "directory": str(self.directory)},
        )
        self._say(
            f"syslog socket {self.socket_path if self.sock else 'none'}, "
            f"files in {self.directory}, "
            f"{len(self.ring)} records reloaded, forwarding to {list(opts.forward) or 'nowhere'}"
        )

    def _bind(self, path: Path) -> socket.socket:
        """A datagram socket at ``path``, put there by an atomic rename.

        Bound at a temporary name first, then renamed over ``path``, so that a
        sender never finds the path missing: a socket left by a killed
        incarnation is replaced, and so is a live one (said in the log: another
        logger was given the same path). A path that is not a socket (a file, the
        ``/dev/log`` symlink of systemd-journald) is left alone: an error.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        live = False
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise LogInputError(f"socket_path: {path} exists and is not a socket")
            live = _in_use(path)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            # the kernel then tells who sent each datagram (SCM_CREDENTIALS), as journald
            # records it: a line may claim any program and pid, its cred cannot lie
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(str(staging))
            os.chmod(staging, 0o666)  # as /dev/log: any local program may log
            sock.setblocking(False)
            os.rename(staging, path)
        except BaseException:
            sock.close()
            staging.unlink(missing_ok=True)
            raise
        if live:
            self._say(f"took over {path} from a running process (another logger given this path?)")
        self._socket_inode = path.stat().st_ino
        return sock

    async def on_stop(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            with contextlib.suppress(OSError):
                if self.socket_path.stat().st_ino == self._socket_inode:  # still ours
                    self.socket_path.unlink()
        for forwarder in self.forwarders:
            await forwarder.close()
        if self.files is not None:
            self.files.close()

    # -- input ---------------------------------------------------------------

    def _on_readable(self) -> None:
        """Read what the socket holds (at most 256 datagrams a turn, to let messages in)."""
        view = memoryview(self._buffer)
        assert self.sock is not None  # only registered with a socket
        for _ in range(256):
            try:
                n, ancillary, _, _ = self.sock.recvmsg_into([view], _CRED_SPACE, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # not expected of a bound datagram socket; said, not fatal
                self._note(f"receive error: {exc}")
                return
            self.counters["received_syslog"] += 1
            if n > len(view):  # MSG_TRUNC: n is the datagram's real length
                self.counters["oversized"] += 1
                self._largest_oversized = max(self._largest_oversized, n)
                self._note("oversized")
                continue
            self._accept(parse_datagram(bytes(view[:n]), time.time(), cred=_cred(ancillary)))

    def _accept(self, record: Record) -> dict[str, Any]:
        """Filter, number, write, remember, forward and publish one record."""
        if record.error is not None:
            self.counters["malformed"] += 1
            self._note("malformed")
        if not self.options.filter.accepts(record):
            self.counters["filtered"] += 1
            return {"ok": True, "filtered": True}
        self.seq += 1
        record = record.numbered(self.seq)
        if self.files is not None:
            try:
                self.files.append(record, time.time())
            except OSError as exc:
                self.counters["write_errors"] += 1
                self._note(f"write error: {exc}")
        self.ring.append(record)
        self.counters["kept"] += 1
        if self.forwarders:
            line = format_5424(record, self.hostname)
            for forwarder in self.forwarders:
                forwarder.submit(line)
        level = self.options.publish_level
        if level is not None and record.severity <= level:
            try:
                ikos.ipc.publish(RECORD_TOPIC, record.to_json())
            except (ikos.IkosError, OSError):  # the broker away: counted, never fatal
                self.counters["publish_errors"] += 1
        return {"ok": True, "seq": record.seq}

    def _note(self, what: str) -> None:
        self._notes[what] = self._notes.get(what, 0) + 1

    def _say(self, text: str) -> None:
        print(f"log: {text}", file=sys.stderr, flush=True)

    # -- messages ------------------------------------------------------------

    def receive(self, message: Any) -> Any:
        if message is _TICK:
            self._tick()
            return None
        if isinstance(message, ikos.ipc.IpcMessage):  # a publication on log.submit
            if isinstance(message.payload, dict):
                return self._log_request(message.payload)
            self.counters["refused_ipc"] += 1
            return None
        if not isinstance(message, dict):
            self.counters["refused_ipc"] += 1
            return _error(f"expected a request {{'op': ...}}, got {type(message).__name__}")
        op = message.get("op")
        try:
            if op == "log":
                return self._log_request(message)
            if op == "syslog":
                return self._syslog_request(message)
            if op == "query":
                token = message.get("token")
                query = Query.from_request({k: v for k, v in message.items() if k != "token"})
                if self.options.query_permission is None:
                    return self._query(query)
                return self._authorized_query(query, token)  # a coroutine: the runtime awaits it
            if op == "stats":
                return self._stats()
            if op == "rotate":
                if self.files is None:
                    return _error(f"rotate: {self.files_error}")
                target = self.files.rotate()
                if target is not None:
                    self._publish_rotated(target)
                return {"ok": True, "rotated": None if target is None else str(target)}
        except LogInputError as exc:
            self.counters["refused_ipc"] += 1
            return _error(str(exc))
        except OSError as exc:  # the files (a full disk, a directory removed): said, not fatal
            return _error(f"{op}: {type(exc).__name__}: {exc}")
        self.counters["refused_ipc"] += 1
        return _error(f"unknown op {op!r} (log, syslog, query, stats, rotate)")

    def _log_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        try:
            record = self._record_from(request)
        except LogInputError as exc:
            self.counters["refused_ipc"] += 1
            return _error(str(exc))
        self.counters["received_ipc"] += 1
        return self._accept(record)

    def _record_from(self, request: Mapping[str, Any]) -> Record:
        unknown = set(request) - _LOG_KEYS
        if unknown:
            raise LogInputError(
                f"log: unknown key {sorted(unknown)[0]!r} (known: {sorted(_LOG_KEYS - {'op'})})"
            )
        msg = request.get("msg")
        if not isinstance(msg, str):
            raise LogInputError(f"log.msg: expected a string, got {type(msg).__name__}")
        if len(msg) > self.options.max_message:
            raise LogInputError(
                f"log.msg: {len(msg)} characters, "
                f"more than max_message ({self.options.max_message})"
            )
        strings = {}
        for key, limit in (("program", 48), ("pid", 128), ("host", 255), ("msgid", 32)):
            value = request.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and key == "pid":
                value = str(value)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= limit):
                raise LogInputError(
                    f"log.{key}: expected a string of 1-{limit} characters, got {value!r}"
                )
            strings[key] = value
        now = time.time()
        when = request.get("time", now)
        if not isinstance(when, int | float) or isinstance(when, bool):
            raise LogInputError(f"log.time: expected seconds since the epoch, got {when!r}")
        return Record(
            time=float(when),
            received=now,
            facility=facility_name(request.get("facility", "user"), "log.facility"),
            level=LEVELS[level_number(request.get("level", "info"), "log.level")],
            msg=msg,
            program=strings["program"],
            pid=strings["pid"],
            host=strings["host"],
            msgid=strings["msgid"],
            sd=_check_sd(request.get("sd", {})),
            format="ipc",
            source="ipc",
        )

    def _syslog_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        line = request.get("line")
        if not isinstance(line, str):
            raise LogInputError(f"syslog.line: expected a string, got {type(line).__name__}")
        data = line.encode("utf-8", "replace")
        if len(data) > self.options.max_datagram:
            self.counters["oversized"] += 1
            raise LogInputError(
                f"syslog.line: {len(data)} bytes, "
                f"more than max_datagram ({self.options.max_datagram})"
            )
        self.counters["received_ipc"] += 1
        record = parse_datagram(data, time.time(), source="ipc")
        reply = self._accept(record)
        if record.error is not None:
            reply["error"] = record.error  # kept as raw, and the sender is told why
        return reply

    def _query(self, query: Query) -> dict[str, Any]:
        found: list[Record] = []
        done = newest_matches(query, self.ring.newest_first(), found)
        if not done and not self.ring.complete and self.files is not None:
            # the ring does not hold everything: look further back in the files
            done = newest_matches(query, self.files.newest_first(self.ring.oldest_seq), found)
        records, size = [], 0
        for record in found:  # newest first: what the size bound leaves out is the oldest
            item = record.to_json()
            size += len(json.dumps(item, ensure_ascii=False))
            if size > REPLY_MAX_BYTES:
                done = True
                break
            records.append(item)
        records.reverse()
        return {"ok": True, "records": records, "more": done}

    async def _authorized_query(self, query: Query, token: Any) -> dict[str, Any]:
        """``query`` if the auth daemon says ``token`` holds ``query_permission``.

        Denied by default: no token, a refusal, an auth daemon that is down or
        slow (5 s) all answer an error saying why, and nothing is read.
        """
        permission, service = self.options.query_permission, self.options.auth_service
        if not isinstance(token, str) or not token:
            self.counters["denied"] += 1
            return _error(f"query: a 'token' holding {permission!r} is needed (from {service})")
        try:
            reply = await self.actor(service).ask_async(
                {"op": "check", "token": token, "permission": permission}, timeout=AUTH_TIMEOUT
            )
        except ikos.IkosError as exc:
            self.counters["denied"] += 1
            return _error(f"query: the {service!r} service could not check the token: {exc}")
        if not isinstance(reply, dict) or reply.get("allowed") is not True:
            self.counters["denied"] += 1
            why = reply.get("reason") or reply.get("error") if isinstance(reply, dict) else reply
            return _error(f"query: not allowed by {service!r}: {why}")
        return self._query(query)

    def _stats(self) -> dict[str, Any]:
        return {
            "ok": True,
            **self.counters,
            "ring": len(self.ring),
            "ring_bytes": self.ring.bytes,
            "seq": self.seq,
            "socket": str(self.socket_path) if self.sock is not None else None,
            "socket_error": self.socket_error,
            "directory": str(self.directory),
            "rotations": self.files.rotations if self.files else 0,
            "reopens": self.files.reopens if self.files else 0,
            "files": self.files.files() if self.files else [],
            "files_error": self.files_error,
            "forward": [f.stats() for f in self.forwarders],
        }

    # -- housekeeping ----------------------------------------------------------

    def _tick(self) -> None:
        now = time.time()
        try:
            if self.files is not None and self.files.tick(now):
                self._publish_rotated(self.files.rotated()[0])
        except OSError as exc:
            self._note(f"file error: {exc}")
        if self._notes:
            notes, self._notes = self._notes, {}
            text = "; ".join(
                f"{count} oversized datagram(s) dropped (largest {self._largest_oversized} bytes, "
                f"limit {self.options.max_datagram})"
                if what == "oversized"
                else f"{count} malformed line(s) kept as raw"
                if what == "malformed"
                else f"{what} (x{count})"
                for what, count in sorted(notes.items())
            )
            self._largest_oversized = 0
            self._say(text)
            self._accept(
                Record(
                    time=now,
                    received=now,
                    facility="syslog",
                    level="warning",
                    msg=text,
                    program="log",
                    pid=str(os.getpid()),
                    source="log",
                )
            )

    def _publish_rotated(self, target: Path) -> None:
        try:
            ikos.ipc.publish(ROTATED_TOPIC, {"file": str(target)})
        except (ikos.IkosError, OSError):
            self.counters["publish_errors"] += 1


_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_CRED_SPACE = socket.CMSG_SPACE(_UCRED.size)


def _cred(ancillary: list[tuple[int, int, bytes]]) -> Cred | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return Cred(*_UCRED.unpack_from(data))
    return None


def _in_use(path: Path) -> bool:
    """Whether a process still reads the datagram socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError:  # ECONNREFUSED: nobody bound to it any more
        return False
    finally:
        probe.close()
    return True


def _check_sd(sd: Any) -> dict[str, dict[str, str]]:
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and all(
            isinstance(pk, str) and isinstance(pv, str) for pk, pv in v.items()
        )
        for k, v in sd.items()
    ):  # fmt: skip
        raise LogInputError("log.sd: expected {SD-ID: {PARAM: 'value'}} with strings only")
    return {k: dict(v) for k, v in sd.items()}


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}
