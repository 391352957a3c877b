"""Restart intensity: may a supervisor restart one more child, or must it give up?

This is Erlang/OTP's ``supervisor:add_restart/1`` as an immutable value. A
supervisor keeps the timestamps of its recent restarts; on each new restart
it forgets those older than ``within`` seconds, adds the new one, and gives
up when more than ``max_restarts`` remain. ``max_restarts=0`` therefore means
that no restart is ever allowed.

The main design choice is purity: the current time is passed in (monotonic
seconds) and :meth:`RestartIntensity.add` returns a new value instead of
mutating one, so the rule is tested exhaustively with hypothesis and the
runtime around it only stores the latest value. A mutable counter reading
``time.monotonic()`` itself was rejected: it cannot be tested without
sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartIntensity:
    """The restart history of one supervisor and its OTP intensity limit.

    ``history`` holds the times of the restarts still inside the window,
    oldest first; it never holds more than ``max_restarts + 1`` entries,
    which is all the decision ever looks at.

    Example::

        >>> r = RestartIntensity(max_restarts=1, within=5.0)
        >>> r, ok = r.add(100.0)
        >>> ok
        True
        >>> r, ok = r.add(103.0)   # a second restart within 5 s
        >>> ok
        False
    """

    max_restarts: int
    within: float
    history: tuple[float, ...] = ()

    def add(self, now: float) -> tuple[RestartIntensity, bool]:
        """Record a restart at ``now``; return the new value and whether it is allowed.

        As OTP's ``add_restart``: keep the restarts ``t`` with
        ``now - t <= within``, add ``now``, and allow the restart iff at most
        ``max_restarts`` remain. When it is not allowed the supervisor must
        stop its children in reverse start order and fail to its parent.

        ``now`` is monotonic time and must not go backwards; restarts dated
        after ``now`` (which only a clock going backwards produces) are kept,
        the conservative choice.
        """
        kept = (*(t for t in self.history if now - t <= self.within), now)
        allowed = len(kept) <= self.max_restarts
        # Older entries cannot change a later decision: once max_restarts + 1
        # restarts are in a window the next one is refused whatever came before.
        bound = max(self.max_restarts, 0) + 1
        return RestartIntensity(self.max_restarts, self.within, kept[-bound:]), allowed

    def allows(self, now: float, count: int) -> bool:
        """Whether ``count`` restarts at ``now`` would all be allowed: :meth:`add`'s rule,
        counted instead of applied ``count`` times (the new value is not needed)."""
        return self.restarts_within(now) + count <= self.max_restarts

    def restarts_within(self, now: float) -> int:
        """How many recorded restarts lie in the window ending at ``now`` (for status)."""
        return sum(1 for t in self.history if now - t <= self.within)
