"""The mailbox wire: framing and the HMAC handshake, before anything is unpickled.

A connection to an actor's mailbox starts with a mutual challenge on the
instance's random secret (a 0600 file): the client sends ``IKOS2`` and a
nonce, the server answers its own nonce, its frame limit (4 bytes) and a
MAC over both nonces and the limit proving it knows the secret, the client
answers a MAC over both nonces. Until the server has checked that last MAC,
received bytes are only buffered, never decoded. SO_PEERCRED is not needed
for authentication (the secret is), but the mailbox directory is 0700 as a
second fence.

After the handshake each message is a frame: a 4-byte big-endian length
and that many bytes (codec byte + pickle). A frame longer than the
server's limit closes the connection, so the server announces the limit in
the handshake: a client cannot otherwise know the ``max_message_bytes`` its
instance was started with, and refuses an oversized message itself, with a
clear error, before sending it. The format costs one ``sendall`` per
message and lets a reader parse many frames from one ``recv``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from ikos._errors import AuthenticationError

MAGIC = b"IKOS2"  # 2: the server's answer carries its frame limit
NONCE = 32
MAC = 32
HEADER = struct.Struct("!I")
HELLO_LEN = len(MAGIC) + NONCE
SERVER_LEN = NONCE + HEADER.size + MAC
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


def ensure_secret(path: Path) -> bytes:
    """Read the instance secret, creating it (0600, 32 random bytes) if missing."""
    try:
        return read_secret(path)
    except AuthenticationError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return read_secret(path)


def read_secret(path: Path) -> bytes:
    """Read the instance secret; a clear error when it is missing or unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuthenticationError(f"no instance secret at {path} (is ikosd running on this root?)")
    except PermissionError:
        raise AuthenticationError(f"cannot read the instance secret {path}: permission denied")
    if len(data) < 16:
        raise AuthenticationError(f"the instance secret {path} is too short")
    return data


def _mac(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    # hmac loads OpenSSL's libcrypto: imported at the first handshake, not by every
    # process that imports this module (ikosd runs none for a tree of executables)
    import hmac

    return hmac.new(secret, label + a + b, "sha256").digest()


def _same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (``hmac.compare_digest``, imported on first use)."""
    import hmac

    return hmac.compare_digest(a, b)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("handshake timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("peer closed during the handshake")
        buf += chunk
    return bytes(buf)


def client_handshake(sock: socket.socket, secret: bytes, timeout: float) -> int:
    """Authenticate both ways on a freshly connected socket (blocking, bounded).

    Returns the server's frame limit: the largest frame it accepts.
    """
    deadline = time.monotonic() + timeout
    nonce_c = os.urandom(NONCE)
    sock.settimeout(timeout)
    sock.sendall(MAGIC + nonce_c)
    answer = _recv_exact(sock, SERVER_LEN, deadline)
    nonce_s, limit, mac_s = answer[:NONCE], answer[NONCE:-MAC], answer[-MAC:]
    if not _same(mac_s, _mac(secret, b"server", nonce_c, nonce_s + limit)):
        raise AuthenticationError("the peer failed the HMAC challenge (wrong instance secret)")
    sock.sendall(_mac(secret, b"client", nonce_s, nonce_c))
    (max_frame,) = HEADER.unpack(limit)
    return int(max_frame)


class ServerHandshake:
    """The server side of the handshake as a non-blocking state machine.

    Feed it received bytes; it returns bytes to send. ``done`` turns true once
    the client proved the secret; ``leftover`` then holds frame bytes that
    arrived behind the proof. Any violation raises :class:`AuthenticationError`.
    ``max_frame`` is the limit announced to the client.
    """

    __slots__ = ("_buf", "_limit", "_nonce_c", "_nonce_s", "_secret", "done", "leftover")

    def __init__(self, secret: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._secret = secret
        self._limit = HEADER.pack(max_frame)
        self._buf = bytearray()
        self._nonce_c = b""
        self._nonce_s = b""
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = b""
        if not self._nonce_c:
            if len(self._buf) < HELLO_LEN:
                if not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                    raise AuthenticationError("not an ikos client (bad magic)")
                return b""
            if bytes(self._buf[: len(MAGIC)]) != MAGIC:
                raise AuthenticationError("not an ikos client (bad magic)")
            self._nonce_c = bytes(self._buf[len(MAGIC) : HELLO_LEN])
            del self._buf[:HELLO_LEN]
            self._nonce_s = os.urandom(NONCE)
            limit = self._limit
            mac = _mac(self._secret, b"server", self._nonce_c, self._nonce_s + limit)
            out = self._nonce_s + limit + mac
        if len(self._buf) >= MAC:
            proof = bytes(self._buf[:MAC])
            if not _same(proof, _mac(self._secret, b"client", self._nonce_s, self._nonce_c)):
                raise AuthenticationError("the client failed the HMAC challenge")
            self.done = True
            self.leftover = bytes(self._buf[MAC:])
            self._buf.clear()
        return out


def frame(payload: bytes) -> bytes:
    """Length-prefix one encoded message."""
    return HEADER.pack(len(payload)) + payload
