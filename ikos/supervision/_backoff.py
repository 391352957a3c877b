"""Exponential back-off between restarts, as Akka's BackoffSupervisor computes it.

The n-th consecutive restart of a child waits
``min(max_backoff, min_backoff * 2**n) * (1 + u * random_factor)`` seconds,
where ``u`` is uniform in [0, 1); the count starts again from zero once the
child has run for ``Backoff.reset_period`` seconds (Akka's automatic reset).

The main design choice is purity, as for restart intensity: the caller
passes in the time and the random draw ``u``, and :class:`BackoffState` is an
immutable value, so the delay is a plain function tested with hypothesis and
no test ever sleeps or seeds a global random generator. Computing
``min_backoff * 2**n`` in floating point naively raises ``OverflowError``
for large ``n``; :func:`backoff_delay` returns the capped value instead, as
Akka's ``Try(...).getOrElse(maxBackoff)`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ikos.supervision._spec import Backoff


def backoff_delay(
    restart_count: int,
    min_backoff: float,
    max_backoff: float,
    random_factor: float,
    u: float,
) -> float:
    """Seconds to wait before restart number ``restart_count`` (0 for the first).

    ``u`` is the caller's uniform draw in [0, 1) (``random.random()``).
    Never raises ``OverflowError``: a huge count gives ``max_backoff`` times
    the jitter.

    Example::

        >>> backoff_delay(3, 0.1, 10.0, 0.2, 0.0)
        0.8
        >>> backoff_delay(10**9, 0.1, 10.0, 0.2, 0.0)
        10.0
    """
    if restart_count < 0:
        raise ValueError(f"restart_count must be >= 0, got {restart_count}")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    try:
        # ldexp is exact (no rounding of 2**n) and takes any int exponent.
        raw = math.ldexp(min_backoff, restart_count)
    except OverflowError:
        raw = math.inf
    return min(max_backoff, raw) * (1.0 + u * random_factor)


@dataclass(frozen=True)
class BackoffState:
    """The back-off count of one child and when it last started.

    ``count`` is the number of consecutive restarts already delayed;
    ``last_start`` the monotonic time of the child's last start, or ``None``
    while it is not running.

    Example::

        >>> spec = Backoff(min=1.0, max=8.0, random_factor=0.0)
        >>> s = BackoffState().started(0.0)
        >>> s, d = s.next_delay(spec, now=0.2, u=0.0)   # crashed quickly
        >>> d
        1.0
        >>> s, d = s.started(1.2).next_delay(spec, now=1.3, u=0.0)
        >>> d
        2.0
    """

    count: int = 0
    last_start: float | None = None

    def next_delay(
        self, spec: Backoff, now: float, u: float, *, first_free: bool = False
    ) -> tuple[BackoffState, float]:
        """The child stopped at ``now``: return the new state and the delay before restarting.

        If the child had run for at least ``spec.reset_period`` seconds since
        its last start, the count first returns to 0 (Akka's automatic
        reset). The returned state has the count incremented and no start
        time, until :meth:`started` is called again. With ``first_free`` the
        first restart of a series waits nothing and the series is shifted by
        one: only a child that fails again soon after waits.
        """
        count = self.count
        if self.last_start is not None and now - self.last_start >= spec.reset_period:
            count = 0
        if first_free:
            delay = (
                0.0
                if count == 0
                else backoff_delay(count - 1, spec.min, spec.max, spec.random_factor, u)
            )
        else:
            delay = backoff_delay(count, spec.min, spec.max, spec.random_factor, u)
        return BackoffState(count + 1, None), delay

    def started(self, now: float) -> BackoffState:
        """The child (re)started at ``now``; the count is kept until it proves stable."""
        return BackoffState(self.count, now)
