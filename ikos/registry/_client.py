"""The registry as any process sees it: functions that ask the manager.

Every function here sends one request on ikosd's control socket
(``docs/protocol.md``) and turns the answer back into :class:`ServiceInfo`
values and the registry's exceptions. They work from an actor (which talks
to the instance that started it), from a plain process (``root=``, else
``$IKOS_ROOT``, else the user's default instance) and from other threads;
nothing here imports the store or SQLite, so clients stay light.

A registration belongs to the process that sends it: the manager takes the
owner's pid from the socket's peer credentials, never from the request, and
marks the service inactive when that process exits. Registering again after
a restart makes it active again.

Design: one cached :class:`~ikos.platform._control.ControlClient` per
instance, shared by the threads of the process (its calls are serialised)
and dropped after a fork; blocking waits (:func:`wait_for`) and streams
(:func:`watch`) get connections of their own so they never hold it. The
manager's error codes are mapped back to the registry's exception classes
(``service_conflict`` to :class:`ServiceConflict`, ...) so that callers
catch the same exceptions whether a check failed here or in the manager.

Errors added here::

    IkosError
    └── ManagerError
        └── ServiceTimeout       no matching service became active in time (also a TimeoutError)
"""

from __future__ import annotations

import builtins
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from ikos._errors import IkosError, ManagerError, NoSuchDaemon
from ikos.platform._control import ControlClient, EventStream
from ikos.platform._paths import InstancePaths
from ikos.registry._service import (
    InvalidService,
    NoSuchService,
    NotServiceOwner,
    RegistryFull,
    ServiceConflict,
    ServiceInfo,
    check_service_name,
    validate_service,
)

__all__ = [
    "HEALTH_REQUEST_KEY",
    "ServiceEvent",
    "ServiceTimeout",
    "ServiceWatch",
    "add_dependency",
    "discover",
    "get_dependencies",
    "health_request",
    "heartbeat",
    "list_services",
    "lookup",
    "register",
    "remove_dependency",
    "unregister",
    "wait_for",
    "watch",
]

#: The message a ``method`` health check sends to an actor: ``{HEALTH_REQUEST_KEY: "method"}``.
HEALTH_REQUEST_KEY = "ikos.health"
#: How long a plain request may take; the manager answers registry requests at once.
CALL_TIMEOUT = 30.0
#: How much longer than its own timeout :func:`wait_for` waits for the manager's answer.
WAIT_MARGIN = 5.0


class ServiceTimeout(ManagerError, TimeoutError):
    """No service matching the request became active within the timeout."""

    code = "timeout"


@dataclass(frozen=True)
class ServiceEvent:
    """A change seen by :func:`watch`.

    ``kind`` is ``registered``, ``unregistered``, ``active``, ``inactive`` or
    ``health`` (``service`` set), or ``daemon_health`` (``daemon`` and
    ``health`` set: the health of a daemon with checks but no service).
    ``old_health`` is the previous health for the two health kinds. ``at`` is
    the manager's Unix time of the change.
    """

    kind: str
    service: ServiceInfo | None
    at: float
    daemon: str | None = None
    health: str | None = None
    old_health: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ServiceEvent:
        if not isinstance(data, Mapping) or not isinstance(data.get("kind"), str):
            raise ManagerError(f"not a registry event: {data!r:.100}", "bad_response")
        service = data.get("service")
        at = data.get("at")
        return cls(
            kind=data["kind"],
            service=None if service is None else _info(service),
            at=float(at) if isinstance(at, int | float) else 0.0,
            daemon=data.get("daemon"),
            health=data.get("health"),
            old_health=data.get("old_health"),
        )


# --- connections ------------------------------------------------------------


_lock = threading.Lock()
_clients: dict[InstancePaths, ControlClient] = {}
_roots: dict[str, InstancePaths] = {}  # an explicit root resolved once (no realpath per call)


def _forget_clients() -> None:
    # After a fork the parent's socket must not be shared: start afresh.
    global _lock
    _lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_clients)


def _paths(root: str | os.PathLike[str] | None) -> InstancePaths:
    if root is not None:
        key = os.fspath(root)
        paths = _roots.get(key)
        if paths is None:
            paths = InstancePaths.resolve(root)
            if len(_roots) < 64:
                _roots[key] = paths
        return paths
    from ikos.actors import _context

    return _context.instance_paths(None)


def _client(root: str | os.PathLike[str] | None) -> ControlClient:
    paths = _paths(root)
    with _lock:
        client = _clients.get(paths)
        if client is None:
            client = _clients[paths] = ControlClient(paths, timeout=CALL_TIMEOUT)
        return client


def _call(
    verb: str,
    args: Mapping[str, Any],
    root: str | os.PathLike[str] | None,
    name: str | None = None,
) -> Any:
    try:
        return _client(root).call(verb, args)
    except ManagerError as exc:
        raise _registry_error(exc, name) from None


_CONFLICT_RE = re.compile(r"living process (\d+)")
_FULL_RE = re.compile(r"limit of (\d+)")
_INVALID_RE = re.compile(r"invalid service field '([^']*)': (.*)", re.DOTALL)
_OWNER_RE = re.compile(r"belongs to (?:process (\d+)|the manager), not to process (-?\d+|None)")


def _registry_error(exc: ManagerError, name: str | None) -> IkosError:
    """The registry exception of a manager's error answer (code and message)."""
    code, message = exc.code, str(exc)
    if code == "service_conflict" and name is not None:
        found = _CONFLICT_RE.search(message)
        return ServiceConflict(name, int(found.group(1)) if found else None)
    if code == "registry_full":
        found = _FULL_RE.search(message)
        if found:
            return RegistryFull(int(found.group(1)))
    if code == "invalid_service":
        found = _INVALID_RE.match(message)
        if found:
            return InvalidService(found.group(1), found.group(2))
        return InvalidService("service", message)
    if code == "permission_denied" and name is not None:
        found = _OWNER_RE.search(message)
        if found:
            holder = int(found.group(1)) if found.group(1) else None
            caller = int(found.group(2)) if found.group(2) != "None" else None
            return NotServiceOwner(name, holder, caller)
    if code == "timeout" and not isinstance(exc, ServiceTimeout):
        return ServiceTimeout(message)
    if isinstance(exc, NoSuchDaemon) and name is not None and message.startswith("no service"):
        return NoSuchService(name)
    return exc


def _info(data: Any) -> ServiceInfo:
    try:
        return ServiceInfo.from_json(data)
    except InvalidService as exc:
        raise ManagerError(f"the manager sent an invalid service: {exc}", "bad_response")


def _infos(data: Any) -> builtins.list[ServiceInfo]:
    if not isinstance(data, builtins.list):
        raise ManagerError(
            "the manager sent something other than a list of services", "bad_response"
        )
    return [_info(item) for item in data]


def _criteria(
    name: str | None,
    pattern: str | None,
    capability: str | None,
    type: str | None,
    active_only: bool,
) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for key, value in (("name", name), ("pattern", pattern), ("capability", capability)):
        if value is not None:
            args[key] = value
    if type is not None:
        args["type"] = type
    if active_only:
        args["active_only"] = True
    return args


# --- the API ------------------------------------------------------------------


def register(
    service: ServiceInfo | str,
    *,
    root: str | os.PathLike[str] | None = None,
    **fields: Any,
) -> ServiceInfo:
    """Register ``service``, owned by this process, and return it as stored.

    ``service`` is a :class:`ServiceInfo` or a name, with the other fields
    as keyword arguments. The manager sets ``pid`` (this process),
    ``owner`` (the daemon this process is, if any), ``active`` and
    ``health``. Registering a name this process already holds replaces the
    entry; a name held by another living process raises
    :class:`ServiceConflict`; a bad field raises :class:`InvalidService`
    before anything is sent.

    Example::

        ikos.registry.register("net/dhcp", type="dhcp", endpoint="udp://0.0.0.0:67",
                               capabilities=["dhcpv4"])
    """
    info = (
        ServiceInfo(service, **fields) if isinstance(service, str) else replace(service, **fields)
    )
    validate_service(info)
    data = info.to_json()
    for key in ("pid", "owner", "active", "health"):
        data.pop(key)  # the manager decides these
    return _info(_call("register", {"service": data}, root, info.name))


def unregister(
    name: str, *, force: bool = False, root: str | os.PathLike[str] | None = None
) -> ServiceInfo:
    """Remove service ``name`` and its dependencies; return it as it was.

    Only its owner may, or anyone once the owner is dead; ``force=True``
    lets root or the instance's owner remove a living owner's service.
    Raises :class:`NoSuchService` or :class:`NotServiceOwner`.
    """
    check_service_name(name)
    args: dict[str, Any] = {"name": name}
    if force:
        args["force"] = True
    return _info(_call("unregister", args, root, name))


def discover(
    name: str | None = None,
    *,
    pattern: str | None = None,
    capability: str | None = None,
    type: str | None = None,
    active_only: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> builtins.list[ServiceInfo]:
    """The services matching every criterion given, sorted by name.

    ``name`` is exact (an unknown name raises :class:`NoSuchService`),
    ``pattern`` a shell glob (``"net/*"``), ``capability`` one capability
    the service offers, ``type`` its exact type; ``active_only`` leaves out
    services whose owner is gone.

    Example::

        >>> [s.endpoint for s in ikos.registry.discover(capability="dhcpv4", active_only=True)]
        ['udp://0.0.0.0:67']
    """
    args = _criteria(name, pattern, capability, type, active_only)
    return _infos(_call("discover", args, root, name))


def lookup(name: str, *, root: str | os.PathLike[str] | None = None) -> ServiceInfo:
    """The service called ``name``, active or not; :class:`NoSuchService` if there is none."""
    return discover(name, root=root)[0]


def list_services(*, root: str | os.PathLike[str] | None = None) -> builtins.list[ServiceInfo]:
    """Every registered service, active or not, sorted by name (``ikos.registry.list``)."""
    return _infos(_call("services", {}, root))


def wait_for(
    name: str | None = None,
    timeout: float = 30.0,
    *,
    pattern: str | None = None,
    capability: str | None = None,
    type: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> ServiceInfo:
    """Block until an active service matches, and return it.

    Returns at once when one is already active; otherwise the manager
    answers as soon as a registration makes one so. Raises
    :class:`ServiceTimeout` (a :class:`TimeoutError`) after ``timeout``
    seconds.

    Example::

        db = ikos.registry.wait_for("db", timeout=10)
        connect(db.endpoint)
    """
    if not (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    args = _criteria(name, pattern, capability, type, False)
    args["timeout"] = float(timeout)
    try:
        with ControlClient(_paths(root), timeout=CALL_TIMEOUT) as client:
            result = client.call("wait_service", args, timeout=timeout + WAIT_MARGIN)
    except ManagerError as exc:
        raise _registry_error(exc, name) from None
    return _info(result)


def add_dependency(
    name: str, depends_on: str, *, root: str | os.PathLike[str] | None = None
) -> builtins.list[str]:
    """Record that service ``name`` depends on ``depends_on``; return its dependencies.

    A cycle is refused with an error that prints it (``a -> b -> a``).
    """
    result = _call("add_dependency", {"name": name, "depends_on": depends_on}, root, name)
    return _names(result)


def remove_dependency(
    name: str, depends_on: str, *, root: str | os.PathLike[str] | None = None
) -> bool:
    """Forget that ``name`` depends on ``depends_on``; return whether it did."""
    result = _call("remove_dependency", {"name": name, "depends_on": depends_on}, root, name)
    return bool(isinstance(result, Mapping) and result.get("removed"))


def get_dependencies(
    name: str, *, root: str | os.PathLike[str] | None = None
) -> builtins.list[str]:
    """The services ``name`` directly depends on, sorted."""
    return _names(_call("get_dependencies", {"name": name}, root, name))


def _names(result: Any) -> builtins.list[str]:
    if not isinstance(result, builtins.list) or not all(isinstance(n, str) for n in result):
        raise ManagerError("the manager sent something other than a list of names", "bad_response")
    return result


def heartbeat(
    daemon: str | None = None, note: str = "", *, root: str | os.PathLike[str] | None = None
) -> None:
    """Feed the ``ttl`` health checks of ``daemon`` (default: the daemon this process is).

    Call it more often than the check's ``ttl``; ``note`` shows as the
    check's output.
    """
    args: dict[str, Any] = {"note": note}
    if daemon is not None:
        args["name"] = daemon
    _call("heartbeat", args, root)


def health_request(message: Any) -> str | None:
    """The method a ``method`` health check asks for, if ``message`` is such a check.

    The manager runs a ``method`` check by asking the actor
    ``{"ikos.health": "METHOD"}``; an actor answers it from ``receive``.
    The check fails when the method raises, times out or returns ``False``.

    Example::

        class Net(ikos.Actor):
            def receive(self, message):
                method = ikos.registry.health_request(message)
                if method is not None:
                    return getattr(self, method)()
                ...

            def healthy(self):
                return self.link_up
    """
    if isinstance(message, dict) and len(message) == 1:
        method = message.get(HEALTH_REQUEST_KEY)
        if isinstance(method, str):
            return method
    return None


class ServiceWatch(Iterator[ServiceEvent]):
    """The registry's events as they happen; see :func:`watch`."""

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream

    def __next__(self) -> ServiceEvent:
        return ServiceEvent.from_json(next(self._stream))

    def close(self) -> None:
        """Stop watching (closes the connection)."""
        self._stream.close()

    def __enter__(self) -> ServiceWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def watch(
    name: str | None = None,
    *,
    pattern: str | None = None,
    capability: str | None = None,
    type: str | None = None,
    idle_timeout: float | None = None,
    root: str | os.PathLike[str] | None = None,
) -> ServiceWatch:
    """Iterate over the registry's changes, from now on, until closed.

    Only events about services matching every criterion given are
    delivered. The watch is live when this returns: a change made
    afterwards is seen. ``idle_timeout`` bounds each wait for the next
    event (``None``: wait for ever). A watcher that falls far behind is
    dropped by the manager, which ends the iteration with an error.

    Example::

        with ikos.registry.watch(pattern="net/*") as events:
            for event in events:
                print(event.kind, event.service.name)
    """
    args = _criteria(name, pattern, capability, type, False)
    client = ControlClient(_paths(root), timeout=CALL_TIMEOUT)
    try:
        stream = client.stream("watch", args, idle_timeout=idle_timeout)
    except ManagerError as exc:
        raise _registry_error(exc, name) from None
    try:
        first = next(stream)  # the manager's "watching": the subscription is live
    except StopIteration:
        raise ManagerError("the manager ended the watch at once", "bad_response") from None
    except ManagerError as exc:
        stream.close()
        raise _registry_error(exc, name) from None
    except BaseException:
        stream.close()
        raise
    if not isinstance(first, Mapping) or first.get("kind") != "watching":
        stream.close()
        raise ManagerError(f"unexpected first watch event {first!r:.100}", "bad_response")
    return ServiceWatch(stream)
