"""A subscription: the deliveries of one topic pattern, to a callback or to be taken.

Deliveries arrive in the broker connection's reader thread and are put in the
subscription's own bounded deque; a callback runs in the subscription's own
thread, so that a slow callback delays neither answers to calls nor other
subscriptions. The bound (:data:`LOCAL_QUEUE`) drops the oldest delivery,
counted, rather than let a stalled consumer grow the process without limit;
the broker bounds what waits on its side the same way (``subscriber_queue``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from ikos._errors import (
    IpcError,
    IpcTimeout,
    IpcUnavailable,
)
from ikos.ipc._client import (
    BrokerClient,
    log,
)
from ikos.ipc._message import (
    IpcMessage,
)

#: Deliveries one subscription holds before the oldest is dropped (counted).
LOCAL_QUEUE: Final = 10000


class Subscription:
    """Deliveries of one topic pattern: to a callback (in its own thread) or to be taken.

    Without a callback, take messages with :meth:`get` or by iterating; at most
    :data:`LOCAL_QUEUE` wait here, past that the oldest is dropped. ``dropped``
    counts the deliveries lost, here and in the broker (its ``dropped`` notices).

    Example::

        with ikos.ipc.subscribe("net.*") as sub:
            for message in sub:
                print(message.topic, message.payload)
    """

    def __init__(
        self,
        client: BrokerClient,
        pattern: str,
        callback: Callable[[IpcMessage], Any] | None = None,
        maxsize: int = LOCAL_QUEUE,
    ) -> None:
        self.client, self.pattern, self.callback = client, pattern, callback
        self.dropped = 0
        self.received = 0
        self._items: collections.deque[IpcMessage] = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(
                target=self._run_callbacks, name=f"ikos-ipc-sub-{pattern}", daemon=True
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"Subscription({self.pattern!r})"

    @property
    def active(self) -> bool:
        return not self._ended

    def _put(self, message: IpcMessage) -> None:
        with self._cond:
            if self._ended:
                return
            if len(self._items) >= self._maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(message)
            self.received += 1
            self._cond.notify()

    def _end(self, error: BaseException | None) -> None:
        with self._cond:
            self._ended = True
            self._error = error
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> IpcMessage:
        """The next delivery; :class:`IpcTimeout` when none came within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    raise IpcUnavailable(f"the subscription to {self.pattern!r} has ended")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise IpcTimeout(f"no message on {self.pattern!r} within {timeout:g} s")
                self._cond.wait(remaining)
            return self._items.popleft()

    def __iter__(self) -> Iterator[IpcMessage]:
        while True:
            try:
                yield self.get()
            except IpcUnavailable:
                if self._error is not None:
                    raise
                return

    def _run_callbacks(self) -> None:
        callback = self.callback
        assert callback is not None
        while True:
            try:
                message = self.get()
            except IpcError:
                return
            try:
                callback(message)
            except Exception:
                log.exception(
                    "ikos.ipc: the callback of the subscription to %r raised", self.pattern
                )

    def unsubscribe(self) -> None:
        """Stop the deliveries (idempotent); a callback thread ends after the current call."""
        if self._ended:
            return
        self._end(None)
        self.client._remove_subscription(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    close = unsubscribe

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()
