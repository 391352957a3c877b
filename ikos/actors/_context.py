"""Which ikos instance this process talks to, and the secret that proves it may.

An actor process gets its instance from the runtime that started it; any
other process finds it as ikosctl does (``$IKOS_ROOT``, else the default
paths). The secret is read once per instance and cached.

A call that names no ``root`` means, in this order: the innermost
``with ikos.local()`` block open in this process, else the actor's own
instance (in an actor's process), else ``$IKOS_ROOT``, else the default
(:func:`instance_paths`, which every client module asks).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ikos.platform._memfd import DEFAULT_SHM_THRESHOLD
from ikos.platform._paths import InstancePaths
from ikos.platform._wire import DEFAULT_MAX_FRAME, read_secret


class InstanceContext:  # a plain class: a dataclass compiles its methods at ikosd's every start
    """An instance's paths, secret, frame limit and shared-memory threshold, as seen by a
    client (bytes-like payloads of at least ``shm_threshold`` bytes go by memfd).

    Made once per instance and process, and never changed, compared or hashed.
    """

    __slots__ = ("max_frame", "paths", "secret", "shm_threshold")

    def __init__(
        self,
        paths: InstancePaths,
        secret: bytes,
        max_frame: int = DEFAULT_MAX_FRAME,
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
    ) -> None:
        self.paths = paths
        self.secret = secret
        self.max_frame = max_frame
        self.shm_threshold = shm_threshold


_lock = threading.Lock()
_default: InstanceContext | None = None
_by_root: dict[Path | None, InstanceContext] = {}


#: Roots of the ``ikos.local()`` systems open in this process, innermost last.
_local_roots: list[str] = []


def push_local_root(root: str) -> None:
    """``ikos.local()`` opened: calls without a ``root`` go to ``root`` until popped."""
    with _lock:
        _local_roots.append(root)


def pop_local_root(root: str) -> None:
    """``ikos.local()`` closed (blocks may close out of order, from other threads)."""
    with _lock:
        for i in range(len(_local_roots) - 1, -1, -1):
            if _local_roots[i] == root:
                del _local_roots[i]
                return


def local_root() -> str | None:
    """The innermost open ``ikos.local()`` system's root, or None."""
    with _lock:
        return _local_roots[-1] if _local_roots else None


def instance_paths(root: str | os.PathLike[str] | None) -> InstancePaths:
    """The paths of the instance a call means: ``root``, else the module docstring's order."""
    if root is None:
        root = local_root()
        if root is None and _default is not None:
            return _default.paths
    return InstancePaths.resolve(root)


def set_default(ctx: InstanceContext) -> None:
    """Make ``ctx`` the instance of this process (done by the actor runtime)."""
    global _default
    with _lock:
        _default = ctx
        _by_root[ctx.paths.root] = ctx


def get(root: str | os.PathLike[str] | None = None) -> InstanceContext:
    """The context for ``root``, else this process's instance, else ``$IKOS_ROOT``."""
    if root is None and _default is not None:
        return _default
    paths = InstancePaths.resolve(root)
    with _lock:
        ctx = _by_root.get(paths.root)
        if ctx is None:
            published = _published(paths)
            ctx = InstanceContext(
                paths,
                read_secret(paths.secret_file),
                _positive(published, "max_message_bytes", DEFAULT_MAX_FRAME),
                _positive(published, "shm_threshold", DEFAULT_SHM_THRESHOLD),
            )
            _by_root[paths.root] = ctx
        return ctx


def _published(paths: InstancePaths) -> dict[str, object]:
    """What ikosd published in ``instance.json`` (frame limit, shm threshold), or {}."""
    try:
        data = json.loads(paths.instance_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _positive(published: dict[str, object], key: str, default: int) -> int:
    value = published.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
