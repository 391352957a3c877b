"""Starting an external executable with its isolation applied before exec.

The work is split in two. :func:`build_exec_plan`, run in the manager,
turns an executable's spec (anything with a ``name``, an ``executable``
and :class:`~ikos.platform._exec_options.ExecOptions`, such as
``ikos.Exec``) into an :class:`ExecPlan`: every name resolved to a number
(user, groups, the executable on ``PATH``), every file checked, the
environment computed, every limit checked against what the machine allows,
so that a field that cannot be applied is a :class:`SpawnError` naming the
daemon and the field *before* anything is forked, and the other daemons
carry on. (The values themselves were checked when the options were made:
see :mod:`ikos.platform._exec_options`.) :func:`exec_in_child`, run in a
freshly forked child, only makes system calls from the plan, in a fixed
order (session, cgroup, stdio, rlimits, umask, directory, groups, gid, uid,
fds, signals, exec), and reports the first failure as one ``"<field>:
<reason>"`` line on a CLOEXEC pipe: EOF on that pipe means ``execve``
succeeded, which is also systemd's readiness for ``Type=exec``.

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
import os
import pwd
import re
import resource
import select
import shutil
import signal
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn, TypeAlias, cast

from ikos._errors import SpawnError
from ikos.platform._digest import sha256
from ikos.platform._exec_options import ExecTarget
from ikos.platform._limits import CGROUP_FIELDS as CGROUP_FIELDS
from ikos.platform._limits import RLIMIT_FIELDS as RLIMIT_FIELDS
from ikos.platform._limits import ResourceLimits as ResourceLimits
from ikos.platform._limits import rlimit_key
from ikos.platform._limits import rlimit_resource as rlimit_resource
from ikos.platform._paths import InstancePaths

# ResourceLimits and its constants moved to _limits (the options' table needs
# them below this module); they stay importable from here, where they were.

ExecType: TypeAlias = Literal["simple", "exec", "forking", "notify", "oneshot"]
StdioMode: TypeAlias = Literal["null", "inherit", "log", "file", "append"]

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


#: The specs without a path, one of each: a plan holds three (immutable, so shared).
_STDIO_MODES: dict[str, StdioSpec] = {}


def stdio_spec(mode: StdioMode) -> StdioSpec:
    """The shared :class:`StdioSpec` of a mode without a path (``null``, ``log``...)."""
    spec = _STDIO_MODES.get(mode)
    if spec is None:
        spec = _STDIO_MODES[mode] = StdioSpec(mode)
    return spec


@dataclass(frozen=True, slots=True)  # one kept per daemon: no __dict__
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
    stdin: StdioSpec = field(default_factory=lambda: stdio_spec("null"))
    stdout: StdioSpec = field(default_factory=lambda: stdio_spec("log"))
    stderr: StdioSpec = field(default_factory=lambda: stdio_spec("log"))
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    pid_file: str | None = None
    reload_signal: int | None = None
    stop_signal: int = signal.SIGTERM
    log_path: str | None = None
    notify_socket: str | None = None
    cgroup_procs: tuple[str, ...] = ()
    #: chroot(2) here before the working directory (``executable`` and
    #: ``working_directory`` are paths inside it); only the fork server's child does it.
    root_directory: str | None = None
    #: The daemon's own marker variable (name, value), set last over ``env``: kept
    #: apart so that ``env``, the same for the daemons of an instance, is one tuple
    #: shared by their plans (:func:`shared_env`), not a copy of ~40 pairs each.
    mark: tuple[str, str] | None = None

    @property
    def environ(self) -> dict[str, str]:
        """The environment the executable starts with."""
        env = dict(self.env)
        if self.mark is not None:
            env[self.mark[0]] = self.mark[1]
        return env


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


def _parse_stdio(daemon: str, fd_name: str, value: str, base_dir: Path) -> StdioSpec:
    # The form ("null", "file:PATH"...) was checked with the options: resolve the file.
    mode, sep, path = value.partition(":")
    if not sep:
        return stdio_spec(cast(StdioMode, mode))
    full = (base_dir / path).resolve() if not os.path.isabs(path) else Path(path)
    if fd_name == "stdin":
        if not full.is_file():
            raise SpawnError(daemon, fd_name, f"no such file: {full}")
    elif not full.parent.is_dir():
        raise SpawnError(daemon, fd_name, f"directory {full.parent} does not exist")
    elif full.is_dir():
        raise SpawnError(daemon, fd_name, f"{full} is a directory")
    return StdioSpec(cast(StdioMode, mode), str(full))


def _lookup_user(daemon: str, value: str | int) -> pwd.struct_passwd:
    try:
        if isinstance(value, int) or value.isdigit():
            return pwd.getpwuid(int(value))
        return pwd.getpwnam(value)
    except KeyError:
        raise SpawnError(daemon, "user", f"unknown user {value!r}")


def _lookup_group(daemon: str, where: str, value: str | int) -> grp.struct_group:
    try:
        if isinstance(value, int) or value.isdigit():
            return grp.getgrgid(int(value))
        return grp.getgrnam(value)
    except KeyError:
        raise SpawnError(daemon, where, f"unknown group {value!r}")


def _read_env_files(daemon: str, files: Sequence[str], base_dir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for text_path in files:
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
            if nr_open is not None and rlimit_key(hard) > nr_open:
                raise SpawnError(daemon, where, f"exceeds the kernel's fs.nr_open ({nr_open})")
        current = resource.getrlimit(number)[1]
        if rlimit_key(hard) > rlimit_key(current):
            if capable is None:
                capable = has_capability(CAP_SYS_RESOURCE)
            if not capable:
                shown = "infinity" if hard == resource.RLIM_INFINITY else str(hard)
                raise SpawnError(
                    daemon,
                    where,
                    f"raising the hard limit from {current} to {shown} requires CAP_SYS_RESOURCE",
                )


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
    digest = sha256(os.fsencode(paths.run_dir)).hexdigest()[:16]
    return f"@ikos-{digest}/notify"


_environ_cache: tuple[dict[bytes, bytes], dict[str, str]] | None = None
_PAIRS: dict[tuple[str, str], tuple[str, str]] = {}
_MAX_PAIRS = 4096
_ENVS: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
_MAX_ENVS = 128
#: Counts the changes of ikosd's environment that :func:`_manager_environ` saw.
_environ_generation = 0


def _raw_environ() -> dict[bytes, bytes]:
    """A copy of the environment's bytes mapping, to compare: CPython's ``os.environ``
    and ``os.environb`` share one dict of bytes (``_data``), copied without a
    decode or encode per variable (``dict(os.environb)`` took ~13 us for 34)."""
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environb)


def _manager_environ() -> dict[str, str]:
    """``os.environ`` decoded, decoded again only when it changed.

    Every plan holds its environment: decoding ``os.environ`` for each made
    new strings per daemon, 4 KiB of the manager's memory per executable.
    """
    global _environ_cache, _environ_generation
    raw = _raw_environ()  # the same bytes objects: cheap to compare
    if _environ_cache is None or _environ_cache[0] != raw:
        _environ_cache = (raw, dict(os.environ))
        _environ_generation += 1
    return _environ_cache[1]


def environ_generation(*, check: bool = True) -> int:
    """The generation of ikosd's environment: a plan built under an older one holds
    an environment that is no longer the manager's. ``check=False`` skips looking
    at ``os.environ`` again (right after :func:`build_exec_plan` did)."""
    if check or _environ_cache is None:
        _manager_environ()
    return _environ_generation


def _shared_items(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """``tuple(env.items())`` whose (name, value) pairs are shared between plans (bounded)."""
    out = []
    for item in env.items():
        shared = _PAIRS.get(item)
        if shared is None:
            shared = item
            if len(_PAIRS) < _MAX_PAIRS:
                _PAIRS[item] = item
        out.append(shared)
    return shared_env(tuple(out))


def shared_env(env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The one tuple equal to ``env`` that plans share (bounded): the daemons of an
    instance mostly start with the same environment, ~8 bytes a variable each."""
    shared = _ENVS.get(env)
    if shared is None:
        shared = env
        if len(_ENVS) < _MAX_ENVS:
            _ENVS[env] = env
    return shared


def build_exec_plan(spec: ExecTarget, paths: InstancePaths) -> ExecPlan:
    """Resolve an executable's spec (such as an ``ikos.Exec``) into an :class:`ExecPlan`.

    Raises :class:`SpawnError` naming the daemon and the field that cannot be
    applied on this machine (an unknown user, a missing file, a hard limit
    above ours...). Relative paths resolve against: the manager's directory
    for ``working_directory``, the working directory for the executable, the
    instance's log directory for ``file:``/``append:`` stdio, its run
    directory for ``pid_file`` and the configuration file's directory for
    ``environment_files``.

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
    o = spec.options
    root = os.geteuid() == 0

    # User and groups.
    pw: pwd.struct_passwd | None = None
    uid = gid = None
    groups: tuple[int, ...] | None = None
    if o.user is not None:
        pw = _lookup_user(daemon, o.user)
        if not root and pw.pw_uid != os.geteuid():
            raise SpawnError(daemon, "user", f"setting user {pw.pw_name!r} requires root")
        uid, gid = pw.pw_uid, pw.pw_gid
    group_name = None
    if o.group is not None:
        gr = _lookup_group(daemon, "group", o.group)
        if not root and gr.gr_gid != os.getegid():
            raise SpawnError(daemon, "group", f"setting group {gr.gr_name!r} requires root")
        gid, group_name = gr.gr_gid, gr.gr_name
    extra: list[int] | None = None
    if o.supplementary_groups is not None:
        if o.supplementary_groups and not root:
            raise SpawnError(
                daemon, "supplementary_groups", "setting supplementary groups requires root"
            )
        extra = [
            _lookup_group(daemon, "supplementary_groups", g).gr_gid for g in o.supplementary_groups
        ]
    if root and (pw is not None or gid is not None or extra is not None):
        base_groups = os.getgrouplist(pw.pw_name, pw.pw_gid) if pw is not None else []
        groups = tuple(dict.fromkeys([*base_groups, *(extra or [])]))
    if not root:  # only no-op changes were accepted above
        uid = gid = None

    # Root directory (chroot), then the working directory, which is inside it.
    chroot = _root_directory(daemon, o.root_directory)
    cwd: str | None = None
    if o.working_directory is not None:
        text = o.working_directory
        if text == "~" or text.startswith("~/"):
            home = pw.pw_dir if pw is not None else os.path.expanduser("~")
            text = home + text[1:]
        cwd = os.path.abspath(text) if chroot is None else os.path.normpath("/" + text)
        if not os.path.isdir(in_root(chroot, cwd)):
            raise SpawnError(
                daemon, "working_directory", f"{in_root(chroot, cwd)} is not a directory"
            )

    # Environment.
    env: dict[str, str] = {} if o.clear_environment else dict(_manager_environ())
    for name in MANAGER_ONLY_ENV:  # ikosd's own protocol variables, e.g. from an outer systemd
        env.pop(name, None)
    if pw is not None:
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell)
    env.update(o.environment)
    if o.environment_files:
        env.update(_read_env_files(daemon, o.environment_files, paths.config_file.parent))
    notify_socket = None
    if o.type == "notify":
        notify_socket = notify_socket_address(paths)
        env["NOTIFY_SOCKET"] = notify_socket
    env.setdefault("PATH", DEFAULT_PATH)

    executable = spec.executable
    if not isinstance(executable, str) or not executable or "\0" in executable:
        raise SpawnError(
            daemon, "executable", f"expected a path or a command name, got {executable!r}"
        )
    if chroot is None:
        full = host_full = _resolve_executable(daemon, executable, env["PATH"], cwd)
    else:  # found, and checked, inside the root; exec'd by its path there after chroot
        rooted_path = os.pathsep.join(in_root(chroot, d) for d in env["PATH"].split(os.pathsep))
        name = (
            in_root(chroot, os.path.join(cwd or "/", executable))
            if "/" in executable
            else executable
        )
        host_full = _resolve_executable(daemon, name, rooted_path, None)
        full = "/" + os.path.relpath(host_full, chroot)
    if uid is not None and uid != 0:
        # execve runs after the privileges are dropped: check as that user.
        gids = [g for g in (groups if groups is not None else (gid,)) if g is not None]
        who = pw.pw_name if pw is not None else str(uid)
        if not _can_execute(os.stat(host_full), uid, gids):
            raise SpawnError(daemon, "executable", f"{full} is not executable by user {who!r}")
        blocked = _unsearchable_dir(host_full, uid, gids)
        if blocked is not None:
            mode = f"{os.stat(blocked).st_mode & 0o777:03o}" if os.path.exists(blocked) else "?"
            raise SpawnError(
                daemon,
                "executable",
                f"{full} is out of reach of user {who!r}: cannot search {blocked} (mode {mode})",
            )

    stdio_base = paths.log_dir
    stdin = _parse_stdio(daemon, "stdin", o.stdin, stdio_base)
    stdout = _parse_stdio(daemon, "stdout", o.stdout, stdio_base)
    stderr = _parse_stdio(daemon, "stderr", o.stderr, stdio_base)
    _check_rlimits_allowed(daemon, o.limits)
    pid_file = str(paths.run_dir / o.pid_file) if o.pid_file is not None else None

    return ExecPlan(
        daemon=daemon,
        executable=full,
        argv=(executable, *o.args),
        env=_shared_items(env),
        type=cast(ExecType, o.type),
        working_directory=cwd,
        user=pw.pw_name if pw is not None else None,
        group=group_name,
        uid=uid,
        gid=gid,
        groups=groups,
        umask=o.umask,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        limits=o.limits,
        pid_file=pid_file,
        reload_signal=o.reload_signal,
        stop_signal=o.stop_signal,
        log_path=str(paths.log_dir / f"{daemon}.log"),
        notify_socket=notify_socket,
        root_directory=chroot,
    )


def in_root(root: str | None, path: str) -> str:
    """Where ``path``, as seen inside ``root`` (None: no chroot), is from the manager."""
    if root is None:
        return path
    return os.path.join(root, path.lstrip("/"))


def _root_directory(daemon: str, value: str | None) -> str | None:
    """The checked ``root_directory``: an existing directory, and ikosd must be root."""
    if value is None:
        return None
    root = os.path.abspath(value)
    if os.geteuid() != 0:
        raise SpawnError(
            daemon,
            "root_directory",
            f"chroot into {root} needs root (ikosd runs as uid {os.geteuid()})",
        )
    if not os.path.isdir(root):
        raise SpawnError(daemon, "root_directory", f"{root} is not a directory")
    return None if root == "/" else root


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
    requires one), rlimits, umask, chroot, working directory, supplementary groups,
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
            if plan.root_directory is not None:
                step[0] = "root_directory"  # stdio and cgroup files were opened outside it
                os.chroot(plan.root_directory)
                os.chdir("/")  # never left with a directory outside the root
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
        data, eof = read_until_eof(r, time.monotonic() + timeout)
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


def read_until_eof(fd: int, deadline: float, limit: int = 8192) -> tuple[bytes, bool]:
    """Read ``fd`` (blocking, up to ``limit`` bytes kept) until EOF or ``deadline``; (data, eof)."""
    chunks: list[bytes] = []
    size = 0
    # poll, not select: a manager of hundreds of daemons holds descriptors above 1024
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        if not poller.poll(max(1, int(left * 1000))):
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
