"""Load ``ikos.toml``: turn a configuration file into a validated supervision tree.

:func:`load_config` is a pure function from a file (and, when ``ikosd`` also
got ``--tree``, a Python :class:`~ikos.supervision._spec.Supervisor`) to a
:class:`LoadedConfig`: the tree as plain spec values, the manager's own
settings and the warnings to show. Nothing is started here, so ``ikosd``, a
reload (which diffs two trees) and the tests all use the same code.

Main design choice: each table is read key by key through a few typed
readers that know the file and the table, so a bad entry fails with a
:class:`~ikos._errors.ConfigError` naming file, table, key, what was expected
and what was found; then the assembled tree goes through the same
``validate_tree`` the Python API uses, and its errors, which name a tree path
(``root/workers/echo``), are mapped back to the table that produced the
entry (``[actors.echo]``). An executable's own fields (``args``, ``user``,
``limits``, ``restart_delay``...) are not read here: ``ikos.Exec`` checks
them with their one table (:mod:`ikos.platform._exec_options`, shared with
the Python API and the ``daemon_*`` verbs), and its error is mapped to the
table and key the same way. A schema library (pydantic, jsonschema) was
rejected: its messages name JSON paths rather than TOML tables, and the
checks fit on a few screens.

Start order: ``tomllib`` keeps insertion order only inside one table, so the
order of children of different kinds (``[actors.*]``, ``[executables.*]``,
``[supervisors.*]``) is recovered from the text: a line scanner records the
line where each entry is first defined, by a table header or a key.

Service metadata (``[actors.NAME.service]``) and health checks
(``[[actors.NAME.health]]``) are read by the same readers but kept apart
from the tree, in :class:`Declarations`: the manager's registry applies
them, and it reads them again itself (:func:`read_declarations`) because
the manager receives only the tree.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import math
import pwd
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from ikos._errors import ConfigError, SpecError
from ikos.manager._settings import (
    AUTO_METRICS,
    DEFAULT_METRICS,
    IPC_GRANTS,
    AlertSettings,
    IpcRule,
    IpcSettings,
    MonitorSettings,
    read_alert_settings,
    read_ipc_settings,
    read_monitor_settings,
)
from ikos.monitor._alerts import ACTIONS, SEVERITIES, THRESHOLD_KINDS, AlertRules, Rule, parse_size
from ikos.monitor._alerts import KINDS as ALERT_KINDS
from ikos.platform._fields import close_match
from ikos.platform._limits import LIMIT_NAMES
from ikos.supervision._placement import placement_of
from ikos.supervision._spec import (
    EXEC_FIELDS,
    RESTART_TYPES,
    STRATEGIES,
    AnySpec,
    Backoff,
    Child,
    Exec,
    RestartType,
    Shutdown,
    Strategy,
    Supervisor,
    exec_from_unit,
    validate_tree,
)

if TYPE_CHECKING:
    # imported where a file, a service or a health check is read: ikosd --tree without
    # a configuration file loads none of them (docs/performance.md, "Launch")
    import tomllib

    from ikos.platform._unit import UnitSpec
    from ikos.registry._health import HealthCheck
    from ikos.registry._service import ServiceInfo

__all__ = [
    "AUTO_METRICS",
    "DEFAULT_METRICS",
    "AlertSettings",
    "Declarations",
    "IpcRule",
    "IpcSettings",
    "LoadedConfig",
    "ManagerSettings",
    "MonitorSettings",
    "load_config",
    "read_alert_settings",
    "read_declarations",
    "read_ipc_settings",
    "read_monitor_settings",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: Largest configuration file read, a guard against pointing ``-c`` at the wrong file.
MAX_FILE_BYTES: Final = 16 * 1024 * 1024
#: Deepest nesting of supervisors below the root (recursion elsewhere stays bounded).
MAX_DEPTH: Final = 100
#: Most services one daemon may declare, and most health checks it may have.
MAX_DECLARED_SERVICES: Final = 32
MAX_HEALTH_CHECKS: Final = 32

_TOP_TABLES: Final = (
    "ikosd",
    "root",
    "supervisors",
    "actors",
    "executables",
    "ipc",
    "monitor",
    "alerts",
    "ray",
    "units",
)
_UNITS_KEYS: Final = ("directory", "supervisor")
_KINDS: Final = ("supervisors", "actors", "executables")
_KIND_NOUN: Final = {"supervisors": "supervisor", "actors": "actor", "executables": "executable"}
_COMMON_KEYS: Final = ("restart", "shutdown", "requires", "after", "description", "backoff")
_DECLARATION_KEYS: Final = ("service", "health", "alerts")
_SERVICE_KEYS: Final = (
    "name",
    "description",
    "version",
    "type",
    "endpoint",
    "capabilities",
    "metadata",
)
_HEALTH_KEYS: Final = (
    "kind",
    "target",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "on_failure",
    "ttl",
    "start_period",
)
_SETTINGS_KEYS: Final = (
    "metrics",
    "log_level",
    "shutdown_timeout",
    "mailbox_size",
    "max_message_bytes",
    "readers",
    "log_to_stdout",
)
_ROOT_KEYS: Final = ("name", "strategy", "max_restarts", "within", "description")
_SUPERVISOR_KEYS: Final = (
    "parent", "strategy", "max_restarts", "within", "placement", *_COMMON_KEYS,
)  # fmt: skip
#: ``[ray]``: the cluster that actors placed on Ray run on (docs/scaling.md).
_RAY_KEYS: Final = ("address", "namespace")
_ACTOR_KEYS: Final = (
    "class",
    "supervisor",
    "args",
    "kwargs",
    "mailbox_size",
    "start_timeout",
    "placement",
    *_COMMON_KEYS,
    *_DECLARATION_KEYS,
)
_EXEC_SPEC_KEYS: Final = (
    "executable",
    "unit",
    "supervisor",
    "start_timeout",
    *_COMMON_KEYS,
    *_DECLARATION_KEYS,
)
_BACKOFF_KEYS: Final = ("min", "max", "random_factor", "reset_after")
_IPC_KEYS: Final = (
    "enabled",
    "start",
    "subscriber_queue",
    "slow_subscriber",
    "shm_threshold",
    "max_frame",
    "max_clients",
    "max_clients_per_uid",
    "queues",
    "allow",
)
_MONITOR_KEYS: Final = ("interval", "uss", "uss_every")
_ALERT_SETTINGS_KEYS: Final = ("notify_interval", "max_per_minute", "daemons")
_RULE_KEYS: Final = (
    "above",
    "for",
    "resolve_for",
    "resolve_below",
    "window",
    "severity",
    "action",
    "command",
    "command_timeout",
    "enabled",
)
_IPC_QUEUE_KEYS: Final = ("max_deliveries", "visibility_timeout", "max_messages")
_IPC_RULE_KEYS: Final = ("users", "groups", *IPC_GRANTS)
SLOW_SUBSCRIBER: Final = ("drop-oldest", "disconnect")
#: When ikosd starts the IPC broker: at the first connection to its socket, or at once.
IPC_START: Final = ("on-demand", "eager")
#: Shortest ``[monitor] interval``: a pass reads every daemon's processes.
MIN_MONITOR_INTERVAL: Final = 0.1
#: Most ``[[ipc.allow]]`` rules, and most patterns in one of their lists.
MAX_IPC_RULES: Final = 1000
MAX_IPC_PATTERNS: Final = 1000
_PATTERN_SEGMENT = re.compile(r"^(?:[A-Za-z0-9_@:/-]+|\*|#)$")


@dataclass(frozen=True)
class ManagerSettings:
    """The ``[ikosd]`` table: settings of the manager itself.

    ``metrics`` is the ``(host, port)`` the Prometheus endpoint listens on,
    ``None`` when disabled, or :data:`AUTO_METRICS` when the file leaves it
    to ikosd (docs/operations.md, *Metrics*); ``mailbox_size`` is the default mailbox bound of
    actors in the file that do not set their own; ``readers`` the group id
    whose members may read what only the owner and root read otherwise
    (logs, daemons' configurations). ``shutdown_timeout`` (the grace period
    of a shutdown) and ``log_to_stdout`` (daemons' lines also on ikosd's
    stdout and stderr) are None when the file leaves them to ikosd, whose
    defaults depend on whether it runs as PID 1 (docs/operations.md).
    """

    metrics: tuple[str, int] | Literal["auto"] | None = AUTO_METRICS
    log_level: str = "info"
    shutdown_timeout: float | None = None
    mailbox_size: int = 1000
    max_message_bytes: int = 64 * 1024 * 1024
    readers: int | None = None
    log_to_stdout: bool | None = None
    #: ``[ray] address`` and ``namespace``: the Ray cluster of placed actors (issue 13).
    ray_address: str | None = None
    ray_namespace: str = "ikos"


@dataclass(frozen=True)
class Declarations:
    """The service and health tables of a file, by daemon name.

    ``services[daemon]`` are the :class:`~ikos.registry._service.ServiceInfo`
    values the daemon offers (``owner`` set to the daemon; the manager
    registers them when the daemon runs); ``health[daemon]`` its checks.
    ``warnings`` are the unknown keys of those tables.
    """

    services: dict[str, tuple[ServiceInfo, ...]] = field(default_factory=dict)
    health: dict[str, tuple[HealthCheck, ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedConfig:
    """The result of :func:`load_config`.

    ``tree`` is validated; ``warnings`` are human-readable lines (unknown keys
    and tables), table by table, for the caller to log. ``services`` and
    ``health`` are the daemons' declared services and health checks (see
    :class:`Declarations`).
    """

    file: Path
    tree: Supervisor
    settings: ManagerSettings
    warnings: tuple[str, ...] = ()
    services: dict[str, tuple[ServiceInfo, ...]] = field(default_factory=dict)
    health: dict[str, tuple[HealthCheck, ...]] = field(default_factory=dict)
    ipc: IpcSettings = field(default_factory=IpcSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)


def load_config(
    path: str | Path,
    base_tree: Supervisor | None = None,
    *,
    instance_root: str | Path | None = None,
) -> LoadedConfig:
    """Read ``path`` (TOML) and build the supervision tree and manager settings it describes.

    With ``base_tree`` (``ikosd --tree``), that supervisor is the root: entries
    without a parent go under it, entries may name its supervisors as parent,
    and a ``[root]`` table is an error. ``instance_root`` (``ikosd --root``)
    is where the systemd units' ``RuntimeDirectory=``, ``%t``... live.
    Raises :class:`~ikos._errors.ConfigError` naming file, table, key and
    what was expected; unknown keys only produce warnings.

    Example::

        loaded = load_config("/etc/ikos/ikos.toml")
        for line in loaded.warnings:
            log.warning("%s", line)
        ikos.run(loaded.tree)
    """
    import tomllib

    file = str(path)
    text = _read_text(file, Path(path))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(file, text, exc) from None
    loader = _Loader(file, text, base_tree, instance_root)
    settings = loader.settings(document)
    tree = loader.tree(document, settings.mailbox_size)
    declared = _declarations(file, document)
    ipc, ipc_warnings = _ipc_settings(file, document)
    monitor, monitor_warnings = _monitor_settings(file, document)
    alerts, alert_warnings = _alert_settings(file, document)
    return LoadedConfig(
        Path(path).absolute(),
        tree,
        settings,
        (*loader.warnings, *declared.warnings, *ipc_warnings, *monitor_warnings, *alert_warnings),
        declared.services,
        declared.health,
        ipc,
        monitor,
        alerts,
    )


def read_declarations(path: str | Path) -> Declarations:
    """Read only the service and health tables of ``path``, with the same checks.

    For the manager's registry, which gets the tree but not the file's
    other contents; the tree's own errors are :func:`load_config`'s.

    Example::

        declared = read_declarations("/etc/ikos/ikos.toml")
        declared.health["net"]       # (HealthCheck("tcp", "127.0.0.1:53"),)
    """
    return _declarations(*_parse_file(path))


def _parse_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``path``'s name as errors show it and its TOML document (syntax errors located)."""
    import tomllib

    file = str(path)
    text = _read_text(file, Path(path))
    try:
        return file, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(file, text, exc) from None


def _monitor_settings(
    file: str, document: Mapping[str, Any]
) -> tuple[MonitorSettings, tuple[str, ...]]:
    value = document.get("monitor", {})
    if not isinstance(value, dict):
        raise ConfigError(file, None, "monitor", "a table [monitor]", value)
    t = _Table(file, "monitor", value)
    warnings = t.unknown(_MONITOR_KEYS)
    d = MonitorSettings()
    uss = t.get("uss")
    if uss is not _MISSING and not isinstance(uss, bool):
        raise t.error("uss", "true or false", uss)
    interval = t.seconds("interval", d.interval, zero_ok=False)
    if interval < MIN_MONITOR_INTERVAL:
        raise t.error("interval", f"seconds >= {MIN_MONITOR_INTERVAL:g}", t.get("interval"))
    settings = MonitorSettings(
        interval=interval,
        uss=d.uss if uss is _MISSING else bool(uss),
        uss_every=t.integer("uss_every", d.uss_every, 1),
    )
    return settings, tuple(warnings)


# --- [alerts] ------------------------------------------------------------------------------


def _alert_settings(
    file: str, document: Mapping[str, Any]
) -> tuple[AlertSettings, tuple[str, ...]]:
    value = document.get("alerts", {})
    if not isinstance(value, dict):
        raise ConfigError(file, None, "alerts", "a table [alerts]", value)
    t = _Table(file, "alerts", value)
    warnings = t.unknown((*_ALERT_SETTINGS_KEYS, *ALERT_KINDS))
    d = AlertSettings()
    defaults: dict[str, Rule | None] = {}
    default_fields: dict[str, dict[str, Any]] = {}
    for kind in ALERT_KINDS:
        if kind not in value:
            continue
        fields, more = _rule_fields(file, "alerts", kind, value[kind])
        warnings += more
        # a daemon's table that names this kind turns it on whatever the default says
        default_fields[kind] = {k: v for k, v in fields.items() if k != "enabled"}
        defaults[kind] = _rule(file, f"alerts.{kind}", kind, fields)
    daemons: dict[str, dict[str, Rule | None]] = {}
    # [actors.NAME.alerts], [executables.NAME.alerts], and [alerts.daemons.NAME] for the
    # daemons the file does not define (a --tree's, those created at run time)
    tables: list[tuple[str, str, str, Any]] = []
    for section in ("actors", "executables"):
        entries = document.get(section, {})
        if not isinstance(entries, dict):
            continue  # the tree's loader reports it
        for name, data in entries.items():
            if isinstance(data, dict) and "alerts" in data:
                tables.append((name, _table_name(section, name), "alerts", data["alerts"]))
    others = value.get("daemons", {})
    if not isinstance(others, dict):
        raise ConfigError(file, "alerts", "daemons", "a table [alerts.daemons.NAME]", others)
    tables += [(name, "alerts.daemons", name, own) for name, own in others.items()]
    for name, parent, key, own in tables:
        base = f"{parent}.{key}" if key == "alerts" else _table_name("alerts.daemons", name)
        if not isinstance(own, dict):
            raise ConfigError(file, parent, key, f"a table [{base}]", own)
        if name in daemons:
            raise ConfigError(
                file, base, None, f"the alerts of '{name}' in one table (they are given twice)"
            )
        warnings += _Table(file, base, own).unknown(ALERT_KINDS)
        rules: dict[str, Rule | None] = {}
        for kind in ALERT_KINDS:
            if kind not in own:
                continue
            if own[kind] is False:
                rules[kind] = None
                continue
            fields, more = _rule_fields(file, base, kind, own[kind])
            warnings += more
            # a daemon's table changes the defaults' keys it names, and keeps the others
            rules[kind] = _rule(
                file, f"{base}.{kind}", kind, {**default_fields.get(kind, {}), **fields}
            )
        daemons[name] = rules
    settings = AlertSettings(
        notify_interval=t.seconds("notify_interval", d.notify_interval, zero_ok=True),
        max_per_minute=t.integer("max_per_minute", d.max_per_minute, 1),
        rules=AlertRules(defaults, daemons),
    )
    return settings, tuple(warnings)


def _rule_fields(file: str, base: str, kind: str, value: Any) -> tuple[dict[str, Any], list[str]]:
    """The keys given in ``[base.kind]``, each checked; the rule is built by :func:`_rule`."""
    table = f"{base}.{kind}"
    if not isinstance(value, dict):
        raise ConfigError(file, base, kind, f"a table [{table}] (or false to turn it off)", value)
    t = _Table(file, table, value)
    known = (
        _RULE_KEYS
        if kind in THRESHOLD_KINDS
        else tuple(
            k
            for k in _RULE_KEYS
            if k not in ("above", "for", "resolve_for", "resolve_below", "window")
        )
    )
    warnings = t.unknown(known)
    fields: dict[str, Any] = {}
    if "above" in value and "above" in known:
        fields["above"] = _threshold(t, kind, value["above"])
    if "resolve_below" in value and "resolve_below" in known:
        fields["resolve_below"] = _threshold(t, kind, value["resolve_below"], "resolve_below")
    for key, field_name in (("for", "for_"), ("resolve_for", "resolve_for"), ("window", "window")):
        if key in value and key in known:
            fields[field_name] = t.seconds(key, 0.0, zero_ok=key != "window")
    if "command_timeout" in value:
        fields["command_timeout"] = t.seconds("command_timeout", 30.0, zero_ok=False)
    if "severity" in value:
        fields["severity"] = t.choice("severity", "warning", SEVERITIES)
    if "action" in value:
        fields["action"] = t.choice("action", "restart", ACTIONS)
    if "command" in value:
        fields["command"] = t.required_string("command", "a shell command line")
    if "enabled" in value:
        enabled = value["enabled"]
        if not isinstance(enabled, bool):
            raise t.error("enabled", "true or false", enabled)
        fields["enabled"] = enabled
    return fields, warnings


def _threshold(t: _Table, kind: str, value: Any, key: str = "above") -> float:
    if kind == "memory":
        try:
            return float(parse_size(value))
        except (ValueError, TypeError):
            raise t.error(key, 'bytes: an integer or a size like "512MiB" or "1G"', value)
    if kind == "cpu":
        if not _is_number(value) or value <= 0:
            raise t.error(key, "a fraction of one CPU core > 0 (0.9 is 90% of one core)", value)
        return float(value)
    if not _is_int(value) or value < 1:
        raise t.error(key, "an integer >= 1", value)
    return float(value)


def _rule(file: str, table: str, kind: str, fields: dict[str, Any]) -> Rule | None:
    """The rule of ``[table]`` from its checked keys (None when ``enabled = false``)."""
    fields = dict(fields)
    if not fields.pop("enabled", True):
        return None
    if kind in THRESHOLD_KINDS and "above" not in fields:
        raise ConfigError(file, table, "above", "the threshold (the key is required)")
    action = fields.get("action")
    if action == "command" and not fields.get("command"):
        raise ConfigError(file, table, "command", 'the command to run for action = "command"')
    if fields.get("command") and action != "command":
        raise ConfigError(file, table, "action", '"command" when a command is given', action)
    above, below = fields.get("above"), fields.get("resolve_below")
    if above is not None and below is not None and below > above:
        raise ConfigError(file, table, "resolve_below", f"at most above ({above:g})", below)
    return Rule(cast(Any, kind), **fields)


# --- [ipc] ---------------------------------------------------------------------------------


def _ipc_settings(file: str, document: Mapping[str, Any]) -> tuple[IpcSettings, tuple[str, ...]]:
    value = document.get("ipc", {})
    if not isinstance(value, dict):
        raise ConfigError(file, None, "ipc", "a table [ipc]", value)
    t = _Table(file, "ipc", value)
    warnings = t.unknown(_IPC_KEYS)
    d = IpcSettings()
    enabled = t.get("enabled")
    if enabled is not _MISSING and not isinstance(enabled, bool):
        raise t.error("enabled", "true or false", enabled)
    queues = t.get("queues")
    if queues is _MISSING:
        queues = {}
    if not isinstance(queues, dict):
        raise t.error("queues", "a table [ipc.queues]", queues)
    q = _Table(file, "ipc.queues", queues)
    warnings += q.unknown(_IPC_QUEUE_KEYS)
    rules: list[IpcRule] = []
    allow = t.get("allow")
    if allow is not _MISSING:
        for table, data in _tables(file, "ipc", "allow", allow, MAX_IPC_RULES):
            rule, rule_warnings = _ipc_rule(_Table(file, table, data))
            rules.append(rule)
            warnings += rule_warnings
    settings = IpcSettings(
        enabled=d.enabled if enabled is _MISSING else bool(enabled),
        start=t.choice("start", d.start, IPC_START),
        subscriber_queue=t.integer("subscriber_queue", d.subscriber_queue, 1),
        slow_subscriber=t.choice("slow_subscriber", d.slow_subscriber, SLOW_SUBSCRIBER),
        shm_threshold=t.integer("shm_threshold", d.shm_threshold, 1),
        max_frame=t.integer("max_frame", d.max_frame, 1024),
        max_clients=t.integer("max_clients", d.max_clients, 1),
        max_clients_per_uid=t.integer("max_clients_per_uid", d.max_clients_per_uid, 1),
        max_deliveries=q.integer("max_deliveries", d.max_deliveries, 1),
        visibility_timeout=q.seconds("visibility_timeout", d.visibility_timeout, zero_ok=False),
        max_messages=q.integer("max_messages", d.max_messages, 1),
        rules=tuple(rules),
    )
    return settings, tuple(warnings)


def _ipc_rule(t: _Table) -> tuple[IpcRule, list[str]]:
    warnings = t.unknown(_IPC_RULE_KEYS)
    if t.get("users") is _MISSING and t.get("groups") is _MISSING:
        raise t.error("users", "'users' or 'groups': whom the rule allows (the key is required)")
    grants = {grant: _ipc_patterns(t, grant) for grant in IPC_GRANTS}
    return (
        IpcRule(_ids(t, "users", _uid), _ids(t, "groups", _gid), **grants),
        warnings,
    )


def _uid(value: str | int) -> int:
    found = pwd.getpwnam(value) if isinstance(value, str) else pwd.getpwuid(value)
    return int(found.pw_uid)


def _gid(value: str | int) -> int:
    found = grp.getgrnam(value) if isinstance(value, str) else grp.getgrgid(value)
    return int(found.gr_gid)


def _ids(t: _Table, key: str, look_up: Any) -> tuple[int, ...]:
    """``users``/``groups``: names or numbers of existing users or groups, as ids."""
    value = t.get(key)
    if value is _MISSING:
        return ()
    noun = "user" if key == "users" else "group"
    expected = f"a list of {noun} names or numbers"
    if not isinstance(value, list) or len(value) > MAX_IPC_PATTERNS:
        raise t.error(key, expected, value)
    ids: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int) or item == "":
            raise t.error(key, expected, item)
        try:
            ids.append(look_up(item))
        except (KeyError, OverflowError, ValueError):
            raise t.error(key, f"the name or number of an existing {noun}", item) from None
    return tuple(ids)


def _ipc_patterns(t: _Table, key: str) -> tuple[str, ...]:
    """A list of topic-syntax patterns (``net.*``, ``app.#``, ``#``)."""
    value = t.get(key)
    if value is _MISSING:
        return ()
    expected = 'a list of patterns like "net.*", "app.#" or "#"'
    if not isinstance(value, list) or len(value) > MAX_IPC_PATTERNS:
        raise t.error(key, expected, value)
    for item in value:
        if (
            not isinstance(item, str)
            or not item
            or len(item.encode()) > 255
            or not all(_PATTERN_SEGMENT.match(part) for part in item.split("."))
        ):
            raise t.error(key, expected, item)
    return tuple(value)


# --- service metadata and health checks ----------------------------------------------------


def _declarations(file: str, document: Mapping[str, Any]) -> Declarations:
    services: dict[str, tuple[ServiceInfo, ...]] = {}
    health: dict[str, tuple[HealthCheck, ...]] = {}
    warnings: list[str] = []
    declared_by: dict[str, str] = {}  # service name -> table that declared it
    for kind in ("actors", "executables"):
        section = document.get(kind, {})
        if not isinstance(section, dict):
            continue  # the tree's loader reports it
        for name, data in section.items():
            if not isinstance(data, dict):
                continue
            base = _table_name(kind, name)
            description = data.get("description", "")
            if "service" in data:
                services[name] = _declared_services(
                    file,
                    base,
                    name,
                    data["service"],
                    description if isinstance(description, str) else "",
                    declared_by,
                    warnings,
                )
            if "health" in data:
                health[name] = _declared_checks(file, base, kind, name, data["health"], warnings)
    return Declarations(services, health, tuple(warnings))


def _tables(
    file: str, base: str, key: str, value: Any, limit: int
) -> list[tuple[str, Mapping[str, Any]]]:
    """``[base.key]`` or ``[[base.key]]``: the tables with the names errors give them."""
    expected = f"a table [{base}.{key}] or an array of tables [[{base}.{key}]]"
    if isinstance(value, dict):
        return [(f"{base}.{key}", value)]
    if not isinstance(value, list) or not value:
        raise ConfigError(file, base, key, expected, value)
    if len(value) > limit:
        raise ConfigError(file, base, key, f"at most {limit} tables", f"{len(value)} tables")
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for index, item in enumerate(value):
        table = f"{base}.{key}" if len(value) == 1 else f"{base}.{key}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(file, table, None, expected, item)
        tables.append((table, item))
    return tables


def _declared_services(
    file: str,
    base: str,
    daemon: str,
    value: Any,
    description: str,
    declared_by: dict[str, str],
    warnings: list[str],
) -> tuple[ServiceInfo, ...]:
    from ikos.registry._service import InvalidService, ServiceInfo, validate_service

    infos = []
    for table, data in _tables(file, base, "service", value, MAX_DECLARED_SERVICES):
        t = _Table(file, table, data)
        warnings += t.unknown(_SERVICE_KEYS)
        capabilities = t.get("capabilities")
        if capabilities is _MISSING:
            capabilities = []
        elif not isinstance(capabilities, list) or not all(
            isinstance(c, str) for c in capabilities
        ):
            raise t.error("capabilities", "a list of strings", capabilities)
        metadata = t.get("metadata")
        if metadata is _MISSING:
            metadata = {}
        elif not isinstance(metadata, dict):
            raise t.error("metadata", "a table of strings, like { region = 'eu' }", metadata)
        for key, item in metadata.items():
            if not isinstance(item, str):
                raise t.error(f"metadata.{key}", "a string", item)
        info = ServiceInfo(
            name=t.string("name", daemon),
            description=t.string("description", description),
            version=t.string("version", ""),
            type=t.string("type", ""),
            endpoint=t.string("endpoint", ""),
            capabilities=tuple(capabilities),
            metadata=dict(metadata),
            owner=daemon,
        )
        try:
            validate_service(info)
        except InvalidService as exc:
            reason = exc.reason.removeprefix("expected ")
            if reason == exc.reason:
                reason = f"a value within the registry's limits ({reason})"
            key = exc.field if exc.field in data else None
            raise t.error(key, reason) from None
        if info.name in declared_by:
            raise t.error(
                "name",
                f"a service name not declared elsewhere (also [{declared_by[info.name]}])",
                info.name,
            )
        declared_by[info.name] = table
        infos.append(info)
    return tuple(infos)


def _declared_checks(
    file: str, base: str, kind: str, daemon: str, value: Any, warnings: list[str]
) -> tuple[HealthCheck, ...]:
    from ikos.registry._health import HealthCheck

    checks = []
    for table, data in _tables(file, base, "health", value, MAX_HEALTH_CHECKS):
        t = _Table(file, table, data)
        warnings += t.unknown(_HEALTH_KEYS)
        if kind == "executables" and data.get("kind") == "method":
            raise t.error("kind", "exec, tcp, http or ttl (a method check asks an actor)", "method")
        try:
            check = HealthCheck.from_mapping(
                daemon, {k: data[k] for k in _HEALTH_KEYS if k in data}
            )
        except ConfigError as exc:
            raise ConfigError(file, table, exc.key, exc.expected, exc.got) from None
        checks.append(check)
    return tuple(checks)


# --- reading -------------------------------------------------------------------------------


def _read_text(file: str, path: Path) -> str:
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(file, None, None, "a readable configuration file", exc.strerror) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(file, None, None, f"a file of at most {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            file, None, None, "UTF-8 text", f"byte {exc.start}: {exc.reason}"
        ) from None


_SYNTAX_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def _syntax_error(file: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(exc)
    table = None
    found = _SYNTAX_POS.search(message)
    if found:
        # Name the table the bad line belongs to: the last header above it.
        line = int(found.group(1))
        for header in re.finditer(r"^[ \t]*\[+([^\]\n]+)\]", text, re.MULTILINE):
            if text.count("\n", 0, header.start()) + 1 > line:
                break
            table = header.group(1).strip()
    reason = message[0].lower() + message[1:] if message else "a syntax error"
    return ConfigError(file, table, None, f"valid TOML syntax; {reason}")


# --- where entries are defined -------------------------------------------------------------

_KEY_TOKEN = re.compile(r"""[ \t]*([A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')[ \t]*""")


def _dotted_key(line: str, start: int) -> tuple[list[str], int]:
    """Parse a TOML dotted key at ``start``; return its parts and the end offset."""
    import tomllib

    parts: list[str] = []
    pos = start
    while True:
        token = _KEY_TOKEN.match(line, pos)
        if not token:
            return parts, pos
        raw = token.group(1)
        if raw.startswith('"'):
            try:
                parts.append(str(tomllib.loads(f"k = {raw}")["k"]))
            except tomllib.TOMLDecodeError:
                return parts, pos
        elif raw.startswith("'"):
            parts.append(raw[1:-1])
        else:
            parts.append(raw)
        pos = token.end()
        if pos < len(line) and line[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _definition_lines(text: str) -> dict[tuple[str, str], int]:
    """Line of first definition of each ``(kind, name)`` entry, for the start order.

    Sees ``[actors.echo]`` headers (and their sub-tables), ``echo = {...}`` or
    ``echo.class = ...`` under ``[actors]``, and top-level ``actors.echo.class = ...``.
    Entries defined only inside an inline table are not seen; they keep their
    order within their kind and follow the others.
    """
    lines: dict[tuple[str, str], int] = {}
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.lstrip()
        if stripped.startswith("[["):
            # An array of tables ([[actors.echo.health]]): it places its entry,
            # and the keys below it belong to the array's item, not to an entry.
            current = []
            path, _ = _dotted_key(line, line.index("[[") + 2)
        elif stripped.startswith("["):
            parts, end = _dotted_key(line, line.index("[") + 1)
            if end < len(line) and line[end] == "]":
                current = parts
                path = parts
            else:
                continue
        else:
            parts, end = _dotted_key(line, 0)
            if not parts or end >= len(line) or line[end] != "=":
                continue
            path = current + parts
        if len(path) >= 2 and path[0] in _KINDS:
            lines.setdefault((path[0], path[1]), number)
    return lines


# --- typed readers -------------------------------------------------------------------------

_MISSING: Final = object()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _table_name(kind: str, name: str) -> str:
    """``actors.echo``, quoting names that are not bare TOML keys: ``actors."a.b"``."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return f"{kind}.{name}"
    return f"{kind}.{json.dumps(name)}"


class _Table:
    """One TOML table being read: every error it raises names the file and the table."""

    def __init__(self, file: str, name: str | None, data: Mapping[str, Any]) -> None:
        self.file, self.name, self.data = file, name, data

    def error(self, key: str | None, expected: str, got: object = None) -> ConfigError:
        return ConfigError(self.file, self.name, key, expected, got)

    def unknown(self, known: Collection[str], prefix: str = "") -> list[str]:
        """Warnings for the keys not in ``known`` (with a close match when there is one)."""
        warnings = []
        where = f"{self.file}: [{self.name}]" if self.name else f"{self.file}:"
        for key in self.data:
            if key not in known:
                text = f"{where} unknown key '{prefix}{key}' (ignored)"
                close = close_match(key, known)
                if close is not None:
                    text += f", did you mean '{prefix}{close}'?"
                warnings.append(text)
        return warnings

    def get(self, key: str) -> Any:
        return self.data.get(key, _MISSING)

    def string(self, key: str, default: str) -> str:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.error(key, "a string", value)
        return value

    def required_string(self, key: str, expected: str) -> str:
        value = self.get(key)
        if value is _MISSING:
            raise self.error(key, f"{expected} (the key is required)")
        if not isinstance(value, str) or not value:
            raise self.error(key, expected, value)
        return value

    def choice(self, key: str, default: str, choices: Collection[str]) -> str:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or value not in choices:
            raise self.error(key, "one of " + ", ".join(choices), value)
        return value

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not _is_int(value) or value < minimum:
            raise self.error(key, f"an integer >= {minimum}", value)
        return cast(int, value)

    def seconds(self, key: str, default: float, *, zero_ok: bool) -> float:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not _is_number(value) or value < 0 or (value == 0 and not zero_ok):
            raise self.error(key, "seconds >= 0" if zero_ok else "seconds > 0", value)
        return float(value)

    def names(self, key: str) -> tuple[str, ...]:
        value = self.get(key)
        if value is _MISSING:
            return ()
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            raise self.error(key, "a list of names (strings)", value)
        return tuple(value)

    def restart(self) -> RestartType:
        return cast(RestartType, self.choice("restart", "permanent", RESTART_TYPES))

    def strategy(self, default: str = "one_for_one") -> Strategy:
        return cast(Strategy, self.choice("strategy", default, STRATEGIES))

    def shutdown(self, default: Shutdown) -> Shutdown:
        value = self.get("shutdown")
        if value is _MISSING:
            return default
        if value in ("brutal_kill", "infinity"):
            return cast(Shutdown, value)
        if not _is_number(value) or value < 0:
            raise self.error("shutdown", "seconds >= 0, 'brutal_kill' or 'infinity'", value)
        return float(value)

    def backoff(self) -> tuple[Backoff | None, list[str]]:
        value = self.get("backoff")
        if value is _MISSING:
            return None, []
        if not isinstance(value, dict):
            raise self.error("backoff", "a table like { min = 0.1, max = 10 }", value)
        sub = _Table(self.file, self.name, value)
        fields: dict[str, float] = {}
        for key in _BACKOFF_KEYS:
            number = sub.get(key)
            if number is not _MISSING:
                if not _is_number(number):
                    raise self.error(f"backoff.{key}", "a number of seconds", number)
                fields[key] = float(number)
        # Ranges (min > 0, max >= min...) are validate_tree's, mapped back here.
        return Backoff(**fields), sub.unknown(_BACKOFF_KEYS, prefix="backoff.")


# --- the loader ----------------------------------------------------------------------------


@dataclass
class _Entry:
    """One ``[supervisors.X]``, ``[actors.X]`` or ``[executables.X]`` table, read."""

    kind: str
    name: str
    table: _Table
    parent: str
    parent_key: str
    order: tuple[int, int]
    spec: AnySpec


class _Loader:
    def __init__(
        self,
        file: str,
        text: str,
        base_tree: Supervisor | None,
        instance_root: str | Path | None = None,
    ) -> None:
        self.file, self.text, self.base = file, text, base_tree
        self.instance_root = instance_root
        self.warnings: list[str] = []
        self._units: dict[str, UnitSpec] = {}  # executables declared with `unit`, by name

    def settings(self, document: Mapping[str, Any]) -> ManagerSettings:
        t = self._section(document, "ikosd")
        self.warnings += t.unknown(_SETTINGS_KEYS)
        defaults = ManagerSettings()
        return ManagerSettings(
            metrics=self._metrics(t),
            log_level=self._log_level(t),
            shutdown_timeout=(
                t.seconds("shutdown_timeout", 0.0, zero_ok=False)
                if t.get("shutdown_timeout") is not _MISSING
                else defaults.shutdown_timeout
            ),
            mailbox_size=t.integer("mailbox_size", defaults.mailbox_size, 1),
            max_message_bytes=t.integer("max_message_bytes", defaults.max_message_bytes, 1),
            readers=self._readers(t),
            log_to_stdout=self._log_to_stdout(t),
            **self._ray(document),
        )

    def _log_to_stdout(self, t: _Table) -> bool | None:
        value = t.get("log_to_stdout")
        if value is _MISSING:
            return None
        if not isinstance(value, bool):
            raise t.error("log_to_stdout", "true or false", value)
        return value

    def _ray(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """``[ray]``: ``address`` (as ``ray.init`` takes it) and ``namespace``."""
        t = self._section(document, "ray")
        self.warnings += t.unknown(_RAY_KEYS)
        address = t.string("address", "") or None
        return {"ray_address": address, "ray_namespace": t.string("namespace", "ikos") or "ikos"}

    @staticmethod
    def _placement(t: _Table) -> Any:
        """An entry's ``placement``: "ray", "local" or a table of ``ikos.Ray``'s fields."""
        value = t.get("placement")
        if value is _MISSING:
            return None
        if not isinstance(value, str | dict):
            raise t.error("placement", '"ray", "local" or a table of ikos.Ray fields', value)
        try:
            return placement_of(value, "placement")
        except SpecError as exc:  # named by the file, table and key, as every bad entry
            key = "placement" if exc.key in (None, "placement") else f"placement.{exc.key}"
            raise t.error(key, exc.expected, exc.got) from None

    def _readers(self, t: _Table) -> int | None:
        value = t.get("readers")
        if value is _MISSING:
            return None
        expected = "the name or number of an existing group"
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise t.error("readers", expected, value)
        try:
            found = grp.getgrnam(value) if isinstance(value, str) else grp.getgrgid(value)
        except (KeyError, OverflowError):
            raise t.error("readers", expected, value) from None
        return int(found.gr_gid)

    def tree(self, document: Mapping[str, Any], mailbox_size: int) -> Supervisor:
        for key in document:
            if key not in _TOP_TABLES:
                noun = f"table [{key}]" if isinstance(document[key], dict) else f"key '{key}'"
                self.warnings.append(f"{self.file}: unknown {noun} (ignored)")
        root = self._root(document)
        base_names = self._base_names()
        entries = self._entries(document, root.name, base_names, mailbox_size)
        self._link_units(entries)
        self._check_parents(entries, root.name, base_names)
        tree = self._assemble(root, entries)
        try:
            return validate_tree(tree)
        except SpecError as exc:
            raise self._spec_error(exc, entries) from None

    # --- sections ------------------------------------------------------------------------

    def _section(self, document: Mapping[str, Any], name: str) -> _Table:
        value = document.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(self.file, None, name, f"a table [{name}]", value)
        return _Table(self.file, name, value)

    def _metrics(self, t: _Table) -> tuple[str, int] | Literal["auto"] | None:
        value = t.get("metrics")
        if value is _MISSING or value is True:
            return AUTO_METRICS
        if value is False:
            return None
        expected = "'HOST:PORT' (port 0-65535) or false to disable"
        if not isinstance(value, str):
            raise t.error("metrics", expected, value)
        host, sep, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):  # [::1]:9464
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise t.error("metrics", expected, value)
        return host, int(port)

    def _log_level(self, t: _Table) -> str:
        value = t.get("log_level")
        if value is _MISSING:
            return "info"
        if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
            raise t.error("log_level", "one of " + ", ".join(LOG_LEVELS), value)
        return value.lower()

    def _root(self, document: Mapping[str, Any]) -> Supervisor:
        if self.base is not None:
            if "root" in document:
                raise ConfigError(
                    self.file,
                    "root",
                    None,
                    "no [root] table: the --tree supervisor "
                    f"'{self.base.name}' is the root when both are given",
                )
            return self.base
        t = self._section(document, "root")
        self.warnings += t.unknown(_ROOT_KEYS)
        return Supervisor(
            t.string("name", "root"),
            t.strategy(),
            t.integer("max_restarts", 1, 0),
            t.seconds("within", 5.0, zero_ok=False),
            description=t.string("description", ""),
        )

    def _base_names(self) -> dict[str, bool]:
        """Names of the --tree supervisor's specs, mapped to whether each is a supervisor."""
        if self.base is None:
            return {}
        validate_tree(self.base)  # its own errors name its Python path, not this file
        return {spec.name: isinstance(spec, Supervisor) for _, spec in self.base.walk()}

    # --- entries -------------------------------------------------------------------------

    def _entries(
        self,
        document: Mapping[str, Any],
        root_name: str,
        base_names: Mapping[str, bool],
        mailbox_size: int,
    ) -> dict[str, _Entry]:
        lines = _definition_lines(self.text)
        entries: dict[str, _Entry] = {}
        found: list[tuple[tuple[int, int], str, str, Mapping[str, Any]]] = []
        sequence = 0
        for kind in _KINDS:
            section = document.get(kind, {})
            if not isinstance(section, dict):
                raise ConfigError(self.file, None, kind, f"tables [{kind}.NAME]", section)
            for name, data in section.items():
                table = _table_name(kind, name)
                if not isinstance(data, dict):
                    raise ConfigError(self.file, kind, name, f"a table [{table}]", data)
                found.append(((lines.get((kind, name), sys.maxsize), sequence), kind, name, data))
                sequence += 1
        found.sort(key=lambda item: item[0])
        for order, kind, name, data in found:
            t = _Table(self.file, _table_name(kind, name), data)
            if name in entries:
                also = f"[{entries[name].table.name}]"
            elif name == root_name:
                also = "the root supervisor"
            elif name in base_names:
                also = "a child of the --tree supervisor"
            else:
                also = ""
            if also:
                raise t.error(None, f"a name not used elsewhere in the tree (also {also})", name)
            read = {"supervisors": self._supervisor, "actors": self._actor}.get(kind, self._exec)
            spec, parent_key, warnings = read(t, name, mailbox_size)
            self.warnings += warnings
            parent = t.get(parent_key)
            if parent is _MISSING:
                parent = root_name
            elif not isinstance(parent, str):
                raise t.error(parent_key, "the name of a supervisor (a string)", parent)
            entries[name] = _Entry(kind, name, t, parent, parent_key, order, spec)
        self._unit_directories(document, entries, root_name, base_names)
        return entries

    def _unit_directories(
        self,
        document: Mapping[str, Any],
        entries: dict[str, _Entry],
        root_name: str,
        base_names: Mapping[str, bool],
    ) -> None:
        """``[units] directory``: every ``*.service`` there, after the file's other entries."""
        t = self._section(document, "units")
        if not t.data:
            return
        self.warnings += t.unknown(_UNITS_KEYS)
        raw = t.get("directory")
        folders = [raw] if isinstance(raw, str) else raw
        expected = "a directory of systemd units, or an array of them"
        if raw is _MISSING or not isinstance(folders, list) or not folders:
            raise t.error("directory", expected + " (the key is required)", None)
        parent = t.string("supervisor", root_name)
        for folder in folders:
            if not isinstance(folder, str) or not folder:
                raise t.error("directory", expected, folder)
            path = Path(folder) if Path(folder).is_absolute() else Path(self.file).parent / folder
            from ikos.platform._unit import UnitError, load_unit, unit_files

            try:
                units = [load_unit(p, root=self.instance_root) for p in unit_files(path)]
                specs = [(u, exec_from_unit(u)) for u in units]
            except UnitError as exc:
                raise t.error("directory", f"units ikos can run ({exc})") from None
            for unit, spec in specs:
                taken = entries.get(unit.name)
                if taken is not None or unit.name in base_names or unit.name == root_name:
                    also = f"[{taken.table.name}]" if taken is not None else "the tree"
                    raise t.error(
                        "directory",
                        f"units named apart from other entries (also {also})",
                        unit.file,
                    )
                self._units[unit.name] = unit
                self.warnings += unit.warnings
                order = (sys.maxsize, len(entries))
                entries[unit.name] = _Entry(
                    "executables", unit.name, t, parent, "supervisor", order, spec
                )

    def _supervisor(self, t: _Table, name: str, _mailbox: int) -> tuple[AnySpec, str, list[str]]:
        backoff, warnings = t.backoff()
        spec = Supervisor(
            name,
            t.strategy(),
            t.integer("max_restarts", 1, 0),
            t.seconds("within", 5.0, zero_ok=False),
            restart=t.restart(),
            shutdown=t.shutdown("infinity"),
            requires=t.names("requires"),
            after=t.names("after"),
            description=t.string("description", ""),
            backoff=backoff,
            placement=self._placement(t),
        )
        return spec, "parent", t.unknown(_SUPERVISOR_KEYS) + warnings

    def _actor(self, t: _Table, name: str, mailbox: int) -> tuple[AnySpec, str, list[str]]:
        backoff, warnings = t.backoff()
        args = t.get("args")
        if args is _MISSING:
            args = []
        elif not isinstance(args, list):
            raise t.error("args", "a list of positional arguments", args)
        kwargs = t.get("kwargs")
        if kwargs is _MISSING:
            kwargs = {}
        elif not isinstance(kwargs, dict):
            raise t.error("kwargs", "a table of keyword arguments", kwargs)
        spec = Child(
            name,
            t.required_string("class", "an import path 'package.module:Class'"),
            t.restart(),
            t.shutdown(5.0),
            args,
            kwargs,
            requires=t.names("requires"),
            after=t.names("after"),
            description=t.string("description", ""),
            mailbox_size=t.integer("mailbox_size", mailbox, 1),
            start_timeout=t.seconds("start_timeout", 30.0, zero_ok=False),
            backoff=backoff,
            placement=self._placement(t),
        )
        return spec, "supervisor", t.unknown(_ACTOR_KEYS) + warnings

    def _exec(self, t: _Table, name: str, _mailbox: int) -> tuple[AnySpec, str, list[str]]:
        backoff, warnings = t.backoff()
        # The fields are checked by ikos.Exec itself (their one table); unknown
        # keys, here warnings, are left out before it sees them.
        fields = {key: value for key, value in t.data.items() if key in EXEC_FIELDS}
        limits = fields.get("limits")
        if isinstance(limits, dict):
            warnings += _Table(t.file, t.name, limits).unknown(LIMIT_NAMES, prefix="limits.")
            fields["limits"] = {k: v for k, v in limits.items() if k in LIMIT_NAMES}
        if "unit" in t.data:
            return self._unit_exec(t, name, fields, backoff, warnings)
        executable = t.required_string("executable", "the path or name of an executable")
        try:
            spec = Exec(
                name,
                executable,
                restart=t.restart(),
                shutdown=t.shutdown(5.0),
                requires=t.names("requires"),
                after=t.names("after"),
                description=t.string("description", ""),
                start_timeout=t.seconds("start_timeout", 30.0, zero_ok=False),
                backoff=backoff,
                **fields,
            )
        except SpecError as exc:
            raise t.error(exc.key, exc.expected, exc.got) from None
        return spec, "supervisor", t.unknown((*_EXEC_SPEC_KEYS, *EXEC_FIELDS)) + warnings

    # --- systemd units (docs/configuration.md, "Executables from systemd units") ---------

    def _unit_exec(
        self,
        t: _Table,
        name: str,
        fields: dict[str, Any],
        backoff: Backoff | None,
        warnings: list[str],
    ) -> tuple[AnySpec, str, list[str]]:
        """``unit = "PATH"``: the unit's executable; the table's other keys override it."""
        raw = t.required_string("unit", "the path of a systemd .service file")
        if "executable" in t.data:
            raise t.error(
                "executable", "no 'executable' beside 'unit' (the unit's ExecStart= runs)"
            )
        path = Path(raw) if Path(raw).is_absolute() else Path(self.file).parent / raw
        overrides: dict[str, Any] = dict(fields)
        if "restart" in t.data:
            overrides["restart"] = t.restart()
        if "shutdown" in t.data:
            overrides["shutdown"] = t.shutdown(5.0)
        if "description" in t.data:
            overrides["description"] = t.string("description", "")
        if "start_timeout" in t.data:
            overrides["start_timeout"] = t.seconds("start_timeout", 30.0, zero_ok=False)
        if backoff is not None:
            overrides["backoff"] = backoff
        from ikos.platform._unit import UnitError, load_unit

        try:
            unit = load_unit(path, name=name, root=self.instance_root)
            spec = exec_from_unit(
                unit, requires=t.names("requires"), after=t.names("after"), **overrides
            )
        except UnitError as exc:
            raise t.error("unit", f"a unit ikos can run ({exc})") from None
        except SpecError as exc:
            raise t.error(exc.key, exc.expected, exc.got) from None
        self._units[name] = unit
        known = (*_EXEC_SPEC_KEYS, *EXEC_FIELDS)
        return spec, "supervisor", [*unit.warnings, *t.unknown(known), *warnings]

    def _link_units(self, entries: dict[str, _Entry]) -> None:
        """Units' Requires=/Wants=/After=/Before= between executables of this file."""
        if not self._units:
            return
        known = {f"{e.name}.service": e.name for e in entries.values() if e.kind == "executables"}
        known.update({unit.unit_name: name for name, unit in self._units.items()})
        from ikos.platform._unit import link_units

        deps, warnings = link_units(list(self._units.values()), known)
        self.warnings += warnings
        for name, (requires, after) in deps.items():
            entry = entries[name]
            spec = entry.spec
            if (requires or after) and isinstance(spec, Exec):
                spec = dataclasses.replace(
                    spec,
                    requires=tuple(dict.fromkeys((*spec.requires, *requires))),
                    after=tuple(dict.fromkeys((*spec.after, *after))),
                )
                entries[name] = dataclasses.replace(entry, spec=spec)

    # --- the tree ------------------------------------------------------------------------

    def _check_parents(
        self, entries: Mapping[str, _Entry], root_name: str, base_names: Mapping[str, bool]
    ) -> None:
        supervisors = [root_name]
        supervisors += [n for n, is_sup in base_names.items() if is_sup and n != root_name]
        supervisors += [e.name for e in entries.values() if e.kind == "supervisors"]
        for entry in entries.values():
            parent = entries.get(entry.parent)
            known = entry.parent in supervisors
            if not known:
                shown = ", ".join(supervisors[:10]) + (", ..." if len(supervisors) > 10 else "")
                what = "the name of a supervisor"
                if parent is not None:
                    what += f" ('{entry.parent}' is an {_KIND_NOUN[parent.kind]})"
                raise entry.table.error(entry.parent_key, f"{what}: one of {shown}", entry.parent)
        for entry in entries.values():
            if entry.kind != "supervisors":
                continue
            chain = [entry.name]
            parent = entries.get(entry.parent)
            while parent is not None:
                if parent.name in chain:
                    cycle = " -> ".join([*chain[chain.index(parent.name) :], parent.name])
                    expected = f"a parent chain that reaches the root, not a cycle ({cycle})"
                    raise entry.table.error("parent", expected, entry.parent)
                chain.append(parent.name)
                if len(chain) > MAX_DEPTH:
                    raise entry.table.error("parent", f"at most {MAX_DEPTH} nested supervisors")
                parent = entries.get(parent.parent)

    def _assemble(self, root: Supervisor, entries: Mapping[str, _Entry]) -> Supervisor:
        children: dict[str, list[_Entry]] = {}
        for entry in sorted(entries.values(), key=lambda e: e.order):
            children.setdefault(entry.parent, []).append(entry)

        def build(spec: AnySpec) -> AnySpec:
            if not isinstance(spec, Supervisor):
                return spec
            added = [build(e.spec) for e in children.get(spec.name, [])]
            # Supervisors of the --tree keep their own children first; file entries follow.
            kept = [build(c) for c in spec.children]
            if not added and kept == list(spec.children):
                return spec
            return Supervisor(
                spec.name,
                spec.strategy,
                spec.max_restarts,
                spec.within,
                [*kept, *added],
                restart=spec.restart,
                shutdown=spec.shutdown,
                requires=spec.requires,
                after=spec.after,
                description=spec.description,
                backoff=spec.backoff,
                placement=spec.placement,
            )

        return cast(Supervisor, build(root))

    def _spec_error(self, exc: SpecError, entries: Mapping[str, _Entry]) -> ConfigError:
        """Map validate_tree's error, which names a tree path, back to the table at fault."""
        name = exc.path.rsplit("/", 1)[-1]
        key = {"actor": "class", "name": None, "children": "strategy"}.get(exc.key or "", exc.key)
        entry = entries.get(name)
        if entry is not None:
            return ConfigError(self.file, entry.table.name, key, exc.expected, exc.got)
        if self.base is None:
            return ConfigError(self.file, "root", key, exc.expected, exc.got)
        # A spec of the --tree supervisor, made invalid by what the file added to it
        # (a simple_one_for_one given a second child): blame the first entry placed there.
        for entry in sorted(entries.values(), key=lambda e: e.order):
            if entry.parent == name:
                expected = f"a supervisor that accepts it ({exc.path}: {exc.expected})"
                return entry.table.error(entry.parent_key, expected, entry.parent)
        return ConfigError(self.file, None, key, f"{exc.expected} (at {exc.path})", exc.got)
