"""What must survive a crash of ikosd: which daemon processes exist, with which PIDs.

One SQLite database (WAL) under the state directory, one row per daemon
process that ikosd created and that has not ended: its PID and the
process's stamp (its boot and its start in clock ticks since the boot, so
that a recycled PID is never mistaken for it, whatever the wall clock did), its
session, restart count, and its phase: ``starting`` from the moment the
process exists (written and committed *before* it may run any user code:
see the fork server's gate) and ``running`` once it is ready. After ``kill
-9`` of ikosd, the next one adopts the ``running`` ones that still live and
stops the ``starting`` ones, whose start it cannot finish.

The table in memory is the truth; the database is its durable copy. Changes
are written together a few milliseconds after the first (:data:`FLUSH_DELAY`;
a process that waits at the fork server's gate is written at once), and a
write that fails (a full disk, an I/O
error) is not lost: the rows stay pending and are written again, with a
growing delay, until a write succeeds. While writes fail, :meth:`health`
says so (status and metrics show it), and every daemon whose row is not
saved is known (:meth:`unsaved`).

The delay costs nothing in safety. ikosd dying within it leaves the
database as it was before the change: a process recorded as running that
has since died is not found alive at adoption (its PID and start time no
longer match); a process started by ``posix_spawn`` and not yet recorded
carries the instance's marker in its environment, by which the next ikosd
finds it and stops it, as it does for one recorded as ``starting``
(``tests/test_crash_recovery.py`` kills ikosd just after restarts). The
database is WAL with ``synchronous=NORMAL``: a commit survives a crash of
ikosd (it is in the kernel's page cache) without an fsync, which only a
loss of power would need, and after one every daemon has died anyway.

Rejected: executing each change as SQL at once and committing per turn, as
the first version did. SQLite may roll a failed commit back whole, and the
changes in it were then lost for good without anyone noticing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from ikos.platform._database import close_quietly, open_database
from ikos.platform._process import CLOCK_TICKS, ProcessStamp, is_process, process_stamp

log = logging.getLogger("ikos.state")

# ``create_time`` is the process's start as a Unix time, as psutil computes it;
# ``boot_id`` and ``start_ticks`` are its :data:`~ikos.platform._process.ProcessStamp`,
# which is what identifies the process (a step of the wall clock moves the
# first, never the second). A row without them was written by an ikos before
# them, and is checked by ``create_time`` as that ikos did; ``create_time`` is
# still written, so that such an ikos can read the rows of this one.
SCHEMA = """
CREATE TABLE IF NOT EXISTS running (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    pid INTEGER NOT NULL,
    create_time REAL NOT NULL,
    sid INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    started_at REAL NOT NULL,
    phase TEXT NOT NULL DEFAULT 'running',
    boot_id TEXT NOT NULL DEFAULT '',
    start_ticks INTEGER NOT NULL DEFAULT -1
);
"""
#: How long a change waits to be written, so that the rows of a restart (the old
#: process gone, the new one starting and running) make one commit, after the spawn
#: rather than on the restart's path. A crash of ikosd within it loses nothing that
#: a crash just before the change would not: see the module docstring.
FLUSH_DELAY = 0.002
#: Delays between attempts to write pending rows after a failure (the last repeats).
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


class RunningRecord:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """A daemon process as the state records it (read-only by convention: nothing sets,
    compares or hashes it; a change of the row is a new record)."""

    __slots__ = (
        "boot_id",
        "create_time",
        "kind",
        "name",
        "phase",
        "pid",
        "restarts",
        "sid",
        "start_ticks",
        "started_at",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        pid: int,
        create_time: float,
        sid: int,
        restarts: int,
        started_at: float,
        phase: str = "running",
        boot_id: str = "",
        start_ticks: int = -1,
    ) -> None:
        self.name = name
        self.kind = kind
        self.pid = pid
        self.create_time = create_time
        self.sid = sid
        self.restarts = restarts
        self.started_at = started_at
        self.phase = phase
        self.boot_id = boot_id
        self.start_ticks = start_ticks

    @property
    def stamp(self) -> ProcessStamp:
        """Which process the record names (:data:`~ikos.platform._process.ProcessStamp`)."""
        return (self.boot_id, self.start_ticks)

    def still_running(self) -> bool:
        """True when the same process (PID and start) is alive and not a zombie."""
        if self.boot_id:
            return is_process(self.pid, self.stamp)
        return _legacy_still_running(self.pid, self.create_time)


def _legacy_still_running(pid: int, create_time: float) -> bool:
    """A row of an ikos before stamps: the start as psutil's Unix time (moved by a clock step)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return (
            abs(proc.create_time() - create_time) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _create_time(stamp: ProcessStamp) -> float:
    """The start of ``stamp`` as psutil gives it (ticks plus ``/proc/stat``'s boot time).

    Written for an earlier ikos reading this one's rows; ``_boot_time`` is read
    once per ikosd because psutil's is on every start's path.
    """
    return stamp[1] / CLOCK_TICKS + _boot_time()


def _record(
    name: str,
    kind: str,
    pid: int,
    stamp: ProcessStamp,
    sid: int,
    restarts: int,
    started_at: float,
    phase: str,
) -> RunningRecord:
    created = _create_time(stamp)
    return RunningRecord(
        name, kind, pid, created, sid, restarts, started_at, phase, stamp[0], stamp[1]
    )


@functools.cache
def _boot_time() -> float:
    """The boot time psutil adds to a process's start (read once per process).

    Read as ``psutil.boot_time()`` reads it, without importing psutil: ~0.6 MiB
    of modules that ikosd, for a tree of executables, loaded for this line alone.
    """
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise RuntimeError("no 'btime' line in /proc/stat")


class StateStore:
    """The daemon-process table: in memory, written to SQLite once per loop turn, retried."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db, self.damage = open_database(path, SCHEMA)
        self._migrate()
        self.rows: dict[str, RunningRecord] = self._read()
        self._dirty: set[str] = set()
        self._scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self.failures = 0
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._attempt = 0
        self._closed = False

    def _migrate(self) -> None:
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(running)")}
        if "phase" not in columns:  # written by an ikos before the phase existed
            self.db.execute("ALTER TABLE running ADD COLUMN phase TEXT NOT NULL DEFAULT 'running'")
        if "boot_id" not in columns:  # written by an ikos before stamps
            self.db.execute("ALTER TABLE running ADD COLUMN boot_id TEXT NOT NULL DEFAULT ''")
            self.db.execute(
                "ALTER TABLE running ADD COLUMN start_ticks INTEGER NOT NULL DEFAULT -1"
            )

    def _read(self) -> dict[str, RunningRecord]:
        rows = self.db.execute(
            "SELECT name, kind, pid, create_time, sid, restarts, started_at, phase, boot_id,"
            " start_ticks FROM running"
        ).fetchall()
        return {r[0]: RunningRecord(*r) for r in rows}

    def load(self) -> dict[str, RunningRecord]:
        """The records a previous ikosd left (read when the store was opened)."""
        return dict(self.rows)

    # -- changes ----------------------------------------------------------------------

    def starting(
        self, name: str, kind: str, pid: int, sid: int, restarts: int, *, now: bool = True
    ) -> bool:
        """Record a new process; with ``now``, write it before returning.

        ``now`` is for a process waiting at the fork server's gate: it must be
        on disk before it runs user code. A process that already runs (started
        by ``posix_spawn``, which has no gate) gains nothing from a write of
        its own, and joins the loop turn's batch. Returns whether the row is
        written; when it is not (the disk is full), the row stays pending and
        the process must start anyway: supervision comes before bookkeeping.
        """
        stamp = process_stamp(pid)
        if stamp is None:
            return True  # already gone: there is nothing to find after a crash
        self._put(_record(name, kind, pid, stamp, sid, restarts, time.time(), "starting"))
        return self.flush() if now else False

    def running(
        self, name: str, kind: str, pid: int, sid: int, restarts: int, started_at: float
    ) -> None:
        """The daemon ``name`` is ready (a new process, or one adopted)."""
        old = self.rows.get(name)
        stamp = old.stamp if old is not None and old.pid == pid and old.boot_id else None
        if stamp is None:
            stamp = process_stamp(pid)
            if stamp is None:
                return
        self._put(_record(name, kind, pid, stamp, sid, restarts, started_at, "running"))

    def _put(self, record: RunningRecord) -> None:
        self.rows[record.name] = record
        self._touch(record.name)

    def gone(self, name: str) -> None:
        """The daemon's process ended (or will never be adopted)."""
        if self.rows.pop(name, None) is not None:
            self._touch(name)

    def clear(self) -> None:
        """Forget every row (after an orderly shutdown)."""
        for name in list(self.rows):
            self.gone(name)

    def _touch(self, name: str) -> None:
        self._dirty.add(name)
        if self._scheduled or self._retry is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled = True
        loop.call_later(FLUSH_DELAY, self._flush_turn)

    # -- writing ------------------------------------------------------------------------

    def _flush_turn(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> bool:
        """Write every pending row now; True when nothing is left pending."""
        if not self._dirty or self._closed:
            return not self._dirty
        names = sorted(self._dirty)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for name in names:
                    row = self.rows.get(name)
                    if row is None:
                        self.db.execute("DELETE FROM running WHERE name = ?", (name,))
                    else:
                        self.db.execute(
                            "INSERT OR REPLACE INTO running VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                row.name,
                                row.kind,
                                row.pid,
                                row.create_time,
                                row.sid,
                                row.restarts,
                                row.started_at,
                                row.phase,
                                row.boot_id,
                                row.start_ticks,
                            ),
                        )
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        self._dirty.difference_update(names)
        if self.failing_since is not None:
            log.warning(
                "%s written again after %.1f s of failures: the state is saved",
                self.path,
                time.time() - self.failing_since,
            )
        self.failing_since = None
        self.last_error = None
        self._attempt = 0
        return True

    def _failed(self, exc: sqlite3.Error) -> None:
        self.failures += 1
        self.last_error = str(exc)
        if self.failing_since is None:
            self.failing_since = time.time()
            log.error(
                "cannot write %s (%s): %d daemons' records are pending; retrying until it works "
                "(until then a crash of ikosd could not be recovered from cleanly)",
                self.path,
                exc,
                len(self._dirty),
            )
        delay = RETRY_DELAYS[min(self._attempt, len(RETRY_DELAYS) - 1)]
        self._attempt += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._retry is None and not self._closed:
            self._retry = loop.call_later(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._retry = None
        self.flush()

    # -- what status and metrics show -------------------------------------------------

    def unsaved(self) -> set[str]:
        """Daemons whose current row is not on disk yet."""
        return set(self._dirty)

    def saved(self, name: str) -> bool:
        """Whether daemon ``name``'s current row (or its absence) is on disk."""
        return name not in self._dirty

    def health(self) -> dict[str, Any]:
        """``{"ok", "pending", "failures", "error", "since"}``: whether writes succeed."""
        return {
            "ok": self.failing_since is None,
            "pending": len(self._dirty),
            "failures": self.failures,
            "error": self.last_error,
            "since": self.failing_since,
        }

    def close(self) -> None:
        """Write what is pending (once more) and close the database."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.flush()
        self._closed = True
        close_quietly(self.db)
