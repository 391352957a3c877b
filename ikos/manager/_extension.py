"""The contract between ikosd and the services that extend it.

ikosd's core is the supervision tree's host: it starts processes, watches
them and records their transitions. Everything else it offers (the service
registry, daemons created at run time, metrics, and the IPC broker, the
resource sampler and Ray placement to come) is an
:class:`Extension`: an object with a life (``start``, ``stop``) and hooks the
manager calls, that sees the tree only through a read-only
:class:`TreeView`, changes it only through :class:`Operations` (which go
through the supervisors' command queues, so a service can never interleave
with a restart), and adds control verbs through a :class:`VerbRegistry`.

The hooks are plain methods of the :class:`Extension` base class with empty
defaults, called in the order the extensions were started (``stop`` in
reverse). A hook that raises is logged and never breaks the tree or another
extension.

Rejected: letting services reach into the manager (``manager.nodes``,
``sup.children.append``), which is what the first services did. It made the
manager's internals their API: a service could add a child behind its
supervisor's queue, and the manager could not change without breaking them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ikos.platform._paths import InstancePaths
from ikos.supervision._runtime import ExitReason, Running, State, WorkerNode
from ikos.supervision._spec import AnySpec, Supervisor

if TYPE_CHECKING:
    from ikos.actors._stats import ActorFigures
    from ikos.registry._health import HealthCheck
    from ikos.registry._service import ServiceInfo

#: Who may call a control verb: anyone (names and states only), the owner,
#: root and the configured readers, or the owner and root.
Access = Literal["public", "private", "control"]


class Config:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """What ikosd runs: the tree, and what the configuration file declares beside it.

    ``services`` and ``health`` are the services each daemon offers and its
    health checks, by daemon name (``[actors.NAME.service]``,
    ``[[executables.NAME.health]]``); ``warnings`` the unknown keys of the
    file, for whoever loaded it to show. Nothing compares, hashes or changes it: a
    reload makes a new one.
    """

    __slots__ = ("file", "health", "reader_group", "services", "tree", "warnings")

    def __init__(
        self,
        tree: Supervisor,
        file: Path | None = None,
        services: Mapping[str, tuple[ServiceInfo, ...]] | None = None,
        health: Mapping[str, tuple[HealthCheck, ...]] | None = None,
        warnings: tuple[str, ...] = (),
        reader_group: str | None = None,
    ) -> None:
        self.tree = tree
        self.file = file
        self.services: Mapping[str, tuple[ServiceInfo, ...]] = {} if services is None else services
        self.health: Mapping[str, tuple[HealthCheck, ...]] = {} if health is None else health
        self.warnings = warnings
        #: ``[control] readers``: the group whose members may read private verbs.
        self.reader_group = reader_group


#: Reads the configuration again (``ikosctl reload-config``, SIGHUP).
ConfigSource = Callable[[], Config]


class NodeView(Protocol):
    """A node of the running tree, read-only."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def state(self) -> State: ...

    @property
    def spec(self) -> AnySpec: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def restarts(self) -> int: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def last_exit(self) -> ExitReason | None: ...

    @property
    def successor_pid(self) -> int | None: ...

    @property
    def parent(self) -> NodeView | None: ...

    @property
    def alive(self) -> bool: ...


class TreeView(Protocol):
    """What a service may read of the manager: the instance, the tree and its nodes."""

    @property
    def paths(self) -> InstancePaths: ...

    @property
    def tree(self) -> Supervisor:
        """The tree's current specification (the configuration with run-time changes)."""

    @property
    def config(self) -> Config:
        """The configuration last loaded (at start or by the last reload)."""

    def node(self, name: str) -> NodeView:
        """The node called ``name``; :class:`~ikos._errors.NoSuchDaemon` if none."""

    def find(self, name: str) -> NodeView | None:
        """The node called ``name``, or None."""

    def walk(self) -> Iterator[NodeView]:
        """Every node, the root first, in start order."""

    def worker_of_pid(self, pid: int) -> NodeView | None:
        """The actor or executable whose current process is ``pid`` (starting or running)."""

    def status_of(self, node: NodeView) -> dict[str, Any]:
        """A node's status object, as the control protocol gives it."""

    @property
    def started_at(self) -> float:
        """When ikosd started (Unix time)."""

    def health(self) -> dict[str, Any]:
        """ikosd's own health: its state store, fork server and reaper."""

    @property
    def dead_letters(self) -> Mapping[str, int]:
        """Messages sent to each actor while it was not there."""

    def actor_figures(self, name: str) -> ActorFigures | None:
        """The counters of actor ``name``'s running process (from any thread), if any."""


class Operations(Protocol):
    """What a service may ask the manager to do; each goes through the supervisors' queues."""

    async def start(self, name: str) -> dict[str, Any]: ...

    async def stop(self, name: str) -> dict[str, Any]: ...

    async def restart(self, name: str) -> dict[str, Any]: ...

    async def fail(self, name: str, reason: str) -> None:
        """Stop a running daemon as a failure: its supervisor restarts it by its rules."""

    async def add_child(self, spec: AnySpec, supervisor: str | None, *, start: bool) -> NodeView:
        """Add a child to a supervisor (default the root); if it fails to start it is not kept."""

    async def update_child(self, name: str, spec: AnySpec, *, restart: bool) -> NodeView:
        """Give a child a new spec, restarting it if ``restart`` and it is active."""

    async def remove_child(self, name: str) -> None:
        """Stop a child and remove it from the tree."""


Handler = Callable[[Any], Awaitable[Any]]


class VerbRegistry(Protocol):
    """Where services add control verbs (``docs/protocol.md``)."""

    def register(self, verb: str, access: Access, handler: Handler) -> None: ...


class Spawner(Protocol):
    """Starts the processes of one kind of child (actors, executables, Ray actors...).

    The manager picks the spawner by the node's kind; ``adopt`` takes over a
    process that a previous ikosd started (``fds`` are the descriptors the
    keeper held for it); ``retire`` releases what the spawner keeps for a
    node that will not run again until started explicitly.
    """

    async def start(self) -> None: ...

    def close(self) -> None: ...

    async def spawn(self, node: WorkerNode) -> Running: ...

    def adopt(self, node: WorkerNode, pid: int, sid: int, fds: dict[str, int]) -> Running: ...

    def retire(self, node: WorkerNode) -> None: ...

    def exited(self, node: WorkerNode) -> None: ...

    def decorate_status(self, node: WorkerNode, status: dict[str, Any]) -> None: ...


class ExtensionHost:  # a plain class, as Config
    """What an extension gets when it starts."""

    __slots__ = ("ops", "verbs", "view")

    def __init__(self, view: TreeView, ops: Operations, verbs: VerbRegistry) -> None:
        self.view = view
        self.ops = ops
        self.verbs = verbs


class Extension:
    """A service of ikosd; override the hooks it needs (all default to doing nothing).

    Order of calls: :meth:`start` (before the root supervisor starts, so that
    a service sees every transition; the view's tree is then the
    configuration's), :meth:`amend_tree` (once every extension started, before
    the tree starts, and again for every reload), then :meth:`on_transition`
    and :meth:`decorate_status` while ikosd runs, :meth:`before_stop` before each
    orderly stop of a worker, :meth:`on_reload` after a
    configuration reload was applied, and :meth:`stop` once every daemon has
    stopped.
    """

    #: A short name, for logs.
    name = "extension"

    #: Root children this extension adds (in :meth:`amend_tree`) that the others may need
    #: from their first instant, as every actor needs the IPC broker: they start in a
    #: wave of their own, before the other children of the root, and so stop after them.
    leading: tuple[str, ...] = ()

    async def start(self, host: ExtensionHost) -> None:
        """Begin: register verbs, open stores, start tasks."""

    async def stop(self) -> None:
        """End: every daemon has stopped; release what the service holds."""

    def amend_tree(self, tree: Supervisor, *, at_start: bool) -> Supervisor:
        """The tree to run, given the configuration's: add or change children here.

        Called after :meth:`start` with ``at_start`` true, and for every
        reload with it false (raise :class:`~ikos._errors.IkosError` to refuse
        the reload). The default returns ``tree`` unchanged.
        """
        return tree

    def on_transition(self, node: NodeView, old: State, new: State, why: str) -> None:
        """A daemon changed state (called synchronously: do not block)."""

    def decorate_status(self, node: NodeView, status: dict[str, Any]) -> None:
        """Add fields to a node's status object."""

    async def before_stop(self, node: NodeView) -> None:
        """An actor or executable is about to get its stop signal (its state is ``stopping``).

        Its supervisor waits for this (the monitor service lets the Downs on
        their way to a watcher arrive first): return soon, and bound any wait.
        """

    def on_upgrade(self, node: NodeView, old_pid: int) -> None:
        """A hot code upgrade replaced actor ``node``'s process ``old_pid`` (now gone) by
        ``node.pid``: no transition, the daemon ran throughout (called synchronously)."""

    async def on_reload(self, config: Config) -> None:
        """A reloaded configuration was applied (the tree already runs it)."""

    def ready_note(self) -> str | None:
        """A few words for ikosd's ready line (``metrics http://...``), if any."""
        return None
