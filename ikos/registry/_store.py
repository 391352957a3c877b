"""The registry's store: services, their owners and dependencies, in SQLite.

``RegistryStore`` keeps every :class:`ServiceInfo` in one SQLite file under
the state directory (WAL journal, ``synchronous=NORMAL``), so the registry
survives a restart or a ``kill -9`` of ikosd. It is used from one thread,
the manager's event loop, and stays synchronous: each call is a handful of
indexed statements. Writes go into an open transaction that the manager
commits once per loop turn (:meth:`RegistryStore.commit`), which turns a
burst of registrations into one fsync; ``autocommit=True`` commits after
every call instead, for tests and simple tools.

A registration belongs to its owner process, identified by pid *and*
process stamp (a pid alone is reused by the kernel; the stamp is the boot
and the start in clock ticks since it, which no step of the wall clock
moves: see :data:`~ikos.platform._process.ProcessStamp`). A name held by a
living owner cannot be taken by another process; when the owner dies the
manager calls :meth:`~RegistryStore.mark_owner_dead` and the service turns
inactive, and a restarted owner re-registering it makes it active again.
Owners that died while ikosd was down are found at start by
:meth:`~RegistryStore.reconcile_dead_owners`.

Discovery by glob pattern narrows the candidates with an index range on the
pattern's literal prefix and matches the rest with :func:`fnmatch.fnmatchcase`
in Python, so the semantics are exactly fnmatch's; translating patterns into
SQL ``GLOB`` was rejected because the two dialects differ (``[!a]`` against
``[^a]``, escaping). Capabilities live in their own table, keyed by
capability, so discovery by capability is one index lookup at any size.

Every change is announced to listeners as a :class:`RegistryEvent`; the
manager forwards them to watchers. Events are emitted when the call
returns, before the batch is committed.
"""

from __future__ import annotations

import builtins
import fnmatch
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeAlias

from ikos._errors import IkosError
from ikos.platform._database import is_damage, move_aside
from ikos.platform._process import (
    ProcessStamp,
    is_process,
    proc_info,
    process_stamp,
    stamp_time,
)
from ikos.registry._graph import DependencyCycle
from ikos.registry._service import (
    HEALTH_STATES,
    InvalidService,
    NoSuchService,
    NotServiceOwner,
    RegistryFull,
    ServiceConflict,
    ServiceInfo,
    check_service_name,
    validate_service,
)

log = logging.getLogger(__name__)

EventKind: TypeAlias = Literal["registered", "unregistered", "health", "inactive", "active"]
Listener: TypeAlias = Callable[["RegistryEvent"], None]

SCHEMA_VERSION = 1
DEFAULT_MAX_SERVICES = 100_000
MAX_DEPENDENCIES = 64
PATTERN_MAX = 256
# For rows of an ikos before stamps, which recorded the owner's start as a
# Unix time: the margin that ikos allowed between two readings of it.
START_TIME_TOLERANCE = 1.0
#: Who owns a service, as recorded: a :data:`ProcessStamp`; a Unix start time in
#: a row written by an ikos before stamps; None when the owner was already gone.
OwnerStart: TypeAlias = "ProcessStamp | float | None"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    version TEXT NOT NULL,
    type TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    capabilities TEXT NOT NULL,     -- JSON array, in registration order
    pid INTEGER,
    active INTEGER NOT NULL,
    start_time REAL,
    owner TEXT,
    health TEXT NOT NULL,
    metadata TEXT NOT NULL,         -- JSON object
    owner_pid INTEGER,              -- NULL: registered by the manager
    owner_start_time REAL,          -- Unix time, for an ikos before stamps
    owner_boot TEXT,                -- the owner's ProcessStamp: what identifies it
    owner_ticks INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS services_by_type ON services (type);
CREATE INDEX IF NOT EXISTS services_by_owner_pid ON services (owner_pid);
CREATE TABLE IF NOT EXISTS capabilities (
    capability TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (capability, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS capabilities_by_name ON capabilities (name);
CREATE TABLE IF NOT EXISTS dependencies (
    name TEXT NOT NULL,
    depends_on TEXT NOT NULL,
    PRIMARY KEY (name, depends_on)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dependencies_by_target ON dependencies (depends_on);
"""

_COLUMNS = (
    "name, description, version, type, endpoint, capabilities, pid, active,"
    " start_time, owner, health, metadata, owner_pid, owner_start_time, owner_boot, owner_ticks"
)
#: The columns the stamps added to a file of an ikos before them.
_STAMP_COLUMNS = ("owner_boot TEXT", "owner_ticks INTEGER")
_GLOB_SPECIAL = re.compile(r"[*?\[]")
# Greater than every character that a name can hold, so that
# [prefix, prefix + _TOP) is the index range of names starting with prefix.
_TOP = "\U0010ffff"


class RegistryEvent:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """A change of the registry: ``kind`` says what happened to ``info``.

    ``registered`` (new or replaced), ``unregistered`` (``info`` as it was),
    ``health`` (health changed), ``inactive`` (owner died or stopped),
    ``active`` (an inactive service came back, e.g. re-registered after a
    restart). Never changed, compared or hashed.
    """

    __slots__ = ("info", "kind")

    def __init__(self, kind: EventKind, info: ServiceInfo) -> None:
        self.kind = kind
        self.info = info


def process_alive(pid: int, start: OwnerStart) -> bool:
    """Whether process ``pid`` still runs and is the one ``start`` recorded.

    ``start`` is what :meth:`RegistryStore.owner_of` gives: a stamp (see
    :func:`~ikos.platform._process.is_process`), a Unix start time from an
    ikos before stamps (compared as that ikos did, within
    :data:`START_TIME_TOLERANCE`; a process of another user that cannot be
    inspected counts as alive), or None to check the pid only. A zombie
    counts as dead.
    """
    if isinstance(start, tuple):
        return is_process(pid, start)
    if start is None:
        return proc_info(pid) is not None
    import psutil  # for such rows only

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - start) <= START_TIME_TOLERANCE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class RegistryStore:
    """The service registry, persisted in the SQLite file ``path``.

    Not thread-safe: use it from the thread that created it. Writes stay in
    an open transaction until :meth:`commit` unless ``autocommit`` is true.
    ``max_services`` bounds the number of names (:class:`RegistryFull`).

    Example::

        >>> store = RegistryStore(tmp / "registry.sqlite3", autocommit=True)
        >>> store.register(ServiceInfo("net/dhcp", capabilities=("dhcpv4",)), None, None).active
        True
        >>> [s.name for s in store.discover(pattern="net/*")]
        ['net/dhcp']
    """

    def __init__(
        self,
        path: Path,
        *,
        autocommit: bool = False,
        max_services: int = DEFAULT_MAX_SERVICES,
    ) -> None:
        self.path = Path(path)
        self.autocommit = autocommit
        self.max_services = max_services
        self._listeners: builtins.list[Listener] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: Set when the file was damaged and replaced by an empty registry (say so).
        self.damage: str | None = None
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            moved = move_aside(self.path)
            self.damage = (
                f"{self.path} was damaged ({exc}): moved to {moved.name}; the registry starts "
                "empty (services declared in the configuration register again as their "
                "daemons start; others must register again)"
            )
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun and ended here, explicitly.
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                raise sqlite3.DatabaseError("database disk image is malformed")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise IkosError(
                    f"{self.path}: registry schema version {version} is newer than"
                    f" this ikos understands ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                # Not executescript(), which commits first: the schema goes in one
                # transaction, with the version that says it is there. A current file
                # is not written at all: that write (the WAL's first) cost ikosd's
                # every start 1-12 ms, measured on a loaded disk.
                conn.execute("BEGIN")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            # A file of an ikos before stamps: the columns are added, and the version
            # stays, so that such an ikos still opens the file (it writes its own
            # columns by name, and its rows are read as it wrote them).
            columns = {row[1] for row in conn.execute("PRAGMA table_info(services)")}
            for column in _STAMP_COLUMNS:
                if column.split()[0] not in columns:
                    conn.execute(f"ALTER TABLE services ADD COLUMN {column}")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- transactions -------------------------------------------------------

    def commit(self) -> None:
        """Make every write since the last commit durable (no-op when none)."""
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Commit pending writes and close the database."""
        try:
            self.commit()
        finally:
            self._conn.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[builtins.list[RegistryEvent]]:
        """One atomic operation: a savepoint in the batch; events emitted on success."""
        events: builtins.list[RegistryEvent] = []
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")
        self._conn.execute("SAVEPOINT op")
        try:
            yield events
        except BaseException:
            self._conn.execute("ROLLBACK TO op")
            self._conn.execute("RELEASE op")
            if self.autocommit:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("RELEASE op")
        if self.autocommit:
            self._conn.execute("COMMIT")
        self._emit(events)

    # -- listeners ----------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(event)`` after every change (see :class:`RegistryEvent`).

        A listener that raises is logged and does not stop the others.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        try:
            self._listeners.remove(callback)
        except ValueError:
            pass

    def _emit(self, events: builtins.list[RegistryEvent]) -> None:
        for event in events:
            for callback in tuple(self._listeners):
                try:
                    callback(event)
                except Exception:
                    log.exception("registry listener %r failed on %s", callback, event.kind)

    # -- services -----------------------------------------------------------

    def register(
        self,
        info: ServiceInfo,
        owner_pid: int | None,
        owner_stamp: ProcessStamp | None = None,
    ) -> ServiceInfo:
        """Register ``info``, owned by process ``owner_pid`` (``None``: the manager).

        ``owner_stamp`` is the owner's :func:`~ikos.platform._process.process_stamp`
        (looked up when ``None``), so that a reused pid is not taken for the owner.
        A name held by another owner that is still alive raises
        :class:`ServiceConflict`; a re-registration by the same owner, by the
        manager, or after the holder died replaces the entry. The stored
        service is returned: active, ``pid`` defaulting to ``owner_pid`` and
        ``start_time`` to the owner's start time (else now).
        """
        validate_service(info)
        if owner_pid is not None and (
            not isinstance(owner_pid, int) or isinstance(owner_pid, bool) or owner_pid <= 0
        ):
            raise InvalidService("owner_pid", f"expected a positive integer, got {owner_pid!r}")
        if owner_pid is not None and owner_stamp is None:
            owner_stamp = process_stamp(owner_pid)
        owner_start_time = None if owner_stamp is None else stamp_time(owner_stamp)
        with self._write() as events:
            row = self._conn.execute(
                "SELECT active, owner_pid, owner_start_time, owner_boot, owner_ticks"
                " FROM services WHERE name = ?",
                (info.name,),
            ).fetchone()
            if row is None:
                count = self._conn.execute("SELECT count(*) FROM services").fetchone()[0]
                if count >= self.max_services:
                    raise RegistryFull(self.max_services)
            else:
                was_active, holder_pid = row[0], row[1]
                if (
                    was_active
                    and owner_pid is not None
                    and holder_pid is not None
                    and holder_pid != owner_pid
                    and process_alive(holder_pid, _owner_start(row[2:]))
                ):
                    raise ServiceConflict(info.name, holder_pid)
            stored = replace(
                info,
                capabilities=tuple(info.capabilities),
                metadata=dict(info.metadata),
                active=True,
                pid=info.pid if info.pid is not None else owner_pid,
                start_time=(
                    info.start_time
                    if info.start_time is not None
                    else owner_start_time
                    if owner_start_time is not None
                    else time.time()
                ),
            )
            self._conn.execute(
                f"INSERT OR REPLACE INTO services ({_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.name,
                    stored.description,
                    stored.version,
                    stored.type,
                    stored.endpoint,
                    json.dumps(builtins.list(stored.capabilities)),
                    stored.pid,
                    1,
                    stored.start_time,
                    stored.owner,
                    stored.health,
                    json.dumps(stored.metadata),
                    owner_pid,
                    owner_start_time,
                    None if owner_stamp is None else owner_stamp[0],
                    None if owner_stamp is None else owner_stamp[1],
                ),
            )
            self._conn.execute("DELETE FROM capabilities WHERE name = ?", (stored.name,))
            self._conn.executemany(
                "INSERT INTO capabilities (capability, name) VALUES (?, ?)",
                [(cap, stored.name) for cap in stored.capabilities],
            )
            kind: EventKind = "active" if row is not None and not row[0] else "registered"
            events.append(RegistryEvent(kind, stored))
        return replace(stored, metadata=dict(stored.metadata))

    def unregister(self, name: str, owner_pid: int | None = None) -> ServiceInfo:
        """Remove service ``name`` and its dependency edges; return it as it was.

        Only its owner (``owner_pid``) or the manager (``owner_pid=None``) may:
        :class:`NotServiceOwner` otherwise, :class:`NoSuchService` when there
        is no such service.
        """
        with self._write() as events:
            info, holder_pid, _ = self._get_full(name)
            if owner_pid is not None and holder_pid != owner_pid:
                raise NotServiceOwner(name, holder_pid, owner_pid)
            self._conn.execute("DELETE FROM services WHERE name = ?", (name,))
            self._conn.execute("DELETE FROM capabilities WHERE name = ?", (name,))
            self._conn.execute(
                "DELETE FROM dependencies WHERE name = ? OR depends_on = ?", (name, name)
            )
            events.append(RegistryEvent("unregistered", info))
        return info

    def get(self, name: str) -> ServiceInfo:
        """The service ``name``; :class:`NoSuchService` when there is none."""
        return self._get_full(name)[0]

    def owner_of(self, name: str) -> tuple[int | None, OwnerStart]:
        """``(owner_pid, owner_start)`` of service ``name`` (``None`` pid: the manager).

        ``owner_start`` is for :func:`process_alive` (see :data:`OwnerStart`).
        """
        _, pid, start = self._get_full(name)
        return pid, start

    def discover(
        self,
        name: str | None = None,
        pattern: str | None = None,
        capability: str | None = None,
        type: str | None = None,
        active_only: bool = False,
    ) -> builtins.list[ServiceInfo]:
        """The services matching every criterion given, sorted by name.

        ``name`` is an exact name, ``pattern`` a shell glob with
        :func:`fnmatch.fnmatchcase` semantics (``net/*``, ``*:dhcp?``,
        ``[ab]*``), ``capability`` one capability the service must offer,
        ``type`` its exact type; ``active_only`` leaves out inactive ones.
        No criterion lists everything.

        Example::

            >>> [s.name for s in store.discover(pattern="net/*", capability="dhcpv4")]
            ['net/dhcp']
        """
        for key, value in (("name", name), ("capability", capability), ("type", type)):
            if value is not None and not isinstance(value, str):
                raise InvalidService(key, f"expected a string, got {value!r:.60}")
        where: builtins.list[str] = []
        params: builtins.list[object] = []
        match: Callable[[str], object] | None = None
        if name is not None:
            where.append("name = ?")
            params.append(name)
        if pattern is not None:
            if not isinstance(pattern, str) or len(pattern) > PATTERN_MAX:
                raise InvalidService(
                    "pattern", f"expected a glob of at most {PATTERN_MAX} characters"
                )
            prefix = _GLOB_SPECIAL.split(pattern, maxsplit=1)[0]
            if prefix == pattern:
                where.append("name = ?")
                params.append(pattern)
            else:
                if prefix:
                    where.append("name >= ? AND name < ?")
                    params.extend((prefix, prefix + _TOP))
                match = re.compile(fnmatch.translate(pattern), re.DOTALL).match
        if capability is not None:
            where.append("name IN (SELECT name FROM capabilities WHERE capability = ?)")
            params.append(capability)
        if type is not None:
            where.append("type = ?")
            params.append(type)
        if active_only:
            where.append("active = 1")
        sql = f"SELECT {_COLUMNS} FROM services"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name"
        found = []
        for row in self._conn.execute(sql, params):
            if match is None or match(row[0]):
                found.append(_info_from_row(row))
        return found

    def list(self) -> builtins.list[ServiceInfo]:
        """Every service, active or not, sorted by name."""
        return self.discover()

    def count(self, active_only: bool = False) -> int:
        """How many services are registered (only active ones with ``active_only``)."""
        sql = "SELECT count(*) FROM services" + (" WHERE active = 1" if active_only else "")
        return int(self._conn.execute(sql).fetchone()[0])

    def mark_owner_dead(self, pid: int) -> builtins.list[str]:
        """Turn every active service owned by process ``pid`` inactive; return their names.

        The manager calls this when it sees ``pid`` exit. Each service's
        health becomes ``critical`` and an ``inactive`` event is emitted.
        """
        with self._write() as events:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM services WHERE owner_pid = ? AND active = 1 ORDER BY name",
                (pid,),
            ).fetchall()
            events.extend(self._deactivate([_info_from_row(row) for row in rows]))
        return [event.info.name for event in events]

    def reconcile_dead_owners(self) -> builtins.list[str]:
        """Turn inactive every active service whose owner process is gone; return their names.

        For the manager's start: an owner is gone when its pid no longer
        exists or now belongs to a process with another start time (see
        :func:`process_alive`). Services registered by the manager itself
        (no owner pid) are left alone.
        """
        with self._write() as events:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM services WHERE owner_pid IS NOT NULL AND active = 1"
                " ORDER BY name"
            ).fetchall()
            alive: dict[tuple[int, OwnerStart], bool] = {}
            dead = []
            for row in rows:
                key = (row[12], _owner_start(row[13:]))
                if key not in alive:
                    alive[key] = process_alive(*key)
                if not alive[key]:
                    dead.append(_info_from_row(row))
            events.extend(self._deactivate(dead))
        return [event.info.name for event in events]

    def set_active(self, name: str, active: bool) -> ServiceInfo:
        """Turn service ``name`` active or inactive by the manager's decision.

        For services the manager registered on a daemon's behalf, when the
        daemon stops or starts. Emits ``active``/``inactive`` when it changes;
        turning inactive also sets health to ``critical``.
        """
        with self._write() as events:
            info = self.get(name)
            if info.active != active:
                if active:
                    self._conn.execute("UPDATE services SET active = 1 WHERE name = ?", (name,))
                    info = replace(info, active=True)
                    events.append(RegistryEvent("active", info))
                else:
                    events.extend(self._deactivate([info]))
                    info = events[-1].info
        return info

    def set_health(self, name: str, health: str) -> ServiceInfo:
        """Set the health of service ``name`` (``unknown|passing|warning|critical``).

        Emits a ``health`` event when it changes; returns the service.
        """
        if health not in HEALTH_STATES:
            raise InvalidService(
                "health", f"expected one of {', '.join(HEALTH_STATES)}, got {health!r}"
            )
        with self._write() as events:
            info = self.get(name)
            if info.health != health:
                self._conn.execute("UPDATE services SET health = ? WHERE name = ?", (health, name))
                info = replace(info, health=health)
                events.append(RegistryEvent("health", info))
        return info

    def _deactivate(self, infos: builtins.list[ServiceInfo]) -> builtins.list[RegistryEvent]:
        self._conn.executemany(
            "UPDATE services SET active = 0, health = 'critical' WHERE name = ?",
            [(info.name,) for info in infos],
        )
        return [
            RegistryEvent("inactive", replace(info, active=False, health="critical"))
            for info in infos
        ]

    def _get_full(self, name: str) -> tuple[ServiceInfo, int | None, OwnerStart]:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM services WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NoSuchService(name)
        return _info_from_row(row), row[12], _owner_start(row[13:])

    # -- dependencies -------------------------------------------------------

    def add_dependency(self, name: str, depends_on: str) -> None:
        """Record that service ``name`` depends on service ``depends_on``.

        Both must be registered (:class:`NoSuchService`). A self-dependency
        or an edge that would close a cycle raises
        :class:`~ikos.registry._graph.DependencyCycle`, whose message prints
        the cycle (``dependency cycle: a -> b -> c -> a``). At most
        ``MAX_DEPENDENCIES`` per service. Adding an existing edge is a no-op.
        """
        check_service_name(name)
        check_service_name(depends_on, "depends_on")
        with self._write():
            self._get_full(name)
            self._get_full(depends_on)
            if name == depends_on:
                raise DependencyCycle([name, name])
            deps = self.get_dependencies(name)
            if depends_on in deps:
                return
            if len(deps) >= MAX_DEPENDENCIES:
                raise InvalidService(
                    "dependencies",
                    f"service '{name}' already has the limit of {MAX_DEPENDENCIES} dependencies",
                )
            path = self._dependency_path(depends_on, name)
            if path is not None:
                raise DependencyCycle([name, *path])
            self._conn.execute(
                "INSERT INTO dependencies (name, depends_on) VALUES (?, ?)", (name, depends_on)
            )

    def remove_dependency(self, name: str, depends_on: str) -> bool:
        """Forget that ``name`` depends on ``depends_on``; return whether it did.

        :class:`NoSuchService` when ``name`` is not registered.
        """
        with self._write():
            self._get_full(name)
            cursor = self._conn.execute(
                "DELETE FROM dependencies WHERE name = ? AND depends_on = ?", (name, depends_on)
            )
            return cursor.rowcount > 0

    def get_dependencies(self, name: str) -> builtins.list[str]:
        """The services ``name`` directly depends on, sorted; :class:`NoSuchService` if unknown."""
        self._get_full(name)
        rows = self._conn.execute(
            "SELECT depends_on FROM dependencies WHERE name = ? ORDER BY depends_on", (name,)
        )
        return [row[0] for row in rows]

    def _dependency_path(self, start: str, goal: str) -> builtins.list[str] | None:
        """A path ``[start, ..., goal]`` along dependency edges, or ``None``.

        An iterative depth-first search, one indexed query per visited
        service: adding an edge touches only what is reachable from it,
        where rebuilding a networkx graph of the whole registry would not.
        """
        parent: dict[str, str | None] = {start: None}
        stack = [start]
        while stack:
            node = stack.pop()
            if node == goal:
                path = [node]
                while (previous := parent[path[-1]]) is not None:
                    path.append(previous)
                return path[::-1]
            rows = self._conn.execute(
                "SELECT depends_on FROM dependencies WHERE name = ? ORDER BY depends_on DESC",
                (node,),
            )
            for (dep,) in rows:
                if dep not in parent:
                    parent[dep] = node
                    stack.append(dep)
        return None


def _owner_start(columns: tuple[Any, ...]) -> OwnerStart:
    """The owner's start from ``(owner_start_time, owner_boot, owner_ticks)``."""
    start_time, boot, ticks = columns
    return start_time if boot is None else (boot, ticks)


def _info_from_row(row: tuple[Any, ...]) -> ServiceInfo:
    return ServiceInfo(
        name=row[0],
        description=row[1],
        version=row[2],
        type=row[3],
        endpoint=row[4],
        capabilities=tuple(json.loads(row[5])),
        pid=row[6],
        active=bool(row[7]),
        start_time=row[8],
        owner=row[9],
        health=row[10],
        metadata=json.loads(row[11]),
    )
