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


class Store(ikos.Actor):
    """A key-value store in memory.

    ``["put", key, value]`` answers ``"ok"``, ``["get", key]`` the value (or
    None), ``["delete", key]`` whether the key was there, ``"keys"`` the
    sorted keys. Lists and tuples both work, so ``ikosctl call`` with JSON
    arrays reaches it as well as Python callers do. A request it does not
    understand is answered with ``{"error": ...}`` rather than raised: an
    exception in ``receive`` crashes the actor, and the data would go with it.
    """

    def on_start(self) -> None:
        self.data: dict[Any, Any] = {}

    def receive(self, message: Any) -> Any:
        if message == "keys":
            return sorted(self.data, key=str)
        if isinstance(message, list | tuple) and message:
            op, *rest = message
            if op == "put" and len(rest) == 2:
                self.data[rest[0]] = rest[1]
                return "ok"
            if op == "get" and len(rest) == 1:
                return self.data.get(rest[0])
            if op == "delete" and len(rest) == 1:
                return self.data.pop(rest[0], None) is not None
        return {"error": f"unknown request {message!r}: use put, get, delete or keys"}
