"""Actor classes of tests/test_ray.py and bench/ray.py: imported by path in the Ray workers
(the tests put this directory on the cluster's ``PYTHONPATH``)."""

from __future__ import annotations

import os
from typing import Any

import ikos
from ikos.actors._actor import Actor

#: A Ray worker starts in about a second, on a loaded machine in tens of seconds: a slow
#: start must not count as a failure in the tests.
START_TIMEOUT = 120.0


def where(name: str, **placement: Any) -> ikos.Child:
    """A :class:`Where` child placed on Ray by ``placement`` (``ikos.Ray``'s fields)."""
    return ikos.Child(
        name, "ray_actors:Where", start_timeout=START_TIMEOUT, placement=ikos.Ray(**placement)
    )


class Where(Actor):
    """Says where it runs; ``"boom"`` crashes it; counts with ``incr`` (a proxy's method)."""

    def on_start(self) -> None:
        self.count = 0
        self.seen: list[Any] = []

    def receive(self, message: Any) -> Any:
        if message == "where":
            import ray

            return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        if message == "boom":
            raise RuntimeError("asked to crash")
        if message == "seen":
            return list(self.seen)
        if isinstance(message, tuple) and message[0] == "seq":
            self.seen.append(message[1])
            return None
        return message

    def incr(self, by: int = 1) -> int:
        self.count += by
        return self.count


class Ping(Actor):
    """Answers every message with itself: the ask round trip, measured by bench/ray.py."""

    def receive(self, message: Any) -> Any:
        return message
