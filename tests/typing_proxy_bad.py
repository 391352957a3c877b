"""Type-checked by tests/test_proxy.py with mypy --strict: each marked line must fail.

The test reads the ``# error: CODE`` markers and expects exactly those errors.
"""

from __future__ import annotations

import ikos


class Counter(ikos.Actor):
    def incr(self, k: int = 1) -> int:
        return k


def wrong(counter: ikos.ActorRef[Counter]) -> str:
    counter.proxy().incr("five")  # error: arg-type
    text: str = counter.proxy().incr(5)  # error: assignment
    counter.proxy().decr(5)  # error: attr-defined
    counter.proxy().incr(5, 6)  # error: call-arg
    return text
