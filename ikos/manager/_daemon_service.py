"""Daemons created and changed at run time: the manager's side of :mod:`ikos.daemon`.

:class:`DaemonService` is a manager extension (:mod:`ikos.manager._extension`)
serving four control verbs (``docs/protocol.md``):

- ``daemon_create`` adds an executable to a running supervisor, as OTP's
  ``supervisor:start_child``: the spec is validated first (field types, the
  whole tree's names and dependencies, then :func:`build_exec_plan`, which
  resolves users, files and limits), and a daemon that fails to start is
  not kept. With ``auto_start = false`` it joins the tree held, stopped
  until started.
- ``daemon_update`` changes fields of any executable, created or from the
  configuration. Fields that shape the process (executable, arguments,
  environment, directory, user, limits, stdio...) restart a running daemon
  to apply; restart-policy fields (``auto_restart``, ``restart_delay``,
  ``max_restarts``, ``restart_on``, ``backoff``...) are read by the
  supervisor at the daemon's next exit, so they apply without a restart. A
  stopped or failed daemon keeps the change for its next start.
- ``daemon_revert`` drops the changes made to a daemon of the
  configuration, as ``systemctl revert`` drops ``set-property`` drop-ins.
- ``daemon_delete`` stops and removes a created daemon.
- ``daemon_get`` (read) returns a daemon's current configuration.

Persistence: created daemons and the changes made to configured ones are
rows of ``daemons.db`` (SQLite) in the state directory, committed before a
request is answered. Through the extension hook ``amend_tree``, called
before the root supervisor is built, the service puts the created daemons
into the tree the manager is about to run (with the changes applied to the
configured ones): they start in order with everything else, ``requires``
included, and ``auto_start = false`` ones join held. A configuration reload
goes through the same hook, so that ``reload-config`` neither removes
created daemons nor undoes changes.

Rejected: replaying ``daemon_create`` requests once the tree is running.
That would start created daemons after the ready line, outside the start
order, and a daemon whose ``requires`` names another created one would
depend on replay order; making them part of the tree gives them the same
life as every other child.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ikos._errors import (
    ConfigError,
    DaemonExists,
    IkosError,
    ManagerError,
    NoSuchDaemon,
    SpawnError,
    SpecError,
)
from ikos.manager._control_server import BadRequest, Request
from ikos.manager._extension import Extension, ExtensionHost, NodeView, Operations, TreeView
from ikos.platform._database import close_quietly, open_database, write_durably
from ikos.platform._exec_options import EXEC_OPTIONS
from ikos.platform._fields import json_value
from ikos.platform._spawn import build_exec_plan
from ikos.registry._graph import check_graph
from ikos.supervision._edit import find_spec, insert_spec, replace_spec
from ikos.supervision._runtime import StartFailed
from ikos.supervision._spec import (
    EXEC_FIELDS,
    EXEC_SPEC_KEYS,
    NAME_RE,
    NAME_RULE,
    Backoff,
    Exec,
    Supervisor,
    validate_child,
    validate_tree,
)

log = logging.getLogger("ikos.daemons")

DB_NAME = "daemons.db"
#: Bound on the daemons a client can make the manager keep.
MAX_CREATED = 1024

#: Fields of the spec itself (``Exec`` attributes); ``supervisor`` says where it joins.
SPEC_KEYS: tuple[str, ...] = ("name", "executable", "supervisor", *EXEC_SPEC_KEYS)
#: The daemon's fields (its options and restart policy: ``ikos.Exec``'s one table).
FIELD_KEYS: tuple[str, ...] = tuple(EXEC_FIELDS)
#: Fields read when the daemon exits or stops, or at its next start: changing
#: them never restarts it. Every other field shapes the running process.
LIVE_FIELDS: frozenset[str] = frozenset(k for k, f in EXEC_FIELDS.items() if not f.restarts)

SCHEMA = """
CREATE TABLE IF NOT EXISTS created (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changed (
    name TEXT PRIMARY KEY,
    changes TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""
META_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# --- pure logic: configurations and specs ------------------------------------------------


def _where(name: str) -> str:
    return f"daemon {name}"


def _names(name: str, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple) and all(isinstance(n, str) and n for n in value):
        return tuple(value)
    raise ConfigError(None, _where(name), key, "a list of daemon names", value)


def _backoff(name: str, value: object) -> Backoff | None:
    if value is None or isinstance(value, Backoff):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(
            None, _where(name), "backoff", "a table {min, max, random_factor, reset_after}", value
        )
    known = {f.name for f in dataclasses.fields(Backoff)}
    for key in value:
        if key not in known:
            raise ConfigError(None, _where(name), f"backoff.{key}", "one of " + ", ".join(known))
    return Backoff(**value)


#: The defaults a None in a change restores, for the keys that are not daemon fields.
_SPEC_DEFAULTS: dict[str, Any] = {
    "restart": "permanent",
    "shutdown": 5.0,
    "requires": (),
    "after": (),
    "description": "",
    "start_timeout": 30.0,
    "backoff": None,
}


def _spec_value(name: str, key: str, value: Any) -> Any:
    """A JSON value of a spec key as ``Exec`` takes it; ``validate_child`` checks the rest."""
    if value is None:
        return _SPEC_DEFAULTS[key]
    if key in ("requires", "after"):
        return _names(name, key, value)
    if key == "backoff":
        return _backoff(name, value)
    return value


def apply_changes(spec: Exec, changes: Mapping[str, Any]) -> Exec:
    """``spec`` with ``changes`` applied (a None value resets a field); validated.

    ``name`` may be given but not changed; ``supervisor`` is the caller's
    business and ignored here. The daemon's fields are checked by ``Exec``
    (their one table), the rest by ``validate_child``; errors are
    :class:`ConfigError` naming the daemon and the field. What only the
    machine can tell (users, files) is :func:`build_exec_plan`'s.
    """
    name = spec.name
    attrs: dict[str, Any] = {key: getattr(spec, key) for key in EXEC_SPEC_KEYS}
    executable = spec.executable
    fields = dict(spec.fields)
    for key, value in changes.items():
        if key == "supervisor":
            continue
        if key == "name":
            if value != name:
                raise ConfigError(None, _where(name), "name", f"'{name}' (names do not change)")
        elif key == "executable":
            if not isinstance(value, str) or not value:
                raise SpawnError(name, "executable", f"expected a path or a command, got {value!r}")
            executable = value
        elif key in attrs:
            attrs[key] = _spec_value(name, key, value)
        else:
            fields[key] = value  # None: back to the default; unknown keys: Exec says so
    try:
        new = Exec(name, executable, **attrs, fields=fields)
        validate_child(_where(name), new)
    except SpecError as exc:
        raise ConfigError(None, _where(name), exc.key, exc.expected, exc.got) from None
    return new


def exec_from_config(config: object) -> tuple[Exec, str | None]:
    """The spec and supervisor of a ``daemon_create`` configuration; validated."""
    if not isinstance(config, Mapping):
        raise ConfigError(None, "daemon", None, "an object of daemon fields", type(config).__name__)
    name = config.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(None, "daemon", "name", NAME_RULE, name)
    executable = config.get("executable")
    if not isinstance(executable, str) or not executable:
        raise SpawnError(name, "executable", f"expected a path or a command, got {executable!r}")
    supervisor = config.get("supervisor")
    if supervisor is not None and not isinstance(supervisor, str):
        raise ConfigError(None, _where(name), "supervisor", "the name of a supervisor", supervisor)
    return apply_changes(Exec(name, executable), config), supervisor


def _json_value(value: Any) -> Any:
    if isinstance(value, Backoff):
        return dataclasses.asdict(value)
    return json_value(value)


def config_of(spec: Exec, supervisor: str | None) -> dict[str, Any]:
    """A spec as a JSON configuration (what ``daemon_create`` takes and ``daemon_get`` gives)."""
    out: dict[str, Any] = {"name": spec.name, "executable": spec.executable}
    if supervisor is not None:
        out["supervisor"] = supervisor
    out.update(
        restart=spec.restart,
        shutdown=spec.shutdown,
        requires=list(spec.requires),
        after=list(spec.after),
        description=spec.description,
        start_timeout=spec.start_timeout,
        backoff=_json_value(spec.backoff),
    )
    for key, value in spec.fields.items():
        out[key] = EXEC_FIELDS[key].to_json(value)
    return out


def needs_restart(old: Exec, new: Exec) -> bool:
    """Whether a running daemon must restart for ``new`` to apply (see LIVE_FIELDS)."""
    if old.executable != new.executable:
        return True
    return any(
        getattr(old.options, key) != getattr(new.options, key)
        for key, field in EXEC_OPTIONS.items()
        if field.restarts
    )


def checked_tree(tree: Supervisor, daemon: str) -> tuple[Supervisor, Any]:
    """``validate_tree`` and ``check_graph``, their errors told about ``daemon``."""
    try:
        return validate_tree(tree), check_graph(tree)
    except SpecError as exc:
        raise ConfigError(None, _where(daemon), exc.key, f"{exc.expected} (at {exc.path})", exc.got)


_EXEC_FAILED = re.compile(r"^exec failed: ([a-z_.]+): (.*)$", re.DOTALL)


def start_error(name: str, exc: StartFailed) -> SpawnError:
    """A start failure as a SpawnError, naming the field when the exec said which."""
    reason = exc.reason.reason
    found = _EXEC_FAILED.match(reason)
    if found:
        return SpawnError(name, found.group(1), found.group(2))
    return SpawnError(name, None, f"failed to start: {reason}")


# --- the store ---------------------------------------------------------------------------


class DaemonStore:
    """``daemons.db``: created daemons' configurations, changes to configured ones.

    Each change is committed (``synchronous=FULL``: it survives a power cut)
    before the request that made it is answered, and the whole table is then
    mirrored to ``daemons.json`` (written aside, synced, renamed), both
    stamped with a generation number. A ``daemons.db`` that is damaged, or
    older than its mirror (truncated, replaced by an old copy), is restored
    from the mirror, and :attr:`problem` says what happened, for ikosd to log:
    a created daemon is never silently forgotten.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mirror = path.with_suffix(".json")
        self.db, damage = open_database(path, SCHEMA + META_SCHEMA, synchronous="FULL")
        #: What was wrong with the files when they were opened, and what was done.
        self.problem: str | None = None
        self._lock = threading.Lock()
        self.generation = self._generation()
        mirrored, mirror_problem = self._read_mirror()
        if mirrored is not None and (damage or mirrored["generation"] > self.generation):
            self._restore(mirrored)
            self.problem = (
                f"{damage or f'{path} is older than its mirror (it was truncated or replaced)'}; "
                f"restored {len(mirrored['created'])} created daemons and "
                f"{len(mirrored['changed'])} changes from {self.mirror.name}"
            )
        elif damage:
            self.problem = (
                f"{damage}; no usable {self.mirror.name} either ({mirror_problem}): the daemons "
                "created at run time and the changes made to configured ones are lost"
            )
        elif mirror_problem and (self.generation or self.created() or self.changed()):
            self.problem = f"{self.mirror.name} {mirror_problem}: written again from {path.name}"
            self._write_mirror()

    def close(self) -> None:
        close_quietly(self.db)

    def _generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _read_mirror(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            data = json.loads(self.mirror.read_text())
        except FileNotFoundError:
            return None, "is missing"
        except (OSError, ValueError) as exc:
            return None, f"is unreadable ({exc})"
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("generation"), int)
            or not isinstance(data.get("created"), list)
            or not isinstance(data.get("changed"), dict)
            or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str) for e in data["created"]
            )
        ):
            return None, "is not a mirror of daemons.db"
        return data, None

    def _restore(self, mirrored: dict[str, Any]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM created")
        db.execute("DELETE FROM changed")
        now = time.time()
        for entry in mirrored["created"]:
            db.execute(
                "INSERT INTO created (name, config, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (entry["name"], json.dumps(entry.get("config", {}), sort_keys=True), now, now),
            )
        for name, changes in mirrored["changed"].items():
            db.execute(
                "INSERT INTO changed (name, changes, updated_at) VALUES (?, ?, ?)",
                (str(name), json.dumps(changes, sort_keys=True), now),
            )
        self._set_generation(int(mirrored["generation"]))
        db.execute("COMMIT")

    def _set_generation(self, generation: int) -> None:
        self.generation = generation
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(generation),),
        )

    def _write_mirror(self) -> None:
        document = {
            "generation": self.generation,
            "created": [{"name": n, "config": c} for n, c in self.created().items()],
            "changed": self.changed(),
        }
        write_durably(self.mirror, json.dumps(document, sort_keys=True, indent=1))

    def _change(self, sql: str, params: tuple[Any, ...]) -> None:
        """One change: committed with a new generation, then mirrored.

        Called from a worker thread (the commit and the mirror wait for the
        disk), one change at a time.
        """
        with self._lock:
            self._change_locked(sql, params)

    def _change_locked(self, sql: str, params: tuple[Any, ...]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(sql, params)
            self._set_generation(self.generation + 1)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.generation = self._generation()
            raise
        try:
            self._write_mirror()
        except OSError as exc:
            log.error("cannot write %s: %s (daemons.db has the change)", self.mirror, exc)

    def _rows(self, sql: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, text in self.db.execute(sql):
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                log.error("%s: the row of '%s' is not a JSON object: ignored", self.path, name)
                continue
            out[name] = value
        return out

    def created(self) -> dict[str, dict[str, Any]]:
        """Created daemons' configurations, in creation order."""
        return self._rows("SELECT name, config FROM created ORDER BY rowid")

    def changed(self) -> dict[str, dict[str, Any]]:
        """Changes made to daemons of the configuration, by name."""
        return self._rows("SELECT name, changes FROM changed")

    def put_created(self, name: str, config: Mapping[str, Any]) -> None:
        now = time.time()
        self._change(
            "INSERT INTO created (name, config, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET config = excluded.config, "
            "updated_at = excluded.updated_at",
            (name, json.dumps(config, sort_keys=True), now, now),
        )

    def delete_created(self, name: str) -> None:
        self._change("DELETE FROM created WHERE name = ?", (name,))

    def put_changes(self, name: str, changes: Mapping[str, Any]) -> None:
        self._change(
            "INSERT INTO changed (name, changes, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET changes = excluded.changes, "
            "updated_at = excluded.updated_at",
            (name, json.dumps(changes, sort_keys=True), time.time()),
        )

    def delete_changes(self, name: str) -> None:
        self._change("DELETE FROM changed WHERE name = ?", (name,))


# --- the service -------------------------------------------------------------------------


class DaemonService(Extension):
    """The manager extension; see the module docstring."""

    name = "daemons"

    def __init__(self) -> None:
        self._view: TreeView | None = None
        self._ops: Operations | None = None
        self.store: DaemonStore | None = None
        #: created daemons: name -> JSON configuration (its supervisor included)
        self.created: dict[str, dict[str, Any]] = {}
        #: changes to configured daemons, and the specs the configuration gave them
        self.changes: dict[str, dict[str, Any]] = {}
        self.base_specs: dict[str, Exec] = {}
        #: created daemons that could not join the tree at start, with the reason
        self.unrestored: dict[str, str] = {}
        self._pending: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def view(self) -> TreeView:
        assert self._view is not None, "the daemon service has not started"
        return self._view

    @property
    def ops(self) -> Operations:
        assert self._ops is not None, "the daemon service has not started"
        return self._ops

    # -- extension interface -------------------------------------------------------

    async def start(self, host: ExtensionHost) -> None:
        self._view, self._ops = host.view, host.ops
        self.store = DaemonStore(host.view.paths.state_dir / DB_NAME)
        if self.store.problem:
            log.error("%s", self.store.problem)
        self.created = self.store.created()
        self.changes = self.store.changed()
        verbs = host.verbs
        verbs.register("daemon_create", "control", self.create)
        verbs.register("daemon_update", "control", self.update)
        verbs.register("daemon_revert", "control", self.revert)
        verbs.register("daemon_delete", "control", self.delete)
        verbs.register("daemon_get", "private", self.get)

    def amend_tree(self, tree: Supervisor, *, at_start: bool) -> Supervisor:
        desired = self._desired(tree, at_start=at_start)
        if at_start and (self.created or self.changes):
            log.info(
                "%d created daemons, %d changed daemons restored from %s",
                len(self.created) - len(self.unrestored),
                len(self.changes),
                self._store().path,
            )
        return desired

    async def stop(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        if node.kind != "exec":
            return
        status["created"] = node.name in self.created
        changed = self.changes.get(node.name)
        if changed:
            status["changed"] = sorted(changed)

    # -- the desired tree: configuration + created daemons + changes ------------------

    def _desired(self, tree: Supervisor, *, at_start: bool = False) -> Supervisor:
        """``tree`` (the configuration's) with the changes applied and created daemons added.

        At start, a created daemon that cannot join (its supervisor is gone, its
        name now taken, a dependency missing) is left out and logged, and a change
        that no longer applies is skipped; on a reload either refuses the reload.
        """
        self.base_specs = {}
        for name, changes in self.changes.items():
            found = find_spec(tree, name)
            if found is None or not isinstance(found[0], Exec):
                continue  # kept: it applies again if the daemon comes back
            try:
                changed = apply_changes(found[0], changes)
            except IkosError as exc:
                if not at_start:
                    raise
                log.error("the changes made to daemon '%s' no longer apply: %s", name, exc)
                continue
            self.base_specs[name] = found[0]
            tree = replace_spec(tree, changed)
        self.unrestored = {}
        for name, config in self.created.items():
            try:
                spec, parent = exec_from_config(config)
                tree = self._joined(tree, spec, parent)
            except IkosError as exc:
                if not at_start:
                    raise ConfigError(
                        None,
                        _where(name),
                        None,
                        f"a configuration that leaves room for this created daemon, "
                        f"or ikos.daemon.delete('{name}') first ({exc})",
                    )
                log.error("created daemon '%s' was not restored: %s", name, exc)
                self.unrestored[name] = str(exc)
        return tree

    def _joined(self, tree: Supervisor, spec: Exec, parent: str | None) -> Supervisor:
        """``tree`` with ``spec`` added under ``parent`` (default the root); validated."""
        parent = parent or tree.name
        if find_spec(tree, spec.name) is not None:
            raise DaemonExists(spec.name)
        found = find_spec(tree, parent)
        if found is None or not isinstance(found[0], Supervisor):
            raise ConfigError(
                None, _where(spec.name), "supervisor", "the name of a supervisor", parent
            )
        if found[0].strategy == "simple_one_for_one":
            raise ConfigError(
                None,
                _where(spec.name),
                "supervisor",
                f"a supervisor that takes named children ('{parent}' is simple_one_for_one)",
                parent,
            )
        new, _ = checked_tree(insert_spec(tree, parent, spec), spec.name)
        return new

    # -- helpers ----------------------------------------------------------------------

    def _store(self) -> DaemonStore:
        if self.store is None:
            raise ManagerError("ikosd is shutting down")
        return self.store

    def _lock(self, name: str) -> asyncio.Lock:
        """The lock that serialises changes to one daemon (only for names that exist)."""
        lock = self._locks.get(name)
        if lock is None:
            if self.view.find(name) is None and name not in self.created:
                raise NoSuchDaemon(f"no daemon named '{name}'")
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _exec_node(self, name: str) -> NodeView:
        node = self.view.node(name)
        if node.kind != "exec" or not isinstance(node.spec, Exec):
            raise ManagerError(
                f"'{name}' is {'an actor' if node.kind == 'actor' else 'a supervisor'}: "
                "only executables have daemon fields"
            )
        return node

    def _supervisor_of(self, name: str) -> str | None:
        node = self.view.find(name)
        return node.parent.name if node is not None and node.parent is not None else None

    async def _add(self, spec: Exec, parent: str | None) -> NodeView:
        """Join ``spec`` to its supervisor (OTP's start_child: not kept if it fails)."""
        view = self.view
        self._joined(view.tree, spec, parent)  # names, supervisor, dependencies
        build_exec_plan(spec, view.paths)  # users, files, limits: SpawnError naming the field
        # auto_start = false: the node joins held (the supervision runtime decides)
        return await self.ops.add_child(spec, parent, start=True)

    async def _apply(self, node: NodeView, spec: Exec) -> dict[str, Any]:
        old = node.spec
        assert isinstance(old, Exec)
        try:
            await self.ops.update_child(node.name, spec, restart=needs_restart(old, spec))
        except StartFailed as exc:
            raise start_error(node.name, exc)
        return self.view.status_of(node)

    # -- verbs ------------------------------------------------------------------------

    async def create(self, req: Request) -> Any:
        """``daemon_create {"config": {...}}``: the new daemon's status."""
        try:
            spec, parent = exec_from_config(req.args.get("config"))
            name = spec.name
            if name in self._pending or name in self.created or self.view.find(name):
                if name in self.unrestored:
                    raise DaemonExists(
                        name,
                        f"a created daemon named '{name}' exists but was not restored "
                        f"({self.unrestored[name]}): delete it first",
                    )
                raise DaemonExists(name)
            if len(self.created) >= MAX_CREATED:
                raise ManagerError(
                    f"ikosd keeps at most {MAX_CREATED} created daemons: delete some first",
                    "limit",
                )
            config = config_of(spec, parent)
            self._pending.add(name)
            try:
                store = self._store()
                await asyncio.to_thread(store.put_created, name, config)
                try:
                    node = await self._add(spec, parent)
                except BaseException:
                    await asyncio.to_thread(store.delete_created, name)
                    raise
                self.created[name] = config
            finally:
                self._pending.discard(name)
        except StartFailed as exc:
            raise _refusal(start_error(exc.name, exc))
        except IkosError as exc:
            raise _refusal(exc)
        log.info("daemon '%s' created by pid %d", name, req.pid)
        return self.view.status_of(node)

    async def update(self, req: Request) -> Any:
        """``daemon_update {"name", "changes": {...}}``: the status once applied."""
        name = req.text("name")
        changes = req.args.get("changes")
        if not isinstance(changes, dict):
            raise BadRequest("'daemon_update' needs 'changes' as an object of fields")
        try:
            async with self._lock(name):
                node = self._exec_node(name)
                old = node.spec
                assert isinstance(old, Exec)
                if "supervisor" in changes and changes["supervisor"] != self._supervisor_of(name):
                    raise ConfigError(
                        None,
                        _where(name),
                        "supervisor",
                        f"'{self._supervisor_of(name)}' (to move a daemon, delete and create it)",
                        changes["supervisor"],
                    )
                spec = apply_changes(old, changes)
                checked_tree(replace_spec(self.view.tree, spec), name)
                build_exec_plan(spec, self.view.paths)
                store = self._store()
                if name in self.created:
                    config = config_of(spec, self.created[name].get("supervisor"))
                    await asyncio.to_thread(store.put_created, name, config)
                    self.created[name] = config
                else:
                    merged = {**self.changes.get(name, {}), **_json_value(dict(changes))}
                    merged.pop("name", None)
                    merged.pop("supervisor", None)
                    await asyncio.to_thread(store.put_changes, name, merged)
                    self.changes[name] = merged
                    self.base_specs.setdefault(name, old)
                log.info(
                    "daemon '%s' changed by pid %d: %s", name, req.pid, ", ".join(sorted(changes))
                )
                return await self._apply(node, spec)
        except StartFailed as exc:
            raise _refusal(start_error(name, exc))
        except IkosError as exc:
            raise _refusal(exc)

    async def revert(self, req: Request) -> Any:
        """``daemon_revert {"name"}``: back to the configuration's fields."""
        name = req.text("name")
        try:
            async with self._lock(name):
                node = self._exec_node(name)
                if name in self.created:
                    raise ManagerError(
                        f"'{name}' was created at run time: it has no configuration to revert to"
                    )
                base = self.base_specs.pop(name, None)
                if name in self.changes:
                    await asyncio.to_thread(self._store().delete_changes, name)
                    del self.changes[name]
                if base is None:
                    return self.view.status_of(node)
                log.info("daemon '%s' reverted to its configuration by pid %d", name, req.pid)
                return await self._apply(node, base)
        except IkosError as exc:
            raise _refusal(exc)

    async def delete(self, req: Request) -> Any:
        """``daemon_delete {"name"}``: stop and remove a created daemon."""
        name = req.text("name")
        try:
            async with self._lock(name):
                view = self.view
                if name not in self.created:
                    if view.find(name) is not None:
                        raise ManagerError(
                            f"'{name}' is part of the configuration, not created at run time: "
                            "remove it from the configuration and reload"
                        )
                    raise NoSuchDaemon(f"no daemon named '{name}'")
                users = [
                    spec.name
                    for _, spec in view.tree.walk()
                    if name in spec.requires or name in spec.after
                ]
                if users:
                    raise ManagerError(
                        f"'{name}' is needed by {', '.join(users)} (requires/after): "
                        "change or delete those first"
                    )
                if view.find(name) is not None:
                    await self.ops.remove_child(name)
                await asyncio.to_thread(self._store().delete_created, name)
                del self.created[name]
                self.unrestored.pop(name, None)
                self._locks.pop(name, None)
                log.info("daemon '%s' deleted by pid %d", name, req.pid)
                return {"name": name, "deleted": True}
        except IkosError as exc:
            raise _refusal(exc)

    async def get(self, req: Request) -> Any:
        """``daemon_get {"name"}``: ``{"config", "created", "changes"}``."""
        name = req.text("name")
        if name in self.unrestored:
            return {"config": self.created[name], "created": True, "changes": {}}
        node = self._exec_node(name)
        assert isinstance(node.spec, Exec)
        return {
            "config": config_of(node.spec, self._supervisor_of(name)),
            "created": name in self.created,
            "changes": self.changes.get(name, {}),
        }


def _refusal(exc: IkosError) -> ManagerError:
    """The protocol error of a refused request: field errors get their own codes."""
    if isinstance(exc, ManagerError):
        return exc
    if isinstance(exc, SpawnError):
        return ManagerError(str(exc), "spawn_error")
    if isinstance(exc, ConfigError):
        return ManagerError(str(exc), "config_error")
    return ManagerError(str(exc))
