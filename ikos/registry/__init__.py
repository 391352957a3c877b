"""The service registry: register, discover and watch services, from any process.

Daemons, actors and plain processes register the services they offer; any
process that reaches the manager discovers them by name, glob pattern,
capability or type, waits for one to appear, or watches the changes. A
registration belongs to the process that made it and turns inactive when
that process exits. The registry lives in ikosd (SQLite under the state
directory, so it survives a restart of ikosd); these functions ask it over
the control socket, finding the instance as ikosctl does (``root=``, else
the actor's own instance, else ``$IKOS_ROOT``, else the default).

Example::

    import ikos.registry as registry

    registry.register("net/dhcp", type="dhcp", endpoint="udp://0.0.0.0:67",
                      capabilities=["dhcpv4"])
    dhcp = registry.wait_for("net/dhcp", timeout=10)
    for service in registry.discover(pattern="net/*", active_only=True):
        print(service.name, service.endpoint)

Errors (all :class:`ikos.IkosError`)::

    IkosError
    ├── InvalidService           a field breaks a rule (field, reason)
    └── ManagerError
        ├── ServiceConflict      the name is held by another living process
        ├── RegistryFull         the registry holds its limit of services
        ├── ServiceTimeout       wait_for: nothing matching became active in time
        ├── NoSuchDaemon
        │   └── NoSuchService    no service by that name
        └── PermissionDenied
            └── NotServiceOwner  only the owner may unregister it

This package keeps its imports light (no SQLite, no asyncio): the store,
the health checks and the dependency graph are private modules used by the
manager.
"""

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ikos.registry._client import (
        ServiceEvent,
        ServiceTimeout,
        ServiceWatch,
        add_dependency,
        discover,
        get_dependencies,
        health_request,
        heartbeat,
        lookup,
        register,
        remove_dependency,
        unregister,
        wait_for,
        watch,
    )
    from ikos.registry._client import list_services as list  # the contract's name
    from ikos.registry._service import (
        InvalidService,
        NoSuchService,
        NotServiceOwner,
        RegistryFull,
        ServiceConflict,
        ServiceInfo,
    )

__all__ = [
    "InvalidService",
    "NoSuchService",
    "NotServiceOwner",
    "RegistryFull",
    "ServiceConflict",
    "ServiceEvent",
    "ServiceInfo",
    "ServiceTimeout",
    "ServiceWatch",
    "add_dependency",
    "discover",
    "get_dependencies",
    "health_request",
    "heartbeat",
    "list",
    "lookup",
    "register",
    "remove_dependency",
    "unregister",
    "wait_for",
    "watch",
]


#: Where each public name lives; imported on first use (PEP 562), so that ikosd,
#: which imports this package for its private modules (the store, the graph),
#: does not load the client's calls it never makes.
_CLIENT_NAMES = (
    "ServiceEvent", "ServiceTimeout", "ServiceWatch", "add_dependency", "discover",
    "get_dependencies", "health_request", "heartbeat", "lookup", "register",
    "remove_dependency", "unregister", "wait_for", "watch",
)  # fmt: skip


def __getattr__(name: str) -> Any:
    import importlib

    if name == "list":  # the contract's name for list_services
        value = importlib.import_module("ikos.registry._client").list_services
    elif name in _CLIENT_NAMES:
        value = getattr(importlib.import_module("ikos.registry._client"), name)
    elif name in __all__:
        value = getattr(importlib.import_module("ikos.registry._service"), name)
    else:
        raise AttributeError(f"module 'ikos.registry' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> builtins.list[str]:  # `list` is the registry's call here
    return sorted({*globals(), *__all__})
