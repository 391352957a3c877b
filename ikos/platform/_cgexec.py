"""The cgroup trampoline: a tiny compiled program that joins a cgroup, then execs.

An executable in ``kill_mode = "control-group"`` must be in its cgroup before
it runs a single instruction of its own, or a quick fork could escape the
stop. ``posix_spawn`` (clone with ``CLONE_VM | CLONE_VFORK``, then exec: the
fast start) cannot join a cgroup, and Python's fork of the manager or of the
fork server costs milliseconds. So the manager posix_spawns this trampoline
instead: it starts the daemon with ``clone3(CLONE_INTO_CGROUP | CLONE_VFORK)``
straight into its cgroup v2 directory (after joining any cgroup v1 one by
writing its own PID to ``cgroup.procs``, which the child inherits), the
child calls setsid and execs, and the trampoline writes the daemon's PID on
the error pipe and exits, so the daemon is re-parented to ikosd (a child
subreaper). A failure is one ``"<field>: <reason>"`` line on that pipe, as
in :func:`~ikos.platform._spawn.exec_in_child`. Where clone3 or
CLONE_INTO_CGROUP is missing (Linux < 5.7), the trampoline joins the v2
cgroup by writing too and execs the daemon itself.

Measured on the 2-core test machine (an ikosd-sized Python process spawning
a 129-byte static program): posix_spawn alone 0.09 ms; a trampoline writing
``cgroup.procs`` then exec'ing, 0.5-0.7 ms in a tight loop, but 7-25 ms
(median 15) when starts are a fraction of a second apart, as restarts are:
moving a process between cgroups takes the kernel's global threadgroup
lock for writing, which waits for an RCU grace period once the lock has
gone quiet. ``clone3(CLONE_INTO_CGROUP)`` takes that lock only for reading:
1-6 ms on the same spaced pattern, the same as the trampoline with no
cgroup at all on that (loaded) machine. A ``sh -c 'echo $$ >
cgroup.procs; exec "$@"'`` trampoline: no better than the write, with no
clean error report; a fork of the Python process 2.4 ms before its cgroup
write, the fork server's double fork more. Rejected: ``clone3`` from Python
(ctypes cannot give a CLONE_VM child its own stack, and without CLONE_VM it
is a fork of the big interpreter again), and a persistent
spawner process (one more process, its memory and a protocol, for a saving
under 0.5 ms).

The program is compiled from :data:`SOURCE` with the machine's C compiler
(``python -m ikos.platform._cgexec`` does it at install time; ikosd does it
in a worker thread at start when it is missing) into a cache directory
owned by the user, named after the hash of the source. Where there is no
compiler, or the cache is not safe to execute from, :func:`helper_path` is
None and the manager falls back to the pure-Python path (the fork server).
``IKOS_SPAWN_HELPER=off`` forces that fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from ikos.platform._process import disown, own

log = logging.getLogger("ikos.cgexec")

#: Usage: ``ikos-cgexec ERRFD N CGROUP_DIR_1 .. CGROUP_DIR_N EXECUTABLE ARGV0 ARGS...``.
#: The daemon starts in a cgroup v2 directory through ``clone3(CLONE_INTO_CGROUP |
#: CLONE_VFORK)``, and joins the others (v1) by writing ``cgroup.procs`` first; it
#: calls setsid, then execs. The trampoline reports ``pid N`` on ERRFD (the daemon's:
#: its own when there was no clone) and exits; a failure is a ``field: reason`` line.
SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#define CGROUP2_MAGIC 0x63677270
#define INTO_CGROUP 0x200000000ULL
#define VFORK 0x00004000ULL

extern char **environ;

struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};

static void fail(int fd, const char *field, const char *what, int err)
{
    char buf[4200];
    int n = snprintf(buf, sizeof buf, "%s: %s: %s\n", field, strerror(err), what);
    if (n > (int)sizeof buf - 1)
        n = (int)sizeof buf - 1;
    if (n > 0 && write(fd, buf, (size_t)n) < 0)
        _exit(127);
    _exit(127);
}

static void report_pid(int fd, long pid)
{
    char buf[32];
    int n = snprintf(buf, sizeof buf, "pid %ld\n", pid);
    if (write(fd, buf, (size_t)n) != n)
        _exit(127);
}

static void join(int errfd, const char *dir)
{
    char path[4200], pid[24];
    int len = snprintf(pid, sizeof pid, "%ld", (long)getpid());
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, pid, (size_t)len) != len)
        fail(errfd, "cgroup", path, errno);
    close(fd);
}

static void become(int errfd, char **argv)
{
    if (setsid() < 0)
        fail(errfd, "session", "setsid", errno);
    execve(argv[0], argv + 1, environ);
    fail(errfd, "executable", argv[0], errno);
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return 127;
    int errfd = atoi(argv[1]);
    int n = atoi(argv[2]);
    if (n < 0 || argc < 5 + n)
        return 127;
    if (fcntl(errfd, F_SETFD, FD_CLOEXEC) < 0)
        return 127;
    int v2 = -1;
    for (int i = 0; i < n; i++) {
        const char *dir = argv[3 + i];
        struct statfs fs;
        if (v2 < 0 && statfs(dir, &fs) == 0 && fs.f_type == CGROUP2_MAGIC) {
            v2 = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (v2 >= 0)
                continue;
        }
        join(errfd, dir);
    }
    char **target = argv + 3 + n;
    if (v2 >= 0) {
        struct clone_args_v2 args;
        memset(&args, 0, sizeof args);
        args.flags = INTO_CGROUP | VFORK;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t)v2;
        long pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid == 0)
            become(errfd, target);
        if (pid > 0) {
            report_pid(errfd, pid);
            _exit(0);
        }
        for (int i = 0; i < n; i++) {
            struct statfs fs;
            if (statfs(argv[3 + i], &fs) == 0 && fs.f_type == CGROUP2_MAGIC) {
                join(errfd, argv[3 + i]);
                break;
            }
        }
    }
    report_pid(errfd, getpid());
    become(errfd, target);
    return 127;
}
"""

#: The descriptor number the manager gives the trampoline's error pipe.
ERROR_FD = 3
_VERSION = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
_NAME = f"ikos-cgexec-{_VERSION}"
_COMPILERS = ("cc", "gcc", "clang")
_found: str | None = None


def cache_dir() -> Path:
    """Where the compiled trampoline lives: ``/var/cache/ikos`` for root, else the user's cache."""
    if os.geteuid() == 0:
        return Path("/var/cache/ikos")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ikos"


def _trusted(path: Path, *, directory: bool) -> bool:
    # a program run by the manager (root, often) must be writable by nobody else
    try:
        st = path.lstat()
    except OSError:
        return False
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def helper_path() -> str | None:
    """The path of the compiled trampoline, if it is there and safe to run; else None."""
    global _found
    if os.environ.get("IKOS_SPAWN_HELPER", "").lower() in ("off", "0", "no"):
        return None
    if _found is not None:
        return _found
    _found = installed(_NAME)
    return _found


def installed(name: str) -> str | None:
    """The path of the compiled program ``name`` in :func:`cache_dir`, if it is safe to run."""
    d = cache_dir()
    path = d / name
    if _trusted(d, directory=True) and _trusted(path, directory=False) and os.access(path, os.X_OK):
        return str(path)
    return None


def compiler() -> str | None:
    """The C compiler on PATH, if any."""
    return next((p for p in map(shutil.which, _COMPILERS) if p is not None), None)


def build(timeout: float = 120.0) -> str | None:
    """Compile the trampoline into :func:`cache_dir` unless it is there; its path, or None.

    None (and a log line saying why) when there is no compiler, the cache
    directory cannot be made safely or the compiler fails. Safe to run from
    several processes at once: each compiles to a temporary name and renames.
    """
    found = helper_path()
    if found is not None or os.environ.get("IKOS_SPAWN_HELPER", "").lower() in ("off", "0", "no"):
        return found
    if compile_program(_NAME, SOURCE, "spawn helper", timeout=timeout) is None:
        return None
    return helper_path()


def compile_program(
    name: str, source: str, what: str, flags: tuple[str, ...] = ("-O2",), timeout: float = 120.0
) -> str | None:
    """Compile C ``source`` into ``name`` in :func:`cache_dir`; its path, or None.

    None (and a log line saying why, naming ``what``) when there is no
    compiler, the cache directory cannot be made safely or the compiler
    fails. Safe to run from several processes at once: each compiles to a
    temporary name and renames. Shared with the descriptor keeper
    (:mod:`ikos.platform._fdstore`).
    """
    cc = compiler()
    if cc is None:
        log.info("no C compiler: no %s (ikos falls back to Python)", what)
        return None
    d = cache_dir()
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        log.info("cannot create %s (%s): no %s", d, exc.strerror, what)
        return None
    if not _trusted(d, directory=True):
        log.warning("%s is not owned by us or is writable by others: no %s", d, what)
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=d)
    os.close(fd)
    src = tmp + ".c"
    try:
        Path(src).write_text(source)
        proc = subprocess.Popen(
            [cc, *flags, "-o", tmp, src],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        own(proc.pid)  # ikosd's orphan reaper must leave this child to us
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        finally:
            disown(proc.pid)
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()[-500:]
            log.warning("compiling the %s with %s failed: %s", what, cc, text)
            return None
        os.chmod(tmp, 0o755)
        os.replace(tmp, d / name)
    except OSError as exc:
        log.warning("building the %s in %s failed: %s", what, d, exc)
        return None
    finally:
        for leftover in (tmp, src):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return str(d / name)


def argv(helper: str, dirs: tuple[str, ...], executable: str, args: tuple[str, ...]) -> list[str]:
    """The trampoline's command line: start in the cgroup ``dirs``, exec ``executable``."""
    return [helper, str(ERROR_FD), str(len(dirs)), *dirs, executable, *args]


def parse_report(data: bytes) -> tuple[int | None, str]:
    """``(the daemon's pid or None, the failure text or "")`` from what the trampoline wrote.

    >>> parse_report(b"pid 42\n")
    (42, '')
    >>> parse_report(b"executable: No such file or directory: /bin/nope\npid 42\n")
    (42, 'executable: No such file or directory: /bin/nope')
    """
    pid = None
    errors = []
    for line in data.decode("utf-8", "replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "pid" and rest.isdigit():
            pid = int(rest)
        elif line.strip():
            errors.append(line.strip())
    return pid, "; ".join(errors)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build()
    print(built or "no spawn helper built (see above)")
    raise SystemExit(0 if built else 1)
