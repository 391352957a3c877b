"""ikosd's release after its tree stopped: no step may keep it from exiting.

Twice a full run saw ikosd stop its whole tree and then never exit, its
descriptor keeper still running: one step of the release (an extension's
stop, the control socket's close, the Ray bridge's) waited without end.
Each step now has a bound; past it ikosd names the step and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ikos.manager import _manager
from ikos.manager._manager import _release_step


def test_a_step_that_never_ends_is_cancelled_named_and_passed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_manager, "RELEASE_STEP_TIMEOUT", 0.2)
    cancelled = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def scenario() -> float:
        begun = time.monotonic()
        await _release_step(forever(), "the stuck extension's stop")
        spent = time.monotonic() - begun
        await asyncio.sleep(0)  # the cancellation is delivered
        return spent

    with caplog.at_level(logging.ERROR, logger="ikos.manager"):
        spent = asyncio.run(scenario())
    assert 0.15 < spent < 5.0
    assert cancelled == [True]
    assert "the stuck extension's stop did not end within 0.2 s" in caplog.text


def test_a_step_that_ignores_its_cancellation_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_manager, "RELEASE_STEP_TIMEOUT", 0.2)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # a stop that swallows its cancellation

    async def scenario() -> float:
        begun = time.monotonic()
        await _release_step(stubborn(), "the stubborn step")
        spent = time.monotonic() - begun
        release.set()  # let it end, so that asyncio.run can close the loop
        return spent

    assert asyncio.run(scenario()) < 5.0


def test_a_failing_step_is_logged_and_a_quick_one_is_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise OSError("the socket is gone")

    async def quick() -> None:
        await asyncio.sleep(0)

    async def scenario() -> None:
        await _release_step(broken(), "the control socket's close")
        await _release_step(quick(), "the quick step", 5.0)

    with caplog.at_level(logging.DEBUG, logger="ikos.manager"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["the control socket's close failed"]
    assert errors[0].exc_info is not None and "the socket is gone" in caplog.text
