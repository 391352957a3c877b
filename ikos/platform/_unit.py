"""systemd unit files: read a ``.service`` file and say how ikos runs it.

Three pure steps, each testable without a process:

1. :func:`parse_unit_text` reads systemd's syntax (systemd.syntax(7)):
   sections, ``Key=Value`` lines, comments (``#``, ``;``), lines continued
   with a backslash. Every assignment becomes a :class:`Directive` that
   remembers its file and line, so that anything said about it later points
   at the line the user wrote. :func:`read_unit` adds the drop-ins
   (``NAME.service.d/*.conf``) and finds a template (``name@.service``) for
   an instance (``name@inst.service``).
2. :func:`split_command` splits an ``Exec*=`` line as systemd does
   (quotes, C escapes, ``;`` between commands, the ``@-:+!`` prefixes);
   :func:`expand_variables` does the ``$VAR``/``${VAR}`` expansion, which
   can only happen when the daemon starts (``EnvironmentFile=`` is read
   then), so commands keep their ``$`` until :mod:`ikos.manager._exec`
   runs them. Both live in :mod:`ikos.platform._unit_command`, which an
   executable's ``exec_*`` options import without this module (re-exported
   here).
3. :func:`unit_fields` maps the directives to the fields of an
   ``ikos.Exec`` (:class:`UnitSpec`), collecting one warning per
   directive ikos does not support (``FILE:LINE: Key= is not supported by
   ikos; ignored``) and raising :class:`UnitError` for a unit that cannot
   run as written (no ``ExecStart=``, an unknown ``Type=``, an essential
   directive ikos lacks, such as ``RootImage=``).

The rule for "essential" (documented in ``docs/configuration.md``): a
directive is essential when ignoring it would run another program, as
another identity or with more privileges than the unit grants its
processes' identity, or in another file system (``RootImage=``,
``DynamicUser=``, ``ExecCondition=``, ``StandardInput=socket``...).
Sandboxing that only narrows what the process may do (``ProtectSystem=``,
``PrivateTmp=``, ``CapabilityBoundingSet=``...) is not: the daemon runs
the same, less contained, and the warning says so.

Rejected: parsing with :mod:`configparser`, which knows neither repeated
keys that accumulate, nor the empty assignment that resets a list, nor
systemd's continuation and quoting rules.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import resource
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikos._errors import ConfigError
from ikos.platform._signals import parse_signal, signal_name
from ikos.platform._unit_command import (
    UnitCommand,
    expand_variables,
    parse_command_list,
    split_command,
    split_words,
    stop_post_environment,
)

__all__ = [
    "Directive",
    "UnitCommand",
    "UnitError",
    "UnitSpec",
    "expand_variables",
    "link_units",
    "load_unit",
    "parse_command_list",
    "parse_timespan",
    "parse_unit_text",
    "read_unit",
    "split_command",
    "split_words",
    "stop_post_environment",
    "unit_fields",
    "unit_files",
]


class UnitError(ConfigError):
    """A unit file that ikos cannot run as written: names the file, line and directive."""

    def __init__(self, file: str, line: int | None, key: str | None, why: str) -> None:
        ConfigError.__init__(self, file, None, key, why)
        self.line, self.why = line, why

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.file, self.line, self.key, self.why))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        what = f" {self.key}=" if self.key else ""
        return f"{where}:{what} {self.why}"


@dataclass(frozen=True)
class Directive:
    """One ``Key=Value`` assignment of a unit file, with where it was written."""

    section: str
    key: str
    value: str
    file: str
    line: int

    @property
    def where(self) -> str:
        """``FILE:LINE`` of the assignment."""
        return f"{self.file}:{self.line}"


# -- 1. syntax ---------------------------------------------------------------------------------


def parse_unit_text(text: str, file: str) -> tuple[Directive, ...]:
    """The assignments of a unit file, in order (systemd.syntax(7)).

    A line ending in a backslash continues on the next one (the backslash
    becomes a space; comment lines inside the continuation are skipped);
    ``#`` and ``;`` start comment lines; blanks around keys and values are
    removed. Raises :class:`UnitError` for a line that is neither a
    section, an assignment, a comment nor blank, or an assignment before
    any section.

    >>> d = parse_unit_text("[Unit]\\nA=b\\\\\\n c\\n", "u")[0]
    >>> (d.section, d.key, d.value, d.line)
    ('Unit', 'A', 'b c', 2)
    """
    directives: list[Directive] = []
    section: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\") and i < len(lines):
            following = lines[i].strip()
            i += 1
            if following[:1] in ("#", ";"):
                continue
            line = line[:-1] + " " + following
        if line.endswith("\\"):
            line = line[:-1]
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise UnitError(
                    file, number, None, f"expected a section like [Service], got {line!r}"
                )
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise UnitError(file, number, None, f"expected Key=Value, got {line!r}")
        if section is None:
            raise UnitError(file, number, key, "assignment outside of any [Section]")
        directives.append(Directive(section, key, value.strip(), file, number))
    return tuple(directives)


def _instance_parts(unit_name: str) -> tuple[str, str | None, str]:
    """``(prefix, instance or None, suffix)`` of ``prefix@instance.suffix``."""
    stem, dot, suffix = unit_name.rpartition(".")
    if not dot:
        stem, suffix = unit_name, "service"
    prefix, at, instance = stem.partition("@")
    return prefix, (instance if at else None), suffix


#: Where an administrator's drop-ins live, highest priority first (systemd.unit(5)):
#: they apply to a unit read from anywhere, as they do under systemd.
SYSTEM_UNIT_DIRS: tuple[str, ...] = ("/etc/systemd/system", "/run/systemd/system")


def read_unit(path: str | os.PathLike[str]) -> tuple[str, tuple[Directive, ...]]:
    """The unit name and directives of ``path``, drop-ins included.

    ``path`` may name an instance of a template that has no file of its own
    (``/lib/systemd/system/redis-server@6380.service``): the template
    (``redis-server@.service``) in the same directory is read. Drop-ins
    ``NAME.d/*.conf`` (and the template's ``name@.service.d/*.conf``), next
    to the unit and in :data:`SYSTEM_UNIT_DIRS`, apply in the order of
    their file names; of two files of one name, the one in the directory of
    higher priority wins.
    Raises :class:`UnitError` when no file can be read.
    """
    given = Path(path)
    unit_name = given.name
    if "." not in unit_name:
        unit_name += ".service"
        given = given.with_name(unit_name)
    prefix, instance, suffix = _instance_parts(unit_name)
    candidates = [given]
    if instance:
        candidates.append(given.with_name(f"{prefix}@.{suffix}"))
    for candidate in candidates:
        try:
            text = candidate.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise UnitError(str(candidate), None, None, f"cannot read the unit: {exc}") from None
        break
    else:
        tried = " or ".join(str(c) for c in candidates)
        raise UnitError(str(given), None, None, f"no unit file ({tried} not found)")
    directives = list(parse_unit_text(text, str(candidate)))
    names = [unit_name + ".d"]
    if instance:
        names.insert(0, f"{prefix}@.{suffix}.d")
    # systemd's rule: every drop-in of the unit (and of its template) applies, in the
    # order of the file names; a file in a directory of higher priority hides one of
    # the same name in a lower one
    found: dict[str, Path] = {}
    for base in (given.parent, *(Path(d) for d in reversed(SYSTEM_UNIT_DIRS))):
        for folder in (base / name for name in names):
            if folder.is_dir():
                found.update((conf.name, conf) for conf in folder.glob("*.conf"))
    for _, conf in sorted(found.items()):
        try:
            directives += parse_unit_text(conf.read_text(encoding="utf-8"), str(conf))
        except (OSError, UnicodeDecodeError) as exc:
            raise UnitError(str(conf), None, None, f"cannot read the drop-in: {exc}") from None
    return unit_name, tuple(directives)


# -- 2. command lines: ikos.platform._unit_command (an Exec's options need them without a unit) --
# -- 3. directives to an Exec ------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSpec:
    """What a unit file says, as ikos runs it: an ``ikos.Exec``'s arguments and the rest.

    ``fields`` are ``ikos.Exec`` keywords (``description``, ``shutdown`` and
    ``start_timeout`` included); ``requires``/``after``/``before`` are unit
    names (``network.target``, ``redis-server.service``) that the caller
    maps to the executables it knows; ``warnings`` says, once per
    directive, what ikos ignored and where.
    """

    unit_name: str
    name: str
    executable: str
    fields: Mapping[str, Any]
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    file: str = ""
    #: where each dependency was first named: ``{"network.target": "FILE:LINE: After="}``
    named_at: Mapping[str, str] = field(default_factory=dict)


_TYPES = {"simple": "simple", "exec": "exec", "forking": "forking", "notify": "notify",
          "oneshot": "oneshot", "notify-reload": "notify", "idle": "simple"}  # fmt: skip
_RESTART = ("no", "always", "on-success", "on-failure", "on-abnormal", "on-abort", "on-watchdog")
_KILL_MODES = {"control-group": "control-group", "mixed": "control-group",
               "process": "process-group"}  # fmt: skip
_LIMITS = {
    "LimitCPU": "cpu", "LimitFSIZE": "fsize", "LimitDATA": "data", "LimitSTACK": "stack",
    "LimitCORE": "core", "LimitRSS": "rss", "LimitNOFILE": "nofile", "LimitAS": "as",
    "LimitNPROC": "nproc", "LimitMEMLOCK": "memlock", "LimitLOCKS": "locks",
    "LimitSIGPENDING": "sigpending", "LimitMSGQUEUE": "msgqueue", "LimitNICE": "nice",
    "LimitRTPRIO": "rtprio", "LimitRTTIME": "rttime",
}  # fmt: skip
_TIME_LIMITS = ("LimitCPU", "LimitRTTIME")
#: Directories systemd creates, and where: the base under the instance root.
_DIRECTORIES = {
    "RuntimeDirectory": ("run", "RUNTIME_DIRECTORY"),
    "StateDirectory": ("var/lib", "STATE_DIRECTORY"),
    "CacheDirectory": ("var/cache", "CACHE_DIRECTORY"),
    "LogsDirectory": ("var/log", "LOGS_DIRECTORY"),
    "ConfigurationDirectory": ("etc", "CONFIGURATION_DIRECTORY"),
}
#: Directives ikos cannot honour and must not ignore: the unit is refused.
_ESSENTIAL = {
    "RootImage": "ikos does not mount disk images",
    "DynamicUser": "ikos does not allocate users; without one the daemon would run as root",
    "ExecCondition": "the condition decides whether the daemon runs at all",
    "PAMName": "ikos does not open PAM sessions",
    "Sockets": "ikos does not pass sockets to daemons (no socket activation)",
    "BusName": "Type=dbus services need D-Bus name tracking, which ikos lacks",
}
#: Directives read as lists (every assignment counts, an empty one resets): their
#: handlers see every line; the others only the last one, if it is not empty.
_ACCUMULATING = frozenset({
    "Requires", "Wants", "BindsTo", "Requisite", "After", "Before", "Environment",
    "EnvironmentFile", "SupplementaryGroups", "ExecStart", "ExecStartPre", "ExecStartPost",
    "ExecStop", "ExecStopPost", "ExecReload", "SuccessExitStatus", "RestartPreventExitStatus",
    "RuntimeDirectory", "StateDirectory", "CacheDirectory", "LogsDirectory",
    "ConfigurationDirectory",
})  # fmt: skip
#: Informational or about enabling (``[Install]``): nothing to do, nothing to report.
_SILENT = {
    ("Unit", "Documentation"), ("Unit", "DefaultDependencies"), ("Service", "RemainAfterExit"),
    ("Service", "GuessMainPID"), ("Service", "SyslogIdentifier"), ("Service", "PIDFile"),
}  # fmt: skip
_MAX_TIMEOUT = 365 * 24 * 3600.0  # "infinity": a year is as good, and stays a finite number

_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0,
    "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0,
    "hr": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0,
    "days": 86400.0, "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}  # fmt: skip
_SPAN_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)


def parse_timespan(text: str) -> float | None:
    """Seconds of a systemd time span (``90``, ``1min 30s``, ``100ms``); None for infinity.

    >>> parse_timespan("1min 30s"), parse_timespan("250ms"), parse_timespan("infinity")
    (90.0, 0.25, None)
    """
    value = text.strip()
    if value == "infinity":
        return None
    total, pos = 0.0, 0
    if not value:
        raise ValueError("expected a time span, got nothing")
    while pos < len(value):
        match = _SPAN_PART.match(value, pos)
        if match is None or match.end() == pos:
            raise ValueError(
                f"expected a time span like '90', '5s', '1min 30s' or 'infinity', got {text!r}"
            )
        unit = match.group(2).lower() or "s"
        if unit not in _TIME_UNITS:
            raise ValueError(f"unknown time unit {match.group(2)!r} in {text!r}")
        total += float(match.group(1)) * _TIME_UNITS[unit]
        pos = match.end()
        while pos < len(value) and value[pos].isspace():
            pos += 1
    return total


_SIZE = re.compile(r"^(\d+)([KMGTPE]?)$", re.IGNORECASE)


def _rlimit_value(key: str, text: str) -> int:
    if text == "infinity":
        return resource.RLIM_INFINITY
    if key in _TIME_LIMITS:
        seconds = parse_timespan(text)
        if seconds is None:
            return resource.RLIM_INFINITY
        # LimitCPU is in seconds, LimitRTTIME in microseconds
        return int(seconds * 1e6) if key == "LimitRTTIME" else int(seconds)
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a number, a size like '64K', or 'infinity', got {text!r}")
    return int(match.group(1)) << (10 * " KMGTPE".index(match.group(2).upper() or " "))


def _limit(key: str, text: str) -> int | tuple[int, int]:
    soft, sep, hard = text.partition(":")
    if sep:
        return (_rlimit_value(key, soft.strip()), _rlimit_value(key, hard.strip()))
    return _rlimit_value(key, text)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "y", "true", "t", "on"):
        return True
    if lowered in ("0", "no", "n", "false", "f", "off"):
        return False
    raise ValueError(f"expected a boolean (yes/no), got {text!r}")


def _exit_statuses(text: str) -> list[int | str]:
    out: list[int | str] = []
    for word in text.split():
        if word.isdigit() and int(word) <= 255:
            out.append(int(word))
            continue
        try:
            out.append(signal_name(parse_signal(word)))
        except ValueError:
            raise ValueError(
                f"expected exit statuses (0-255) and signal names, got {word!r}"
            ) from None
    return out


def _unescape_name(text: str) -> str:
    """systemd's unit-name unescaping (``%I``): ``\\xNN`` decoded, ``-`` left alone."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _specifier_table(unit_name: str, root: str) -> dict[str, str]:
    """What each ``%x`` of a unit means (systemd.unit(5), "Specifiers"), for the system manager."""
    prefix, instance, _ = _instance_parts(unit_name)
    stem = unit_name.rpartition(".")[0] or unit_name
    instance = instance or ""
    base = root.rstrip("/")
    uid, gid = os.geteuid(), os.getegid()
    try:
        user = pwd.getpwuid(uid)
        user_name, home = user.pw_name, user.pw_dir
    except KeyError:
        user_name, home = str(uid), "/"
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    unescaped_prefix = _unescape_name(prefix)
    return {
        "n": unit_name, "N": stem, "p": prefix, "P": unescaped_prefix,
        "i": instance, "I": _unescape_name(instance),
        # a path-escaped name: '-' is '/', and only then \x2d is '-'
        "f": "/" + _unescape_name((instance or prefix).replace("-", "/")).lstrip("/"),
        "j": prefix.rpartition("-")[2], "J": unescaped_prefix.rpartition("-")[2],
        "t": f"{base}/run", "S": f"{base}/var/lib", "C": f"{base}/var/cache",
        "L": f"{base}/var/log", "E": f"{base}/etc", "T": "/tmp", "V": "/var/tmp",
        "h": home, "u": user_name, "U": str(uid), "g": group_name, "G": str(gid),
        "H": socket.gethostname(), "l": socket.gethostname().partition(".")[0],
        "v": os.uname().release, "a": os.uname().machine, "%": "%",
    }  # fmt: skip


def _expand_specifiers(d: Directive, table: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if not letter:
            raise UnitError(d.file, d.line, d.key, "a lone % at the end (%% is a percent sign)")
        if letter not in table:
            raise UnitError(d.file, d.line, d.key, f"unknown specifier %{letter}")
        return table[letter]

    return re.sub(r"%(.?)", one, d.value)


def _service_name(unit_name: str) -> str:
    """The ikos name of a unit: ``redis-server.service`` -> ``redis-server``."""
    return unit_name.removesuffix(".service")


class _Mapper:
    """The walk over one unit's directives; see :func:`unit_fields`."""

    def __init__(self, unit_name: str, directives: Sequence[Directive], root: str) -> None:
        self.unit_name = unit_name
        self.directives = directives
        self.root = root.rstrip("/") or ""
        self.specifiers = _specifier_table(unit_name, root or "/")
        self.warnings: list[str] = []
        self.reported: set[tuple[str, str]] = set()
        self.lists: dict[str, list[Directive]] = {}
        self.last: dict[str, Directive] = {}
        self.directories: dict[str, dict[str, str]] = {}  # by directive: path -> mode

    def warn(self, d: Directive, why: str = "is not supported by ikos; ignored") -> None:
        if (d.section, d.key) not in self.reported:
            self.reported.add((d.section, d.key))
            self.warnings.append(f"{d.where}: {d.key}= {why}")

    def collect(self) -> None:
        """Group assignments: the last one wins, lists accumulate, an empty one resets."""
        for d in self.directives:
            key = f"{d.section}.{d.key}"
            if d.value == "":
                self.lists[key] = []
            else:
                self.lists.setdefault(key, []).append(d)
            self.last[key] = d

    def value(self, d: Directive) -> str:
        return _expand_specifiers(d, self.specifiers)

    def get(self, section: str, key: str) -> Directive | None:
        d = self.last.get(f"{section}.{key}")
        return d if d is not None and d.value != "" else None

    def all(self, section: str, key: str) -> list[Directive]:
        return self.lists.get(f"{section}.{key}", [])

    def commands(self, key: str) -> tuple[UnitCommand, ...]:
        out: list[UnitCommand] = []
        for d in self.all("Service", key):
            try:
                out += split_command(self.value(d))
            except ValueError as exc:
                raise UnitError(d.file, d.line, d.key, str(exc)) from None
        return tuple(out)

    def fail(self, d: Directive, why: str) -> UnitError:
        return UnitError(d.file, d.line, d.key, why)


def unit_fields(
    unit_name: str,
    directives: Sequence[Directive],
    *,
    name: str | None = None,
    root: str | os.PathLike[str] | None = None,
    file: str = "",
) -> UnitSpec:
    """Map a unit's directives to an ``ikos.Exec``'s arguments (see :class:`UnitSpec`).

    ``root`` is the instance root (``ikosd --root``): what the unit calls
    ``/run``, ``/var/lib``, ``/var/log``, ``/var/cache`` and ``/etc`` for
    ``RuntimeDirectory=`` and the like, and ``%t``, ``%S``, ``%L``, ``%C``,
    ``%E``, live under it (default: ``/``, systemd's own places).
    Raises :class:`UnitError` naming file, line and directive for a unit
    that cannot run (no ``ExecStart=``, an unknown ``Type=``, a bad value,
    an essential directive ikos lacks).
    """
    m = _Mapper(unit_name, directives, os.fspath(root) if root is not None else "")
    m.collect()
    fields: dict[str, Any] = {}
    spec_name = name or _service_name(unit_name)
    where = file or (directives[0].file if directives else unit_name)
    known_sections = {"Unit", "Service", "Install"}

    for d in directives:
        if d.section not in known_sections:
            m.warn(d, f"is in section [{d.section}], which ikos does not read; ignored")
            continue
        if d.section == "Install" or (d.section, d.key) in _SILENT:
            continue
        if d.key in _ESSENTIAL and d.value not in ("", "no", "false", "0"):
            raise m.fail(d, f"is not supported by ikos, and the unit cannot run without it: "
                         f"{_ESSENTIAL[d.key]}")  # fmt: skip
        handler = _HANDLERS.get((d.section, d.key))
        if handler is None:
            m.warn(d)
            continue
        if d.key not in _ACCUMULATING and (
            d.value == "" or m.last[f"{d.section}.{d.key}"] is not d
        ):
            continue  # a setting: the last assignment wins, an empty one leaves the default
        try:
            handler(m, d, fields)
        except ValueError as exc:  # a helper's message says what was expected
            raise m.fail(d, str(exc)) from None

    # ExecStart: one command (several only for oneshot, the others run in order after it)
    starts = m.commands("ExecStart")
    service_type = fields.get("type", "simple")
    if not starts:
        raise UnitError(where, None, "ExecStart", "missing: a service needs the command it runs")
    if len(starts) > 1 and service_type != "oneshot":
        d = m.all("Service", "ExecStart")[-1]
        raise m.fail(d, "has more than one command, which only Type=oneshot allows")
    main = starts[0]
    if main.privileged:
        d = m.all("Service", "ExecStart")[0]
        raise m.fail(d, "the + prefix (full privileges) on the main command is not supported")
    executable, args = main.argv[0], list(main.argv[1:])
    if main.ignore_failure:
        fields["success_exit_status"] = [*fields.get("success_exit_status", ()), *range(1, 256)]
    if main.argv0 is not None:
        fields["argv0"] = main.argv0
    if main.expand and any("$" in a for a in args):
        fields["expand_environment"] = True  # with ':', '$' reaches the program as written
    fields["args"] = args
    for key, option in (("ExecStartPre", "exec_start_pre"), ("ExecStartPost", "exec_start_post"),
                        ("ExecStop", "exec_stop"), ("ExecReload", "exec_reload"),
                        ("ExecStopPost", "exec_stop_post")):  # fmt: skip
        commands = m.commands(key)
        if key == "ExecStartPost":
            commands = (*starts[1:], *commands)
        if commands:
            fields[option] = list(commands)
    if "exec_reload" not in fields and "reload_signal" not in fields:
        fields["reloadable"] = False  # systemd: "Job type reload is not applicable for unit"
    pid = m.get("Service", "PIDFile")
    if pid is not None and service_type == "forking":
        # other types: systemd reads it only when the daemon sends no MAINPID; ikos
        # would write it (a pid_file of a non-forking daemon), clashing with the daemon
        fields["pid_file"] = m.value(pid)
    directories = {p: mode for paths in m.directories.values() for p, mode in paths.items()}
    if directories:
        fields["directories"] = directories
        env = fields.setdefault("environment", {})
        for kind, paths in m.directories.items():  # as systemd: $RUNTIME_DIRECTORY...
            if paths:
                env[_DIRECTORIES[kind][1]] = ":".join(paths)
    _start_limit(m, fields)
    # systemd's defaults where ikos's differ: no restart, 90 s to start and to stop
    fields.setdefault("restart_on", "no")
    fields.setdefault("start_timeout", 90.0)
    fields.setdefault("shutdown", 90.0)
    if fields.pop("send_sigkill", True) is False:
        fields["shutdown"] = "infinity"  # SendSIGKILL=no: wait for the stop signal to work

    named_at: dict[str, str] = {}

    def units(*keys: str) -> tuple[str, ...]:
        names = []
        for key in keys:
            for d in m.all("Unit", key):
                for word in m.value(d).split():
                    named_at.setdefault(word, f"{d.where}: {d.key}=")
                    names.append(word)
        return tuple(dict.fromkeys(names))

    return UnitSpec(
        unit_name=unit_name,
        name=spec_name,
        executable=executable,
        fields=fields,
        requires=units("Requires", "Wants", "BindsTo", "Requisite"),
        after=units("After"),
        before=units("Before"),
        warnings=tuple(m.warnings),
        file=where,
        named_at=named_at,
    )


#: A directive's handler: reads it (through the mapper) and writes the Exec's fields;
#: raises ValueError (made a UnitError with file and line) for a bad value.
_Handler = Callable[[_Mapper, Directive, dict[str, Any]], None]


def _h_description(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["description"] = m.value(d)


def _h_type(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    value = m.value(d)
    if value not in _TYPES:
        known = ", ".join(_TYPES)
        if value == "dbus":
            raise m.fail(d, "Type=dbus is not supported by ikos (no D-Bus name tracking)")
        raise m.fail(d, f"an unknown Type {value!r} (systemd's types: {known}, dbus)")
    f["type"] = _TYPES[value]
    if value == "notify-reload":
        f.setdefault("reload_signal", "SIGHUP")


def _h_read_later(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    """Lists read once every line is: commands, dependencies, a directory's mode."""


def _option(name: str) -> _Handler:
    def handler(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
        f[name] = m.value(d)

    return handler


def _h_groups(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["supplementary_groups"] = [w for d2 in m.all("Service", d.key) for w in m.value(d2).split()]


def _h_workdir(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    value = m.value(d)
    optional = value.startswith("-")
    value = value.removeprefix("-")
    if optional and not os.path.isdir(os.path.expanduser(value)):
        f.pop("working_directory", None)
        return
    f["working_directory"] = value


def _h_root_directory(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    """A chroot, as systemd's RootDirectory= without its bind mounts (none by default).

    Refused here, with file and line, where it cannot work: ikosd is not
    root, or the directory is missing (checked again at each start).
    """
    value = m.value(d)
    if not value.startswith("/"):
        raise m.fail(d, f"expected an absolute path, got {value!r}")
    if os.geteuid() != 0:
        why = f"(it runs as uid {os.geteuid()}); the unit cannot run without it"
        raise m.fail(d, f"chroot into {value} needs ikosd to run as root {why}")
    if not os.path.isdir(value):
        raise m.fail(d, f"{value} is not a directory")
    f["root_directory"] = value


def _h_environment(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    env = dict(f.get("environment", {}))
    if d.value == "":
        f["environment"] = {}
        return
    for word, _sep in split_words(m.value(d)):
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise m.fail(d, f"expected assignments like KEY=value, got {word!r}")
        env[key] = value
    f["environment"] = env


def _h_envfile(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["environment_files"] = [m.value(d2) for d2 in m.all("Service", "EnvironmentFile")]


def _h_umask(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["umask"] = m.value(d)


def _h_limit(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["limits"] = {**f.get("limits", {}), _LIMITS[d.key]: _limit(d.key, m.value(d))}


def _cgroup_limit(name: str) -> _Handler:
    def handler(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
        # checked by ikos.Exec's limits, which read systemd's spellings ("512M", "50%")
        f["limits"] = {**f.get("limits", {}), name: m.value(d)}

    return handler


def _h_restart(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    value = m.value(d)
    if value not in _RESTART:
        raise m.fail(d, f"expected one of {', '.join(_RESTART)}, got {value!r}")
    f["restart_on"] = value


def _timeout(*names: str) -> _Handler:
    def handler(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
        seconds = parse_timespan(m.value(d))
        for name in names:
            if name == "shutdown":
                f[name] = "infinity" if seconds in (None, 0.0) else seconds
            else:
                f[name] = _MAX_TIMEOUT if seconds in (None, 0.0) else seconds

    return handler


def _h_restart_sec(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["restart_delay"] = parse_timespan(m.value(d)) or 0.0


def _statuses(name: str) -> _Handler:
    def handler(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
        f[name] = [s for d2 in m.all("Service", d.key) for s in _exit_statuses(m.value(d2))]

    return handler


def _h_kill_mode(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    value = m.value(d)
    if value == "none":
        m.warn(d, "none (leave the processes running) is not supported by ikos: "
                  "every process of the daemon is stopped")  # fmt: skip
        return
    if value not in _KILL_MODES:
        raise m.fail(d, f"expected one of control-group, mixed, process, none, got {value!r}")
    f["kill_mode"] = _KILL_MODES[value]


def _h_send_sigkill(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    if not _boolean(m.value(d)):
        f["send_sigkill"] = False


def _h_watchdog(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    f["watchdog_sec"] = parse_timespan(m.value(d)) or 0.0


def _h_notify_access(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    value = m.value(d)
    if value not in ("none", "main", "exec", "all"):
        raise m.fail(d, f"expected one of none, main, exec, all, got {value!r}")
    if value == "none":
        m.warn(d, "none is not supported by ikos: notifications from the daemon's processes "
                  "are read")  # fmt: skip


def _directory(kind: str) -> _Handler:
    base = _DIRECTORIES[kind][0]

    def handler(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
        # recomputed from every line of this kind: an empty assignment resets the list
        names = [w for d2 in m.all("Service", kind) for w in m.value(d2).split()]
        mode_d = m.get("Service", kind + "Mode")
        mode = m.value(mode_d) if mode_d is not None else "0755"
        if not re.fullmatch(r"[0-7]{1,4}", mode):
            raise m.fail(mode_d or d, f"expected an octal mode like 0755, got {mode!r}")
        paths = []
        for name in names:
            if name.startswith("/") or ".." in name.split("/"):
                raise m.fail(d, f"expected a relative path without '..', got {name!r}")
            paths.append(f"{m.root}/{base}/{name}")
        m.directories[kind] = {path: mode for path in paths}

    return handler


def _stdio(name: str) -> _Handler:
    modes = {"null": "null", "inherit": "inherit"}
    modes.update((where + console, "log") for where in ("journal", "syslog", "kmsg")
                 for console in ("", "+console"))  # fmt: skip

    def handler(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
        value = m.value(d)
        if value in modes:
            f[name] = modes[value]
        elif value.startswith(("file:", "append:")):
            f[name] = value
        elif value.startswith("truncate:"):
            f[name] = "file:" + value.removeprefix("truncate:")
        else:
            m.warn(d, f"{value} is not supported by ikos; the output goes to the daemon's log")

    return handler


def _h_stdin(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    value = m.value(d)
    if value == "null":
        return
    if value.startswith("socket") or value.startswith("fd"):
        raise m.fail(d, f"{value}: ikos does not pass sockets to daemons (no socket activation)")
    m.warn(d, f"{value} is not supported by ikos; standard input is /dev/null")


#: systemd's start limit keys, in [Unit] since v230, in [Service] before (still read).
_START_LIMIT_INTERVAL = ("StartLimitIntervalSec", "StartLimitInterval")
#: systemd's DefaultStartLimitIntervalSec= and DefaultStartLimitBurst=, for the one
#: of the two a unit leaves out.
_START_LIMIT_DEFAULTS = (10.0, 5)


def _start_limit(m: _Mapper, f: dict[str, Any]) -> None:
    """StartLimitBurst= starts within StartLimitIntervalSec= as ``max_restarts`` in
    ``restart_window``: Burst starts are the first one and Burst - 1 restarts.

    A unit that sets neither gets no limit (systemd's defaults are not applied:
    ikos's supervisors bound restarts already); 0 for either means no limit, as
    in systemd; ``infinity`` is a window that never forgets.
    """
    interval_d = burst_d = None
    for d in m.directives:  # the last assignment wins, in either section
        if d.section in ("Unit", "Service") and d.key in _START_LIMIT_INTERVAL:
            interval_d = d if d.value else None
        elif d.section in ("Unit", "Service") and d.key == "StartLimitBurst":
            burst_d = d if d.value else None
    if interval_d is None and burst_d is None:
        return
    interval: float | None = _START_LIMIT_DEFAULTS[0]
    burst = _START_LIMIT_DEFAULTS[1]
    if interval_d is not None:
        try:
            interval = parse_timespan(m.value(interval_d))
        except ValueError as exc:
            raise m.fail(interval_d, str(exc)) from None
    if burst_d is not None:
        text = m.value(burst_d)
        if not text.isdigit():
            raise m.fail(burst_d, f"expected a number of starts (0 or more), got {text!r}")
        burst = int(text)
    if interval == 0 or burst == 0:
        return
    f["max_restarts"] = burst - 1
    f["restart_window"] = _MAX_TIMEOUT if interval is None else interval


def _h_start_limit_action(m: _Mapper, d: Directive, f: dict[str, Any]) -> None:
    if m.value(d) != "none":
        m.warn(d, f"{m.value(d)} is not supported by ikos: hitting the start limit only "
                  "fails the daemon")  # fmt: skip


_HANDLERS: dict[tuple[str, str], _Handler] = {
    ("Unit", "Description"): _h_description,
    ("Unit", "Requires"): _h_read_later,
    ("Unit", "Wants"): _h_read_later,
    ("Unit", "BindsTo"): _h_read_later,
    ("Unit", "Requisite"): _h_read_later,
    ("Unit", "After"): _h_read_later,
    ("Unit", "Before"): _h_read_later,
    **{
        (section, key): _h_read_later
        for section in ("Unit", "Service")
        for key in (*_START_LIMIT_INTERVAL, "StartLimitBurst")
    },
    ("Unit", "StartLimitAction"): _h_start_limit_action,
    ("Service", "Type"): _h_type,
    ("Service", "ExecStart"): _h_read_later,
    ("Service", "ExecStartPre"): _h_read_later,
    ("Service", "ExecStartPost"): _h_read_later,
    ("Service", "ExecStop"): _h_read_later,
    ("Service", "ExecReload"): _h_read_later,
    ("Service", "ExecStopPost"): _h_read_later,
    ("Service", "User"): _option("user"),
    ("Service", "Group"): _option("group"),
    ("Service", "SupplementaryGroups"): _h_groups,
    ("Service", "WorkingDirectory"): _h_workdir,
    ("Service", "RootDirectory"): _h_root_directory,
    ("Service", "Environment"): _h_environment,
    ("Service", "EnvironmentFile"): _h_envfile,
    ("Service", "UMask"): _h_umask,
    ("Service", "MemoryMax"): _cgroup_limit("memory_max"),
    ("Service", "CPUQuota"): _cgroup_limit("cpu_quota"),
    ("Service", "TasksMax"): _cgroup_limit("tasks_max"),
    ("Service", "Restart"): _h_restart,
    ("Service", "RestartSec"): _h_restart_sec,
    ("Service", "RestartPreventExitStatus"): _statuses("restart_prevent_exit_status"),
    ("Service", "SuccessExitStatus"): _statuses("success_exit_status"),
    ("Service", "TimeoutStartSec"): _timeout("start_timeout"),
    ("Service", "TimeoutStopSec"): _timeout("shutdown"),
    ("Service", "TimeoutSec"): _timeout("start_timeout", "shutdown"),
    ("Service", "KillMode"): _h_kill_mode,
    ("Service", "KillSignal"): _option("stop_signal"),
    ("Service", "SendSIGKILL"): _h_send_sigkill,
    ("Service", "WatchdogSec"): _h_watchdog,
    ("Service", "NotifyAccess"): _h_notify_access,
    ("Service", "StandardOutput"): _stdio("stdout"),
    ("Service", "StandardError"): _stdio("stderr"),
    ("Service", "StandardInput"): _h_stdin,
    **{("Service", key): _h_limit for key in _LIMITS},
    **{("Service", kind): _directory(kind) for kind in _DIRECTORIES},
    **{("Service", kind + "Mode"): _h_read_later for kind in _DIRECTORIES},
}


def load_unit(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> UnitSpec:
    """Read the unit at ``path`` (drop-ins, templates) and map it: :func:`unit_fields`."""
    unit_name, directives = read_unit(path)
    file = directives[0].file if directives else os.fspath(path)
    return unit_fields(unit_name, directives, name=name, root=root, file=file)


def link_units(
    units: Sequence[UnitSpec], known: Mapping[str, str]
) -> tuple[dict[str, tuple[tuple[str, ...], tuple[str, ...]]], list[str]]:
    """Map the units' dependencies to ikos names: ``{name: (requires, after)}`` and warnings.

    The result may name a daemon of ``known`` that is not a unit: the
    ``after`` that a unit's ``Before=`` gives it.

    ``known`` maps unit names (``redis-server.service``) to the ikos names
    of the daemons that run them. ``Requires=``, ``Wants=``, ``BindsTo=``
    and ``Requisite=`` become ``requires`` (start once it is ready, stop
    before it), ``After=`` becomes ``after``, ``Before=X`` puts this unit
    in X's ``after``. A dependency on a unit ikos does not run
    (``network.target``) is reported, one line each with the file and line
    that names it, and ignored.
    """
    out = {u.name: ([], []) for u in units}  # type: dict[str, tuple[list[str], list[str]]]
    warnings: list[str] = []
    for unit in units:
        unknown: list[str] = []  # each reported once, where the unit first names it
        for names, target in ((unit.requires, 0), (unit.after, 1), (unit.before, 2)):
            for dep in names:
                full = dep if "." in dep else dep + ".service"
                other = known.get(full)
                if other is None or other == unit.name:
                    if dep not in unknown and other is None:
                        unknown.append(dep)
                    continue
                if target == 2:  # Before=: the other one starts after this one
                    out.setdefault(other, ([], []))[1].append(unit.name)
                    continue
                out[unit.name][target].append(other)
        warnings += [
            f"{unit.named_at.get(dep, unit.file + ':')}{dep} is not run by ikos; ignored"
            for dep in unknown
        ]
    deps = {
        name: (tuple(dict.fromkeys(req)), tuple(dict.fromkeys(aft)))
        for name, (req, aft) in out.items()
    }
    return deps, warnings


def unit_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``*.service`` files of ``directory`` that can run as they are (not templates)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise UnitError(str(folder), None, None, "not a directory of units")
    return sorted(p for p in folder.glob("*.service") if not p.name.endswith("@.service"))
