"""What must survive a crash of ikosd: which daemons run, with which PIDs.

One SQLite database (WAL) under the state directory, one row per running
daemon: its PID, the process's start time (so a recycled PID is never
mistaken for the daemon), its session and restart count. Rows change on
state transitions and are committed once per loop turn, never blocking the
loop on a disk flush per event. After ``kill -9`` of ikosd, the next ikosd
reads the rows, checks each process is still the same one, and adopts it
instead of starting a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import psutil

SCHEMA = """
CREATE TABLE IF NOT EXISTS running (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    pid INTEGER NOT NULL,
    create_time REAL NOT NULL,
    sid INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    started_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class RunningRecord:
    """A daemon that was running when the state was last committed."""

    name: str
    kind: str
    pid: int
    create_time: float
    sid: int
    restarts: int
    started_at: float

    def still_running(self) -> bool:
        """True when the same process (PID and start time) is alive and not a zombie."""
        try:
            proc = psutil.Process(self.pid)
            return (
                abs(proc.create_time() - self.create_time) < 0.05
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False


def process_create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


class StateStore:
    """The running-daemons table, with one commit per loop turn."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(SCHEMA)
        self._pending = False

    def load(self) -> dict[str, RunningRecord]:
        rows = self.db.execute(
            "SELECT name, kind, pid, create_time, sid, restarts, started_at FROM running"
        ).fetchall()
        return {r[0]: RunningRecord(*r) for r in rows}

    def _begin(self) -> None:
        if not self._pending:
            self.db.execute("BEGIN")
            self._pending = True
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self.commit)

    def running(
        self, name: str, kind: str, pid: int, sid: int, restarts: int, started_at: float
    ) -> None:
        created = process_create_time(pid)
        if created is None:
            return
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO running VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, kind, pid, created, sid, restarts, started_at),
        )

    def gone(self, name: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM running WHERE name = ?", (name,))

    def clear(self) -> None:
        self._begin()
        self.db.execute("DELETE FROM running")

    def commit(self) -> None:
        if self._pending:
            self._pending = False
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.commit()
        self.db.close()
