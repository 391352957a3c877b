"""The options that shape an executable's process: one typed definition.

:class:`ExecOptions` has one attribute per process-shaping field of an
executable daemon (arguments, environment, user, directory, stdio, limits,
systemd's ``Type=``, signals...), each declared with
:func:`~ikos.platform._fields.option`: its type, default, check, one-line
description and whether a change restarts a running daemon. That
declaration is the table every front end reads (:data:`EXEC_OPTIONS`):
``ikos.Exec`` keywords, ``[executables.NAME]`` keys, the JSON of
``daemon_create``/``daemon_update`` and ``ikos.daemon.DaemonConfig``. The
restart policy (``auto_start``, ``restart_delay``...) is supervision's
business and is declared the same way on ``ikos.Exec`` itself.

Values are normalised to hashable forms (tuples, :class:`FrozenDict`,
:class:`ResourceLimits`, signal numbers), so that a spec holding them is a
value: hashable, and equal to another spec exactly when both run the same
process. Checks are about the value alone; what depends on the machine
(users, files, ``PATH``, hard limits) is resolved by
:func:`ikos.platform._spawn.build_exec_plan`, which takes any object with a
``name``, an ``executable`` and ``options`` (:class:`ExecTarget`), so that
this layer needs nothing from the supervision layer above it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ikos.platform._fields import (
    FieldSpec,
    FrozenDict,
    InvalidField,
    boolean,
    check_fields,
    choice,
    field_table,
    is_int,
    normalise_fields,
    option,
    seconds,
)
from ikos.platform._limits import ResourceLimits, check_limits, limits_json
from ikos.platform._signals import parse_signal, signal_name
from ikos.platform._unit_command import UnitCommand, parse_command_list

__all__ = ["EXEC_OPTIONS", "EXEC_TYPES", "KILL_MODES", "ExecOptions", "ExecTarget"]

#: systemd's ``Type=`` values.
EXEC_TYPES: tuple[str, ...] = ("simple", "exec", "forking", "notify", "oneshot")
#: How a daemon's processes are found when it stops (systemd's ``KillMode=``).
KILL_MODES: tuple[str, ...] = ("control-group", "process-group")
_NO_LIMITS = ResourceLimits()  # frozen: one shared default is safe
_STDIN = "'null', 'inherit' or 'file:PATH'"
_STDOUT = "'null', 'inherit', 'log', 'file:PATH' or 'append:PATH'"


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


def _check_args(value: object) -> tuple[str, ...]:
    expected = "a list of strings"
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidField(None, expected, value)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int | float) or "\0" in str(item):
            raise InvalidField(None, f"{expected} (without NUL bytes)", value)
    return tuple(str(item) for item in value)


def _check_environment(value: object) -> FrozenDict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidField(None, "a table of strings, like { LANG = 'C.UTF-8' }", value)
    env: dict[str, str] = {}
    for name, item in value.items():
        if not _text(name) or "=" in name:
            raise InvalidField(None, "variable names without '=' or NUL", name)
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise InvalidField(name, "a string", item)
        if "\0" in str(item):
            raise InvalidField(name, "a string without NUL bytes", item)
        env[name] = str(item)
    return FrozenDict(env)


def _path(value: object, expected: str = "a non-empty string (a path)") -> str:
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not _text(text):
        raise InvalidField(None, expected, value)
    return cast(str, text)


def _check_paths(value: object) -> tuple[str, ...]:
    expected = "a list of paths (non-empty strings)"
    if isinstance(value, str | os.PathLike):
        value = [value]
    if not isinstance(value, list | tuple):
        raise InvalidField(None, expected, value)
    return tuple(_path(item, expected) for item in value)


def _check_user(value: object) -> str | int:
    if not (_text(value) or (is_int(value) and cast(int, value) >= 0)):
        raise InvalidField(None, "a user name or uid", value)
    return cast("str | int", value)


def _check_group(value: object) -> str | int:
    if not (_text(value) or (is_int(value) and cast(int, value) >= 0)):
        raise InvalidField(None, "a group name or gid", value)
    return cast("str | int", value)


def _check_groups(value: object) -> tuple[str | int, ...]:
    items = [value] if isinstance(value, str | int) and not isinstance(value, bool) else value
    if not isinstance(items, list | tuple):
        raise InvalidField(None, "a list of group names or gids", value)
    try:
        return tuple(_check_group(item) for item in items)
    except InvalidField:
        raise InvalidField(None, "a list of group names or gids", value) from None


def _check_umask(value: object) -> int:
    expected = "an octal string like '022' or an integer from 0 to 0o777"
    mask = value
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise InvalidField(None, expected, value)
        mask = int(text, 8)
    if not is_int(mask) or not 0 <= cast(int, mask) <= 0o777:
        raise InvalidField(None, expected, value)
    return cast(int, mask)


def _stdio(modes: tuple[str, ...], prefixes: tuple[str, ...], expected: str) -> Any:
    def check(value: object) -> str:
        if isinstance(value, str) and "\0" not in value:
            if value in modes:
                return value
            for prefix in prefixes:
                if value.startswith(prefix) and len(value) > len(prefix):
                    return value
        raise InvalidField(None, expected, value)

    return check


def _check_signal(value: object) -> int:
    try:
        return parse_signal(value)
    except ValueError:
        raise InvalidField(
            None, "a signal name like 'SIGHUP' or 'HUP', or a signal number", value
        ) from None


def _check_command(value: object) -> str | tuple[str, ...]:
    if _text(value):
        return cast(str, value)
    if isinstance(value, list | tuple) and value:
        try:
            return _check_args(value)  # an argv, like args (numbers turned into strings)
        except InvalidField:
            pass
    raise InvalidField(None, "a shell command string, or a list of strings (argv)", value)


# -- options of systemd units (docs/configuration.md, "Executables from systemd units") --


def _check_unit_commands(value: object) -> tuple[UnitCommand, ...]:
    try:
        return parse_command_list(value)
    except ValueError as exc:
        raise InvalidField(
            None,
            f"command lines in systemd's Exec syntax, like '-/usr/bin/x --check' ({exc})",
            value,
        ) from None


def _commands_json(commands: tuple[UnitCommand, ...]) -> list[str]:
    return [command.text() for command in commands]


def _check_directories(value: object) -> FrozenDict[str, int]:
    expected = "a table of absolute paths to octal modes, like { '/run/app' = '0755' }"
    if not isinstance(value, Mapping):
        raise InvalidField(None, expected, value)
    out: dict[str, int] = {}
    for path, mode in value.items():
        if not _text(path) or not str(path).startswith("/"):
            raise InvalidField(None, expected, path)
        text = mode if isinstance(mode, str) else None
        if text is not None and text and all(c in "01234567" for c in text) and len(text) <= 4:
            out[path] = int(text, 8)
        elif is_int(mode) and 0 <= cast(int, mode) <= 0o7777:
            out[path] = cast(int, mode)
        else:
            raise InvalidField(str(path), "an octal mode like '0755'", mode)
    return FrozenDict(out)


def _directories_json(value: Mapping[str, int]) -> dict[str, str]:
    return {path: f"{mode:04o}" for path, mode in value.items()}


def _umask_json(mask: int) -> str:
    return f"{mask:03o}"


@dataclass(frozen=True, repr=False)
class ExecOptions:
    """How an executable's process is made: every field normalised and hashable.

    Built from users' spellings by :meth:`from_mapping` (or the constructor,
    which normalises too); ``docs/configuration.md`` describes each field.

    Example::

        ExecOptions.from_mapping({"args": ["-g", "daemon off;"], "umask": "027"})
        # ExecOptions(args=('-g', 'daemon off;'), ..., umask=23, ...)
    """

    args: tuple[str, ...] = option(
        (), _check_args, "arguments after the executable (numbers are turned into strings)"
    )
    environment: Mapping[str, str] = option(
        FrozenDict(), _check_environment, "variables added to the environment"
    )
    environment_files: tuple[str, ...] = option(
        (), _check_paths, "files in systemd's EnvironmentFile= syntax ('-' prefix: optional)"
    )
    clear_environment: bool = option(
        False, boolean, "start from an empty environment instead of ikosd's"
    )
    working_directory: str | None = option(
        None, _path, "directory the daemon starts in ('~' is the user's home)"
    )
    root_directory: str | None = option(
        None,
        _path,
        "chroot here before exec, as root (RootDirectory=): the executable, working_directory "
        "and the commands' programs are paths inside it",
    )
    pid_file: str | None = option(
        None, _path, "PID file: read for type 'forking', else written while the daemon runs"
    )
    user: str | int | None = option(None, _check_user, "user (name or uid) to run as")
    group: str | int | None = option(None, _check_group, "group (name or gid) to run as")
    supplementary_groups: tuple[str | int, ...] | None = option(
        None, _check_groups, "supplementary groups (names or gids); [] drops them all"
    )
    umask: int | None = option(None, _check_umask, "file mode creation mask", to_json=_umask_json)
    stdin: str = option(
        "null", _stdio(("null", "inherit"), ("file:",), _STDIN), "where standard input comes from"
    )
    stdout: str = option(
        "log",
        _stdio(("null", "inherit", "log"), ("file:", "append:"), _STDOUT),
        "where standard output goes ('log': the daemon's log file)",
    )
    stderr: str = option(
        "log",
        _stdio(("null", "inherit", "log"), ("file:", "append:"), _STDOUT),
        "where standard error goes",
    )
    # option() returns dataclasses.field(); ruff cannot see that ResourceLimits is frozen
    limits: ResourceLimits = option(  # noqa: RUF009
        _NO_LIMITS, check_limits, "setrlimit and cgroup limits", to_json=limits_json
    )
    type: str = option("simple", choice(EXEC_TYPES), "systemd's Type=: when the daemon is ready")
    reload_signal: int | None = option(
        None, _check_signal, "signal of a reload (default SIGHUP)", to_json=signal_name
    )
    reload_command: str | tuple[str, ...] | None = option(
        None, _check_command, "command run on a reload instead of the signal ($MAINPID set)"
    )
    stop_signal: int = option(
        signal.SIGTERM,
        _check_signal,
        "signal that asks the daemon to stop",
        restarts=False,
        to_json=signal_name,
    )
    watchdog_sec: float = option(
        0.0, seconds(), "WATCHDOG=1 expected at least this often (0: no watchdog)"
    )
    kill_mode: str = option(
        "control-group", choice(KILL_MODES), "which processes a stop reaches: cgroup or session"
    )
    # systemd units' commands and directories (ikos/platform/_unit.py maps them)
    exec_start_pre: tuple[UnitCommand, ...] = option(
        (), _check_unit_commands, "commands run in order before the start (ExecStartPre=)",
        to_json=_commands_json,
    )  # fmt: skip
    exec_start_post: tuple[UnitCommand, ...] = option(
        (), _check_unit_commands, "commands run once started, before ready (ExecStartPost=)",
        to_json=_commands_json,
    )  # fmt: skip
    exec_stop: tuple[UnitCommand, ...] = option(
        (), _check_unit_commands, "commands run to stop, before the stop signal (ExecStop=)",
        restarts=False, to_json=_commands_json,
    )  # fmt: skip
    exec_stop_post: tuple[UnitCommand, ...] = option(
        (), _check_unit_commands, "commands run once stopped, crashed or failed to start, "
        "before a restart (ExecStopPost=)", restarts=False, to_json=_commands_json,
    )  # fmt: skip
    exec_reload: tuple[UnitCommand, ...] = option(
        (), _check_unit_commands, "commands run in order by a reload (ExecReload=)",
        restarts=False, to_json=_commands_json,
    )  # fmt: skip
    reloadable: bool = option(
        True, boolean, "false: a reload is refused (a unit without ExecReload=)", restarts=False
    )
    expand_environment: bool = option(
        False, boolean, "expand $VAR and ${VAR} in args from the daemon's environment"
    )
    argv0: str | None = option(None, _path, "argv[0] the program sees (ExecStart='@')")
    directories: Mapping[str, int] = option(
        FrozenDict(), _check_directories,
        "directories created before the start, owned by user/group (RuntimeDirectory=...)",
        to_json=_directories_json,
    )  # fmt: skip

    def __post_init__(self) -> None:
        normalise_fields(self, EXEC_OPTIONS)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ExecOptions:
        """Options from a mapping of fields; None leaves a field at its default.

        Raises :class:`~ikos.platform._fields.InvalidField` naming the field
        (:class:`~ikos.platform._fields.UnknownField` for an unknown one).
        """
        return cls(**check_fields(EXEC_OPTIONS, values))

    def __repr__(self) -> str:
        # Only what differs from the defaults: twenty default fields hide the one that matters.
        shown = ", ".join(f"{k}={v!r}" for k, v in self.changed_fields().items())
        return f"ExecOptions({shown})"

    def changed_fields(self) -> dict[str, Any]:
        """The fields whose value is not the default, by name, in table order."""
        return {
            name: getattr(self, name)
            for name, spec in EXEC_OPTIONS.items()
            if getattr(self, name) != spec.default
        }


#: The table of :class:`ExecOptions`' fields, by name.
EXEC_OPTIONS: Mapping[str, FieldSpec] = FrozenDict(field_table(ExecOptions))


class ExecTarget(Protocol):
    """What :func:`~ikos.platform._spawn.build_exec_plan` needs of a spec (``ikos.Exec`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def executable(self) -> str: ...

    @property
    def options(self) -> ExecOptions: ...
