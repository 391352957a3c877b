"""How an ``ActorRef`` reaches an actor placed on Ray: the same API, Ray's transport.

A reference tries the local mailbox socket first, as always; only when no
mailbox listens (the path where it would raise ``ActorDeadError``) does it
look for a Ray placement, so the local ask pays nothing for this module.
The placement is found, in order:

1. in the instance's registry of placed actors, ``RUN/actors/NAME.ray``,
   written by ikosd's Ray spawner: the Ray namespace, the actor's Ray name,
   the cluster's address and the node it runs on (any local process of the
   instance: a script, an actor, ikosctl);
2. in Ray's own registry of named actors, when the process is already a Ray
   worker or driver (a Ray task or actor on any node of the cluster): the
   namespace is ``$IKOS_RAY_NAMESPACE`` (set in every Ray-placed ikos actor),
   else ``ikos``.

The call itself is a Ray actor call (``receive``/``call``/``tell`` of
:class:`~ikos.actors._ray_host.ActorHost`), so per-sender order is Ray's:
the calls of one process to one actor run in the order they were made.
An actor being restarted by its supervisor keeps its registry entry
(ikosd removes it only when the actor is stopped for good), and a call in that
window waits for the new incarnation until its timeout, as a local client
waits in the listener's backlog.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ikos._errors import ActorDeadError, AskTimeout

#: Routes found, by (root, name): a file read and a Ray lookup only on the first call.
_routes: dict[tuple[str | None, str], RayRoute] = {}
_lock = threading.Lock()
#: How often a call retries the lookup of an actor its supervisor is restarting.
RETRY_EVERY = 0.05


class RayPlaced(Exception):
    """Raised where a reference found no mailbox but a Ray placement: use ``route``."""

    def __init__(self, route: RayRoute) -> None:
        super().__init__(route.name)
        self.route = route


class RayRoute:
    """The way to one Ray-placed actor: its Ray handle, looked up again after a restart."""

    def __init__(
        self, name: str, namespace: str, address: str | None, registry: Path | None
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.address = address
        self.registry = registry  # the NAME.ray file, when found there
        self._handle: Any = None

    # -- the handle -------------------------------------------------------------

    def _lookup(self, deadline: float) -> Any:
        handle = self._handle
        if handle is not None:
            return handle
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address or "auto", log_to_driver=False, namespace=self.namespace)
        while True:
            try:
                handle = ray.get_actor(self.name, namespace=self.namespace)
            except ValueError:
                handle = None
            if handle is not None:
                self._handle = handle
                return handle
            if self.registry is not None and not self.registry.exists():
                raise ActorDeadError(self.name, "not running (stopped, no longer on Ray)")
            if time.monotonic() >= deadline:
                raise ActorDeadError(self.name, "not running (no Ray actor of that name)")
            time.sleep(RETRY_EVERY)

    def _result(self, method: str, args: tuple[Any, ...], timeout: float) -> Any:
        ray, GetTimeoutError, RayActorError = _ray()
        deadline = time.monotonic() + timeout
        for attempt in (0, 1):
            handle = self._lookup(deadline)
            ref = getattr(handle, method).remote(*args)
            try:
                return ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001))
            except GetTimeoutError:
                raise AskTimeout(self.name, f"no reply within {timeout:g} s") from None
            except RayActorError:
                self._handle = None  # died: the supervisor restarts it, or it is gone
                if attempt or not self._was_stale(handle):
                    raise ActorDeadError(self.name, "stopped before answering") from None
        raise AssertionError("unreachable")

    def _was_stale(self, handle: Any) -> bool:
        """Whether ``handle`` was an incarnation already replaced when it was used: the
        call never reached an actor and may go to the new one (as a local reference
        re-makes a connection that broke since its last use)."""
        import ray

        try:
            fresh = ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            return False
        if getattr(fresh, "_actor_id", None) == getattr(handle, "_actor_id", None):
            return False
        self._handle = fresh
        return True

    # -- messaging (what ActorRef delegates) -------------------------------------

    def ask(self, message: Any, timeout: float) -> Any:
        ok, value = self._result("receive", (message,), timeout)
        if ok:
            return value
        raise value

    def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float
    ) -> Any:
        ok, value = self._result("call", (method, args, kwargs), timeout)
        if ok:
            return value
        raise value

    def tell(self, message: Any, timeout: float) -> None:
        handle = self._lookup(time.monotonic() + timeout)
        handle.tell.remote(message)

    def future(self, message: Any, timeout: float) -> Future[Any]:
        """The reply as a ``concurrent.futures.Future`` (Ray's own, unwrapped)."""
        out: Future[Any] = Future()
        try:
            handle = self._lookup(time.monotonic() + timeout)
            inner = handle.receive.remote(message).future()
        except BaseException as exc:
            out.set_exception(exc)
            return out

        def done(f: Future[Any]) -> None:
            try:
                ok, value = f.result()
            except BaseException:
                self._handle = None
                out.set_exception(ActorDeadError(self.name, "stopped before answering"))
                return
            if ok:
                out.set_result(value)
            else:
                out.set_exception(value)

        inner.add_done_callback(done)
        return out


_imported: tuple[Any, Any, Any] | None = None


def _ray() -> tuple[Any, Any, Any]:
    """``ray`` and the two exceptions a call tells apart, imported once (on first use:
    a process that never reaches a Ray-placed actor never imports Ray)."""
    global _imported
    if _imported is None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        _imported = (ray, GetTimeoutError, RayActorError)
    return _imported


def find_ray_route(root: str | None, name: str, run_dir: Path | None) -> RayRoute | None:
    """The Ray route to actor ``name``, or None when it is not placed on Ray."""
    key = (root, name)
    route = _routes.get(key)
    if route is not None and route.registry is not None and not route.registry.exists():
        forget(root, name)  # stopped for good, or moved back to a local process
        route = None
    if route is not None:
        return route
    route = _from_registry(name, run_dir) or _from_ray(name)
    if route is not None:
        with _lock:
            _routes[key] = route
    return route


def forget(root: str | None, name: str) -> None:
    """Drop a cached route (the actor may run locally now)."""
    with _lock:
        _routes.pop((root, name), None)


def _from_registry(name: str, run_dir: Path | None) -> RayRoute | None:
    if run_dir is None:
        return None
    path = run_dir / f"{name}.ray"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    address = entry.get("address")
    return RayRoute(
        str(entry.get("actor") or name),
        str(entry.get("namespace") or "ikos"),
        address if isinstance(address, str) else None,
        path,
    )


def _from_ray(name: str) -> RayRoute | None:
    """In a process already connected to Ray (a task or actor on any node)."""
    import sys

    if "ray" not in sys.modules:  # never import Ray to find that an actor is not there
        return None
    import ray

    if not ray.is_initialized():
        return None
    from ikos.actors._ray_host import NAMESPACE_VARIABLE

    namespace = os.environ.get(NAMESPACE_VARIABLE, "ikos")
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
    return RayRoute(name, namespace, None, None)
