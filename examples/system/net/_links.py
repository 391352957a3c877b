"""Links, addresses and routes through rtnetlink (pyroute2), and the watcher of their changes.

Reads and changes go through a short-lived :class:`pyroute2.IPRoute` per
request (a netlink socket costs microseconds, and none is left half-read
after an error, and pyroute2 0.9 wants each used in the thread that made
it). The watcher holds a plain netlink socket of its own, bound to the link
and address multicast groups and read in a thread of its own; pyroute2's
marshal decodes its datagrams (not an IPRoute: that reads ahead into a
queue of its own, so a select() on its descriptor misses messages already
read). Each message becomes a plain dict handed to a callback. The watcher publishes a link only
when what a user sees of it changed (name, up, operational state, carrier):
the kernel repeats RTM_NEWLINK for statistics and flag noise, and a
subscriber should not have to filter that.

Changes need CAP_NET_ADMIN. :func:`missing_capability` says so up front
(from the process's effective capabilities), and :class:`NetError` carries
the kernel's refusal otherwise, so that a reply names what is missing.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
IFNAMSIZ = 16


class NetError(Exception):
    """A netlink request that failed, said for the requester."""


def missing_capability() -> str | None:
    """``"CAP_NET_ADMIN"`` when this process lacks it (changes would be refused), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return (
                        None if int(line.split()[1], 16) >> CAP_NET_ADMIN & 1 else "CAP_NET_ADMIN"
                    )
    except (OSError, ValueError):
        pass
    return None  # cannot tell: let the kernel answer


def _link(msg: Any) -> dict[str, Any]:
    flags = int(msg["flags"])
    return {
        "index": int(msg["index"]),
        "name": msg.get("IFLA_IFNAME"),
        "up": bool(flags & 0x1),  # IFF_UP: administratively up
        "carrier": bool(flags & 0x10000),  # IFF_LOWER_UP
        "operstate": msg.get("IFLA_OPERSTATE"),
        "mac": msg.get("IFLA_ADDRESS"),
        "mtu": msg.get("IFLA_MTU"),
        "kind": (msg.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_KIND")
        if hasattr(msg.get("IFLA_LINKINFO"), "get")
        else None,
    }


def _address(msg: Any, names: dict[int, str]) -> dict[str, Any]:
    index = int(msg["index"])
    family = "inet" if msg["family"] == socket.AF_INET else "inet6"
    return {
        "interface": names.get(index, str(index)),
        "index": index,
        "family": family,
        "address": msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"),
        "prefixlen": int(msg["prefixlen"]),
    }


def _call(what: str, fn: Callable[[IPRoute], Any]) -> Any:
    try:
        with IPRoute() as ipr:
            return fn(ipr)
    except NetlinkError as exc:
        if exc.code == errno.EPERM:
            raise NetError(f"{what}: refused by the kernel: needs CAP_NET_ADMIN") from None
        raise NetError(f"{what}: {errno.errorcode.get(exc.code, exc.code)}: {exc}") from None


def links() -> list[dict[str, Any]]:
    """Every link: index, name, up, carrier, operstate, mac, mtu, kind."""
    return sorted(
        (_link(m) for m in _call("list links", lambda i: i.get_links())), key=lambda x: x["index"]
    )


def link_names() -> dict[int, str]:
    """Index → name of every link."""
    return {link["index"]: link["name"] for link in links()}


def index_of(name: str) -> int:
    """The index of link ``name``; NetError when there is none."""
    for link in links():
        if link["name"] == name:
            return int(link["index"])
    raise NetError(f"no interface named {name!r}")


def addresses(interface: str | None = None) -> list[dict[str, Any]]:
    """Every address (IPv4 and IPv6), or those of ``interface``."""
    names = link_names()
    result = [_address(m, names) for m in _call("list addresses", lambda i: i.get_addr())]
    return [a for a in result if interface is None or a["interface"] == interface]


def routes() -> list[dict[str, Any]]:
    """The IPv4 and IPv6 routes of the main table."""
    names = link_names()
    out = []
    found = _call(
        "list routes",
        lambda i: [
            *i.get_routes(family=socket.AF_INET, table=254),
            *i.get_routes(family=socket.AF_INET6, table=254),
        ],
    )
    for m in found:
        dst = m.get("RTA_DST")
        out.append({
            "family": "inet" if m["family"] == socket.AF_INET else "inet6",
            "destination": f"{dst}/{m['dst_len']}" if dst else "default",
            "gateway": m.get("RTA_GATEWAY"),
            "interface": names.get(m.get("RTA_OIF"), None),
            "source": m.get("RTA_PREFSRC"),
        })  # fmt: skip
    return out


def set_link(name: str, up: bool) -> None:
    """Bring link ``name`` up or down."""
    index = index_of(name)
    _call(
        f"set {name} {'up' if up else 'down'}",
        lambda i: i.link("set", index=index, state="up" if up else "down"),
    )


def change_address(
    action: str, name: str, cidr: str, *, lifetime: int | None = None
) -> dict[str, Any]:
    """Add (``add``), set (``replace``) or remove (``del``) address ``cidr`` on link ``name``.

    ``cidr`` is ``10.0.0.2/24``; with ``lifetime`` (seconds) the kernel
    removes the address by itself when it runs out, as a lease's address
    should be if nobody renews it.
    """
    iface = ipaddress.ip_interface(cidr)
    index = index_of(name)
    fields: dict[str, Any] = {"index": index, "address": str(iface.ip)}
    fields["prefixlen"] = iface.network.prefixlen
    if action != "del" and iface.version == 4:
        fields["broadcast"] = True  # pyroute2 computes it, as ip's "brd +"
    if lifetime is not None:
        fields["valid_lft"] = fields["preferred_lft"] = max(1, lifetime)
    _call(f"{action} address {iface} on {name}", lambda i: i.addr(action, **fields))
    return {"interface": name, "address": str(iface.ip), "prefixlen": iface.network.prefixlen}


def set_default_route(gateway: str, name: str) -> None:
    """Make ``gateway`` on ``name`` the IPv4 default route (replacing one there is)."""
    index = index_of(name)
    _call(
        f"default route via {gateway}",
        lambda i: i.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index),
    )


class LinkWatcher:
    """Reports link and address changes, as the kernel announces them, to ``report(topic, event)``.

    ``topic`` is ``link`` or ``address``; an event is the dict :func:`links`
    or :func:`addresses` gives, plus ``event`` (``new`` or ``del``).
    """

    def __init__(self, report: Callable[[str, dict[str, Any]], None]) -> None:
        self.report = report
        self._stop = threading.Event()
        # a socket of our own, parsed by pyroute2's marshal: pyroute2 0.9's IPRoute
        # reads ahead into an internal queue, so select() on its descriptor misses
        # messages already read, and it must be used from the thread that made it
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        # the last seen state of each link, to publish only what changed; bounded by
        # the links the kernel has (an entry is dropped with its link)
        self._seen: dict[int, tuple[Any, ...]] = {}
        self._names: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="net-watcher", daemon=True)

    def _remember(self, link: dict[str, Any]) -> bool:
        key = (link["name"], link["up"], link["carrier"], link["operstate"])
        changed = self._seen.get(link["index"]) != key
        self._seen[link["index"]] = key
        self._names[link["index"]] = link["name"]
        return changed

    def start(self, timeout: float = 10.0) -> None:
        """Start watching; returns once the socket listens (no change after this is missed)."""
        try:
            self._sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._resync(report=False)
        except (OSError, NetError):
            self._sock.close()
            raise
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the netlink socket (nothing if it never started)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self._sock.close()

    def _resync(self, *, report: bool = True) -> None:
        """Read every link again: after an overrun, the changes missed are reported."""
        current = links()
        for link in current:
            if self._remember(link) and report:
                self.report("link", {"event": "new", **link})
        gone = set(self._seen) - {link["index"] for link in current}
        for index in gone:
            self._seen.pop(index, None)
            name = self._names.pop(index, None)
            if report:
                self.report("link", {"event": "del", "index": index, "name": name})

    def _run(self) -> None:
        marshal = MarshalRtnl()
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.5)
            if not readable:
                continue
            try:
                data = self._sock.recv(1 << 16)
                messages = list(marshal.parse(data))
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped messages: read the state
                    log.warning("net watcher: netlink overrun; reading the links again")
                    self._resync_quietly()
                continue
            except Exception:  # a message pyroute2 cannot parse: skip the datagram
                log.exception("net watcher: could not parse a netlink datagram; skipped")
                continue
            for msg in messages:
                try:
                    self._handle(msg)
                except Exception:
                    log.exception("net watcher: could not handle %s", msg.get("event"))

    def _resync_quietly(self) -> None:
        try:
            self._resync()
        except NetError as exc:
            log.warning("net watcher: %s", exc)

    def _handle(self, msg: Any) -> None:
        event = msg.get("event")
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            link = _link(msg)
            if event == "RTM_DELLINK":
                self._seen.pop(link["index"], None)
                self._names.pop(link["index"], None)
                self.report("link", {"event": "del", **link})
            elif self._remember(link):
                self.report("link", {"event": "new", **link})
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            address = _address(msg, self._names)
            self.report("address", {"event": "new" if event == "RTM_NEWADDR" else "del", **address})
