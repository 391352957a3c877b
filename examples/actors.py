"""Example actors used by the demo, the quick start and the tests."""

from __future__ import annotations

import os
import time
from typing import Any

import ikos


class Echo(ikos.Actor):
    """Answers every message with itself; ``"pid"`` answers the actor's PID."""

    def receive(self, message: Any) -> Any:
        if message == "pid":
            return os.getpid()
        return message


class Counter(ikos.Actor):
    """Counts ``"incr"`` messages; any other message returns the count."""

    def on_start(self) -> None:
        self.count = 0

    def receive(self, message: Any) -> Any:
        if message == "incr":
            self.count += 1
        return self.count


class Crashy(ikos.Actor):
    """Raises on ``"crash"``, exits normally on ``"stop"``, sleeps on ``("sleep", s)``."""

    def receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError("asked to crash")
        if message == "stop":
            self.stop()
            return "stopping"
        if isinstance(message, tuple) and message and message[0] == "sleep":
            time.sleep(float(message[1]))
            return "slept"
        if message == "pid":
            return os.getpid()
        return message
