"""How Python values cross process boundaries: plain pickle first, dill when needed.

pickle handles almost every message in about half a microsecond; dill is
some fifty times slower but carries lambdas, closures and classes defined in
``__main__`` or inside functions. So the codec tries pickle and falls back to
dill, and marks which one it used in the first byte. A value pickle *can*
encode but only by reference to ``__main__`` would fail to load in another
process (whose ``__main__`` differs), so a payload naming ``__main__`` is
re-encoded with dill, by value. The rejected alternative, dill for
everything, would cost the hot path its whole latency budget.
"""

from __future__ import annotations

import pickle
from typing import Any

PICKLE = 0x70  # b"p"
DILL = 0x64  # b"d"
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
