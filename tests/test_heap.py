"""The heap trimmer: one ``malloc_trim`` per burst of transitions, none when idle."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
from pathlib import Path

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


def test_the_collector_held_for_the_start_is_frozen_and_back_on_at_release() -> None:
    import gc

    from ikos.platform._gc import hold_gc, release_gc

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        release_gc()  # never held: nothing happens
        assert gc.isenabled() and gc.get_freeze_count() == frozen
        hold_gc()
        assert not gc.isenabled()
        kept = [object() for _ in range(10)] + [[] for _ in range(10)]
        release_gc()
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + 10
        release_gc()  # once only
        assert gc.isenabled()
        # a program that turned it off itself keeps it off
        gc.disable()
        hold_gc()
        release_gc()
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
    assert kept


WATCHER = """
import gc, os, signal, sys, threading, time
from pathlib import Path
from ikos.manager import _ikosd
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths

root, tree, out = sys.argv[1:4]

def watch():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with ControlClient(InstancePaths.for_root(Path(root)), timeout=5) as client:
                client.call("status", {})
            break
        except Exception:
            time.sleep(0.02)
    Path(out).write_text(f"{gc.isenabled()} {gc.get_freeze_count()}")
    os.kill(os.getpid(), signal.SIGTERM)

assert gc.isenabled()
threading.Thread(target=watch, daemon=True).start()
sys.exit(_ikosd.main(["--root", root, "--tree", tree, "--metrics", "off"]))
"""


def test_a_real_ikosd_collects_again_once_it_answers(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("import ikos\ntree = ikos.Supervisor('root', children=[])\n")
    out = tmp_path / "gc"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            WATCHER,
            str(tmp_path / "root"),
            f"{tmp_path / 't.py'}:tree",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    enabled, frozen = out.read_text().split()
    assert enabled == "True" and int(frozen) > 10_000  # the start's objects, frozen
