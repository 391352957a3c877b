"""Per-daemon cgroups for the limits setrlimit cannot express.

``memory_max``, ``cpu_quota`` and ``tasks_max`` of a
:class:`~ikos.platform._spawn.ResourceLimits` are applied by putting the
daemon in a cgroup of its own, ``<manager's cgroup>/<instance>/<daemon>.service``,
in every hierarchy that carries a needed controller. Each limit is placed
independently: in cgroup v2 when the unified hierarchy is writable and its
controller is enabled (or can be enabled) in ``cgroup.subtree_control`` of
the manager's cgroup; else in the cgroup v1 hierarchy of that controller
when it is mounted and writable; else nowhere, and then
:attr:`CgroupManager.warnings` says which daemon lost which limit and why.
A limit is never dropped silently. A writable v2 hierarchy is also used, with
no controller at all, to track the daemon's processes (``cgroup.procs``) and
kill them at once (``cgroup.kill``), which is what a hybrid v1/v2 machine
offers.

The cgroups are nested under the manager's own cgroup rather than at the
root of each hierarchy: daemons stay inside whatever limits the manager was
given (and a delegated v2 subtree is the only place an unprivileged manager
may write). Rejected: handing the job to systemd (``systemd-run --scope``)
or libcgroup, which ties ikos to one init system or a C library, when the
whole interface is a few files to write.

The child joins the cgroup itself before exec (``ExecPlan.cgroup_procs``,
written by :func:`~ikos.platform._spawn.exec_in_child`), so there is no
window in which a fast daemon forks outside it; :meth:`DaemonCgroup.add`
exists for re-adoption and tests. A daemon's directories are kept between
its runs (the manager removes them when it stops for good, or at shutdown),
unless ``cgroup.kill`` was written to them (:attr:`DaemonCgroup.reusable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Generator

from ikos._errors import SpawnError
from ikos.platform._digest import sha256
from ikos.platform._paths import InstancePaths
from ikos.platform._process import signal_pid
from ikos.platform._spawn import CGROUP_FIELDS, ResourceLimits

log = logging.getLogger("ikos.cgroups")

#: The controller each cgroup limit needs.
CONTROLLERS: dict[str, str] = {"memory_max": "memory", "cpu_quota": "cpu", "tasks_max": "pids"}
#: CFS period used for ``cpu_quota``, in microseconds (the kernel's default).
CPU_PERIOD_US = 100_000
#: The smallest CFS quota the kernel accepts, in microseconds.
CPU_QUOTA_MIN_US = 1_000
_MAX_WARNINGS = 256


def cgroup_settings(limits: ResourceLimits, version: int) -> dict[str, list[tuple[str, str]]]:
    """The files to write for ``limits`` in a cgroup of ``version`` (1 or 2), by limit.

    >>> cgroup_settings(ResourceLimits(cpu_quota=0.5, tasks_max=64), 2)
    {'cpu_quota': [('cpu.max', '50000 100000')], 'tasks_max': [('pids.max', '64')]}
    """
    out: dict[str, list[tuple[str, str]]] = {}
    if limits.memory_max is not None:
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        out["memory_max"] = [(name, str(limits.memory_max))]
    if limits.cpu_quota is not None:
        quota = max(CPU_QUOTA_MIN_US, round(limits.cpu_quota * CPU_PERIOD_US))
        if version == 2:
            out["cpu_quota"] = [("cpu.max", f"{quota} {CPU_PERIOD_US}")]
        else:
            out["cpu_quota"] = [
                ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                ("cpu.cfs_quota_us", str(quota)),
            ]
    if limits.tasks_max is not None:
        out["tasks_max"] = [("pids.max", str(limits.tasks_max))]
    return out


def instance_cgroup_name(paths: InstancePaths) -> str:
    """The cgroup directory name of an instance: ``ikos-`` and a hash of its run directory."""
    digest = sha256(str(paths.run_dir).encode()).hexdigest()[:12]
    return f"ikos-{digest}"


# _Mount and _Place are plain classes, not dataclasses: ikosd imports this module at
# every start, and a dataclass compiles its generated methods then (docs/performance.md,
# "Launch"); nothing compares, hashes or prints them.


class _Mount:
    """One cgroup hierarchy of ``/proc/self/mountinfo``."""

    __slots__ = ("controllers", "fstype", "mountpoint", "read_only", "root")

    def __init__(
        self,
        fstype: str,
        root: str,
        mountpoint: str,
        read_only: bool,
        controllers: frozenset[str],
    ) -> None:
        self.fstype = fstype  # "cgroup" or "cgroup2"
        self.root = root  # the cgroup path mounted at mountpoint
        self.mountpoint = mountpoint
        self.read_only = read_only
        self.controllers = controllers  # v1 only


class _Place:
    """Where one controller (or, with ``controller == ""``, v2 tracking) is usable."""

    __slots__ = ("base", "controller", "version")

    def __init__(self, version: int, controller: str, base: str) -> None:
        self.version = version
        self.controller = controller
        self.base = base  # the manager's cgroup in this hierarchy: instance dirs go below


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a, b = left.split(), right.split()
        if len(a) < 6 or len(b) < 3 or b[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(a[5].split(",")) | set(b[2].split(","))
        controllers = frozenset() if b[0] == "cgroup2" else frozenset(b[2].split(","))
        mounts.append(_Mount(b[0], _unescape(a[3]), _unescape(a[4]), "ro" in options, controllers))
    return mounts


def _parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``({v1 controller: path}, v2 path)`` from ``/proc/self/cgroup``."""
    v1: dict[str, str] = {}
    v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            v2 = path
        else:
            for c in ctrls.split(","):
                if c:
                    v1[c] = path
    return v1, v2


def _join(mount: _Mount, path: str) -> str:
    rel = path
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root + "/")):
        rel = path[len(mount.root) :]
    return os.path.normpath(mount.mountpoint + "/" + rel.lstrip("/"))


def _read(path: str) -> str:
    # os.open and os.read, not open(): measured 36 -> 23 us for an empty
    # cgroup.procs, which is read at every end of a daemon in a cgroup
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class CgroupManager:
    """The cgroups of one ikos instance, named ``instance`` (see :func:`instance_cgroup_name`).

    Detection happens once, lazily; :meth:`available` tells which limits
    can be applied, :meth:`create` makes a daemon's cgroup and records in
    :attr:`warnings` every requested limit it could not apply.

    Example::

        cgroups = CgroupManager(instance_cgroup_name(paths))
        cg = cgroups.create("web", ResourceLimits(memory_max=256 << 20, tasks_max=64))
        plan = dataclasses.replace(plan, cgroup_procs=cg.procs_files) if cg else plan
    """

    def __init__(
        self,
        instance: str,
        *,
        mountinfo: str = "/proc/self/mountinfo",
        proc_cgroup: str = "/proc/self/cgroup",
    ) -> None:
        if not instance or "/" in instance or instance.startswith("."):
            raise ValueError(f"invalid cgroup instance name {instance!r}")
        self.instance = instance
        #: One line per limit that could not be applied, naming the daemon, the limit and why.
        self.warnings: list[str] = []
        self._mountinfo, self._proc_cgroup = mountinfo, proc_cgroup
        self._places: dict[str, _Place | None] | None = None
        #: What create() made for each daemon, and for which limits: a restart finds its
        #: directories there (a mkdir that fails with EEXIST costs 30-60 us on cgroupfs).
        self._made: dict[str, tuple[ResourceLimits, bool, DaemonCgroup]] = {}
        self._reasons: dict[str, str] = {}
        self._tracking: _Place | None = None
        self._prepared: set[str] = set()

    # -- detection -------------------------------------------------------------------------

    def _detect(self) -> dict[str, _Place | None]:
        if self._places is not None:
            return self._places
        try:
            mounts = _parse_mountinfo(_read(self._mountinfo))
            v1_paths, v2_path = _parse_proc_cgroup(_read(self._proc_cgroup))
        except OSError as exc:
            mounts, v1_paths, v2_path = [], {}, None
            log.warning("cgroups: cannot read %s: %s", exc.filename, exc.strerror)
        places: dict[str, _Place | None] = {}
        v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
        v2_base = None
        v2_note = "no cgroup v2 hierarchy"
        if v2 is not None and v2_path is not None:
            v2_base = _join(v2, v2_path)
            if v2.read_only:
                v2_note, v2_base = f"cgroup v2 mounted read-only at {v2.mountpoint}", None
            elif not os.access(v2_base, os.W_OK):
                v2_note, v2_base = f"cgroup v2: no permission to write {v2_base}", None
            else:
                self._tracking = _Place(2, "", v2_base)
        for limit, controller in CONTROLLERS.items():
            reasons = []
            place = None
            if v2_base is not None:
                place, why = self._v2_controller(v2_base, controller)
                if why:
                    reasons.append(why)
            else:
                reasons.append(v2_note)
            if place is None:
                place, why = self._v1_controller(mounts, v1_paths, controller)
                if why:
                    reasons.append(why)
            places[limit] = place
            if place is None:
                self._reasons[limit] = f"no writable {controller} controller ({'; '.join(reasons)})"
        self._places = places
        return places

    def _v2_controller(self, base: str, controller: str) -> tuple[_Place | None, str]:
        try:
            enabled = _read(os.path.join(base, "cgroup.subtree_control")).split()
            offered = _read(os.path.join(base, "cgroup.controllers")).split()
        except OSError as exc:
            return None, f"cgroup v2: cannot read {base}: {exc.strerror}"
        if controller in enabled:
            return _Place(2, controller, base), ""
        if controller not in offered:
            return None, f"cgroup v2 {controller} controller not offered in {base}"
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), f"+{controller}")
        except OSError as exc:
            hint = " (the manager's cgroup holds processes)" if exc.errno == errno.EBUSY else ""
            return None, f"cgroup v2 {controller} cannot be enabled in {base}: {exc.strerror}{hint}"
        return _Place(2, controller, base), ""

    def _v1_controller(
        self, mounts: list[_Mount], v1_paths: dict[str, str], controller: str
    ) -> tuple[_Place | None, str]:
        mount = next(
            (m for m in mounts if m.fstype == "cgroup" and controller in m.controllers), None
        )
        if mount is None:
            return None, f"cgroup v1 {controller} not mounted"
        if mount.read_only:
            return None, f"cgroup v1 {controller} mounted read-only at {mount.mountpoint}"
        base = _join(mount, v1_paths.get(controller, "/"))
        if not os.path.isdir(base):
            return None, f"cgroup v1 {controller}: {base} does not exist"
        if not os.access(base, os.W_OK):
            return None, f"cgroup v1 {controller}: no permission to write {base}"
        return _Place(1, controller, base), ""

    def available(self) -> dict[str, bool]:
        """Whether each cgroup limit (memory_max, cpu_quota, tasks_max) can be applied here."""
        places = self._detect()
        return {limit: places[limit] is not None for limit in CGROUP_FIELDS}

    def describe(self) -> dict[str, str]:
        """How each limit is applied (``"cgroup v1 at /sys/fs/cgroup/pids"``) or why it is not."""
        places = self._detect()
        out = {}
        for limit in CGROUP_FIELDS:
            place = places[limit]
            out[limit] = (
                f"cgroup v{place.version} at {place.base}" if place else self._reasons[limit]
            )
        out["tracking"] = f"cgroup v2 at {self._tracking.base}" if self._tracking else "none"
        return out

    # -- daemons ---------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)
        del self.warnings[:-_MAX_WARNINGS]

    def _instance_dir(self, place: _Place) -> str:
        path = os.path.join(place.base, self.instance)
        if path in self._prepared:
            return path
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        if place.version == 2:
            ctrls = sorted({p.controller for p in self._detect().values() if p and p.version == 2})
            if ctrls:
                # Controllers must be enabled at every level down to the daemons.
                _write(
                    os.path.join(path, "cgroup.subtree_control"), " ".join(f"+{c}" for c in ctrls)
                )
        self._prepared.add(path)
        return path

    def create(
        self, daemon: str, limits: ResourceLimits, *, track: bool = False
    ) -> DaemonCgroup | None:
        """Create the cgroup(s) of ``daemon`` and write its limits.

        Returns None when there is nothing to do (no cgroup limit and not
        ``track``) or nothing could be created; every requested limit that
        is not applied adds a line to :attr:`warnings`. With ``track``, a
        cgroup is made for the daemon even without limits (where v2 is
        writable), so that all its processes can be listed and killed.
        A directory left by a previous run under the same name is made anew
        when empty, else kept but not reused (:func:`_fresh_directory`).
        """
        if not daemon or "/" in daemon or daemon.startswith("."):
            raise ValueError(f"invalid daemon name {daemon!r}")
        made = self._made.get(daemon)
        if made is not None and made[:2] == (limits, track):
            cgroup = made[2]
            if cgroup.reusable and all(os.path.isdir(d) for d in cgroup.dirs):
                return cgroup
        places = self._detect()
        wanted = cgroup_settings(limits, 2)  # only its keys: the limits asked for
        if not wanted and not track:
            return None
        dirs: dict[tuple[int, str], str] = {}  # (version, base) -> daemon dir
        applied: dict[str, str] = {}
        inherited = False  # a directory this DaemonCgroup did not make (history unknown)

        def directory(place: _Place) -> str:
            nonlocal inherited
            key = (place.version, place.base)
            if key not in dirs:
                path = os.path.join(self._instance_dir(place), f"{daemon}.service")
                inherited |= not _fresh_directory(path)
                dirs[key] = path
            return dirs[key]

        if self._tracking is not None:
            try:
                directory(self._tracking)
            except OSError as exc:
                log.warning("cgroups: no tracking cgroup for %r: %s", daemon, exc.strerror)
        for limit in wanted:
            place = places[limit]
            if place is None:
                self._warn(f"daemon '{daemon}': {limit} not applied: {self._reasons[limit]}")
                continue
            try:
                path = directory(place)
                for name, value in cgroup_settings(limits, place.version)[limit]:
                    _write(os.path.join(path, name), value)
                    applied[limit] = f"cgroup v{place.version} {path}/{name}={value}"
            except OSError as exc:
                where = exc.filename or place.base
                self._warn(
                    f"daemon '{daemon}': {limit} not applied: "
                    f"writing cgroup v{place.version} {where} failed: {exc.strerror}"
                )
                applied.pop(limit, None)
        if not dirs:
            return None
        cgroup = DaemonCgroup(daemon, tuple(sorted(dirs.values())), applied)
        cgroup._never_killed = not inherited
        if len(dirs) == 1 and next(iter(dirs))[0] == 2:
            cgroup.v2_only = next(iter(dirs.values()))
        if len(applied) == len(wanted):  # else try again next time
            self._made[daemon] = (limits, track, cgroup)
        return cgroup

    def existing(self) -> dict[str, DaemonCgroup]:
        """The daemon cgroups of this instance that exist now (a previous ikosd's too)."""
        places = [p for p in self._detect().values() if p is not None]
        if self._tracking is not None:
            places.append(self._tracking)
        found: dict[str, list[str]] = {}
        for base in sorted({p.base for p in places}):
            path = os.path.join(base, self.instance)
            with contextlib.suppress(OSError):
                for entry in os.scandir(path):
                    if entry.is_dir(follow_symlinks=False) and entry.name.endswith(".service"):
                        found.setdefault(entry.name[: -len(".service")], []).append(entry.path)
        out = {name: DaemonCgroup(name, tuple(dirs), {}) for name, dirs in found.items()}
        for cgroup in out.values():  # a previous ikosd may have written their cgroup.kill
            cgroup._never_killed = False
        return out

    def cleanup(self) -> None:
        """Remove this instance's (empty) directories in every hierarchy; keep busy ones."""
        places = [p for p in self._detect().values() if p is not None]
        if self._tracking is not None:
            places.append(self._tracking)
        for base in {p.base for p in places}:
            path = os.path.join(base, self.instance)
            with contextlib.suppress(OSError):
                for entry in os.scandir(path):
                    if entry.is_dir(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.path)
                os.rmdir(path)
            self._prepared.discard(path)
        self._made.clear()


def _fresh_directory(path: str) -> bool:
    """Make the cgroup directory ``path``; False if one stays there that was not made now.

    A directory left by an earlier run (a crash of ikosd, a removal that
    failed) may have had ``cgroup.kill`` written to it, and nothing in
    cgroupfs says so; a process cloned into it would die at once (see
    :attr:`DaemonCgroup.reusable`). So an empty one is removed and made again,
    a new cgroup; one that still holds processes is kept, as not reusable.
    """
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        pass
    try:
        os.rmdir(path)
        os.mkdir(path)
        return True
    except FileExistsError:  # made again meanwhile by someone else: not ours to trust
        return False
    except OSError:  # busy (members, children): keep it
        return False


class DaemonCgroup:
    """The cgroup directories of one daemon (one per hierarchy used).

    ``applied`` maps each limit applied to where and how
    (``"cgroup v1 /sys/fs/cgroup/pids/.../web.service/pids.max=64"``).
    """

    def __init__(self, daemon: str, dirs: tuple[str, ...], applied: dict[str, str]) -> None:
        self.daemon = daemon
        self.dirs = dirs
        self.applied = applied
        #: The directory when it is a single cgroup v2 one (no v1 hierarchy to join by
        #: writing): the spawn server can clone a daemon into it.
        self.v2_only: str | None = None
        #: False once ``cgroup.kill`` was written: see :attr:`reusable`.
        self._never_killed = True

    def __repr__(self) -> str:
        return f"DaemonCgroup({self.daemon!r}, dirs={self.dirs!r})"

    @property
    def reusable(self) -> bool:
        """Whether a next run of the daemon may start in these directories (else remove them).

        Not once ``cgroup.kill`` has been written: Linux (seen on 6.18) then
        kills at once every process cloned into the cgroup with
        ``CLONE_INTO_CGROUP``, the trampoline's start, since it compares the
        cgroup's kill count with the one of the cloning process's cgroup.
        """
        return self._never_killed

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files a process writes its PID to, to join."""
        return tuple(os.path.join(d, "cgroup.procs") for d in self.dirs)

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the daemon's cgroup(s); SpawnError if it cannot."""
        for procs in self.procs_files:
            try:
                _write(procs, str(pid))
            except OSError as exc:
                raise SpawnError(
                    self.daemon, "cgroup", f"cannot add PID {pid} to {procs}: {exc.strerror}"
                )

    def pids(self) -> set[int]:
        """The PIDs of every process in the daemon's cgroup(s)."""
        out: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                out.update(int(x) for x in _read(procs).split())
        return out

    def kill_all(self, sig: int = signal.SIGKILL, *, timeout: float = 5.0) -> bool:
        """Send ``sig`` to every process in the cgroup until it is empty; True if it emptied.

        For SIGKILL uses v2 ``cgroup.kill`` when there is one (atomic: no
        fork escapes), else signals each PID, again and again, since a
        process may fork between reading the list and the signal. For other
        signals each process gets it once and True means all have exited by
        ``timeout``. Zombies not yet reaped by their parent no longer count.
        """
        steps = self._kill_steps(sig, timeout)
        while True:
            try:
                delay = next(steps)
            except StopIteration as done:
                return bool(done.value)
            time.sleep(delay)  # waiting for the kernel to tear processes down

    async def kill_all_async(self, sig: int = signal.SIGKILL, *, timeout: float = 5.0) -> bool:
        """:meth:`kill_all` for the event loop: it waits with ``asyncio.sleep``."""
        steps = self._kill_steps(sig, timeout)
        while True:
            try:
                delay = next(steps)
            except StopIteration as done:
                return bool(done.value)
            await asyncio.sleep(delay)

    def _kill_steps(self, sig: int, timeout: float) -> Generator[float, None, bool]:
        """Signal rounds, yielding how long to wait before the next; return whether it emptied."""
        deadline = time.monotonic() + timeout
        signalled: set[int] = set()
        if not self.pids():  # empty: nothing can fork into it, nothing to kill
            return True
        self._kill_file(sig)
        delay = 0.001
        while not self._kill_round(sig, signalled):
            if time.monotonic() >= deadline:
                return False
            yield delay
            delay = min(delay * 2, 0.05)
        return True

    def _kill_file(self, sig: int) -> None:
        if sig != signal.SIGKILL:
            return
        for d in self.dirs:
            kill_file = os.path.join(d, "cgroup.kill")
            if os.path.exists(kill_file):
                self._never_killed = False
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")

    def _kill_round(self, sig: int, signalled: set[int]) -> bool:
        """Signal the members not signalled yet (all of them for SIGKILL); True when empty."""
        live = self.pids()
        if not live:
            return True
        for pid in live:
            if sig == signal.SIGKILL or pid not in signalled:
                self.signal_member(pid, sig)
                signalled.add(pid)
        return False

    def signal_member(self, pid: int, sig: int) -> bool:
        """Signal ``pid`` if it is (still) in this cgroup: pinned by a pidfd, then checked.

        A PID read from ``cgroup.procs`` may have exited and been recycled by
        the time it is signalled; once a pidfd holds the process, finding the
        PID in ``cgroup.procs`` again proves it is the same process.
        """
        return signal_pid(pid, sig, check=lambda: pid in self.pids())

    def remove(self, *, busy_ok: bool = False) -> bool:
        """Remove the daemon's cgroup directories; True if all are gone.

        A directory that still holds processes cannot be removed: it is kept
        (call :meth:`kill_all` first) and False is returned, with a warning
        unless ``busy_ok`` (a new run of the daemon may be in it already).
        """
        gone = True
        for d in self.dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if not (busy_ok and exc.errno == errno.EBUSY):
                    log.warning("cgroups: cannot remove %s: %s", d, exc.strerror)
                gone = False
        return gone
