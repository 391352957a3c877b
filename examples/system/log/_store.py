"""The logger's files: JSON Lines, rotated by size and age, a fixed number kept.

Records go to ``DIR/current.jsonl``, one JSON object per line, by one
``write`` on an ``O_APPEND`` descriptor each: once :meth:`RecordFiles.append`
returns, the line is the kernel's, so a ``kill -9`` of the logger loses
nothing. ``fsync`` runs at most every ``fsync_interval`` seconds while there
is something unsynced (called from the daemon's tick), at each rotation and
when the logger stops: a power loss costs at most about that interval.
(Rejected: fsync per record, which caps a flood at the disk's sync rate.)

Rotation renames ``current.jsonl`` to ``records-<UTC time>.<ns>Z.jsonl`` (an
atomic ``rename``, then the directory is synced), opens a new one, and
deletes the oldest rotated files beyond ``keep``. It happens before a write
that would take the file past ``max_bytes``, and when the file's first
record is ``max_age`` seconds old (checked on each write and each tick).
A line cut short by a crash is closed with a newline at the next start, and
lines that do not read back as records are skipped and counted. A full
disk takes part of a line at most: the write fails, the part is cut off
again (``ftruncate``), the failure is counted, and the record stays in
memory, where queries still find it. A current
file moved away or deleted by hand is noticed at the next tick, and a new
one opened (as a daemon does on SIGHUP after logrotate).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from examples.system.log._syslog import LogInputError, Record

CURRENT = "current.jsonl"
ROTATED_PREFIX = "records-"


class RecordFiles:
    """The directory of one logger's record files (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        max_age: float | None,
        keep: int,
        fsync_interval: float,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.keep = keep
        self.fsync_interval = fsync_interval
        self.rotations = 0
        self.unreadable_lines = 0
        self.write_errors = 0
        self.reopens = 0
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._fd = -1
        self._size = 0
        self._opened_at = time.time()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._open_current()

    @property
    def current(self) -> Path:
        return self.directory / CURRENT

    def _open_current(self) -> None:
        self._fd = os.open(
            self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        self._size = os.fstat(self._fd).st_size
        self._opened_at = time.time()
        if self._size:
            with open(self.current, "rb") as f:
                first = f.readline()
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # a line cut short by a crash: end it, so the next record stands alone
                self._size += os.write(self._fd, b"\n")
            try:
                self._opened_at = float(json.loads(first)["received"])
            except (ValueError, KeyError, TypeError):
                pass  # unreadable first line: age counts from now

    def append(self, record: Record, now: float) -> None:
        """Write ``record`` as one line, rotating first if size or age says so.

        An ``OSError`` (disk full) is counted and raised for the caller to report.
        """
        line = json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8", "replace")
        if self._size and (self._size + len(data) > self.max_bytes or self._too_old(now)):
            self.rotate()
        try:
            written = 0
            while written < len(data):  # short only when the disk fills up mid-line
                written += os.write(self._fd, data[written:])
        except OSError:
            # A full disk can take part of a line: cut it off, so the next record
            # does not run into it (readers would lose both to one broken line).
            self.write_errors += 1
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += written
        if self._size == written:
            self._opened_at = now
        self._dirty = True

    def _too_old(self, now: float) -> bool:
        return self.max_age is not None and now - self._opened_at >= self.max_age

    def tick(self, now: float) -> bool:
        """Periodic work: rotate a file too old, fsync if due. True if it rotated.

        First, if ``current.jsonl`` is no longer the file being written (moved
        away or deleted by hand, the directory with it), a new one is opened,
        so that records do not go on into a file nobody can find.
        """
        self._reopen_if_gone()
        rotated = False
        if self._size and self._too_old(now):
            self.rotate()
            rotated = True
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()
        return rotated

    def _reopen_if_gone(self) -> None:
        try:
            same = self._fd >= 0 and os.stat(self.current).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self.reopens += 1
            self._close_fd()
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._open_current()

    def sync(self) -> None:
        """fsync the current file if anything was written since the last one."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def rotate(self) -> Path | None:
        """Rename the current file aside (if it holds anything) and apply retention."""
        if not self._size:
            return None
        self.sync()
        ns = time.time_ns()  # one reading for both parts, so that names sort by time
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9))
        target = self.directory / f"{ROTATED_PREFIX}{stamp}.{ns % 10**9:09d}Z.jsonl"
        os.rename(self.current, target)
        self._close_fd()
        self._open_current()
        _sync_dir(self.directory)
        self.rotations += 1
        for old in self.rotated()[self.keep :]:
            old.unlink(missing_ok=True)
        return target

    def rotated(self) -> list[Path]:
        """The rotated files, newest first (their names sort by time)."""
        return sorted(self.directory.glob(f"{ROTATED_PREFIX}*.jsonl"), reverse=True)

    def newest_first(self, before_seq: int | None = None) -> Iterator[Record]:
        """Every readable record, newest first; only those with ``seq < before_seq`` if given.

        One file is in memory at a time (at most ``max_bytes``).
        """
        for path in [self.current, *self.rotated()]:
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                continue  # deleted by retention meanwhile
            for line in reversed(lines):
                if not line.strip():
                    continue
                try:
                    record = Record.from_json(json.loads(line))
                except (ValueError, LogInputError):
                    self.unreadable_lines += 1
                    continue
                if before_seq is None or record.seq < before_seq:
                    yield record

    def files(self) -> list[dict[str, object]]:
        """The files with their sizes, current first (for ``stats``)."""
        out: list[dict[str, object]] = []
        for path in [self.current, *self.rotated()]:
            try:
                out.append({"path": str(path), "bytes": path.stat().st_size})
            except FileNotFoundError:
                continue
        return out

    def close(self) -> None:
        """Sync and close (idempotent)."""
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                self._close_fd()

    def _close_fd(self) -> None:
        # -1 at once: a write after a failed reopen must fail (EBADF), never reach
        # whatever file the number is given to next
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def record_bytes(record: Record) -> int:
    """What a record costs in memory, roughly: its texts plus a fixed overhead."""
    sd = sum(len(k) + len(v) for params in record.sd.values() for k, v in params.items())
    return len(record.msg) + sd + 400


class RecentRecords:
    """The newest records in memory, at most ``max_records`` and ``max_bytes`` of them.

    ``complete`` is False once a record was evicted (or more were on disk
    than fit at start): a query that wants older records must then read the
    files, for those before ``oldest_seq``.
    """

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.records: deque[Record] = deque()
        self.bytes = 0
        self.complete = True

    def __len__(self) -> int:
        return len(self.records)

    def fill(self, newest_first: Iterator[Record]) -> None:
        """Load the newest records of the files (at start), as many as fit."""
        for record in newest_first:
            size = record_bytes(record)
            if len(self.records) >= self.max_records or self.bytes + size > self.max_bytes:
                self.complete = False
                return
            self.records.appendleft(record)
            self.bytes += size

    def append(self, record: Record) -> None:
        """Add the newest record, evicting the oldest past either bound."""
        self.records.append(record)
        self.bytes += record_bytes(record)
        while len(self.records) > 1 and (
            len(self.records) > self.max_records or self.bytes > self.max_bytes
        ):
            self.bytes -= record_bytes(self.records.popleft())
            self.complete = False

    def newest_first(self) -> Iterator[Record]:
        """The records held, newest first."""
        return reversed(self.records)

    @property
    def oldest_seq(self) -> int | None:
        """The ``seq`` of the oldest record held (None when empty)."""
        return self.records[0].seq if self.records else None


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
