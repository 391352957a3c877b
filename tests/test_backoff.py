"""Back-off delays: Akka's formula, its cap, its jitter and its automatic reset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ikos.supervision._backoff import BackoffState, backoff_delay
from ikos.supervision._spec import Backoff

counts = st.integers(min_value=0, max_value=2000)
mins = st.floats(min_value=1e-3, max_value=10.0)
factors = st.floats(min_value=0.0, max_value=2.0)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def test_doubles_from_min_up_to_max() -> None:
    delays = [backoff_delay(n, 0.5, 10.0, 0.0, 0.0) for n in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_scales_the_capped_delay() -> None:
    assert backoff_delay(1, 1.0, 10.0, 0.5, 0.5) == pytest.approx(2.5)
    assert backoff_delay(9, 1.0, 10.0, 0.5, 0.5) == pytest.approx(12.5)


@pytest.mark.parametrize("count", [1023, 1024, 1075, 10**6, 2**64, 10**100])
def test_huge_counts_give_the_capped_value(count: int) -> None:
    assert backoff_delay(count, 0.1, 30.0, 0.2, 0.5) == pytest.approx(33.0)


def test_tiny_min_does_not_hit_the_cap_early() -> None:
    assert backoff_delay(1100, 1e-320, 1e300, 0.0, 0.0) < 1e300


@pytest.mark.parametrize(("count", "u"), [(-1, 0.0), (0, 1.0), (0, -0.1)])
def test_rejects_out_of_range_inputs(count: int, u: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(count, 0.1, 1.0, 0.2, u)


@given(counts, mins, st.floats(min_value=0.0, max_value=1000.0), factors, draws)
def test_delay_lies_between_the_capped_value_and_its_jitter(
    n: int, lo: float, extra: float, rf: float, u: float
) -> None:
    hi = lo + extra
    base = hi if n > 1000 else min(hi, lo * 2**n)
    delay = backoff_delay(n, lo, hi, rf, u)
    assert base <= delay <= base * (1 + rf)


@given(st.integers(min_value=0, max_value=200), mins, factors, draws)
def test_equals_akkas_formula(n: int, lo: float, rf: float, u: float) -> None:
    hi = lo * 1000
    assert backoff_delay(n, lo, hi, rf, u) == min(hi, lo * 2**n) * (1 + u * rf)


@given(counts, mins, st.floats(min_value=0.0, max_value=1000.0), factors, draws)
def test_monotone_in_the_count_for_a_fixed_draw(
    n: int, lo: float, extra: float, rf: float, u: float
) -> None:
    hi = lo + extra
    assert backoff_delay(n, lo, hi, rf, u) <= backoff_delay(n + 1, lo, hi, rf, u)


SPEC = Backoff(min=1.0, max=60.0, random_factor=0.0, reset_after=10.0)


def test_quick_crashes_double_the_delay() -> None:
    state, delays = BackoffState(), []
    now = 0.0
    for _ in range(5):
        state = state.started(now)
        now += 0.5  # crashes half a second after each start
        state, delay = state.next_delay(SPEC, now, 0.0)
        delays.append(delay)
        now += delay
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert state.count == 5


def test_started_keeps_the_count_and_next_delay_clears_the_start() -> None:
    state = BackoffState(count=3).started(7.0)
    assert state == BackoffState(3, 7.0)
    state, _ = state.next_delay(SPEC, 8.0, 0.0)
    assert state == BackoffState(4, None)


def test_reset_period_defaults_to_min() -> None:
    spec = Backoff(min=2.0, max=60.0, random_factor=0.0)
    _, delay = BackoffState(count=4, last_start=0.0).next_delay(spec, 2.0, 0.0)
    assert delay == 2.0


@given(st.integers(min_value=0, max_value=50), st.floats(min_value=0.0, max_value=1e6), draws)
def test_count_resets_after_a_stable_period(count: int, start: float, u: float) -> None:
    state = BackoffState(count=count).started(start)
    after, delay = state.next_delay(SPEC, start + SPEC.reset_period + 1.0, u)
    assert after.count == 1
    assert delay == backoff_delay(0, SPEC.min, SPEC.max, SPEC.random_factor, u)


@given(
    st.integers(min_value=0, max_value=50),
    st.floats(min_value=0.0, max_value=1e6),
    st.floats(min_value=0.0, max_value=9.0),
    draws,
)
def test_count_grows_while_the_child_is_unstable(
    count: int, start: float, ran: float, u: float
) -> None:
    state = BackoffState(count=count).started(start)
    after, delay = state.next_delay(SPEC, start + ran, u)
    assert after.count == count + 1
    assert delay == backoff_delay(count, SPEC.min, SPEC.max, SPEC.random_factor, u)
