"""Method proxies: ``ref.proxy().incr(5)`` as an ask carrying a :class:`MethodCall`.

A proxy knows only the actor's name, not its class (a reference is a name),
so any public-looking attribute gives a callable, and the actor's process
decides whether the call is allowed (``ikos.actors._call``). Names the base
class owns or that start with ``_`` are refused here already, without a
round trip, with the same :class:`~ikos.MethodRefused`.

Cost: the callable for a name is made once and stored in the proxy's
``__dict__``, so the next ``p.incr`` is a plain attribute read that never
reaches ``__getattr__``; each call then builds one ``__slots__`` object and
goes through ``ActorRef.ask`` itself (same connection, same order as the
thread's other asks and tells). The typing (``proxy()`` returns the actor's
class for mypy) is in ``ActorRef``; at run time it is this object.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ikos._errors import MethodRefused
from ikos.actors._call import MethodCall, name_refusal

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef


class ProxyMethod(functools.partial[Any]):
    """One method of a proxied actor: calling it asks, ``future`` asks without waiting.

    A :func:`functools.partial` of ``ActorRef._call``, so that a call enters
    Python code once, in ``_call`` itself: a proxy call then costs little more
    than an ask.

    Example::

        incr = counter.proxy().incr
        incr(5)                      # blocks for the result
        incr.future(5).result()      # a concurrent.futures.Future
    """

    def __new__(cls, ref: ActorRef[Any], method: str, timeout: float) -> ProxyMethod:
        return super().__new__(cls, ref._call, (method, timeout))

    def __reduce__(self) -> tuple[Any, ...]:
        method, timeout = self.args[0]
        return (ProxyMethod, (self.func.__self__, method, timeout))  # type: ignore[attr-defined]

    def future(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """The call as an ask on the pipelined connection (``ActorRef.ask_future``)."""
        method, timeout = self.args[0]
        return self.func.__self__.ask_future(MethodCall(method, args, kwargs), timeout)  # type: ignore[attr-defined, no-any-return]

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """The call awaited from asyncio code (``ActorRef.ask_async``)."""
        method, timeout = self.args[0]
        ref = self.func.__self__  # type: ignore[attr-defined]
        return await ref.ask_async(MethodCall(method, args, kwargs), timeout)

    def __repr__(self) -> str:
        return f"<proxy method {self.args[0][0]!r} of {self.func.__self__!r}>"  # type: ignore[attr-defined]


class Proxy:
    """What ``ActorRef.proxy()`` returns: attribute ``m`` is a :class:`ProxyMethod`.

    With ``mode`` ``"future"`` (``ActorRef.future_proxy()``) an attribute is the
    method's ``future`` instead, and with ``"async"`` its ``call_async``.
    """

    def __init__(self, ref: ActorRef[Any], timeout: float, mode: str = "call") -> None:
        # set through __dict__: every other attribute name belongs to the actor
        self.__dict__["_ikos_proxy"] = (ref, timeout, mode)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        ref, timeout, mode = self.__dict__["_ikos_proxy"]
        why = name_refusal(name)
        if why is not None:
            raise MethodRefused(ref.name, name, why)
        method = ProxyMethod(ref, name, timeout)
        bound = method if mode == "call" else getattr(method, mode)
        self.__dict__[name] = bound  # cached: the next lookup never comes here
        return bound

    def __reduce__(self) -> tuple[Any, ...]:
        return (Proxy, self.__dict__["_ikos_proxy"])

    def __setattr__(self, name: str, value: Any) -> None:
        ref = self.__dict__["_ikos_proxy"][0]
        raise MethodRefused(ref.name, name, "a proxy cannot set attributes: call a method")

    def __repr__(self) -> str:
        ref, timeout, mode = self.__dict__["_ikos_proxy"]
        kind = "proxy" if mode == "call" else f"{mode} proxy"
        return f"<{kind} of {ref!r}, timeout {timeout:g} s>"
