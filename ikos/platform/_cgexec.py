"""The cgroup trampoline: a tiny compiled program that joins a cgroup, then execs.

An executable in ``kill_mode = "control-group"`` must be in its cgroup before
it runs a single instruction of its own, or a quick fork could escape the
stop. ``posix_spawn`` (clone with ``CLONE_VM | CLONE_VFORK``, then exec: the
fast start) cannot join a cgroup, and Python's fork of the manager or of the
fork server costs milliseconds. So the manager posix_spawns this trampoline
instead: it writes its own PID to each ``cgroup.procs`` it is given, marks
the error pipe close-on-exec and execs the daemon; a failure is one
``"<field>: <reason>"`` line on that pipe and exit status 127, the protocol
of :func:`~ikos.platform._spawn.exec_in_child`, so EOF on the pipe still
means the exec succeeded.

Measured on the 2-core test machine (an ikosd-sized Python process spawning
a 129-byte static program, median of 300): posix_spawn alone 0.09 ms; through
this trampoline, cgroup joined, 0.5-0.7 ms (the cgroup write itself ~0.05
ms: the cost is the trampoline's exec); a ``sh -c 'echo $$ > cgroup.procs;
exec "$@"'`` trampoline 0.75 ms but with no clean error report and an fd to
close by hand; a fork of the Python process 2.4 ms, the fork server's double
fork more. Rejected: ``clone3(CLONE_INTO_CGROUP)`` from Python (ctypes
cannot give the child its own stack, so the child would run the
interpreter on the parent's, and only cgroup v2 has it), and a persistent
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

#: Usage: ``ikos-cgexec ERRFD N PROCS_1 .. PROCS_N EXECUTABLE ARGV0 ARGS...``.
SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

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

int main(int argc, char **argv)
{
    if (argc < 5)
        return 127;
    int errfd = atoi(argv[1]);
    int n = atoi(argv[2]);
    if (n < 0 || argc < 5 + n)
        return 127;
    /* the daemon must not inherit it: its EOF tells the manager the exec succeeded */
    if (fcntl(errfd, F_SETFD, FD_CLOEXEC) < 0)
        return 127;
    char pid[24];
    int len = snprintf(pid, sizeof pid, "%ld", (long)getpid());
    for (int i = 0; i < n; i++) {
        int fd = open(argv[3 + i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, pid, (size_t)len) != len)
            fail(errfd, "cgroup", argv[3 + i], errno);
        close(fd);
    }
    execve(argv[3 + n], argv + 4 + n, environ);
    fail(errfd, "executable", argv[3 + n], errno);
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
    d = cache_dir()
    path = d / _NAME
    if _trusted(d, directory=True) and _trusted(path, directory=False) and os.access(path, os.X_OK):
        _found = str(path)
    return _found


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
    cc = compiler()
    if cc is None:
        log.info("no C compiler: executables in control-group mode start through the fork server")
        return None
    d = cache_dir()
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        log.info("cannot create %s (%s): no spawn helper", d, exc.strerror)
        return None
    if not _trusted(d, directory=True):
        log.warning("%s is not owned by us or is writable by others: no spawn helper", d)
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".{_NAME}.", dir=d)
    os.close(fd)
    src = tmp + ".c"
    try:
        Path(src).write_text(SOURCE)
        proc = subprocess.Popen(
            [cc, "-O2", "-o", tmp, src],
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
            log.warning("compiling the spawn helper with %s failed: %s", cc, text)
            return None
        os.chmod(tmp, 0o755)
        os.replace(tmp, d / _NAME)
    except OSError as exc:
        log.warning("building the spawn helper in %s failed: %s", d, exc)
        return None
    finally:
        for leftover in (tmp, src):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return helper_path()


def argv(helper: str, procs: tuple[str, ...], executable: str, args: tuple[str, ...]) -> list[str]:
    """The trampoline's command line: join ``procs``, then exec ``executable`` with ``args``."""
    return [helper, str(ERROR_FD), str(len(procs)), *procs, executable, *args]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build()
    print(built or "no spawn helper built (see above)")
    raise SystemExit(0 if built else 1)
