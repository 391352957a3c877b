"""Daemons' output: the read ends of their stdout and stderr pipes, split into log files.

Every daemon whose output goes to the log (executables with ``stdout =
"log"``, the default, and every actor) writes into pipes whose read ends
the manager holds; :class:`DaemonLogs` reads them from the event loop, in
bounded slices per turn so that a chatty daemon waits its turn, and writes
timestamped lines into ``LOG/NAME.log``, rotated by size. Each read end is
also deposited with the descriptor keeper, so that after a crash of ikosd
the next one picks the pipe up and the daemon never sees EPIPE.

One component for both kinds of daemon, so that ``ikosctl logs`` means the
same for an actor as for an executable.

In a container the lines belong on ikosd's own stdout and stderr too, where
``docker logs`` and Kubernetes read them: :class:`OutputForwarder` copies
each line there, prefixed with the daemon's name (``web | listening``, as
docker-compose does), stdout to stdout and stderr to stderr. A thread does
the writing, behind a queue bounded in bytes: a slow or stuck reader of
ikosd's stdout costs lines, counted and reported on stderr once it catches
up, and never stalls the event loop (which a blocking write would) nor
makes ikosd's memory grow. Non-blocking writes from the loop were rejected:
``O_NONBLOCK`` belongs to the open file description, which ikosd shares
with its parent (the shell, the container runtime) and with ``sys.stdout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import threading
from pathlib import Path

from ikos.monitor._logfile import LineSplitter, RotatingLog, tail
from ikos.platform._fdstore import FdStore
from ikos.platform._process import read_available

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
#: Reads of one pipe per loop turn: 16 x 64 KiB at most before others get a turn.
READS_PER_TURN = 16
#: Bytes of forwarded lines waiting for ikosd's stdout/stderr before lines are dropped.
FORWARD_QUEUE_BYTES = 4 * 1024 * 1024
#: How long ikosd's shutdown waits for the forwarded lines to be written.
FORWARD_DRAIN_SECONDS = 2.0
CR = "\r"


class OutputForwarder:
    """Copies daemons' lines to ikosd's stdout (fd 1) and stderr (fd 2); see the module docstring.

    Example::

        forwarder = OutputForwarder()
        forwarder.forward("web", "stdout", ["listening on :80"])   # "web | listening on :80"
        forwarder.close()
    """

    def __init__(
        self, fds: dict[str, int] | None = None, max_bytes: int = FORWARD_QUEUE_BYTES
    ) -> None:
        self.fds = fds if fds is not None else {"stdout": 1, "stderr": 2}
        self.max_bytes = max_bytes
        #: Lines dropped because the queue was full (all time), and not yet reported.
        self.dropped = 0
        self._unreported = 0
        self._queued = 0
        self._items: collections.deque[tuple[int, bytes] | None] = collections.deque()
        self._wake = threading.Condition()
        self._broken = False
        self._thread = threading.Thread(target=self._run, name="ikos-stdout", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Bytes queued and not written yet."""
        return self._queued

    def forward(self, name: str, stream: str, lines: list[str]) -> None:
        """Queue ``lines`` of daemon ``name``'s ``stream``; never blocks."""
        if self._broken or not lines:
            return
        fd = self.fds.get(stream, self.fds["stdout"])
        data = "".join(f"{name} | {line.rstrip(CR)}\n" for line in lines).encode("utf-8", "replace")
        with self._wake:
            if self._queued + len(data) > self.max_bytes:
                self.dropped += len(lines)
                self._unreported += len(lines)
                return
            self._report_dropped()
            self._items.append((fd, data))
            self._queued += len(data)
            self._wake.notify()

    def _report_dropped(self) -> None:
        """Queue the note of the lines dropped since the last one (with the lock held)."""
        if self._unreported:
            note = (
                f"ikosd | {self._unreported} lines of daemons' output dropped: "
                "ikosd's stdout and stderr did not keep up\n"
            )
            self._items.append((self.fds["stderr"], note.encode()))
            self._queued += len(note.encode())  # taken off again when written
            self._unreported = 0

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._items:
                    self._wake.wait()
                item = self._items.popleft()
                if item is not None:
                    self._queued -= len(item[1])
            if item is None:
                return
            fd, data = item
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except OSError:
                # the reader went away (EPIPE) or the descriptor is closed: forwarding
                # ends; the lines still reach the log files
                self._broken = True
                with self._wake:
                    self._items.clear()
                    self._queued = 0
                return

    def close(self, timeout: float = FORWARD_DRAIN_SECONDS) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop the thread."""
        with self._wake:
            self._report_dropped()
            self._items.append(None)
            self._wake.notify()
        self._thread.join(timeout)


class DaemonLogs:
    """The log files of one instance's daemons, and the pipes that feed them."""

    def __init__(
        self, log_dir: Path, fdstore: FdStore, forwarder: OutputForwarder | None = None
    ) -> None:
        self.log_dir = log_dir
        self.fdstore = fdstore
        #: Where every line goes besides the log file (``log_to_stdout``), if anywhere.
        self.forwarder = forwarder
        self.logs: dict[str, RotatingLog] = {}
        #: Each pipe's read end -> its reader.
        self._readers: dict[int, _PipeReader] = {}
        #: Every pipe is watched by this one epoll, itself one reader of the event loop:
        #: a pipe costs its reader and an entry above, not an asyncio handle, context,
        #: bound method and selector key of its own (~0.4 KiB; two pipes a daemon).
        self._epoll: select.epoll | None = None

    def log_for(self, name: str) -> RotatingLog:
        """The (open) log file of daemon ``name``."""
        rl = self.logs.get(name)
        if rl is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # a str path: a Path per daemon would be ~0.6 KiB of parts kept
            rl = RotatingLog(os.path.join(self.log_dir, f"{name}.log"), LOG_MAX_BYTES, LOG_BACKUPS)
            self.logs[name] = rl
        return rl

    def capture(self, name: str, stream: str, fd: int) -> None:
        """Read ``fd`` (a pipe's read end, now ours) into ``name``'s log until EOF."""
        self.fdstore.put(name, stream, fd)
        os.set_blocking(fd, False)
        self._readers[fd] = _PipeReader(self, name, stream, fd, self.log_for(name))
        if self._epoll is None:
            self._epoll = select.epoll()
            asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._readable)
        self._epoll.register(fd, select.EPOLLIN)

    def _readable(self) -> None:
        """Some pipes have bytes or their EOF: one turn of reading for each (level-triggered,
        so a pipe with more than a turn's worth is readable again at the next turn)."""
        if self._epoll is None:
            return
        for fd, _ in self._epoll.poll(0):
            reader = self._readers.get(fd)
            if reader is None:
                continue
            try:
                reader.readable()
            except Exception as exc:  # as the loop does for a reader: the other pipes read on
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"reading the {reader.stream} of {reader.name!r}", "exception": exc}
                )

    def _drop(self, fd: int) -> None:
        """Stop watching pipe ``fd`` and close it (unwatched first: the keeper holds a copy
        of the pipe, so closing ours alone would leave it in the epoll)."""
        self._readers.pop(fd, None)
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def release(self, name: str, streams: tuple[str, ...] = ("stdout", "stderr")) -> None:
        """The daemon's process ended: its pipes are no longer worth keeping for a successor."""
        self.fdstore.drop(name, list(streams))

    def tail(self, name: str, lines: int) -> list[str]:
        """The last ``lines`` lines of ``name``'s log (an empty list when it has none)."""
        path = self.log_dir / f"{name}.log"
        if name in self.logs:
            self.logs[name].flush()
        if not path.exists():
            return []
        return tail(path, lines)

    def reopen(self) -> None:
        """Close every log file, to be reopened by its next line (after an outside rotation)."""
        for rl in self.logs.values():
            rl.close()

    def close(self) -> None:
        """Stop reading every pipe and close every log file (ikosd is stopping)."""
        for fd in list(self._readers):
            self._drop(fd)
        if self._epoll is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        for rl in self.logs.values():
            rl.close()
        self.logs.clear()
        if self.forwarder is not None:
            self.forwarder.close()


class _PipeReader:
    """One pipe's reader: a slotted object rather than a closure, since there are two
    per daemon (a closure's cells and function object cost about three times as much)."""

    __slots__ = ("fd", "log", "logs", "name", "splitter", "stream")

    def __init__(self, logs: DaemonLogs, name: str, stream: str, fd: int, log: RotatingLog) -> None:
        self.logs, self.name, self.stream, self.fd, self.log = logs, name, stream, fd, log
        #: Made at the first byte: most daemons' stderr never carries one.
        self.splitter: LineSplitter | None = None

    def readable(self) -> None:
        lines: list[str] = []
        chunks, eof = read_available(self.fd, READS_PER_TURN)
        if chunks and self.splitter is None:
            self.splitter = LineSplitter()
        for chunk in chunks:
            assert self.splitter is not None
            lines.extend(self.splitter.feed(chunk))
        if eof and self.splitter is not None:
            lines.extend(self.splitter.flush())
        if lines:
            self.log.write_lines(self.stream, lines)
            self.log.flush()
            if self.logs.forwarder is not None:
                self.logs.forwarder.forward(self.name, self.stream, lines)
        if eof:
            self.logs._drop(self.fd)
