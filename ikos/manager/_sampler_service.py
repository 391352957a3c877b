"""The sampler service: daemons' resource usage, in their status and in ``/metrics``.

Every ``[monitor] interval`` seconds it takes the running daemons' main pids
from the manager's own table (on the loop: a few attribute reads per
daemon) and hands them to a :class:`~ikos.monitor._sampler.Sampler` on a
worker thread, which reads ``/proc``; the event loop never waits on a
pass. The latest usage per daemon is replaced whole when a pass ends, so
``status`` (on the loop) and a scrape (in the HTTP thread) read it without a
lock; both show a daemon's usage only while the pid it was taken from is
still the daemon's, so a stopped or restarted daemon never shows the figures
of its previous run.

Also exports ikosd's own process metrics (prometheus_client's
``ProcessCollector``, as ``ikos_manager_process_*``) when the endpoint does
not have them yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ikos._errors import IkosError
from ikos.manager._extension import Config, Extension, ExtensionHost, NodeView, TreeView
from ikos.manager._settings import MonitorSettings, read_monitor_settings
from ikos.monitor._sampler import Sampler, Target, Usage, UsageCollector
from ikos.supervision._runtime import State

log = logging.getLogger("ikos.sampler")

#: seconds from a daemon's start to the pass that samples it (starts in between share it)
SOON = 0.5


class SamplerService(Extension):
    """Samples every running daemon's processes; see the module docstring."""

    name = "sampler"

    def __init__(self, metrics: Any = None) -> None:
        #: the MetricsService whose endpoint gets the usage collector, if any
        self._metrics = metrics
        self._view: TreeView | None = None
        self.settings = MonitorSettings()
        self.sampler = Sampler(uss=self.settings.uss, uss_every=self.settings.uss_every)
        #: the latest usage by daemon name (replaced whole by each pass)
        self.latest: dict[str, Usage] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._soon: asyncio.TimerHandle | None = None
        #: called on the loop with each pass's usage by daemon (the alert service's feed)
        self.listeners: list[Callable[[Mapping[str, Usage]], None]] = []

    async def start(self, host: ExtensionHost) -> None:
        self._view = host.view
        self._apply(self._read(host.view.config))
        if self._metrics is not None:
            from prometheus_client import ProcessCollector  # with the metrics only

            self._metrics.endpoint.add(UsageCollector(self.current))
            with contextlib.suppress(ValueError):  # already there: the endpoint has its own
                self._metrics.endpoint.add(
                    ProcessCollector(namespace="ikos_manager", registry=None)
                )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sampler")

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        # A daemon that just started is sampled within SOON seconds, not at the
        # next interval: `ikosctl top` right after ikosd is ready (or a restart)
        # showed dashes for up to 5 s. One pass for every start in that time.
        started = new is State.RUNNING and node.kind != "supervisor"
        if started and self._task is not None and self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(SOON, self._sample_soon)

    def _sample_soon(self) -> None:
        self._soon = None
        self._wake.set()

    async def stop(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._task is not None:
            # The flag, not only the cancellation: Python 3.11's wait_for returned the
            # wake-up's result and dropped a cancellation that came in the same turn
            # as a wake-up (a daemon's start sampled "soon"), and the loop went on:
            # ikosd then stopped its tree and hung here (seen in the suite).
            self._stopping = True
            self._wake.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def on_reload(self, config: Config) -> None:
        try:
            self._apply(self._read(config))
        except IkosError as exc:  # load_config refused the file before this: not expected
            log.warning("sampler: [monitor] kept as it was: %s", exc)
        self._wake.set()

    def _read(self, config: Config) -> MonitorSettings:
        settings, _warnings = read_monitor_settings(config.file)  # warnings: load_config's
        return settings

    def _apply(self, settings: MonitorSettings) -> None:
        self.sampler.uss, self.sampler.uss_every = settings.uss, settings.uss_every
        self.settings = settings

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.sample_once()
            except Exception:  # a bug in a pass must not end sampling for good
                log.exception("sampler: a pass failed")
            if self._stopping:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.interval):  # keeps a cancellation
                    await self._wake.wait()

    async def sample_once(self) -> None:
        """One pass: the running daemons' pids here, their processes read on a worker thread."""
        targets = list(self._targets())
        self.latest = await asyncio.to_thread(self.sampler.sample, targets)
        for listener in list(self.listeners):
            try:
                listener(self.latest)
            except Exception:  # a listener's bug must not end sampling
                log.exception("sampler: a listener failed")

    def _targets(self) -> Iterator[Target]:
        assert self._view is not None
        for node in self._view.walk():
            if node.kind != "supervisor" and node.pid is not None and _active(node):
                if getattr(node.spec, "placement", None) is not None:
                    continue  # a Ray actor's pid is on its node, maybe another machine
                yield Target(node.name, node.pid)

    def usage_of(self, node: NodeView) -> Usage | None:
        """The latest usage of ``node``, if it was taken from the process it runs now."""
        usage = self.latest.get(node.name)
        if usage is None or usage.pid != node.pid or not _active(node):
            return None
        return usage

    def current(self) -> Iterator[tuple[str, Usage]]:
        """The latest usage of each daemon that runs now (for the collector)."""
        view = self._view
        if view is None:
            return
        latest = self.latest
        for name in list(latest):
            node = view.find(name)
            usage = self.usage_of(node) if node is not None else None
            if usage is not None:
                yield name, usage

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        usage = self.usage_of(node)
        if usage is not None:
            status["usage"] = usage.to_json()


def _active(node: NodeView) -> bool:
    return node.state in (State.STARTING, State.RUNNING, State.STOPPING)
