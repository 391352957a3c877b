"""The one exception tree of ikos.

Every error ikos raises derives from :class:`IkosError`. Errors carry what a
user needs to act on them (daemon name, pid, file and key) and survive
pickling, because they cross process boundaries: an actor's failure is
raised again in the process that asked it.

Every subclass of :class:`IkosError` in the package is drawn here; those
defined next to the code that raises them name their module in brackets
(a test walks the classes and checks this drawing)::

    IkosError
    ├── ConfigError                a bad ikos.toml entry (file, table, key, expected)
    │   ├── SpecError              an invalid child or supervisor specification (path, key)
    │   │   ├── DependencyCycle    requires/after form a cycle [registry._graph]
    │   │   └── UnknownDependency  requires/after names no child [registry._graph]
    │   └── UnitError              a systemd unit ikos cannot run (file, line, directive)
    │                              [platform._unit]
    ├── ActorError                 something went wrong talking to an actor
    │   ├── ActorDeadError         the actor is not running, or stopped before answering
    │   ├── ActorCrashed           receive() raised while handling your ask
    │   ├── AskTimeout             no answer within the timeout (also a TimeoutError)
    │   ├── MailboxFull            the mailbox stayed full for the whole timeout
    │   ├── MessageTooLarge        the encoded message exceeds the frame limit
    │   └── MethodRefused          a proxy called what is not a public method (also an
    │                              AttributeError)
    ├── AuthenticationError        a peer failed the HMAC challenge
    ├── SpawnError                 a process could not be started (daemon, field, reason)
    ├── StartFailed                a child did not start: its exit reason [supervision._runtime]
    ├── IllegalTransition          a state change the state diagram forbids (a bug)
    │                              [supervision._runtime]
    ├── DatabaseUnavailable        a store cannot be opened or written (permissions, disk)
    │                              [platform._database]
    ├── PidFileError               a PID file is unreadable or names the wrong process
    │   │                          [platform._pidfile]
    │   └── PidFileLocked          another live holder owns the PID file [platform._pidfile]
    ├── InvalidService             a ServiceInfo field breaks a rule [registry._service]
    ├── IpcError                   an ikos.ipc call failed (the broker's error type)
    │   ├── IpcBadRequest          the broker refused a malformed request
    │   ├── IpcDenied              the policy does not grant this to the caller
    │   ├── IpcNoSuchTarget        no actor, served name, service or queue by that name
    │   ├── IpcTimeout             no answer within the timeout (also a TimeoutError)
    │   ├── IpcTooLarge            the payload exceeds the frame limit
    │   ├── IpcFull                a bound was reached (queue, clients)
    │   ├── IpcUnavailable         the broker cannot be reached (names the socket)
    │   └── IpcRemoteError         the target raised while handling the request
    ├── QueueError                 a durable queue refused a request (queue, why) [ipc._queues]
    │   ├── QueueFull              the queue holds its max_messages [ipc._queues]
    │   ├── NotLeased              ack/nack of a message not leased to the caller [ipc._queues]
    │   └── QueueUnavailable       the store cannot commit (disk), or is closed [ipc._queues]
    └── ManagerError               the manager refused or failed a request (code)
        ├── ManagerUnavailable     no manager answers on the control socket
        ├── NoSuchDaemon           no daemon, actor or supervisor by that name
        │   └── NoSuchService      no service by that name [registry._service]
        ├── PermissionDenied       the caller may read but not control
        │   └── NotServiceOwner    only the service's owner may change it [registry._service]
        ├── DaemonExists           daemon_create: the name is taken (ikos.daemon.DaemonExists)
        ├── UpgradeFailed          a hot code upgrade failed; the old incarnation serves on
        ├── ServiceConflict        the service name is held by a live owner [registry._service]
        ├── RegistryFull           the registry holds its limit of services [registry._service]
        ├── ServiceTimeout         no matching service became active in time (also a
        │                          TimeoutError) [registry._client]
        ├── BadRequest             a malformed control request [manager._control_server]
        ├── UnknownVerb            a control verb the manager does not serve
        │                          [manager._control_server]
        └── InstanceLocked         another ikosd already runs on this root [manager._manager]
"""

from __future__ import annotations

import re
from typing import Any


class IkosError(Exception):
    """Root of every error raised by ikos.

    Subclasses store their constructor arguments in ``self.args`` in order, so
    that the default pickling of exceptions rebuilds them in another process.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class ConfigError(IkosError):
    """A configuration entry is invalid.

    ``file``, ``table`` and ``key`` locate the entry; ``expected`` says what
    was expected and ``got`` what was found.
    """

    def __init__(
        self,
        file: str | None,
        table: str | None,
        key: str | None,
        expected: str,
        got: object = None,
    ) -> None:
        super().__init__(file, table, key, expected, got)
        self.file, self.table, self.key = file, table, key
        self.expected, self.got = expected, got

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.table:
            where.append(f"[{self.table}]")
        if self.key:
            where.append(f"key '{self.key}'")
        loc = " ".join(where) or "configuration"
        text = f"{loc}: expected {self.expected}"
        if self.got is not None:
            text += f", got {self.got!r}"
        return text


class SpecError(ConfigError):
    """A supervision-tree specification is invalid.

    ``path`` is the chain of supervisor names down to the offending child,
    e.g. ``"root/workers/echo"``.
    """

    def __init__(self, path: str, key: str | None, expected: str, got: object = None) -> None:
        IkosError.__init__(self, path, key, expected, got)
        self.file, self.table, self.key = None, path, key
        self.expected, self.got = expected, got
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.key, self.expected, self.got))

    def __str__(self) -> str:
        text = f"{self.path}"
        if self.key:
            text += f": {self.key}"
        text += f": expected {self.expected}"
        if self.got is not None:
            text += f", got {self.got!r}"
        return text


class ActorError(IkosError):
    """Talking to an actor failed. ``name`` is the actor's name."""

    def __init__(self, name: str, message: str = "") -> None:
        super().__init__(name, message)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return f"actor '{self.name}': {self.message}" if self.message else f"actor '{self.name}'"


class ActorDeadError(ActorError):
    """The actor is not running, or stopped before it answered."""


class ActorCrashed(ActorError):
    """``receive`` raised while handling this ask; the actor crashed.

    ``exc_type`` and ``traceback`` describe the exception in the actor.
    """

    def __init__(
        self, name: str, message: str = "", exc_type: str = "", traceback: str = ""
    ) -> None:
        IkosError.__init__(self, name, message, exc_type, traceback)
        self.name, self.message = name, message
        self.exc_type, self.traceback = exc_type, traceback


class AskTimeout(ActorError, TimeoutError):
    """No answer came within the ask's timeout."""


class MailboxFull(ActorError):
    """The actor's mailbox stayed full for the whole send timeout."""


class MessageTooLarge(ActorError):
    """The encoded message is larger than the frame limit."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        IkosError.__init__(self, name, size, limit)
        self.name, self.size, self.limit = name, size, limit
        self.message = f"message of {size} bytes exceeds the limit of {limit} bytes"


class MethodRefused(ActorError, AttributeError):  # type: ignore[misc]  # name: str, never None
    """A proxy call named something that is not one of the actor's public methods.

    ``method`` is the name called, ``reason`` why it was refused (private,
    part of ``ikos.Actor``'s API, missing, not callable). The actor is not
    affected: a refusal is the caller's mistake, answered to the caller.
    """

    def __init__(self, name: str, method: str, reason: str) -> None:
        IkosError.__init__(self, name, method, reason)
        self.name, self.method, self.reason = name, method, reason
        self.message = f"cannot call {method!r} through a proxy: {reason}"


class AuthenticationError(IkosError):
    """A peer failed the HMAC challenge, or the secret could not be read."""


class SpawnError(IkosError):
    """A process could not be started: ``daemon`` names it, ``field`` the cause."""

    def __init__(self, daemon: str, field: str | None, reason: str) -> None:
        super().__init__(daemon, field, reason)
        self.daemon, self.field, self.reason = daemon, field, reason

    def __str__(self) -> str:
        where = f"daemon '{self.daemon}'" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.reason}"


class ManagerError(IkosError):
    """The manager refused or failed a request. ``code`` is the protocol error code."""

    code = "failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message, code)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class ManagerUnavailable(ManagerError):
    """No manager answers on the control socket."""

    code = "unavailable"


class NoSuchDaemon(ManagerError):
    """No daemon, actor, supervisor or service by that name."""

    code = "no_such_daemon"


class PermissionDenied(ManagerError):
    """The caller is neither root nor the instance's owner, and asked to control."""

    code = "permission_denied"


class DaemonExists(ManagerError):
    """``daemon_create``: a daemon, actor or supervisor by that name already exists.

    Raised by the manager, and again by the client (``ikos.daemon.create``)
    from the answer's code, ``daemon_exists``; ``name`` is the name taken.
    """

    code = "daemon_exists"

    def __init__(self, name: str, message: str | None = None) -> None:
        IkosError.__init__(self, name, message)
        self.name = name
        self.message = message or f"a daemon, actor or supervisor named '{name}' already exists"

    @classmethod
    def from_answer(cls, message: str) -> DaemonExists:
        """The error again, from the message of a ``daemon_exists`` answer."""
        found = re.search(r"named '([^']*)'", message)
        return cls(found.group(1) if found else "", message)


class UpgradeFailed(ManagerError):
    """A hot code upgrade failed and the old incarnation serves on (``ikos.upgrade``).

    ``name`` is the actor, ``reason`` one line saying why (the new code's
    exception, its last line), ``traceback`` the new code's traceback when it
    raised. Rebuilt by the client from the answer's message, whose first line
    is the reason and the rest the traceback.
    """

    code = "upgrade_failed"

    def __init__(self, name: str, reason: str, traceback: str = "") -> None:
        IkosError.__init__(self, name, reason, traceback)
        self.name, self.reason, self.traceback = name, reason, traceback
        self.message = reason

    @classmethod
    def from_answer(cls, message: str) -> UpgradeFailed:
        """The error again, from the message of an ``upgrade_failed`` answer."""
        reason, _, traceback = message.partition("\n")
        found = re.search(r"actor '([^']*)'", reason)
        return cls(found.group(1) if found else "", reason, traceback)


class IpcError(IkosError):
    """An ``ikos.ipc`` call failed; ``message`` says what, ``type`` is the wire's error type."""

    type = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class IpcBadRequest(IpcError):
    """The broker refused a malformed request (a bug in the caller or the client)."""

    type = "bad_request"


class IpcDenied(IpcError):
    """The policy does not grant this operation to the caller's user or groups."""

    type = "denied"


class IpcNoSuchTarget(IpcError):
    """No actor, served name, registered service or queue answers to that name."""

    type = "no_such_target"


class IpcTimeout(IpcError, TimeoutError):
    """No answer, message or delivery came within the timeout."""

    type = "timeout"


class IpcTooLarge(IpcError):
    """The payload exceeds the broker's frame limit."""

    type = "too_large"


class IpcFull(IpcError):
    """A bound was reached: a queue's ``max_messages``, the broker's client limits."""

    type = "full"


class IpcUnavailable(IpcError):
    """The broker cannot be reached, or its connection was lost mid-call."""

    type = "unavailable"


class IpcRemoteError(IpcError):
    """The target raised while handling the request.

    ``remote_type`` is the exception's class name there and ``traceback`` its
    traceback, as text (empty when the target did not send one).
    """

    type = "remote"

    def __init__(self, message: str, remote_type: str = "", traceback: str = "") -> None:
        IkosError.__init__(self, message, remote_type, traceback)
        self.message, self.remote_type, self.traceback = message, remote_type, traceback


#: The broker's error types (docs/protocol.md) and the exceptions they raise.
IPC_ERRORS: dict[str, type[IpcError]] = {
    cls.type: cls
    for cls in (
        IpcBadRequest,
        IpcDenied,
        IpcNoSuchTarget,
        IpcTimeout,
        IpcTooLarge,
        IpcFull,
        IpcUnavailable,
        IpcRemoteError,
    )
}


def error_for_code(code: str, message: str) -> ManagerError:
    """Map a control-protocol error code back to its exception class."""
    if code == DaemonExists.code:
        return DaemonExists.from_answer(message)
    if code == UpgradeFailed.code:
        return UpgradeFailed.from_answer(message)
    for cls in (ManagerUnavailable, NoSuchDaemon, PermissionDenied):
        if cls.code == code:
            return cls(message)
    return ManagerError(message, code)
