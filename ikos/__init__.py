"""ikos: daemon management for the IKOS operating system.

Every daemon is a supervised actor in its own OS process, in an
Erlang/OTP-style supervision tree run by ``ikosd`` and controlled with
``ikosctl``. The public API is re-exported here; the layers live in the
subpackages (platform, monitor, actors, ipc, registry, supervision,
manager).

Example::

    import ikos

    class Echo(ikos.Actor):
        def receive(self, message):
            return message

    tree = ikos.Supervisor("root", strategy="one_for_one",
                           children=[ikos.Child("echo", Echo)])

    if __name__ == "__main__":
        raise SystemExit(ikos.run(tree, root=".demo"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ikos._errors import (
    ActorCrashed,
    ActorDeadError,
    ActorError,
    AskTimeout,
    AuthenticationError,
    ConfigError,
    IkosError,
    MailboxFull,
    ManagerError,
    ManagerUnavailable,
    MessageTooLarge,
    MethodRefused,
    NoSuchDaemon,
    PermissionDenied,
    SpawnError,
    SpecError,
    UpgradeFailed,
)
from ikos._version import __version__
from ikos.actors._actor import Actor, set_broadcast_source
from ikos.supervision._placement import Ray
from ikos.supervision._spec import Backoff, Child, Exec, Supervisor

if TYPE_CHECKING:  # imported on first use: see _LAZY_NAMES
    from ikos import ipc as ipc
    from ikos.actors._monitor import Down
    from ikos.actors._ref import ActorRef
    from ikos.actors._timers import Timer
    from ikos.manager._ikosd import run
    from ikos.manager._local import LocalSystem, local
    from ikos.supervision._client import spawn, start_child, terminate_child, upgrade

__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorDeadError",
    "ActorError",
    "ActorRef",
    "AskTimeout",
    "AuthenticationError",
    "Backoff",
    "Child",
    "ConfigError",
    "Down",
    "Exec",
    "IkosError",
    "LocalSystem",
    "MailboxFull",
    "ManagerError",
    "ManagerUnavailable",
    "MessageTooLarge",
    "MethodRefused",
    "NoSuchDaemon",
    "PermissionDenied",
    "Ray",
    "SpawnError",
    "SpecError",
    "Supervisor",
    "Timer",
    "UpgradeFailed",
    "__version__",
    "local",
    "run",
    "spawn",
    "start_child",
    "terminate_child",
    "upgrade",
]

#: Public submodules that ``import ikos`` exposes as attributes, imported on
#: first use (``ikos.daemon.create(...)``) so that ``import ikos`` stays light.
_LAZY_SUBMODULES = ("daemon", "ipc")

#: Public names imported from their module on first use (PEP 562), by name. A
#: tree module's ``import ikos`` needs the specs, not the manager's command, the
#: local system or the client calls; and ikosd, which imports this package
#: first, never needs the latter two, nor, for a tree of executables, an actor's
#: reference, its timers and its Down messages (docs/performance.md, "Launch").
_LAZY_NAMES = {
    "ActorRef": "ikos.actors._ref",
    "Down": "ikos.actors._monitor",
    "Timer": "ikos.actors._timers",
    "run": "ikos.manager._ikosd",
    "LocalSystem": "ikos.manager._local",
    "local": "ikos.manager._local",
    "spawn": "ikos.supervision._client",
    "start_child": "ikos.supervision._client",
    "terminate_child": "ikos.supervision._client",
    "upgrade": "ikos.supervision._client",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"ikos.{name}")
    module = _LAZY_NAMES.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # found at once from now on
        return value
    raise AttributeError(f"module 'ikos' has no attribute {name!r}")


def _subscribe_through_ipc(pattern: str, tell: Any) -> Any:
    """``Actor.subscribe`` before ``ikos.ipc`` was imported: import it (which installs
    its own source in place of this one) and subscribe through it."""
    from ikos import ipc

    return ipc._actor_subscribe(pattern, tell)


# ikos.ipc is imported on first use (ikosd's launch does without it), but an actor
# that subscribes after a plain ``import ikos`` must find it, as it always did
set_broadcast_source(_subscribe_through_ipc)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_LAZY_SUBMODULES})
