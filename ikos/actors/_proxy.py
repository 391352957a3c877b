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

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ikos._errors import MethodRefused
from ikos.actors._call import MethodCall, name_refusal

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef


class ProxyMethod:
    """One method of a proxied actor: calling it asks, ``future`` asks without waiting.

    Example::

        incr = counter.proxy().incr
        incr(5)                      # blocks for the result
        incr.future(5).result()      # a concurrent.futures.Future
    """

    __slots__ = ("_call", "_method", "_ref", "_timeout")

    def __init__(self, ref: ActorRef[Any], method: str, timeout: float) -> None:
        self._ref = ref
        self._call = ref._call
        self._method = method
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self._method, args, kwargs, self._timeout)

    def future(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """The call as an ask on the pipelined connection (``ActorRef.ask_future``)."""
        return self._ref.ask_future(MethodCall(self._method, args, kwargs), self._timeout)

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """The call awaited from asyncio code (``ActorRef.ask_async``)."""
        return await asyncio.wrap_future(self.future(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<proxy method {self._method!r} of {self._ref!r}>"


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

    def __setattr__(self, name: str, value: Any) -> None:
        ref = self.__dict__["_ikos_proxy"][0]
        raise MethodRefused(ref.name, name, "a proxy cannot set attributes: call a method")

    def __repr__(self) -> str:
        ref, timeout, mode = self.__dict__["_ikos_proxy"]
        kind = "proxy" if mode == "call" else f"{mode} proxy"
        return f"<{kind} of {ref!r}, timeout {timeout:g} s>"
