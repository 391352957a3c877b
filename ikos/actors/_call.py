"""Method calls as messages: what a proxy sends and how the actor's process applies it.

A proxy (``ActorRef.proxy()``) turns ``ref.proxy().incr(5)`` into an ask whose
message is a :class:`MethodCall`. The actor's runtime recognises the class by
identity (one pointer comparison on the hot path) and applies it to the actor
instead of calling ``receive``. Only public methods may be called: a name
starting with ``_`` or one of the base class's life-cycle hooks is refused
with a clear error, answered to the caller like any exception of a handler.
"""

from __future__ import annotations

from typing import Any


class MethodCall:
    """A call of the actor's method ``method`` with ``args`` and ``kwargs``."""

    __slots__ = ("args", "kwargs", "method")

    def __init__(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.method = method
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (MethodCall, (self.method, self.args, self.kwargs))

    def __repr__(self) -> str:
        return f"MethodCall({self.method!r}, {self.args!r}, {self.kwargs!r})"

    def apply(self, actor: Any) -> Any:
        """Call the method on ``actor`` (in the actor's process); its result, or
        for an ``async def`` method the coroutine, which an async runtime awaits."""
        return getattr(actor, self.method)(*self.args, **self.kwargs)
