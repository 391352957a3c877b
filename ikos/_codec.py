"""How Python values cross process boundaries: plain pickle first, dill when needed.

pickle handles almost every message in about half a microsecond; dill is
some fifty times slower but carries lambdas, closures and classes defined in
``__main__`` or inside functions. So the codec tries pickle and falls back to
dill, and marks which one it used in the first byte. A value pickle *can*
encode but only by reference to ``__main__`` would fail to load in another
process (whose ``__main__`` differs), so a payload naming ``__main__`` is
re-encoded with dill, by value. The rejected alternative, dill for
everything, would cost the hot path its whole latency budget.

A large bytes-like payload is encoded out of band (pickle protocol 5): the
pickle stream holds a reference to one buffer, which travels separately (in
a sealed memfd, see ``ikos.platform._memfd``), and the body starts with the
codec byte ``m`` and the buffer's size. This module only shapes the bytes;
the transport owns the descriptor.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

PICKLE = 0x70  # b"p"
DILL = 0x64  # b"d"
SHM = 0x6D  # b"m": followed by the out-of-band buffer's size, then the pickle stream
SHM_HEAD = struct.Struct("!BQ")
_MAIN = b"__main__"


def encode(obj: Any) -> bytes:
    """Encode ``obj``: one codec byte followed by the pickle stream."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except (pickle.PicklingError, AttributeError, TypeError):
        return _dill_dumps(obj)
    if _MAIN in data:
        return _dill_dumps(obj)
    return b"p" + data


def _dill_dumps(obj: Any) -> bytes:
    import dill

    data: bytes = dill.dumps(obj, protocol=5, recurse=True)
    return b"d" + data


def decode(data: bytes | memoryview) -> Any:
    """Decode what :func:`encode` produced. Never call it on unauthenticated input."""
    flag = data[0]
    body = memoryview(data)[1:]
    if flag == PICKLE:
        return pickle.loads(body)
    if flag == DILL:
        import dill

        return dill.loads(bytes(body))
    raise ValueError(f"unknown codec byte {flag:#x}")


def encode_out_of_band(obj: Any) -> tuple[bytes, memoryview]:
    """Encode ``obj``, which holds exactly one ``pickle.PickleBuffer``, with that
    buffer out of band: ``(body, buffer)``; the body names the buffer's size.

    Example: ``encode_out_of_band((1, 7, pickle.PickleBuffer(payload)))``.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    if len(buffers) != 1:
        raise ValueError(f"expected one out-of-band buffer, the value held {len(buffers)}")
    raw = buffers[0].raw()
    return SHM_HEAD.pack(SHM, raw.nbytes) + data, raw


def out_of_band_size(body: bytes | memoryview) -> int:
    """The size of the out-of-band buffer an ``m`` body announces (ValueError if short)."""
    if len(body) < SHM_HEAD.size:
        raise ValueError("truncated shared-memory frame")
    return int(SHM_HEAD.unpack_from(body)[1])


def decode_out_of_band(body: bytes | memoryview, buffer: memoryview) -> Any:
    """Decode an ``m`` body, ``buffer`` standing for its out-of-band buffer."""
    return pickle.loads(memoryview(body)[SHM_HEAD.size :], buffers=(buffer,))
