"""What a service is: the ``ServiceInfo`` value, its validation and its errors.

A service is a named endpoint that a daemon, an actor or a plain process
offers to the others. ``ServiceInfo`` is a plain value that crosses the
control socket as JSON and is stored by :mod:`ikos.registry._store`; this
module only says what a valid one looks like, so that clients can check a
registration before sending it and the manager can check whatever arrives
on its socket before it touches the store.

Every limit is explicit (name 128 characters, at most 64 capabilities,
metadata at most 32 keys and 4 KiB...) because a client decides what the
manager allocates and stores: one bound per field, and an error naming the
field and the limit. Validation is hand-written rather than done with a
schema library (pydantic, jsonschema): the rules are few, flat and need
custom messages, and the registry must not pull a large dependency into
every client.

Errors of the registry::

    IkosError
    ├── InvalidService           a field of a ServiceInfo breaks a rule (field, reason)
    └── ManagerError
        ├── ServiceConflict      the name is held by another living owner (name, holder_pid)
        ├── RegistryFull         the registry holds its limit of services (limit)
        ├── NoSuchDaemon
        │   └── NoSuchService    no service by that name (ikosctl exits 4)
        └── PermissionDenied
            └── NotServiceOwner  only the owner (or the manager) may unregister it
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ikos._errors import IkosError, ManagerError, NoSuchDaemon, PermissionDenied

# Like the supervision NAME_RE, plus '/' and ':' as separators between
# segments that each start with a letter or digit: "net/dhcp", "auth:pam".
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*(?:[/:][A-Za-z0-9][A-Za-z0-9_.@-]*)*")
SERVICE_NAME_MAX = 128
SERVICE_NAME_RULE = (
    f"a name of 1-{SERVICE_NAME_MAX} characters: segments of letters, digits, '_', '.', '@', '-'"
    " separated by '/' or ':', each segment starting with a letter or digit"
)
TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/@+-]*")
CAPABILITY_MAX = 64
CAPABILITIES_MAX = 64
TYPE_MAX = 64
VERSION_MAX = 256
DESCRIPTION_MAX = 1024
ENDPOINT_MAX = 512
METADATA_KEYS_MAX = 32
METADATA_KEY_MAX = 64
METADATA_BYTES_MAX = 4096
HEALTH_STATES: tuple[str, ...] = ("unknown", "passing", "warning", "critical")

# Control characters (C0, DEL, C1) are refused in every text field: they would
# corrupt terminal output of `ikosctl services` and log lines.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_LAYOUT_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class InvalidService(IkosError):
    """A field of a :class:`ServiceInfo` breaks a rule.

    ``field`` names the field (``"name"``, ``"metadata"``, ...) and ``reason``
    says which rule or limit was broken and what was given.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid service field '{self.field}': {self.reason}"


class ServiceConflict(ManagerError):
    """The name is registered by another owner that is still alive.

    ``holder_pid`` is the pid of the process holding the name.
    """

    def __init__(self, name: str, holder_pid: int | None) -> None:
        IkosError.__init__(self, name, holder_pid)
        self.name = name
        self.holder_pid = holder_pid
        self.message = (
            f"service '{name}' is already registered by living process {holder_pid}"
            if holder_pid is not None
            else f"service '{name}' is already registered"
        )


class RegistryFull(ManagerError):
    """The registry already holds ``limit`` services; a new name cannot be added."""

    def __init__(self, limit: int) -> None:
        IkosError.__init__(self, limit)
        self.limit = limit
        self.message = f"the registry is full: it holds its limit of {limit} services"


class NoSuchService(NoSuchDaemon):
    """No service is registered under ``name``.

    A :class:`~ikos._errors.NoSuchDaemon`, so that ``ikosctl discover`` and
    every other client map it to the same error code and exit status 4.
    """

    def __init__(self, name: str) -> None:
        IkosError.__init__(self, name)
        self.name = name
        self.message = f"no service named '{name}'"


class NotServiceOwner(PermissionDenied):
    """A process other than the service's owner tried to change it.

    ``holder_pid`` owns the service (``None``: the manager), ``caller_pid``
    asked.
    """

    def __init__(self, name: str, holder_pid: int | None, caller_pid: int | None) -> None:
        IkosError.__init__(self, name, holder_pid, caller_pid)
        self.name = name
        self.holder_pid = holder_pid
        self.caller_pid = caller_pid
        holder = f"process {holder_pid}" if holder_pid is not None else "the manager"
        self.message = f"service '{name}' belongs to {holder}, not to process {caller_pid}"


@dataclass
class ServiceInfo:
    """A registered service, as ``ikosctl services --json`` shows it.

    The first nine fields are the contract's; ``owner`` names the daemon that
    owns the service (if any), ``health`` is one of ``unknown``, ``passing``,
    ``warning``, ``critical``, and ``metadata`` holds a few free-form strings.

    Example::

        >>> info = ServiceInfo("net/dhcp", type="dhcp", endpoint="udp://0.0.0.0:67",
        ...                    capabilities=("dhcpv4",))
        >>> ServiceInfo.from_json(info.to_json()) == info
        True
    """

    name: str
    description: str = ""
    version: str = ""
    type: str = ""
    endpoint: str = ""
    capabilities: tuple[str, ...] = ()
    pid: int | None = None
    active: bool = True
    start_time: float | None = None
    owner: str | None = None
    health: str = "unknown"
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """This service as a dict of JSON types only (lists, not tuples; copies)."""
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "type": self.type,
            "endpoint": self.endpoint,
            "capabilities": list(self.capabilities),
            "pid": self.pid,
            "active": self.active,
            "start_time": self.start_time,
            "owner": self.owner,
            "health": self.health,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: object) -> ServiceInfo:
        """Build and validate a service from decoded JSON (e.g. a control request).

        Missing fields take their defaults; an unknown field, a wrong type or
        a broken limit raises :class:`InvalidService` naming the field.
        """
        if not isinstance(data, Mapping):
            raise InvalidService("service", f"expected a JSON object, got {_short(data)}")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise InvalidService(str(key), "unknown field")
        if "name" not in data:
            raise InvalidService("name", "missing")
        kwargs: dict[str, Any] = dict(data)
        caps = kwargs.get("capabilities", ())
        if isinstance(caps, list | tuple):
            kwargs["capabilities"] = tuple(caps)
        meta = kwargs.get("metadata", {})
        if isinstance(meta, Mapping):
            kwargs["metadata"] = dict(meta)
        if kwargs.get("start_time") is not None and _is_int(kwargs["start_time"]):
            kwargs["start_time"] = float(kwargs["start_time"])
        info = cls(**kwargs)
        validate_service(info)
        return info


def is_service_name(name: object) -> bool:
    """Whether ``name`` follows the service naming rule (``net/dhcp``, ``auth:pam``)."""
    return (
        isinstance(name, str)
        and len(name) <= SERVICE_NAME_MAX
        and SERVICE_NAME_RE.fullmatch(name) is not None
    )


def check_service_name(name: object, field_name: str = "name") -> str:
    """Return ``name`` if it is a valid service name, else raise :class:`InvalidService`."""
    if not isinstance(name, str):
        raise InvalidService(field_name, f"expected a string, got {_short(name)}")
    if len(name) > SERVICE_NAME_MAX:
        raise InvalidService(
            field_name, f"{len(name)} characters, more than the limit of {SERVICE_NAME_MAX}"
        )
    if not SERVICE_NAME_RE.fullmatch(name):
        raise InvalidService(field_name, f"expected {SERVICE_NAME_RULE}, got {_short(name)}")
    return name


def validate_service(info: ServiceInfo) -> None:
    """Check every field of ``info`` against its type and limit.

    Raises :class:`InvalidService` naming the first offending field, the
    rule or limit, and (shortened) what was given.

    Example::

        >>> validate_service(ServiceInfo("bad name"))
        Traceback (most recent call last):
        ...
        ikos.registry._service.InvalidService: invalid service field 'name': ...
    """
    check_service_name(info.name)
    _check_text("description", info.description, DESCRIPTION_MAX, _CONTROL_EXCEPT_LAYOUT_RE)
    _check_text("version", info.version, VERSION_MAX, _CONTROL_RE)
    _check_text("endpoint", info.endpoint, ENDPOINT_MAX, _CONTROL_RE)
    _check_text("type", info.type, TYPE_MAX, None)
    if info.type and not TOKEN_RE.fullmatch(info.type):
        raise InvalidService(
            "type", f"expected a token ({TOKEN_RE.pattern}), got {_short(info.type)}"
        )
    _check_capabilities(info.capabilities)
    if info.pid is not None and (not _is_int(info.pid) or info.pid <= 0):
        raise InvalidService("pid", f"expected a positive integer or null, got {_short(info.pid)}")
    if not isinstance(info.active, bool):
        raise InvalidService("active", f"expected a boolean, got {_short(info.active)}")
    if info.start_time is not None and not (
        isinstance(info.start_time, int | float)
        and not isinstance(info.start_time, bool)
        and math.isfinite(info.start_time)
        and info.start_time >= 0
    ):
        raise InvalidService(
            "start_time",
            f"expected a Unix time (a number >= 0) or null, got {_short(info.start_time)}",
        )
    if info.owner is not None:
        check_service_name(info.owner, "owner")
    if info.health not in HEALTH_STATES:
        raise InvalidService(
            "health", f"expected one of {', '.join(HEALTH_STATES)}, got {_short(info.health)}"
        )
    _check_metadata(info.metadata)


def _check_text(
    field_name: str, value: object, limit: int, forbidden: re.Pattern[str] | None
) -> None:
    if not isinstance(value, str):
        raise InvalidService(field_name, f"expected a string, got {_short(value)}")
    if len(value) > limit:
        raise InvalidService(field_name, f"{len(value)} characters, more than the limit of {limit}")
    if forbidden is not None and forbidden.search(value):
        raise InvalidService(field_name, "control characters are not allowed")
    _check_unicode(field_name, value)


def _check_unicode(field_name: str, value: str) -> None:
    # json.loads accepts lone surrogates ("\ud800"); SQLite and every UTF-8
    # writer downstream would fail on them, so they stop here.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidService(field_name, "not valid Unicode (lone surrogate)") from None


def _check_capabilities(caps: object) -> None:
    if not isinstance(caps, tuple | list):
        raise InvalidService("capabilities", f"expected a list of strings, got {_short(caps)}")
    if len(caps) > CAPABILITIES_MAX:
        raise InvalidService(
            "capabilities", f"{len(caps)} capabilities, more than the limit of {CAPABILITIES_MAX}"
        )
    seen: set[str] = set()
    for i, cap in enumerate(caps):
        if (
            not isinstance(cap, str)
            or not (0 < len(cap) <= CAPABILITY_MAX)
            or not TOKEN_RE.fullmatch(cap)
        ):
            raise InvalidService(
                "capabilities",
                f"item {i}: expected a token of 1-{CAPABILITY_MAX} characters"
                f" (letters, digits, '_', '.', ':', '/', '@', '+', '-'), got {_short(cap)}",
            )
        if cap in seen:
            raise InvalidService("capabilities", f"item {i}: duplicate {cap!r}")
        seen.add(cap)


def _check_metadata(meta: object) -> None:
    if not isinstance(meta, dict):
        raise InvalidService("metadata", f"expected an object of strings, got {_short(meta)}")
    if len(meta) > METADATA_KEYS_MAX:
        raise InvalidService(
            "metadata", f"{len(meta)} keys, more than the limit of {METADATA_KEYS_MAX}"
        )
    total = 0
    for key, value in meta.items():
        if (
            not isinstance(key, str)
            or not (0 < len(key) <= METADATA_KEY_MAX)
            or not TOKEN_RE.fullmatch(key)
        ):
            raise InvalidService(
                "metadata",
                f"key {_short(key)}: expected a token of 1-{METADATA_KEY_MAX} characters",
            )
        if not isinstance(value, str):
            raise InvalidService(
                "metadata", f"value of {key!r}: expected a string, got {_short(value)}"
            )
        _check_unicode("metadata", value)
        total += len(key.encode()) + len(value.encode())
        if total > METADATA_BYTES_MAX:
            raise InvalidService(
                "metadata",
                f"keys and values exceed the limit of {METADATA_BYTES_MAX} bytes (UTF-8) in total",
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
