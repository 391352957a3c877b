"""The monitor service: ``monitor``/``demonitor`` verbs, and a ``Down`` per stop to each watcher.

An actor's :meth:`~ikos.Actor.monitor` asks the manager, through the control
socket, to be told when a daemon stops; the manager sees every stop (the
tree's state transitions), so it is the one that tells. Monitors are kept
here, per watched name, by watcher *incarnation*: the watcher is known by the
pid of the process that called (SO_PEERCRED), checked to be the actor it
claims to be, and its monitors go when that process ends (a restarted
watcher sets them again in ``on_start``). A monitor is on a name, so it
stays armed across the watched daemon's restarts: every time a process of
that name ends (a transition from starting, running or stopping to stopped
or failed), each watcher gets one :class:`~ikos.actors._monitor.Down` whose
reason :func:`stop_reason` reads from the exit and from who stopped it.

Delivery never runs on the loop. Each watcher incarnation has a
:class:`_Outbox`: a bounded FIFO that a small thread pool drains, one
delivery at a time per watcher (so Downs keep their order) and several
watchers at once (so a busy watcher delays only its own). A Down is handed
over as an *ask*, so that a delivery is over only once the watcher's
``receive`` handled it. That is what lets a stop wait for it: before a
watcher is signalled to stop (:meth:`MonitorService.before_stop`, called by
the supervision runtime for every orderly stop, ikosd's shutdown included),
the stop waits, at most :data:`SETTLE_TIMEOUT`, for the Downs already on
their way to it. At shutdown the daemons stop in reverse start order, so a
watcher started before the daemon it watches still gets its Down; a watcher
stopped first gets nothing more, and nothing is left behind. An ask not
answered in time (a busy watcher) frees its thread, and the same Down is
tried again after a back-off, until it is confirmed or the watcher's
incarnation ends. A full outbox drops the newest Down, counted and logged
once per watcher.

Rejected: telling from the loop (a watcher with a full mailbox would stall
every restart); a plain ``tell`` (it returns once the bytes are in a socket
buffer, and an actor told to stop drops what it has not handled yet, so a
Down at shutdown would be lost most of the time); a control-socket stream
per watching actor (one privileged connection each, out of ikosctl's pool,
and one more thread in every watcher).

A Down in flight at the instant its watcher crashes could be taken by the
watcher's next incarnation from the mailbox socket (which outlives
incarnations), if the loop has not yet seen the crash when the delivery
starts: each goes :class:`~ikos.actors._monitor.Addressed` to the watcher's
pid, and only that process can unpickle it (the next one answers the ask
with an error, counted as lost). It is also numbered in the watcher's
sequence, and a copy of one already taken is refused the same way, which
is what makes trying again safe.

The monitors are saved in ``STATE/monitors.json`` (in a thread, coalesced)
with each watcher's pid and process start time: after a crash of ikosd,
the next one gives them back to each actor it adopts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ikos._errors import (
    ActorCrashed,
    ActorDeadError,
    ActorError,
    AskTimeout,
    IkosError,
    MailboxFull,
    ManagerError,
    PermissionDenied,
)
from ikos.manager._control_server import BadRequest
from ikos.manager._extension import Extension, ExtensionHost, NodeView, TreeView
from ikos.platform._database import write_durably
from ikos.platform._process import proc_info
from ikos.supervision._runtime import ExitReason, State
from ikos.supervision._spec import Supervisor

if TYPE_CHECKING:
    from ikos.actors._monitor import Down
    from ikos.actors._ref import ActorRef

log = logging.getLogger("ikos.monitors")

#: Names one watcher incarnation may monitor at once.
MAX_MONITORS: Final = 1000
#: Downs waiting for one watcher before newer ones are dropped.
OUTBOX_SIZE: Final = 1000
#: Seconds a delivery (an ask) waits for the watcher to take and handle its Down;
#: past it the Down is tried again, after RETRY_MIN doubling up to RETRY_MAX seconds.
DELIVERY_TIMEOUT: Final = 2.0
RETRY_MIN: Final = 0.25
RETRY_MAX: Final = 10.0
#: Seconds the stop of a watcher waits for the Downs on their way to it.
SETTLE_TIMEOUT: Final = 2.0
#: Seconds the verbs wait for a starting watcher's process to be known as it.
IDENTIFY_TIMEOUT: Final = 2.0
#: Threads delivering Downs (each to one watcher at a time).
SENDERS: Final = 4
#: The file in the state directory that keeps the monitors for the next ikosd.
SAVED_FILE: Final = "monitors.json"

#: States with a process: leaving them for one of :data:`_GONE` is a stop.
_ALIVE: Final = frozenset({State.STARTING, State.RUNNING, State.STOPPING})
_GONE: Final = frozenset({State.STOPPED, State.FAILED})
#: ``why`` of the supervision runtime's stops that an operator asked for, and their word;
#: every other stop by a supervisor (shutdown, a sibling's restart, a reload) is "shutdown".
_BY_OPERATOR: Final = {"stopped by request": "stopped", "restart requested": "restarted"}


def stop_reason(exit: ExitReason | None, stopped_by: str | None) -> tuple[str, str]:
    """``(reason, detail)`` of a :class:`Down` for a process that ended.

    ``exit`` is its exit (None if none was recorded); ``stopped_by`` the why
    of its supervisor's stop (``"stopped by request"``, ``"ikosd shutting
    down"``...), or None when it ended on its own.

    >>> from ikos.supervision._runtime import ExitReason
    >>> stop_reason(ExitReason("killed by SIGKILL", signal=9), None)
    ('killed', 'killed by SIGKILL')
    >>> stop_reason(ExitReason("exited normally", code=0), "stopped by request")
    ('stopped', 'stopped by request: exited normally')
    """
    if exit is not None and exit.failure:
        return "failed", exit.reason
    if stopped_by is not None:
        word = _BY_OPERATOR.get(stopped_by, "shutdown")
        return word, f"{stopped_by}: {exit.reason}" if exit is not None else stopped_by
    if exit is None:
        return "crashed", "ended without an exit status"
    if exit.signal is not None:
        return "killed", exit.reason
    if exit.code == 0:
        return "normal", exit.reason
    return "crashed", exit.reason


def read_saved(path: Path) -> dict[str, tuple[int, int, list[str]]]:
    """The monitors a previous ikosd saved: watcher -> (pid, start ticks, targets).

    Anything malformed is left out (and said once): the file is ikosd's own,
    but a damaged one must not stop ikosd from starting.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("monitors: %s is unreadable (%s): none adopted", path, exc)
        return {}
    out: dict[str, tuple[int, int, list[str]]] = {}
    if not isinstance(data, dict):
        data = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            continue
        pid, start, targets = entry.get("pid"), entry.get("start"), entry.get("targets")
        if (
            isinstance(pid, int)
            and isinstance(start, int)
            and isinstance(targets, list)
            and all(isinstance(t, str) for t in targets)
        ):
            out[name] = (pid, start, targets)
    if len(out) != len(data):
        log.warning("monitors: %d malformed entries of %s left out", len(data) - len(out), path)
    return out


def write_saved(path: Path, saved: dict[str, Any]) -> None:
    """Replace ``path`` with ``saved`` as JSON, durably (a crash leaves the old or the new)."""
    write_durably(path, json.dumps(saved))


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks), what tells its incarnation apart."""
    info = proc_info(pid)
    return info.start_ticks if info is not None else None


class _Outbox:
    """The Downs on their way to one watcher incarnation, and what it monitors.

    ``queue``, ``sending`` and ``open`` are shared with the sender threads
    under ``lock``; everything else belongs to the loop.
    """

    def __init__(self, name: str, pid: int, start: int | None) -> None:
        #: the watcher, its process and that process's start time (clock ticks):
        #: what identifies the incarnation in the saved monitors
        self.name, self.pid, self.start = name, pid, start
        self.targets: set[str] = set()
        self.lock = threading.Lock()
        #: (number in this watcher's sequence, Down), oldest first
        self.queue: deque[tuple[int, Down]] = deque()
        self.numbered = 0
        self.sending = False
        self.open = True
        self.dropped = 0
        #: deliveries of the first Down that were not confirmed, and the next try's timer
        self.attempts = 0
        self.retry: asyncio.TimerHandle | None = None
        #: set while nothing is queued or being delivered (loop side)
        self.idle = asyncio.Event()
        self.idle.set()


class MonitorService(Extension):
    """Serves ``monitor``/``demonitor`` and delivers Downs; see the module docstring."""

    name = "monitors"

    def __init__(self) -> None:
        self._view: TreeView | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: the outbox of each watcher's current incarnation, by watcher name
        self._outboxes: dict[str, _Outbox] = {}
        #: watched name -> the outboxes of its watchers (insertion order: delivery order)
        self._watchers: dict[str, dict[str, _Outbox]] = {}
        #: the outboxes of upgrade successors not yet in charge (see on_upgrade)
        self._successors: dict[str, _Outbox] = {}
        #: why each daemon being stopped by its supervisor is stopped
        self._stopping: dict[str, str] = {}
        #: the pid of each daemon's last process seen running
        self._pids: dict[str, int] = {}
        #: where the monitors are saved, and those read there for actors to adopt
        self._file: Path | None = None
        self._saved: dict[str, tuple[int, int, list[str]]] = {}
        self._saving: asyncio.Task[None] | None = None
        self._changed = False
        #: Downs received by their watcher, and lost (outbox full, watcher gone)
        self.delivered = 0
        self.lost = 0
        self._counting = threading.Lock()  # the sender threads count too

    # -- life ---------------------------------------------------------------------------

    async def start(self, host: ExtensionHost) -> None:
        self._view = host.view
        self._loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(SENDERS, thread_name_prefix="ikos-down")
        self._file = host.view.paths.state_dir / SAVED_FILE
        self._saved = read_saved(self._file)
        host.verbs.register("monitor", "control", self._verb_monitor)
        host.verbs.register("demonitor", "control", self._verb_demonitor)

    def amend_tree(self, tree: Supervisor, *, at_start: bool) -> Supervisor:
        # saved monitors of actors no longer in the tree would be written back forever
        names = {spec.name for _, spec in tree.walk()}
        for name in [n for n in self._saved if n not in names]:
            del self._saved[name]
        return tree

    async def stop(self) -> None:
        # The saved monitors stay as they are: after an orderly shutdown every
        # watcher's stop already removed its own, and when ikosd abandons its
        # daemons (a bug of its own) the next ikosd adopts them with theirs.
        for outbox in self._outboxes.values():
            self._halt(outbox)
        if self._saving is not None:
            with contextlib.suppress(Exception):
                await self._saving
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # a delivery in flight ends within DELIVERY_TIMEOUT; every watcher is gone by now
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    # -- stops ----------------------------------------------------------------------------

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        if node.kind == "supervisor":
            return
        name = node.name
        if new is not State.STARTING:  # an adopted actor goes starting -> running
            saved = self._saved.pop(name, None)
            if saved is not None and new is State.RUNNING:
                self._adopt(node, *saved)
        if new is State.RUNNING and node.pid is not None:
            self._pids[name] = node.pid
        elif new is State.STOPPING:
            self._stopping[name] = why
        if old not in _ALIVE or new not in _GONE:
            return
        stopped_by = self._stopping.pop(name, None)
        pid = self._pids.pop(name, None)
        # the watcher's incarnation ended: its monitors and its Downs in flight go with it
        outbox = self._outboxes.get(name)
        if outbox is not None:
            self._close(outbox)
        watchers = self._watchers.get(name)
        if watchers:
            from ikos.actors._monitor import Down  # with the first monitor (actors only)

            reason, detail = stop_reason(node.last_exit, stopped_by)
            down = Down(name, reason, detail, pid)
            for watcher in list(watchers.values()):
                self._post(watcher, down)

    async def before_stop(self, node: NodeView) -> None:
        """Let the Downs on their way to ``node`` (a watcher being stopped) arrive first."""
        outbox = self._outboxes.get(node.name)
        if outbox is None or outbox.idle.is_set():
            return
        try:
            await asyncio.wait_for(outbox.idle.wait(), SETTLE_TIMEOUT)
        except TimeoutError:
            log.warning(
                "monitors: %s is being stopped with Downs not yet handled after %g s",
                node.name,
                SETTLE_TIMEOUT,
            )

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        outbox = self._outboxes.get(node.name)
        if outbox is not None and outbox.targets:
            status["monitors"] = sorted(outbox.targets)

    # -- the verbs --------------------------------------------------------------------------

    async def _verb_monitor(self, req: Any) -> Any:
        target = req.text("name")
        outbox = await self._identify(req)
        view = self._view
        assert view is not None
        node = view.node(target)  # NoSuchDaemon names it
        if node.kind == "supervisor":
            raise BadRequest(f"'{target}' is a supervisor: monitor its actors and executables")
        if target == outbox.name:
            raise BadRequest(f"actor '{target}' cannot monitor itself")
        if target not in outbox.targets:
            if len(outbox.targets) >= MAX_MONITORS:
                raise ManagerError(
                    f"actor '{outbox.name}' already has {MAX_MONITORS} monitors", "limit"
                )
            if self._successors.get(outbox.name) is outbox:
                outbox.targets.add(target)  # armed when it takes over (on_upgrade)
                return {"name": target, "state": node.state.value}
            self._watch(outbox, target)
        if node.state not in _ALIVE:
            from ikos.actors._monitor import Down

            self._post(outbox, Down(target, "noproc", f"{target} is {node.state.value}"))
        return {"name": target, "state": node.state.value}

    async def _verb_demonitor(self, req: Any) -> Any:
        target = req.text("name")
        outbox = await self._identify(req)
        self._forget(outbox, target)
        self._save()
        with outbox.lock:
            kept = [item for item in outbox.queue if item[1].name != target]
            outbox.queue.clear()
            outbox.queue.extend(kept)
        return {}

    async def _identify(self, req: Any) -> _Outbox:
        """The outbox of the calling actor's incarnation, made on its first call.

        The caller names itself (``watcher``) and must be that actor's
        process: its pid (SO_PEERCRED) is checked against the node's. An
        actor calling from ``on_start`` may be known by its pid a moment
        after it runs, so a starting one is waited for a little.
        """
        view, loop = self._view, self._loop
        assert view is not None and loop is not None
        watcher = req.text("watcher")
        node = view.find(watcher)
        if node is None or node.kind != "actor":
            raise BadRequest(f"'{req.verb}' is for actors, and '{watcher}' is no actor of the tree")
        deadline = loop.time() + IDENTIFY_TIMEOUT
        while node.pid != req.pid:
            successor = node.successor_pid
            if successor == req.pid:
                return self._successor_outbox(watcher, req.pid)
            if (node.state is not State.STARTING and successor != 0) or loop.time() > deadline:
                raise PermissionDenied(
                    f"'{req.verb}': pid {req.pid} is not actor '{watcher}' "
                    f"(whose pid is {node.pid})"
                )
            await asyncio.sleep(0.01)
        outbox = self._outboxes.get(watcher)
        if outbox is None or outbox.pid != req.pid:
            if outbox is not None:
                self._close(outbox)
            outbox = self._outboxes[watcher] = _Outbox(watcher, req.pid, _start_ticks(req.pid))
        return outbox

    def _successor_outbox(self, watcher: str, pid: int) -> _Outbox:
        """The outbox of a hot code upgrade's successor, whose ``on_start`` runs while the
        old incarnation still serves: its monitors wait apart (no Down goes to it) until
        it takes over (:meth:`on_upgrade`); a failed upgrade leaves them unused."""
        outbox = self._successors.get(watcher)
        if outbox is None or outbox.pid != pid:
            outbox = self._successors[watcher] = _Outbox(watcher, pid, _start_ticks(pid))
        return outbox

    def on_upgrade(self, node: NodeView, old_pid: int) -> None:
        """A hot code upgrade: the actor's state, so its monitors, go on in the new process.

        The old incarnation's monitors are re-addressed to the new pid (Downs on their
        way included: they are addressed when sent), joined by those the successor's
        ``on_start`` set; an upgraded watched daemon is known by its new pid.
        """
        name, pid = node.name, node.pid
        if pid is None:
            return
        if name in self._pids:
            self._pids[name] = pid
        pending = self._successors.pop(name, None)
        outbox = self._outboxes.get(name)
        if outbox is not None and outbox.pid == old_pid:
            start = _start_ticks(pid)
            with outbox.lock:
                outbox.pid = pid
                outbox.start = start
        elif pending is not None and pending.pid == pid:
            outbox = self._outboxes[name] = _Outbox(name, pid, pending.start)
        else:
            return
        if pending is not None and pending.pid == pid:
            view = self._view
            for target in pending.targets - outbox.targets:
                self._watch(outbox, target)
                watched = view.find(target) if view is not None else None
                if watched is None or watched.state not in _ALIVE:
                    from ikos.actors._monitor import Down

                    state = watched.state.value if watched is not None else "gone"
                    self._post(outbox, Down(target, "noproc", f"{target} is {state}"))
        self._save()

    def _adopt(self, node: NodeView, pid: int, start: int, targets: list[str]) -> None:
        """Give an actor the monitors saved by the ikosd before, if it is the same process."""
        info = proc_info(pid)
        if node.pid != pid or info is None or info.start_ticks != start:
            return  # a new incarnation: it sets its own in on_start
        outbox = self._outboxes[node.name] = _Outbox(node.name, pid, start)
        for target in targets[:MAX_MONITORS]:
            self._watch(outbox, target)
        log.info("monitors: %s keeps its %d monitors (adopted)", node.name, len(outbox.targets))

    # -- bookkeeping -----------------------------------------------------------------------

    def _watch(self, outbox: _Outbox, target: str) -> None:
        outbox.targets.add(target)
        self._watchers.setdefault(target, {})[outbox.name] = outbox
        self._save()

    def _forget(self, outbox: _Outbox, target: str) -> None:
        outbox.targets.discard(target)
        watchers = self._watchers.get(target)
        if watchers is not None and watchers.get(outbox.name) is outbox:
            del watchers[outbox.name]
            if not watchers:
                del self._watchers[target]

    def _close(self, outbox: _Outbox) -> None:
        """The watcher's incarnation ended: drop its monitors and what was on its way."""
        for target in list(outbox.targets):
            self._forget(outbox, target)
        if self._outboxes.get(outbox.name) is outbox:
            del self._outboxes[outbox.name]
        self._save()
        self._halt(outbox)

    @staticmethod
    def _halt(outbox: _Outbox) -> None:
        """Deliver nothing more to ``outbox`` (its sender stops before its next Down)."""
        with outbox.lock:
            outbox.open = False
            outbox.queue.clear()
        if outbox.retry is not None:
            outbox.retry.cancel()
            outbox.retry = None
        outbox.idle.set()  # nobody waits for a watcher that is gone

    # -- surviving a crash of ikosd ------------------------------------------------------

    def _save(self) -> None:
        """Write the monitors soon, off the loop; changes while a write runs make one more."""
        self._changed = True
        if self._saving is None and self._file is not None:
            self._saving = asyncio.get_running_loop().create_task(self._write(self._file))

    async def _write(self, path: Path) -> None:
        try:
            while self._changed:
                self._changed = False
                # what the previous ikosd saved and no actor took yet is kept too,
                # for an ikosd that crashes again before adopting it
                saved = {
                    name: {"pid": pid, "start": start, "targets": targets}
                    for name, (pid, start, targets) in self._saved.items()
                }
                saved.update(
                    (o.name, {"pid": o.pid, "start": o.start, "targets": sorted(o.targets)})
                    for o in self._outboxes.values()
                    if o.targets and o.start is not None
                )
                try:
                    await asyncio.to_thread(write_saved, path, saved)
                except OSError as exc:  # kept in memory; only a crash of ikosd loses them
                    log.warning("monitors: cannot save them in %s: %s", path, exc)
        finally:
            self._saving = None

    # -- delivery --------------------------------------------------------------------------

    def _post(self, outbox: _Outbox, down: Down) -> None:
        """Queue ``down`` for its watcher (loop side); start a sender if none runs for it."""
        with outbox.lock:
            if not outbox.open:
                return
            if len(outbox.queue) >= OUTBOX_SIZE:
                if not outbox.dropped:
                    log.warning(
                        "monitors: %s does not take its Downs: dropping the newest (%d queued)",
                        outbox.name,
                        OUTBOX_SIZE,
                    )
                outbox.dropped += 1
                self._count(lost=1)
                return
            # numbers from the boot's monotonic clock: an actor adopted by the next
            # ikosd after a crash has taken numbers of this one, and must not see
            # the next one's Downs as copies of them
            outbox.numbered = max(outbox.numbered + 1, time.monotonic_ns())
            outbox.queue.append((outbox.numbered, down))
            start = not outbox.sending
            outbox.sending = True
        outbox.idle.clear()
        if start and self._pool is not None:
            self._pool.submit(self._drain, outbox)

    def _drain(self, outbox: _Outbox) -> None:
        """Deliver ``outbox``'s Downs in order until it is empty (in a sender thread).

        A delivery that is not confirmed (the watcher is busy, its mailbox
        full) is tried again later, the same Down first, without holding
        this thread in between; the watcher refuses a copy it already has.
        """
        from ikos.actors._ref import ActorRef  # with the first Down: actors only

        view, loop = self._view, self._loop
        assert view is not None and loop is not None
        ref = ActorRef(outbox.name, root=view.paths.root)
        again = False
        while True:
            with outbox.lock:
                if not outbox.open or not outbox.queue:
                    outbox.sending = False
                    break
                seq, down = outbox.queue[0]
            if not self._deliver(ref, outbox, seq, down):
                again = True
                break
            with outbox.lock:
                outbox.attempts = 0
                if outbox.queue and outbox.queue[0][0] == seq:  # demonitor may have taken it
                    outbox.queue.popleft()
        # this thread's connection to the watcher would otherwise stay open (one per
        # sender thread and watcher ever served) until its next Down, if any
        ref._drop()
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(self._retry if again else self._maybe_idle, outbox)

    def _deliver(self, ref: ActorRef, outbox: _Outbox, seq: int, down: Down) -> bool:
        """Hand ``down`` over; False when it must be tried again (not confirmed)."""
        from ikos.actors._monitor import Addressed, DuplicateDown, StaleDown

        try:
            ref.ask(Addressed(down, outbox.pid, seq), timeout=DELIVERY_TIMEOUT)
        except ActorCrashed:
            pass  # handled, and receive raised: its supervisor's business now
        except (AskTimeout, MailboxFull) as exc:
            if not outbox.attempts:
                log.warning(
                    "monitors: %s does not take its Down(%s) (%s): trying again",
                    outbox.name,
                    down.name,
                    exc,
                )
            return False
        except ActorDeadError:
            self._count(lost=1)  # the watcher ended meanwhile: its monitors go with it
            return True
        except ActorError as exc:
            # the watcher's answers to a copy it already had, or to one meant for
            # an earlier incarnation of it (the runtime names the decoding error)
            if DuplicateDown.__name__ in str(exc):
                self._count(delivered=1)
            else:
                self._count(lost=1)
                level = logging.DEBUG if StaleDown.__name__ in str(exc) else logging.WARNING
                log.log(level, "monitors: Down(%s) to %s: %s", down.name, outbox.name, exc)
            return True
        except (IkosError, OSError) as exc:
            self._count(lost=1)
            log.warning("monitors: Down(%s) to %s: %s", down.name, outbox.name, exc)
            return True
        self._count(delivered=1)
        return True

    def _retry(self, outbox: _Outbox) -> None:
        """Try ``outbox``'s first Down again after a back-off (loop side)."""
        if not outbox.open or self._loop is None:
            return
        delay = min(RETRY_MAX, RETRY_MIN * 2**outbox.attempts)
        outbox.attempts += 1
        outbox.retry = self._loop.call_later(delay, self._resume, outbox)

    def _resume(self, outbox: _Outbox) -> None:
        outbox.retry = None
        if outbox.open and self._pool is not None:
            self._pool.submit(self._drain, outbox)

    def _count(self, *, delivered: int = 0, lost: int = 0) -> None:
        with self._counting:
            self.delivered += delivered
            self.lost += lost

    def _maybe_idle(self, outbox: _Outbox) -> None:
        with outbox.lock:
            if not outbox.sending:
                outbox.idle.set()
