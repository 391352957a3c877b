"""Method calls as messages: what a proxy sends and how the actor's process applies it.

A proxy (``ActorRef.proxy()``) turns ``ref.proxy().incr(5)`` into an ask whose
message is a :class:`MethodCall`. The actor's runtime recognises the class by
identity (one pointer comparison on the hot path) and applies it to the actor
instead of calling ``receive``.

Only the actor's own public methods may be called. Refused, with a
:class:`~ikos.MethodRefused` naming the actor, the method and the reason:
names starting with ``_``; everything ``ikos.Actor`` defines or reserves
(its hooks ``receive``, ``on_start``, ``on_stop`` and its helpers ``stop``,
``actor``, ``ref``, ``subscribe``, ``monitor``, timers, state handover...),
even where a subclass overrides them; names the class does not define; and
class attributes that are not methods (plain values, properties and other
data descriptors: a property is refused *before* it runs, so a proxy never
triggers its code). Attribute reads are not proxied at all: a proxy cannot
tell ``p.count`` from ``p.incr`` without a round trip, and under typing
``p.count`` would claim a value where there is a call; a method is the way.

A refusal is the caller's mistake, not the actor's, so it must not crash the
actor as an exception out of a handler does: :meth:`MethodCall.apply`
*returns* the :class:`~ikos.MethodRefused`, and the proxy raises it on the
calling side. An exception raised by the method itself is a handler's crash
like one in ``receive`` (the caller gets :class:`~ikos.ActorCrashed` with the
remote traceback, the supervisor restarts the actor).

The rejected alternative, a pickled ``dataclass``, costs more per call than
this ``__slots__`` class with an explicit ``__reduce__``; the check of a
name is cached per (class, name) once allowed, so a proxy call costs the
actor one dictionary lookup more than a ``receive``.
"""

from __future__ import annotations

import inspect
from typing import Any

from ikos._errors import MethodRefused
from ikos.actors._actor import Actor

#: Names of ``ikos.Actor``'s API that other parts of the model add to the base
#: class (timers, monitors, state handover): refused even before they exist there.
RESERVED = frozenset(
    {
        "receive",
        "on_start",
        "on_stop",
        "stop",
        "actor",
        "ref",
        "name",
        "subscribe",
        "unsubscribe",
        "monitor",
        "demonitor",
        "send_after",
        "send_interval",
        "get_state",
        "set_state",
        "code_change",
    }
)

#: The method of a call whose payload was malformed (refused by :meth:`MethodCall.apply`).
_MALFORMED = "<malformed call>"

#: (class, name) pairs already found to be public methods: the check runs once.
_allowed: set[tuple[type, str]] = set()


def name_refusal(name: str) -> str | None:
    """Why ``name`` is refused whatever the actor's class (None if it is not): a
    proxy checks this before sending anything."""
    if name.startswith("_"):
        return "private (the name starts with '_')"
    if name in RESERVED or hasattr(Actor, name):
        return "part of ikos.Actor's API (a hook or a helper), not one of the actor's own methods"
    return None


def refusal(cls: type, name: str) -> str | None:
    """Why ``name`` may not be called on an instance of ``cls`` through a proxy
    (None when it may): the rules of the module docstring."""
    why = name_refusal(name)
    if why is not None:
        return why
    try:
        value = inspect.getattr_static(cls, name)
    except AttributeError:
        return f"{cls.__name__} has no method {name!r} (attribute reads are not proxied)"
    if isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value):
        return None
    if isinstance(value, property) or hasattr(type(value), "__set__"):
        return "a property or data attribute, not a method (attribute reads are not proxied)"
    if not callable(value):
        return f"an attribute of type {type(value).__name__}, not a method"
    return None


class MethodCall:
    """A call of the actor's method ``method`` with ``args`` and ``kwargs``."""

    __slots__ = ("args", "kwargs", "method")

    def __init__(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.method = method
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (MethodCall, (self.method, self.args, self.kwargs))

    @classmethod
    def from_wire(cls, payload: Any) -> MethodCall:
        """The call a ``CALL`` frame carries as ``(method, args, kwargs)``; never raises:
        a malformed payload becomes a call that :meth:`apply` refuses."""
        if (
            payload.__class__ is tuple
            and len(payload) == 3
            and payload[0].__class__ is str
            and payload[1].__class__ is tuple
            and payload[2].__class__ is dict
        ):
            return cls(*payload)
        return cls(_MALFORMED, (), {})

    def __repr__(self) -> str:
        return f"MethodCall({self.method!r}, {self.args!r}, {self.kwargs!r})"

    def apply(self, actor: Any) -> Any:
        """Call the method on ``actor`` (in the actor's process): its result, or for an
        ``async def`` method the coroutine, which an async runtime awaits; for a name
        that may not be called, the :class:`~ikos.MethodRefused` (returned, not raised:
        see the module docstring)."""
        cls = type(actor)
        name = self.method
        if name.__class__ is not str or (cls, name) not in _allowed:
            why: str | None
            if name is _MALFORMED:
                why = "the call is malformed (not a (method, args, kwargs) triple)"
            elif name.__class__ is not str:
                why = "the name is not a string"
            else:
                why = refusal(cls, name)
            if why is not None:
                return MethodRefused(getattr(actor, "name", "") or cls.__name__, str(name), why)
            _allowed.add((cls, name))
        return getattr(actor, name)(*self.args, **self.kwargs)
