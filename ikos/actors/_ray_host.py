"""The Ray actor that hosts one ikos actor on a Ray cluster.

An ikos child placed on Ray (``placement=ikos.Ray(...)``) runs as an instance
of :class:`ActorHost`, created by the Ray bridge (``ikos/manager/_ray_bridge.py``)
with ``max_restarts=0``: Ray never restarts it, the ikos supervisor does. The
host constructs the user's :class:`ikos.Actor` in the Ray worker process and
gives it the semantics of the local runtime (``ikos/actors/_runtime.py``):

- ``receive``/``call``/``tell``: one message at a time, in the order each
  caller sent them (Ray runs one caller's tasks to an actor in order; they
  all run in the default concurrency group, of one thread). The reply travels
  as ``(ok, value)``, so that an :class:`~ikos.ActorCrashed` reaches the asker
  as the exception ikos raises, not wrapped in Ray's ``RayTaskError``.
- An exception out of a handler crashes the actor, as locally: the asker gets
  :class:`~ikos.ActorCrashed` with the traceback, later messages a dead-actor
  error, and the exit (reason and traceback) is what ``watch`` returns.
- ``watch`` runs in its own concurrency group and returns only when the actor
  ends by itself (crash, stop): the bridge keeps one such call outstanding
  per actor and collects all of them with one ``ray.wait``, which also
  returns at once, as ``ActorDiedError``, when Ray loses the process or its
  node. That is how ikosd learns of a death without polling every actor.
- ``stop`` (the ``control`` group: it does not queue behind messages) waits
  for the message being handled, runs ``on_stop`` and ends the actor, as
  SIGTERM does locally; messages not yet handled get a dead-actor error.

Unsupported on Ray for now (documented in docs/scaling.md): ``async def``
handlers (refused at start, with that reason), timers (``send_after``),
monitors and hot code upgrade, which need the local
runtime's event loop or ikosd's control socket.
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

from ikos._codec import decode
from ikos._errors import ActorCrashed, ActorDeadError
from ikos.actors._call import MethodCall
from ikos.actors._runtime import _describe, is_async_actor
from ikos.platform._forkserver import resolve_entry

#: Concurrency groups of :class:`ActorHost` (``ray.remote(concurrency_groups=...)``).
CONCURRENCY_GROUPS = {"watch": 1, "control": 1}
#: Environment variable naming the Ray namespace of an instance's actors.
NAMESPACE_VARIABLE = "IKOS_RAY_NAMESPACE"


class ActorHost:
    """A Ray actor running one ikos actor; see the module docstring."""

    def __init__(self, name: str, actor_path: str, boot: bytes, namespace: str) -> None:
        os.environ[NAMESPACE_VARIABLE] = namespace  # ActorRefs made by the actor find Ray
        self.name = name
        self._path = actor_path
        self._boot = boot
        self._actor: Any = None
        self._lock = threading.Lock()  # a handler and a stop never overlap
        self._ended = threading.Event()
        self._exit: dict[str, Any] = {}

    # -- life ------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Construct the actor and run ``on_start``: where it runs, or why it could not."""
        import ray

        try:
            cls = resolve_entry(self._path)  # a class, imported by path as an entry is
            if is_async_actor(cls):
                raise TypeError("actors with async def handlers cannot be placed on Ray yet")
            args, kwargs = decode(self._boot)
            actor = cls(*args, **kwargs)
            actor.name = self.name
            actor.on_start()
        except BaseException as exc:
            self._end(2, f"on_start raised {_describe(exc)}", traceback.format_exc())
            return {"ok": False, **self._exit}
        self._actor = actor
        ctx = ray.get_runtime_context()
        return {
            "ok": True,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }

    def watch(self) -> dict[str, Any]:
        """Return when the actor ends by itself: its exit event (code, reason, detail)."""
        self._ended.wait()
        return self._exit

    def stop(self) -> dict[str, Any]:
        """SIGTERM's equivalent: finish the message in hand, run ``on_stop``, end."""
        with self._lock:
            if not self._ended.is_set():
                try:
                    if self._actor is not None:
                        self._actor.on_stop()
                except BaseException as exc:
                    self._end(1, f"on_stop raised {_describe(exc)}", traceback.format_exc())
                else:
                    self._end(0, "normal")
        return self._exit

    def _end(self, code: int, reason: str, detail: str = "") -> None:
        self._exit = {"event": "exit", "code": code, "reason": reason, "detail": detail[-4000:]}
        self._ended.set()

    # -- messages --------------------------------------------------------------

    def receive(self, message: Any) -> tuple[bool, Any]:
        """An ask: ``(True, reply)`` or ``(False, exception to raise at the caller)``."""
        with self._lock:
            if self._ended.is_set():
                return False, ActorDeadError(self.name, "stopped before answering")
            try:
                return True, self._actor.receive(message)
            except Exception as exc:
                return False, self._crashed(exc, "receive")

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """A proxy's method call, checked as locally (:class:`MethodCall`)."""
        with self._lock:
            if self._ended.is_set():
                return False, ActorDeadError(self.name, "stopped before answering")
            call = MethodCall(method, args, kwargs)
            try:
                value = call.apply(self._actor)
            except Exception as exc:
                return False, self._crashed(exc, f"{method}()")
            return value.__class__.__name__ != "MethodRefused", value

    def tell(self, message: Any) -> None:
        """A tell: handled like an ask, the reply dropped."""
        self.receive(message)

    def _crashed(self, exc: Exception, handler: str) -> ActorCrashed:
        detail = traceback.format_exc()
        self._end(1, f"{handler} raised {_describe(exc)}", detail)
        return ActorCrashed(
            self.name, f"{handler} raised {_describe(exc)}", type(exc).__name__, detail
        )
