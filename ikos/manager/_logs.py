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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from ikos.monitor._logfile import LineSplitter, RotatingLog, tail
from ikos.platform._fdstore import FdStore
from ikos.platform._process import read_available

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
#: Reads of one pipe per loop turn: 16 x 64 KiB at most before others get a turn.
READS_PER_TURN = 16


class DaemonLogs:
    """The log files of one instance's daemons, and the pipes that feed them."""

    def __init__(self, log_dir: Path, fdstore: FdStore) -> None:
        self.log_dir = log_dir
        self.fdstore = fdstore
        self.logs: dict[str, RotatingLog] = {}
        self._readers: dict[int, str] = {}

    def log_for(self, name: str) -> RotatingLog:
        """The (open) log file of daemon ``name``."""
        rl = self.logs.get(name)
        if rl is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            rl = RotatingLog(self.log_dir / f"{name}.log", LOG_MAX_BYTES, LOG_BACKUPS)
            self.logs[name] = rl
        return rl

    def capture(self, name: str, stream: str, fd: int) -> None:
        """Read ``fd`` (a pipe's read end, now ours) into ``name``'s log until EOF."""
        self.fdstore.put(name, stream, fd)
        loop = asyncio.get_running_loop()
        splitter = LineSplitter()
        os.set_blocking(fd, False)
        rl = self.log_for(name)
        self._readers[fd] = name

        def readable() -> None:
            lines: list[str] = []
            chunks, eof = read_available(fd, READS_PER_TURN)
            for chunk in chunks:
                lines.extend(splitter.feed(chunk))
            if eof:
                lines.extend(splitter.flush())
            if lines:
                rl.write_lines(stream, lines)
                rl.flush()
            if eof:
                loop.remove_reader(fd)
                self._readers.pop(fd, None)
                os.close(fd)

        loop.add_reader(fd, readable)

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

    def close(self) -> None:
        """Stop reading every pipe and close every log file (ikosd is stopping)."""
        loop = asyncio.get_running_loop()
        for fd in list(self._readers):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers.clear()
        for rl in self.logs.values():
            rl.close()
        self.logs.clear()
