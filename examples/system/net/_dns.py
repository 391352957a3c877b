"""A small DNS stub resolver: the query codec, the answer parser and a TTL cache.

The network manager answers ``resolve`` requests by asking the resolvers it
knows (configured, from a DHCP lease, or /etc/resolv.conf) over UDP, with a
fresh random id per query checked on the reply, a timeout and retries, and
TCP when a reply is truncated (TC). No library: the packages available here
offer no maintained DNS client beside dnspython, whose weight (a full
zone-file and DNSSEC toolkit) is out of proportion for A/AAAA lookups; the
wire format for a question and its answers is short and is parsed with a
bound on every loop (name labels, compression jumps, record counts), so a
hostile reply is an error, never a hang or a crash.

Answers are cached by (name, type) for their smallest TTL, capped by
``max_ttl``, in an LRU of bounded size; negative answers (NXDOMAIN, no data)
for ``negative_ttl``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

TYPES = {"A": 1, "AAAA": 28, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
CLASS_IN = 1
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
HEADER = struct.Struct("!HHHHHH")
MAX_NAME = 253
MAX_LABEL = 63
#: A name may jump back through compression pointers at most this often.
MAX_JUMPS = 32
MAX_UDP = 4096


class DnsError(Exception):
    """A lookup that failed; ``reason`` is one word (``nxdomain``, ``timeout``, ``malformed``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_name(name: str) -> str:
    """``name`` normalised (lower case, no final dot); ValueError naming the fault."""
    name = name.rstrip(".").lower()
    if not name:
        raise ValueError("an empty name")
    if len(name) > MAX_NAME:
        raise ValueError(f"a name of {len(name)} characters (at most {MAX_NAME})")
    for label in name.split("."):
        if not 0 < len(label) <= MAX_LABEL:
            raise ValueError(f"label {label[:20]!r} is empty or longer than {MAX_LABEL}")
        try:
            label.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"label {label[:20]!r} is not ASCII (use its IDNA form)") from None
    return name


def encode_query(name: str, qtype: int, ident: int) -> bytes:
    """A recursive query for ``name`` (already checked) of ``qtype``."""
    qname = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split(".")) + b"\0"
    return HEADER.pack(ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, CLASS_IN)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The (possibly compressed) name at ``offset`` and the offset after it."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    length = 0
    while True:
        if offset >= len(data):
            raise DnsError("malformed", "a name runs past the end of the reply")
        size = data[offset]
        if size & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DnsError("malformed", "a compression pointer is cut off")
            jumps += 1
            if jumps > MAX_JUMPS:
                raise DnsError("malformed", "compression pointers loop")
            if end is None:
                end = offset + 2
            offset = ((size & 0x3F) << 8) | data[offset + 1]
            continue
        if size & 0xC0:
            raise DnsError("malformed", f"label type {size >> 6} is not supported")
        offset += 1
        if size == 0:
            break
        label = data[offset : offset + size]
        if len(label) < size:
            raise DnsError("malformed", "a label runs past the end of the reply")
        length += size + 1
        if length > MAX_NAME + 2:
            raise DnsError("malformed", "a name longer than 255 bytes")
        labels.append(label.decode("ascii", "replace").lower())
        offset += size
    return ".".join(labels), end if end is not None else offset


@dataclass(frozen=True)
class Record:
    """One answer record, its data as text (an address, a name, a string)."""

    name: str
    type: str
    ttl: int
    data: str


def _rdata(data: bytes, rtype: int, start: int, size: int) -> str:
    raw = data[start : start + size]
    if rtype == 1 and size == 4:
        return str(ipaddress.IPv4Address(raw))
    if rtype == 28 and size == 16:
        return str(ipaddress.IPv6Address(raw))
    if rtype in (5, 12):
        return _read_name(data, start)[0]
    if rtype == 15 and size >= 3:
        return f"{int.from_bytes(raw[:2], 'big')} {_read_name(data, start + 2)[0]}"
    if rtype == 16:
        parts, i = [], 0
        while i < len(raw):
            parts.append(raw[i + 1 : i + 1 + raw[i]].decode("utf-8", "replace"))
            i += 1 + raw[i]
        return "".join(parts)
    raise DnsError("malformed", f"a {TYPE_NAMES.get(rtype, rtype)} record of {size} bytes")


def parse_reply(data: bytes, ident: int) -> tuple[int, bool, list[Record]]:
    """``(rcode, truncated, answers)`` of a reply to query ``ident``; DnsError when malformed."""
    if len(data) < HEADER.size:
        raise DnsError("malformed", f"a reply of {len(data)} bytes")
    rid, flags, qdcount, ancount, _ns, _ar = HEADER.unpack_from(data)
    if rid != ident:
        raise DnsError("wrong_id", f"reply id {rid}, query id {ident}")
    if not flags & 0x8000:
        raise DnsError("malformed", "not a response (QR is 0)")
    offset = HEADER.size
    for _ in range(min(qdcount, 4)):
        _, offset = _read_name(data, offset)
        offset += 4
    answers: list[Record] = []
    for _ in range(min(ancount, 256)):
        name, offset = _read_name(data, offset)
        if offset + 10 > len(data):
            raise DnsError("malformed", "an answer record is cut off")
        rtype, rclass, ttl, size = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if offset + size > len(data):
            raise DnsError("malformed", "an answer's data runs past the end")
        if rclass == CLASS_IN and rtype in TYPE_NAMES:
            answers.append(Record(name, TYPE_NAMES[rtype], ttl, _rdata(data, rtype, offset, size)))
        offset += size
    return flags & 0x000F, bool(flags & 0x0200), answers


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf (none when it is missing)."""
    servers: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        servers.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
                    except ValueError:
                        continue
    except OSError:
        return []
    return servers[:3]


def _exchange_udp(server: str, query: bytes, timeout: float) -> bytes:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((server, 53))  # connected: replies from anyone else are refused by the kernel
        sock.send(query)
        return sock.recv(MAX_UDP)


def _exchange_tcp(server: str, query: bytes, timeout: float) -> bytes:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((server, 53))
        sock.sendall(struct.pack("!H", len(query)) + query)
        head = _recv_exact(sock, 2)
        return _recv_exact(sock, struct.unpack("!H", head)[0])


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise DnsError("malformed", "the server closed the TCP connection mid-reply")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Resolver:
    """Looks names up on a list of servers, with a bounded TTL cache.

    Example::

        resolver = Resolver()
        resolver.resolve("example.org", "A", ["9.9.9.9"])  # [Record(...)]
    """

    def __init__(
        self,
        *,
        timeout: float = 2.0,
        attempts: int = 2,
        budget: float = 5.0,
        cache_size: int = 1024,
        max_ttl: int = 3600,
        negative_ttl: int = 30,
    ) -> None:
        self.timeout = timeout
        self.attempts = attempts
        # a lookup blocks the daemon's handler: the whole of it is bounded, below
        # the 10 s a caller such as ikosctl call waits by default
        self.budget = budget
        self.cache_size = cache_size
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._cache: OrderedDict[tuple[str, str], tuple[float, list[Record] | DnsError]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0
        self.over_tcp = 0

    def resolve(self, name: str, rtype: str, servers: list[str]) -> tuple[list[Record], bool]:
        """``(records, cached)`` for ``name``; DnsError (``nxdomain``, ``timeout``...) otherwise."""
        key = (name, rtype)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and entry[0] > now:
            self._cache.move_to_end(key)
            self.hits += 1
            if isinstance(entry[1], DnsError):
                raise entry[1]
            return entry[1], True
        self.misses += 1
        if not servers:
            raise DnsError(
                "no_servers",
                "no resolver is known (none configured, leased or in /etc/resolv.conf)",
            )
        try:
            records = self._query(name, TYPES[rtype], servers)
        except DnsError as exc:
            if exc.reason in ("nxdomain", "nodata"):
                self._store(key, now + self.negative_ttl, exc)
            raise
        ttl = min([r.ttl for r in records] + [self.max_ttl])
        self._store(key, now + ttl, records)
        return records, False

    def _store(self, key: tuple[str, str], until: float, value: list[Record] | DnsError) -> None:
        self._cache[key] = (until, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _query(self, name: str, qtype: int, servers: list[str]) -> list[Record]:
        last = DnsError("timeout", f"no reply from {', '.join(servers)}")
        deadline = time.monotonic() + self.budget
        for _ in range(self.attempts):
            for server in servers:
                timeout = min(self.timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise DnsError("timeout", f"no answer within {self.budget:g} s ({last.detail})")
                ident = int.from_bytes(os.urandom(2), "big")
                query = encode_query(name, qtype, ident)
                try:
                    data = _exchange_udp(server, query, timeout)
                    rcode, truncated, answers = parse_reply(data, ident)
                    if truncated:  # the answer did not fit a UDP reply: ask again over TCP
                        self.over_tcp += 1
                        data = _exchange_tcp(server, query, timeout)
                        rcode, truncated, answers = parse_reply(data, ident)
                except TimeoutError:
                    last = DnsError("timeout", f"{server}: no reply in {timeout:.3g} s")
                    continue
                except OSError as exc:  # refused, unreachable: the next server may do
                    last = DnsError("unreachable", f"{server}: {exc.strerror or exc}")
                    continue
                except DnsError as exc:
                    last = DnsError(exc.reason, f"{server}: {exc.detail}")
                    continue
                if rcode == 3:
                    raise DnsError("nxdomain", f"{name} does not exist ({server})")
                if rcode != 0:
                    last = DnsError("servfail", f"{server} answered {RCODES.get(rcode, rcode)}")
                    continue
                wanted = [r for r in answers if r.type == TYPE_NAMES[qtype]]
                if not wanted:
                    raise DnsError("nodata", f"{name} has no {TYPE_NAMES[qtype]} record ({server})")
                return answers
        raise last

    def stats(self) -> dict[str, int]:
        """Cache figures for ``status``, and how many lookups went on over TCP."""
        return {
            "entries": len(self._cache), "hits": self.hits, "misses": self.misses,
            "over_tcp": self.over_tcp,
        }  # fmt: skip
