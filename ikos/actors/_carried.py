"""An actor class carried by value: what ``ikos.spawn`` sends to run a class from ``__main__``.

A class defined in a REPL, a notebook or a script's ``__main__`` cannot be
imported by path in another process, so ``ikos.spawn`` ships it: the
class, its positional and keyword arguments are encoded together by the
codec (:mod:`ikos._codec`), which uses plain pickle (by reference: the
actor process imports the class's module) when that can load elsewhere, and
dill by value with ``recurse=True`` (the class's methods and just the
globals they use, lambdas and closures included) when the class lives in
``__main__`` or inside a function; modules always go by name.
:class:`CarriedActor` holds those bytes
with the class's name and the caller's own source directories; it is a
plain value (hashable, comparable), so that a ``Child`` spec can hold it
and a restart reuses the same bytes.

The bytes are opaque on the way: ikosd, the control socket and the fork
server pass them along and never unpickle them (unpickling is running code,
and ikosd must not run a client's code in its own process); only the actor
process loads them, in :func:`ikos.actors._runtime.spawn_entry`, after its
gate opened, where a failure is a failed start with the reason.

Rejected: dill for everything (an importable class would then be copied
into every spawn and could differ from the module the actor imports), and
shipping the caller's whole ``sys.path`` (a caller in another virtual
environment would put its own site-packages, built for another
interpreter, in front of ikosd's).
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import sys
import sysconfig
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ikos._codec import DILL, PICKLE, decode
from ikos._errors import SpawnError

#: Directories of the Python installation: never carried (the actor has its own).
_INSTALL_KEYS = ("stdlib", "platstdlib", "purelib", "platlib")


@dataclass(frozen=True)
class CarriedActor:
    """An actor class with its arguments, encoded in the caller's process.

    ``class_path`` is ``module:qualname`` (for status and errors only);
    ``payload`` the codec's bytes of ``(cls, args, kwargs)``; ``sys_path``
    the caller's own source directories, appended to the actor process's
    ``sys.path`` so that what the class imports by name is found there too.
    """

    class_path: str
    payload: bytes
    sys_path: tuple[str, ...] = ()

    @property
    def by_value(self) -> bool:
        """Whether dill carried the class itself (True) or pickle named it (False)."""
        return bool(self.payload) and self.payload[0] == DILL

    def load(self) -> tuple[type, tuple[Any, ...], dict[str, Any]]:
        """In the actor process: ``(cls, args, kwargs)``. Runs the class's code."""
        for directory in self.sys_path:
            if directory not in sys.path:
                sys.path.append(directory)  # after the actor's own: never shadow ikos
        cls, args, kwargs = decode(self.payload)
        return cls, tuple(args), dict(kwargs)


def carry(
    cls: type, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *, name: str
) -> CarriedActor:
    """Encode ``cls(*args, **kwargs)`` for another process; ``name`` is for errors.

    Raises :class:`SpawnError` naming the class when it is no
    :class:`ikos.Actor` subclass or when neither pickle nor dill can encode
    it (a class attribute holding a generator, a socket, a lock held open).
    """
    from ikos.actors._actor import Actor

    if not (isinstance(cls, type) and issubclass(cls, Actor)):
        raise SpawnError(name, "actor", f"expected a subclass of ikos.Actor, got {cls!r}")
    class_path = f"{cls.__module__}:{cls.__qualname__}"
    try:
        payload = _encode((cls, tuple(args), dict(kwargs or {})))
    except Exception as exc:
        raise SpawnError(
            name,
            "actor",
            f"cannot send class {class_path} and its arguments to another process: dill "
            f"could not serialize them ({type(exc).__name__}: {exc})",
        ) from exc
    return CarriedActor(class_path, payload, source_directories())


def _encode(value: Any) -> bytes:
    """The codec's encoding (pickle, else dill, by the same rule: a payload naming
    ``__main__`` goes by value), with modules always by name in the dill stream."""
    try:
        data = pickle.dumps(value, protocol=5)
    except (pickle.PicklingError, AttributeError, TypeError):
        data = b""
    if data and b"__main__" not in data:
        return bytes([PICKLE]) + data
    buffer = io.BytesIO()
    _module_pickler()(buffer, 5, recurse=True).dump(value)
    return bytes([DILL]) + buffer.getvalue()


@functools.cache
def _module_pickler() -> type:
    import dill  # only when a class goes by value

    class ModulesByName(dill.Pickler):  # type: ignore[misc]
        """dill, except that a module is imported by name where it is loaded.

        dill copies the namespace of any module outside the Python installation
        (a user's helper module, ikos from a checkout) into the stream, by its
        state: that fails on the first unpicklable global (a ``struct.Struct``)
        and would overwrite the module's globals in the actor. A class's code
        needs the module, by name, as any ``import`` line would give it.
        """

        def save(self, obj: Any, save_persistent_id: bool = True) -> None:
            if type(obj) is types.ModuleType and obj.__name__ != "__main__":
                self.save_reduce(importlib.import_module, (obj.__name__,), obj=obj)
                return
            super().save(obj, save_persistent_id)

    return ModulesByName


def source_directories() -> tuple[str, ...]:
    """The caller's ``sys.path`` without the Python installation's own directories.

    What is left is the script's directory (or the working directory of a
    REPL), ``PYTHONPATH`` and paths the program added: where its own modules
    come from.
    """
    installed = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        for key in _INSTALL_KEYS:
            path = sysconfig.get_path(key, vars={"base": prefix, "platbase": prefix})
            if path:
                installed.add(os.path.realpath(path))
    found: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(path) or path in found:
            continue
        if any(path == p or path.startswith(p + os.sep) for p in installed):
            continue
        if os.path.basename(path) in ("site-packages", "dist-packages"):
            continue
        found.append(path)
    return tuple(found)
