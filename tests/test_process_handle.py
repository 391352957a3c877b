"""ProcessHandle: what a watched process leaves behind once it is reaped."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

from ikos.platform._process import ProcessHandle


class Owner:
    """Stands for an ExecHandle: it holds the process handle, whose hook is its method."""

    def __init__(self, proc: ProcessHandle) -> None:
        self.proc = proc
        self.reaped_hooks = 0
        proc.before_reap = self.before_reap

    def before_reap(self) -> None:
        self.reaped_hooks += 1


def test_a_reaped_handle_and_its_owner_are_freed_without_the_cycle_collector() -> None:
    # A stop of 500 daemons once left 500 such pairs (with their plans, futures and
    # status) to the cyclic collector, which ran too seldom: across stop/start cycles
    # they held megabytes, and the arenas they filled stayed (docs/performance.md).
    async def scenario() -> tuple[weakref.ref[Owner], int]:
        pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
        owner = Owner(ProcessHandle(pid))
        await asyncio.wait_for(owner.proc.exited, 30)
        ref = weakref.ref(owner)
        hooks = owner.reaped_hooks
        del owner
        return ref, hooks

    gc.collect()
    gc.disable()
    try:
        ref, hooks = asyncio.run(scenario())
        assert hooks == 1  # the hook did run before the reap
        assert ref() is None  # freed by reference counting alone
    finally:
        gc.enable()
