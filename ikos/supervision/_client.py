"""Dynamic children from any process: the client side of ``start_child``/``terminate_child``
and ``spawn``.

Which instance: an explicit ``root``, else the innermost ``with ikos.local()``
block open in this process (``ikos.actors._context``), else, in an actor's
process, the actor's own instance, else ``$IKOS_ROOT``, else the default
instance, as ikosctl finds it. ``upgrade`` (hot code upgrade) is here too.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from ikos._errors import SpawnError
from ikos.actors import _context
from ikos.actors._carried import carry
from ikos.actors._ref import ActorRef
from ikos.platform._control import MAX_REQUEST_BYTES, ControlClient

#: Room left in a request line for everything but the payload.
_REQUEST_OVERHEAD = 64 * 1024

#: The instance a call without ``root`` means (``ikos.actors._context``).
instance_paths = _context.instance_paths


def instance_root(root: str | os.PathLike[str] | None) -> str | None:
    """``root``, else the innermost open ``ikos.local()`` system's, else None (the default)."""
    return os.fspath(root) if root is not None else _context.local_root()


def start_child(supervisor: str, *args: Any, root: str | os.PathLike[str] | None = None) -> str:
    """Start one more child of a ``simple_one_for_one`` supervisor; return its name.

    ``args`` (JSON values) are appended to the template's ``args``. Example::

        name = ikos.start_child("workers", "job-42")   # e.g. "worker.3"
    """
    with ControlClient(instance_paths(root)) as client:
        status = client.call("start_child", {"supervisor": supervisor, "args": list(args)})
    return str(status["name"])


def terminate_child(name: str, *, root: str | os.PathLike[str] | None = None) -> None:
    """Stop a dynamic child (of ``simple_one_for_one``, or spawned) and remove it."""
    with ControlClient(instance_paths(root)) as client:
        client.call("terminate_child", {"name": name})


def spawn(
    actor_class: type,
    *args: Any,
    name: str | None = None,
    root: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> ActorRef:
    """Run ``actor_class(*args, **kwargs)`` as a supervised actor in its own process.

    The class may be defined anywhere, ``__main__`` of a script, a REPL or a
    notebook included: it travels by value (dill) when the actor's process
    could not import it, by reference otherwise. The actor runs under
    ``ikos-spawned`` of the instance (``root``, else the open ``ikos.local()``
    system, else ``$IKOS_ROOT``, else the default), named ``name`` or
    ``ClassName.N``, restarted from the same class when it crashes, until
    ``ikos.terminate_child(ref.name)``. Returns the :class:`ActorRef`.

    Raises :class:`SpawnError` when the class cannot be serialized or the
    actor failed to start, :class:`ManagerUnavailable` when no ikosd runs
    there. Example::

        class Counter(ikos.Actor):
            def __init__(self, start=0):
                self.n = start
            def receive(self, k):
                self.n += k
                return self.n

        counter = ikos.spawn(Counter, 10)
        counter.ask(5)   # 15
    """
    cls_name = getattr(actor_class, "__name__", "actor")
    carried = carry(actor_class, args, kwargs, name=name or str(cls_name))
    payload = base64.b64encode(carried.payload).decode("ascii")
    if len(payload) > MAX_REQUEST_BYTES - _REQUEST_OVERHEAD:
        raise SpawnError(
            name or str(cls_name),
            "actor",
            f"class {carried.class_path} and its arguments take {len(carried.payload)} bytes "
            f"encoded, more than a control request carries (about "
            f"{(MAX_REQUEST_BYTES - _REQUEST_OVERHEAD) * 3 // 4} bytes): pass large data "
            "in messages, or make the class importable",
        )
    where = instance_root(root)
    request: dict[str, Any] = {
        "class": carried.class_path,
        "payload": payload,
        "path": list(carried.sys_path),
        "prefix": str(cls_name),
    }
    if name is not None:
        request["name"] = name
    with ControlClient(instance_paths(where), timeout=120.0) as client:
        status = client.call("spawn", request)
    return ActorRef(str(status["name"]), root=where)


def upgrade(name: str, *, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Hot code upgrade of actor ``name``: its class's current code takes over its state.

    Returns what happened: ``old_pid``, ``pid``, ``state`` (``"handed over"`` or
    ``"fresh"``). Raises :class:`ikos.UpgradeFailed` (with the new code's
    ``traceback``) when the new code failed and the old incarnation serves on,
    :class:`ikos.NoSuchDaemon` for an unknown name, :class:`ikos.ManagerError`
    when ``name`` cannot be upgraded (an executable, a supervisor, not running,
    a class defined in ``__main__``). Example::

        ikos.upgrade("counter")   # {'old_pid': 1201, 'pid': 1207, 'state': 'handed over', ...}
    """
    with ControlClient(instance_paths(root), timeout=UPGRADE_TIMEOUT) as client:
        result: dict[str, Any] = client.call("upgrade", {"name": name})
    return result


#: Seconds ``upgrade`` waits for ikosd's answer: the new code's start_timeout rules below it.
UPGRADE_TIMEOUT = 600.0
