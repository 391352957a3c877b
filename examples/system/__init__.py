"""The example system: four system daemons written as ikos actors.

``log`` (:mod:`examples.system.log`) collects log records over ikos IPC and a
syslog socket; ``net`` (:mod:`examples.system.net`) manages links, addresses,
routes, a DHCP client and DNS resolution over netlink; ``dev``
(:mod:`examples.system.dev`) enumerates devices and publishes kernel uevents;
``auth`` (:mod:`examples.system.auth`) keeps users, sessions and permissions.
``make demo`` runs them together as one supervision tree.
"""

from __future__ import annotations

from typing import Any

import ikos

__all__ = ["supervisor", "tree"]


def supervisor(name: str = "system", **options: Any) -> ikos.Supervisor:
    """The four daemons under one ``one_for_one`` supervisor named ``name``.

    Their ``requires`` give the start order, which ikosd computes as waves:
    ``dev`` and ``auth`` first (they need only the kernel), then ``log`` (needs
    ``auth``) and ``net`` (needs ``dev`` and ``auth``); shutdown runs the waves
    backwards. ``options`` maps a daemon's name to the keyword options of its
    ``child()`` (``supervisor(auth={"session_ttl": 600})``).
    """
    from examples.system import auth, dev, log, net

    unknown = set(options) - {"auth", "dev", "log", "net"}
    if unknown:
        raise ValueError(f"examples.system.supervisor: no daemon named {sorted(unknown)}")
    return ikos.Supervisor(
        name,
        strategy="one_for_one",
        max_restarts=5,
        within=10,
        description="the example system daemons",
        children=[
            dev.child(**options.get("dev", {})),
            auth.child(**options.get("auth", {})),
            log.child(**options.get("log", {})),
            net.child(**options.get("net", {})),
        ],
    )


def __getattr__(attr: str) -> Any:
    # ``ikosd --tree examples.system:tree`` builds the tree on first use, so that importing
    # one daemon's module (examples.system.log) does not import the other three.
    if attr == "tree":
        return ikos.Supervisor("root", children=[supervisor()])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
