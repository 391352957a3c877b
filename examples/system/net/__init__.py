"""The network manager ``net``: links, addresses, routes, DHCP and DNS as an ikos actor.

It answers requests (``{"op": ...}`` dicts: ``ikosctl call net
'{"op": "links"}'``) about the machine's links, addresses and routes, read
through rtnetlink with pyroute2; brings links up and down and adds or
removes addresses when it holds CAP_NET_ADMIN (else the reply says that it
is missing); runs a DHCPv4 client per interface it is given, which obtains,
applies and renews a lease; resolves names through the resolvers it knows;
and publishes what changes as events: ``net.link``, ``net.address`` (from
the kernel's netlink announcements) and ``net.dhcp`` (from its clients).

A synchronous actor with two kinds of helper threads, not an asyncio one:
the netlink watcher and each DHCP client block on their own socket with a
select timeout and only publish events or update their own state, so the
actor's handlers never wait on them and nothing is shared but plain values.
A DNS lookup does block the handler, for at most ``dns_budget`` seconds in
all (5 by default, below the 10 s ``ikosctl call`` waits), and answers come
mostly from the cache.

Safe by default on a real machine: without ``dhcp=[...]`` it starts no DHCP
client, and it never writes /etc/resolv.conf (the resolvers a lease brings
are used for its own ``resolve`` and shown by ``status``).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import ikos
import ikos.ipc
import ikos.registry
from examples.system.net import _links
from examples.system.net._dhcp import DhcpClient, Lease
from examples.system.net._dns import TYPES, DnsError, Resolver, check_name, read_resolv_conf
from examples.system.net._links import NetError

log = logging.getLogger("examples.system.net")

__all__ = ["Net", "child"]

#: The longest string a request may carry in any field: far above any interface name,
#: address or DNS name, far below what would cost memory to hold or log.
MAX_FIELD = 255
#: The most DHCP clients one daemon runs (one per interface; a bound on threads and sockets).
MAX_DHCP_CLIENTS = 16
OPS = ("links", "addresses", "routes", "link", "address", "dhcp", "resolve", "status")


class RequestError(ValueError):
    """A request the daemon refuses; the message says which field and why."""


def _field(message: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = message.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key!r}: expected a non-empty string, got {type(value).__name__}")
    if len(value) > MAX_FIELD:
        raise RequestError(f"{key!r}: {len(value)} characters, at most {MAX_FIELD}")
    return value


def _interface(message: dict[str, Any], *, required: bool = True) -> str | None:
    name = _field(message, "interface", required=required)
    if name is not None and (len(name) >= _links.IFNAMSIZ or "/" in name or name in (".", "..")):
        raise RequestError(f"'interface': {name[:40]!r} is not an interface name")
    return name


def _choice(message: dict[str, Any], key: str, choices: Sequence[str]) -> str:
    value = _field(message, key)
    if value not in choices:
        raise RequestError(f"{key!r}: {str(value)[:40]!r}, expected one of {', '.join(choices)}")
    return str(value)


class Net(ikos.Actor):
    """The network manager (see the module's docstring for the requests and events).

    Options: ``dhcp`` the interfaces to run a DHCP client on (none by
    default), ``resolvers`` DNS servers to use before any a lease brings or
    /etc/resolv.conf names, ``apply_leases`` whether a lease's address and
    default route are set on the interface (else only reported),
    ``dhcp_retransmit`` the first DHCP resend delay in seconds,
    ``dns_timeout`` per query, ``dns_attempts`` rounds over the resolvers,
    ``dns_budget`` the bound on a whole lookup, ``hostname`` sent to the
    DHCP server, ``resolv_conf`` the file read for resolvers.
    """

    def __init__(
        self,
        *,
        dhcp: Sequence[str] = (),
        resolvers: Sequence[str] = (),
        apply_leases: bool = True,
        dhcp_retransmit: float = 4.0,
        dns_timeout: float = 2.0,
        dns_attempts: int = 2,
        dns_budget: float = 5.0,
        hostname: str | None = None,
        resolv_conf: str = "/etc/resolv.conf",
    ) -> None:
        for option, value in (("dhcp", dhcp), ("resolvers", resolvers)):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"net: option {option!r} is a list of strings, not {value!r}")
        if not dhcp_retransmit > 0 or not dns_budget > 0:
            raise ValueError("net: 'dhcp_retransmit' and 'dns_budget' are seconds > 0")
        self.dhcp_interfaces = list(dhcp)
        try:
            self.configured_resolvers = [str(ipaddress.ip_address(r)) for r in resolvers]
        except ValueError as exc:
            raise ValueError(f"net: option 'resolvers': {exc}") from None
        self.apply_leases = apply_leases
        self.dhcp_retransmit = dhcp_retransmit
        self.hostname = hostname
        self.resolv_conf = resolv_conf
        self.dns_timeout = dns_timeout
        self.dns_attempts = dns_attempts
        self.dns_budget = dns_budget

    def on_start(self) -> None:
        self.resolver = Resolver(
            timeout=self.dns_timeout, attempts=self.dns_attempts, budget=self.dns_budget
        )
        self.clients: dict[str, DhcpClient] = {}
        self.lease_errors: dict[str, str] = {}
        self.events = {"published": 0, "failed": 0}
        self.publishing = True
        self._lock = threading.Lock()  # the counters above, bumped from helper threads
        self.missing = _links.missing_capability()
        if self.missing:
            log.warning("net: %s is missing: links and addresses will not be changed", self.missing)
        self.watcher = _links.LinkWatcher(lambda kind, event: self._publish(f"net.{kind}", event))
        self.watcher_error: str | None = None
        try:
            self.watcher.start()
        except (OSError, NetError) as exc:  # no events, but requests are still answered
            self.watcher_error = str(exc)
            log.warning("net: %s: no net.link or net.address events", exc)
        for interface in self.dhcp_interfaces:
            error = self._start_dhcp(interface)
            if error:
                log.warning("net: no DHCP on %s: %s", interface, error)
        try:
            ikos.registry.register(
                self.name,
                type="network",
                description="links, addresses, routes, DHCP leases and DNS resolution",
                endpoint=f"ikos://{self.name}",
                capabilities=["links", "addresses", "routes", "dhcpv4", "dns", "events"],
            )
        except ikos.IkosError as exc:
            log.warning("net: service not registered: %s", exc)

    def on_stop(self) -> None:
        for client in self.clients.values():
            client.request_stop()  # all at once: each ends within half a second
        for client in self.clients.values():
            client.stop()
        self.watcher.stop()

    # -- events --------------------------------------------------------------------

    def _publish(self, topic: str, event: dict[str, Any]) -> None:
        """Publish ``event`` on ``topic``; called from helper threads, never raises."""
        try:
            ikos.ipc.publish(topic, event)
            outcome = "published"
        except (ikos.IkosError, OSError) as exc:  # the broker not up yet, or restarting
            outcome = "failed"
            with self._lock:
                first = self.publishing
                self.publishing = False
            if first:  # once per outage, not once per event; status counts them
                log.warning("net: events are lost until the broker answers: %s", exc)
        with self._lock:
            self.events[outcome] += 1
            if outcome == "published":
                self.publishing = True

    def _on_dhcp(self, event: str, client: DhcpClient) -> None:
        """A DHCP client's report (in its thread): apply the lease, publish what happened."""
        lease = client.lease
        now = time.monotonic()
        if lease is not None and self.apply_leases:
            if event in ("bound", "renewed"):
                self._apply(client.interface, lease, int(lease.expires_at - now))
            elif event in ("expired", "nak"):
                self._unapply(client.interface, lease.address, lease.prefixlen)
        self._publish(
            "net.dhcp",
            {
                "event": event,
                "interface": client.interface,
                "state": client.state,
                "lease": lease.to_json(now) if lease else None,
            },
        )

    def _apply(self, interface: str, lease: Lease, lifetime: int) -> None:
        # "replace" adds the address or, on a renewal, extends its lifetime: the
        # kernel drops it at the lease's end even if this daemon is not there to
        try:
            cidr = f"{lease.address}/{lease.prefixlen}"
            _links.change_address("replace", interface, cidr, lifetime=lifetime)
            if lease.routers:
                _links.set_default_route(lease.routers[0], interface)
            self.lease_errors.pop(interface, None)
        except NetError as exc:
            if self.lease_errors.get(interface) != str(exc):
                log.warning("net: lease on %s not applied: %s", interface, exc)
            self.lease_errors[interface] = str(exc)

    def _unapply(self, interface: str, address: str, prefixlen: int) -> None:
        try:
            # the kernel may have dropped it already: its lifetime was the lease's
            if any(a["address"] == address for a in _links.addresses(interface)):
                _links.change_address("del", interface, f"{address}/{prefixlen}")
        except NetError as exc:
            log.warning("net: ended lease on %s not removed: %s", interface, exc)

    def _start_dhcp(self, interface: str) -> str | None:
        if interface in self.clients:
            return None
        if len(self.clients) >= MAX_DHCP_CLIENTS:
            return f"already {MAX_DHCP_CLIENTS} DHCP clients, the most one daemon runs"
        try:
            link = next((x for x in _links.links() if x["name"] == interface), None)
            if link is None:
                return f"no interface named {interface!r}"
            mac = bytes.fromhex((link["mac"] or "").replace(":", ""))
            if len(mac) != 6:
                return f"{interface} has no Ethernet address (DHCP needs one)"
            if not link["up"]:
                if self.missing:
                    return f"{interface} is down and bringing it up needs {self.missing}"
                _links.set_link(interface, True)
            client = DhcpClient(
                interface,
                mac,
                self._on_dhcp,
                hostname=self.hostname,
                retransmit=self.dhcp_retransmit,
            )
        except NetError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot listen on {interface} port 68: {exc}"
        self.clients[interface] = client
        client.start()
        return None

    # -- requests ------------------------------------------------------------------

    def receive(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return _error(f'expected a request object {{"op": ...}}, got {type(message).__name__}')
        if len(message) > 8:
            return _error(f"a request of {len(message)} fields: at most 8")
        try:
            op = _choice(message, "op", OPS)
            return getattr(self, f"_op_{op}")(message)
        except (RequestError, NetError) as exc:
            return _error(str(exc))

    def _op_links(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "links": _links.links()}

    def _op_addresses(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "addresses": _links.addresses(_interface(message, required=False))}

    def _op_routes(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "routes": _links.routes()}

    def _refuse_without_capability(self, what: str) -> None:
        if self.missing:
            raise NetError(f"{what}: not permitted: this daemon lacks {self.missing}")

    def _op_link(self, message: dict[str, Any]) -> dict[str, Any]:
        interface = str(_interface(message))
        state = _choice(message, "state", ("up", "down"))
        self._refuse_without_capability(f"set {interface} {state}")
        _links.set_link(interface, state == "up")
        return {"ok": True, "interface": interface, "state": state}

    def _op_address(self, message: dict[str, Any]) -> dict[str, Any]:
        interface = str(_interface(message))
        action = _choice(message, "action", ("add", "del"))
        cidr = str(_field(message, "address"))
        try:
            ipaddress.ip_interface(cidr)
        except ValueError:
            raise RequestError(
                f"'address': {cidr[:60]!r} is not an address with a prefix"
            ) from None
        self._refuse_without_capability(f"{action} address {cidr} on {interface}")
        return {"ok": True, **_links.change_address(action, interface, cidr)}

    def _op_dhcp(self, message: dict[str, Any]) -> dict[str, Any]:
        action = _choice(message, "action", ("start", "stop", "status"))
        interface = _interface(message, required=action != "status")
        now = time.monotonic()
        if action == "start":
            error = self._start_dhcp(str(interface))
            if error:
                return _error(f"dhcp on {interface}: {error}")
        elif action == "stop":
            client = self.clients.pop(str(interface), None)
            if client is None:
                return _error(f"dhcp: no client runs on {interface}")
            client.stop()
            return {"ok": True, "interface": interface, "state": "stopped"}
        clients = [c for name, c in self.clients.items() if interface in (None, name)]
        return {"ok": True, "clients": [self._client_status(c, now) for c in clients]}

    def _client_status(self, client: DhcpClient, now: float) -> dict[str, Any]:
        status = client.status(now)
        status["applied"] = (
            self.apply_leases
            and client.lease is not None
            and client.interface not in self.lease_errors
        )
        status["apply_error"] = self.lease_errors.get(client.interface)
        return status

    def resolvers(self) -> list[str]:
        """The DNS servers used: configured, else from the leases, else /etc/resolv.conf."""
        if self.configured_resolvers:
            return list(self.configured_resolvers)
        leased = [dns for c in self.clients.values() if c.lease for dns in c.lease.dns]
        return list(dict.fromkeys(leased)) or read_resolv_conf(self.resolv_conf)

    def _op_resolve(self, message: dict[str, Any]) -> dict[str, Any]:
        raw = str(_field(message, "name"))
        rtype = _choice(message, "type", tuple(TYPES)) if "type" in message else "A"
        try:
            name = check_name(raw)
        except ValueError as exc:
            raise RequestError(f"'name': {exc}") from None
        try:
            records, cached = self.resolver.resolve(name, rtype, self.resolvers())
        except DnsError as exc:
            return {"ok": False, "error": f"resolve {name} {rtype}: {exc}", "reason": exc.reason}
        wanted = [r.data for r in records if r.type == rtype]
        return {
            "ok": True, "name": name, "type": rtype, "answers": wanted, "cached": cached,
            "records": [asdict(r) for r in records],
        }  # fmt: skip

    def _op_status(self, message: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            events = dict(self.events)
        return {
            "ok": True,
            "missing": self.missing,
            "watcher": self.watcher_error or "listening",
            "links": len(_links.links()),
            "dhcp": [self._client_status(c, now) for c in self.clients.values()],
            "resolvers": self.resolvers(),
            "dns_cache": self.resolver.stats(),
            "events": events,
        }


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def child(
    name: str = "net", *, requires: Sequence[str] = ("dev", "auth"), **options: Any
) -> ikos.Child:
    """The ``net`` daemon as a child of a tree; ``options`` go to :class:`Net`.

    It requires ``dev`` (the links are devices) and ``auth`` by default, as
    issue 10 gives; ``requires=()`` runs it alone (the tests do).

    Example::

        child(dhcp=["eth0"], resolvers=["9.9.9.9"])
    """
    return ikos.Child(name, Net, kwargs=options, requires=requires)
