"""The heap trimmer: one ``malloc_trim`` per burst of transitions, none when idle."""

from __future__ import annotations

import asyncio
import ctypes

import pytest

from ikos.platform import _heap
from ikos.platform._heap import HeapTrimmer

GLIBC = hasattr(ctypes.CDLL(None), "malloc_trim")


async def trims_reach(trimmer: HeapTrimmer, count: int, timeout: float = 30.0) -> None:
    """Poll until ``count`` trims ran (generous: the loop may be starved on a busy machine)."""
    async with asyncio.timeout(timeout):
        while trimmer.trims < count:
            await asyncio.sleep(0.005)


@pytest.mark.skipif(not GLIBC, reason="no malloc_trim in this C library")
def test_a_burst_of_pokes_trims_once_after_the_delay_and_idle_never() -> None:
    async def scenario() -> None:
        trimmer = HeapTrimmer(delay=0.05)
        for _ in range(100):  # a wave: 100 transitions in one turn
            trimmer.poke()
        assert trimmer.trims == 0  # not at once: after the delay
        await trims_reach(trimmer, 1)
        await asyncio.sleep(0.2)
        assert trimmer.trims == 1  # one for the whole burst, and none while idle
        trimmer.poke()  # the next burst trims again
        await trims_reach(trimmer, 2)
        trimmer.poke()
        trimmer.close()  # a pending trim is cancelled at shutdown
        await asyncio.sleep(0.2)
        assert trimmer.trims == 2

    asyncio.run(scenario())


def test_without_malloc_trim_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_heap, "_load_trim", lambda: None)

    async def scenario() -> int:
        trimmer = HeapTrimmer(delay=0.01)
        trimmer.poke()
        await asyncio.sleep(0.1)
        trimmer.poke()  # nothing to call: no timer is armed again
        assert trimmer._timer is None
        return trimmer.trims

    assert asyncio.run(scenario()) == 0
