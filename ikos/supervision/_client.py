"""Dynamic children from any process: the client side of ``start_child``/``terminate_child``."""

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
