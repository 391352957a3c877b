"""The design issue's daemon API: create, control and change executable daemons.

These functions work from any process that reaches the manager, not only
from actors: they find ikosd as ``ikosctl`` does (``root=``, else the
actor's own instance inside an actor, else ``$IKOS_ROOT``, else the
default instance) and speak the control protocol (``docs/protocol.md``).
The design's error codes are exceptions.

Example::

    import ikos.daemon as daemon

    daemon.create(daemon.DaemonConfig(
        name="web", executable="/usr/sbin/nginx", args=["-g", "daemon off;"],
        user="www-data", working_directory="/srv/www",
        limits=daemon.ResourceLimits(nofile=4096),
    ))
    daemon.set_restart_policy("web", daemon.RestartPolicy(max_restarts=5, restart_delay=1))
    print(daemon.status("web").state)           # running
    daemon.set_user("web", "nobody")            # restarts it as nobody

A created daemon joins a supervisor (``DaemonConfig.supervisor``, default
the root) as OTP's ``start_child`` adds a child: validated first, not kept
if it cannot start. ikosd keeps it in its state directory and starts it
again whenever ikosd starts on the same root, until :func:`delete`.

The setters change the daemon's configuration and keep the change (for a
daemon of the configuration file too, like ``systemctl set-property``;
:func:`revert` undoes them). A change to what shapes the process
(executable, arguments, environment, directory, user, limits, stdio)
restarts a running daemon to apply it; a restart policy applies at the
daemon's next exit, without a restart. A stopped or failed daemon keeps
the change for its next start.

Errors (all :class:`ikos.IkosError`)::

    IkosError
    ├── ConfigError            a field's value is invalid (table 'daemon NAME', key = field)
    ├── SpawnError             the daemon cannot start: daemon, field, reason (a missing
    │                          executable, an unknown user, a limit above the hard limit...)
    └── ManagerError           the manager refused or failed the request
        ├── ManagerUnavailable no ikosd answers on the control socket
        ├── NoSuchDaemon       no daemon by that name
        ├── DaemonExists       create: the name is already taken in the tree
        └── PermissionDenied   the caller may read but not control
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ikos._errors import (
    ConfigError,
    DaemonExists,
    IkosError,
    ManagerError,
    ManagerUnavailable,
    NoSuchDaemon,
    PermissionDenied,
    SpawnError,
    SpecError,
)
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths
from ikos.platform._spawn import ResourceLimits
from ikos.supervision._spec import EXEC_FIELDS, Backoff, Exec

__all__ = [
    "Backoff",
    "ConfigError",
    "DaemonConfig",
    "DaemonExists",
    "DaemonStatus",
    "ExitInfo",
    "ManagerError",
    "ManagerUnavailable",
    "NoSuchDaemon",
    "PermissionDenied",
    "ResourceLimits",
    "RestartPolicy",
    "SpawnError",
    "create",
    "delete",
    "get_config",
    "reload",
    "restart",
    "revert",
    "set_resource_limits",
    "set_restart_policy",
    "set_user",
    "set_working_directory",
    "start",
    "status",
    "stop",
    "update",
]

Root = str | os.PathLike[str] | None

#: Seconds a call waits for ikosd unless told otherwise; a start waits for
#: readiness (``start_timeout``, 30 s by default) and a stop for the shutdown.
CALL_TIMEOUT = 60.0


def _check_fields(name: str, fields: Mapping[str, Any]) -> None:
    """Check daemon fields as ``ikos.Exec`` does (their one table), before a round trip.

    Raises :class:`ConfigError` naming the daemon and the field, as ikosd would.
    """
    try:
        Exec(name, "-", fields=fields)
    except SpecError as exc:
        raise ConfigError(None, f"daemon {name}", exc.key, exc.expected, exc.got) from None


# --- the design's structures ------------------------------------------------------------


@dataclass
class DaemonConfig:
    """A daemon to create: the design's ``daemon_config_t`` and ikos's ``Exec`` fields.

    ``supervisor`` names the supervisor the daemon joins (default: the root);
    ``restart`` is its OTP restart type and ``shutdown`` the seconds a stop
    waits before SIGKILL (or ``"brutal_kill"``/``"infinity"``). The others
    are the fields of ``ikos.Exec``, described in ``docs/configuration.md``
    under executables and checked by the same table (a test pins that the
    two lists are the same); None leaves a field unset.
    """

    name: str
    executable: str
    working_directory: str | None = None
    root_directory: str | None = None
    pid_file: str | None = None
    user: str | int | None = None
    group: str | int | None = None
    auto_start: bool = True
    auto_restart: bool = True
    restart_delay: float = 0.0
    max_restarts: int | None = None
    restart_window: float | None = None
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    args: Sequence[str] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    umask: int | str | None = None
    stdin: str = "null"
    stdout: str = "log"
    stderr: str = "log"
    reload_signal: str | int | None = None
    type: str = "simple"
    supervisor: str | None = None
    restart: str = "permanent"
    shutdown: float | str = 5.0
    requires: Sequence[str] = ()
    after: Sequence[str] = ()
    description: str = ""
    restart_on: str | None = None
    backoff: Backoff | None = None
    start_timeout: float = 30.0
    stop_signal: str | int | None = None
    reload_command: str | Sequence[str] | None = None
    watchdog_sec: float | None = None
    supplementary_groups: Sequence[str | int] | None = None
    environment_files: Sequence[str] | None = None
    clear_environment: bool = False
    kill_mode: str | None = None
    # systemd units' fields (docs/configuration.md, "Executables from systemd units")
    exec_start_pre: str | Sequence[str] | None = None
    exec_start_post: str | Sequence[str] | None = None
    exec_stop: str | Sequence[str] | None = None
    exec_reload: str | Sequence[str] | None = None
    exec_stop_post: str | Sequence[str] | None = None
    reloadable: bool | None = None
    expand_environment: bool | None = None
    argv0: str | None = None
    directories: Mapping[str, str | int] | None = None
    success_exit_status: Sequence[int | str] | None = None
    restart_prevent_exit_status: Sequence[int | str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The configuration as the ``daemon_create`` verb takes it.

        Raises :class:`ConfigError` naming the daemon and the field when a
        field's value is of the wrong kind (ikosd checks the rest).
        """
        _check_fields(self.name, {key: getattr(self, key) for key in EXEC_FIELDS})
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _to_json(value)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DaemonConfig:
        """A configuration from its JSON form (``daemon_get``); unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known and v is not None}
        if "limits" in values:
            values["limits"] = ResourceLimits.from_mapping(str(data.get("name")), values["limits"])
        if "backoff" in values:
            values["backoff"] = Backoff(**values["backoff"])
        for key in ("args", "requires", "after", "supplementary_groups", "environment_files"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class RestartPolicy:
    """When an exited daemon restarts, and how soon.

    ``auto_restart`` false: never. ``restart_on``: systemd's ``Restart=``
    (``no``, ``always``, ``on-success``, ``on-failure``, ``on-abnormal``,
    ``on-abort``, ``on-watchdog``), None following the OTP restart type.
    ``restart_delay``: seconds before each restart; ``backoff``: exponential
    back-off instead. After ``max_restarts`` restarts (None: no limit of its
    own, only the supervisor's intensity) the daemon is ``failed``, its
    ``last_exit.reason`` saying so.
    """

    auto_restart: bool = True
    restart_delay: float = 0.0
    max_restarts: int | None = None
    restart_on: str | None = None
    backoff: Backoff | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ExitInfo:
    """How a daemon's last run ended: ``reason`` in words, exit ``code`` or ``signal``."""

    reason: str
    code: int | None = None
    signal: int | None = None
    at: float = 0.0


#: The keys of a status object that have fields of their own in DaemonStatus.
_STATUS_KEYS = (
    "name", "state", "pid", "restarts", "started_at", "supervisor", "kind", "uptime_seconds",
    "restart", "target", "description", "status_text", "created", "last_exit",
)  # fmt: skip


@dataclass(frozen=True)
class DaemonStatus:
    """A daemon's status, as ``ikosctl --json status`` shows it (``docs/protocol.md``).

    ``state`` is one of ``stopped``, ``starting``, ``running``, ``stopping``,
    ``backoff``, ``failed``; ``last_exit`` (and ``exit_code``) describe the
    last run's end, ``last_exit.reason`` also why a ``failed`` daemon gave
    up. Keys this class does not know (added by newer managers or by
    extensions) are in ``extra``.
    """

    name: str
    state: str
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    supervisor: str | None = None
    kind: str = "exec"
    uptime_seconds: float | None = None
    restart: str = "permanent"
    target: str = ""
    last_exit: ExitInfo | None = None
    exit_code: int | None = None
    description: str = ""
    status_text: str = ""
    created: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_json(cls, data: Any) -> DaemonStatus:
        """Parse a status object; raise ManagerError(``bad_response``) if it is not one."""
        if (
            not isinstance(data, Mapping)
            or not isinstance(data.get("name"), str)
            or not isinstance(data.get("state"), str)
        ):
            raise ManagerError(f"not a daemon status: {data!r:.200}", "bad_response")
        raw_exit = data.get("last_exit")
        last_exit = None
        if isinstance(raw_exit, Mapping):
            last_exit = ExitInfo(
                reason=str(raw_exit.get("reason", "")),
                code=_opt_int(raw_exit.get("code")),
                signal=_opt_int(raw_exit.get("signal")),
                at=float(raw_exit.get("at") or 0.0),
            )
        return cls(
            name=data["name"],
            state=data["state"],
            pid=_opt_int(data.get("pid")),
            restarts=_opt_int(data.get("restarts")) or 0,
            started_at=_opt_float(data.get("started_at")),
            supervisor=data.get("supervisor"),
            kind=str(data.get("kind", "exec")),
            uptime_seconds=_opt_float(data.get("uptime_seconds")),
            restart=str(data.get("restart", "permanent")),
            target=str(data.get("target", "")),
            last_exit=last_exit,
            exit_code=last_exit.code if last_exit is not None else None,
            description=str(data.get("description") or ""),
            status_text=str(data.get("status_text") or ""),
            created=bool(data.get("created", False)),
            extra={k: v for k, v in data.items() if k not in _STATUS_KEYS},
        )


def _opt_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _opt_float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _to_json(value: Any) -> Any:
    if isinstance(value, ResourceLimits):
        limits = value.as_mapping()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in limits.items()} or None
    if isinstance(value, Backoff):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# --- talking to ikosd -------------------------------------------------------------------


_lock = threading.Lock()
_clients: dict[InstancePaths, ControlClient] = {}


def _forget_clients() -> None:
    # A forked child must not share its parent's connection.
    global _lock
    _lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_clients)


def _paths(root: Root) -> InstancePaths:
    from ikos.actors import _context

    return _context.instance_paths(root)


def _call(verb: str, args: Mapping[str, Any], root: Root, timeout: float | None) -> Any:
    paths = _paths(root)
    with _lock:
        client = _clients.get(paths)
        if client is None:
            client = _clients[paths] = ControlClient(paths, timeout=CALL_TIMEOUT)
    try:
        return client.call(verb, args, timeout=timeout)
    except ManagerError as exc:
        raise _daemon_error(exc) from None


_SPAWN_RE = re.compile(
    r"^daemon '(?P<daemon>[^']*)'(?:, field '(?P<field>[^']*)')?: (?P<reason>.*)$", re.DOTALL
)
_CONFIG_RE = re.compile(
    r"^\[(?P<table>[^\]]*)\](?: key '(?P<key>[^']*)')?: expected (?P<expected>.*)$", re.DOTALL
)


def _daemon_error(exc: ManagerError) -> IkosError:
    """The exception of an error answer: field errors become SpawnError and ConfigError."""
    message = str(exc)
    if exc.code == "spawn_error":
        found = _SPAWN_RE.match(message)
        if found:
            return SpawnError(found["daemon"], found["field"], found["reason"])
    elif exc.code == "config_error":
        found = _CONFIG_RE.match(message)
        if found:
            return ConfigError(None, found["table"], found["key"], found["expected"])
    return exc


def _status(result: Any) -> DaemonStatus:
    if isinstance(result, list) and len(result) == 1:
        result = result[0]
    return DaemonStatus.from_json(result)


# --- the API ----------------------------------------------------------------------------


def create(
    config: DaemonConfig, *, root: Root = None, timeout: float | None = None
) -> DaemonStatus:
    """Create a daemon, join it to its supervisor and start it (unless ``auto_start`` is false).

    Returns its status once it is ready (or held, stopped). Raises
    :class:`DaemonExists` if the name is taken, :class:`SpawnError` naming
    the field if it cannot start (nothing is kept then), :class:`ConfigError`
    for a field of the wrong kind or an unknown supervisor.

    >>> create(DaemonConfig(name="sleeper", executable="/bin/sleep", args=["1000"]))
    ... # doctest: +SKIP
    DaemonStatus(name='sleeper', state='running', pid=4242, ...)
    """
    if timeout is None:
        timeout = max(CALL_TIMEOUT, config.start_timeout + 30.0)
    return _status(_call("daemon_create", {"config": config.to_json()}, root, timeout))


def start(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonStatus:
    """Start a stopped daemon; its status once it is ready."""
    return _status(_call("start", {"name": name}, root, timeout))


def stop(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonStatus:
    """Stop a daemon (stop signal, shutdown timeout, SIGKILL); it stays stopped until start."""
    return _status(_call("stop", {"name": name}, root, timeout))


def restart(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonStatus:
    """Stop and start a daemon; its status once it is ready again."""
    return _status(_call("restart", {"name": name}, root, timeout))


def reload(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonStatus:
    """Ask a running daemon to reload (its reload command, else ``reload_signal``, SIGHUP).

    For ``type = "notify"`` this returns once the daemon reported READY=1 again.
    """
    return _status(_call("reload", {"name": name}, root, timeout))


def status(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonStatus:
    """The daemon's status; :class:`NoSuchDaemon` if there is none by that name."""
    return _status(_call("status", {"names": [name]}, root, timeout))


def update(
    name: str, *, root: Root = None, timeout: float | None = None, **changes: Any
) -> DaemonStatus:
    """Change any fields of :class:`DaemonConfig` (None resets one) and keep the change.

    A running daemon restarts if a changed field shapes its process; see the
    module docstring. Raises :class:`SpawnError`/:class:`ConfigError` naming
    the field, and changes nothing then.

    >>> update("web", umask="027", environment={"MODE": "prod"})  # doctest: +SKIP
    """
    # The daemon's own fields are checked here; the spec's keys (restart, requires...) by ikosd.
    spec_keys = {f.name for f in dataclasses.fields(DaemonConfig)} - set(EXEC_FIELDS)
    _check_fields(name, {k: v for k, v in changes.items() if k not in spec_keys})
    args = {"name": name, "changes": {k: _to_json(v) for k, v in changes.items()}}
    return _status(_call("daemon_update", args, root, timeout))


def set_working_directory(
    name: str, path: str | os.PathLike[str], *, root: Root = None, timeout: float | None = None
) -> DaemonStatus:
    """Change the working directory; a running daemon restarts in the new one."""
    return update(name, root=root, timeout=timeout, working_directory=os.fspath(path))


def set_user(
    name: str,
    user: str | int,
    group: str | int | None = None,
    *,
    root: Root = None,
    timeout: float | None = None,
) -> DaemonStatus:
    """Run the daemon as ``user`` (and ``group``, else the user's own); restarts it if running.

    Needs ikosd to run as root unless ``user`` is ikosd's own.
    """
    return update(name, root=root, timeout=timeout, user=user, group=group)


def set_resource_limits(
    name: str,
    limits: ResourceLimits | Mapping[str, Any],
    *,
    root: Root = None,
    timeout: float | None = None,
) -> DaemonStatus:
    """Replace the daemon's limits (all of them); a running daemon restarts with them.

    >>> set_resource_limits("web", ResourceLimits(nofile=(1024, 4096), core=0))  # doctest: +SKIP
    """
    if not isinstance(limits, ResourceLimits):
        limits = ResourceLimits.from_mapping(name, limits)
    return update(name, root=root, timeout=timeout, limits=limits)


def set_restart_policy(
    name: str, policy: RestartPolicy, *, root: Root = None, timeout: float | None = None
) -> DaemonStatus:
    """Replace the daemon's restart policy; it applies at its next exit, without a restart."""
    return update(name, root=root, timeout=timeout, **policy.to_json())


def get_config(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonConfig:
    """The daemon's current configuration, changes included."""
    result = _call("daemon_get", {"name": name}, root, timeout)
    if not isinstance(result, Mapping) or not isinstance(result.get("config"), Mapping):
        raise ManagerError(f"not a daemon configuration: {result!r:.200}", "bad_response")
    return DaemonConfig.from_json(result["config"])


def revert(name: str, *, root: Root = None, timeout: float | None = None) -> DaemonStatus:
    """Drop the changes made to a daemon of the configuration file; restarts it if needed."""
    return _status(_call("daemon_revert", {"name": name}, root, timeout))


def delete(name: str, *, root: Root = None, timeout: float | None = None) -> None:
    """Stop and forget a daemon made by :func:`create` (configured ones are refused)."""
    _call("daemon_delete", {"name": name}, root, timeout)
