"""The manager's settings that every ikosd needs, with or without a configuration file.

The ``[ipc]``, ``[monitor]`` and ``[alerts]`` tables' values and their
defaults, the metrics address's defaults, and the readers the extensions
call at their start and at a reload. They live apart from
:mod:`ikos.manager._config` (which re-exports them) so that an ikosd
without a configuration file never loads the file reader, its tables and
its dataclasses: the readers import it only when there is a file to read
(docs/performance.md, "Launch").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ikos.monitor._alerts import AlertRules
from ikos.platform._memfd import DEFAULT_SHM_THRESHOLD

__all__ = [
    "AUTO_METRICS",
    "DEFAULT_METRICS",
    "AlertSettings",
    "IpcRule",
    "IpcSettings",
    "MonitorSettings",
    "read_alert_settings",
    "read_ipc_settings",
    "read_monitor_settings",
]

#: The metrics address of the system instance (root's, without ``--root``): the port
#: Prometheus's exporter list gives ikos. Every other instance takes a free port
#: unless told otherwise (``"auto"`` below), so that instances never collide.
DEFAULT_METRICS: Final = ("127.0.0.1", 9464)
#: ``metrics`` left out (or ``true``): the default of the instance, decided by ikosd.
AUTO_METRICS: Final = "auto"
#: What an ``[[ipc.allow]]`` rule grants, each a list of patterns.
IPC_GRANTS: Final = ("call", "serve", "publish", "subscribe", "queues")


@dataclass(frozen=True)
class IpcRule:
    """One ``[[ipc.allow]]`` rule: who (uids, gids) may do what (patterns per operation)."""

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    call: tuple[str, ...] = ()
    serve: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "uids": list(self.uids),
            "gids": list(self.gids),
            **{grant: list(getattr(self, grant)) for grant in IPC_GRANTS},
        }


@dataclass(frozen=True)
class IpcSettings:
    """The ``[ipc]`` table: the broker's bounds, its queues' policy and who may do what.

    ``enabled = false`` runs the instance without a broker. Every value is
    checked here, so the broker only ever reads a valid ``broker.json``
    (:meth:`broker_config`).
    """

    enabled: bool = True
    #: "on-demand": ikosd listens on the broker's socket and starts the broker at
    #: the first connection; "eager": at ikosd's start (docs/configuration.md)
    start: str = "on-demand"
    subscriber_queue: int = 10000
    slow_subscriber: str = "drop-oldest"
    shm_threshold: int = DEFAULT_SHM_THRESHOLD
    max_frame: int = 64 * 1024 * 1024
    max_clients: int = 4096
    max_clients_per_uid: int = 256
    max_deliveries: int = 5
    visibility_timeout: float = 30.0
    max_messages: int = 1_000_000
    rules: tuple[IpcRule, ...] = ()

    def broker_config(self, owner_uid: int, audit_log: str) -> dict[str, Any]:
        """The broker's ``broker.json`` (docs/protocol.md): every key, always."""
        return {
            "owner_uid": owner_uid,
            "subscriber_queue": self.subscriber_queue,
            "slow_subscriber": self.slow_subscriber,
            "shm_threshold": self.shm_threshold,
            "max_frame": self.max_frame,
            "max_clients": self.max_clients,
            "max_clients_per_uid": self.max_clients_per_uid,
            "queues": {
                "max_deliveries": self.max_deliveries,
                "visibility_timeout": self.visibility_timeout,
                "max_messages": self.max_messages,
            },
            "policy": [rule.to_json() for rule in self.rules],
            "audit_log": audit_log,
        }


@dataclass(frozen=True)
class MonitorSettings:
    """The ``[monitor]`` table: how often daemons' resource usage is sampled, and how.

    ``uss = false`` leaves out the unique set size, the dearest figure to read
    (docs/configuration.md); else it is read every ``uss_every`` passes.
    """

    interval: float = 5.0
    uss: bool = True
    uss_every: int = 6


@dataclass(frozen=True)
class AlertSettings:
    """The ``[alerts]`` table and the daemons' ``alerts`` tables (docs/configuration.md).

    ``notify_interval``: the shortest time between two notifications of one
    alert of one daemon; ``max_per_minute``: notifications of all alerts
    together; ``rules``: the thresholds and event alerts, defaults and per daemon.
    """

    notify_interval: float = 300.0
    max_per_minute: int = 30
    rules: AlertRules = field(default_factory=AlertRules)


def read_ipc_settings(path: str | Path | None) -> tuple[IpcSettings, tuple[str, ...]]:
    """The ``[ipc]`` table of ``path`` (defaults without a file) and its warnings.

    For the manager's IPC service, which reads the file again at start and on
    every reload, as the registry does its declarations.

    Example::

        settings, warnings = read_ipc_settings("/etc/ikos/ikos.toml")
        settings.subscriber_queue        # 10000
    """
    if path is None:
        return IpcSettings(), ()
    from ikos.manager._config import _ipc_settings, _parse_file

    return _ipc_settings(*_parse_file(path))


def read_monitor_settings(path: str | Path | None) -> tuple[MonitorSettings, tuple[str, ...]]:
    """The ``[monitor]`` table of ``path`` (defaults without a file) and its warnings.

    Example::

        settings, warnings = read_monitor_settings("/etc/ikos/ikos.toml")
        settings.interval        # 5.0
    """
    if path is None:
        return MonitorSettings(), ()
    from ikos.manager._config import _monitor_settings, _parse_file

    return _monitor_settings(*_parse_file(path))


def read_alert_settings(path: str | Path | None) -> tuple[AlertSettings, tuple[str, ...]]:
    """The ``[alerts]`` table and every daemon's ``alerts`` table of ``path``, and their warnings.

    Example::

        settings, warnings = read_alert_settings("/etc/ikos/ikos.toml")
        settings.rules.for_daemon("web")["memory"].above     # 536870912.0
    """
    if path is None:
        return AlertSettings(), ()
    from ikos.manager._config import _alert_settings, _parse_file

    return _alert_settings(*_parse_file(path))
