"""The tree from any process: the client side of ``start_child``, ``terminate_child``
and ``upgrade``."""

from __future__ import annotations

import os
from typing import Any

from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths


def start_child(supervisor: str, *args: Any, root: str | os.PathLike[str] | None = None) -> str:
    """Start one more child of a ``simple_one_for_one`` supervisor; return its name.

    ``args`` (JSON values) are appended to the template's ``args``. Example::

        name = ikos.start_child("workers", "job-42")   # e.g. "worker.3"
    """
    with ControlClient(InstancePaths.resolve(root)) as client:
        status = client.call("start_child", {"supervisor": supervisor, "args": list(args)})
    return str(status["name"])


def terminate_child(name: str, *, root: str | os.PathLike[str] | None = None) -> None:
    """Stop a dynamic child and remove it from its supervisor."""
    with ControlClient(InstancePaths.resolve(root)) as client:
        client.call("terminate_child", {"name": name})


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
    with ControlClient(InstancePaths.resolve(root), timeout=UPGRADE_TIMEOUT) as client:
        result: dict[str, Any] = client.call("upgrade", {"name": name})
    return result


#: Seconds ``upgrade`` waits for ikosd's answer: the new code's start_timeout rules below it.
UPGRADE_TIMEOUT = 600.0
