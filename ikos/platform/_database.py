"""Opening the SQLite databases of an instance, and telling damage from trouble.

Three stores live under the state directory (``state.db``, ``daemons.db``,
``registry.db``). A store that cannot be read must never stop ikosd from
supervising, and must never be silently emptied either. So this module
sorts what can go wrong when one is opened:

- **damage** (SQLite says the file is not a database, or is malformed; the
  integrity check fails): the file is moved aside, with its WAL, as
  ``NAME.damaged-TIMESTAMP`` for a human to look at, a fresh one is created,
  and the caller gets a sentence saying what happened, to log and to act on;
- **trouble in the environment** (read-only file system, no permission, a
  full disk): :class:`DatabaseUnavailable`, whose message names the file and
  the cause in one line, for ikosd to print and exit with.

Rejected: ``PRAGMA integrity_check`` at every start (it reads every page);
``quick_check`` finds the damage that matters here in a fraction of the
time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from ikos._errors import IkosError

#: SQLite's result codes for a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB).
_DAMAGE_CODES = frozenset({11, 26})


class DatabaseUnavailable(IkosError):
    """A store cannot be opened or written for a reason outside it (permissions, disk)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot use {self.path}: {self.reason}"


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite's error says the file is damaged (rather than unreachable)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _DAMAGE_CODES
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL and shared memory) out of the way."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}.{n}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{target}{suffix}"))
    return target


def _connect(path: Path, schema: str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            problems = "; ".join(str(r[0]) for r in rows[:3])
            raise sqlite3.DatabaseError(f"database disk image is malformed ({problems})")
        db.executescript(schema)
    except BaseException:
        db.close()
        raise
    return db


def open_database(
    path: Path, schema: str, *, synchronous: str = "NORMAL"
) -> tuple[sqlite3.Connection, str | None]:
    """Open (creating it if needed) the database at ``path`` with ``schema`` applied.

    Returns the connection and, when the file was damaged and replaced by an
    empty one, a sentence saying so (``None`` otherwise). Raises
    :class:`DatabaseUnavailable` when the file cannot be used at all.

    ``synchronous=NORMAL`` in WAL mode makes a commit survive the death of
    the process (the data is in the kernel's page cache) without an fsync;
    pass ``FULL`` for data that must survive the loss of power.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(str(path.parent), _reason(exc)) from None
    try:
        return _connect(path, schema, synchronous), None
    except sqlite3.Error as exc:
        if not is_damage(exc):
            raise DatabaseUnavailable(str(path), _reason(exc)) from None
        damage = str(exc)
    except OSError as exc:
        raise DatabaseUnavailable(str(path), _reason(exc)) from None
    try:
        moved = move_aside(path)
        db = _connect(path, schema, synchronous)
    except (OSError, sqlite3.Error) as exc:
        raise DatabaseUnavailable(str(path), f"damaged ({damage}) and {_reason(exc)}") from None
    return db, f"{path} was damaged ({damage}): moved to {moved.name}, starting from an empty one"


def close_quietly(db: sqlite3.Connection) -> None:
    """Close ``db``, whatever state it is in."""
    with contextlib.suppress(sqlite3.Error):
        db.close()


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
