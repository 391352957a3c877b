"""DHCPv4 for the network manager: the packet codec, the lease and the client's states.

The codec (RFC 2131 packets with RFC 2132 options) and the timing are pure
functions, tested on their own; :class:`DhcpClient` is the thin effectful
part, one thread per interface that owns a UDP socket bound to port 68 on
that interface (``SO_BINDTODEVICE``) and walks the RFC 2131 state machine:
``init`` → ``selecting`` → ``requesting`` → ``bound`` → ``renewing`` (T1) →
``rebinding`` (T2) → ``init`` again when the lease expires or a server says
NAK. Every transition is logged and reported to the owner by a callback.

A plain UDP socket, not a raw one: with the BROADCAST flag set in what it
sends, the server broadcasts its replies, which Linux delivers to a socket
bound to the device even before the interface has an address, so no packet
filter or hand-built IP header is needed (dhclient's raw socket exists for
servers that ignore the flag; dnsmasq and the ISC server honour it).
pyroute2 0.9 ships an asyncio DHCP client, rejected: its state machine is new
and changing between releases, and the parsing of hostile packets is the
part this daemon has to get right itself.

Every reply is parsed defensively: a packet that is truncated, is not a
BOOTREPLY, lacks the magic cookie, carries an option running past the end,
or answers another transaction is counted under a named reason and dropped;
nothing a server sends can raise out of the client thread.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

CLIENT_PORT = 68
SERVER_PORT = 67
MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTREQUEST, BOOTREPLY = 1, 2
FLAG_BROADCAST = 0x8000
#: The fixed BOOTP header: op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr
#: chaddr(16) sname(64) file(128), then the 4-byte magic cookie.
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
MIN_REPLY = HEADER.size + len(MAGIC_COOKIE)
#: Largest datagram read: a DHCP message is at most 576 bytes unless the client says
#: otherwise (option 57); anything longer is truncated by recv and then parsed as such.
MAX_PACKET = 1500

# message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK"}

# options (RFC 2132)
OPT_PAD, OPT_END = 0, 255
OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_DOMAIN = 1, 3, 6, 12, 15
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
OPT_PARAMS, OPT_MAX_SIZE, OPT_T1, OPT_T2, OPT_CLIENT_ID = 55, 57, 58, 59, 61

#: The longest lease this client accepts as given; longer ones (0xffffffff is
#: "infinite") are held for this long and renewed as usual.
MAX_LEASE = 7 * 24 * 3600


class MalformedPacket(ValueError):
    """A reply that is not a well-formed DHCP message; ``reason`` is one word to count by."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Packet:
    """A decoded DHCP message (the fields this client uses)."""

    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    chaddr: bytes
    options: dict[int, bytes]

    @property
    def message_type(self) -> int | None:
        """Option 53, or None when absent."""
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def encode(
    message_type: int,
    xid: int,
    mac: bytes,
    *,
    ciaddr: str = "0.0.0.0",
    requested: str | None = None,
    server_id: str | None = None,
    hostname: str | None = None,
    broadcast: bool = True,
    secs: int = 0,
) -> bytes:
    """A BOOTREQUEST carrying ``message_type`` (DISCOVER, REQUEST, RELEASE...).

    Example::

        encode(DISCOVER, 0x1234, bytes.fromhex("020000000001"))
    """
    header = HEADER.pack(
        BOOTREQUEST, 1, len(mac), 0, xid, min(secs, 0xFFFF),
        FLAG_BROADCAST if broadcast else 0,
        ipaddress.IPv4Address(ciaddr).packed, bytes(4), bytes(4), bytes(4),
        mac.ljust(16, b"\0"), bytes(64), bytes(128),
    )  # fmt: skip
    opts = [bytes([OPT_MESSAGE_TYPE, 1, message_type])]
    opts.append(bytes([OPT_CLIENT_ID, len(mac) + 1, 1]) + mac)
    if requested is not None:
        opts.append(bytes([OPT_REQUESTED_IP, 4]) + ipaddress.IPv4Address(requested).packed)
    if server_id is not None:
        opts.append(bytes([OPT_SERVER_ID, 4]) + ipaddress.IPv4Address(server_id).packed)
    if hostname:
        name = hostname.encode("ascii", "replace")[:63]
        opts.append(bytes([OPT_HOSTNAME, len(name)]) + name)
    if message_type in (DISCOVER, REQUEST):
        wanted = bytes(
            [OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_DOMAIN, OPT_LEASE_TIME, OPT_T1, OPT_T2]
        )
        opts.append(bytes([OPT_PARAMS, len(wanted)]) + wanted)
        opts.append(bytes([OPT_MAX_SIZE, 2]) + struct.pack("!H", MAX_PACKET))
    return header + MAGIC_COOKIE + b"".join(opts) + bytes([OPT_END])


def parse_options(data: bytes) -> dict[int, bytes]:
    """The options after the magic cookie; :class:`MalformedPacket` when they overrun.

    A repeated option is concatenated (RFC 3396); PAD is skipped; a missing
    END is tolerated at the very end of the packet, as servers vary.
    """
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(data):
            raise MalformedPacket("bad_option", f"option {code} at byte {i} has no length")
        length = data[i + 1]
        if i + 2 + length > len(data):
            raise MalformedPacket(
                "bad_option", f"option {code} at byte {i} claims {length} bytes past the end"
            )
        options[code] = options.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return options


def decode(data: bytes) -> Packet:
    """Decode a server's reply; :class:`MalformedPacket` names what is wrong."""
    if len(data) < MIN_REPLY:
        raise MalformedPacket("truncated", f"{len(data)} bytes, a DHCP message has >= {MIN_REPLY}")
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, yiaddr, _si, _gi, chaddr, *_ = (
        HEADER.unpack_from(data)
    )
    if op != BOOTREPLY:
        raise MalformedPacket("not_reply", f"op {op}, a server's reply has op {BOOTREPLY}")
    if htype != 1 or hlen != 6:
        raise MalformedPacket("bad_hardware", f"htype {htype} hlen {hlen}, expected Ethernet 1/6")
    if data[HEADER.size : MIN_REPLY] != MAGIC_COOKIE:
        raise MalformedPacket("no_cookie", "the DHCP magic cookie is missing")
    options = parse_options(data[MIN_REPLY:])
    packet = Packet(op, xid, flags, _ip(ciaddr), _ip(yiaddr), chaddr[:hlen], options)
    if packet.message_type is None:
        raise MalformedPacket("no_type", "option 53 (message type) is missing or not one byte")
    return packet


@dataclass(frozen=True)
class Lease:
    """An address lease as a server acknowledged it (times in seconds, ``obtained`` monotonic)."""

    address: str
    prefixlen: int
    server_id: str
    lease_time: int
    t1: float
    t2: float
    obtained: float
    routers: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    domain: str | None = None

    @property
    def renew_at(self) -> float:
        """Monotonic time of T1, when the client asks its server to extend the lease."""
        return self.obtained + self.t1

    @property
    def rebind_at(self) -> float:
        """Monotonic time of T2, when it asks any server."""
        return self.obtained + self.t2

    @property
    def expires_at(self) -> float:
        """Monotonic time the lease ends unless extended."""
        return self.obtained + self.lease_time

    def to_json(self, now: float) -> dict[str, Any]:
        """The lease for a reply or an event, times as seconds from ``now``."""
        return {
            "address": self.address, "prefixlen": self.prefixlen, "server": self.server_id,
            "routers": list(self.routers), "dns": list(self.dns), "domain": self.domain,
            "lease_time": self.lease_time,
            "renew_in": round(self.renew_at - now, 1), "rebind_in": round(self.rebind_at - now, 1),
            "expires_in": round(self.expires_at - now, 1),
        }  # fmt: skip


def _addresses(raw: bytes | None, option: int) -> tuple[str, ...]:
    if not raw:
        return ()
    if len(raw) % 4:
        raise MalformedPacket(
            "bad_option", f"option {option} is {len(raw)} bytes, not 4 per address"
        )
    return tuple(_ip(raw[i : i + 4]) for i in range(0, len(raw), 4))


def _seconds(raw: bytes | None, option: int) -> int | None:
    if raw is None:
        return None
    if len(raw) != 4:
        raise MalformedPacket("bad_option", f"option {option} is {len(raw)} bytes, not 4")
    return int.from_bytes(raw, "big")


def lease_from_ack(packet: Packet, now: float) -> Lease:
    """The lease an ACK grants; :class:`MalformedPacket` when it lacks what a lease needs.

    T1 and T2 default to 1/2 and 7/8 of the lease (RFC 2131 4.4.5); values
    that break T1 <= T2 <= lease are replaced by the defaults rather than
    trusted, and a lease is clamped to :data:`MAX_LEASE`.
    """
    address = ipaddress.IPv4Address(packet.yiaddr)
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise MalformedPacket("bad_address", f"yiaddr {address} cannot be a host's address")
    lease_time = _seconds(packet.options.get(OPT_LEASE_TIME), OPT_LEASE_TIME)
    if lease_time is None or lease_time == 0:
        raise MalformedPacket("no_lease_time", "an ACK without a lease time (option 51)")
    lease_time = min(lease_time, MAX_LEASE)
    server = _addresses(packet.options.get(OPT_SERVER_ID), OPT_SERVER_ID)
    if len(server) != 1:
        raise MalformedPacket("no_server_id", "an ACK without one server identifier (option 54)")
    mask = _addresses(packet.options.get(OPT_SUBNET), OPT_SUBNET)
    try:
        prefixlen = ipaddress.IPv4Network(f"0.0.0.0/{mask[0]}").prefixlen if mask else 24
    except ValueError:
        raise MalformedPacket("bad_option", f"subnet mask {mask[0]} is not contiguous") from None
    t1 = _seconds(packet.options.get(OPT_T1), OPT_T1)
    t2 = _seconds(packet.options.get(OPT_T2), OPT_T2)
    renew, rebind = lease_time / 2, lease_time * 7 / 8
    if t1 is not None and t2 is not None and 0 < t1 <= t2 <= lease_time:
        renew, rebind = float(t1), float(t2)
    domain_raw = packet.options.get(OPT_DOMAIN)
    domain = domain_raw.decode("ascii", "replace").strip("\0") if domain_raw else None
    return Lease(
        str(address), prefixlen, server[0], lease_time, renew, rebind, now,
        routers=_addresses(packet.options.get(OPT_ROUTER), OPT_ROUTER),
        dns=_addresses(packet.options.get(OPT_DNS), OPT_DNS), domain=domain,
    )  # fmt: skip


def retransmit_delay(attempt: int, base: float) -> float:
    """Seconds before resend number ``attempt`` (from 0): ``base`` doubling, at most 64 s.

    RFC 2131 4.1 gives 4, 8, 16... with ``base`` 4.
    """
    return float(min(base * 2**attempt, 64.0))


# --- the client (effects) -------------------------------------------------------------

#: The states of :class:`DhcpClient`, RFC 2131 figure 5 without INIT-REBOOT.
STATES = ("init", "selecting", "requesting", "bound", "renewing", "rebinding", "stopped")

Report = Callable[[str, "DhcpClient"], None]


@dataclass
class DhcpCounters:
    """What a client has seen: replies taken, and dropped by reason."""

    sent: int = 0
    received: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        """Count one dropped packet under ``reason`` (a fixed, small set of words)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class DhcpClient:
    """Obtains and keeps a lease on one interface, in a thread of its own.

    ``report(event, client)`` is called from that thread on ``bound``,
    ``renewed``, ``expired``, ``nak`` and on every state change (``state``);
    the owner applies the lease (address, route, resolvers) there.
    ``retransmit`` is the first resend delay (RFC 2131's 4 s by default).
    """

    def __init__(
        self,
        interface: str,
        mac: bytes,
        report: Report,
        *,
        hostname: str | None = None,
        retransmit: float = 4.0,
    ) -> None:
        self.interface = interface
        self.mac = mac
        self.hostname = hostname
        self.retransmit = retransmit
        self.report = report
        self.state = "init"
        self.lease: Lease | None = None
        self.offer: Packet | None = None
        self.counters = DhcpCounters()
        self.error: str | None = None
        self._xid = 0
        self._stop = threading.Event()
        self._sock = self._open()
        self._thread = threading.Thread(target=self._run, name=f"dhcp-{interface}", daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode() + b"\0"
            )
            sock.bind(("0.0.0.0", CLIENT_PORT))
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self) -> None:
        """Start the client's thread."""
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end (it does within half a second); :meth:`stop` waits."""
        self._stop.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the socket (the lease is kept on the interface)."""
        self._stop.set()
        self._thread.join(timeout)
        self._sock.close()
        self.state = "stopped"

    def status(self, now: float) -> dict[str, Any]:
        """The client's state, lease and counters, for a reply."""
        return {
            "interface": self.interface, "state": self.state, "error": self.error,
            "lease": self.lease.to_json(now) if self.lease else None,
            "sent": self.counters.sent, "received": self.counters.received,
            "dropped": dict(self.counters.dropped),
        }  # fmt: skip

    # -- the state machine -------------------------------------------------------------

    def _enter(self, state: str) -> None:
        if state != self.state:
            log.info("dhcp %s: %s -> %s", self.interface, self.state, state)
            self.state = state
            self.report("state", self)

    def _send(self, message_type: int, *, to: str = "255.255.255.255", **fields: Any) -> bool:
        packet = encode(message_type, self._xid, self.mac, hostname=self.hostname, **fields)
        try:
            self._sock.sendto(packet, (to, SERVER_PORT))
        except OSError as exc:  # the link is down, no route yet: the resend timer retries
            self.error = f"sending {MESSAGE_TYPES[message_type]} to {to}: {exc.strerror}"
            log.warning("dhcp %s: %s", self.interface, self.error)
            return False
        self.counters.sent += 1
        return True

    def _transmit(self) -> None:
        """Send what the current state sends (a first send or a resend)."""
        if self.state == "selecting":
            self._send(DISCOVER)
        elif self.state == "requesting" and self.offer is not None:
            server = _addresses(self.offer.options.get(OPT_SERVER_ID), OPT_SERVER_ID)
            self._send(REQUEST, requested=self.offer.yiaddr, server_id=server[0])
        elif self.state == "renewing" and self.lease is not None:
            # unicast to the server from the leased address (RFC 2131 4.3.2); when the
            # address could not be set (no CAP_NET_ADMIN) there is no route: broadcast
            lease = self.lease
            if not self._send(REQUEST, to=lease.server_id, ciaddr=lease.address, broadcast=False):
                self._send(REQUEST, ciaddr=lease.address)
        elif self.state == "rebinding" and self.lease is not None:
            self._send(REQUEST, ciaddr=self.lease.address)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not take the daemon down silently
            log.exception("dhcp %s: client failed", self.interface)
            self.error = "the client failed (see the log)"
            self._enter("stopped")

    def _loop(self) -> None:
        attempt = 0
        resend_at = 0.0
        self._begin()
        while not self._stop.is_set():
            now = time.monotonic()
            lease = self.lease
            if lease is not None and self.state in ("bound", "renewing", "rebinding"):
                if now >= lease.expires_at:
                    self._expire("expired")
                    attempt, resend_at = 0, 0.0
                    continue
                if self.state == "bound" and now >= lease.renew_at:
                    self._new_xid()
                    self._enter("renewing")
                    attempt, resend_at = 0, 0.0
                elif self.state == "renewing" and now >= lease.rebind_at:
                    self._enter("rebinding")
                    attempt, resend_at = 0, 0.0
            if self.state != "bound" and now >= resend_at:
                if self.state == "requesting" and attempt >= 4:
                    self._begin()  # no ACK for the offer: start over
                    attempt = 0
                self._transmit()
                delay = retransmit_delay(attempt, self.retransmit)
                if lease is not None and self.state in ("renewing", "rebinding"):
                    # RFC 2131 4.4.5: half the time left before the next deadline, >= 2 s
                    deadline = lease.rebind_at if self.state == "renewing" else lease.expires_at
                    delay = max(min((deadline - now) / 2, delay), min(2.0, self.retransmit))
                resend_at, attempt = now + delay, attempt + 1
            wake = self._next_wake(resend_at)
            readable, _, _ = select.select([self._sock], [], [], max(0.0, min(wake - now, 0.5)))
            if readable and (after := self._receive()) is not None:
                attempt, resend_at = 0, time.monotonic() + after

    def _next_wake(self, resend_at: float) -> float:
        lease = self.lease
        if self.state == "bound" and lease is not None:
            return min(lease.renew_at, lease.expires_at)
        return resend_at

    def _new_xid(self) -> None:
        self._xid = int.from_bytes(os.urandom(4), "big")

    def _begin(self) -> None:
        self._new_xid()
        self.offer = None
        self._enter("selecting")

    def _expire(self, event: str) -> None:
        self.report(event, self)
        self.lease = None
        self._begin()

    def _receive(self) -> float | None:
        """Handle one datagram; the seconds to the next send when it moved the state machine."""
        try:
            data, _peer = self._sock.recvfrom(MAX_PACKET)
        except OSError:
            return None
        self.counters.received += 1
        try:
            packet = decode(data)
        except MalformedPacket as exc:
            self.counters.drop(exc.reason)
            log.debug("dhcp %s: dropped a reply: %s", self.interface, exc)
            return None
        if packet.xid != self._xid or packet.chaddr != self.mac:
            self.counters.drop("other_xid")
            return None
        try:
            return self._handle(packet)
        except MalformedPacket as exc:
            self.counters.drop(exc.reason)
            log.debug("dhcp %s: dropped a reply in %s: %s", self.interface, self.state, exc)
            return None

    def _handle(self, packet: Packet) -> float | None:
        kind = packet.message_type
        if self.state == "selecting" and kind == OFFER:
            if len(_addresses(packet.options.get(OPT_SERVER_ID), OPT_SERVER_ID)) != 1:
                raise MalformedPacket("no_server_id", "an OFFER without a server identifier")
            if ipaddress.IPv4Address(packet.yiaddr).is_unspecified:
                raise MalformedPacket("bad_address", "an OFFER of address 0.0.0.0")
            self.offer = packet
            self._enter("requesting")
            return 0.0  # request at once
        if self.state in ("requesting", "renewing", "rebinding") and kind == ACK:
            lease = lease_from_ack(packet, time.monotonic())
            previous, self.lease = self.lease, lease
            self.error = None
            self._enter("bound")
            renewed = previous is not None and previous.address == lease.address
            self.report("renewed" if renewed else "bound", self)
            return 0.0
        if self.state in ("requesting", "renewing", "rebinding") and kind == NAK:
            log.info("dhcp %s: the server said NAK in %s", self.interface, self.state)
            if self.lease is not None:
                self._expire("nak")
            else:
                self._begin()
            # start over, but not at once: a server that NAKs every request would
            # otherwise get DISCOVER, REQUEST, NAK in a tight loop
            return self.retransmit
        self.counters.drop("unexpected")
        return None
