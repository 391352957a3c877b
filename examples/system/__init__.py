"""The example system: four system daemons written as ikos actors.

``log`` (:mod:`examples.system.log`) collects log records over ikos IPC and a
syslog socket; ``net`` (:mod:`examples.system.net`) manages links, addresses,
routes, a DHCP client and DNS resolution over netlink; ``dev``
(:mod:`examples.system.dev`) enumerates devices and publishes kernel uevents;
``auth`` (:mod:`examples.system.auth`) keeps users, sessions and permissions.
``make demo`` runs them together as one supervision tree.
"""
