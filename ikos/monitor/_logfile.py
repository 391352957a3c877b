"""Daemon log files: lines captured from stdout/stderr, timestamped, rotated by size.

The manager reads each daemon's stdout and stderr pipes in arbitrary byte
chunks; :class:`LineSplitter` turns those into lines (bounded: a line longer
than 64 KiB is cut, invalid UTF-8 is replaced) and :class:`RotatingLog`
appends them to ``NAME.log`` as ``<ISO-8601 time with ms> <stream> <line>``,
renaming ``NAME.log`` to ``NAME.log.1`` (and so on up to ``backups``) when
it would exceed ``max_bytes``. :func:`tail` reads the last lines from the
end of the files, for ``ikosctl logs -n N``.

Main design choice: one file per daemon with both streams interleaved and
tagged, written by the manager itself, one flush per batch of lines (a loop
turn), so the order of lines across stdout and stderr is the order the
manager read them. Rejected: ``logging.handlers.RotatingFileHandler``, which
flushes every record, formats through the logging machinery (a lock and a
LogRecord per line) and checks the size by seeking on every emit, the hot
path of a chatty daemon; and handing the pipes to a separate logger process
(one more process per daemon, as supervisord's does not, for no gain on one
machine).

Daemon output may hold secrets, so the files are created 0600 (rotation
renames, which keeps the mode) and :func:`secure_log_dir` keeps the
directory to the owner (and a reader group, when one is configured).
Followers (``ikosctl logs -f``) attach to the :class:`RotatingLog` object,
not to the file, so rotation does not disturb them; each has a bounded
queue, and one that falls behind gets a marker line saying how many lines it
missed instead of making the manager grow.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

#: Lines longer than this many bytes are cut into pieces of this size.
MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
#: Mode of every daemon log file: the owner's alone (the reader group reads through ikosd).
LOG_FILE_MODE = 0o600


def format_timestamp(when: float) -> str:
    """ISO-8601 local time with milliseconds and offset, e.g. ``2024-05-01T12:00:00.123+02:00``."""
    from datetime import datetime  # for the lines of `ikosctl logs`, not ikosd's launch

    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds")


class RotatingLog:
    """Append-only log of one daemon at ``path``, rotated by size, keeping ``backups`` old files.

    Example::

        log = RotatingLog(paths.log_dir / "web.log")
        log.write_lines("stdout", ["listening on :80", "ready"])
        log.close()

    The file is opened lazily and kept open; :meth:`write_lines` flushes
    once per call, so a batch costs one ``write(2)``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        # a str, not a Path: ikosd keeps one log per daemon, and a Path holds its
        # parts as separate strings (~0.6 KiB a daemon); followers are few and
        # usually none, so a tuple (the empty one shared) rather than a set each
        self._path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._followers: tuple[LogFollower, ...] = ()

    @property
    def path(self) -> Path:
        """The log file, ``NAME.log``."""
        return Path(self._path)

    def backup_path(self, n: int) -> Path:
        """The n-th rotated file, ``NAME.log.n``."""
        return self.path.with_name(f"{self.path.name}.{n}")

    def _open(self) -> BinaryIO:
        if self._file is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self._path, flags, LOG_FILE_MODE)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != LOG_FILE_MODE:
                    os.fchmod(fd, LOG_FILE_MODE)  # left wider by an older ikos
                self._file = open(fd, "ab")  # noqa: SIM115 - kept open across calls
            except BaseException:
                os.close(fd)
                raise
            self._size = self._file.seek(0, os.SEEK_END)
        return self._file

    def follow(self, limit_bytes: int = 1024 * 1024) -> LogFollower:
        """A follower that receives every record written from now on (see :class:`LogFollower`).

        Example::

            follower = log.follow()
            log.write("stdout", "hello")
            follower.take()   # ['2025-11-26T05:20:00.123+01:00 stdout hello']
            follower.close()
        """
        follower = LogFollower(self, limit_bytes)
        self._followers = (*self._followers, follower)
        return follower

    def _unfollow(self, follower: LogFollower) -> None:
        self._followers = tuple(f for f in self._followers if f is not follower)

    def write(self, stream: str, line: str, when: float | None = None) -> None:
        """Append one line (see :meth:`write_lines`)."""
        self.write_lines(stream, [line], when)

    def write_lines(self, stream: str, lines: list[str], when: float | None = None) -> None:
        """Append ``lines`` of ``stream`` (``stdout``/``stderr``) stamped ``when``, then flush.

        A line holding newlines becomes several records; a trailing ``\\r``
        is dropped. Rotation happens before a record that would take the
        file over ``max_bytes`` (a record larger than that still gets a file
        of its own).
        """
        if not stream or any(c.isspace() for c in stream):
            raise ValueError(f"invalid stream name {stream!r}")
        stamp = format_timestamp(time.time() if when is None else when)
        f = self._open()
        for line in lines:
            for part in line.split("\n"):
                text = part[:-1] if part.endswith("\r") else part
                record = f"{stamp} {stream} {text}\n".encode("utf-8", "backslashreplace")
                if self._size and self._size + len(record) > self.max_bytes:
                    self._rotate()
                    f = self._open()
                f.write(record)
                self._size += len(record)
                for follower in self._followers:
                    follower.push(record)
        f.flush()
        for follower in self._followers:
            follower.notify()

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.backups == 0:
            os.truncate(self.path, 0)
            return
        # Backups beyond the count (left by a larger setting) go first.
        extra = self.backups + 1
        while self.backup_path(extra).exists():
            self.backup_path(extra).unlink()
            extra += 1
        for n in range(self.backups - 1, 0, -1):
            if self.backup_path(n).exists():
                os.replace(self.backup_path(n), self.backup_path(n + 1))
        os.replace(self.path, self.backup_path(1))

    def flush(self) -> None:
        """Flush buffered records to the file."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file (the next write reopens it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RotatingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogFollower:
    """New records of one :class:`RotatingLog`, queued for a reader (``logs -f``).

    The queue holds at most ``limit_bytes`` of records; past that, records
    are counted instead of kept, and :meth:`take` ends with a marker record
    ``<time> ikos N lines dropped (...)`` in their place. ``wake`` (any
    callable) is called after each batch written, e.g. an asyncio Event's
    ``set``.
    """

    def __init__(self, log: RotatingLog, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.wake: Callable[[], None] | None = None
        self.closed = False
        self._log: RotatingLog | None = log
        self._records: list[bytes] = []
        self._bytes = 0
        self._dropped = 0

    def push(self, record: bytes) -> None:
        """Queue one record (called by the log; the newest are dropped when full)."""
        if self._dropped or self._bytes + len(record) > self.limit_bytes:
            self._dropped += 1
            return
        self._records.append(record)
        self._bytes += len(record)

    def notify(self) -> None:
        if self.wake is not None:
            self.wake()

    def take(self) -> list[str]:
        """The queued records as text lines (oldest first), the drop marker last; clears."""
        lines = [r.decode("utf-8", "replace").rstrip("\n") for r in self._records]
        if self._dropped:
            lines.append(
                f"{format_timestamp(time.time())} ikos {self._dropped} lines dropped "
                "(this reader fell behind)"
            )
        self._records, self._bytes, self._dropped = [], 0, 0
        return lines

    def close(self) -> None:
        """Stop following (idempotent)."""
        self.closed = True
        if self._log is not None:
            self._log._unfollow(self)
            self._log = None
        self.notify()


def secure_log_dir(path: Path, reader_gid: int | None = None) -> None:
    """Create ``path`` if needed and restrict it: 0700, or 0750 owned by ``reader_gid``.

    The log directory holds daemons' output and ikosd's own log, which other
    users must not read unless they are in the configured reader group.
    """
    path.mkdir(parents=True, exist_ok=True)
    if reader_gid is None:
        os.chmod(path, 0o700)
        return
    with contextlib.suppress(PermissionError):  # a non-root owner outside the group
        os.chown(path, -1, reader_gid)
    os.chmod(path, 0o750)


class LineSplitter:
    """Turns byte chunks from a pipe into text lines, with a bound on a line's length.

    >>> s = LineSplitter()
    >>> s.feed(b"hello\\nwor")
    ['hello']
    >>> s.feed(b"ld\\n")
    ['world']

    Lines longer than ``max_line`` bytes are cut into pieces (at a UTF-8
    character boundary when one is near), so at most ``max_line`` bytes are
    ever held; invalid UTF-8 is replaced by U+FFFD; a trailing ``\\r`` is
    dropped. :meth:`flush` returns the last, unterminated line at EOF.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        if max_line < 4:
            raise ValueError(f"max_line must be >= 4, got {max_line}")
        self.max_line = max_line
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of a line not yet terminated."""
        return len(self._buf)

    @staticmethod
    def _decode(raw: bytes | bytearray) -> str:
        text = bytes(raw).decode("utf-8", "replace")
        return text[:-1] if text.endswith("\r") else text

    def _cut(self, start: int) -> int:
        end = start + self.max_line
        buf = self._buf
        cut = end
        # Do not split a multi-byte character: back up over continuation bytes.
        while cut > end - 3 and cut < len(buf) and (buf[cut] & 0xC0) == 0x80:
            cut -= 1
        return cut if (buf[cut] & 0xC0) != 0x80 else end

    def feed(self, chunk: bytes) -> list[str]:
        """Add ``chunk``; return the lines it completes."""
        buf = self._buf
        buf += chunk
        out: list[str] = []
        pos, n = 0, len(buf)
        while pos < n:
            nl = buf.find(b"\n", pos, pos + self.max_line + 1)
            if nl >= 0:
                out.append(self._decode(buf[pos:nl]))
                pos = nl + 1
            elif n - pos > self.max_line:
                cut = self._cut(pos)
                out.append(self._decode(buf[pos:cut]))
                pos = cut
            else:
                break
        del buf[:pos]
        return out

    def flush(self) -> list[str]:
        """Return the unterminated last line, if any (call at EOF), and clear."""
        if not self._buf:
            return []
        line = self._decode(self._buf)
        self._buf.clear()
        return [line]


def _tail_file(path: Path, n: int, block: int = 64 * 1024) -> list[str]:
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return []
    with f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        newlines = 0
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            data = chunk + data
            newlines += chunk.count(b"\n")
            # n + 1 newlines (the last one ends the file) bound n whole lines.
            if newlines > n:
                break
    if not data:
        return []
    if data.endswith(b"\n"):
        data = data[:-1]
    lines = data.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first piece may start mid-line
    return [line.decode("utf-8", "replace") for line in lines[-n:]]


def tail(path: str | os.PathLike[str], n: int) -> list[str]:
    """The last ``n`` lines of the log at ``path``, oldest first, reading from the end.

    When the current file has fewer than ``n`` lines (it was just rotated),
    the rest come from the end of ``path.1``. Missing files give no lines.
    """
    if n <= 0:
        return []
    p = Path(path)
    lines = _tail_file(p, n)
    if len(lines) < n:
        older = _tail_file(p.with_name(f"{p.name}.1"), n - len(lines))
        lines = older + lines
    return lines
