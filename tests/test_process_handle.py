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


def test_handles_of_spawned_processes_share_one_resolved_ready_future() -> None:
    # Per spawned executable, no future of its own for an exec already done, no
    # events list and no status buffer while it has reported nothing.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started: asyncio.Future[dict[str, object]] = loop.create_future()
        started.set_result({"event": "ready"})
        pids = [os.posix_spawn("/bin/sleep", ["sleep", "30"], dict(os.environ)) for _ in range(2)]
        handles = [ProcessHandle(pid, ready=started) for pid in pids]
        try:
            assert all(h.ready is started for h in handles)
            assert handles[0].events == () and handles[0]._status_buf is handles[1]._status_buf
            assert handles[0].exit_event() is None
        finally:
            for h in handles:
                h.kill()
            for h in handles:
                status = await asyncio.wait_for(h.exited, 30)
                assert status.signal is not None
        assert started.result() == {"event": "ready"}

    asyncio.run(scenario())


def test_a_failed_exec_is_recorded_in_the_events_made_for_it() -> None:
    async def scenario() -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
        proc = ProcessHandle(pid, status_fd=r, exec_pipe=True)
        os.write(w, b"no such file\n")
        os.close(w)
        await asyncio.wait_for(proc.exited, 30)
        assert proc.exit_event() == {"event": "exit", "reason": "exec failed: no such file"}
        assert not proc.ready.done()

    asyncio.run(scenario())
