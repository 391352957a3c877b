"""Restart intensity: OTP's add_restart rule, by example and by property."""

from __future__ import annotations

from itertools import accumulate, pairwise

from hypothesis import assume, given
from hypothesis import strategies as st

from ikos.supervision._intensity import RestartIntensity

gaps = st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=40)
max_restarts = st.integers(min_value=0, max_value=6)
within = st.floats(min_value=0.01, max_value=30.0)


def run(intensity: RestartIntensity, times: list[float]) -> tuple[RestartIntensity, list[bool]]:
    decisions = []
    for now in times:
        intensity, ok = intensity.add(now)
        decisions.append(ok)
    return intensity, decisions


def otp_reference(max_r: int, period: float, times: list[float]) -> list[bool]:
    """supervisor.erl's add_restart/can_restart, with its full, untrimmed history."""
    restarts: list[float] = []
    decisions = []
    for now in times:
        restarts = [t for t in restarts if now - t <= period] + [now]
        decisions.append(len(restarts) <= max_r)
    return decisions


def test_allows_up_to_max_restarts_in_the_window_then_refuses() -> None:
    r = RestartIntensity(max_restarts=3, within=10.0)
    r, decisions = run(r, [0.0, 1.0, 2.0, 3.0])
    assert decisions == [True, True, True, False]


def test_zero_max_restarts_never_allows() -> None:
    _, decisions = run(RestartIntensity(0, 5.0), [0.0, 100.0, 1000.0])
    assert decisions == [False, False, False]


def test_old_restarts_leave_the_window() -> None:
    r = RestartIntensity(max_restarts=1, within=5.0)
    _, decisions = run(r, [0.0, 5.0, 10.5])
    # 5.0 - 0.0 <= 5 is still inside (OTP keeps t >= now - period); 10.5 is not.
    assert decisions == [True, False, True]


def test_add_returns_a_new_value() -> None:
    r = RestartIntensity(2, 1.0)
    r2, _ = r.add(3.0)
    assert r.history == () and r2.history == (3.0,)
    assert r2.restarts_within(3.5) == 1 and r2.restarts_within(4.5) == 0


@given(max_restarts, within, gaps)
def test_same_decisions_as_otp(max_r: int, period: float, steps: list[float]) -> None:
    times = list(accumulate(steps))
    _, decisions = run(RestartIntensity(max_r, period), times)
    assert decisions == otp_reference(max_r, period, times)


@given(max_restarts, within, gaps)
def test_never_more_than_max_restarts_allowed_in_any_window(
    max_r: int, period: float, steps: list[float]
) -> None:
    times = list(accumulate(steps))
    _, decisions = run(RestartIntensity(max_r, period), times)
    allowed = [t for t, ok in zip(times, decisions, strict=True) if ok]
    for end in allowed:
        assert sum(1 for t in allowed if t <= end and end - t <= period) <= max_r


@given(
    st.integers(min_value=1, max_value=6),
    within,
    st.lists(st.floats(min_value=0.001, max_value=20.0), min_size=1, max_size=40),
)
def test_restarts_spaced_beyond_the_window_are_always_allowed(
    max_r: int, period: float, extras: list[float]
) -> None:
    times = list(accumulate(period + e for e in extras))
    assume(all(b - a > period for a, b in pairwise(times)))
    _, decisions = run(RestartIntensity(max_r, period), times)
    assert all(decisions)


@given(max_restarts, within, gaps)
def test_history_is_bounded_and_ordered(max_r: int, period: float, steps: list[float]) -> None:
    r = RestartIntensity(max_r, period)
    for now in accumulate(steps):
        r, _ = r.add(now)
        assert len(r.history) <= max_r + 1
        assert list(r.history) == sorted(r.history)
        assert r.history[-1] == now


@given(max_restarts, within, gaps, st.integers(min_value=1, max_value=10))
def test_allows_counts_what_add_would_decide_one_at_a_time(
    max_r: int, period: float, steps: list[float], count: int
) -> None:
    times = list(accumulate(steps))
    intensity, _ = run(RestartIntensity(max_r, period), times[:-1])
    now = times[-1]
    _, decisions = run(intensity, [now] * count)
    assert intensity.allows(now, count) == all(decisions)
