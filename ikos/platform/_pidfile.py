"""PID files: written atomically, locked while their holder lives, checked when read.

:class:`PidFile` is how ikosd (and ikos on behalf of a daemon) claims a
name: the file is written to a temporary file in the same directory and
renamed into place, so a reader never sees it half written, and the new
inode is held under an exclusive ``flock`` for as long as the holder keeps
the object. A second holder, in any process, finds the lock taken and gets
:class:`PidFileLocked` naming the PID inside; a file whose lock is free is
stale whatever it says, and is replaced.

``flock`` rather than ``lockf``/``fcntl`` record locks: record locks belong
to the process, so a second claim from the *same* process would silently
succeed, and closing any descriptor of the file (even one opened just to
read it) would drop the lock. ``flock`` locks belong to the open file
description and have neither problem.

:func:`read_pid_file` is the other direction: the main PID that a
``forking`` daemon wrote itself, which the manager must not trust blindly
(PID 1, a dead PID, or a PID outside the daemon's process group would have
it signal the wrong process).

:class:`DaemonPidFile` is the PID file ikos writes *for* a daemon of any
other type (``pid_file`` on a ``simple``, ``exec``, ``notify`` or ``oneshot``
executable), for the tools that expect one (``kill $(cat /run/x.pid)``,
logrotate's ``postrotate``). It takes no lock (the daemon, not ikosd, is
what the file names) and is written through a descriptor of its directory:
a temporary file created there with ``O_EXCL | O_NOFOLLOW`` and renamed
over the name, so a reader sees the old content or the new, never half, and
a symbolic link planted at the name is replaced, never followed. What is
already at the name is checked first, so that a link, a non-regular file or
another user's file is reported instead of silently replaced. No fsync: a
PID means nothing after the machine restarts, so durability buys nothing
and would cost a disk flush per start.

Errors, under :class:`ikos.IkosError`::

    PidFileError        a PID file is missing, unreadable, invalid or names a wrong process
    └── PidFileLocked   the PID file is locked by a live holder (``pid`` names it)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ikos._errors import IkosError

#: PID files longer than this are garbage.
MAX_PID_FILE_BYTES = 64


class PidFileError(IkosError):
    """A PID file is missing, unreadable, invalid, or names a process it must not."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"PID file {self.path}: {self.reason}"


class PidFileLocked(PidFileError):
    """The PID file is locked: another live holder owns it. ``pid`` is what the file says."""

    def __init__(self, path: str, pid: int | None) -> None:
        IkosError.__init__(self, path, pid)
        self.path, self.pid = path, pid
        holder = f"PID {pid}" if pid is not None else "a process that has not written its PID yet"
        self.reason = f"locked by {holder} (is another instance running?)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.pid))


def _parse(raw: bytes) -> int | None:
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or len(text) > 10:
        return None
    pid = int(text)
    return pid if pid > 0 else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` names a process that has not exited (zombies count as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read()
    except OSError:
        return True  # no /proc: trust kill(2)
    state = fields[fields.rfind(b")") + 2 : fields.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _read_raw(path: str | os.PathLike[str]) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PID_FILE_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class PidFile:
    """A PID file at ``path``, claimed with :meth:`acquire` and given up with :meth:`release`.

    Example::

        pidfile = PidFile(paths.pid_file)
        pidfile.acquire()          # raises PidFileLocked if another ikosd holds it
        ...
        pidfile.release()

    Also a context manager (``with PidFile(path) as p:`` acquires for the
    current process). The lock is held through a close-on-exec descriptor,
    so executed children do not inherit it; forked children that do not
    exec share it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.pid: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, pid: int | None = None, *, timeout: float = 0.5) -> None:
        """Write ``pid`` (default: this process) atomically and lock the file.

        Raises :class:`PidFileLocked` if a live holder has it locked. A free
        (stale) file is replaced. ``timeout`` only bounds the wait for a
        racing holder to finish writing, so that its PID can be named.
        """
        if self._fd is not None:
            raise PidFileError(str(self.path), "already held by this object")
        pid = os.getpid() if pid is None else pid
        if pid <= 0:
            raise ValueError(f"invalid PID {pid}")
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if self._replaced(fd) and time.monotonic() < deadline:
                        continue  # the holder just renamed its file into place: look again
                    holder = _parse(os.pread(fd, MAX_PID_FILE_BYTES, 0))
                    if holder is None and time.monotonic() < deadline:
                        time.sleep(0.005)  # the holder is writing: wait to name it
                        continue
                    raise PidFileLocked(str(self.path), holder)
                if self._replaced(fd):
                    continue  # replaced between open and lock: lock the new one
                # We hold the file at the path: nobody can claim it until we
                # rename our own (already locked) file over it.
                self._fd = self._write_locked(pid)
                self.pid = pid
                return
            finally:
                os.close(fd)

    def _replaced(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)

    def _write_locked(self, pid: int) -> int:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd

    def release(self) -> None:
        """Remove the file and drop the lock (no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink only the file we hold: a stale holder that lost it to a
            # new claim (e.g. the file was deleted by hand) must not remove it.
            if not self._replaced(fd):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
            self.pid = None

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def read(path: str | os.PathLike[str]) -> int | None:
        """The PID in the file if it names a live process other than PID 1, else None.

        None covers: no file, garbage content, PID 1, a dead process.
        """
        raw = _read_raw(path)
        if raw is None or len(raw) > MAX_PID_FILE_BYTES:
            return None
        pid = _parse(raw)
        if pid is None or pid == 1 or not _alive(pid):
            return None
        return pid

    @staticmethod
    def is_locked(path: str | os.PathLike[str]) -> bool:
        """Whether some holder has the file locked."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @staticmethod
    def is_stale(path: str | os.PathLike[str]) -> bool:
        """Whether the file exists, is not locked, and does not name a live process.

        A file that a daemon wrote itself (unlocked) but that names a live
        process is not stale.
        """
        if not os.path.lexists(path):
            return False
        return not PidFile.is_locked(path) and PidFile.read(path) is None


class DaemonPidFile:
    """The PID file ikos keeps for one daemon: :meth:`write` when it runs, :meth:`remove` after.

    Example::

        pid_file = DaemonPidFile("/run/web.pid")
        pid_file.check()           # PidFileError: the directory is missing, a symlink is there...
        pid_file.write(proc.pid)   # "4242\n", atomically
        ...
        pid_file.remove()          # only if it still names the PID written
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        owners: Iterable[int] = (),
        note: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        #: Whose file at the name may be replaced: ikosd's user, and ``owners``
        #: (the daemon's own user, should it rewrite the file itself).
        self.owners = frozenset({os.geteuid(), *owners})
        #: The PID this object last wrote (None: nothing written, or removed).
        self.pid: int | None = None
        #: A symbolic link to :attr:`path`, made at the first write and removed with the
        #: file: how an ikosd after a crash finds the file of a daemon it no longer
        #: knows (:func:`remove_stale_pid_files`).
        self.note = None if note is None else Path(note)
        self._noted = False

    def _open_dir(self) -> int:
        directory = self.path.parent
        try:
            return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise PidFileError(str(self.path), f"its directory {directory} does not exist")
        except OSError as exc:
            raise PidFileError(str(self.path), f"cannot open {directory}: {exc.strerror}")

    def _check_at(self, dfd: int) -> None:
        try:
            st = os.stat(self.path.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PidFileError(str(self.path), "is a symbolic link: refusing to replace it")
        if not stat.S_ISREG(st.st_mode):
            raise PidFileError(str(self.path), "is not a regular file: refusing to replace it")
        if st.st_uid not in self.owners:
            raise PidFileError(
                str(self.path),
                f"belongs to uid {st.st_uid}, neither ikosd's nor the daemon's: "
                "refusing to replace it",
            )

    def check(self) -> None:
        """Raise :class:`PidFileError` if :meth:`write` would be refused (directory, file)."""
        dfd = self._open_dir()
        try:
            self._check_at(dfd)
        finally:
            os.close(dfd)

    def write(self, pid: int) -> None:
        """Replace the file with ``"PID\\n"`` atomically; :class:`PidFileError` if refused."""
        if pid <= 0:
            raise ValueError(f"invalid PID {pid}")
        dfd = self._open_dir()
        tmp = f".{self.path.name}.{os.urandom(6).hex()}.tmp"
        try:
            self._check_at(dfd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
            try:
                os.fchmod(fd, 0o644)  # whatever the umask: readers need it
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)
            os.rename(tmp, self.path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise PidFileError(str(self.path), f"cannot be written: {exc.strerror}") from None
        finally:
            os.close(dfd)
        self.pid = pid
        if self.note is not None and not self._noted:
            self._noted = True
            _write_note(self.note, self.path)

    def remove(self) -> bool:
        """Remove the file if it still names the PID written last; whether it was removed.

        A file that names another PID (a successor's, or one written by hand)
        is left alone, as is one that was replaced by a link.
        """
        pid, self.pid = self.pid, None
        if pid is None:
            return False
        if self._noted and self.note is not None:
            self._noted = False
            with contextlib.suppress(OSError):
                self.note.unlink()
        return self._remove_naming(pid)

    def _remove_naming(self, pid: int) -> bool:
        try:
            dfd = self._open_dir()
        except PidFileError:
            return False
        try:
            fd = os.open(self.path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                raw = os.read(fd, MAX_PID_FILE_BYTES + 1)
            finally:
                os.close(fd)
            if _parse(raw) != pid:
                return False
            os.unlink(self.path.name, dir_fd=dfd)
            return True
        except OSError:
            return False
        finally:
            os.close(dfd)


def _write_note(note: Path, target: Path) -> None:
    """``note`` -> ``target``, replaced atomically; a failure costs only the clean-up
    after a crash of ikosd, so it is not an error of the daemon's start."""
    tmp = note.with_name(f".{note.name}.{os.urandom(6).hex()}.tmp")
    try:
        note.parent.mkdir(mode=0o755, exist_ok=True)
        os.symlink(os.path.abspath(target), tmp)
        os.rename(tmp, note)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


#: The directory of :attr:`DaemonPidFile.note` links, under the instance's run directory.
PID_FILE_NOTES = "pid-files"


def remove_stale_pid_files(
    notes: str | os.PathLike[str],
    keep: Iterable[str],
    gone: Mapping[str, int],
    *,
    only: Iterable[str] | None = None,
) -> list[str]:
    """After a crash of ikosd: remove the PID files of the daemons it no longer runs.

    ``notes`` is the directory of :attr:`DaemonPidFile.note` links, one per
    daemon name; the daemons in ``keep`` (adopted: their new handle writes
    the file again) are left alone. For every other daemon, the file is
    removed if it still names the PID that ``gone`` records for it (a
    process that ended, or that the recovery stopped) or a PID that no
    longer runs; a file naming a live process of someone else is left
    alone, as :meth:`DaemonPidFile.remove` does. With ``only``, just those
    daemons are looked at. Returns the paths removed.
    """
    kept = set(keep)
    wanted = None if only is None else set(only)
    removed: list[str] = []
    try:
        entries = list(os.scandir(notes))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name in kept or (wanted is not None and name not in wanted):
            continue
        try:
            target = os.readlink(entry.path)
        except OSError:
            continue
        pid_file = DaemonPidFile(target)
        named = _named_pid(pid_file.path)
        stale = named is not None and (named == gone.get(name) or not _alive(named))
        if stale and named is not None and pid_file._remove_naming(named):
            removed.append(str(pid_file.path))
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
    return removed


def _named_pid(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _parse(os.read(fd, MAX_PID_FILE_BYTES + 1))
    except OSError:
        return None
    finally:
        os.close(fd)


def read_pid_file(
    path: str | os.PathLike[str],
    *,
    owner_pgid: int | None = None,
    owner_pids: set[int] | frozenset[int] | None = None,
) -> int:
    """Read and check the main PID a ``forking`` daemon wrote into its own PID file.

    Refuses, with :class:`PidFileError`: a missing or unreadable file,
    anything but a positive decimal PID, PID 1, a PID with no live process,
    and, when ``owner_pgid`` is given, a PID outside that process group and
    session (the session ikos started the daemon in). ``owner_pids`` (e.g.
    the PIDs of the daemon's cgroup) is accepted as an alternative proof of
    ownership, for daemons that call ``setsid`` themselves.

    Example::

        main_pid = read_pid_file("/run/nginx.pid", owner_pgid=launcher_pid)
    """
    p = str(path)
    try:
        raw = _read_raw(path)
    except OSError as exc:
        raise PidFileError(p, f"cannot be read: {exc.strerror}")
    if raw is None:
        raise PidFileError(p, "does not exist")
    if len(raw) > MAX_PID_FILE_BYTES:
        raise PidFileError(p, f"longer than {MAX_PID_FILE_BYTES} bytes: not a PID file")
    pid = _parse(raw)
    if pid is None:
        raise PidFileError(p, f"does not hold a positive PID: {raw[:20]!r}")
    if pid == 1:
        raise PidFileError(p, "names PID 1 (init), which is never a daemon's main process")
    if not _alive(pid):
        raise PidFileError(p, f"names PID {pid}, which is not running")
    if owner_pgid is None and owner_pids is None:
        return pid
    if owner_pids is not None and pid in owner_pids:
        return pid
    if owner_pgid is not None:
        try:
            if owner_pgid in (os.getpgid(pid), os.getsid(pid)):
                return pid
        except ProcessLookupError:
            raise PidFileError(p, f"names PID {pid}, which is not running")
        raise PidFileError(
            p, f"names PID {pid}, outside the daemon's process group and session {owner_pgid}"
        )
    raise PidFileError(p, f"names PID {pid}, which is not one of the daemon's processes")
