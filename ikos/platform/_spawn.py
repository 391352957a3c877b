"""Starting an external executable with its isolation applied before exec.

The work is split in two. :func:`build_exec_plan`, run in the manager,
turns an :class:`~ikos.supervision._spec.Exec` spec into an
:class:`ExecPlan`: every name resolved to a number (user, groups, signals,
the executable on ``PATH``), every file checked, the environment computed,
every limit validated, so that a bad field is a :class:`SpawnError` naming
the daemon and the field *before* anything is forked, and the other daemons
carry on. :func:`exec_in_child`, run in a freshly forked child, only makes
system calls from the plan, in a fixed order (session, cgroup, stdio,
rlimits, umask, directory, groups, gid, uid, fds, signals, exec), and
reports the first failure as one ``"<field>: <reason>"`` line on a CLOEXEC
pipe: EOF on that pipe means ``execve`` succeeded, which is also systemd's
readiness for ``Type=exec``.

Rejected alternative: ``subprocess.Popen(preexec_fn=...)``. ``preexec_fn``
is documented as unsafe with threads, runs user code after the fork of the
caller, and Popen raises on failure with a child traceback instead of naming
the field; it also cannot express "the fork server forks, the manager holds
the pipe". The explicit protocol lets the fork server call
:func:`exec_in_child` and the manager read the pipe.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import hashlib
import math
import os
import pwd
import re
import resource
import select
import shutil
import signal
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias, cast

from ikos._errors import SpawnError
from ikos.platform._paths import InstancePaths
from ikos.supervision._spec import Exec

ExecType: TypeAlias = Literal["simple", "exec", "forking", "notify", "oneshot"]
StdioMode: TypeAlias = Literal["null", "inherit", "log", "file", "append"]
RLimitValue: TypeAlias = int | tuple[int, int] | None

EXEC_TYPES: tuple[str, ...] = ("simple", "exec", "forking", "notify", "oneshot")
STDIO_MODES: tuple[str, ...] = ("null", "inherit", "log", "file:PATH", "append:PATH")
#: systemd's default ``PATH`` when the environment has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The file name of the manager's notify socket in the run directory.
NOTIFY_SOCKET_NAME = "notify.sock"
#: Variables addressed to the manager itself, never inherited by a daemon: a
#: daemon seeing the outer systemd's NOTIFY_SOCKET would report to it instead.
MANAGER_ONLY_ENV: tuple[str, ...] = (
    "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC",
)  # fmt: skip
#: Environment files larger than this are refused (a bound on what a file makes us read).
MAX_ENV_FILE_BYTES = 1 << 20

# The setrlimit resources, as fields of ResourceLimits. RLIMIT_LOCKS is
# missing from some builds of Python's ``resource`` module although Linux
# has it (number 10); RLIMIT_OFILE is the BSD alias of RLIMIT_NOFILE.
RLIMIT_FIELDS: tuple[str, ...] = (
    "as_", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue",
    "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip
CGROUP_FIELDS: tuple[str, ...] = ("memory_max", "cpu_quota", "tasks_max")
_LINUX_RLIMIT_FALLBACK = {"locks": 10}


def rlimit_resource(name: str) -> int | None:
    """The ``resource.RLIMIT_*`` number of a :class:`ResourceLimits` field, or None."""
    number = getattr(resource, "RLIMIT_" + name.rstrip("_").upper(), None)
    if number is None and sys.platform.startswith("linux"):
        number = _LINUX_RLIMIT_FALLBACK.get(name)
    return cast("int | None", number)


@dataclass(frozen=True)
class ResourceLimits:
    """Resource limits of a daemon: setrlimit resources plus cgroup limits.

    Each rlimit field is named as ``resource.RLIMIT_<NAME>`` in lower case
    (``as_`` for ``RLIMIT_AS``); its value is None (unchanged), an int (soft
    and hard) or a ``(soft, hard)`` pair, ``resource.RLIM_INFINITY`` meaning
    unlimited. ``memory_max`` (bytes), ``cpu_quota`` (a fraction of one CPU,
    0.5 = half a CPU, 2 = two CPUs) and ``tasks_max`` are applied through
    cgroups (see :mod:`ikos.platform._cgroups`).

    Example::

        ResourceLimits(nofile=4096, core=0, memory_max=512 << 20, cpu_quota=0.5)
        ResourceLimits.from_mapping("web", {"nofile": [1024, 4096], "as": "infinity"})
    """

    as_: RLimitValue = None
    core: RLimitValue = None
    cpu: RLimitValue = None
    data: RLimitValue = None
    fsize: RLimitValue = None
    locks: RLimitValue = None
    memlock: RLimitValue = None
    msgqueue: RLimitValue = None
    nice: RLimitValue = None
    nofile: RLimitValue = None
    nproc: RLimitValue = None
    rss: RLimitValue = None
    rtprio: RLimitValue = None
    rttime: RLimitValue = None
    sigpending: RLimitValue = None
    stack: RLimitValue = None
    memory_max: int | None = None
    cpu_quota: float | None = None
    tasks_max: int | None = None

    @classmethod
    def from_mapping(cls, daemon: str, m: Mapping[str, Any]) -> ResourceLimits:
        """Validate a mapping of limits (e.g. a TOML table) into ResourceLimits.

        Keys are field names (``as`` is accepted for ``as_``); values as
        described on the class, with ``"infinity"`` for RLIM_INFINITY,
        ``memory_max`` also as ``"512M"``/``"2G"`` and ``cpu_quota`` also as
        ``"50%"``. Raises :class:`SpawnError` naming ``limits.<key>``.
        """
        if not isinstance(m, Mapping):
            raise SpawnError(daemon, "limits", f"expected a table of limits, got {m!r}")
        values: dict[str, Any] = {}
        for key, value in m.items():
            name = "as_" if key == "as" else key
            where = f"limits.{key}"
            if name in RLIMIT_FIELDS:
                values[name] = _check_rlimit(daemon, where, name, value)
            elif name == "memory_max":
                values[name] = _check_memory(daemon, where, value)
            elif name == "cpu_quota":
                values[name] = _check_cpu_quota(daemon, where, value)
            elif name == "tasks_max":
                values[name] = _check_positive_int(daemon, where, value)
            else:
                known = ", ".join(f.name for f in fields(cls))
                raise SpawnError(daemon, where, f"unknown limit; expected one of {known}")
        return cls(**values)

    def as_mapping(self) -> dict[str, Any]:
        """The fields that are set, by name (the inverse of :meth:`from_mapping`)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def rlimits(self) -> list[tuple[str, int, tuple[int, int]]]:
        """``(field, resource number, (soft, hard))`` for every rlimit that is set."""
        out = []
        for name in RLIMIT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            number = rlimit_resource(name)
            if number is None:  # refused by from_mapping; possible only if built by hand
                continue
            pair = (value, value) if isinstance(value, int) else (value[0], value[1])
            out.append((name, number, pair))
        return out

    @property
    def needs_cgroup(self) -> bool:
        """Whether any limit must be applied through a cgroup."""
        return any(getattr(self, name) is not None for name in CGROUP_FIELDS)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rlim_value(daemon: str, where: str, v: object) -> int:
    if isinstance(v, str) and v.strip().lower() in ("infinity", "unlimited"):
        return resource.RLIM_INFINITY
    if _is_int(v) and (cast(int, v) >= 0 or v == resource.RLIM_INFINITY):
        return cast(int, v)
    raise SpawnError(daemon, where, f"expected an integer >= 0 or 'infinity', got {v!r}")


def _rlim_key(v: int) -> float:
    return math.inf if v == resource.RLIM_INFINITY else v


def _check_rlimit(daemon: str, where: str, name: str, value: object) -> RLimitValue:
    if value is None:
        return None
    if rlimit_resource(name) is None:
        raise SpawnError(daemon, where, f"RLIMIT_{name.rstrip('_').upper()} is not supported here")
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise SpawnError(daemon, where, f"expected [soft, hard], got {value!r}")
        soft, hard = (_rlim_value(daemon, where, v) for v in value)
        if _rlim_key(soft) > _rlim_key(hard):
            raise SpawnError(daemon, where, f"soft limit {soft} exceeds hard limit {hard}")
        return (soft, hard)
    return _rlim_value(daemon, where, value)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def _check_memory(daemon: str, where: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("infinity", "max"):
            return None
        match = _SIZE_RE.match(value)
        if match is None:
            raise SpawnError(daemon, where, f"expected bytes or a size like '512M', got {value!r}")
        value = int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    if not _is_int(value) or cast(int, value) <= 0:
        raise SpawnError(daemon, where, f"expected a number of bytes > 0, got {value!r}")
    return cast(int, value)


def _check_cpu_quota(daemon: str, where: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise SpawnError(daemon, where, f"expected a fraction of a CPU or 'N%', got {value!r}")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SpawnError(daemon, where, f"expected a fraction of a CPU (e.g. 0.5), got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise SpawnError(daemon, where, f"expected a fraction of a CPU > 0, got {value!r}")
    return float(value)


def _check_positive_int(daemon: str, where: str, value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("infinity", "max")):
        return None
    if not _is_int(value) or cast(int, value) < 1:
        raise SpawnError(daemon, where, f"expected an integer >= 1 or 'infinity', got {value!r}")
    return cast(int, value)


@dataclass(frozen=True)
class StdioSpec:
    """Where one of stdin/stdout/stderr goes: ``mode`` and, for files, ``path``.

    ``log`` means a pipe whose read end the manager keeps (its write end is
    passed to :func:`exec_in_child` in ``stdio_fds``).
    """

    mode: StdioMode
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.mode}:{self.path}" if self.path else self.mode


@dataclass(frozen=True)
class ExecPlan:
    """Everything a child must do to become the daemon, resolved and validated.

    Built by :func:`build_exec_plan` in the manager; carried out by
    :func:`exec_in_child`. Plain data, picklable, so that a fork server can
    receive it. ``uid``/``gid``/``groups`` are None when unchanged;
    ``cgroup_procs`` lists ``cgroup.procs`` files the child writes its PID
    to before anything else (set with ``dataclasses.replace`` once the
    manager has created the daemon's cgroup).
    """

    daemon: str
    executable: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    type: ExecType = "simple"
    working_directory: str | None = None
    user: str | None = None
    group: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    umask: int | None = None
    stdin: StdioSpec = field(default_factory=lambda: StdioSpec("null"))
    stdout: StdioSpec = field(default_factory=lambda: StdioSpec("log"))
    stderr: StdioSpec = field(default_factory=lambda: StdioSpec("log"))
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    pid_file: str | None = None
    reload_signal: signal.Signals | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    log_path: str | None = None
    notify_socket: str | None = None
    cgroup_procs: tuple[str, ...] = ()

    @property
    def environ(self) -> dict[str, str]:
        """The environment the executable starts with."""
        return dict(self.env)


def parse_environment_file(text: str) -> dict[str, str]:
    """Parse systemd ``EnvironmentFile=`` syntax; raise ValueError naming the line.

    ``KEY=VALUE`` lines; blank lines and lines starting with ``#`` or ``;``
    are skipped; values may be single- or double-quoted (quotes may span
    lines; in double quotes ``\\"``, ``\\\\``, ``\\$`` and ``\\``` are
    escapes); an unquoted value has its surrounding blanks stripped and may
    continue on the next line after a trailing backslash. A leading
    ``export`` is tolerated, as in shell-style ``.env`` files.

    >>> parse_environment_file('A=1\\n# note\\nB="two words"\\n')
    {'A': '1', 'B': 'two words'}
    """
    result: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].lstrip()
        key, sep, rest = line.partition("=")
        key = key.rstrip()
        if not sep or not _ENV_KEY_RE.match(key):
            raise ValueError(f"line {lineno}: expected KEY=VALUE, got {line[:60]!r}")
        rest = rest.lstrip()
        if rest[:1] in ("'", '"'):
            quote, chunk, j, buf = rest[0], rest, 1, []
            while True:
                if j >= len(chunk):
                    if i >= len(lines):
                        raise ValueError(f"line {lineno}: unterminated {quote} quote")
                    buf.append("\n")
                    chunk, j = lines[i], 0
                    i += 1
                    continue
                c = chunk[j]
                if c == quote:
                    j += 1
                    break
                if c == "\\" and quote == '"' and j + 1 < len(chunk) and chunk[j + 1] in '"\\$`':
                    buf.append(chunk[j + 1])
                    j += 2
                    continue
                buf.append(c)
                j += 1
            trailing = chunk[j:].strip()
            if trailing and not trailing.startswith("#"):
                raise ValueError(
                    f"line {lineno}: unexpected {trailing[:30]!r} after the quoted value"
                )
            value = "".join(buf)
        else:
            value = rest
            while value.endswith("\\") and i < len(lines):
                value = value[:-1] + lines[i].strip()
                i += 1
            value = value.rstrip()
        result[key] = value
    return result


_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_signal(value: object) -> signal.Signals:
    """A signal from ``signal.Signals``, a number, ``"SIGHUP"``, ``"HUP"`` or ``"hup"``."""
    if isinstance(value, signal.Signals):
        return value
    if _is_int(value):
        try:
            return signal.Signals(cast(int, value))
        except ValueError:
            raise ValueError(f"{value} is not a signal number") from None
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return signal.Signals[name]
        except KeyError:
            pass
    raise ValueError(f"expected a signal name such as 'SIGHUP', got {value!r}")


def _parse_stdio(daemon: str, fd_name: str, value: object, base_dir: Path) -> StdioSpec:
    if not isinstance(value, str):
        raise SpawnError(
            daemon, fd_name, f"expected one of {', '.join(STDIO_MODES)}, got {value!r}"
        )
    mode, sep, path = value.partition(":")
    if not sep and mode in ("null", "inherit", "log"):
        if fd_name == "stdin" and mode == "log":
            raise SpawnError(
                daemon, fd_name, "stdin cannot be 'log'; use null, inherit or file:PATH"
            )
        return StdioSpec(cast(StdioMode, mode))
    if sep and mode in ("file", "append") and path:
        if fd_name == "stdin" and mode == "append":
            raise SpawnError(daemon, fd_name, "stdin cannot be 'append:'; use file:PATH")
        full = (base_dir / path).resolve() if not os.path.isabs(path) else Path(path)
        if fd_name == "stdin":
            if not full.is_file():
                raise SpawnError(daemon, fd_name, f"no such file: {full}")
        elif not full.parent.is_dir():
            raise SpawnError(daemon, fd_name, f"directory {full.parent} does not exist")
        elif full.is_dir():
            raise SpawnError(daemon, fd_name, f"{full} is a directory")
        return StdioSpec(cast(StdioMode, mode), str(full))
    raise SpawnError(daemon, fd_name, f"expected one of {', '.join(STDIO_MODES)}, got {value!r}")


def _lookup_user(daemon: str, value: object) -> pwd.struct_passwd:
    try:
        if _is_int(value) or (isinstance(value, str) and value.isdigit()):
            return pwd.getpwuid(int(cast(int | str, value)))
        if isinstance(value, str) and value:
            return pwd.getpwnam(value)
    except KeyError:
        raise SpawnError(daemon, "user", f"unknown user {value!r}")
    raise SpawnError(daemon, "user", f"expected a user name or uid, got {value!r}")


def _lookup_group(daemon: str, where: str, value: object) -> grp.struct_group:
    try:
        if _is_int(value) or (isinstance(value, str) and value.isdigit()):
            return grp.getgrgid(int(cast(int | str, value)))
        if isinstance(value, str) and value:
            return grp.getgrnam(value)
    except KeyError:
        raise SpawnError(daemon, where, f"unknown group {value!r}")
    raise SpawnError(daemon, where, f"expected a group name or gid, got {value!r}")


def _env_str(daemon: str, where: str, key: object, value: object) -> tuple[str, str]:
    if not isinstance(key, str) or not key or "=" in key or "\0" in key:
        raise SpawnError(daemon, where, f"invalid variable name {key!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SpawnError(daemon, where, f"{key}: expected a string, got {value!r}")
    text = str(value)
    if "\0" in text:
        raise SpawnError(daemon, where, f"{key}: value contains a NUL byte")
    return key, text


def _read_env_files(daemon: str, value: object, base_dir: Path) -> dict[str, str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise SpawnError(daemon, "environment_files", f"expected a list of paths, got {value!r}")
    env: dict[str, str] = {}
    for entry in value:
        if not isinstance(entry, str | os.PathLike) or not os.fspath(entry):
            raise SpawnError(daemon, "environment_files", f"expected a path, got {entry!r}")
        text_path = os.fspath(entry)
        optional = text_path.startswith("-")
        full = base_dir / (text_path[1:] if optional else text_path)
        try:
            with open(full, "rb") as f:
                raw = f.read(MAX_ENV_FILE_BYTES + 1)
        except FileNotFoundError:
            if optional:
                continue
            raise SpawnError(daemon, "environment_files", f"{full}: no such file")
        except OSError as exc:
            raise SpawnError(daemon, "environment_files", f"{full}: {exc.strerror}")
        if len(raw) > MAX_ENV_FILE_BYTES:
            raise SpawnError(
                daemon, "environment_files", f"{full}: larger than {MAX_ENV_FILE_BYTES} bytes"
            )
        try:
            parsed = parse_environment_file(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise SpawnError(daemon, "environment_files", f"{full}: not UTF-8 text")
        except ValueError as exc:
            raise SpawnError(daemon, "environment_files", f"{full}: {exc}")
        for k, v in parsed.items():
            if "\0" in v:
                raise SpawnError(daemon, "environment_files", f"{full}: {k}: NUL byte in value")
        env.update(parsed)
    return env


def _can_execute(st: os.stat_result, uid: int, gids: Sequence[int]) -> bool:
    if uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _unsearchable_dir(path: str, uid: int, gids: Sequence[int]) -> str | None:
    """The first directory above ``path`` that ``uid`` may not search, if any."""
    parent = os.path.dirname(path)
    chain = []
    while True:
        chain.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for d in reversed(chain):
        try:
            st = os.stat(d)
        except OSError:
            return d
        if not _can_execute(st, uid, gids):
            return d
    return None


def _resolve_executable(daemon: str, name: str, search_path: str, cwd: str | None) -> str:
    if "/" in name:
        full = os.path.normpath(os.path.join(cwd or os.getcwd(), name))
    else:
        found = shutil.which(name, mode=os.F_OK, path=search_path)
        if found is None:
            raise SpawnError(daemon, "executable", f"{name!r} not found on PATH ({search_path})")
        full = os.path.abspath(found)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise SpawnError(daemon, "executable", f"no such file: {full}")
    except OSError as exc:
        raise SpawnError(daemon, "executable", f"{full}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        raise SpawnError(daemon, "executable", f"{full} is not a regular file")
    if not os.access(full, os.X_OK):
        raise SpawnError(
            daemon, "executable", f"{full} is not executable (mode {st.st_mode & 0o7777:04o})"
        )
    return full


CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process has capability ``cap`` in its effective set (Linux; else: root)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _check_rlimits_allowed(daemon: str, limits: ResourceLimits) -> None:
    # Root in a container often lacks CAP_SYS_RESOURCE: check the capability,
    # not the uid, so that the error comes now and not from the child.
    capable: bool | None = None
    for name, number, (_soft, hard) in limits.rlimits():
        where = f"limits.{name.rstrip('_')}"
        if name == "nofile":
            try:
                nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            except (OSError, ValueError):
                nr_open = None
            if nr_open is not None and _rlim_key(hard) > nr_open:
                raise SpawnError(daemon, where, f"exceeds the kernel's fs.nr_open ({nr_open})")
        current = resource.getrlimit(number)[1]
        if _rlim_key(hard) > _rlim_key(current):
            if capable is None:
                capable = has_capability(CAP_SYS_RESOURCE)
            if not capable:
                shown = "infinity" if hard == resource.RLIM_INFINITY else str(hard)
                raise SpawnError(
                    daemon,
                    where,
                    f"raising the hard limit from {current} to {shown} requires CAP_SYS_RESOURCE",
                )


def _parse_umask(daemon: str, value: object) -> int:
    if _is_int(value):
        mask = cast(int, value)
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise SpawnError(
                daemon, "umask", f"expected an octal mask such as '022', got {value!r}"
            )
        mask = int(text, 8)
    else:
        raise SpawnError(daemon, "umask", f"expected an octal mask such as '022', got {value!r}")
    if not 0 <= mask <= 0o777:
        raise SpawnError(daemon, "umask", f"expected a mask between 000 and 777, got {value!r}")
    return mask


def notify_socket_address(paths: InstancePaths) -> str:
    """The ``NOTIFY_SOCKET`` of an instance; bind the manager's :class:`NotifySocket` there.

    The run directory's ``notify.sock`` when its path fits in ``sun_path``
    (107 bytes), since daemons' own sd_notify code may not handle longer
    paths; else an abstract address ``@ikos-<hash of the run directory>/notify``
    (abstract names have no file permissions: credentials still say who
    sent what).
    """
    path = str(paths.run_dir / NOTIFY_SOCKET_NAME)
    if len(os.fsencode(path)) <= 107:
        return path
    digest = hashlib.sha256(os.fsencode(paths.run_dir)).hexdigest()[:16]
    return f"@ikos-{digest}/notify"


def build_exec_plan(spec: Exec, paths: InstancePaths) -> ExecPlan:
    """Validate an ``Exec`` spec in the manager and resolve it into an :class:`ExecPlan`.

    Raises :class:`SpawnError` naming the daemon and the field. Relative
    paths resolve against: the manager's directory for ``working_directory``,
    the working directory for the executable, the instance's log directory
    for ``file:``/``append:`` stdio, its run directory for ``pid_file`` and
    the configuration file's directory for ``environment_files``.

    The environment is built in systemd's order: the manager's (unless
    ``clear_environment``; never its ``NOTIFY_SOCKET``, ``LISTEN_*``,
    ``WATCHDOG_*``), then ``HOME``/``USER``/``LOGNAME``/``SHELL`` of
    ``user``, then ``environment``, then ``environment_files``, then
    ``NOTIFY_SOCKET`` for ``type = "notify"``; ``PATH`` defaults to
    systemd's.

    Example::

        plan = build_exec_plan(Exec("web", "nginx", args=["-g", "daemon off;"],
                                    user="www-data", stdout="log"), paths)
    """
    daemon = spec.name
    f: Mapping[str, Any] = spec.fields
    root = os.geteuid() == 0

    exec_type = f.get("type", "simple")
    if exec_type not in EXEC_TYPES:
        raise SpawnError(
            daemon, "type", f"expected one of {', '.join(EXEC_TYPES)}, got {exec_type!r}"
        )

    args = f.get("args", ())
    if isinstance(args, str) or not isinstance(args, list | tuple):
        raise SpawnError(daemon, "args", f"expected a list of strings, got {args!r}")
    for a in args:
        if isinstance(a, bool) or not isinstance(a, str | int | float) or "\0" in str(a):
            raise SpawnError(daemon, "args", f"expected strings without NUL bytes, got {a!r}")

    # User and groups.
    pw: pwd.struct_passwd | None = None
    uid = gid = None
    groups: tuple[int, ...] | None = None
    if f.get("user") is not None:
        pw = _lookup_user(daemon, f["user"])
        if not root and pw.pw_uid != os.geteuid():
            raise SpawnError(daemon, "user", f"setting user {pw.pw_name!r} requires root")
        uid, gid = pw.pw_uid, pw.pw_gid
    group_name = None
    if f.get("group") is not None:
        gr = _lookup_group(daemon, "group", f["group"])
        if not root and gr.gr_gid != os.getegid():
            raise SpawnError(daemon, "group", f"setting group {gr.gr_name!r} requires root")
        gid, group_name = gr.gr_gid, gr.gr_name
    extra = f.get("supplementary_groups")
    if extra is not None:
        if isinstance(extra, str | int):
            extra = [extra]
        if not isinstance(extra, list | tuple):
            raise SpawnError(
                daemon, "supplementary_groups", f"expected a list of groups, got {extra!r}"
            )
        if extra and not root:
            raise SpawnError(
                daemon, "supplementary_groups", "setting supplementary groups requires root"
            )
        extra = [_lookup_group(daemon, "supplementary_groups", g).gr_gid for g in extra]
    if root and (pw is not None or gid is not None or extra is not None):
        base_groups = os.getgrouplist(pw.pw_name, pw.pw_gid) if pw is not None else []
        groups = tuple(dict.fromkeys([*base_groups, *(extra or [])]))
    if not root:  # only no-op changes were accepted above
        uid = gid = None

    # Working directory.
    cwd: str | None = None
    wd = f.get("working_directory")
    if wd is not None:
        if not isinstance(wd, str | os.PathLike) or not os.fspath(wd):
            raise SpawnError(daemon, "working_directory", f"expected a directory path, got {wd!r}")
        text = os.fspath(wd)
        if text == "~" or text.startswith("~/"):
            home = pw.pw_dir if pw is not None else os.path.expanduser("~")
            text = home + text[1:]
        cwd = os.path.abspath(text)
        if not os.path.isdir(cwd):
            raise SpawnError(daemon, "working_directory", f"{cwd} is not a directory")

    umask = _parse_umask(daemon, f["umask"]) if f.get("umask") is not None else None

    # Environment.
    clear = f.get("clear_environment", False)
    if not isinstance(clear, bool):
        raise SpawnError(daemon, "clear_environment", f"expected true or false, got {clear!r}")
    env: dict[str, str] = {} if clear else dict(os.environ)
    for name in MANAGER_ONLY_ENV:  # ikosd's own protocol variables, e.g. from an outer systemd
        env.pop(name, None)
    if pw is not None:
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell)
    given = f.get("environment", {})
    if not isinstance(given, Mapping):
        raise SpawnError(daemon, "environment", f"expected a table of variables, got {given!r}")
    env.update(_env_str(daemon, "environment", k, v) for k, v in given.items())
    if f.get("environment_files") is not None:
        env.update(_read_env_files(daemon, f["environment_files"], paths.config_file.parent))
    notify_socket = None
    if exec_type == "notify":
        notify_socket = notify_socket_address(paths)
        env["NOTIFY_SOCKET"] = notify_socket
    env.setdefault("PATH", DEFAULT_PATH)

    executable = spec.executable
    if not isinstance(executable, str) or not executable or "\0" in executable:
        raise SpawnError(
            daemon, "executable", f"expected a path or a command name, got {executable!r}"
        )
    full = _resolve_executable(daemon, executable, env["PATH"], cwd)
    if uid is not None and uid != 0:
        # execve runs after the privileges are dropped: check as that user.
        gids = [g for g in (groups if groups is not None else (gid,)) if g is not None]
        who = pw.pw_name if pw is not None else str(uid)
        if not _can_execute(os.stat(full), uid, gids):
            raise SpawnError(daemon, "executable", f"{full} is not executable by user {who!r}")
        blocked = _unsearchable_dir(full, uid, gids)
        if blocked is not None:
            mode = f"{os.stat(blocked).st_mode & 0o777:03o}" if os.path.exists(blocked) else "?"
            raise SpawnError(
                daemon,
                "executable",
                f"{full} is out of reach of user {who!r}: cannot search {blocked} (mode {mode})",
            )

    stdio_base = paths.log_dir
    stdin = _parse_stdio(daemon, "stdin", f.get("stdin", "null"), stdio_base)
    stdout = _parse_stdio(daemon, "stdout", f.get("stdout", "log"), stdio_base)
    stderr = _parse_stdio(daemon, "stderr", f.get("stderr", "log"), stdio_base)

    raw_limits = f.get("limits")
    if raw_limits is None:
        limits = ResourceLimits()
    elif isinstance(raw_limits, ResourceLimits):
        limits = ResourceLimits.from_mapping(daemon, raw_limits.as_mapping())
    else:
        limits = ResourceLimits.from_mapping(daemon, raw_limits)
    _check_rlimits_allowed(daemon, limits)

    pid_file = f.get("pid_file")
    if pid_file is not None:
        if not isinstance(pid_file, str | os.PathLike) or not os.fspath(pid_file):
            raise SpawnError(daemon, "pid_file", f"expected a path, got {pid_file!r}")
        pid_file = str(paths.run_dir / os.fspath(pid_file))

    signals: dict[str, signal.Signals | None] = {}
    for key, default in (("reload_signal", None), ("stop_signal", signal.SIGTERM)):
        value = f.get(key)
        try:
            signals[key] = parse_signal(value) if value is not None else default
        except ValueError as exc:
            raise SpawnError(daemon, key, str(exc))
    stop_signal = signals["stop_signal"]
    assert stop_signal is not None

    return ExecPlan(
        daemon=daemon,
        executable=full,
        argv=(executable, *(str(a) for a in args)),
        env=tuple(env.items()),
        type=cast(ExecType, exec_type),
        working_directory=cwd,
        user=pw.pw_name if pw is not None else None,
        group=group_name,
        uid=uid,
        gid=gid,
        groups=groups,
        umask=umask,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        limits=limits,
        pid_file=pid_file,
        reload_signal=signals["reload_signal"],
        stop_signal=stop_signal,
        log_path=str(paths.log_dir / f"{daemon}.log"),
        notify_socket=notify_socket,
    )


# --- in the child -----------------------------------------------------------------------------


def _open_stdio(spec: StdioSpec, target: int) -> int:
    """Open what ``spec`` names for ``target`` (0, 1 or 2); return a new fd."""
    if spec.mode == "null":
        return os.open(os.devnull, os.O_RDONLY if target == 0 else os.O_WRONLY)
    assert spec.path is not None
    if target == 0:
        return os.open(spec.path, os.O_RDONLY)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if spec.mode == "append" else os.O_TRUNC)
    return os.open(spec.path, flags, 0o644)


def _apply_stdio(plan: ExecPlan, stdio_fds: Mapping[int, int], step: list[str]) -> None:
    specs = {0: plan.stdin, 1: plan.stdout, 2: plan.stderr}
    names = {0: "stdin", 1: "stdout", 2: "stderr"}
    # Move the given sources above 2 first, so that dup2 onto 0..2 cannot
    # clobber a source still to be used (e.g. stdio_fds = {1: 2, 2: 1}).
    moved: dict[int, int] = {}
    for target, src in stdio_fds.items():
        step[0] = names.get(target, f"stdio_fds[{target}]")
        if target not in names:
            raise ValueError("only 0, 1 and 2 can be redirected")
        moved[target] = fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, 3)
    for target in (0, 1, 2):
        step[0] = names[target]
        spec = specs[target]
        if target in moved:
            os.dup2(moved[target], target)
        elif spec.mode == "inherit":
            try:
                os.set_inheritable(target, True)
            except OSError:  # closed in the manager: never let the daemon's first open() land here
                fd = os.open(os.devnull, os.O_RDWR)
                if fd != target:
                    os.dup2(fd, target)
                    os.close(fd)
        elif spec.mode == "log":
            raise ValueError("mode 'log' needs the manager's pipe, and none was passed")
        elif (
            target == 2 and spec == specs[1] and spec.mode in ("file", "append") and 1 not in moved
        ):
            os.dup2(1, 2)  # one open file description, so the two streams do not overwrite
        else:
            fd = _open_stdio(spec, target)
            os.dup2(fd, target)
            os.close(fd)


def _close_fds(keep: Sequence[int]) -> None:
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 0x7FFFFFFF)  # close_range(2) on Linux: cheap whatever the bound


def _reset_signals() -> None:
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # the real-time signals reserved by libc
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        text = os.strerror(exc.errno)
        return f"{text}: {exc.filename}" if exc.filename else text
    return str(exc) or type(exc).__name__


def exec_in_child(
    plan: ExecPlan, stdio_fds: Mapping[int, int], keep_fds: Sequence[int], error_fd: int
) -> NoReturn:
    """Turn a freshly forked child into the daemon described by ``plan``; never returns.

    Order: new session, join ``plan.cgroup_procs``, stdio (``stdio_fds``
    maps 0/1/2 to fds to dup2 there and wins over the plan's mode; ``log``
    requires one), rlimits, umask, working directory, supplementary groups,
    gid, uid (privileges dropped last), close every fd but ``keep_fds``
    (made inheritable) and ``error_fd``, reset signal dispositions and the
    signal mask, ``execve``. ``error_fd`` must be a CLOEXEC pipe: the first
    failure is written to it as one ``"<field>: <reason>"`` line and the
    child exits with status 127; on success exec closes it (EOF).
    """
    step = ["setup"]
    try:
        try:
            if error_fd < 3:
                error_fd = fcntl.fcntl(error_fd, fcntl.F_DUPFD_CLOEXEC, 3)
            step[0] = "session"
            os.setsid()
            step[0] = "cgroup"
            for procs in plan.cgroup_procs:
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, str(os.getpid()).encode())
                finally:
                    os.close(fd)
            _apply_stdio(plan, stdio_fds, step)
            for name, number, pair in plan.limits.rlimits():
                step[0] = f"limits.{name.rstrip('_')}"
                resource.setrlimit(number, pair)
            if plan.umask is not None:
                step[0] = "umask"
                os.umask(plan.umask)
            if plan.working_directory is not None:
                step[0] = "working_directory"
                os.chdir(plan.working_directory)
            if plan.groups is not None:
                step[0] = "supplementary_groups"
                os.setgroups(list(plan.groups))
            if plan.gid is not None:
                step[0] = "group"
                os.setgid(plan.gid)
            if plan.uid is not None:
                step[0] = "user"
                os.setuid(plan.uid)
            step[0] = "keep_fds"
            _close_fds([*keep_fds, error_fd])
            for fd in keep_fds:
                os.set_inheritable(fd, True)
            step[0] = "signals"
            _reset_signals()
            step[0] = "executable"
            os.execve(plan.executable, list(plan.argv), plan.environ)
        except BaseException as exc:
            line = f"{step[0]}: {_reason(exc)}".replace("\n", " ")[:4000] + "\n"
            os.write(error_fd, line.encode("utf-8", "replace"))
    finally:
        os._exit(127)


def spawn_exec(
    plan: ExecPlan,
    stdio_fds: Mapping[int, int] | None = None,
    keep_fds: Sequence[int] = (),
    *,
    timeout: float = 10.0,
) -> int:
    """Fork, run :func:`exec_in_child` in the child, and return its PID once exec succeeded.

    Raises :class:`SpawnError` with the child's field and reason if it could
    not exec (the child is reaped), or if it did not exec within ``timeout``
    seconds (the child is killed and reaped). The caller owns the returned
    child: it must wait for it.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        raise SpawnError(plan.daemon, None, f"fork failed: {_reason(exc)}")
    if pid == 0:  # pragma: no cover - the child execs or exits
        try:
            os.close(r)
        finally:
            exec_in_child(plan, stdio_fds or {}, keep_fds, w)
    os.close(w)
    try:
        data, eof = _read_until_eof(r, time.monotonic() + timeout)
    finally:
        os.close(r)
    if not eof:
        _kill_and_reap(pid)
        raise SpawnError(plan.daemon, None, f"the child did not exec within {timeout} s")
    if data:
        _reap(pid)
        text = data.decode("utf-8", "replace").strip()
        where, sep, reason = text.partition(": ")
        raise SpawnError(plan.daemon, where if sep else None, reason if sep else text)
    return pid


def _read_until_eof(fd: int, deadline: float, limit: int = 8192) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if not chunk:
            return b"".join(chunks), True
        if size < limit:
            chunks.append(chunk)
            size += len(chunk)


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover
            continue


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError as exc:  # pragma: no cover
        if exc.errno != errno.ESRCH:
            raise
    _reap(pid)
