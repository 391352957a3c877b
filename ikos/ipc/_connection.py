"""Connections to one target: an actor, a served name, or a registered service.

Resolution picks the path once, at connect: an actor of the instance, for a
process that can read the instance secret, is reached directly over its
mailbox (``ActorRef``, the ask path at the pipe floor); everything else goes
through the broker. A registered service resolves to its daemon through the
control socket (the registry layer sits above this one). Actor errors are
turned into the IPC errors, so a caller catches one family whatever the path.
"""

from __future__ import annotations

import itertools
import os
import queue as _queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ikos._errors import (
    ActorCrashed,
    ActorDeadError,
    ActorError,
    AskTimeout,
    AuthenticationError,
    IkosError,
    IpcBadRequest,
    IpcError,
    IpcNoSuchTarget,
    IpcRemoteError,
    IpcTimeout,
    IpcTooLarge,
    IpcUnavailable,
    MessageTooLarge,
)
from ikos.ipc._client import (
    DEFAULT_TIMEOUT,
    BrokerClient,
    instance_paths,
    shared_client,
)
from ikos.ipc._message import (
    Codec,
    IpcMessage,
    MessageType,
    now,
)
from ikos.platform._paths import InstancePaths


def _trusted_context(root: str | os.PathLike[str] | None) -> Any:
    """The instance context with its secret, where this process may take the direct path.

    None where the secret is not readable, and where it belongs to another uid:
    root can read any user's secret, but the direct path unpickles the actor's
    replies, and root must not unpickle what a user's process wrote. Such a
    caller goes through the broker, which then speaks JSON to it.
    """
    from ikos.actors import _context

    try:
        ctx = _context.get(root)
        owner = ctx.paths.secret_file.stat().st_uid
    except (AuthenticationError, OSError):
        return None
    return ctx if owner == os.geteuid() else None


def _service_target(paths: InstancePaths, name: str) -> str | None:
    """The daemon or name that answers for the registered service ``name``, if one does.

    An ``endpoint`` of ``ipc://NAME`` or ``actor://NAME`` names it; otherwise the
    service's owner (the daemon that declared it) does. Asked of ikosd's registry
    over the control socket (the registry layer sits above this one).
    """
    from ikos.platform._control import ControlClient

    try:
        with ControlClient(paths, timeout=DEFAULT_TIMEOUT) as control:
            found = control.call("discover", {"name": name})
    except (IkosError, OSError):
        return None
    info = found[0] if isinstance(found, list) and found and isinstance(found[0], dict) else {}
    endpoint = str(info.get("endpoint") or "")
    for scheme in ("ipc://", "actor://"):
        if endpoint.startswith(scheme) and endpoint[len(scheme) :]:
            return endpoint[len(scheme) :]
    owner = info.get("owner")
    return owner if isinstance(owner, str) and owner else None


def _resolve(name: str, root: str | os.PathLike[str] | None) -> tuple[str, bool]:
    """``(target, direct)``: the actor or broker name to talk to, and whether directly.

    An actor of the instance first, then a registered service (by its daemon),
    then whatever the broker routes ``name`` to (a served name, or an actor for a
    process that cannot reach mailboxes).
    """
    ctx = _trusted_context(root)
    paths = ctx.paths if ctx is not None else instance_paths(root)
    if ctx is not None and paths.actor_socket(name).exists():
        return name, True
    target = _service_target(paths, name) or name
    if ctx is not None and paths.actor_socket(target).exists():
        return target, True
    return target, False


def _actor_error(name: str, exc: ActorError) -> IpcError:
    """An actor's error as the IPC error a caller of ikos.ipc catches."""
    if isinstance(exc, AskTimeout):
        return IpcTimeout(f"'{name}' did not answer: {exc.message}")
    if isinstance(exc, ActorCrashed):
        return IpcRemoteError(f"'{name}' raised: {exc.message}", exc.exc_type, exc.traceback)
    if isinstance(exc, ActorDeadError):
        return IpcNoSuchTarget(f"'{name}' is not running: {exc.message}")
    if isinstance(exc, MessageTooLarge):
        return IpcTooLarge(str(exc))
    return IpcError(str(exc))


class Connection:
    """A connection to one target: an actor, a served name, or a registered service.

    :meth:`request` sends and waits for the reply; :meth:`send_message` sends and
    returns the message id at once, the reply (for a ``request``) arriving later
    through :meth:`receive_message`. Replies are :class:`IpcMessage` values of
    type ``response`` whose ``correlation_id`` is the request's id.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        root: str | os.PathLike[str] | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.codec = codec
        self.target, self.direct = _resolve(name, root)
        self._root = root
        self._ref: Any = None
        self._client: BrokerClient | None = None
        if self.direct:
            from ikos.actors._ref import ActorRef

            self._ref = ActorRef(self.target, root=root)
        else:
            self._client = shared_client(root)
            self._client.connect()
        self._ids = itertools.count(1)
        self._inbox: _queue.Queue[IpcMessage | BaseException] = _queue.Queue()
        self._worker: ThreadPoolExecutor | None = None
        self._closed = False

    def __repr__(self) -> str:
        via = "mailbox" if self.direct else "broker"
        return f"Connection({self.name!r}, via={via})"

    def _check(self) -> None:
        if self._closed:
            raise IpcUnavailable(f"the connection to '{self.name}' is closed")

    def _message(self, value: Any, corr: int, size: int, codec: str, sender: int = 0) -> IpcMessage:
        return IpcMessage(
            message_id=next(self._ids),
            sender_pid=sender,
            receiver_pid=os.getpid(),
            type="response",
            payload_size=size,
            timestamp=now(),
            payload=value,
            correlation_id=corr,
            codec=codec,  # type: ignore[arg-type]
        )

    def _ask(self, data: Any, timeout: float, corr: int) -> IpcMessage:
        if self.direct:
            try:
                value = self._ref.ask(data, timeout=timeout)
            except ActorError as exc:
                raise _actor_error(self.name, exc) from None
            return self._message(value, corr, 0, "pickle")
        assert self._client is not None
        value, frame = self._client.request(self.target, data, timeout=timeout, codec=self.codec)
        sender = frame.header.get("sender_pid")
        return self._message(
            value,
            corr,
            len(frame.payload),
            str(frame.header.get("codec")),
            sender if isinstance(sender, int) else 0,
        )

    def request(self, data: Any, timeout: float | None = None) -> IpcMessage:
        """Send ``data`` as a request and return the response (its payload: the reply).

        Raises :class:`IpcTimeout`, :class:`IpcNoSuchTarget`, :class:`IpcDenied`,
        :class:`IpcRemoteError` (the target raised) and the other IPC errors.
        """
        self._check()
        return self._ask(data, self.timeout if timeout is None else timeout, next(self._ids))

    def send_message(
        self, data: Any, type: MessageType = "request", timeout: float | None = None
    ) -> int:
        """Send ``data`` and return its message id at once.

        A ``request``'s reply comes later by :meth:`receive_message`; a
        ``notification`` is one way (no reply).
        """
        self._check()
        mid = next(self._ids)
        wait = self.timeout if timeout is None else timeout
        if type == "notification":
            if self.direct:
                self._ref.tell(data)
            else:
                assert self._client is not None
                self._client.notify(self.target, data, codec=self.codec)
            return mid
        if type != "request":
            raise IpcBadRequest(f"send_message sends a request or a notification, not a {type}")
        if self._worker is None:
            # one thread: the mailbox connection is per thread, so replies keep their order
            self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"ikos-ipc-{self.name}")

        def ask() -> None:
            try:
                self._inbox.put(self._ask(data, wait, mid))
            except IkosError as exc:
                self._inbox.put(exc)

        self._worker.submit(ask)
        return mid

    def receive_message(self, timeout: float | None = None) -> IpcMessage:
        """The next response; :class:`IpcTimeout` when none came within ``timeout`` s."""
        self._check()
        try:
            item = self._inbox.get(timeout=timeout)
        except _queue.Empty:
            raise IpcTimeout(f"no message from '{self.name}' within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def disconnect(self) -> None:
        """Close the connection (idempotent); replies not yet received are discarded."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    close = disconnect

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
