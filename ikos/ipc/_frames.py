"""The broker wire's frames: a JSON header, an opaque payload, and at most one descriptor.

Every frame, both ways, is ``u32 L | u32 H | H bytes of JSON header | L-4-H bytes of
payload`` (big-endian lengths). The header is JSON so that a short C or Go program can
speak the protocol with nothing but a JSON library; the payload stays bytes so that the
broker routes it without decoding it (it never unpickles anything). A large payload
travels instead as a sealed memfd passed with SCM_RIGHTS, announced by ``"shm": SIZE``
in the header (docs/protocol.md).

:class:`FrameReader` is the one parser, used by the broker and the Python client: it is
fed what ``recvmsg`` returned (bytes and descriptors) and yields whole frames, checking
every length against its limits before buffering, so that a peer can make it hold at
most one maximal frame.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LENGTHS = struct.Struct("!II")
MAX_HEADER = 65536
#: Descriptors one recvmsg may carry (more are closed and the connection dropped).
MAX_FDS = 4


class FrameError(ValueError):
    """A frame that breaks the protocol; the message says how."""


class FrameTooLarge(FrameError):
    """A frame announcing a payload above the reader's limit."""


@dataclass(slots=True)
class Frame:
    """One decoded frame: its header, its payload, and the descriptor it carried."""

    header: dict[str, Any]
    payload: bytes = b""
    fd: int | None = field(default=None)

    @property
    def op(self) -> str:
        return str(self.header.get("op", ""))

    def close(self) -> None:
        """Close the carried descriptor, if any (idempotent)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def dumps_header(header: dict[str, Any]) -> bytes:
    """The compact JSON of a header."""
    return json.dumps(header, separators=(",", ":")).encode()


def encode_frame(header: dict[str, Any] | bytes, payload: bytes | memoryview = b"") -> bytes:
    """One frame's bytes: ``header`` (a dict, or its JSON already encoded) and ``payload``."""
    head = header if isinstance(header, bytes) else dumps_header(header)
    return LENGTHS.pack(4 + len(head) + len(payload), len(head)) + head + bytes(payload)


_decode = json.JSONDecoder().decode
#: Headers shared by a FrameReader(share_headers=True): at most this long, this many.
_CACHED_HEADER = 512
_CACHE_ENTRIES = 256


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = _decode(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"the frame header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise FrameError('the frame header must be a JSON object with a string "op"')
    return header


class FrameReader:
    """Parses frames out of a byte stream, with descriptors, within fixed limits.

    ``max_payload`` bounds a frame's payload (the broker's ``max_frame``); a longer
    frame, a header that is not a JSON object with a string ``op``, or a header
    longer than :data:`MAX_HEADER` raises :class:`FrameError`. Descriptors arrive
    with the bytes they were attached to, which may also complete earlier frames;
    a frame announcing ``shm`` takes the oldest one not yet taken, and a
    descriptor left over once the buffer is empty is a protocol error.
    """

    __slots__ = ("_buf", "_cache", "_fds", "max_payload")

    def __init__(self, max_payload: int, *, share_headers: bool = False) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        # A publisher sends the same header bytes again and again: with share_headers
        # a repeated header is parsed once and the same dict is handed out each time
        # (callers must then not modify it). Bounded, and only short headers.
        self._cache: dict[bytes, dict[str, Any]] | None = {} if share_headers else None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | memoryview, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Add received bytes and the descriptors that came with them."""
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise FrameError(f"more than {MAX_FDS} descriptors in flight")
        self._buf += data

    def frames(self) -> Iterator[Frame]:
        """Every complete frame buffered so far, in order."""
        buf = self._buf
        while len(buf) >= 8:
            total, hlen = LENGTHS.unpack_from(buf)
            if hlen == 0 or hlen > MAX_HEADER or total < 4 + hlen:
                raise FrameError(f"bad frame lengths (total {total}, header {hlen})")
            if total - 4 - hlen > self.max_payload:
                raise FrameTooLarge(
                    f"frame payload of {total - 4 - hlen} bytes exceeds the limit of "
                    f"{self.max_payload} bytes"
                )
            if len(buf) < 4 + total:
                return
            raw = bytes(buf[8 : 8 + hlen])
            payload = bytes(buf[8 + hlen : 4 + total])
            del buf[: 4 + total]
            cache = self._cache
            header = cache.get(raw) if cache is not None else None
            if header is None:
                header = _parse_header(raw)
                if cache is not None and hlen <= _CACHED_HEADER:
                    if len(cache) >= _CACHE_ENTRIES:
                        cache.clear()
                    cache[raw] = header
            frame = Frame(header, payload)
            if "shm" in header:
                if not self._fds:
                    raise FrameError('a frame announced "shm" but carried no descriptor')
                frame.fd = self._fds.popleft()
            yield frame
        if not buf and self._fds:
            raise FrameError('a descriptor arrived without a frame announcing "shm"')

    def close(self) -> None:
        """Close every descriptor received and not taken by a frame."""
        while self._fds:
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass
