"""Actor classes of tests/test_ray.py and bench/ray.py: imported by path in the Ray workers
(the tests put this directory on the cluster's ``PYTHONPATH``)."""

from __future__ import annotations

import os
from typing import Any

from ikos.actors._actor import Actor


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
