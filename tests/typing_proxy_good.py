"""Type-checked by tests/test_proxy.py with mypy --strict: everything here must pass.

Not collected by pytest (no ``test_`` prefix); never run, only checked.
"""

from __future__ import annotations

import pickle
from concurrent.futures import Future

import ikos


class Counter(ikos.Actor):
    def on_start(self) -> None:
        self.count = 0

    def incr(self, k: int = 1, *, times: int = 1) -> int:
        self.count += k * times
        return self.count

    def label(self, prefix: str) -> str:
        return f"{prefix}{self.count}"


def typed(counter: ikos.ActorRef[Counter]) -> int:
    proxy = counter.proxy(timeout=2)
    n: int = proxy.incr(5)
    m: int = proxy.incr(times=3)
    text: str = proxy.label("n=")
    return n + m + len(text)


def untyped_still_works() -> object:
    echo = ikos.ActorRef("echo")  # a bare reference: ActorRef[Any], untyped proxy
    anything = echo.proxy().whatever(1, 2)
    reply = echo.ask("ping", timeout=1)
    future: Future[object] = echo.ask_future("ping")
    return (anything, reply, future)


def made_typed() -> ikos.ActorRef[Counter]:
    counter: ikos.ActorRef[Counter] = ikos.ActorRef("counter", root="/tmp/x")
    same: ikos.ActorRef[Counter] = pickle.loads(pickle.dumps(counter))
    return same


async def asynchronous(counter: ikos.ActorRef[Counter]) -> object:
    return await counter.ask_async("ping", timeout=1)
