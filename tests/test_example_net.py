"""The network manager example (examples/system/net): its codecs, and the daemon for real.

The codecs (DHCP packets and leases, DNS replies) are tested as pure
functions, hostile input included. The daemon is tested as it runs: two
network namespaces the test creates, joined by a veth pair, Debian's
``dnsmasq`` serving DHCP and DNS on the server side, and a real ikosd
running the ``net`` actor in the client namespace (entered with ``nsenter
--net``, which changes nothing else: the instance's files and sockets are the
test's own). What dnsmasq never does (leave a renewal unanswered, NAK it)
a DHCP server of a few lines in the test does. Everything is removed in
``finally``: the servers are killed and reaped, the namespaces deleted
(their veth ends with them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import IKOSD, REPO, Instance, stop_and_check, wait_for
from hypothesis import example, given
from hypothesis import strategies as st

import ikos
import ikos.ipc
from examples.system.net import _dhcp, _dns

# --- the codecs -------------------------------------------------------------------------

MAC = bytes.fromhex("020000000001")


def reply(
    message_type: int = _dhcp.ACK,
    xid: int = 7,
    *,
    yiaddr: str = "10.0.0.5",
    options: bytes | None = None,
    op: int = _dhcp.BOOTREPLY,
) -> bytes:
    """A server's reply as dnsmasq would send it (or broken, through ``options``/``op``)."""
    header = _dhcp.HEADER.pack(
        op, 1, 6, 0, xid, 0, 0, bytes(4), ipaddress.IPv4Address(yiaddr).packed,
        bytes(4), bytes(4), MAC.ljust(16, b"\0"), bytes(64), bytes(128),
    )  # fmt: skip
    if options is None:
        options = (
            bytes([53, 1, message_type, 54, 4, 10, 0, 0, 1, 51, 4]) + (120).to_bytes(4, "big")
            + bytes([1, 4, 255, 255, 255, 0, 3, 4, 10, 0, 0, 1, 6, 8, 10, 0, 0, 1, 9, 9, 9, 9])
            + bytes([58, 4]) + (10).to_bytes(4, "big") + bytes([59, 4]) + (20).to_bytes(4, "big")
            + bytes([255])
        )  # fmt: skip
    return header + _dhcp.MAGIC_COOKIE + options


def test_dhcp_request_encodes_what_a_server_needs() -> None:
    packet = _dhcp.encode(_dhcp.REQUEST, 0xABCD, MAC, requested="10.0.0.5", server_id="10.0.0.1")
    op, htype, hlen, _, xid, _, flags, *_ = _dhcp.HEADER.unpack_from(packet)
    assert (op, htype, hlen, xid, flags) == (1, 1, 6, 0xABCD, _dhcp.FLAG_BROADCAST)
    options = _dhcp.parse_options(packet[_dhcp.MIN_REPLY :])
    assert options[_dhcp.OPT_MESSAGE_TYPE] == bytes([_dhcp.REQUEST])
    assert options[_dhcp.OPT_REQUESTED_IP] == bytes([10, 0, 0, 5])
    assert options[_dhcp.OPT_SERVER_ID] == bytes([10, 0, 0, 1])


def test_an_ack_gives_a_lease_with_its_options() -> None:
    lease = _dhcp.lease_from_ack(_dhcp.decode(reply()), now=100.0)
    assert (lease.address, lease.prefixlen, lease.server_id) == ("10.0.0.5", 24, "10.0.0.1")
    assert lease.routers == ("10.0.0.1",) and lease.dns == ("10.0.0.1", "9.9.9.9")
    assert (lease.renew_at, lease.rebind_at, lease.expires_at) == (110.0, 120.0, 220.0)


def test_t1_t2_out_of_order_fall_back_to_the_rfc_defaults() -> None:
    options = bytes([53, 1, 5, 54, 4, 10, 0, 0, 1, 51, 4]) + (100).to_bytes(4, "big")
    options += bytes([58, 4]) + (90).to_bytes(4, "big") + bytes([59, 4]) + (10).to_bytes(4, "big")
    lease = _dhcp.lease_from_ack(_dhcp.decode(reply(options=options + b"\xff")), now=0.0)
    assert (lease.t1, lease.t2) == (50.0, 87.5)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (reply()[:200], "truncated"),
        (reply(op=_dhcp.BOOTREQUEST), "not_reply"),
        (reply()[: _dhcp.HEADER.size] + b"\0\0\0\0" + bytes([53, 1, 5, 255]), "no_cookie"),
        (reply(options=bytes([53, 1, 5, 6, 200, 1, 2])), "bad_option"),
        (reply(options=bytes([53, 1, 5, 6])), "bad_option"),
        (reply(options=bytes([1, 4, 255, 255, 255, 0, 255])), "no_type"),
        (reply(options=bytes([53, 2, 5, 5, 255])), "no_type"),
    ],
)
def test_malformed_replies_are_named(data: bytes, reason: str) -> None:
    with pytest.raises(_dhcp.MalformedPacket) as info:
        _dhcp.decode(data)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (bytes([53, 1, 5, 54, 4, 10, 0, 0, 1, 255]), "no_lease_time"),
        (bytes([53, 1, 5, 51, 4, 0, 0, 0, 60, 255]), "no_server_id"),
        (bytes([53, 1, 5, 54, 3, 10, 0, 0, 51, 4, 0, 0, 0, 60, 255]), "bad_option"),
        (bytes([53, 1, 5, 54, 4, 10, 0, 0, 1, 51, 4, 0, 0, 0, 60, 1, 4, 255, 0, 255, 0, 255]),
         "bad_option"),
    ],
)  # fmt: skip
def test_acks_without_what_a_lease_needs_are_refused(options: bytes, reason: str) -> None:
    with pytest.raises(_dhcp.MalformedPacket) as info:
        _dhcp.lease_from_ack(_dhcp.decode(reply(options=options)), now=0.0)
    assert info.value.reason == reason


def test_an_ack_of_address_zero_is_refused() -> None:
    with pytest.raises(_dhcp.MalformedPacket, match="bad_address"):
        _dhcp.lease_from_ack(_dhcp.decode(reply(yiaddr="0.0.0.0")), now=0.0)


def test_retransmission_doubles_up_to_64_seconds() -> None:
    assert [_dhcp.retransmit_delay(n, 4.0) for n in range(6)] == [4, 8, 16, 32, 64, 64]


@given(st.binary(max_size=700))
def test_no_bytes_make_the_dhcp_decoder_raise_anything_but_malformed(data: bytes) -> None:
    with contextlib.suppress(_dhcp.MalformedPacket):
        _dhcp.decode(data)
    with contextlib.suppress(_dhcp.MalformedPacket):
        _dhcp.decode(reply()[: _dhcp.MIN_REPLY] + data)


@example(options=bytes([53, 1, 0]), now=0.0)  # found by CI at stop 20
@given(st.binary(max_size=400), st.floats(0, 1e6))
def test_any_options_give_a_sane_lease_or_a_named_refusal(options: bytes, now: float) -> None:
    try:
        lease = _dhcp.lease_from_ack(_dhcp.decode(reply(options=bytes([53, 1, 5]) + options)), now)
    except _dhcp.MalformedPacket as exc:
        # a second option 53 is concatenated to the first (RFC 3396, as any repeated
        # option): the message type is then two bytes, which is refused as missing
        reasons = {"bad_option", "no_lease_time", "no_server_id", "bad_address", "no_type"}
        assert exc.reason in reasons
        return
    assert 0 < lease.t1 <= lease.t2 <= lease.lease_time <= _dhcp.MAX_LEASE
    assert now < lease.renew_at <= lease.rebind_at <= lease.expires_at


@given(st.binary(max_size=600))
def test_no_bytes_make_the_dns_parser_raise_anything_but_dns_errors(data: bytes) -> None:
    with contextlib.suppress(_dns.DnsError):
        _dns.parse_reply(data, int.from_bytes(data[:2].ljust(2, b"\0"), "big"))


def dns_reply(ident: int, body: bytes, *, ancount: int = 1, flags: int = 0x8180) -> bytes:
    question = b"\x04test\x04ikos\x00" + struct.pack("!HH", 1, 1)
    return _dns.HEADER.pack(ident, flags, 1, ancount, 0, 0) + question + body


def test_dns_answers_are_parsed_through_compression() -> None:
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 9, 9, 9])
    rcode, truncated, records = _dns.parse_reply(dns_reply(5, answer), 5)
    assert (rcode, truncated) == (0, False)
    assert records == [_dns.Record("test.ikos", "A", 60, "10.9.9.9")]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x05", "malformed"),
        (dns_reply(6, b""), "wrong_id"),
        (dns_reply(5, b"\xc0\x2a\xc0\x28" + bytes(10)), "malformed"),  # a pointer loop
        (dns_reply(5, b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 400) + b"\1"), "malformed"),
        (dns_reply(5, b"\x3f" + b"a" * 10), "malformed"),
        (dns_reply(5, b"", flags=0x0100), "malformed"),
    ],
)
def test_hostile_dns_replies_are_errors(data: bytes, reason: str) -> None:
    with pytest.raises(_dns.DnsError) as info:
        _dns.parse_reply(data, 5)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("name", "fault"),
    [("", "empty"), ("a" * 254, "254 characters"), ("a..b", "empty"), ("é.org", "ASCII")],
)
def test_bad_names_are_refused_by_what_is_wrong(name: str, fault: str) -> None:
    with pytest.raises(ValueError, match=fault):
        _dns.check_name(name)


def test_the_dns_cache_is_bounded() -> None:
    resolver = _dns.Resolver(cache_size=3)
    for i in range(10):
        resolver._store((f"n{i}", "A"), 1e12, [])
    assert resolver.stats()["entries"] == 3


# --- the daemon in network namespaces ---------------------------------------------------

NEEDS = [tool for tool in ("ip", "nsenter", "setpriv", "dnsmasq") if not shutil.which(tool)]
needs_netns = pytest.mark.skipif(
    bool(NEEDS) or os.geteuid() != 0,
    reason=f"needs root and {', '.join(NEEDS)} (scripts/test-deps.sh installs dnsmasq-base)"
    if NEEDS
    else "needs root to create network namespaces",
)

SERVER_IP = "10.77.0.1"
TREE = """
import ikos
from examples.system.net import child

tree = ikos.Supervisor("root", children=[child(requires=(), **{options})])
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Lan:
    """A client namespace with ``eth0``, wired to a server namespace (``vsrv``, 10.77.0.1)."""

    client: str
    server: str
    tmp: Path

    def in_client(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.client}"]

    def in_server(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.server}"]

    def client_address_info(self) -> list[dict[str, Any]]:
        """``ip -j -4 addr show dev eth0`` in the client namespace: its ``addr_info``."""
        out = subprocess.run(
            ["ip", "-n", self.client, "-j", "-4", "addr", "show", "dev", "eth0"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        return [a for iface in json.loads(out) for a in iface.get("addr_info", [])]

    def client_addresses(self) -> list[str]:
        return [a["local"] for a in self.client_address_info()]

    def client_routes(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            ["ip", "-n", self.client, "-j", "-4", "route"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        return list(json.loads(out))


@pytest.fixture
def wires(tmp_path: Path) -> Iterator[Lan]:
    """The two namespaces and their veth pair; deleted (veth with them) after the test."""
    if NEEDS or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(NEEDS) or 'nothing else'}")
    tag = uuid.uuid4().hex[:8]
    net = Lan(f"ikos-nc-{tag}", f"ikos-ns-{tag}", tmp_path)
    made: list[str] = []
    try:
        for ns in (net.client, net.server):
            try:
                ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
            made.append(ns)
        ip(
            "-n",
            net.client,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "vsrv",
            "netns",
            net.server,
        )
        ip("-n", net.server, "addr", "add", f"{SERVER_IP}/24", "dev", "vsrv")
        for ns, dev in ((net.server, "vsrv"), (net.server, "lo"), (net.client, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        yield net
    finally:
        for ns in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", ns)


@pytest.fixture
def lan(wires: Lan) -> Iterator[Lan]:
    """:func:`wires` with dnsmasq serving DHCP and DNS in the server namespace."""
    log = wires.tmp / "dnsmasq.log"
    with open(log, "w") as out:
        dnsmasq = subprocess.Popen(
            [
                *wires.in_server(), "dnsmasq", "--no-daemon",
                "--conf-file=/dev/null", "--interface=vsrv", "--bind-interfaces",
                "--no-resolv", "--no-hosts", "--log-dhcp", "--pid-file=",
                f"--dhcp-leasefile={wires.tmp / 'leases'}",
                "--dhcp-range=10.77.0.50,10.77.0.150,255.255.255.0,2m",
                f"--dhcp-option=option:router,{SERVER_IP}",
                f"--dhcp-option=option:dns-server,{SERVER_IP}",
                # T1 and T2 of a few seconds: dnsmasq's shortest lease is 2 min
                "--dhcp-option=option:T1,3", "--dhcp-option=option:T2,6",
                "--address=/test.ikos/10.9.9.9", "--local=/missing.ikos/", "--local-ttl=60",
                # 3 x 250 bytes: more than a 512-byte UDP reply holds, so TC and TCP
                f"--txt-record=big.txt.ikos,{','.join(c * 250 for c in 'xyz')}",
            ],
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "sockets bound exclusively" in log.read_text(), message="dnsmasq")
        yield wires
    finally:
        dnsmasq.kill()
        dnsmasq.wait(timeout=30)


@pytest.fixture
def net_daemon(wires: Lan) -> Iterator[Callable[..., Instance]]:
    """Start ikosd in the client namespace running ``net`` with the given options."""
    started: list[Instance] = []

    def start(drop_net_admin: bool = False, **options: Any) -> Instance:
        base = wires.tmp / f"ikos{len(started)}"
        base.mkdir()
        (base / "tree.py").write_text(textwrap.dedent(TREE.format(options=repr(options))))
        mark = uuid.uuid4().hex
        env = {**os.environ, "IKOS_TEST_MARK": mark, "PYTHONPATH": str(REPO)}
        # setpriv drops CAP_NET_ADMIN from the bounding set: root's next exec lacks it
        drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
        cmd = [*wires.in_client(), *(drop if drop_net_admin else [])]
        cmd += [IKOSD, "--root", str(base / "root"), "--log-level", "debug"]
        with open(base / "ikosd.out", "w") as out:
            proc = subprocess.Popen(
                [*cmd, "--tree", f"{base / 'tree.py'}:tree"],
                stdout=out, stderr=subprocess.STDOUT, text=True, cwd=base, env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        inst = Instance(base / "root", proc, mark, base / "ikosd.out")
        started.append(inst)
        inst.wait_ready()
        inst.wait_state("net", "running", timeout=60)
        return inst

    try:
        yield start
    finally:
        stop_and_check(started)


def call(inst: Instance, message: Any) -> Any:
    return ikos.ActorRef("net", root=inst.root).ask(message, timeout=30)


class Events:
    """The ``net.*`` broadcasts of an instance, gathered by a subscription."""

    def __init__(self, root: Path) -> None:
        self.seen: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self.sub = ikos.ipc.subscribe("net.*", self._add, root=root)
        wait_for(lambda: ikos.ipc.stats(root=root)["subscriptions"], message="subscribed")

    def _add(self, message: ikos.ipc.IpcMessage) -> None:
        with self._lock:
            self.seen.append((str(message.topic), message.payload))

    def find(self, topic: str, **fields: Any) -> Any:
        with self._lock:
            return next(
                (
                    p
                    for t, p in self.seen
                    if t == topic and all(p.get(k) == v for k, v in fields.items())
                ),
                None,
            )

    def wait(self, topic: str, **fields: Any) -> Any:
        return wait_for(lambda: self.find(topic, **fields), 60, message=f"{topic} {fields}")


@needs_netns
def test_lists_changes_and_publishes_links_and_addresses(
    net_daemon: Callable[..., Instance], wires: Lan
) -> None:
    inst = net_daemon()
    links = call(inst, {"op": "links"})
    assert links["ok"], links
    eth0 = next(link for link in links["links"] if link["name"] == "eth0")
    assert eth0["kind"] == "veth" and not eth0["up"]
    assert {link["name"] for link in links["links"]} == {"lo", "eth0"}  # the namespace's own
    service = ikos.registry.lookup("net", root=inst.root)
    assert service.active and "dhcpv4" in service.capabilities
    events = Events(inst.root)
    try:
        assert call(inst, {"op": "link", "interface": "eth0", "state": "up"})["ok"]
        events.wait("net.link", name="eth0", up=True)
        ip("-n", wires.client, "link", "set", "eth0", "down")  # a change from outside
        events.wait("net.link", name="eth0", up=False)
        added = call(
            inst, {"op": "address", "action": "add", "interface": "eth0", "address": "10.88.0.2/24"}
        )
        assert added == {"ok": True, "interface": "eth0", "address": "10.88.0.2", "prefixlen": 24}
        events.wait("net.address", event="new", interface="eth0", address="10.88.0.2")
        assert "10.88.0.2" in wires.client_addresses()
        addresses = call(inst, {"op": "addresses", "interface": "eth0"})["addresses"]
        assert {"10.88.0.2"} == {a["address"] for a in addresses if a["family"] == "inet"}
        call(inst, {"op": "link", "interface": "eth0", "state": "up"})
        wait_for(
            lambda: any(
                r["destination"] == "10.88.0.0/24" for r in call(inst, {"op": "routes"})["routes"]
            )
        )
        assert call(
            inst, {"op": "address", "action": "del", "interface": "eth0", "address": "10.88.0.2/24"}
        )["ok"]
        events.wait("net.address", event="del", address="10.88.0.2")
    finally:
        events.sub.unsubscribe()


@needs_netns
def test_bad_requests_are_answered_clearly(net_daemon: Callable[..., Instance]) -> None:
    inst = net_daemon()
    pid = inst.pid_of("net")
    cases: list[tuple[Any, str]] = [
        ("links", "expected a request object"),
        ({"op": "reboot"}, "'op': 'reboot', expected one of links"),
        ({"op": 5}, "'op': expected a non-empty string, got int"),
        ({"op": "link", "interface": "eth0", "state": "sideways"}, "'state'"),
        ({"op": "link", "interface": "x" * 16, "state": "up"}, "is not an interface name"),
        ({"op": "link", "interface": "nosuch0", "state": "up"}, "no interface named 'nosuch0'"),
        (
            {"op": "address", "action": "add", "interface": "eth0", "address": "10.1.1.1/99"},
            "not an address",
        ),
        ({"op": "resolve", "name": "a" * 100_000}, "'name': 100000 characters, at most 255"),
        ({"op": "resolve", "name": ".".join(["a" * 63] * 4)}, "'name': a name of 255"),
        ({"op": "resolve", "name": "x.org", "type": "SOA"}, "'type'"),
        ({"op": "links", **{f"k{i}": i for i in range(20)}}, "at most 8"),
        ({"op": "dhcp", "action": "stop", "interface": "eth0"}, "no client runs on eth0"),
        ({"op": "dhcp", "action": "start", "interface": "nosuch0"}, "no interface named"),
    ]
    for message, expected in cases:
        answer = call(inst, message)
        assert answer["ok"] is False and expected in answer["error"], (message, answer)
    out = inst.ctl("call", "net", '{"op": "resolve", "name": "' + "b" * 5000 + '"}', check=True)
    assert "at most 255" in out.stdout
    assert inst.pid_of("net") == pid  # nothing crashed


def leased(inst: Instance) -> dict[str, Any] | None:
    clients = call(inst, {"op": "dhcp", "action": "status"})["clients"]
    return clients[0] if clients and clients[0]["lease"] else None


@needs_netns
def test_dhcp_lease_from_dnsmasq_is_applied_renewed_and_resolves(
    net_daemon: Callable[..., Instance], lan: Lan
) -> None:
    inst = net_daemon(dhcp=["eth0"], dhcp_retransmit=1.0)
    events = Events(inst.root)
    try:
        client = wait_for(lambda: leased(inst), 60, message="a DHCP lease")
        lease = client["lease"]
        assert lease["server"] == SERVER_IP and lease["dns"] == [SERVER_IP]
        assert ipaddress.ip_address(lease["address"]) in ipaddress.ip_network("10.77.0.0/24")
        wait_for(lambda: lease["address"] in lan.client_addresses(), message="the address set")
        wait_for(
            lambda: any(
                r["dst"] == "default" and r.get("gateway") == SERVER_IP for r in lan.client_routes()
            ),
            message="the default route set",
        )
        assert leased(inst)["applied"]
        # the address lives as long as the lease (120 s) unless renewed: the kernel
        # drops it by itself if the daemon is gone
        (info,) = [a for a in lan.client_address_info() if a["local"] == lease["address"]]
        assert 0 < info["valid_life_time"] <= 120 and info["broadcast"] == "10.77.0.255", info
        # T1 is 3 s: the client renews with its server, unicast, and says so
        events.wait("net.dhcp", event="renewed", interface="eth0")
        assert leased(inst)["lease"]["address"] == lease["address"]
        assert call(inst, {"op": "status"})["resolvers"] == [SERVER_IP]
        first = call(inst, {"op": "resolve", "name": "Test.IKOS.", "type": "A"})
        assert first["ok"] and first["answers"] == ["10.9.9.9"] and not first["cached"], first
        assert call(inst, {"op": "resolve", "name": "test.ikos"})["cached"]
        missing = call(inst, {"op": "resolve", "name": "nothere.missing.ikos"})
        assert missing["ok"] is False and missing["reason"] == "nxdomain", missing
        big = call(inst, {"op": "resolve", "name": "big.txt.ikos", "type": "TXT"})
        assert big["ok"] and big["answers"] == ["x" * 250 + "y" * 250 + "z" * 250], big
        assert call(inst, {"op": "status"})["dns_cache"]["over_tcp"] == 1
    finally:
        events.sub.unsubscribe()


SENDER = """
import socket, sys
target, count, packets = sys.argv[1], int(sys.argv[2]), [bytes.fromhex(p) for p in sys.argv[3:]]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i in range(count):
        s.sendto(packets[i % len(packets)], (target, 68))
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@needs_netns
def test_malformed_dhcp_replies_are_counted_and_ignored(
    net_daemon: Callable[..., Instance], lan: Lan
) -> None:
    inst = net_daemon(dhcp=["eth0"], dhcp_retransmit=1.0)
    address = wait_for(lambda: leased(inst), 60, message="a DHCP lease")["lease"]["address"]
    pid = inst.pid_of("net")
    assert pid is not None
    hostile = [
        b"\x02" * 7,  # truncated
        reply(op=_dhcp.BOOTREQUEST),  # not a reply
        reply()[: _dhcp.HEADER.size] + b"junk" + bytes([53, 1, 5, 255]),  # no cookie
        reply(options=bytes([53, 1, 5, 6, 250, 1])),  # an option past the end
        reply(xid=0xDEAD),  # a well-formed ACK of another transaction
        os.urandom(600),
    ]

    def send(count: int) -> None:  # from the server's side, to the leased address
        subprocess.run(
            [*lan.in_server(), sys.executable, "-c", SENDER,
             address, str(count), *(p.hex() for p in hostile)],
            check=True, timeout=60,
        )  # fmt: skip

    def dropped() -> dict[str, int]:
        return dict(leased(inst)["dropped"]) if leased(inst) else {}

    # UDP drops what the client's socket buffer cannot hold, so rounds are sent until
    # enough were counted (on a loaded machine more of each round is dropped)
    kinds = {"truncated", "not_reply", "no_cookie", "bad_option", "other_xid"}
    wait_for(lambda: send(300) or kinds <= set(dropped()), 120, message=f"drops of {kinds}")
    before = rss_kib(pid)
    target = sum(dropped().values()) + 20000
    wait_for(lambda: send(1000) or sum(dropped().values()) >= target, 300, message="20000 counted")
    growth = rss_kib(pid) - before
    assert growth < 2048, f"the daemon grew by {growth} KiB on 20000 malformed packets"
    status = leased(inst)
    assert status is not None and status["lease"]["address"] == address  # still bound
    assert inst.pid_of("net") == pid
    # and it still renews (every 3 s): the lease outlives the noise
    events = Events(inst.root)
    try:
        events.wait("net.dhcp", event="renewed", interface="eth0")
    finally:
        events.sub.unsubscribe()


@needs_netns
def test_without_cap_net_admin_changes_are_refused_by_name(
    net_daemon: Callable[..., Instance], lan: Lan
) -> None:
    ip("-n", lan.client, "link", "set", "eth0", "up")
    inst = net_daemon(drop_net_admin=True, dhcp=["eth0"], dhcp_retransmit=1.0)
    refused = call(inst, {"op": "link", "interface": "eth0", "state": "down"})
    assert refused["ok"] is False and "CAP_NET_ADMIN" in refused["error"], refused
    assert call(inst, {"op": "links"})["ok"]  # reading needs nothing
    # the lease is obtained, and not applied, saying why
    client = wait_for(lambda: (c := leased(inst)) and c["apply_error"] and c, 60, message="a lease")
    assert client["applied"] is False and "CAP_NET_ADMIN" in client["apply_error"], client
    assert lan.client_addresses() == []
    assert call(inst, {"op": "status"})["missing"] == "CAP_NET_ADMIN"


#: A DHCP server of a few lines that grants one lease (20 s, T1 5 s, T2 10 s) and then
#: ignores every later REQUEST ("silent") or refuses it with a NAK ("nak"): the
#: paths dnsmasq, which renews every lease it granted, never takes.
SCRIPTED_SERVER = """
import socket, sys, time
mode = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"vsrv\\0")
s.bind(("0.0.0.0", 67))
print("listening", flush=True)
acks = 0
while True:
    data, peer = s.recvfrom(1500)
    options, i = {}, 240
    while i + 1 < len(data) and data[i] != 255:
        options[data[i]] = data[i + 2 : i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    kind = options.get(53, b"\\0")[0]
    if kind == 1:
        answer = 2  # DISCOVER -> OFFER
    elif kind == 3 and acks == 0:
        answer, acks = 5, 1  # the first REQUEST -> ACK
    elif kind == 3 and mode == "nak":
        answer = 6
    else:
        continue
    opts = bytes([53, 1, answer, 54, 4, 10, 77, 0, 1])
    if answer != 6:
        opts += bytes([51, 4, 0, 0, 0, 20, 58, 4, 0, 0, 0, 5, 59, 4, 0, 0, 0, 10])
        opts += bytes([1, 4, 255, 255, 255, 0])
    yiaddr = bytes([10, 77, 0, 77]) if answer != 6 else bytes(4)
    head = bytes([2, 1, 6, 0]) + data[4:8] + bytes(8) + yiaddr + bytes(8) + data[28:44]
    packet = head + bytes(192) + bytes([99, 130, 83, 99]) + opts + bytes([255])
    s.sendto(packet, ("255.255.255.255", 68))
    print("answered", kind, "with", answer, "at", time.monotonic(), flush=True)
"""


def after_nak(server_log: str) -> tuple[float, float] | None:
    """When the scripted server sent its first NAK, and answered the next DISCOVER."""
    nak: float | None = None
    for line in server_log.splitlines():
        words = line.split()
        if words[:1] != ["answered"]:
            continue
        if words[3] == "6" and nak is None:
            nak = float(words[5])
        elif words[1] == "1" and nak is not None:
            return nak, float(words[5])
    return None


@needs_netns
@pytest.mark.parametrize("mode", ["silent", "nak"])
def test_a_lease_not_renewed_rebinds_then_expires_and_a_nak_ends_it(
    net_daemon: Callable[..., Instance], wires: Lan, mode: str
) -> None:
    log = wires.tmp / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*wires.in_server(), sys.executable, "-c", SCRIPTED_SERVER, mode],
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "listening" in log.read_text(), message="the scripted server")
        inst = net_daemon(dhcp=["eth0"], dhcp_retransmit=0.5)
        events = Events(inst.root)
        try:
            wait_for(lambda: leased(inst), 60, message="a DHCP lease")
            wait_for(lambda: "10.77.0.77" in wires.client_addresses(), message="the address set")
            if mode == "silent":  # T1: renewing, unanswered; T2: rebinding, unanswered; expiry
                events.wait("net.dhcp", event="state", state="renewing")
                events.wait("net.dhcp", event="state", state="rebinding")
                gone = events.wait("net.dhcp", event="expired", interface="eth0")
            else:  # the renewal is refused
                gone = events.wait("net.dhcp", event="nak", interface="eth0")
                # and the client starts over after its resend delay, not at once
                # (a server that NAKs everything would get a tight loop)
                answers = wait_for(lambda: after_nak(log.read_text()), 60, message="a DISCOVER")
                assert answers[1] - answers[0] >= 0.45, answers
            assert gone["lease"]["address"] == "10.77.0.77"
            wait_for(
                lambda: "10.77.0.77" not in wires.client_addresses(), message="the address removed"
            )
            assert not events.find("net.dhcp", event="renewed")
        finally:
            events.sub.unsubscribe()
    finally:
        server.kill()
        server.wait(timeout=30)


def test_child_requires_dev_and_auth() -> None:
    from examples.system.net import Net, child

    spec = child(dhcp=["eth0"])
    assert (spec.name, spec.actor, spec.requires) == ("net", Net, ("dev", "auth"))
    assert spec.kwargs == {"dhcp": ["eth0"]}


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ({"dhcp": "eth0"}, "option 'dhcp' is a list of strings, not 'eth0'"),
        ({"resolvers": ["9.9.9.9", 5]}, "option 'resolvers' is a list of strings"),
        ({"resolvers": ["nine"]}, "option 'resolvers': 'nine' does not appear"),
        ({"dhcp_retransmit": 0}, "seconds > 0"),
    ],
)
def test_bad_options_fail_the_start_naming_the_option(options: dict[str, Any], fault: str) -> None:
    from examples.system.net import Net

    with pytest.raises((TypeError, ValueError), match=fault):
        Net(**options)
