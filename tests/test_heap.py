"""The heap trimmer: one ``malloc_trim`` per burst of transitions, none when idle."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

import pytest

from ikos.platform import _heap
from ikos.platform._heap import HeapTrimmer

GLIBC = ctypes.util.find_library("c") is not None and hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not GLIBC, reason="no malloc_trim in this C library")
def test_a_burst_of_pokes_trims_once_after_the_delay_and_idle_never() -> None:
    async def scenario() -> list[int]:
        trimmer = HeapTrimmer(delay=0.05)
        seen = [trimmer.trims]
        for _ in range(100):  # a wave: 100 transitions in one turn
            trimmer.poke()
        await asyncio.sleep(0.01)
        seen.append(trimmer.trims)  # not before the delay
        for _ in range(50):
            await asyncio.sleep(0.01)
            if trimmer.trims:
                break
        seen.append(trimmer.trims)
        await asyncio.sleep(0.2)
        seen.append(trimmer.trims)  # idle: no other trim
        trimmer.poke()  # the next burst trims again
        await asyncio.sleep(0.3)
        seen.append(trimmer.trims)
        trimmer.poke()
        trimmer.close()  # a pending trim is cancelled at shutdown
        await asyncio.sleep(0.2)
        seen.append(trimmer.trims)
        return seen

    assert asyncio.run(scenario()) == [0, 0, 1, 1, 2, 2]


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
