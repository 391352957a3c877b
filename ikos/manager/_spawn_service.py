"""Actors started from any Python process: the manager's side of ``ikos.spawn``.

:class:`SpawnService` serves the control verb ``spawn`` (``docs/protocol.md``):
a client sends an actor class with its arguments, encoded in its own process
(:class:`~ikos.actors._carried.CarriedActor`: pickle by reference for an
importable class, dill by value for one from ``__main__``), and the service
adds a ``Child`` holding those bytes to ``ikos-spawned``, a ``one_for_one``
supervisor of the root that it creates at the first spawn. From there the
actor is a daemon like any other: supervised, restarted from the same bytes,
listed, stopped by ``terminate_child`` (which removes it) or ``stop``.

The bytes stay opaque here: they are base64 in the request, bytes in the
spec, and only the actor process unpickles them. Unpickling is running the
sender's code, so ``spawn`` is a **control** verb (root and the instance's
owner, as for starting an executable), and ikosd itself never runs it.

``ikos-spawned`` restarts with back-off and a wide intensity window, as
``ikos-system`` does: an interactively written actor that keeps crashing
must not make the root give up and take the instance's daemons down.
Spawned actors belong to the ikosd that started them: they are kept across
a configuration reload (``amend_tree`` puts them back into the reloaded
tree), but not written to disk, so a new ikosd (after a restart or a crash)
does not start them again, and recovery stops the old processes as it does
anything the tree no longer has.

Rejected: a ``simple_one_for_one`` supervisor, whose children are all
instances of one template, when each spawn brings its own class; and
storing spawned actors like ``daemon_create``'s executables, which would
make ikosd keep (and run at every boot) code that a REPL session sent once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import logging
import re
from typing import TYPE_CHECKING, Any, Final

from ikos._errors import ConfigError, DaemonExists, IkosError, ManagerError
from ikos.manager._control_server import BadRequest, Request
from ikos.manager._daemon_service import _refusal, start_error
from ikos.manager._extension import Extension, ExtensionHost, Operations, TreeView
from ikos.manager._ipc_service import SYSTEM_BACKOFF
from ikos.supervision._edit import find_spec
from ikos.supervision._runtime import StartFailed
from ikos.supervision._spec import NAME_RE, NAME_RULE, Child, Supervisor

if TYPE_CHECKING:  # imported by the first spawn: ikosd's launch does without the actors
    from ikos.actors._carried import CarriedActor

log = logging.getLogger("ikos.spawn")

#: The supervisor of every spawned actor, a child of the root made at the first spawn.
SPAWNED_NAME: Final = "ikos-spawned"
#: Bound on the actors clients can make the manager keep.
MAX_SPAWNED: Final = 1024
#: Bound on the directories an actor process may be told to import from.
MAX_PATHS: Final = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")


def spawned_supervisor() -> Supervisor:
    """``ikos-spawned``: never gives up (see the module docstring)."""
    return Supervisor(
        SPAWNED_NAME,
        "one_for_one",
        max_restarts=1000,
        within=60.0,
        backoff=SYSTEM_BACKOFF,
        description="actors started by ikos.spawn",
    )


def name_prefix(text: str) -> str:
    """A class name made fit for daemon names (``Counter`` stays, ``Ä`` becomes ``_``)."""
    prefix = _UNSAFE.sub("_", text)[:50].lstrip("_.@-")
    return prefix or "actor"


def carried_from_request(req: Request) -> CarriedActor:
    """The ``class``, ``payload`` and ``path`` of a ``spawn`` request, checked; never loaded."""
    class_path = req.text("class")
    if len(class_path) > 300 or not class_path.isprintable():
        raise BadRequest("'spawn': 'class' must be a printable module:qualname")
    try:
        payload = base64.b64decode(req.text("payload"), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("'spawn': 'payload' must be base64")
    path = req.args.get("path", [])
    if (
        not isinstance(path, list)
        or len(path) > MAX_PATHS
        or not all(isinstance(p, str) and p.startswith("/") and len(p) < 4096 for p in path)
    ):
        raise BadRequest(f"'spawn': 'path' must be a list of at most {MAX_PATHS} absolute paths")
    from ikos.actors._carried import CarriedActor

    return CarriedActor(class_path, payload, tuple(path))


class SpawnService(Extension):
    """Serves ``spawn``; keeps ``ikos-spawned`` across reloads."""

    name = "spawn"

    def __init__(self) -> None:
        self._host: ExtensionHost | None = None
        self._lock = asyncio.Lock()
        self._reserved: set[str] = set()  # names being started
        self._numbers: dict[str, itertools.count[int]] = {}

    @property
    def view(self) -> TreeView:
        assert self._host is not None
        return self._host.view

    @property
    def ops(self) -> Operations:
        assert self._host is not None
        return self._host.ops

    async def start(self, host: ExtensionHost) -> None:
        self._host = host
        host.verbs.register("spawn", "control", self.spawn)

    def amend_tree(self, tree: Supervisor, *, at_start: bool) -> Supervisor:
        for _, spec in tree.walk():
            if spec.name == SPAWNED_NAME:
                file = self.view.config.file
                raise ConfigError(
                    str(file) if file else None,
                    None,
                    spec.name,
                    f"no daemon or supervisor may be named '{SPAWNED_NAME}': "
                    "ikosd runs the actors of ikos.spawn under that name",
                )
        found = None if at_start else find_spec(self.view.tree, SPAWNED_NAME)
        if found is None:
            return tree
        return dataclasses.replace(tree, children=(*tree.children, found[0]))

    async def spawn(self, req: Request) -> Any:
        """``spawn {"class", "payload", "path", "name"?, "prefix"?}``: the actor's status."""
        carried = carried_from_request(req)
        name = req.args.get("name")
        if name is not None and not (isinstance(name, str) and NAME_RE.fullmatch(name)):
            raise BadRequest(f"'spawn': 'name' must be {NAME_RULE}")
        prefix = req.args.get("prefix", "actor")
        if not isinstance(prefix, str):
            raise BadRequest("'spawn': 'prefix' must be a string")
        async with self._lock:
            sup = self.view.find(SPAWNED_NAME)
            if sup is None:
                await self.ops.add_child(spawned_supervisor(), None, start=True)
            elif _count(self) >= MAX_SPAWNED:
                raise ManagerError(
                    f"ikosd keeps at most {MAX_SPAWNED} spawned actors: terminate some first",
                    "limit",
                )
            name = name or self._free_name(name_prefix(prefix))
            if name in self._reserved or self.view.find(name) is not None:
                raise DaemonExists(name)
            self._reserved.add(name)
        child = Child(
            name,
            carried,
            description=f"ikos.spawn({carried.class_path}) from pid {req.pid}",
        )
        try:
            node = await self.ops.add_child(child, SPAWNED_NAME, start=True)
        except StartFailed as exc:
            raise _refusal(start_error(name, exc))
        except IkosError as exc:
            raise _refusal(exc)
        finally:
            self._reserved.discard(name)
        log.info("actor '%s' (%s) spawned by pid %d", name, carried.class_path, req.pid)
        return self.view.status_of(node)

    def _free_name(self, prefix: str) -> str:
        numbers = self._numbers.setdefault(prefix, itertools.count(1))
        while True:
            name = f"{prefix}.{next(numbers)}"
            if name not in self._reserved and self.view.find(name) is None:
                return name


def _count(service: SpawnService) -> int:
    found = find_spec(service.view.tree, SPAWNED_NAME)
    spec = found[0] if found is not None else None
    return len(spec.children) if isinstance(spec, Supervisor) else 0
